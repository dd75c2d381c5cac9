//! Network-level fuzzing of the real broker: valid frames, mutated at random, split at random
//! across TCP writes and WebSocket messages (text, binary, and text that is not UTF-8), from
//! several clients at once, while a bystander pair exchanges numbered room messages.
//!
//! What must hold (DESIGN.md "Errors and limits"): every connection the broker closes gets
//! an ERROR first (or the RECEIPT of its DISCONNECT); the broker never sends a malformed
//! frame, never panics and stays up; the bystanders lose and reorder nothing.
//!
//! `STOA_FUZZ_SECONDS` sets how long it runs (60 by default: the test command runs it for a
//! minute), `STOA_FUZZ_SEED` the seed (printed, so that a failing run's scripts can be made
//! again; timing cannot).

// Test code: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use integration_tests::{Broker, Conn, Event, Transport, WsMessage, frame};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use stomp_codec::Version;
use tokio_tungstenite::tungstenite::protocol::frame::Frame as WsFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

/// Small limits, so that fuzzed frames reach them.
const ARGS: &[&str] = &[
    "--max-frame-bytes",
    "65536",
    "--max-body-bytes",
    "65536",
    "--max-headers",
    "32",
    "--max-header-line-bytes",
    "1024",
    "--max-subscriptions",
    "16",
    "--outbox-bytes",
    "262144",
    "--max-transactions",
    "4",
    "--max-transaction-frames",
    "64",
    "--connect-timeout-ms",
    "5000",
];

/// Fuzzing clients at once.
const WORKERS: usize = 12;

/// How long a client waits for the broker to say more before it gives up and closes.
const QUIET: Duration = Duration::from_secs(1);

fn encoded(command: &str, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let mut out = command.as_bytes().to_vec();
    out.push(b'\n');
    for (name, value) in headers {
        out.extend_from_slice(name.as_bytes());
        out.push(b':');
        out.extend_from_slice(value.as_bytes());
        out.push(b'\n');
    }
    out.push(b'\n');
    out.extend_from_slice(body);
    out.push(0);
    out
}

fn body(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let len = rng.random_range(0..=max);
    if rng.random_bool(0.8) {
        (0..len).map(|_| rng.random_range(b' '..=b'~')).collect()
    } else {
        (0..len).map(|_| rng.random::<u8>()).collect()
    }
}

/// A topic key; `pattern` allows wildcards.
fn word(rng: &mut StdRng, pattern: bool) -> &'static str {
    const WORDS: &[&str] = &["a", "b", "news", "x.y", "room", "*", "#", "a.*", "a.#"];
    let n = if pattern { WORDS.len() } else { 5 };
    WORDS[rng.random_range(0..n)]
}

fn receipt(rng: &mut StdRng, headers: &mut Vec<(&str, String)>) {
    if rng.random_bool(0.3) {
        headers.push(("receipt", format!("r-{}", rng.random_range(0..1000))));
    }
}

/// One valid frame a client might send after CONNECT.
fn valid_frame(rng: &mut StdRng, conn_no: u64) -> Vec<u8> {
    let mut h: Vec<(&str, String)> = Vec::new();
    match rng.random_range(0..100) {
        0..15 => {
            h.push(("id", rng.random_range(0..20).to_string()));
            h.push(("destination", format!("/topic/fuzz.{}", word(rng, true))));
            if rng.random_bool(0.3) {
                let modes = ["auto", "client", "client-individual"];
                h.push(("ack", modes[rng.random_range(0..3)].to_owned()));
            }
            receipt(rng, &mut h);
            encoded("SUBSCRIBE", &h, b"")
        }
        15..25 => {
            h.push(("id", rng.random_range(0..20).to_string()));
            h.push((
                "destination",
                format!("/topic/room.fuzz{}", rng.random_range(0..5)),
            ));
            if rng.random_bool(0.5) {
                h.push(("x-history", rng.random_range(0..30).to_string()));
            } else {
                h.push(("x-since", rng.random_range(0..200).to_string()));
            }
            receipt(rng, &mut h);
            encoded("SUBSCRIBE", &h, b"")
        }
        25..45 => {
            h.push(("destination", format!("/topic/fuzz.{}", word(rng, false))));
            let b = body(rng, 2000);
            if rng.random_bool(0.5) {
                h.push(("content-length", b.len().to_string()));
            }
            receipt(rng, &mut h);
            encoded("SEND", &h, &b)
        }
        45..55 => {
            h.push((
                "destination",
                format!("/topic/room.fuzz{}", rng.random_range(0..5)),
            ));
            if rng.random_bool(0.2) {
                h.push(("x-transient", "true".into()));
            }
            receipt(rng, &mut h);
            encoded("SEND", &h, &body(rng, 300))
        }
        55..60 => {
            h.push((
                "destination",
                format!("/user/fuzzer{}/queue/dm", rng.random_range(0..3)),
            ));
            receipt(rng, &mut h);
            encoded("SEND", &h, &body(rng, 200))
        }
        60..63 => {
            h.push(("id", "dm".into()));
            h.push(("destination", "/user/queue/dm".into()));
            encoded("SUBSCRIBE", &h, b"")
        }
        63..68 => {
            h.push(("id", rng.random_range(0..20).to_string()));
            receipt(rng, &mut h);
            encoded("UNSUBSCRIBE", &h, b"")
        }
        68..73 => {
            h.push((
                "id",
                format!("{}-{}", rng.random_range(0..20), rng.random::<u32>()),
            ));
            encoded(if rng.random_bool(0.5) { "ACK" } else { "NACK" }, &h, b"")
        }
        73..80 => {
            let commands = ["BEGIN", "COMMIT", "ABORT"];
            h.push(("transaction", format!("t{}", rng.random_range(0..3))));
            receipt(rng, &mut h);
            encoded(commands[rng.random_range(0..3)], &h, b"")
        }
        80..84 => {
            h.push(("destination", "/topic/fuzz.tx".into()));
            h.push(("transaction", format!("t{}", rng.random_range(0..3))));
            encoded("SEND", &h, &body(rng, 100))
        }
        84..88 => {
            if rng.random_bool(0.5) {
                b"\n".to_vec()
            } else {
                b"\r\n".to_vec()
            }
        }
        88..91 => {
            h.push(("id", rng.random_range(0..20).to_string()));
            let app = ["/app/rooms", "/app/room.fuzz1.members", "/app/nothing"];
            h.push(("destination", app[rng.random_range(0..3)].to_owned()));
            encoded("SUBSCRIBE", &h, b"")
        }
        91..93 => {
            h.push(("destination", "/queue/fuzzq".into()));
            receipt(rng, &mut h);
            encoded("SEND", &h, &body(rng, 100))
        }
        93..95 => {
            // A client that floods itself without reading: a slow-consumer cut, with more
            // frames often following in the same read.
            let topic = format!("/topic/fuzz.self{conn_no}");
            let mut out = encoded(
                "SUBSCRIBE",
                &[("id", "self".into()), ("destination", topic.clone())],
                b"",
            );
            let big = vec![b'f'; 30_000];
            for _ in 0..rng.random_range(10..200) {
                out.extend(encoded("SEND", &[("destination", topic.clone())], &big));
            }
            out
        }
        _ => encoded(
            "DISCONNECT",
            &[("receipt", format!("d-{}", rng.random_range(0..100)))],
            b"",
        ),
    }
}

/// Bytes that break things when they land in the wrong place.
const NASTY: &[u8] = &[0, b'\n', b'\r', b':', b'\\', 0xff, 0xc3, b'c', b'n', b'9'];

fn mutate(rng: &mut StdRng, f: &mut Vec<u8>) {
    if f.is_empty() {
        f.push(NASTY[rng.random_range(0..NASTY.len())]);
        return;
    }
    let at = rng.random_range(0..f.len());
    match rng.random_range(0..9) {
        0 => f[at] = rng.random(),
        1 => {
            let end = (at + rng.random_range(1..8)).min(f.len());
            f.drain(at..end);
        }
        2 => {
            for _ in 0..rng.random_range(1..8) {
                f.insert(at, NASTY[rng.random_range(0..NASTY.len())]);
            }
        }
        3 => {
            let end = (at + rng.random_range(1..64)).min(f.len());
            let copy: Vec<u8> = f[at..end].to_vec();
            f.splice(at..at, copy);
        }
        4 => f.truncate(at),
        5 => {
            let commands: &[&[u8]] = &[b"SNED", b"send", b"CONNECT", b"MESSAGE", b"ERROR", b""];
            let end = f.iter().position(|b| *b == b'\n').unwrap_or(f.len());
            f.splice(
                ..end,
                commands[rng.random_range(0..commands.len())].to_vec(),
            );
        }
        6 => {
            let lengths = ["99999999999999999999", "70000", "-1", "ten", "0", "5"];
            let header = format!("content-length:{}\n", lengths[rng.random_range(0..6)]);
            let line = f
                .iter()
                .position(|b| *b == b'\n')
                .map_or(f.len(), |p| p + 1);
            f.splice(line..line, header.into_bytes());
        }
        7 => {
            let line = f
                .iter()
                .position(|b| *b == b'\n')
                .map_or(f.len(), |p| p + 1);
            let many: Vec<u8> = (0..40)
                .flat_map(|i| format!("h{i}:v\n").into_bytes())
                .collect();
            f.splice(line..line, many);
        }
        _ => {
            let line = f
                .iter()
                .position(|b| *b == b'\n')
                .map_or(f.len(), |p| p + 1);
            let long = format!("x-long:{}\n", "v".repeat(2000));
            f.splice(line..line, long.into_bytes());
        }
    }
}

/// A client's whole input: CONNECT (usually valid) and a few frames, some mutated; and the
/// version the broker's ERRORs before CONNECTED are written in, if it is known.
fn script(rng: &mut StdRng, conn_no: u64) -> (Vec<u8>, Option<Version>) {
    let versions = [
        ("1.2", Version::V1_2),
        ("1.1", Version::V1_1),
        ("1.0", Version::V1_0),
        ("1.0,1.1,1.2", Version::V1_2),
    ];
    let (accept, version) = versions[rng.random_range(0..4)];
    let mut version = Some(version);
    let mut connect = encoded(
        if rng.random_bool(0.9) {
            "CONNECT"
        } else {
            "STOMP"
        },
        &[
            ("accept-version", accept.to_owned()),
            ("login", format!("fuzzer{}", conn_no % 3)),
            ("heart-beat", "0,0".into()),
        ],
        b"",
    );
    if rng.random_bool(0.05) {
        mutate(rng, &mut connect);
        version = None;
    }
    let mut out = connect;
    for _ in 0..rng.random_range(1..12) {
        let mut f = valid_frame(rng, conn_no);
        if rng.random_bool(0.25) {
            mutate(rng, &mut f);
        }
        out.extend(f);
    }
    (out, version)
}

/// Cuts `bytes` at random points.
fn chunks(rng: &mut StdRng, bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut cuts: Vec<usize> = (0..rng.random_range(0..10))
        .map(|_| rng.random_range(0..=bytes.len()))
        .collect();
    cuts.sort_unstable();
    cuts.push(bytes.len());
    let mut out = Vec::new();
    let mut start = 0;
    for cut in cuts {
        if cut > start {
            out.push(bytes[start..cut].to_vec());
            start = cut;
        }
    }
    out
}

#[derive(Default)]
struct Tally {
    connections: u64,
    /// ERROR messages' first words, counted.
    errors: BTreeMap<String, u64>,
    disconnected: u64,
    /// Still open after the client stopped (a frame waiting for more bytes, say).
    left_open: u64,
    /// An ERROR to a mangled CONNECT, in a version the client could not know.
    unknown_version: u64,
    violations: Vec<String>,
}

fn escaped(bytes: &[u8]) -> String {
    let text: String = bytes.escape_ascii().to_string();
    text.chars().take(600).collect()
}

/// One fuzzing connection; what it saw goes into `tally`.
async fn one_connection(broker: &Broker, rng: &mut StdRng, conn_no: u64, tally: &Mutex<Tally>) {
    let kind = if rng.random_bool(0.5) {
        Transport::Tcp
    } else {
        Transport::Ws
    };
    let (input, version) = script(rng, conn_no);
    let pieces = chunks(rng, &input);
    let mut conn = Conn::open(broker, kind).await;
    // Until CONNECTED names it, the version the broker negotiated from what was offered.
    conn.set_version(version.unwrap_or(Version::V1_2));
    for piece in &pieces {
        let sent = if conn.is_ws() {
            let message = match std::str::from_utf8(piece) {
                Ok(text) if rng.random_bool(0.8) => WsMessage::text(text),
                Ok(_) => WsMessage::binary(piece.clone()),
                Err(_) if rng.random_bool(0.1) => {
                    // A text message that is not UTF-8.
                    let raw = WsFrame::message(piece.clone(), OpCode::Data(Data::Text), true);
                    WsMessage::Frame(raw)
                }
                Err(_) => WsMessage::binary(piece.clone()),
            };
            conn.send_ws_burst(vec![message]).await
        } else {
            conn.try_send_raw(piece).await
        };
        if !sent {
            break;
        }
    }
    if rng.random_bool(0.5) {
        conn.try_send_raw(b"DISCONNECT\nreceipt:fuzz-end\n\n\0")
            .await;
    }
    let mut last = None;
    let mut frames = 0u64;
    let closed = loop {
        match conn.try_next_event_within(QUIET).await {
            Ok(Some(Event::Frame(f))) => {
                frames += 1;
                last = Some(f);
                if frames > 100_000 {
                    break false;
                }
            }
            Ok(Some(Event::Closed)) => break true,
            Ok(None) => break false,
            // An ERROR before CONNECTED to a mangled CONNECT: its escaping depends on the
            // version the broker made of it, which this client cannot know.
            Err(_) if version.is_none() && last.is_none() => {
                tally.lock().unwrap().unknown_version += 1;
                return;
            }
            Err(e) => {
                let violation = format!(
                    "connection {conn_no} over {kind:?}: the broker sent bytes that do not \
                     decode ({e}) after {frames} frames; input: {}",
                    escaped(&input)
                );
                tally.lock().unwrap().violations.push(violation);
                return;
            }
        }
    };
    let mut tally = tally.lock().unwrap();
    tally.connections += 1;
    if !closed {
        tally.left_open += 1;
        return;
    }
    match last.as_ref().map(|f| (f.command.as_str(), f)) {
        Some(("ERROR", f)) => {
            let message = f.header("message").unwrap_or("(no message header)");
            let reason: String = message
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ");
            *tally.errors.entry(reason).or_default() += 1;
        }
        Some(("RECEIPT", f))
            if f.header("receipt-id")
                .is_some_and(|id| id == "fuzz-end" || id.starts_with("d-")) =>
        {
            tally.disconnected += 1;
        }
        // A DISCONNECT without a receipt (mutated) closes without a word, rightly.
        _ if input.windows(10).any(|w| w == b"DISCONNECT") => tally.disconnected += 1,
        _ => {
            let last = last.map(|f| (f.command, f.headers));
            let violation = format!(
                "connection {conn_no} over {kind:?} closed without an ERROR after {frames} frames \
                 (the last: {last:?}); input in {} pieces: {}",
                pieces.len(),
                escaped(&input)
            );
            tally.violations.push(violation);
        }
    }
}

/// Publishes numbered messages into a room until told to stop, then a last one, `end`.
async fn bystander_publisher(broker: &Broker, stop: Arc<AtomicBool>) -> u64 {
    let mut conn = Conn::open(broker, Transport::Tcp).await;
    conn.login("bystander-pub").await;
    let mut pace = tokio::time::interval(Duration::from_millis(2));
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        pace.tick().await;
        n += 1;
        let send =
            frame("SEND", &[("destination", "/topic/room.bystand")]).with_body(n.to_string());
        if n.is_multiple_of(50) {
            conn.send_with_receipt(&send, &format!("b{n}")).await;
        } else {
            conn.send(&send).await;
        }
    }
    let end = frame("SEND", &[("destination", "/topic/room.bystand")]).with_body("end");
    conn.send_with_receipt(&end, "end").await;
    n
}

/// Receives the publisher's messages; each must be the next number. Returns how many came.
async fn bystander_subscriber(mut conn: Conn) -> u64 {
    let mut expected = 1u64;
    loop {
        let f = match conn.next_event().await {
            Event::Frame(f) => f,
            Event::Closed => panic!("the bystander subscriber was closed after {expected}"),
        };
        assert_eq!(
            f.command.as_str(),
            "MESSAGE",
            "the bystander subscriber got {f:?}"
        );
        if f.header("x-sender") != Some("bystander-pub") {
            continue;
        }
        let body = String::from_utf8_lossy(&f.body).into_owned();
        if body == "end" {
            return expected - 1;
        }
        assert_eq!(body, expected.to_string(), "lost or reordered");
        expected += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_frames_split_at_random_always_get_an_error_before_the_close() {
    let seconds: u64 = std::env::var("STOA_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let seed: u64 = std::env::var("STOA_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("fuzzing for {seconds} s with STOA_FUZZ_SEED={seed}");
    let broker = Arc::new(Broker::start_capturing_stderr(ARGS, &[]));

    let mut sub = Conn::open(&broker, Transport::Ws).await;
    sub.login("bystander-sub").await;
    let join = frame(
        "SUBSCRIBE",
        &[("id", "0"), ("destination", "/topic/room.bystand")],
    );
    sub.send_with_receipt(&join, "joined").await;
    let subscriber = tokio::spawn(bystander_subscriber(sub));
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = tokio::spawn({
        let (broker, stop) = (broker.clone(), stop.clone());
        async move { bystander_publisher(&broker, stop).await }
    });

    let tally = Arc::new(Mutex::new(Tally::default()));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..WORKERS as u64)
        .map(|worker| {
            let (broker, tally) = (broker.clone(), tally.clone());
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(seed.wrapping_add(worker));
                let mut conn_no = worker;
                while Instant::now() < deadline {
                    one_connection(&broker, &mut rng, conn_no, &tally).await;
                    conn_no += WORKERS as u64;
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let published = publisher.await.unwrap();
    let received = subscriber.await.unwrap();

    let tally = tally.lock().unwrap();
    eprintln!(
        "{} connections: {} closed after an ERROR, {} after DISCONNECT, {} left open by the client, \
         {} ERRORs in an unknown version; {} violations; bystanders: {published} published, \
         {received} received",
        tally.connections,
        tally.errors.values().sum::<u64>(),
        tally.disconnected,
        tally.left_open,
        tally.unknown_version,
        tally.violations.len()
    );
    for (reason, count) in &tally.errors {
        eprintln!("  ERROR {reason:?}: {count}");
    }
    assert_eq!(received, published, "the bystander lost messages");
    assert!(
        tally.violations.is_empty(),
        "{} connections closed without an ERROR (seed {seed}), the first:\n{}",
        tally.violations.len(),
        tally
            .violations
            .iter()
            .take(3)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    let mut broker = Arc::into_inner(broker).unwrap();
    assert!(broker.is_running(), "the broker is still up");
    let stderr = broker.stderr();
    assert!(
        !stderr.contains("panicked"),
        "the broker panicked:\n{stderr}"
    );
}
