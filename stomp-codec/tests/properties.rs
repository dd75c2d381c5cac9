//! Property tests: whatever the frame, version and split, decoding undoes encoding; whatever
//! the bytes, the decoder neither panics nor buffers past its limits.

// Test code: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used)]

use bytes::BytesMut;
use proptest::prelude::*;
use stomp_codec::{Command, Decoder, Frame, Limits, Version, encode_to_bytes, fuzz_decode};

fn arb_version() -> impl Strategy<Value = Version> {
    prop::sample::select(Version::ALL.to_vec())
}

fn arb_command() -> impl Strategy<Value = Command> {
    prop::sample::select(Command::ALL.to_vec())
}

/// Header text with the characters that matter to escaping, plus any non-NUL character.
fn arb_text(min: usize) -> impl Strategy<Value = String> {
    let ch = prop_oneof![
        4 => prop::char::range('a', 'z'),
        2 => prop::sample::select(vec![':', '\\', '\n', '\r', ' ', '-', '/', '.']),
        1 => any::<char>().prop_filter("no NUL", |c| *c != '\0'),
    ];
    prop::collection::vec(ch, min..12).prop_map(|chars| chars.into_iter().collect())
}

/// Whether `text` survives `version`'s encoding of `command` unchanged.
fn representable(text: &str, is_name: bool, version: Version, command: Command) -> bool {
    let raw = version == Version::V1_0 || !command.escapes_headers();
    if raw {
        let breaks_line = text.contains(['\n', '\r']);
        !(breaks_line || is_name && text.contains(':'))
    } else if version == Version::V1_1 {
        !text.contains('\r')
    } else {
        true
    }
}

fn arb_frame() -> impl Strategy<Value = (Version, Frame)> {
    (arb_version(), arb_command()).prop_flat_map(|(version, command)| {
        let header =
            (arb_text(1), arb_text(0)).prop_filter("representable header", move |(n, v)| {
                n != "content-length"
                    && representable(n, true, version, command)
                    && representable(v, false, version, command)
            });
        let body = if command.may_have_body() {
            prop::collection::vec(any::<u8>(), 0..300).boxed()
        } else {
            Just(Vec::new()).boxed()
        };
        (prop::collection::vec(header, 0..12), body).prop_map(move |(headers, body)| {
            let mut frame = Frame::new(command).with_body(body);
            for (n, v) in &headers {
                frame.headers.push(n, v);
            }
            (version, frame)
        })
    })
}

fn without_content_length(mut frame: Frame) -> Frame {
    frame.headers.remove("content-length");
    frame
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn encode_then_decode_gives_the_same_frame((version, frame) in arb_frame()) {
        let mut buf = BytesMut::from(&encode_to_bytes(&frame, version)[..]);
        let got = Decoder::with_version(version, Limits::default()).decode(&mut buf).unwrap();
        prop_assert_eq!(got.map(without_content_length), Some(frame));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn any_split_point_decodes_the_same_frame((version, frame) in arb_frame(), cut in 0usize..2048) {
        let wire = encode_to_bytes(&frame, version);
        let cut = cut % (wire.len() + 1);
        let mut decoder = Decoder::with_version(version, Limits::default());
        let mut buf = BytesMut::from(&wire[..cut]);
        let mut got = decoder.decode(&mut buf).unwrap();
        if got.is_none() {
            buf.extend_from_slice(&wire[cut..]);
            got = decoder.decode(&mut buf).unwrap();
        }
        prop_assert_eq!(got.map(without_content_length), Some(frame));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn a_stream_of_frames_and_heart_beats_decodes_in_order(
        frames in prop::collection::vec(arb_frame(), 1..8),
        beats in prop::collection::vec(0usize..3, 8),
    ) {
        // One connection has one version: re-encode every frame with the first one's.
        let version = frames[0].0;
        let frames: Vec<Frame> = frames
            .into_iter()
            .filter(|(v, _)| *v == version)
            .map(|(_, f)| f)
            .collect();
        let mut wire = Vec::new();
        for (frame, &beat) in frames.iter().zip(beats.iter().cycle()) {
            wire.extend(std::iter::repeat_n(b'\n', beat));
            wire.extend_from_slice(&encode_to_bytes(frame, version));
        }
        let mut decoder = Decoder::with_version(version, Limits::default());
        let mut buf = BytesMut::from(&wire[..]);
        let mut got = Vec::new();
        while let Some(f) = decoder.decode(&mut buf).unwrap() {
            got.push(without_content_length(f));
        }
        prop_assert_eq!(got, frames);
    }

    #[test]
    fn arbitrary_bytes_never_panic_nor_buffer_past_the_limits(
        chunks in prop::collection::vec(
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..200),
                prop::sample::select(vec![
                    b"SEND\n".to_vec(), b"MESSAGE\r\n".to_vec(), b"a:b\n".to_vec(), b"\n".to_vec(),
                    b"content-length:10\n".to_vec(), b"\0".to_vec(), b"\\".to_vec(), b"k:\\n\n".to_vec(),
                ]),
            ],
            0..40,
        ),
        version in arb_version(),
    ) {
        let limits = Limits { max_frame_bytes: 512, max_headers: 6, max_header_line_bytes: 64, max_body_bytes: 256 };
        let mut decoder = Decoder::with_version(version, limits);
        let mut buf = BytesMut::new();
        for chunk in &chunks {
            buf.extend_from_slice(chunk);
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => prop_assert!(frame.headers.len() <= 6 && frame.body.len() <= 256),
                Ok(None) => prop_assert!(buf.len() <= limits.max_frame_bytes, "{} bytes buffered", buf.len()),
                Err(_) => break,
            }
        }
        fuzz_decode(&chunks.concat());
    }
}
