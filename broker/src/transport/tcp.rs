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
    out: BytesMut,
    read_chunk: usize,
}

impl TcpTransport {
    /// Wraps an accepted stream; reads ask for at least `read_chunk` bytes of room.
    pub fn new(stream: TcpStream, read_chunk: usize) -> TcpTransport {
        // Frames are written whole, in batches: Nagle's delay only adds latency.
        let _ = stream.set_nodelay(true);
        TcpTransport {
            stream,
            out: BytesMut::new(),
            read_chunk,
        }
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
        self.out.clear();
        for item in batch {
            compose(item, &mut self.out);
        }
        self.stream.write_all(&self.out).await?;
        if self.out.capacity() > WRITE_BUFFER_KEEP_BYTES {
            self.out = BytesMut::new();
        }
        Ok(())
    }

    async fn heart_beat(&mut self) -> io::Result<()> {
        self.stream.write_all(b"\n").await
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
