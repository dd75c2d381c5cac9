//! The client library against the real stoa binary (and RabbitMQ when the test command has
//! started it): every transport, receipts, transactions, acks, reconnection, dead brokers.

// Test code: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use client::{Backoff, Client, ClientError, Options, SubscribeOptions};
use futures_util::StreamExt;
use integration_tests::{Broker, Conn, Transport, frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const WAIT: Duration = Duration::from_secs(10);

/// Subscribes to `/topic/room.<room>` (live only) and to `/topic/plain`, and takes the
/// room's join notice.
async fn room_and_topic(
    client: &Client,
    room: &str,
) -> (client::Subscription, client::Subscription) {
    // The topic first: the client makes its subscriptions again in the order they were
    // made, so once the room's join notice comes after a reconnect, the topic is live too.
    let topic = client
        .subscribe("/topic/plain", SubscribeOptions::new())
        .await
        .unwrap();
    let mut joined = client
        .subscribe(
            &format!("/topic/room.{room}"),
            SubscribeOptions::new().header("x-history", "0"),
        )
        .await
        .unwrap();
    assert_eq!(joined.next().await.unwrap().header("x-event"), Some("join"));
    (joined, topic)
}

/// Options for `login` that reconnect quickly and for ever.
fn reconnecting(login: &str) -> Options {
    Options::new().login(login).reconnect(Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(400),
        max_attempts: None,
    })
}

/// A TLS terminator in front of `target`, with a fresh self-signed certificate for
/// `localhost`; returns its address and the certificate to trust.
async fn tls_proxy(target: SocketAddr) -> (SocketAddr, Vec<u8>) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = CertificateDer::from(certified.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(socket).await else {
                    return;
                };
                let Ok(mut upstream) = TcpStream::connect(target).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
            });
        }
    });
    (addr, cert.to_vec())
}

async fn round_trip(url: &str, options: Options) {
    let client = Client::connect(url, options.login("round-trip"))
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let mut room = client
        .subscribe("/topic/room.trips", SubscribeOptions::new())
        .await
        .unwrap();
    let join = room.next().await.unwrap();
    assert_eq!(join.header("x-event"), Some("join"), "{url}");
    let receipt = client
        .send_with_receipt("/topic/room.trips", "안녕, 세계")
        .await
        .unwrap();
    let message = room.next().await.unwrap();
    assert_eq!(message.text(), "안녕, 세계");
    assert_eq!(message.header("x-sender"), Some("round-trip"));
    assert_eq!(
        receipt.header("x-seq"),
        message.header("x-seq"),
        "the receipt names the seq"
    );
    assert_eq!(receipt.header("message-id"), message.header("message-id"));
    room.unsubscribe().await.unwrap();
    client.disconnect().await.unwrap();
}

#[tokio::test]
async fn every_transport_round_trips() {
    let broker = Broker::start(&[]);
    round_trip(&broker.ws_url(), Options::new()).await;
    round_trip(&format!("tcp://{}", broker.stomp), Options::new()).await;
    let (tls_stomp, cert) = tls_proxy(broker.stomp).await;
    round_trip(
        &format!("tcp+tls://localhost:{}", tls_stomp.port()),
        Options::new().trust_der(cert),
    )
    .await;
    let (tls_http, cert) = tls_proxy(broker.http).await;
    round_trip(
        &format!("wss://localhost:{}/ws", tls_http.port()),
        Options::new().trust_der(cert.clone()),
    )
    .await;
    // An untrusted certificate is refused.
    let err = Client::connect(
        &format!("wss://localhost:{}/ws", tls_http.port()),
        Options::new(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ClientError::Tls(_)), "{err}");
}

#[tokio::test]
async fn versions_are_negotiated() {
    let broker = Broker::start(&[]);
    for version in stomp_codec::Version::ALL {
        let client = Client::connect(&broker.ws_url(), Options::new().versions(&[version]))
            .await
            .unwrap();
        assert_eq!(client.connected().version, version);
        let mut sub = client
            .subscribe("/topic/versions", SubscribeOptions::new())
            .await
            .unwrap();
        client
            .send_with_receipt("/topic/versions", "x")
            .await
            .unwrap();
        assert_eq!(sub.next().await.unwrap().text(), "x");
    }
}

#[tokio::test]
async fn transactions_commit_and_abort() {
    let broker = Broker::start(&[]);
    let client = Client::connect(&format!("tcp://{}", broker.stomp), Options::new())
        .await
        .unwrap();
    let mut sub = client
        .subscribe("/topic/tx", SubscribeOptions::new())
        .await
        .unwrap();
    let tx = client.begin().await.unwrap();
    tx.send("/topic/tx", "held").await.unwrap();
    client
        .send_with_receipt("/topic/tx", "marker")
        .await
        .unwrap();
    assert_eq!(
        sub.next().await.unwrap().text(),
        "marker",
        "the held message is not out yet"
    );
    tx.commit().await.unwrap();
    assert_eq!(sub.next().await.unwrap().text(), "held");
    let tx = client.begin().await.unwrap();
    tx.send("/topic/tx", "aborted").await.unwrap();
    tx.abort().await.unwrap();
    client
        .send_with_receipt("/topic/tx", "after")
        .await
        .unwrap();
    assert_eq!(sub.next().await.unwrap().text(), "after");
}

#[tokio::test]
async fn acks_and_nacks_in_every_version() {
    let broker = Broker::start(&[]);
    for version in stomp_codec::Version::ALL {
        let client = Client::connect(&broker.ws_url(), Options::new().versions(&[version]))
            .await
            .unwrap();
        let mut sub = client
            .subscribe(
                "/topic/acks",
                SubscribeOptions::new().ack("client-individual"),
            )
            .await
            .unwrap();
        for i in 0..3 {
            client.send("/topic/acks", format!("m{i}")).await.unwrap();
        }
        let messages = [
            sub.next().await.unwrap(),
            sub.next().await.unwrap(),
            sub.next().await.unwrap(),
        ];
        client.ack(&messages[1]).await.unwrap();
        if version != stomp_codec::Version::V1_0 {
            client.nack(&messages[0]).await.unwrap();
        }
        let tx = client.begin().await.unwrap();
        tx.ack(&messages[2]).await.unwrap();
        tx.commit().await.unwrap();
        // Acking a settled message is the broker's error, surfaced as such.
        let err = client.ack(&messages[1]).await.unwrap_err();
        assert!(
            matches!(&err, ClientError::Broker { message, .. } if message.contains("no unacknowledged message")),
            "{err}"
        );
    }
}

#[tokio::test]
async fn reconnecting_resubscribes_and_a_room_loses_nothing() {
    let mut broker = Broker::start(&[]);
    let options = reconnecting("survivor");
    let client = Client::connect(&broker.ws_url(), options).await.unwrap();
    let (mut room, mut topic) = room_and_topic(&client, "resume").await;
    for i in 1..=3 {
        client
            .send_with_receipt("/topic/room.resume", format!("before {i}"))
            .await
            .unwrap();
        assert_eq!(room.next().await.unwrap().text(), format!("before {i}"));
    }
    // The broker goes away, and is back on the same addresses with the same data. A
    // graceful stop: after `kill -9` the last messages may not be committed yet and their
    // `x-seq` numbers may repeat (PROTOCOL.md, "Keeping"), which is the crash tests'
    // subject; this one is about the client's reconnection.
    broker.terminate();
    let broker = Broker::restart_of(&mut broker, &[]);
    // Someone talks in the room at once: the client may or may not be back yet.
    let mut other = Conn::open(&broker, Transport::Tcp).await;
    other.login("other").await;
    for i in 1..=2 {
        let send = frame("SEND", &[("destination", "/topic/room.resume")])
            .with_body(format!("while away {i}"));
        other.send_with_receipt(&send, &format!("w{i}")).await;
    }
    // Everything after what the client had, once, in order: the messages sent while it
    // was away (replayed through x-since or live), its own rejoin notice somewhere among
    // them, and nothing it had seen before.
    let mut bodies = Vec::new();
    while bodies.len() < 2 {
        let m = tokio::time::timeout(WAIT, room.next())
            .await
            .unwrap()
            .unwrap();
        if m.header("x-event").is_none() {
            bodies.push(m.text());
        }
    }
    assert_eq!(bodies, ["while away 1", "while away 2"]);
    // The receipt of anything sent now also confirms the resubscriptions, sent earlier on
    // the same connection; then the plain topic works again.
    client
        .send_with_receipt("/topic/plain", "back")
        .await
        .unwrap();
    assert_eq!(
        tokio::time::timeout(WAIT, topic.next())
            .await
            .unwrap()
            .unwrap()
            .text(),
        "back"
    );
}

#[tokio::test]
async fn a_room_forgotten_while_the_client_was_away_is_followed_from_its_new_numbers() {
    let mut broker = Broker::start(&[]);
    let options = reconnecting("returner");
    let client = Client::connect(&broker.ws_url(), options).await.unwrap();
    let mut room = client
        .subscribe("/topic/room.gone", SubscribeOptions::new())
        .await
        .unwrap();
    assert_eq!(room.next().await.unwrap().header("x-event"), Some("join"));
    for i in 1..=3 {
        client
            .send_with_receipt("/topic/room.gone", format!("old {i}"))
            .await
            .unwrap();
        assert_eq!(room.next().await.unwrap().text(), format!("old {i}"));
    }
    // Back with a history cap no message fits in: the room keeps nothing, so it is
    // forgotten, and numbers from 1 again, below the 4 the client saw.
    broker.terminate();
    let broker = Broker::restart_of(&mut broker, &["--room-history-bytes", "1"]);
    let mut gap = None;
    loop {
        let m = tokio::time::timeout(WAIT, room.next())
            .await
            .unwrap()
            .unwrap();
        match m.header("x-event") {
            Some("gap") => gap = m.header("x-first-seq").map(str::to_owned),
            // Its own join notice, numbered 1 in the room's new life: delivered, not
            // skipped as "already seen".
            Some("join") => {
                assert_eq!(m.header("x-seq"), Some("1"));
                break;
            }
            other => panic!("unexpected {other:?}: {}", m.text()),
        }
    }
    assert_eq!(
        gap.as_deref(),
        Some("1"),
        "the gap notice said where it starts"
    );
    let mut other = Conn::open(&broker, Transport::Tcp).await;
    other.login("other").await;
    let send = frame("SEND", &[("destination", "/topic/room.gone")]).with_body("new 1");
    other.send_with_receipt(&send, "n1").await;
    let m = tokio::time::timeout(WAIT, room.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (m.text(), m.header("x-seq")),
        ("new 1".to_owned(), Some("2"))
    );
}

#[tokio::test]
async fn a_broker_that_stops_beating_is_detected() {
    // A fake broker: CONNECTED with 100 ms heart-beats, then silence.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut connect = [0u8; 1024];
        let _ = socket.read(&mut connect).await.unwrap();
        socket
            .write_all(b"CONNECTED\nversion:1.2\nheart-beat:100,100\n\n\0")
            .await
            .unwrap();
        let mut sink = [0u8; 1024];
        while let Ok(n) = socket.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    });
    let options = Options::new()
        .heart_beat(100, 100)
        .timeout(Duration::from_secs(5));
    let client = Client::connect(&format!("tcp://{addr}"), options)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let err = client
        .send_with_receipt("/topic/a", "anyone there?")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Protocol(m) if m.contains("no heart-beat")),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "detected after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn errors_are_typed() {
    let err = Client::connect("tcp://127.0.0.1:1", Options::new())
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::ConnectionRefused(_)), "{err}");
    let err = Client::connect("http://127.0.0.1:1", Options::new())
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::InvalidUrl(_)), "{err}");
    let broker = Broker::start(&[]);
    let err = Client::connect(&broker.ws_url(), Options::new().login("no/slash"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Broker { message, .. } if message.contains("invalid login")),
        "{err}"
    );
    let client = Client::connect(&broker.ws_url(), Options::new())
        .await
        .unwrap();
    let err = client
        .send_with_receipt("/topic/room.bad name", "x")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Broker { message, .. } if message.contains("room name")),
        "{err}"
    );
    let err = client.send("/topic/a", "x").await.unwrap_err();
    assert!(
        matches!(err, ClientError::Closed),
        "after an ERROR without reconnection: {err}"
    );
}

#[tokio::test]
async fn the_client_works_against_rabbitmq() {
    let Some((tcp, ws)) = integration_tests::rabbitmq() else {
        return;
    };
    let guest = || Options::new().login("guest").passcode("guest");
    for url in [&tcp, &ws] {
        let client = Client::connect(url, guest())
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        let mut sub = client
            .subscribe("/topic/stoa-client.test", SubscribeOptions::new())
            .await
            .unwrap();
        client
            .send_with_receipt("/topic/stoa-client.test", "hello rabbit")
            .await
            .unwrap();
        assert_eq!(
            tokio::time::timeout(WAIT, sub.next())
                .await
                .unwrap()
                .unwrap()
                .text(),
            "hello rabbit"
        );
        let tx = client.begin().await.unwrap();
        tx.send("/topic/stoa-client.test", "in a transaction")
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(
            tokio::time::timeout(WAIT, sub.next())
                .await
                .unwrap()
                .unwrap()
                .text(),
            "in a transaction"
        );
        client.disconnect().await.unwrap();
    }
}

/// A loopback address where nothing listens (bound, then let go).
async fn dead_address() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test]
async fn of_several_urls_the_first_that_answers_is_used() {
    let broker = Broker::start(&[]);
    let dead = dead_address().await;
    let urls = [format!("tcp://{dead}"), broker.ws_url()];
    let client = Client::connect_any(
        &urls.iter().map(String::as_str).collect::<Vec<_>>(),
        Options::new().login("patient"),
    )
    .await
    .unwrap();
    assert_eq!(
        client
            .connected()
            .headers
            .get("user-name")
            .map(String::as_str),
        Some("patient")
    );
    client
        .send_with_receipt("/topic/t.any", "through the second")
        .await
        .unwrap();
    // None answering: the last one's failure, and no URL at all is an error too.
    let err = Client::connect_any(&[&format!("tcp://{dead}")], Options::new())
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::ConnectionRefused(_)), "{err:?}");
    let err = Client::connect_any(&[], Options::new()).await.unwrap_err();
    assert!(matches!(err, ClientError::InvalidUrl(_)), "{err:?}");
}

#[tokio::test]
async fn a_lost_connection_fails_over_to_the_next_url_and_subscribes_again() {
    let mut first = Broker::start(&[]);
    let second = Broker::start(&[]);
    let options = reconnecting("nomad");
    let urls = [first.ws_url(), format!("tcp://{}", second.stomp)];
    let client = Client::connect_any(
        &urls.iter().map(String::as_str).collect::<Vec<_>>(),
        options,
    )
    .await
    .unwrap();
    let (mut room, mut topic) = room_and_topic(&client, "travel").await;
    client
        .send_with_receipt("/topic/room.travel", "on the first")
        .await
        .unwrap();
    assert_eq!(room.next().await.unwrap().text(), "on the first");

    // The first node dies; the client moves to the second and subscribes there again: the
    // second node's room, which numbered nothing yet, says so (a gap notice for the
    // x-since it was asked) and then posts the rejoin.
    first.kill();
    let rejoined = tokio::time::timeout(WAIT, async {
        loop {
            let m = room.next().await.unwrap();
            if m.header("x-event") == Some("join") {
                return m;
            }
            assert_eq!(
                m.header("x-event"),
                Some("gap"),
                "only a gap notice before the rejoin: {m:?}"
            );
        }
    })
    .await
    .unwrap();
    assert_eq!(rejoined.header("x-sender"), Some("nomad"));
    // Both subscriptions live on the second node now.
    let mut other = Conn::open(&second, Transport::Tcp).await;
    other.login("local").await;
    let send = frame("SEND", &[("destination", "/topic/plain")]).with_body("on the second");
    other.send_with_receipt(&send, "p").await;
    let got = tokio::time::timeout(WAIT, topic.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.text(), "on the second");
    client
        .send_with_receipt("/topic/room.travel", "still talking")
        .await
        .unwrap();
    let echoed = tokio::time::timeout(WAIT, room.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(echoed.text(), "still talking");
}

#[tokio::test]
async fn after_a_reconnect_subscriptions_are_made_again_in_the_order_they_were_made() {
    let mut first = Broker::start(&[]);
    let second = Broker::start(&[]);
    let urls = [first.ws_url(), format!("tcp://{}", second.stomp)];
    let client = Client::connect_any(
        &urls.iter().map(String::as_str).collect::<Vec<_>>(),
        reconnecting("orderly"),
    )
    .await
    .unwrap();
    let topics: Vec<String> = (0..8).map(|n| format!("/topic/order.{n}")).collect();
    let mut subscriptions = Vec::new();
    for topic in &topics {
        subscriptions.push(
            client
                .subscribe(topic, SubscribeOptions::new())
                .await
                .unwrap(),
        );
    }
    first.kill();
    // The second broker's dashboard lists the session's subscriptions in the order its
    // SUBSCRIBE frames came.
    let deadline = std::time::Instant::now() + WAIT;
    let made = loop {
        let (status, body) = second.http_get("/admin/api/overview").await;
        assert_eq!(status, 200, "{body}");
        let view: serde_json::Value = serde_json::from_str(&body).unwrap();
        let made: Vec<String> = view["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["user"] == "orderly")
            .flat_map(|s| s["subscriptions"].as_array().cloned().unwrap_or_default())
            .map(|d| d.as_str().unwrap_or_default().to_owned())
            .collect();
        if made.len() == topics.len() {
            break made;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not resubscribed in time: {made:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(made, topics);
}
