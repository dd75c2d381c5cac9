//! STOMP over TCP.
//!
//! In: an accepted [`TcpStream`]. Out: bytes appended to the read buffer; batches of frames
//! written with one `write_all` per batch.

use std::io;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::connection::{CloseKind, LINGER, Transport, TransportError, compose};
use crate::outbox::Outgoing;

/// A write buffer grown past this by a large batch is given back afterwards.
const WRITE_BUFFER_KEEP_BYTES: usize = 256 * 1024;

/// A TCP connection.
#[derive(Debug)]
pub struct TcpTransport {
    stream: TcpStream,
    /// Bytes composed but not yet written. A write cancelled half way leaves the rest here
    /// for the next one, so the stream never holds half a frame followed by another.
    pending: BytesMut,
    read_chunk: usize,
}

impl TcpTransport {
    /// Wraps an accepted stream; reads ask for at least `read_chunk` bytes of room.
    pub fn new(stream: TcpStream, read_chunk: usize) -> TcpTransport {
        // Frames are written whole, in batches: Nagle's delay only adds latency.
        let _ = stream.set_nodelay(true);
        TcpTransport {
            stream,
            pending: BytesMut::new(),
            read_chunk,
        }
    }
}

impl TcpTransport {
    /// Writes out `pending`. Cancel safe: `write_buf` advances past exactly what was written.
    async fn drain(&mut self) -> io::Result<()> {
        while !self.pending.is_empty() {
            self.stream.write_buf(&mut self.pending).await?;
        }
        if self.pending.capacity() > WRITE_BUFFER_KEEP_BYTES {
            self.pending = BytesMut::new();
        }
        Ok(())
    }
}

impl Transport for TcpTransport {
    async fn read(&mut self, buf: &mut BytesMut) -> Result<bool, TransportError> {
        if buf.capacity() - buf.len() < self.read_chunk / 2 {
            buf.reserve(self.read_chunk);
        }
        // read_buf is cancel safe: nothing is lost if another select! branch wins.
        let n = self.stream.read_buf(buf).await?;
        Ok(n > 0)
    }

    async fn write(&mut self, batch: &[Outgoing]) -> io::Result<()> {
        for item in batch {
            compose(item, &mut self.pending);
        }
        self.drain().await
    }

    async fn heart_beat(&mut self) -> io::Result<()> {
        self.pending.extend_from_slice(b"\n");
        self.drain().await
    }

    async fn close(&mut self, _kind: CloseKind) {
        // Half-close, then read until the peer closes too (or a moment passes), so unread
        // input does not make the kernel reset the connection and lose the last frames.
        let _ = self.stream.shutdown().await;
        let mut sink = [0u8; 1024];
        let _ = tokio::time::timeout(LINGER, async {
            while let Ok(n) = self.stream.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }
}
