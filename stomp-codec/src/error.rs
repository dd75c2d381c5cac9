//! What can be wrong with received bytes.
//!
//! In: the decoder's findings. Out: a [`DecodeError`] whose text is fit for an ERROR frame's
//! `message` header: lowercase, and naming the line or byte where the fault is.

use crate::Command;

/// Why bytes could not be decoded into a frame. Every variant is fatal for the connection:
/// the stream cannot be resynchronised after it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The command line is not a STOMP command.
    #[error("unknown command {command:?}")]
    UnknownCommand {
        /// The command line as read (lossy UTF-8, at most 32 characters).
        command: String,
    },
    /// A header line has no `:`.
    #[error("header line {line} has no colon")]
    MissingColon {
        /// The line number in the frame; the command is line 1.
        line: usize,
    },
    /// A header line starts with `:`.
    #[error("header line {line} has an empty name")]
    EmptyHeaderName {
        /// The line number in the frame; the command is line 1.
        line: usize,
    },
    /// A NUL byte inside the command or headers: usually a frame that lost its blank line.
    #[error("line {line} contains a NUL byte before the end of the headers")]
    NulInHeaders {
        /// The line number in the frame; the command is line 1.
        line: usize,
    },
    /// A backslash escape that this version does not define (1.1 and 1.2 "Value Encoding").
    #[error("undefined escape sequence {sequence:?} in header line {line}")]
    InvalidEscape {
        /// The line number in the frame; the command is line 1.
        line: usize,
        /// The offending sequence, e.g. `\t`, or a lone `\` at the end of a value.
        sequence: String,
    },
    /// The command or header text is not UTF-8.
    #[error("frame headers are not valid UTF-8 at byte {offset}")]
    InvalidUtf8 {
        /// Byte offset from the start of the frame.
        offset: usize,
    },
    /// The `content-length` value is not a decimal number.
    #[error("content-length {value:?} is not a number")]
    InvalidContentLength {
        /// The value as sent (at most 32 characters).
        value: String,
    },
    /// The byte after a `content-length` body is not NUL.
    #[error("the {content_length}-byte body is not followed by a NUL byte")]
    MissingNul {
        /// The declared body length.
        content_length: usize,
    },
    /// A frame other than SEND, MESSAGE or ERROR has a body.
    #[error("{command} frames must not have a body")]
    BodyNotAllowed {
        /// The frame's command.
        command: Command,
    },
    /// The whole frame is larger than [`Limits::max_frame_bytes`](crate::Limits).
    #[error("frame exceeds the limit of {limit} bytes")]
    FrameTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// The body is larger than [`Limits::max_body_bytes`](crate::Limits).
    #[error("body of {size} bytes exceeds the limit of {limit} bytes")]
    BodyTooLarge {
        /// The declared `content-length`, or the bytes received so far.
        size: u64,
        /// The configured limit.
        limit: usize,
    },
    /// More headers than [`Limits::max_headers`](crate::Limits).
    #[error("frame has more than {limit} headers")]
    TooManyHeaders {
        /// The configured limit.
        limit: usize,
    },
    /// A line longer than [`Limits::max_header_line_bytes`](crate::Limits).
    #[error("line {line} exceeds the limit of {limit} bytes")]
    HeaderLineTooLong {
        /// The line number in the frame; the command is line 1.
        line: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The stream ended in the middle of a frame.
    #[error("connection closed in the middle of a frame ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes of the unfinished frame.
        buffered: usize,
    },
}

/// At most `max` characters of `bytes`, lossily decoded, for error messages.
pub(crate) fn excerpt(bytes: &[u8], max: usize) -> String {
    String::from_utf8_lossy(bytes).chars().take(max).collect()
}
