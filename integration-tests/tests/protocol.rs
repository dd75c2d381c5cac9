//! The protocol through the real binary: versions, WebSocket framing and subprotocols,
//! Spring-style clients, wildcards, heart-beats, slow consumers and shutdown.

// Test code: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use integration_tests::{Broker, Conn, Event, Transport, WsMessage, frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn connect_as(broker: &Broker, kind: Transport, version: &str, login: &str) -> Conn {
    let mut c = Conn::open(broker, kind).await;
    let connected = c
        .connect(&[
            ("accept-version", version),
            ("login", login),
            ("heart-beat", "0,0"),
        ])
        .await;
    assert_eq!(connected.header("version"), Some(version));
    c
}

#[tokio::test]
async fn every_version_round_trips_over_tcp_and_websocket() {
    let broker = Broker::start(&[]);
    for kind in [Transport::Tcp, Transport::Ws] {
        for version in ["1.0", "1.1", "1.2"] {
            let mut sub = connect_as(&broker, kind, version, "reader").await;
            let mut publisher = connect_as(&broker, kind, version, "writer").await;
            sub.subscribe("s1", "/topic/chat.versions").await;
            sub.subscribe("s2", "/topic/other").await;
            let body = "안녕하세요 — version ".to_owned() + version;
            let send = frame(
                "SEND",
                &[
                    ("destination", "/topic/chat.versions"),
                    ("content-type", "text/plain;charset=utf-8"),
                    ("x-app", "a:b"),
                ],
            )
            .with_body(body.clone());
            publisher.send_with_receipt(&send, "r1").await;
            let m = sub.expect_frame().await;
            assert_eq!(m.command.as_str(), "MESSAGE");
            assert_eq!(m.header("subscription"), Some("s1"));
            assert_eq!(m.header("destination"), Some("/topic/chat.versions"));
            assert_eq!(m.header("x-sender"), Some("writer"));
            assert_eq!(m.header("x-app"), Some("a:b"), "{kind:?} {version}");
            assert_eq!(
                m.header("content-length"),
                Some(body.len().to_string().as_str())
            );
            assert_eq!(m.body, body.as_bytes());
            // Unsubscribed: nothing more arrives on s1, while s2 still works.
            sub.send_with_receipt(&frame("UNSUBSCRIBE", &[("id", "s1")]), "u1")
                .await;
            publisher.send_with_receipt(&send, "r2").await;
            let other = frame("SEND", &[("destination", "/topic/other")]).with_body("two");
            publisher.send_with_receipt(&other, "r3").await;
            let m = sub.expect_frame().await;
            assert_eq!(
                (m.header("subscription"), &m.body[..]),
                (Some("s2"), &b"two"[..])
            );
        }
    }
}

#[tokio::test]
async fn large_and_binary_bodies_arrive_intact() {
    let broker = Broker::start(&[]);
    for kind in [Transport::Tcp, Transport::Ws] {
        let mut sub = connect_as(&broker, kind, "1.2", "reader").await;
        let mut publisher = connect_as(&broker, kind, "1.2", "writer").await;
        sub.subscribe("0", "/topic/blobs").await;
        let mib: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
        let with_nuls = b"a\0b\0\0c".to_vec();
        for body in [mib, with_nuls] {
            let send = frame(
                "SEND",
                &[
                    ("destination", "/topic/blobs"),
                    ("content-type", "application/octet-stream"),
                ],
            )
            .with_body(body.clone());
            publisher.send_with_receipt(&send, "r").await;
            assert_eq!(sub.expect_frame().await.body, body);
        }
    }
}

#[tokio::test]
async fn websocket_subprotocol_is_the_highest_offered_or_none() {
    let broker = Broker::start(&[]);
    let url = broker.ws_url();
    for (offer, chosen) in [
        (Some("v10.stomp, v11.stomp, v12.stomp"), Some("v12.stomp")),
        (Some("v12.stomp, v10.stomp"), Some("v12.stomp")),
        (Some("v11.stomp, v10.stomp"), Some("v11.stomp")),
        (Some("v10.stomp"), Some("v10.stomp")),
        (None, None),
    ] {
        let mut c = Conn::ws(&url, offer).await;
        assert_eq!(c.subprotocol.as_deref(), chosen, "offered {offer:?}");
        c.login("p").await;
    }
}

/// Sends a raw HTTP request head to the broker and returns the response's head.
async fn http_head(broker: &Broker, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(broker.http).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 1024];
    while !response.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the response head");
        response.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(response).unwrap()
}

#[tokio::test]
async fn websocket_upgrades_are_checked_as_rfc_6455_says() {
    let broker = Broker::start(&[]);
    let upgrade = |extra: &str| {
        format!(
            "GET /ws HTTP/1.1\r\nHost: stoa\r\nConnection: keep-alive, Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        )
    };
    // The RFC's own example key; subprotocols offered over two header lines.
    let accepted = http_head(
        &broker,
        &upgrade(
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt, v10.stomp\r\n\
             Sec-WebSocket-Protocol: v11.stomp\r\n",
        ),
    )
    .await
    .to_ascii_lowercase();
    assert!(accepted.starts_with("http/1.1 101"), "{accepted}");
    assert!(
        accepted.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{accepted}"
    );
    assert!(
        accepted.contains("sec-websocket-protocol: v11.stomp"),
        "{accepted}"
    );
    let old = http_head(&broker, &upgrade("Sec-WebSocket-Version: 8\r\n")).await;
    assert!(old.starts_with("HTTP/1.1 426"), "{old}");
    assert!(
        old.to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{old}"
    );
    // A plain GET is SockJS's greeting (Spring's `withSockJS()` serves the same path); an
    // upgrade a proxy mangled is refused.
    let (status, body) = broker.http_get("/ws").await;
    assert_eq!((status, body.as_str()), (200, "Welcome to SockJS!\n"));
    let (status, body) = broker
        .http_get_with("/ws", &[("Upgrade", "websocket")])
        .await;
    assert_eq!(
        status, 400,
        "an upgrade without Connection: Upgrade: {body}"
    );
}

#[tokio::test]
async fn frames_split_across_websocket_messages_and_several_in_one() {
    let broker = Broker::start(&[]);
    let mut sub = connect_as(&broker, Transport::Ws, "1.2", "reader").await;
    sub.subscribe("0", "/topic/split").await;
    let mut c = Conn::open(&broker, Transport::Ws).await;
    c.login("splitter").await;
    // One frame in three messages, one of them binary (stomp.js splitLargeFrames).
    let wire = b"SEND\ndestination:/topic/split\ncontent-length:11\n\nhello world\0";
    c.send_ws(WsMessage::text("SEND\ndestination:/topic/sp"))
        .await;
    c.send_ws(WsMessage::binary(wire[26..40].to_vec())).await;
    c.send_ws(WsMessage::text(std::str::from_utf8(&wire[40..]).unwrap()))
        .await;
    assert_eq!(sub.expect_frame().await.body, &b"hello world"[..]);
    // Two frames and heart-beats in one message, and a lone heart-beat message.
    c.send_ws(WsMessage::text("\n")).await;
    c.send_ws(WsMessage::text(
        "SEND\ndestination:/topic/split\n\none\0\n\nSEND\ndestination:/topic/split\n\ntwo\0\n",
    ))
    .await;
    assert_eq!(sub.expect_frame().await.body, &b"one"[..]);
    assert_eq!(sub.expect_frame().await.body, &b"two"[..]);
}

#[tokio::test]
async fn utf8_messages_go_out_as_text_and_others_as_binary() {
    let broker = Broker::start(&[]);
    let mut sub = connect_as(&broker, Transport::Ws, "1.2", "reader").await;
    sub.subscribe("0", "/topic/kinds").await;
    let mut publisher = connect_as(&broker, Transport::Tcp, "1.2", "writer").await;
    for body in [&b"plain text \xec\x95\x88"[..], &b"\xff\xfe not utf-8"[..]] {
        let send = frame("SEND", &[("destination", "/topic/kinds")]).with_body(body.to_vec());
        publisher.send_with_receipt(&send, "r").await;
        assert_eq!(sub.expect_frame().await.body, body);
    }
    // CONNECTED and the RECEIPT were text; the two MESSAGEs text, then binary.
    let n = sub.ws_text_flags.len();
    assert_eq!(&sub.ws_text_flags[n - 2..], [true, false]);
}

#[tokio::test]
async fn a_spring_style_client_is_served() {
    let broker = Broker::start(&[]);
    let url = broker.ws_url();
    // Spring's WebSocketStompClient: no subprotocol, no host, 1.1/1.2, 10 s heart-beats,
    // subscription ids 0, 1, ... on every connection.
    let mut clients = Vec::new();
    for name in ["spring-a", "spring-b"] {
        let mut c = Conn::ws(&url, None).await;
        assert_eq!(c.subprotocol, None);
        let connected = c
            .connect(&[
                ("accept-version", "1.1,1.2"),
                ("heart-beat", "10000,10000"),
                ("login", name),
            ])
            .await;
        assert_eq!(connected.header("version"), Some("1.2"));
        assert_eq!(connected.header("heart-beat"), Some("10000,10000"));
        c.subscribe("0", "/topic/greetings").await;
        c.subscribe("1", "/topic/binary").await;
        clients.push(c);
    }
    let json = r#"{"from":"spring-a","text":"héllo"}"#;
    let send = frame(
        "SEND",
        &[
            ("destination", "/topic/greetings"),
            ("content-type", "application/json;charset=UTF-8"),
        ],
    )
    .with_body(json);
    // The publisher is subscribed too: its copy may come before its receipt.
    let early = clients[0].send_with_receipt(&send, "j").await;
    let octets = vec![0u8, 159, 146, 150, 255];
    // Spring sends application/octet-stream bodies in binary WebSocket messages.
    let wire = stomp_codec::encode_to_bytes(
        &frame(
            "SEND",
            &[
                ("destination", "/topic/binary"),
                ("content-type", "application/octet-stream"),
            ],
        )
        .with_body(octets.clone()),
        stomp_codec::Version::V1_2,
    );
    clients[1].send_ws(WsMessage::binary(wire.to_vec())).await;
    let mut early = Some(early);
    for c in &mut clients {
        let mut got = early.take().unwrap_or_default();
        while got.len() < 2 {
            got.push(c.expect_frame().await);
        }
        let on = |id: &str| {
            got.iter()
                .find(|m| m.header("subscription") == Some(id))
                .unwrap()
        };
        assert_eq!(
            on("0").header("content-type"),
            Some("application/json;charset=UTF-8")
        );
        assert_eq!(on("0").body, json.as_bytes());
        assert_eq!(on("1").body, octets);
        assert!(
            c.ws_text_flags.contains(&false),
            "a binary body goes out binary"
        );
    }
}

#[tokio::test]
async fn wildcard_subscribers_get_exactly_their_matches() {
    let broker = Broker::start(&[]);
    let mut watchers = Vec::new();
    for (name, pattern) in [
        ("star", "/topic/news.*"),
        ("hash", "/topic/news.#"),
        ("exact", "/topic/news.lobby"),
    ] {
        let mut c = connect_as(&broker, Transport::Tcp, "1.2", name).await;
        c.subscribe("0", pattern).await;
        // A marker on /topic/end closes each list.
        c.subscribe("end", "/topic/end").await;
        watchers.push(c);
    }
    let mut publisher = connect_as(&broker, Transport::Ws, "1.2", "p").await;
    for key in [
        "news.lobby",
        "news.lobby.thread",
        "news",
        "newsroom.lobby",
        "news.kitchen",
        "end",
    ] {
        let send =
            frame("SEND", &[("destination", &format!("/topic/{key}"))]).with_body(key.to_owned());
        publisher.send_with_receipt(&send, key).await;
    }
    let mut lists = Vec::new();
    for c in &mut watchers {
        let mut got = Vec::new();
        loop {
            let body = String::from_utf8(c.expect_frame().await.body.to_vec()).unwrap();
            if body == "end" {
                break;
            }
            got.push(body);
        }
        lists.push(got);
    }
    assert_eq!(lists[0], ["news.lobby", "news.kitchen"]);
    assert_eq!(
        lists[1],
        ["news.lobby", "news.lobby.thread", "news", "news.kitchen"]
    );
    assert_eq!(lists[2], ["news.lobby"]);
}

#[tokio::test]
async fn the_broker_sends_heart_beats_at_the_negotiated_rate() {
    let broker = Broker::start(&["--heart-beat", "100,100"]);
    for kind in [Transport::Tcp, Transport::Ws] {
        let mut c = Conn::open(&broker, kind).await;
        let connected = c
            .connect(&[("accept-version", "1.2"), ("heart-beat", "0,100")])
            .await;
        assert_eq!(connected.header("heart-beat"), Some("100,100"));
        // Three beats in a row, each well within the client's 2x tolerance.
        for _ in 0..3 {
            let raw = c.read_raw_within(Duration::from_millis(200)).await;
            assert_eq!(raw, b"\n", "{kind:?}: expected a heart-beat EOL");
        }
    }
}

#[tokio::test]
async fn a_silent_client_is_dropped_and_a_beating_one_is_kept() {
    let broker = Broker::start(&["--heart-beat", "100,100"]);
    for kind in [Transport::Tcp, Transport::Ws] {
        // Promises a beat every 100 ms and sends none: closed after 3 x 100 ms.
        let mut silent = Conn::open(&broker, kind).await;
        silent
            .connect(&[("accept-version", "1.2"), ("heart-beat", "100,0")])
            .await;
        let started = std::time::Instant::now();
        silent.expect_error_then_close("heart-beat timeout").await;
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "closed too early: {:?}",
            started.elapsed()
        );

        // Keeps its promise for a second: still served afterwards.
        let mut beating = Conn::open(&broker, kind).await;
        beating
            .connect(&[("accept-version", "1.2"), ("heart-beat", "100,0")])
            .await;
        let until = std::time::Instant::now() + Duration::from_secs(1);
        while std::time::Instant::now() < until {
            beating.send_raw(b"\n").await;
            tokio::time::sleep(Duration::from_millis(80)).await;
        }
        beating.subscribe("0", "/topic/alive").await;
    }
}

async fn metric(broker: &Broker, name: &str) -> u64 {
    let mut stream = tokio::net::TcpStream::connect(broker.http).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut page = String::new();
    stream.read_to_string(&mut page).await.unwrap();
    page.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_cut_off_and_nobody_else_waits() {
    let broker = Broker::start(&["--outbox-bytes", "262144"]);
    let total: usize = 12_000; // 48 MiB through the broker: far past any socket buffer
    let mut slow = connect_as(&broker, Transport::Tcp, "1.2", "slow").await;
    slow.subscribe("0", "/topic/flood").await;
    // Fast consumers read as messages come, in tasks of their own: every one, in order.
    // They report progress so the publisher stays within a window of them: a consumer
    // that keeps up is one the publisher never gets far ahead of.
    const WINDOW: usize = 16; // 64 KiB, a quarter of the outbox
    let mut fast = Vec::new();
    let mut progress = Vec::new();
    for kind in [Transport::Tcp, Transport::Ws] {
        let mut c = connect_as(&broker, kind, "1.2", "fast").await;
        c.subscribe("0", "/topic/flood").await;
        let (done_tx, done_rx) = tokio::sync::watch::channel(0usize);
        progress.push(done_rx);
        fast.push(tokio::spawn(async move {
            for j in 0..total {
                let m = c.expect_frame().await;
                assert_eq!(
                    m.header("n"),
                    Some(j.to_string().as_str()),
                    "{kind:?}: {m:?}"
                );
                let _ = done_tx.send(j + 1);
            }
        }));
    }
    let rss_before = broker.rss_kib();
    let mut publisher = connect_as(&broker, Transport::Tcp, "1.2", "p").await;
    let body = vec![b'x'; 4096];
    for i in 0..total {
        for done in &mut progress {
            done.wait_for(|&n| i < n + WINDOW).await.unwrap();
        }
        let send = frame(
            "SEND",
            &[("destination", "/topic/flood"), ("n", &i.to_string())],
        )
        .with_body(body.clone());
        publisher.send(&send).await;
    }
    for task in fast {
        task.await.unwrap();
    }
    assert_eq!(metric(&broker, "stoa_slow_consumers_total").await, 1);
    let grown_mib = broker.rss_kib().saturating_sub(rss_before) / 1024;
    assert!(grown_mib < 64, "broker memory grew by {grown_mib} MiB");
    // The slow one gets what fitted, then ERROR "slow consumer", then the close.
    let mut delivered = 0;
    loop {
        match slow.next_event().await {
            Event::Frame(f) if f.command.as_str() == "MESSAGE" => delivered += 1,
            Event::Frame(f) => {
                assert_eq!(f.command.as_str(), "ERROR");
                assert!(f.header("message").unwrap().contains("slow consumer"));
                slow.expect_closed().await;
                break;
            }
            Event::Closed => panic!("closed without ERROR"),
        }
    }
    assert!(
        delivered < total,
        "the slow consumer cannot have taken everything"
    );
}

#[tokio::test]
async fn disconnect_with_receipt_gets_the_receipt_then_a_close() {
    let broker = Broker::start(&[]);
    for kind in [Transport::Tcp, Transport::Ws] {
        let mut c = connect_as(&broker, kind, "1.2", "leaver").await;
        c.send(&frame("DISCONNECT", &[("receipt", "bye-1")])).await;
        let receipt = c.expect_frame().await;
        assert_eq!(receipt.command.as_str(), "RECEIPT");
        assert_eq!(receipt.header("receipt-id"), Some("bye-1"));
        c.expect_closed().await;
    }
}

#[tokio::test]
async fn sigterm_closes_every_connection_with_an_error_and_exits_0() {
    let mut broker = Broker::start(&[]);
    let mut conns = Vec::new();
    for kind in [Transport::Tcp, Transport::Ws] {
        let mut c = connect_as(&broker, kind, "1.2", "stayer").await;
        c.subscribe("0", "/topic/a").await;
        conns.push(c);
    }
    let status = broker.terminate();
    assert!(status.success(), "stoa exited with {status}");
    for c in &mut conns {
        c.expect_error_then_close("server shutting down").await;
    }
}
