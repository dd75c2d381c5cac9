//! Decoding chat frames allocates nothing per frame, and neither does encoding a MESSAGE for
//! one more subscriber. Counted with dhat's heap profiler in testing mode; one test per
//! binary, since dhat allows one profiler per process. Run without libtest (`harness =
//! false`): dhat counts the whole process, and the harness's own thread allocated now and
//! then while this one was measured (5 blocks in one CI run).

// Test code: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;

use bytes::BytesMut;
use stomp_codec::{
    Command, Decoder, Frame, Limits, SharedMessage, Version, encode, encode_to_bytes,
};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn main() {
    decoding_and_fanning_out_chat_frames_allocate_nothing_per_frame();
    println!("test decoding_and_fanning_out_chat_frames_allocate_nothing_per_frame ... ok");
}

fn decoding_and_fanning_out_chat_frames_allocate_nothing_per_frame() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let frame = Frame::new(Command::Send)
        .with_header("destination", "/topic/room.lobby")
        .with_header("content-type", "text/plain;charset=UTF-8")
        .with_header("receipt", "r-1")
        .with_body("hello everyone, how is it going?");
    let one = encode_to_bytes(&frame, Version::V1_2);
    let mut wire = BytesMut::with_capacity(one.len() * 1000);
    for _ in 0..1000 {
        wire.extend_from_slice(&one);
    }
    let mut decoder = Decoder::new(Limits::default());

    let before = dhat::HeapStats::get().total_blocks;
    let mut decoded = 0;
    while let Some(f) = decoder.decode(&mut wire).unwrap() {
        black_box(f.header("destination"));
        decoded += 1;
    }
    let during = dhat::HeapStats::get().total_blocks - before;
    assert_eq!(decoded, 1000);
    // One block when the read buffer first turns shared; none per frame.
    assert!(during <= 1, "{during} allocations for 1000 frames");

    let shared = SharedMessage::new(Version::V1_2, frame.headers.iter(), &frame.body);
    let mut out = BytesMut::with_capacity(64 * 1024);
    let ids: Vec<String> = (0..100).map(|i| format!("sub-{i}")).collect();
    let before = dhat::HeapStats::get().total_blocks;
    for id in &ids {
        shared.encode_for(&[("subscription", id), ("message-id", "42")], &mut out);
        encode(&frame, Version::V1_2, &mut out);
    }
    let during = dhat::HeapStats::get().total_blocks - before;
    assert_eq!(
        during, 0,
        "{during} allocations encoding 200 frames into a reserved buffer"
    );
}
