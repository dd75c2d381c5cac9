//! The decoder's edge cases: escaping per version, line ends, bodies, streaming, limits and
//! the errors that end a connection.

// Test code: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used)]

use bytes::BytesMut;
use stomp_codec::{Command, DecodeError, Decoder, Frame, Limits, Version, encode_to_bytes};

fn decode_with(
    version: Version,
    limits: Limits,
    bytes: &[u8],
) -> Result<Option<Frame>, DecodeError> {
    Decoder::with_version(version, limits).decode(&mut BytesMut::from(bytes))
}

fn decode(version: Version, bytes: &[u8]) -> Result<Frame, DecodeError> {
    decode_with(version, Limits::default(), bytes).map(|f| f.expect("a whole frame"))
}

fn decode_all(bytes: &[u8]) -> Vec<Frame> {
    let mut buf = BytesMut::from(bytes);
    let mut decoder = Decoder::new(Limits::default());
    let mut frames = Vec::new();
    while let Some(f) = decoder.decode(&mut buf).unwrap() {
        frames.push(f);
    }
    assert!(buf.is_empty(), "left over: {buf:?}");
    frames
}

// ---- escaping per version (1.1 and 1.2 "Value Encoding") ----

const ESCAPED: &[u8] = b"MESSAGE\nk\\c1:a\\nb\\cc\\\\d\n\n\0";

#[test]
fn v1_0_has_no_escapes_so_backslashes_are_literal() {
    let f = decode(Version::V1_0, b"MESSAGE\nk:a\\nb\\tc\\\n\n\0").unwrap();
    assert_eq!(f.header("k"), Some("a\\nb\\tc\\"));
}

#[test]
fn v1_1_decodes_newline_colon_and_backslash() {
    let f = decode(Version::V1_1, ESCAPED).unwrap();
    assert_eq!(f.headers.iter().collect::<Vec<_>>(), [("k:1", "a\nb:c\\d")]);
}

#[test]
fn v1_1_treats_backslash_r_as_undefined() {
    let err = decode(Version::V1_1, b"MESSAGE\nk:a\\rb\n\n\0").unwrap_err();
    assert_eq!(
        err,
        DecodeError::InvalidEscape {
            line: 2,
            sequence: "\\r".into()
        }
    );
}

#[test]
fn v1_2_decodes_carriage_return_too() {
    let f = decode(Version::V1_2, b"MESSAGE\nk:a\\rb\\nc\n\n\0").unwrap();
    assert_eq!(f.header("k"), Some("a\rb\nc"));
    let f = decode(Version::V1_2, ESCAPED).unwrap();
    assert_eq!(f.header("k:1"), Some("a\nb:c\\d"));
}

#[test]
fn undefined_escapes_are_fatal() {
    for version in [Version::V1_1, Version::V1_2] {
        let err = decode(version, b"SEND\ndestination:/a\nk:a\\tb\n\n\0").unwrap_err();
        assert_eq!(
            err,
            DecodeError::InvalidEscape {
                line: 3,
                sequence: "\\t".into()
            }
        );
        let err = decode(version, b"SEND\nk:ends with\\\n\n\0").unwrap_err();
        assert_eq!(
            err,
            DecodeError::InvalidEscape {
                line: 2,
                sequence: "\\".into()
            }
        );
        let err = decode(version, b"SEND\nk\\x:v\n\n\0").unwrap_err();
        assert_eq!(
            err,
            DecodeError::InvalidEscape {
                line: 2,
                sequence: "\\x".into()
            }
        );
    }
}

#[test]
fn connect_and_connected_are_not_unescaped() {
    for command in ["CONNECT", "STOMP", "CONNECTED"] {
        let wire = format!("{command}\nlogin:a\\nb\\tc\npasscode:x:y\n\n\0");
        let f = decode(Version::V1_2, wire.as_bytes()).unwrap();
        assert_eq!(f.header("login"), Some("a\\nb\\tc"), "{command}");
        assert_eq!(f.header("passcode"), Some("x:y"), "{command}");
    }
}

#[test]
fn set_version_switches_escaping_between_frames() {
    let mut decoder = Decoder::with_version(Version::V1_0, Limits::default());
    let mut buf = BytesMut::from(&b"SEND\nk:a\\nb\n\n\0SEND\nk:a\\nb\n\n\0"[..]);
    assert_eq!(
        decoder.decode(&mut buf).unwrap().unwrap().header("k"),
        Some("a\\nb")
    );
    decoder.set_version(Version::V1_2);
    assert_eq!(
        decoder.decode(&mut buf).unwrap().unwrap().header("k"),
        Some("a\nb")
    );
}

// ---- line ends, headers, bodies ----

#[test]
fn crlf_and_lf_line_ends_both_work_even_mixed() {
    let f = decode(Version::V1_2, b"SEND\r\ndestination:/a\r\nx:1\n\r\nbody\0").unwrap();
    assert_eq!(f.command, Command::Send);
    assert_eq!(
        f.headers.iter().collect::<Vec<_>>(),
        [("destination", "/a"), ("x", "1")]
    );
    assert_eq!(&f.body[..], b"body");
}

#[test]
fn values_are_never_trimmed_and_may_hold_colons() {
    let f = decode(
        Version::V1_2,
        b"SEND\nk: padded \nurl:http://x:80/a\nempty:\n\n\0",
    )
    .unwrap();
    assert_eq!(f.header("k"), Some(" padded "));
    assert_eq!(f.header("url"), Some("http://x:80/a"));
    assert_eq!(f.header("empty"), Some(""));
}

#[test]
fn repeated_headers_are_kept_in_order_and_the_first_wins() {
    let f = decode(Version::V1_2, b"MESSAGE\nfoo:World\nbar:1\nfoo:Hello\n\n\0").unwrap();
    assert_eq!(f.header("foo"), Some("World"));
    assert_eq!(
        f.headers.get_all("foo").collect::<Vec<_>>(),
        ["World", "Hello"]
    );
    assert_eq!(f.headers.len(), 3);
}

#[test]
fn content_length_body_may_contain_nul_bytes() {
    let f = decode(Version::V1_2, b"SEND\ncontent-length:5\n\na\0b\0c\0").unwrap();
    assert_eq!(&f.body[..], b"a\0b\0c");
}

#[test]
fn first_content_length_wins() {
    let f = decode(
        Version::V1_2,
        b"SEND\ncontent-length:3\ncontent-length:1\n\na\0b\0",
    )
    .unwrap();
    assert_eq!(&f.body[..], b"a\0b");
}

#[test]
fn without_content_length_the_body_ends_at_the_first_nul() {
    let frames = decode_all(b"SEND\ndestination:/a\n\nab\0SEND\ndestination:/b\n\ncd\0");
    assert_eq!(&frames[0].body[..], b"ab");
    assert_eq!(&frames[1].body[..], b"cd");
}

#[test]
fn empty_bodies_with_and_without_content_length() {
    assert!(
        decode(Version::V1_2, b"SEND\ndestination:/a\n\n\0")
            .unwrap()
            .body
            .is_empty()
    );
    assert!(
        decode(Version::V1_2, b"SEND\ncontent-length:0\n\n\0")
            .unwrap()
            .body
            .is_empty()
    );
    // A frame with no headers at all.
    let f = decode(Version::V1_2, b"DISCONNECT\n\n\0").unwrap();
    assert!(f.headers.is_empty() && f.body.is_empty());
}

#[test]
fn bodies_need_not_be_utf8_but_headers_must_be() {
    let f = decode(Version::V1_2, b"SEND\ncontent-length:2\n\n\xff\xfe\0").unwrap();
    assert_eq!(&f.body[..], b"\xff\xfe");
    let err = decode(Version::V1_2, b"SEND\nk:ok\nbad:\xc3\x28\n\n\0").unwrap_err();
    assert_eq!(err, DecodeError::InvalidUtf8 { offset: 14 });
}

#[test]
fn korean_headers_and_bodies_round_trip() {
    let frame = Frame::new(Command::Send)
        .with_header("destination", "/topic/room.방")
        .with_header("x-이름", "민수:철수")
        .with_body("안녕하세요, 여러분");
    for version in Version::ALL {
        let mut wire = BytesMut::from(&encode_to_bytes(&frame, version)[..]);
        let got = Decoder::with_version(version, Limits::default())
            .decode(&mut wire)
            .unwrap()
            .unwrap();
        assert_eq!(got.header("x-이름"), Some("민수:철수"));
        assert_eq!(got.body, frame.body);
    }
}

#[test]
fn decoded_headers_and_body_are_slices_of_the_read_buffer_not_copies() {
    let mut buf = BytesMut::with_capacity(4096);
    buf.extend_from_slice(b"SEND\ndestination:/a\ncontent-length:1000\n\n");
    buf.extend_from_slice(&[b'x'; 1000]);
    buf.extend_from_slice(b"\0");
    let region = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
    let f = Decoder::new(Limits::default())
        .decode(&mut buf)
        .unwrap()
        .unwrap();
    assert!(region.contains(&(f.body.as_ptr() as usize)));
    assert!(region.contains(&(f.header("destination").unwrap().as_ptr() as usize)));
}

// ---- streaming ----

#[test]
fn heart_beats_between_frames_are_skipped() {
    let frames =
        decode_all(b"\n\n\r\nSEND\ndestination:/a\n\nx\0\n\r\n\nSEND\ndestination:/b\n\ny\0\n");
    assert_eq!(frames.len(), 2);
    let mut buf = BytesMut::from(&b"\n\r\n\n"[..]);
    assert_eq!(
        Decoder::new(Limits::default()).decode(&mut buf).unwrap(),
        None
    );
    assert!(buf.is_empty());
}

#[test]
fn a_lone_cr_waits_for_its_lf() {
    let mut decoder = Decoder::new(Limits::default());
    let mut buf = BytesMut::from(&b"\r"[..]);
    assert_eq!(decoder.decode(&mut buf).unwrap(), None);
    buf.extend_from_slice(b"\nSEND\n\n\0");
    assert_eq!(
        decoder.decode(&mut buf).unwrap().unwrap().command,
        Command::Send
    );
}

fn sample_stream() -> Vec<u8> {
    let mut wire = Vec::new();
    wire.extend_from_slice(b"CONNECT\r\naccept-version:1.2\r\nhost:/\r\n\r\n\0\n");
    wire.extend_from_slice(b"SEND\ndestination:/topic/a\ncontent-length:3\n\n\0\0\0\0\n\n");
    wire.extend_from_slice(b"SEND\ndestination:/topic/b\nk:a\\nb\n\nplain body\0");
    wire.extend_from_slice(b"\nDISCONNECT\nreceipt:1\n\n\0");
    wire
}

#[test]
fn frames_split_at_every_byte_position_decode_the_same() {
    let wire = sample_stream();
    let whole = decode_all(&wire);
    assert_eq!(whole.len(), 4);
    for cut in 0..=wire.len() {
        let mut decoder = Decoder::new(Limits::default());
        let mut buf = BytesMut::from(&wire[..cut]);
        let mut got = Vec::new();
        while let Some(f) = decoder.decode(&mut buf).unwrap() {
            got.push(f);
        }
        buf.extend_from_slice(&wire[cut..]);
        while let Some(f) = decoder.decode(&mut buf).unwrap() {
            got.push(f);
        }
        assert_eq!(got, whole, "split at {cut}");
        assert!(buf.is_empty());
    }
}

#[test]
fn frames_fed_one_byte_at_a_time_decode_the_same() {
    let wire = sample_stream();
    let mut decoder = Decoder::new(Limits::default());
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for &b in &wire {
        buf.extend_from_slice(&[b]);
        while let Some(f) = decoder.decode(&mut buf).unwrap() {
            got.push(f);
        }
    }
    assert_eq!(got, decode_all(&wire));
}

#[test]
fn many_frames_in_one_buffer() {
    let one = encode_to_bytes(
        &Frame::new(Command::Send)
            .with_header("destination", "/topic/room.lobby")
            .with_body("hi"),
        Version::V1_2,
    );
    let mut wire = Vec::new();
    for _ in 0..10_000 {
        wire.extend_from_slice(&one);
    }
    let frames = decode_all(&wire);
    assert_eq!(frames.len(), 10_000);
    assert!(frames.iter().all(|f| &f.body[..] == b"hi"));
}

#[test]
fn a_stream_that_ends_mid_frame_is_truncated() {
    let mut decoder = Decoder::new(Limits::default());
    let mut buf = BytesMut::from(&b"SEND\ndestination:/a\n\nhal"[..]);
    assert_eq!(
        decoder.decode_eof(&mut buf).unwrap_err(),
        DecodeError::Truncated { buffered: 24 }
    );
    let mut buf = BytesMut::from(&b"SEND\n\n\0\n\r\n"[..]);
    assert!(decoder.decode_eof(&mut buf).unwrap().is_some());
    assert_eq!(decoder.decode_eof(&mut buf).unwrap(), None);
}

// ---- malformed frames ----

#[test]
fn malformed_frames_say_what_and_where() {
    let cases: &[(&[u8], DecodeError, &str)] = &[
        (
            b"SNED\n\n\0",
            DecodeError::UnknownCommand {
                command: "SNED".into(),
            },
            "unknown command \"SNED\"",
        ),
        (
            b"send\n\n\0",
            DecodeError::UnknownCommand {
                command: "send".into(),
            },
            "unknown command \"send\"",
        ),
        (
            b"SEND\ndestination\n\n\0",
            DecodeError::MissingColon { line: 2 },
            "header line 2 has no colon",
        ),
        (
            b"SEND\na:1\n:x\n\n\0",
            DecodeError::EmptyHeaderName { line: 3 },
            "header line 3 has an empty name",
        ),
        (
            b"SEND\ndestination:/a\0SEND\n\n\0",
            DecodeError::NulInHeaders { line: 2 },
            "line 2 contains a NUL byte before the end of the headers",
        ),
        (
            b"SEND\ncontent-length:abc\n\n\0",
            DecodeError::InvalidContentLength {
                value: "abc".into(),
            },
            "content-length \"abc\" is not a number",
        ),
        (
            b"SEND\ncontent-length:-1\n\n\0",
            DecodeError::InvalidContentLength { value: "-1".into() },
            "content-length \"-1\" is not a number",
        ),
        (
            b"SEND\ncontent-length:2\n\nabc\0",
            DecodeError::MissingNul { content_length: 2 },
            "the 2-byte body is not followed by a NUL byte",
        ),
        (
            b"SUBSCRIBE\nid:1\ndestination:/a\n\nbody\0",
            DecodeError::BodyNotAllowed {
                command: Command::Subscribe,
            },
            "SUBSCRIBE frames must not have a body",
        ),
    ];
    for (wire, expected, message) in cases {
        let err = decode_with(Version::V1_2, Limits::default(), wire).unwrap_err();
        assert_eq!(&err, expected, "{}", String::from_utf8_lossy(wire));
        assert_eq!(err.to_string(), *message);
    }
}

#[test]
fn unknown_command_text_is_cut_short_in_the_error() {
    let long = format!("{}\n\n\0", "X".repeat(500));
    let DecodeError::UnknownCommand { command } =
        decode(Version::V1_2, long.as_bytes()).unwrap_err()
    else {
        panic!("expected an unknown command");
    };
    assert_eq!(command.len(), 32);
}

// ---- limits ----

const SMALL: Limits = Limits {
    max_frame_bytes: 1024,
    max_headers: 4,
    max_header_line_bytes: 64,
    max_body_bytes: 512,
};

#[test]
fn too_many_headers() {
    let err =
        decode_with(Version::V1_2, SMALL, b"SEND\na:1\nb:2\nc:3\nd:4\ne:5\n\n\0").unwrap_err();
    assert_eq!(err, DecodeError::TooManyHeaders { limit: 4 });
    assert!(
        decode_with(Version::V1_2, SMALL, b"SEND\na:1\nb:2\nc:3\nd:4\n\n\0")
            .unwrap()
            .is_some()
    );
}

#[test]
fn header_line_too_long_whether_or_not_its_end_has_arrived() {
    let long = format!("SEND\nk:{}\n\n\0", "v".repeat(63));
    let err = decode_with(Version::V1_2, SMALL, long.as_bytes()).unwrap_err();
    assert_eq!(err, DecodeError::HeaderLineTooLong { line: 2, limit: 64 });
    // No LF yet, but already too long: refused without waiting for more.
    let open = format!("SEND\nk:{}", "v".repeat(100));
    let err = decode_with(Version::V1_2, SMALL, open.as_bytes()).unwrap_err();
    assert_eq!(err, DecodeError::HeaderLineTooLong { line: 2, limit: 64 });
    // Exactly at the limit is fine.
    let ok = format!("SEND\nk:{}\n\n\0", "v".repeat(62));
    assert!(
        decode_with(Version::V1_2, SMALL, ok.as_bytes())
            .unwrap()
            .is_some()
    );
}

#[test]
fn a_terabyte_content_length_is_refused_at_once() {
    let mut decoder = Decoder::new(Limits::default());
    let mut buf = BytesMut::from(&b"SEND\ndestination:/a\ncontent-length:1099511627776\n\n"[..]);
    let err = decoder.decode(&mut buf).unwrap_err();
    assert_eq!(
        err,
        DecodeError::BodyTooLarge {
            size: 1 << 40,
            limit: 4 * 1024 * 1024
        }
    );
    assert_eq!(
        err.to_string(),
        "body of 1099511627776 bytes exceeds the limit of 4194304 bytes"
    );
    // The header line alone is enough, before the blank line.
    let mut buf = BytesMut::from(&b"SEND\ncontent-length:99999999999999999999999999\n"[..]);
    assert!(matches!(
        decoder.decode(&mut buf),
        Err(DecodeError::BodyTooLarge { size: u64::MAX, .. })
    ));
}

#[test]
fn body_too_large_without_content_length_is_refused_as_it_arrives() {
    let mut decoder = Decoder::with_version(Version::V1_2, SMALL);
    let mut buf = BytesMut::from(&b"SEND\n\n"[..]);
    assert_eq!(decoder.decode(&mut buf).unwrap(), None);
    buf.extend_from_slice(&[b'x'; 512]);
    assert_eq!(decoder.decode(&mut buf).unwrap(), None);
    buf.extend_from_slice(b"x");
    assert_eq!(
        decoder.decode(&mut buf).unwrap_err(),
        DecodeError::BodyTooLarge {
            size: 513,
            limit: 512
        }
    );
}

#[test]
fn body_limit_holds_when_the_nul_arrives_in_the_read_that_crosses_it() {
    // Found by the arbitrary-bytes property: the limit was checked only while waiting.
    let mut decoder = Decoder::with_version(Version::V1_0, SMALL);
    let mut buf = BytesMut::from(&b"SEND\n\n"[..]);
    buf.extend_from_slice(&[1; 96]);
    assert_eq!(decoder.decode(&mut buf).unwrap(), None);
    buf.extend_from_slice(&[1; 417]);
    buf.extend_from_slice(b"\0");
    assert_eq!(
        decoder.decode(&mut buf).unwrap_err(),
        DecodeError::BodyTooLarge {
            size: 513,
            limit: 512
        }
    );
    // In one read too.
    let mut wire = b"SEND\n\n".to_vec();
    wire.extend_from_slice(&[b'x'; 513]);
    wire.push(0);
    let err = decode_with(Version::V1_2, SMALL, &wire).unwrap_err();
    assert_eq!(
        err,
        DecodeError::BodyTooLarge {
            size: 513,
            limit: 512
        }
    );
}

#[test]
fn frame_too_large_counts_headers_and_body() {
    let limits = Limits {
        max_frame_bytes: 100,
        max_body_bytes: 90,
        ..SMALL
    };
    // 24-byte head + 80-byte body + NUL = 105 > 100, though the body is under its own limit.
    let mut wire = b"SEND\ncontent-length:80\n\n".to_vec();
    assert_eq!(wire.len(), 24);
    let err = decode_with(Version::V1_2, limits, &wire).unwrap_err();
    assert_eq!(err, DecodeError::FrameTooLarge { limit: 100 });
    // Without content-length: a 49-byte head and 60 body bytes so far, no NUL yet.
    wire.truncate(0);
    wire.extend_from_slice(format!("SEND\nk:{}\n\n", "v".repeat(40)).as_bytes());
    wire.extend_from_slice(&[b'x'; 60]);
    let err = decode_with(Version::V1_2, limits, &wire).unwrap_err();
    assert_eq!(err, DecodeError::FrameTooLarge { limit: 100 });
}

#[test]
fn a_frame_exactly_at_the_limits_is_accepted() {
    let limits = Limits {
        max_frame_bytes: 30,
        max_body_bytes: 5,
        ..SMALL
    };
    let wire = b"SEND\ncontent-length:5\n\nabcde\0"; // 29 bytes
    assert!(decode_with(Version::V1_2, limits, wire).unwrap().is_some());
    let limits = Limits {
        max_frame_bytes: 29,
        ..limits
    };
    assert!(decode_with(Version::V1_2, limits, wire).unwrap().is_some());
    let limits = Limits {
        max_frame_bytes: 28,
        ..limits
    };
    assert!(decode_with(Version::V1_2, limits, wire).is_err());
}

#[test]
fn the_decoder_is_reusable_after_a_frame_and_resets_after_an_error() {
    let mut decoder = Decoder::with_version(Version::V1_2, SMALL);
    let mut buf = BytesMut::from(&b"SEND\na:1\nb:2\nc:3\nd:4\ne:5\n\n\0"[..]);
    assert!(decoder.decode(&mut buf).is_err());
    let mut buf = BytesMut::from(&b"SEND\na:1\n\n\0"[..]);
    assert_eq!(decoder.decode(&mut buf).unwrap().unwrap().headers.len(), 1);
}

#[cfg(feature = "codec")]
mod tokio_codec {
    use super::*;
    use stomp_codec::{CodecError, StompCodec};
    use tokio_util::codec::{Decoder as _, Encoder as _};

    #[test]
    fn the_codec_frames_a_byte_stream() {
        let mut codec = StompCodec::new(Version::V1_2, Limits::default());
        let frame = Frame::new(Command::Send)
            .with_header("destination", "/a")
            .with_body("x");
        let mut buf = BytesMut::new();
        codec.encode(&frame, &mut buf).unwrap();
        codec
            .encode(bytes::Bytes::from_static(b"\n"), &mut buf)
            .unwrap();
        let got = codec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(got.body, frame.body);
        assert_eq!(codec.decode_eof(&mut buf).unwrap(), None);
        let mut buf = BytesMut::from(&b"SEND\n"[..]);
        assert!(matches!(
            codec.decode_eof(&mut buf),
            Err(CodecError::Decode(DecodeError::Truncated { .. }))
        ));
    }
}
