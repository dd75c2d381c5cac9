//! STOMP 1.0, 1.1 and 1.2 frames: a streaming parser, an encoder, header escaping and
//! limits. No I/O: bytes in, [`Frame`]s out, and back.
//!
//! - [`Decoder`] takes whole frames off the front of a growing [`bytes::BytesMut`]; a frame's
//!   headers and body are slices of that buffer, not copies.
//! - [`encode`] writes a frame for a negotiated [`Version`]; [`SharedMessage`] encodes a
//!   published MESSAGE once and adds each subscriber's own headers cheaply.
//! - [`Limits`] bound every frame before it is buffered; [`DecodeError`] says what was wrong
//!   and where, in words fit for an ERROR frame's `message` header.
//! - With the `codec` feature, [`StompCodec`] plugs all of it into `tokio_util::codec`.
//!
//! ```
//! use bytes::BytesMut;
//! use stomp_codec::{encode, Command, Decoder, Frame, Limits, Version};
//!
//! let frame = Frame::new(Command::Send)
//!     .with_header("destination", "/topic/room.lobby")
//!     .with_header("content-type", "text/plain;charset=utf-8")
//!     .with_body("hello, 세계");
//! let mut wire = BytesMut::new();
//! encode(&frame, Version::V1_2, &mut wire);
//!
//! let mut decoder = Decoder::new(Limits::default());
//! let back = decoder.decode(&mut wire)?.expect("one whole frame");
//! assert_eq!(back.header("destination"), Some("/topic/room.lobby"));
//! assert_eq!(back.header("content-length"), Some("13"));
//! assert_eq!(back.body, frame.body);
//! # Ok::<(), stomp_codec::DecodeError>(())
//! ```

#![warn(missing_docs)]

mod command;
mod decode;
mod encode;
mod error;
mod frame;
mod header;
mod version;

#[cfg(feature = "codec")]
mod codec;
#[doc(hidden)]
pub mod fuzz;

pub use command::Command;
pub use decode::{Decoder, Limits};
pub use encode::{SharedMessage, encode, encode_message_head, encode_to_bytes};
pub use error::DecodeError;
pub use frame::Frame;
pub use header::{Headers, HeartBeat, INLINE_HEADERS, InvalidHeartBeat, Iter as HeaderIter};
pub use version::{UnknownVersion, Version};

#[cfg(feature = "codec")]
pub use codec::{CodecError, StompCodec};

#[doc(hidden)]
pub use fuzz::fuzz_decode;
