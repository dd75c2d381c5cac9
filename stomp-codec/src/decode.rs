//! Streaming decoder: bytes in, frames out.
//!
//! In: a growing [`BytesMut`] read buffer. Out: whole [`Frame`]s, sliced out of that buffer
//! without copying (headers and body share its allocation), `Ok(None)` while a frame is not
//! whole yet, or a [`DecodeError`] that ends the connection.
//!
//! The grammar (1.2 "Augmented BNF"):
//! `frame = command EOL *(header EOL) EOL *OCTET NUL *(EOL)`, with `EOL = [CR] LF`.
//! Bare EOLs between frames are heart-beats and are skipped.

use bytes::{Buf, BytesMut};
use bytestring::ByteString;
use nom::{IResult, Parser};
use smallvec::SmallVec;

use crate::error::excerpt;
use crate::header::{INLINE_HEADERS, Span};
use crate::{Command, DecodeError, Frame, Headers, Version};

/// Size limits that the decoder enforces while bytes arrive, before they are buffered.
///
/// A `content-length` over [`Limits::max_body_bytes`] is refused as soon as its header line
/// is read, so nothing is ever allocated for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest whole frame: command, headers, body and NUL.
    pub max_frame_bytes: usize,
    /// The most header lines in one frame, repeats included.
    pub max_headers: usize,
    /// The longest command or header line, EOL excluded.
    pub max_header_line_bytes: usize,
    /// The largest body.
    pub max_body_bytes: usize,
}

impl Limits {
    /// 4 MiB frames and bodies, 64 headers, 8 KiB header lines: Stoa's defaults.
    pub const DEFAULT: Limits = Limits {
        max_frame_bytes: 4 * 1024 * 1024,
        max_headers: 64,
        max_header_line_bytes: 8 * 1024,
        max_body_bytes: 4 * 1024 * 1024,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

/// Progress through one frame, kept between calls so that a frame arriving in many small
/// reads is scanned once, not once per read.
#[derive(Debug, Default, Clone)]
struct Partial {
    /// The command, once its line has been read.
    command: Option<Command>,
    /// Offset in the buffer of the next unread line.
    pos: usize,
    /// Lines read so far, the command line included.
    lines: usize,
    spans: SmallVec<[Span; INLINE_HEADERS]>,
    content_length: Option<usize>,
    /// `(command, offset of the body)` once the blank line ending the headers has been read.
    head: Option<(Command, usize)>,
    /// How far a body without `content-length` has been searched for its NUL.
    scanned: usize,
}

impl Partial {
    /// Back to "no frame started", keeping the span storage's inline buffer in place.
    fn reset(&mut self) {
        self.command = None;
        self.pos = 0;
        self.lines = 0;
        self.spans.clear();
        self.content_length = None;
        self.head = None;
        self.scanned = 0;
    }
}

/// A streaming STOMP frame decoder for one connection.
///
/// ```
/// use bytes::BytesMut;
/// use stomp_codec::{Command, Decoder, Limits};
///
/// let mut decoder = Decoder::new(Limits::default());
/// let mut buf = BytesMut::from(&b"\nSEND\ndestination:/topic/a\n\nhel"[..]);
/// assert_eq!(decoder.decode(&mut buf).unwrap(), None); // not whole yet
/// buf.extend_from_slice(b"lo\0\n");
/// let frame = decoder.decode(&mut buf).unwrap().unwrap();
/// assert_eq!(frame.command, Command::Send);
/// assert_eq!(frame.header("destination"), Some("/topic/a"));
/// assert_eq!(&frame.body[..], b"hello");
/// ```
#[derive(Debug, Clone)]
pub struct Decoder {
    version: Version,
    limits: Limits,
    partial: Partial,
}

impl Decoder {
    /// A decoder for STOMP 1.2 (the version to use until a session negotiates another).
    pub fn new(limits: Limits) -> Decoder {
        Decoder::with_version(Version::V1_2, limits)
    }

    /// A decoder for `version`, which decides how header escapes are read.
    pub fn with_version(version: Version, limits: Limits) -> Decoder {
        Decoder {
            version,
            limits,
            partial: Partial::default(),
        }
    }

    /// The version whose escaping rules apply.
    pub fn version(&self) -> Version {
        self.version
    }

    /// Switches escaping rules, e.g. once CONNECTED has settled the version.
    pub fn set_version(&mut self, version: Version) {
        self.version = version;
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Takes one whole frame off the front of `buf`.
    ///
    /// Returns `Ok(None)` when `buf` holds no whole frame yet; the bytes stay in `buf` and the
    /// next call goes on from where this one stopped. Heart-beat EOLs before a frame are
    /// consumed.
    ///
    /// # Errors
    /// A [`DecodeError`] when the bytes break the grammar or a limit. The stream cannot be
    /// resynchronised after one: send an ERROR frame and close.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        let result = self.try_decode(buf);
        if result.is_err() {
            self.partial = Partial::default();
        }
        result
    }

    /// Like [`Decoder::decode`], for when the stream has ended: leftover bytes other than
    /// heart-beats are a [`DecodeError::Truncated`] frame.
    ///
    /// # Errors
    /// As [`Decoder::decode`], plus [`DecodeError::Truncated`].
    pub fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None if buf.iter().all(|b| matches!(b, b'\r' | b'\n')) => {
                buf.clear();
                Ok(None)
            }
            None => {
                let buffered = buf.len();
                self.partial = Partial::default();
                Err(DecodeError::Truncated { buffered })
            }
        }
    }

    fn try_decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        if self.partial.command.is_none() {
            skip_heart_beats(buf);
            if buf.is_empty() {
                return Ok(None);
            }
        }
        let (command, body_start) = match self.partial.head {
            Some(head) => head,
            None => match self.read_head(buf)? {
                Some(head) => head,
                None => return Ok(None),
            },
        };
        let Some(body_end) = self.find_body_end(buf, body_start)? else {
            return Ok(None);
        };
        self.finish(buf, command, body_start, body_end).map(Some)
    }

    /// Reads the command and header lines. `Ok(Some((command, body offset)))` once the blank
    /// line has arrived.
    fn read_head(&mut self, buf: &[u8]) -> Result<Option<(Command, usize)>, DecodeError> {
        let limits = self.limits;
        let p = &mut self.partial;
        loop {
            let line_no = p.lines + 1;
            let line = read_line(&buf[p.pos..], line_no, limits.max_header_line_bytes)?;
            let (line, consumed) = match (line, p.command) {
                (Some(Line::Text(text, consumed)), _) => (text, consumed),
                // The spec's own DISCONNECT and RECEIPT examples end their headers with the
                // NUL and no blank line: read that as an empty body, not as a broken frame.
                (Some(Line::Nul), Some(command)) => {
                    p.head = Some((command, p.pos));
                    return Ok(p.head);
                }
                (Some(Line::Nul), None) => return Err(DecodeError::NulInHeaders { line: line_no }),
                (None, _) => {
                    if buf.len() > limits.max_frame_bytes {
                        return Err(DecodeError::FrameTooLarge {
                            limit: limits.max_frame_bytes,
                        });
                    }
                    return Ok(None);
                }
            };
            let start = p.pos;
            p.pos += consumed;
            p.lines = line_no;
            if p.pos > limits.max_frame_bytes {
                return Err(DecodeError::FrameTooLarge {
                    limit: limits.max_frame_bytes,
                });
            }
            match p.command {
                None => {
                    let command =
                        Command::from_bytes(line).ok_or_else(|| DecodeError::UnknownCommand {
                            command: excerpt(line, 32),
                        })?;
                    p.command = Some(command);
                }
                Some(command) if line.is_empty() => {
                    p.head = Some((command, p.pos));
                    return Ok(p.head);
                }
                Some(_) => {
                    if p.spans.len() == limits.max_headers {
                        return Err(DecodeError::TooManyHeaders {
                            limit: limits.max_headers,
                        });
                    }
                    let (name, value) = split_header(line, line_no)?;
                    if p.content_length.is_none() && name == b"content-length" {
                        p.content_length = Some(content_length(value, &limits)?);
                    }
                    let colon = start + name.len();
                    p.spans.push(Span {
                        start,
                        colon,
                        end: colon + 1 + value.len(),
                    });
                }
            }
        }
    }

    /// Where the body ends (the offset of its NUL), once it is all buffered.
    fn find_body_end(
        &mut self,
        buf: &[u8],
        body_start: usize,
    ) -> Result<Option<usize>, DecodeError> {
        let limits = &self.limits;
        let p = &mut self.partial;
        if let Some(length) = p.content_length {
            // 1.2 "Header content-length": read exactly that many octets, NULs included.
            let end = body_start + length;
            if end >= limits.max_frame_bytes {
                return Err(DecodeError::FrameTooLarge {
                    limit: limits.max_frame_bytes,
                });
            }
            return match buf.get(end) {
                None => Ok(None),
                Some(0) => Ok(Some(end)),
                Some(_) => Err(DecodeError::MissingNul {
                    content_length: length,
                }),
            };
        }
        let from = p.scanned.max(body_start);
        let found = memchr::memchr(0, &buf[from..]).map(|i| from + i);
        p.scanned = found.unwrap_or(buf.len());
        // The limits hold whether or not the NUL has arrived: a body may end in the very
        // read that takes it over the limit.
        let body_len = p.scanned - body_start;
        if body_len > limits.max_body_bytes {
            return Err(DecodeError::BodyTooLarge {
                size: body_len as u64,
                limit: limits.max_body_bytes,
            });
        }
        let frame_len = p.scanned + usize::from(found.is_some());
        if frame_len > limits.max_frame_bytes {
            return Err(DecodeError::FrameTooLarge {
                limit: limits.max_frame_bytes,
            });
        }
        Ok(found)
    }

    /// Cuts the whole frame off `buf` and builds it: header text validated as UTF-8 once and
    /// shared, escapes decoded only if a backslash is present.
    fn finish(
        &mut self,
        buf: &mut BytesMut,
        command: Command,
        body_start: usize,
        body_end: usize,
    ) -> Result<Frame, DecodeError> {
        let spans = std::mem::take(&mut self.partial.spans);
        self.partial.reset();
        let body_len = body_end - body_start;
        if body_len > 0 && !command.may_have_body() {
            return Err(DecodeError::BodyNotAllowed { command });
        }
        let mut head = buf.split_to(body_end + 1);
        let mut body = head.split_off(body_start);
        body.truncate(body_len);
        let text = ByteString::try_from(head.freeze()).map_err(|e| DecodeError::InvalidUtf8 {
            offset: e.valid_up_to(),
        })?;
        let headers = if self.version.escapes()
            && command.escapes_headers()
            && memchr::memchr(b'\\', text.as_bytes()).is_some()
        {
            unescape_headers(&text, &spans, self.version)?
        } else {
            Headers::from_shared(text, spans)
        };
        Ok(Frame {
            command,
            headers,
            body: body.freeze(),
        })
    }
}

/// Drops heart-beat EOLs (`LF` or `CR LF`) from the front of `buf`. A lone trailing CR stays:
/// its LF may be in the next read.
fn skip_heart_beats(buf: &mut BytesMut) {
    let mut n = 0;
    loop {
        match &buf[n..] {
            [b'\n', ..] => n += 1,
            [b'\r', b'\n', ..] => n += 2,
            _ => break,
        }
    }
    buf.advance(n);
}

/// How a line ended.
enum Line<'a> {
    /// Text without its EOL, and the bytes it takes with the EOL.
    Text(&'a [u8], usize),
    /// A NUL at the very start of the line.
    Nul,
}

/// A streaming nom parser for the text of a line: everything before the first LF or NUL,
/// `Incomplete` while neither has arrived. memchr finds the end (SIMD), where a byte-by-byte
/// `take_till` would spend most of a small frame's decoding time.
fn line_text(input: &[u8]) -> IResult<&[u8], &[u8]> {
    match memchr::memchr2(b'\n', 0, input) {
        Some(end) => Ok((&input[end..], &input[..end])),
        None => Err(nom::Err::Incomplete(nom::Needed::Unknown)),
    }
}

/// One line: `Ok(None)` until its LF has arrived. A NUL before the LF is an error unless it
/// starts the line (see [`Decoder::read_head`]).
fn read_line(
    input: &[u8],
    line_no: usize,
    max_len: usize,
) -> Result<Option<Line<'_>>, DecodeError> {
    let found = line_text(input);
    let too_long = || DecodeError::HeaderLineTooLong {
        line: line_no,
        limit: max_len,
    };
    match found {
        Ok(([0, ..], [])) => Ok(Some(Line::Nul)),
        Ok(([0, ..], _)) => Err(DecodeError::NulInHeaders { line: line_no }),
        Ok((_, line)) => {
            let text = line.strip_suffix(b"\r").unwrap_or(line);
            if text.len() > max_len {
                return Err(too_long());
            }
            Ok(Some(Line::Text(text, line.len() + 1)))
        }
        // Only `Incomplete` can come from `line_text`.
        Err(_) if input.len() > max_len + 1 => Err(too_long()),
        Err(_) => Ok(None),
    }
}

/// `name:value` split at the first colon; later colons belong to the value.
fn split_header(line: &[u8], line_no: usize) -> Result<(&[u8], &[u8]), DecodeError> {
    let split: IResult<&[u8], &[u8]> = nom::bytes::complete::take_until(":").parse(line);
    match split {
        Ok((_, [])) => Err(DecodeError::EmptyHeaderName { line: line_no }),
        Ok((rest, name)) => Ok((name, &rest[1..])),
        Err(_) => Err(DecodeError::MissingColon { line: line_no }),
    }
}

/// A `content-length` value: decimal digits (spaces around them tolerated), refused at once
/// if over the body limit so that no memory is set aside for it.
fn content_length(value: &[u8], limits: &Limits) -> Result<usize, DecodeError> {
    let invalid = || DecodeError::InvalidContentLength {
        value: excerpt(value, 32),
    };
    let digits = value.trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(invalid());
    }
    // Leading zeros are harmless; more than 20 significant digits overflow u64 anyway.
    let significant = digits
        .iter()
        .position(|&d| d != b'0')
        .map_or(&[][..], |i| &digits[i..]);
    let size = if significant.len() > 20 {
        u64::MAX
    } else {
        significant
            .iter()
            .try_fold(0u64, |n, &d| {
                n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
            })
            .unwrap_or(u64::MAX)
    };
    match usize::try_from(size) {
        Ok(size) if size <= limits.max_body_bytes => Ok(size),
        _ => Err(DecodeError::BodyTooLarge {
            size,
            limit: limits.max_body_bytes,
        }),
    }
}

/// Rebuilds the header text with escapes decoded (1.1 and 1.2 "Value Encoding").
fn unescape_headers(text: &str, spans: &[Span], version: Version) -> Result<Headers, DecodeError> {
    let mut out = String::with_capacity(text.len());
    let mut new_spans = SmallVec::with_capacity(spans.len());
    for (i, span) in spans.iter().enumerate() {
        // Header i is on line i + 2: line 1 is the command.
        let line = i + 2;
        let start = out.len();
        unescape_into(&mut out, &text[span.start..span.colon], version, line)?;
        let colon = out.len();
        out.push(':');
        unescape_into(&mut out, &text[span.colon + 1..span.end], version, line)?;
        new_spans.push(Span {
            start,
            colon,
            end: out.len(),
        });
    }
    Ok(Headers::from_owned(out, new_spans))
}

fn unescape_into(
    out: &mut String,
    raw: &str,
    version: Version,
    line: usize,
) -> Result<(), DecodeError> {
    let mut rest = raw;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let decoded = match after.chars().next() {
            Some('n') => '\n',
            Some('c') => ':',
            Some('\\') => '\\',
            Some('r') if version == Version::V1_2 => '\r',
            other => {
                return Err(DecodeError::InvalidEscape {
                    line,
                    sequence: other.map_or_else(|| "\\".to_owned(), |c| format!("\\{c}")),
                });
            }
        };
        out.push(decoded);
        // Every defined escape letter is one ASCII byte.
        rest = &after[1..];
    }
    out.push_str(rest);
    Ok(())
}
