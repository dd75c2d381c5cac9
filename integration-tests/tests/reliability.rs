//! What must hold whatever else happens on a connection (DESIGN.md "Errors and limits"): the
//! ERROR always reaches the client before the close; a replay of any size within what is
//! kept is delivered in full, paced by the client's socket; waiting direct messages are
//! paced the same way; memory stays bounded by the configured caps.

// Test code: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use integration_tests::{Broker, Conn, Event, Transport, WsMessage, cli_bin, frame};
use stomp_codec::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::Frame as WsFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

/// Reads until the connection closes; the frames that came first.
async fn frames_until_closed(conn: &mut Conn, what: &str) -> Vec<Frame> {
    let mut frames = Vec::new();
    loop {
        match conn.next_event().await {
            Event::Frame(f) => frames.push(f),
            Event::Closed => return frames,
        }
        assert!(frames.len() < 100_000, "{what}: no end in sight");
    }
}

/// The frame before the close must be an ERROR whose message mentions `needle`.
fn assert_ends_with_error(frames: &[Frame], needle: &str, what: &str) {
    let Some(last) = frames.last() else {
        panic!("{what}: closed without an ERROR (and without anything else)");
    };
    assert_eq!(
        last.command.as_str(),
        "ERROR",
        "{what}: the last frame before the close is not an ERROR: {last:?}"
    );
    let message = last.header("message").unwrap_or_default();
    assert!(
        message.contains(needle),
        "{what}: ERROR {message:?} does not mention {needle:?}"
    );
}

fn send_bytes(destination: &str, body: &str) -> Vec<u8> {
    format!("SEND\ndestination:{destination}\n\n{body}\0").into_bytes()
}

/// Frames that followed a slow-consumer cut in the same read and left the connection closed
/// with no ERROR and no RECEIPT (issue #19, defect 1).
const FOLLOW_UPS: &[(&str, &[u8])] = &[
    ("an ACK of nothing", b"ACK\nid:1-1\n\n\0"),
    ("a SEND without destination", b"SEND\n\nx\0"),
    ("an unknown command", b"SNED\n\n\0"),
    (
        "a DISCONNECT with a receipt",
        b"DISCONNECT\nreceipt:bye\n\n\0",
    ),
];

async fn slow_consumer_cut_then(kind: Transport) {
    // Reads of 64 KiB: each client write arrives in one read.
    let broker = Broker::start(&["--outbox-bytes", "4096", "--read-buffer-bytes", "65536"]);
    for (name, follow_up) in FOLLOW_UPS {
        let what = format!("{name} after a slow-consumer cut over {kind:?}");
        let mut conn = Conn::open(&broker, kind).await;
        conn.login("echo").await;
        conn.subscribe("0", "/topic/echo").await;
        // Two messages to itself of 3,000 bytes each: the second does not fit in a 4 KiB
        // outbox, and nothing is written between them (one read). The follow-up comes in
        // the same read.
        let body = "x".repeat(3000);
        let mut input = send_bytes("/topic/echo", &body);
        input.extend(send_bytes("/topic/echo", &body));
        input.extend_from_slice(follow_up);
        conn.send_raw(&input).await;
        let frames = frames_until_closed(&mut conn, &what).await;
        assert_ends_with_error(&frames, "slow consumer", &what);
        assert!(
            frames.iter().all(|f| f.command.as_str() != "RECEIPT"),
            "{what}: nothing after the cut is acted on: {frames:?}"
        );
    }
}

#[tokio::test]
async fn a_slow_consumer_cut_gets_its_error_whatever_follows_in_the_same_read_over_tcp() {
    slow_consumer_cut_then(Transport::Tcp).await;
}

#[tokio::test]
async fn a_slow_consumer_cut_gets_its_error_whatever_follows_in_the_same_read_over_websocket() {
    slow_consumer_cut_then(Transport::Ws).await;
}

#[tokio::test]
async fn a_text_message_that_is_not_utf8_gets_its_error_while_the_client_keeps_sending() {
    let broker = Broker::start(&[]);
    let mut conn = Conn::open(&broker, Transport::Ws).await;
    conn.login("latin1").await;
    let bad = WsFrame::message(
        b"SEND\ndestination:/topic/a\n\ncaf\xe9\0".to_vec(),
        OpCode::Data(Data::Text),
        true,
    );
    conn.send_ws(WsMessage::Frame(bad)).await;
    // A client that goes on sending for a while before it reads (as a page does whose
    // user keeps typing): the broker must read and discard, not reset the connection,
    // which makes clients such as Node's `ws` drop what they had not read yet.
    let more = String::from_utf8(send_bytes("/topic/a", &"y".repeat(1000))).unwrap();
    let started = std::time::Instant::now();
    let mut sent = 0;
    while started.elapsed() < std::time::Duration::from_millis(300) && sent < 5_000 {
        assert!(
            conn.send_ws_burst(vec![WsMessage::text(more.clone())])
                .await,
            "the connection was reset {:?} after the bad message ({sent} sent since)",
            started.elapsed()
        );
        sent += 1;
    }
    let frames = frames_until_closed(&mut conn, "not UTF-8").await;
    assert_ends_with_error(
        &frames,
        "not valid UTF-8",
        "a text message that is not UTF-8",
    );
}

/// Publishes `count` messages of `body_len` bytes to `destination`, confirming every 500.
async fn fill(conn: &mut Conn, destination: &str, count: usize, body_len: usize) {
    let body = "m".repeat(body_len);
    let mut sent = 0;
    while sent < count {
        let n = (count - sent).min(500);
        let mut input = Vec::new();
        for _ in 0..n - 1 {
            input.extend(send_bytes(destination, &body));
        }
        conn.send_raw(&input).await;
        let last = frame("SEND", &[("destination", destination)]).with_body(body.clone());
        conn.send_with_receipt(&last, &format!("fill-{sent}")).await;
        sent += n;
    }
}

fn seq_of(f: &Frame) -> Option<u64> {
    f.header("x-seq").and_then(|s| s.parse().ok())
}

async fn replay_larger_than_the_outbox(kind: Transport) {
    let broker = Broker::start(&["--room-history", "20000"]);
    let room = "/topic/room.big";
    // A member who publishes: its own join notice is seq 1, its messages 2..=10001.
    let mut writer = Conn::open(&broker, Transport::Tcp).await;
    writer.login("writer").await;
    let join = frame("SUBSCRIBE", &[("id", "w"), ("destination", room)]);
    writer.send_with_receipt(&join, "joined").await;
    fill(&mut writer, room, 10_000, 400).await;

    // About 5.7 MB of kept messages: more than the 4 MiB outbox.
    let mut reader = Conn::open(&broker, kind).await;
    reader.login("reader").await;
    reader
        .send(&frame(
            "SUBSCRIBE",
            &[
                ("id", "r"),
                ("destination", room),
                ("x-since", "0"),
                ("receipt", "replayed"),
            ],
        ))
        .await;
    // Live traffic while the reader has read nothing: once the writer sees the reader's
    // join notice, the replay has begun and these follow it.
    loop {
        let f = writer.expect_frame().await;
        if f.header("x-event") == Some("join") && f.header("x-sender") == Some("reader") {
            break;
        }
    }
    for i in 0..100 {
        let live = frame("SEND", &[("destination", room)]).with_body(format!("live {i}"));
        writer.send(&live).await;
    }

    let mut next_seq = 1;
    let mut receipt_after = None;
    while next_seq <= 10_102 {
        let f = reader.expect_frame().await;
        match f.command.as_str() {
            "MESSAGE" => {
                assert_eq!(seq_of(&f), Some(next_seq), "x-seq in order, no gap: {f:?}");
                let replayed = f.header("x-replay") == Some("true");
                assert_eq!(replayed, next_seq <= 10_001, "x-replay on seq {next_seq}");
                if next_seq == 10_002 {
                    assert_eq!(f.header("x-event"), Some("join"), "the reader's own join");
                    assert_eq!(f.header("x-sender"), Some("reader"));
                }
                next_seq += 1;
            }
            "RECEIPT" => {
                assert_eq!(f.header("receipt-id"), Some("replayed"));
                receipt_after = Some(next_seq - 1);
            }
            _ => panic!("over {kind:?}, at seq {next_seq}: {f:?}"),
        }
    }
    assert_eq!(
        receipt_after,
        Some(10_002),
        "the SUBSCRIBE's RECEIPT comes after the replay and the joiner's own join notice"
    );
    assert!(
        reader
            .is_quiet_for(std::time::Duration::from_millis(200))
            .await
    );
}

#[tokio::test]
async fn a_replay_larger_than_the_outbox_is_delivered_in_full_in_order_over_tcp() {
    replay_larger_than_the_outbox(Transport::Tcp).await;
}

#[tokio::test]
async fn a_replay_larger_than_the_outbox_is_delivered_in_full_in_order_over_websocket() {
    replay_larger_than_the_outbox(Transport::Ws).await;
}

#[tokio::test]
async fn stoa_cli_sub_since_0_gets_a_replay_larger_than_the_outbox() {
    let broker = Broker::start(&[]);
    let room = "/topic/room.cli";
    let mut writer = Conn::open(&broker, Transport::Tcp).await;
    writer.login("writer").await;
    fill(&mut writer, room, 10_000, 400).await;
    let url = broker.ws_url();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(cli_bin())
            .args(["--url", &url, "--login", "late", "sub", room])
            .args([
                "--since",
                "0",
                "--count",
                "10001",
                "--timeout",
                "60",
                "--json",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stoa-cli failed: {stderr}");
    let seqs: Vec<u64> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let json: serde_json::Value = serde_json::from_str(line).unwrap();
            let seq = json["headers"]["x-seq"].as_str();
            seq.unwrap_or_else(|| panic!("no x-seq: {line}"))
                .parse()
                .unwrap()
        })
        .collect();
    // 10,000 replayed, then the subscriber's own join notice.
    assert_eq!(seqs, (1..=10_001).collect::<Vec<u64>>());
}

#[tokio::test]
async fn waiting_direct_messages_larger_than_the_outbox_are_all_delivered_once() {
    let broker = Broker::start(&[]);
    let mut sender = Conn::open(&broker, Transport::Tcp).await;
    sender.login("sender").await;
    // 5,000 messages of 1,000 bytes wait for bob: about 6 MB, more than the 4 MiB outbox.
    fill(&mut sender, "/user/bob/queue/dm", 5_000, 1_000).await;
    for kind in [Transport::Tcp, Transport::Ws] {
        let mut bob = Conn::open(&broker, kind).await;
        bob.login("bob").await;
        bob.send(&frame(
            "SUBSCRIBE",
            &[
                ("id", "dm"),
                ("destination", "/user/queue/dm"),
                ("receipt", "s"),
            ],
        ))
        .await;
        let mut got = 0;
        let mut receipt = false;
        while got < 5_000 || !receipt {
            let f = bob.expect_frame().await;
            match f.command.as_str() {
                "MESSAGE" => {
                    assert!(!receipt, "waiting messages come before the RECEIPT");
                    assert_eq!(f.header("x-sender"), Some("sender"));
                    got += 1;
                }
                "RECEIPT" => receipt = true,
                _ => panic!("{kind:?}, after {got} messages: {f:?}"),
            }
        }
        assert!(
            bob.is_quiet_for(std::time::Duration::from_millis(200))
                .await
        );
        let unsubscribe = frame("UNSUBSCRIBE", &[("id", "dm")]);
        assert!(bob.send_with_receipt(&unsubscribe, "u").await.is_empty());
        // Delivered once: they are gone. The next round fills the queue again.
        let (status, _) = broker.http_get("/healthz").await;
        assert_eq!(status, 200);
        if kind == Transport::Tcp {
            fill(&mut sender, "/user/bob/queue/dm", 5_000, 1_000).await;
        }
    }
}

#[tokio::test]
async fn waiting_direct_messages_are_capped_in_count_and_in_bytes() {
    let broker = Broker::start(&["--user-queue-limit", "3", "--user-queue-bytes", "2500"]);
    for (user, body_len, fits) in [("bob", 1000, 2), ("carol", 10, 3)] {
        let mut sender = Conn::open(&broker, Transport::Tcp).await;
        sender.login("sender").await;
        let destination = format!("/user/{user}/queue/dm");
        let send = frame("SEND", &[("destination", &destination)]).with_body("d".repeat(body_len));
        for i in 0..fits {
            sender
                .send_with_receipt(&send, &format!("{user}-{i}"))
                .await;
        }
        sender.send(&send).await;
        let error = sender.expect_error_then_close("is full").await;
        let message = error.header("message").unwrap_or_default();
        assert!(
            message.contains("at most 3 messages and 2500 bytes"),
            "{user}: {message}"
        );
    }
}

#[tokio::test]
async fn a_publisher_is_paused_while_the_store_is_behind_and_loses_nothing() {
    // One byte of room messages may wait for the store's writer: every room SEND stops
    // the reading of its connection until the writer has taken it.
    let broker = Broker::start(&["--store-pending-bytes", "1"]);
    let room = "/topic/room.paced";
    let mut member = Conn::open(&broker, Transport::Ws).await;
    member.login("member").await;
    let join = frame("SUBSCRIBE", &[("id", "0"), ("destination", room)]);
    member.send_with_receipt(&join, "in").await;
    let mut writer = Conn::open(&broker, Transport::Tcp).await;
    writer.login("writer").await;
    fill(&mut writer, room, 2_000, 2_000).await;
    for n in 2..=2_001 {
        let f = member.expect_frame().await;
        assert_eq!(seq_of(&f), Some(n), "in order, nothing lost");
    }
}

#[tokio::test]
async fn nothing_follows_a_disconnects_receipt_that_waited_for_the_disk() {
    let broker = Broker::start(&[]);
    let room = "/topic/room.busy";
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Someone talks in the room all the time.
    let chatter = tokio::spawn({
        let stop = stop.clone();
        let mut conn = Conn::open(&broker, Transport::Tcp).await;
        conn.login("chatter").await;
        async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let send = frame("SEND", &[("destination", room)]).with_body(n.to_string());
                conn.send_with_receipt(&send, "c").await;
            }
        }
    });
    for round in 0..20 {
        let mut conn = Conn::open(&broker, Transport::Tcp).await;
        conn.login("leaver").await;
        let join = frame("SUBSCRIBE", &[("id", "0"), ("destination", room)]);
        conn.send_with_receipt(&join, "in").await;
        // A direct message for someone away: its RECEIPT, and so the DISCONNECT's after
        // it, waits for the disk while room messages keep arriving.
        conn.send_raw(
            b"SEND\ndestination:/user/away/queue/dm\nreceipt:dm\n\nhi\0DISCONNECT\nreceipt:bye\n\n\0",
        )
        .await;
        let frames = frames_until_closed(&mut conn, "disconnect").await;
        let last = frames
            .last()
            .map(|f| (f.command.as_str(), f.header("receipt-id")));
        assert_eq!(
            last,
            Some(("RECEIPT", Some("bye"))),
            "round {round}: the DISCONNECT's RECEIPT is the last frame"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    chatter.await.unwrap();
}

/// The sum of the files in a directory, in bytes.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

#[tokio::test]
async fn room_history_is_bounded_in_bytes_per_room_and_in_all() {
    const MIB: u64 = 1 << 20;
    // 8 MiB of history, and at most 4 MiB on its way to disk.
    const CAPS_KIB: u64 = (8 + 4) * 1024;
    let broker = Broker::start(&[
        "--room-history-bytes",
        "1048576",
        "--history-total-bytes",
        "8388608",
        "--store-pending-bytes",
        "4194304",
    ]);
    let mut writer = Conn::open(&broker, Transport::Tcp).await;
    writer.login("flood").await;
    let before = broker.rss_kib();
    // 40 rooms nobody reads, 10 messages of 500 kB each: 200 MB sent against 8 MiB kept.
    let body = "b".repeat(500_000);
    for room in 0..40 {
        let destination = format!("/topic/room.r{room}");
        for i in 0..10 {
            let send = frame("SEND", &[("destination", &destination)]).with_body(body.clone());
            writer
                .send_with_receipt(&send, &format!("{room}-{i}"))
                .await;
        }
    }
    let after = broker.rss_kib();
    eprintln!("resident memory: {before} KiB before the flood, {after} KiB after");
    // The margin is what is not history: SQLite's page caches (16 MiB for each of two
    // connections), a store batch being written (up to 16 MiB), read buffers and the frame
    // being handled, and the allocator's slack (its arenas use transparent huge pages).
    // Measured: 47 to 85 MB resident after this flood, from 21 MB at start, with the other
    // tests of this file running beside it.
    let margin_kib = 80 * 1024;
    assert!(
        after <= before + CAPS_KIB + margin_kib,
        "resident memory grew from {before} KiB to {after} KiB with 8 MiB of history kept"
    );
    // The newest room keeps its last two messages (1 MiB); x-since into what went gets the
    // gap notice first.
    let mut reader = Conn::open(&broker, Transport::Tcp).await;
    reader.login("reader").await;
    let sub = frame(
        "SUBSCRIBE",
        &[
            ("id", "0"),
            ("destination", "/topic/room.r39"),
            ("x-since", "0"),
        ],
    );
    let early = reader.send_with_receipt(&sub, "r39").await;
    let events: Vec<(Option<&str>, Option<u64>)> = early
        .iter()
        .map(|f| (f.header("x-event"), seq_of(f)))
        .collect();
    assert_eq!(
        events,
        [
            (Some("gap"), None),
            (None, Some(9)),
            (None, Some(10)),
            (Some("join"), Some(11))
        ]
    );
    assert_eq!(early[0].header("x-first-seq"), Some("9"));
    // The oldest room went altogether: a client that saw its first message learns so.
    let sub = frame(
        "SUBSCRIBE",
        &[
            ("id", "1"),
            ("destination", "/topic/room.r0"),
            ("x-since", "1"),
        ],
    );
    let early = reader.send_with_receipt(&sub, "r0").await;
    assert_eq!(early[0].header("x-event"), Some("gap"), "{early:?}");
    // On disk too: the history database holds about what is kept, not what was sent (the
    // log is given back past 64 MiB; measured: 17 MB after 1 GB sent).
    let disk = dir_bytes(&broker.data_dir);
    assert!(
        disk <= 8 * MIB + 64 * MIB,
        "the data directory holds {disk} bytes with 8 MiB of history kept"
    );
}
