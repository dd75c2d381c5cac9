//! The `stoa-cli` binary (issue #4).
fn main() {}
