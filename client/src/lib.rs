//! The Stoa STOMP client library (issue #4).
