//! STOMP over a byte stream: TCP (and anything else that reads and writes bytes).
//!
//! In: an accepted [`TcpStream`]. Out: bytes appended to the read buffer; batches of frames
//! written with one `write_all` per batch.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::connection::{CloseKind, LINGER, Transport, TransportError, compose};
use crate::outbox::Outgoing;

/// A write buffer grown past this by a large batch is given back afterwards.
const WRITE_BUFFER_KEEP_BYTES: usize = 256 * 1024;

/// Reads at most this many times per poll before dropping input gives way to writing.
const DISCARD_READS_PER_POLL: usize = 16;

/// Reads and drops what `stream` has ready (inside a poll), until it would wait, it ends
/// (`done`), or [`DISCARD_READS_PER_POLL`] reads were made (then the task is woken again,
/// since more may be waiting with no wake-up to come).
pub(crate) fn discard_input<S: AsyncRead + Unpin>(
    stream: &mut S,
    cx: &mut Context<'_>,
    sink: &mut [u8],
    done: &mut bool,
) {
    for _ in 0..DISCARD_READS_PER_POLL {
        if *done {
            return;
        }
        let mut buf = ReadBuf::new(sink);
        match Pin::new(&mut *stream).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) if buf.filled().is_empty() => *done = true,
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) => *done = true,
            Poll::Pending => return,
        }
    }
    if !*done {
        cx.waker().wake_by_ref();
    }
}

/// STOMP over TCP.
pub type TcpTransport = StreamTransport<TcpStream>;

/// STOMP over a byte stream.
#[derive(Debug)]
pub struct StreamTransport<S> {
    stream: S,
    /// Bytes composed but not yet written. A write cancelled half way leaves the rest here
    /// for the next one, so the stream never holds half a frame followed by another.
    pending: BytesMut,
    read_chunk: usize,
}

impl StreamTransport<TcpStream> {
    /// Wraps an accepted TCP stream; reads ask for at least `read_chunk` bytes of room.
    pub fn new(stream: TcpStream, read_chunk: usize) -> TcpTransport {
        // Frames are written whole, in batches: Nagle's delay only adds latency.
        let _ = stream.set_nodelay(true);
        StreamTransport::over(stream, read_chunk)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> StreamTransport<S> {
    /// Wraps a byte stream; reads ask for at least `read_chunk` bytes of room.
    pub fn over(stream: S, read_chunk: usize) -> StreamTransport<S> {
        StreamTransport {
            stream,
            pending: BytesMut::new(),
            read_chunk,
        }
    }

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

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Transport for StreamTransport<S> {
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

    async fn write_discarding(&mut self, batch: &[Outgoing]) -> io::Result<()> {
        for item in batch {
            compose(item, &mut self.pending);
        }
        let mut sink = [0u8; 4096];
        let mut input_done = false;
        let (stream, pending) = (&mut self.stream, &mut self.pending);
        std::future::poll_fn(|cx| {
            discard_input(&mut *stream, cx, &mut sink, &mut input_done);
            while !pending.is_empty() {
                match Pin::new(&mut *stream).poll_write(cx, pending) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => pending.advance(n),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            Pin::new(&mut *stream).poll_flush(cx)
        })
        .await
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
