//! A run of one room's messages as one stored row.
//!
//! A busy room is written to the store as one row per transaction rather than one per
//! message: at tens of thousands of room messages per second, SQLite's work per row (a
//! B-tree insert, the statement, a page written to the log) then counts once per room per
//! batch. In: messages in seq order. Out: the row's bytes, and back.
//!
//! Layout, all integers little-endian: a format byte ([`FORMAT`]), then per message its seq
//! (u64), `message-id` (u64), header count (u32), each header as name length (u32), name,
//! value length (u32), value, then body length (u32) and body.

use crate::message::StoredMessage;
use bytes::Bytes;

/// The layout's number, first in every chunk.
pub const FORMAT: u8 = 1;

/// Why stored bytes are not a chunk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// The first byte names a layout this broker does not know.
    #[error("unknown chunk format {0}")]
    Format(u8),
    /// The bytes end inside a message.
    #[error("chunk ends inside message {0}")]
    Truncated(usize),
    /// A header name or value is not UTF-8.
    #[error("header of message {0} is not UTF-8")]
    NotUtf8(usize),
}

/// Messages being written into one chunk.
#[derive(Debug)]
pub struct ChunkWriter {
    bytes: Vec<u8>,
    messages: usize,
    first_seq: u64,
    last_seq: u64,
}

impl ChunkWriter {
    /// An empty chunk.
    pub fn new() -> ChunkWriter {
        ChunkWriter {
            bytes: vec![FORMAT],
            messages: 0,
            first_seq: 0,
            last_seq: 0,
        }
    }

    /// Appends one message; messages go in seq order.
    pub fn push<'a>(
        &mut self,
        seq: u64,
        message_id: u64,
        headers: impl ExactSizeIterator<Item = (&'a str, &'a str)>,
        body: &[u8],
    ) {
        if self.messages == 0 {
            self.first_seq = seq;
        }
        self.messages += 1;
        self.last_seq = seq;
        self.bytes.extend_from_slice(&seq.to_le_bytes());
        self.bytes.extend_from_slice(&message_id.to_le_bytes());
        put_len(&mut self.bytes, headers.len());
        for (name, value) in headers {
            put_bytes(&mut self.bytes, name.as_bytes());
            put_bytes(&mut self.bytes, value.as_bytes());
        }
        put_bytes(&mut self.bytes, body);
    }

    /// How many messages it holds.
    pub fn len(&self) -> usize {
        self.messages
    }

    /// Whether it holds no message.
    pub fn is_empty(&self) -> bool {
        self.messages == 0
    }

    /// The seq of the first and of the last message.
    pub fn seqs(&self) -> (u64, u64) {
        (self.first_seq, self.last_seq)
    }

    /// The chunk's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    // Frames are limited far below 4 GiB (`--max-frame-bytes`); saturate rather than wrap.
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_len(out, bytes.len());
    out.extend_from_slice(bytes);
}

/// The messages of a chunk, in the order they were written. Bodies share `chunk`'s memory.
///
/// # Errors
/// `chunk` is not what [`ChunkWriter`] wrote.
pub fn read_chunk(chunk: &Bytes) -> Result<Vec<StoredMessage>, ChunkError> {
    let Some((&format, _)) = chunk.split_first() else {
        return Err(ChunkError::Truncated(0));
    };
    if format != FORMAT {
        return Err(ChunkError::Format(format));
    }
    let mut reader = Reader { chunk, at: 1 };
    let mut messages = Vec::new();
    while reader.at < chunk.len() {
        let n = messages.len();
        let truncated = || ChunkError::Truncated(n);
        let seq = reader.u64().ok_or_else(truncated)?;
        let message_id = reader.u64().ok_or_else(truncated)?;
        let count = reader.len().ok_or_else(truncated)?;
        // Each header takes at least 8 bytes: a count past what is left is damage, and must
        // not reserve memory for it.
        let mut headers = Vec::with_capacity(count.min(chunk.len() / 8));
        for _ in 0..count {
            let name = reader.text(n)?;
            let value = reader.text(n)?;
            headers.push((name, value));
        }
        let body = reader.slice().ok_or_else(truncated)?;
        messages.push(StoredMessage {
            seq,
            message_id,
            headers,
            body,
        });
    }
    Ok(messages)
}

struct Reader<'a> {
    chunk: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<std::ops::Range<usize>> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.chunk.len())?;
        let range = self.at..end;
        self.at = end;
        Some(range)
    }

    fn u64(&mut self) -> Option<u64> {
        let range = self.take(8)?;
        Some(u64::from_le_bytes(self.chunk.get(range)?.try_into().ok()?))
    }

    fn len(&mut self) -> Option<usize> {
        let range = self.take(4)?;
        let len = u32::from_le_bytes(self.chunk.get(range)?.try_into().ok()?);
        usize::try_from(len).ok()
    }

    /// The range of the next length-prefixed field.
    fn field(&mut self) -> Option<std::ops::Range<usize>> {
        let len = self.len()?;
        self.take(len)
    }

    fn slice(&mut self) -> Option<Bytes> {
        let range = self.field()?;
        Some(self.chunk.slice(range))
    }

    fn text(&mut self, message: usize) -> Result<String, ChunkError> {
        let bytes = self
            .field()
            .and_then(|range| self.chunk.get(range))
            .ok_or(ChunkError::Truncated(message))?;
        let text = std::str::from_utf8(bytes).map_err(|_| ChunkError::NotUtf8(message))?;
        Ok(text.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message as a test writes it: seq, headers, body.
    type Written<'a> = (u64, &'a [(&'a str, &'a str)], &'a [u8]);

    fn written(messages: &[Written<'_>]) -> ChunkWriter {
        let mut chunk = ChunkWriter::new();
        for &(seq, headers, body) in messages {
            chunk.push(seq, seq + 100, headers.iter().copied(), body);
        }
        chunk
    }

    #[test]
    fn a_chunk_reads_back_what_was_written_in_order() {
        let chunk = written(&[
            (
                7,
                &[("destination", "/topic/room.방"), ("x-note", "a:b\nc")],
                b"hi",
            ),
            (8, &[], b""),
            (9, &[("x-event", "join")], &[0, 159, 146, 150]),
        ]);
        assert_eq!((chunk.seqs(), chunk.len()), ((7, 9), 3));
        let read = read_chunk(&Bytes::copy_from_slice(chunk.bytes())).unwrap();
        assert_eq!(read.len(), 3);
        assert_eq!((read[0].seq, read[0].message_id), (7, 107));
        assert_eq!(
            read[0].headers,
            [
                ("destination".to_owned(), "/topic/room.방".to_owned()),
                ("x-note".to_owned(), "a:b\nc".to_owned())
            ]
        );
        assert_eq!(read[0].body, &b"hi"[..]);
        assert!(read[1].headers.is_empty() && read[1].body.is_empty());
        assert_eq!(read[2].body, &[0, 159, 146, 150][..], "binary bodies kept");
    }

    #[test]
    fn damaged_chunks_are_errors_not_panics() {
        let chunk = written(&[(1, &[("destination", "/topic/room.a")], b"body")]);
        let bytes = chunk.bytes();
        assert_eq!(read_chunk(&Bytes::new()), Err(ChunkError::Truncated(0)));
        let mut other = bytes.to_vec();
        other[0] = 9;
        assert_eq!(read_chunk(&Bytes::from(other)), Err(ChunkError::Format(9)));
        // Every cut short of the whole chunk (and past the format byte) is caught.
        for cut in 2..bytes.len() {
            let cut = Bytes::copy_from_slice(&bytes[..cut]);
            assert_eq!(
                read_chunk(&cut),
                Err(ChunkError::Truncated(0)),
                "cut {cut:?}"
            );
        }
        // A header count of 4 billion with nothing behind it.
        let mut huge = vec![FORMAT];
        huge.extend_from_slice(&[0; 16]);
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            read_chunk(&Bytes::from(huge)),
            Err(ChunkError::Truncated(0))
        );
        let mut bad = ChunkWriter::new();
        bad.push(1, 1, [("x", "y")].into_iter(), b"");
        let mut bytes = bad.bytes().to_vec();
        let y = bytes.len() - 5;
        bytes[y] = 0xff;
        assert_eq!(read_chunk(&Bytes::from(bytes)), Err(ChunkError::NotUtf8(0)));
    }
}
