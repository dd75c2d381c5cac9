//! The body of the coverage-guided fuzz target, kept here so that ordinary test runs
//! exercise it over the seed corpus too.
//!
//! In: arbitrary bytes. Out: nothing; it panics if the decoder breaks a promise.

use bytes::BytesMut;

use crate::{Decoder, Frame, Limits, Version, encode_to_bytes};

/// Small limits so that the fuzzer reaches every limit check.
const FUZZ_LIMITS: Limits = Limits {
    max_frame_bytes: 4096,
    max_headers: 8,
    max_header_line_bytes: 256,
    max_body_bytes: 2048,
};

/// Feeds `data` to a decoder of each version in uneven chunks and checks the decoder's
/// promises: no panic, buffered bytes bounded by the limits, and every decoded frame encodes
/// and decodes back to itself.
///
/// # Panics
/// When one of those promises is broken: that is what the fuzzer looks for.
pub fn fuzz_decode(data: &[u8]) {
    // The first byte picks the chunk size, so the fuzzer explores split points too.
    let chunk = data.first().map_or(1, |&b| usize::from(b % 61) + 1);
    for version in Version::ALL {
        let mut decoder = Decoder::with_version(version, FUZZ_LIMITS);
        let mut buf = BytesMut::new();
        'feed: for piece in data.chunks(chunk) {
            buf.extend_from_slice(piece);
            loop {
                match decoder.decode(&mut buf) {
                    Ok(Some(frame)) => check_round_trip(&frame, version),
                    Ok(None) => break,
                    Err(_) => break 'feed,
                }
            }
            // Never more buffered than one frame at the limit plus the bytes just added.
            assert!(
                buf.len() <= FUZZ_LIMITS.max_frame_bytes + chunk + 1,
                "buffer grew to {} bytes past the limits",
                buf.len()
            );
        }
    }
}

/// Encoding a decoded frame and decoding it again gives the same frame, up to the
/// `content-length` header that the encoder always computes.
fn check_round_trip(frame: &Frame, version: Version) {
    if !representable(frame, version) {
        return;
    }
    let mut wire = BytesMut::from(&encode_to_bytes(frame, version)[..]);
    let limits = Limits {
        max_frame_bytes: usize::MAX / 4,
        max_headers: usize::MAX,
        max_header_line_bytes: usize::MAX / 4,
        max_body_bytes: usize::MAX / 4,
    };
    let again = Decoder::with_version(version, limits).decode(&mut wire);
    let again = match again {
        Ok(Some(again)) => again,
        other => panic!("re-encoded {frame:?} did not decode: {other:?}"),
    };
    assert_eq!(
        without_content_length(&again),
        without_content_length(frame)
    );
    assert!(
        wire.is_empty(),
        "re-encoded frame left {} bytes",
        wire.len()
    );
}

/// Frames whose text survives encoding unchanged: raw (unescaped) frames cannot hold a CR at
/// the end of a value, where it reads as part of a CRLF, nor in 1.1, which has no `\r` escape.
fn representable(frame: &Frame, version: Version) -> bool {
    let raw = version == Version::V1_0 || !frame.command.escapes_headers();
    let cr_unsafe = raw || version == Version::V1_1;
    !(cr_unsafe
        && frame
            .headers
            .iter()
            .any(|(n, v)| n.contains('\r') || v.contains('\r')))
}

fn without_content_length(frame: &Frame) -> Frame {
    let mut frame = frame.clone();
    frame.headers.remove("content-length");
    frame
}
