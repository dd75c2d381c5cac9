//! Parse and encode throughput, side by side with `stomp-parser` (crates.io) on the same
//! inputs. `cargo bench -p stomp-codec --bench codec`; results in docs/PERFORMANCE.md.
#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use stomp_codec::{
    Command, Decoder, Frame, Limits, SharedMessage, Version, encode, encode_to_bytes,
};
use stomp_parser::client::ClientFrame;
use stomp_parser::server::ServerFrame;

/// A chat SEND as stomp.js writes it: 150 bytes on the wire.
fn chat_send() -> Frame {
    let base = Frame::new(Command::Send)
        .with_header("destination", "/topic/room.lobby")
        .with_header("content-type", "text/plain;charset=UTF-8");
    let overhead = encode_to_bytes(&base, Version::V1_2).len();
    let body = "x".repeat(150 - overhead - 1); // the content-length digits grow by one
    let frame = base.with_body(body);
    assert_eq!(encode_to_bytes(&frame, Version::V1_2).len(), 150);
    frame
}

/// A MESSAGE with 10 headers, as the broker delivers a chat line.
fn message_10_headers() -> Frame {
    Frame::new(Command::Message)
        .with_header("subscription", "sub-0")
        .with_header("message-id", "1234567")
        .with_header("destination", "/topic/room.lobby")
        .with_header("content-type", "text/plain;charset=UTF-8")
        .with_header("x-sender", "alice")
        .with_header("x-timestamp", "1795000000000")
        .with_header("x-seq", "42")
        .with_header("ack", "91")
        .with_header("priority", "4")
        .with_body("hello everyone, how is it going today?")
}

fn large_send() -> Frame {
    Frame::new(Command::Send)
        .with_header("destination", "/queue/uploads")
        .with_header("content-type", "application/octet-stream")
        .with_body(vec![0xA5u8; 64 * 1024])
}

fn decode_all(wire: &[u8]) -> usize {
    let mut buf = BytesMut::from(wire);
    let mut decoder = Decoder::new(Limits::default());
    let mut n = 0;
    while let Some(frame) = decoder.decode(&mut buf).unwrap() {
        black_box(frame.header("destination"));
        black_box(&frame.body);
        n += 1;
    }
    n
}

fn bench_parse(c: &mut Criterion) {
    let cases = [
        (
            "chat_send_150B",
            encode_to_bytes(&chat_send(), Version::V1_2),
            true,
        ),
        (
            "message_10_headers",
            encode_to_bytes(&message_10_headers(), Version::V1_2),
            false,
        ),
        (
            "send_64KiB_body",
            encode_to_bytes(&large_send(), Version::V1_2),
            true,
        ),
    ];
    for (name, wire, is_client) in cases {
        let mut group = c.benchmark_group(format!("parse/{name}"));
        group.throughput(Throughput::Bytes(wire.len() as u64));
        group.bench_function("stoa", |b| {
            b.iter_batched(
                || BytesMut::from(&wire[..]),
                |mut buf| {
                    let frame = Decoder::new(Limits::default())
                        .decode(&mut buf)
                        .unwrap()
                        .unwrap();
                    black_box(frame.header("destination"));
                    frame
                },
                BatchSize::SmallInput,
            )
        });
        group.bench_function("stomp-parser", |b| {
            b.iter_batched(
                || wire.to_vec(),
                |bytes| {
                    if is_client {
                        match ClientFrame::try_from(bytes).unwrap() {
                            ClientFrame::Send(f) => {
                                black_box(f.destination().value());
                                black_box(f.body());
                            }
                            _ => unreachable!("a SEND was given"),
                        }
                    } else {
                        match ServerFrame::try_from(bytes).unwrap() {
                            ServerFrame::Message(f) => {
                                black_box(f.destination().value());
                                black_box(f.body());
                            }
                            _ => unreachable!("a MESSAGE was given"),
                        }
                    }
                },
                BatchSize::SmallInput,
            )
        });
        group.finish();
    }

    // 1,000 chat frames in one buffer: the steady state of a busy connection.
    let one = encode_to_bytes(&chat_send(), Version::V1_2);
    let mut many = BytesMut::new();
    for _ in 0..1000 {
        many.extend_from_slice(&one);
    }
    let mut group = c.benchmark_group("parse/1000_chat_frames");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("stoa", |b| b.iter(|| assert_eq!(decode_all(&many), 1000)));
    let separate: Vec<Vec<u8>> = (0..1000).map(|_| one.to_vec()).collect();
    group.bench_function("stomp-parser", |b| {
        b.iter_batched(
            || separate.clone(),
            |frames| {
                for bytes in frames {
                    if let ClientFrame::Send(f) = ClientFrame::try_from(bytes).unwrap() {
                        black_box(f.destination().value());
                        black_box(f.body());
                    }
                }
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

fn bench_encode(c: &mut Criterion) {
    for (name, frame) in [
        ("chat_send_150B", chat_send()),
        ("message_10_headers", message_10_headers()),
        ("send_64KiB_body", large_send()),
    ] {
        let wire = encode_to_bytes(&frame, Version::V1_2);
        let mut group = c.benchmark_group(format!("encode/{name}"));
        group.throughput(Throughput::Bytes(wire.len() as u64));
        let mut dst = BytesMut::with_capacity(wire.len() * 2);
        group.bench_function("stoa", |b| {
            b.iter(|| {
                dst.clear();
                encode(black_box(&frame), Version::V1_2, &mut dst);
                black_box(dst.len())
            })
        });
        // stomp-parser serialises a parsed frame into a Vec.
        let is_client = frame.command == Command::Send;
        group.bench_function("stomp-parser", |b| {
            b.iter_batched(
                || wire.to_vec(),
                |bytes| {
                    let out: Vec<u8> = if is_client {
                        ClientFrame::try_from(bytes).unwrap().into()
                    } else {
                        ServerFrame::try_from(bytes).unwrap().into()
                    };
                    black_box(out.len())
                },
                BatchSize::SmallInput,
            )
        });
        group.finish();
    }

    // Fan-out: one publish encoded once, then 1,000 subscribers' MESSAGEs.
    let send = chat_send();
    let mut group = c.benchmark_group("encode/fanout_1000_subscribers");
    group.throughput(Throughput::Elements(1000));
    let ids: Vec<String> = (0..1000).map(|i| format!("sub-{i}")).collect();
    let mut dst = BytesMut::with_capacity(256);
    group.bench_function("shared_message", |b| {
        b.iter(|| {
            let shared = SharedMessage::new(
                Version::V1_2,
                send.headers
                    .iter()
                    .chain([("message-id", "1234567"), ("x-sender", "alice")]),
                &send.body,
            );
            for id in &ids {
                dst.clear();
                shared.encode_for(&[("subscription", id)], &mut dst);
                black_box(dst.len());
            }
        })
    });
    group.bench_function("whole_frame_each", |b| {
        b.iter(|| {
            for id in &ids {
                let mut frame = Frame::new(Command::Message).with_header("subscription", id);
                for (n, v) in &send.headers {
                    frame.headers.push(n, v);
                }
                frame.headers.push("message-id", "1234567");
                frame.headers.push("x-sender", "alice");
                frame.body = send.body.clone();
                dst.clear();
                encode(&frame, Version::V1_2, &mut dst);
                black_box(dst.len());
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench_parse, bench_encode);
criterion_main!(benches);
