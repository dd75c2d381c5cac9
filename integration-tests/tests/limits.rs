//! Where connections may come from, and how many (`../shared/design/security.md`):
//! `--allowed-origins`, `--max-connections`, `--max-connections-per-ip`, and the send rate.

// Test code: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use integration_tests::{Broker, Conn, Transport, WAIT, frame};
use tokio_tungstenite::tungstenite;

/// The status a WebSocket upgrade got when it was refused.
async fn upgrade_status(url: &str, headers: &[(&str, &str)]) -> Option<u16> {
    match Conn::try_ws(url, Some("v12.stomp"), headers).await {
        Ok(_) => None,
        Err(tungstenite::Error::Http(response)) => Some(response.status().as_u16()),
        Err(e) => panic!("the upgrade failed otherwise: {e}"),
    }
}

#[tokio::test]
async fn browser_pages_of_other_origins_are_refused_before_the_upgrade() {
    let broker = Broker::start(&[
        "--allowed-origins",
        "https://chat.example.com,http://localhost:3000",
    ]);
    let url = broker.ws_url();
    let own = format!("http://{}", broker.http);
    assert_eq!(
        upgrade_status(&url, &[]).await,
        None,
        "no Origin: no browser"
    );
    assert_eq!(
        upgrade_status(&url, &[("Origin", &own)]).await,
        None,
        "its own page"
    );
    assert_eq!(
        upgrade_status(&url, &[("Origin", "https://chat.example.com")]).await,
        None
    );
    assert_eq!(
        upgrade_status(&url, &[("Origin", "http://localhost:3000")]).await,
        None
    );
    for evil in [
        "https://evil.example",
        "null",
        "http://localhost:3001",
        "https://chat.example.com.evil.example",
    ] {
        assert_eq!(
            upgrade_status(&url, &[("Origin", evil)]).await,
            Some(403),
            "{evil}"
        );
    }
    // The default: the broker's own origin only.
    let strict = Broker::start(&[]);
    let own = format!("http://{}", strict.http);
    assert_eq!(
        upgrade_status(&strict.ws_url(), &[("Origin", &own)]).await,
        None
    );
    assert_eq!(
        upgrade_status(&strict.ws_url(), &[("Origin", "https://chat.example.com")]).await,
        Some(403)
    );
    let anyone = Broker::start(&["--allowed-origins", "*"]);
    assert_eq!(
        upgrade_status(&anyone.ws_url(), &[("Origin", "https://evil.example")]).await,
        None
    );
}

/// Opens connections until one is admitted again (a closed one's place comes back when
/// the broker has seen it go), within [`WAIT`].
async fn admitted_again(broker: &Broker) -> Conn {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut c = Conn::open(broker, Transport::Tcp).await;
        c.send(&frame(
            "CONNECT",
            &[("accept-version", "1.2"), ("login", "late")],
        ))
        .await;
        let reply = c.expect_frame().await;
        if reply.command.as_str() == "CONNECTED" {
            return c;
        }
        assert!(Instant::now() < deadline, "never admitted again: {reply:?}");
    }
}

#[tokio::test]
async fn past_max_connections_websocket_gets_503_and_tcp_an_error_and_nobody_is_dropped() {
    let broker = Broker::start(&["--max-connections", "2"]);
    let mut first = Conn::open(&broker, Transport::Ws).await;
    first.login("first").await;
    let mut second = Conn::open(&broker, Transport::Tcp).await;
    second.login("second").await;
    assert_eq!(upgrade_status(&broker.ws_url(), &[]).await, Some(503));
    let mut third = Conn::tcp(broker.stomp).await;
    third.expect_error_then_close("server busy").await;
    // The two admitted are still served.
    first.subscribe("0", "/topic/still").await;
    second.subscribe("0", "/topic/still").await;
    // One leaves: its place is taken again.
    first.close().await;
    admitted_again(&broker).await;
}

#[tokio::test]
async fn past_max_connections_per_ip_that_address_is_refused_and_others_are_not() {
    let broker = Broker::start(&["--max-connections-per-ip", "2"]);
    let here: std::net::IpAddr = [127, 0, 0, 9].into();
    let mut kept = Vec::new();
    for _ in 0..2 {
        let mut c = Conn::tcp_from(here, broker.stomp).await;
        c.login("here").await;
        kept.push(c);
    }
    let mut over = Conn::tcp_from(here, broker.stomp).await;
    over.expect_error_then_close("server busy").await;
    let mut elsewhere = Conn::tcp_from([127, 0, 0, 10].into(), broker.stomp).await;
    elsewhere.login("elsewhere").await;
}

#[tokio::test]
async fn a_connection_over_its_send_rate_is_slowed_not_refused_and_others_are_not() {
    let broker = Broker::start(&["--max-send-rate", "20", "--max-send-burst", "5"]);
    let mut reader = Conn::open(&broker, Transport::Ws).await;
    reader.login("reader").await;
    reader.subscribe("0", "/topic/rated").await;
    let mut fast = Conn::open(&broker, Transport::Tcp).await;
    fast.login("fast").await;
    // 45 SENDs at once: 5 go at once, the other 40 at 20 a second.
    let started = Instant::now();
    let mut input = Vec::new();
    for n in 0..45 {
        input.extend(format!("SEND\ndestination:/topic/rated\n\n{n}\0").into_bytes());
    }
    fast.send_raw(&input).await;
    // Meanwhile another connection is served at once.
    let mut other = Conn::open(&broker, Transport::Tcp).await;
    other.login("other").await;
    let bystander_started = Instant::now();
    for i in 0..5 {
        let send = frame("SEND", &[("destination", "/topic/other")]).with_body("x");
        other.send_with_receipt(&send, &format!("o{i}")).await;
    }
    assert!(
        bystander_started.elapsed() < Duration::from_secs(1),
        "another connection waited {:?}",
        bystander_started.elapsed()
    );
    for n in 0..45 {
        let got = reader.expect_frame().await;
        assert_eq!(
            got.body,
            n.to_string().as_bytes(),
            "nothing dropped, in order"
        );
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900),
        "45 SENDs at 20/s after a burst of 5 took only {took:?}"
    );
}
