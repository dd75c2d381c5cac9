//! `tokio_util::codec` adapter, for byte-stream transports such as TCP.
//!
//! In: bytes from a `FramedRead`. Out: [`Frame`]s; and frames or pre-encoded bytes into a
//! `FramedWrite`.

use bytes::{Bytes, BytesMut};

use crate::{DecodeError, Decoder, Frame, Limits, Version, encode};

/// Why a framed stream failed: bad bytes from the peer, or the socket itself.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The peer broke the protocol: answer with an ERROR frame, then close.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The socket failed: just close.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// STOMP framing for `tokio_util::codec::Framed`.
#[derive(Debug, Clone)]
pub struct StompCodec {
    decoder: Decoder,
}

impl StompCodec {
    /// A codec for `version` with these limits.
    pub fn new(version: Version, limits: Limits) -> StompCodec {
        StompCodec {
            decoder: Decoder::with_version(version, limits),
        }
    }

    /// The version used to escape and unescape headers.
    pub fn version(&self) -> Version {
        self.decoder.version()
    }

    /// Switches versions, e.g. once CONNECTED has settled it.
    pub fn set_version(&mut self, version: Version) {
        self.decoder.set_version(version);
    }
}

impl tokio_util::codec::Decoder for StompCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        Ok(self.decoder.decode(src)?)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        Ok(self.decoder.decode_eof(src)?)
    }
}

impl tokio_util::codec::Encoder<&Frame> for StompCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        encode(frame, self.decoder.version(), dst);
        Ok(())
    }
}

impl tokio_util::codec::Encoder<Frame> for StompCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        encode(&frame, self.decoder.version(), dst);
        Ok(())
    }
}

/// Pre-encoded bytes (a [`SharedMessage`](crate::SharedMessage), a heart-beat EOL) pass through.
impl tokio_util::codec::Encoder<Bytes> for StompCodec {
    type Error = CodecError;

    fn encode(&mut self, bytes: Bytes, dst: &mut BytesMut) -> Result<(), CodecError> {
        dst.extend_from_slice(&bytes);
        Ok(())
    }
}
