//! The Stoa broker. Its server is built in issue #3; this crate holds its place in the workspace.
