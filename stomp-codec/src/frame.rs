//! The STOMP frame: a command, ordered headers and a body.
//!
//! In: parts from the decoder or from a program building a frame. Out: the same parts for
//! the encoder and for sessions.

use bytes::Bytes;

use crate::{Command, Headers};

/// One STOMP frame.
///
/// The body is a [`Bytes`]: a decoded frame's body is a slice of the receive buffer, not a
/// copy, and a program can share one body between many frames.
///
/// ```
/// use stomp_codec::{Command, Frame};
///
/// let frame = Frame::new(Command::Send)
///     .with_header("destination", "/topic/room.lobby")
///     .with_header("content-type", "text/plain")
///     .with_body("안녕하세요");
/// assert_eq!(frame.header("destination"), Some("/topic/room.lobby"));
/// assert_eq!(&frame.body[..], "안녕하세요".as_bytes());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The command line.
    pub command: Command,
    /// The headers in wire order, repeats kept.
    pub headers: Headers,
    /// The body; empty when the frame has none.
    pub body: Bytes,
}

impl Frame {
    /// A frame with no headers and no body.
    pub const fn new(command: Command) -> Frame {
        Frame {
            command,
            headers: Headers::new(),
            body: Bytes::new(),
        }
    }

    /// The frame with one more header appended.
    #[must_use]
    pub fn with_header(mut self, name: &str, value: &str) -> Frame {
        self.headers.push(name, value);
        self
    }

    /// The frame with its body replaced.
    #[must_use]
    pub fn with_body(mut self, body: impl Into<Bytes>) -> Frame {
        self.body = body.into();
        self
    }

    /// The first value of header `name`, if any.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }
}
