//! Helpers for black-box tests of the `stoa` binary.
