//! Encoder: frames out as bytes.
//!
//! In: a [`Frame`] (or, for fan-out, a [`SharedMessage`] plus each subscriber's own headers)
//! and the connection's [`Version`]. Out: wire bytes appended to a [`BytesMut`], headers
//! escaped as that version requires, `content-length` computed from the body.

use bytes::{BufMut, Bytes, BytesMut};

use crate::{Command, Frame, Version};

/// How header text is written for one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escaping {
    /// 1.0, and CONNECT/CONNECTED in every version: no escapes exist. Characters that would
    /// break the frame (LF and CR; `:` in names) are replaced so that no value can inject a
    /// header line. NUL, which no version can escape, is replaced in every mode.
    Raw,
    /// 1.1: `\n`, `\c`, `\\`.
    V1_1,
    /// 1.2: 1.1 plus `\r`.
    V1_2,
}

impl Escaping {
    fn of(version: Version, command: Command) -> Escaping {
        match version {
            _ if !command.escapes_headers() => Escaping::Raw,
            Version::V1_0 => Escaping::Raw,
            Version::V1_1 => Escaping::V1_1,
            Version::V1_2 => Escaping::V1_2,
        }
    }
}

/// Appends `frame` to `dst` as `version` writes it.
///
/// Any `content-length` header in `frame` is ignored: the encoder writes the body's real
/// length for SEND, MESSAGE and ERROR frames and for any frame with a non-empty body.
///
/// ```
/// use bytes::BytesMut;
/// use stomp_codec::{encode, Command, Frame, Version};
///
/// let frame = Frame::new(Command::Send)
///     .with_header("destination", "/topic/a")
///     .with_header("x-note", "a:b")
///     .with_body("hi");
/// let mut wire = BytesMut::new();
/// encode(&frame, Version::V1_2, &mut wire);
/// assert_eq!(&wire[..], b"SEND\ndestination:/topic/a\nx-note:a\\cb\ncontent-length:2\n\nhi\0");
/// ```
pub fn encode(frame: &Frame, version: Version, dst: &mut BytesMut) {
    let escaping = Escaping::of(version, frame.command);
    dst.reserve(encoded_len_estimate(frame));
    dst.put_slice(frame.command.as_str().as_bytes());
    dst.put_u8(b'\n');
    for (name, value) in &frame.headers {
        if name != "content-length" {
            put_header(dst, name, value, escaping);
        }
    }
    if frame.command.may_have_body() || !frame.body.is_empty() {
        put_content_length(dst, frame.body.len());
    }
    dst.put_u8(b'\n');
    dst.put_slice(&frame.body);
    dst.put_u8(0);
}

/// `frame` encoded as `version` writes it, in a buffer of its own.
pub fn encode_to_bytes(frame: &Frame, version: Version) -> Bytes {
    let mut dst = BytesMut::new();
    encode(frame, version, &mut dst);
    dst.freeze()
}

fn encoded_len_estimate(frame: &Frame) -> usize {
    let headers: usize = frame
        .headers
        .iter()
        .map(|(n, v)| n.len() + v.len() + 2)
        .sum();
    frame.command.as_str().len() + headers + frame.body.len() + 40
}

fn put_content_length(dst: &mut BytesMut, len: usize) {
    let mut digits = itoa::Buffer::new();
    dst.put_slice(b"content-length:");
    dst.put_slice(digits.format(len).as_bytes());
    dst.put_u8(b'\n');
}

fn put_header(dst: &mut BytesMut, name: &str, value: &str, escaping: Escaping) {
    put_text(dst, name, escaping, true);
    dst.put_u8(b':');
    put_text(dst, value, escaping, false);
    dst.put_u8(b'\n');
}

/// Whether byte `b` of a name or value must be escaped (or, in raw frames, replaced).
fn is_special(b: u8, escaping: Escaping, is_name: bool) -> bool {
    // No version can escape NUL, and a raw one would end the frame early.
    b == 0
        || match escaping {
            Escaping::Raw => b == b'\n' || b == b'\r' || (is_name && b == b':'),
            Escaping::V1_1 => matches!(b, b'\n' | b':' | b'\\'),
            Escaping::V1_2 => matches!(b, b'\n' | b'\r' | b':' | b'\\'),
        }
}

/// The encoded length of a header line (EOL included).
fn header_len(name: &str, value: &str, escaping: Escaping) -> usize {
    let extra = |text: &str, is_name: bool| match escaping {
        // Raw replacements (and NUL's, in every version) keep the length.
        Escaping::Raw => 0,
        _ => text
            .bytes()
            .filter(|&b| b != 0 && is_special(b, escaping, is_name))
            .count(),
    };
    name.len() + value.len() + 2 + extra(name, true) + extra(value, false)
}

fn put_text(dst: &mut BytesMut, text: &str, escaping: Escaping, is_name: bool) {
    let special = |b: u8| is_special(b, escaping, is_name);
    let bytes = text.as_bytes();
    if !bytes.iter().any(|&b| special(b)) {
        dst.put_slice(bytes);
        return;
    }
    for &b in bytes {
        if !special(b) {
            dst.put_u8(b);
            continue;
        }
        match (escaping, b) {
            (_, 0) => dst.put_u8(b' '),
            (Escaping::Raw, b':') => dst.put_u8(b'_'),
            (Escaping::Raw, _) => dst.put_u8(b' '),
            (_, b'\n') => dst.put_slice(b"\\n"),
            (_, b'\r') => dst.put_slice(b"\\r"),
            (_, b':') => dst.put_slice(b"\\c"),
            _ => dst.put_slice(b"\\\\"),
        }
    }
}

/// A MESSAGE whose shared part is encoded once per publish and reused for every subscriber.
///
/// The shared part holds every header but the subscriber's own (`subscription`, `ack`, and
/// `message-id` where it differs per subscriber), then `content-length`, the blank line, the
/// body and the NUL. [`SharedMessage::encode_for`] writes `MESSAGE`, the subscriber's headers
/// and the shared bytes: one copy, no re-escaping of the shared headers. Header order carries
/// no meaning in STOMP, so writing the subscriber's headers first is correct, and makes them
/// win over any same-named header in the shared part.
///
/// ```
/// use bytes::BytesMut;
/// use stomp_codec::{Decoder, Limits, SharedMessage, Version};
///
/// let shared = SharedMessage::new(
///     Version::V1_2,
///     [("destination", "/topic/a"), ("message-id", "7")],
///     b"hello",
/// );
/// let mut wire = BytesMut::new();
/// shared.encode_for(&[("subscription", "sub-0")], &mut wire);
/// let frame = Decoder::new(Limits::default()).decode(&mut wire).unwrap().unwrap();
/// assert_eq!(frame.header("subscription"), Some("sub-0"));
/// assert_eq!(frame.header("message-id"), Some("7"));
/// assert_eq!(&frame.body[..], b"hello");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedMessage {
    version: Version,
    tail: Bytes,
}

impl SharedMessage {
    /// Encodes the shared headers (any `content-length` among them is ignored) and the body.
    ///
    /// The shared bytes are one block of exactly their size: a chat room keeps it for as
    /// long as it keeps the message in its history.
    pub fn new<'a, I>(version: Version, headers: I, body: &[u8]) -> SharedMessage
    where
        I: IntoIterator<Item = (&'a str, &'a str)>,
        I::IntoIter: Clone,
    {
        let escaping = Escaping::of(version, Command::Message);
        let headers = headers
            .into_iter()
            .filter(|(name, _)| *name != "content-length");
        let headers_len: usize = headers
            .clone()
            .map(|(name, value)| header_len(name, value, escaping))
            .sum();
        let length_digits = itoa::Buffer::new().format(body.len()).len();
        let mut tail = BytesMut::with_capacity(
            headers_len + b"content-length:\n\n".len() + length_digits + body.len() + 1,
        );
        for (name, value) in headers {
            put_header(&mut tail, name, value, escaping);
        }
        put_content_length(&mut tail, body.len());
        tail.put_u8(b'\n');
        tail.put_slice(body);
        tail.put_u8(0);
        SharedMessage {
            version,
            tail: tail.freeze(),
        }
    }

    /// The version the shared part was escaped for.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The shared bytes: headers, blank line, body and NUL.
    pub fn tail(&self) -> &Bytes {
        &self.tail
    }

    /// How many bytes [`SharedMessage::encode_for`] writes with these `own` headers.
    pub fn encoded_len(&self, own: &[(&str, &str)]) -> usize {
        let escaping = Escaping::of(self.version, Command::Message);
        let own_len: usize = own.iter().map(|(n, v)| header_len(n, v, escaping)).sum();
        b"MESSAGE\n".len() + own_len + self.tail.len()
    }

    /// Appends the whole MESSAGE for one subscriber: `own` headers, then the shared part.
    pub fn encode_for(&self, own: &[(&str, &str)], dst: &mut BytesMut) {
        dst.reserve(self.encoded_len(own));
        self.encode_head_for(own, dst);
        dst.put_slice(&self.tail);
    }

    /// Appends only `MESSAGE` and the `own` headers; the caller writes [`SharedMessage::tail`]
    /// after them (for vectored writes that skip the copy).
    pub fn encode_head_for(&self, own: &[(&str, &str)], dst: &mut BytesMut) {
        encode_message_head(self.version, own, dst);
    }
}

/// Appends `MESSAGE` and `own` headers escaped for `version`: the per-subscriber head that
/// goes before a [`SharedMessage::tail`]. A broker can encode it once per subscription.
pub fn encode_message_head(version: Version, own: &[(&str, &str)], dst: &mut BytesMut) {
    let escaping = Escaping::of(version, Command::Message);
    dst.put_slice(b"MESSAGE\n");
    for (name, value) in own {
        put_header(dst, name, value, escaping);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(frame: &Frame, version: Version) -> String {
        String::from_utf8(encode_to_bytes(frame, version).to_vec()).unwrap()
    }

    #[test]
    fn escapes_follow_the_version() {
        let frame = Frame::new(Command::Message).with_header("k:\\", "a\nb\rc:d\\e");
        assert_eq!(
            wire(&frame, Version::V1_2),
            "MESSAGE\nk\\c\\\\:a\\nb\\rc\\cd\\\\e\ncontent-length:0\n\n\0"
        );
        // 1.1 has no \r escape: a CR stays raw.
        assert_eq!(
            wire(&frame, Version::V1_1),
            "MESSAGE\nk\\c\\\\:a\\nb\rc\\cd\\\\e\ncontent-length:0\n\n\0"
        );
        // 1.0 has no escapes at all: line breaks are blanked so they cannot inject headers.
        assert_eq!(
            wire(&frame, Version::V1_0),
            "MESSAGE\nk_\\:a b c:d\\e\ncontent-length:0\n\n\0"
        );
    }

    #[test]
    fn nul_in_a_header_cannot_end_the_frame_early() {
        let frame = Frame::new(Command::Message).with_header("k", "a\0MESSAGE");
        for version in Version::ALL {
            assert_eq!(
                wire(&frame, version),
                "MESSAGE\nk:a MESSAGE\ncontent-length:0\n\n\0"
            );
        }
    }

    #[test]
    fn connect_and_connected_are_never_escaped() {
        let frame = Frame::new(Command::Connected).with_header("user-name", "a:b\\c");
        assert_eq!(
            wire(&frame, Version::V1_2),
            "CONNECTED\nuser-name:a:b\\c\n\n\0"
        );
        let frame = Frame::new(Command::Connect).with_header("login", "x\ny");
        assert_eq!(wire(&frame, Version::V1_2), "CONNECT\nlogin:x y\n\n\0");
    }

    #[test]
    fn content_length_is_computed_never_copied() {
        let frame = Frame::new(Command::Send)
            .with_header("content-length", "999")
            .with_header("destination", "/q")
            .with_body(&b"a\0b"[..]);
        assert_eq!(
            wire(&frame, Version::V1_2),
            "SEND\ndestination:/q\ncontent-length:3\n\na\0b\0"
        );
    }

    #[test]
    fn frames_without_a_body_get_no_content_length() {
        let frame = Frame::new(Command::Receipt).with_header("receipt-id", "7");
        assert_eq!(wire(&frame, Version::V1_2), "RECEIPT\nreceipt-id:7\n\n\0");
    }

    #[test]
    fn shared_message_equals_a_whole_encoding() {
        let shared = SharedMessage::new(
            Version::V1_1,
            [
                ("destination", "/topic/a:b"),
                ("content-length", "1"),
                ("message-id", "9"),
            ],
            b"body",
        );
        let mut got = BytesMut::new();
        shared.encode_for(&[("subscription", "s:1"), ("ack", "42")], &mut got);
        let whole = Frame::new(Command::Message)
            .with_header("subscription", "s:1")
            .with_header("ack", "42")
            .with_header("destination", "/topic/a:b")
            .with_header("message-id", "9")
            .with_body("body");
        assert_eq!(
            got.len(),
            shared.encoded_len(&[("subscription", "s:1"), ("ack", "42")])
        );
        assert_eq!(got.freeze(), encode_to_bytes(&whole, Version::V1_1));
    }

    #[test]
    fn a_shared_part_is_allocated_at_exactly_its_size() {
        // Escaped headers and bodies of one to five length digits: the block a room's
        // history keeps has no spare room.
        for body_len in [0, 9, 10, 999, 12_345] {
            for version in [Version::V1_0, Version::V1_2] {
                let body = vec![b'x'; body_len];
                let shared = SharedMessage::new(
                    version,
                    [("destination", "/topic/a:b\\c\nd"), ("x-seq", "12")],
                    &body,
                );
                let tail = shared.tail().clone();
                drop(shared);
                let block = tail.try_into_mut().expect("the only handle to the block");
                assert_eq!(block.capacity(), block.len(), "{version} body {body_len}");
            }
        }
    }
}
