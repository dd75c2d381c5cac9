//! Direct messages across nodes (`../shared/design/cluster.md`, "Direct messages"): a DM
//! reaches its user's sessions on every node; while the user has none anywhere, it waits
//! in Redis and goes once to the first subscription on any node. Three `stoa` nodes share
//! Debian's `redis-server`, started here on a free port.

// Test code: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use integration_tests::{Broker, Conn, Event, Redis, frame};

const WAIT: Duration = Duration::from_secs(20);

fn node(redis: &Redis, name: &str, extra: &[&str]) -> Broker {
    Broker::cluster_node(redis, name, 3000, extra)
}

/// `user` on `broker`, subscribed to `/user/queue/dm`; what came before the RECEIPT.
async fn inbox(broker: &Broker, user: &str) -> (Conn, Vec<String>) {
    let mut conn = Conn::open_as(broker, user).await;
    let sub = frame(
        "SUBSCRIBE",
        &[("id", "dm"), ("destination", "/user/queue/dm")],
    );
    let early = conn.send_with_receipt(&sub, "in").await;
    (conn, early.iter().map(body).collect())
}

fn body(f: &stomp_codec::Frame) -> String {
    assert_eq!(f.command.as_str(), "MESSAGE", "{f:?}");
    assert_eq!(f.header("destination"), Some("/user/queue/dm"));
    String::from_utf8(f.body.to_vec()).unwrap()
}

fn dm(to: &str, text: &str) -> stomp_codec::Frame {
    frame("SEND", &[("destination", &format!("/user/{to}/queue/dm"))]).with_body(text.to_owned())
}

/// Reads `n` messages.
async fn read(conn: &mut Conn, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    while got.len() < n {
        match conn.next_event_within(WAIT).await {
            Some(Event::Frame(f)) => got.push(body(&f)),
            other => panic!("after {got:?}: {other:?}"),
        }
    }
    got
}

#[tokio::test]
async fn a_direct_message_reaches_every_session_of_its_user_on_every_node_once_in_order() {
    let redis = Redis::start();
    let a = node(&redis, "node-a", &[]);
    let b = node(&redis, "node-b", &[]);
    let c = node(&redis, "node-c", &[]);
    let (mut bob_a, _) = inbox(&a, "bob").await;
    let (mut bob_b, _) = inbox(&b, "bob").await;
    let mut alice = Conn::open_as(&c, "alice").await;
    let sent: Vec<String> = (1..=20).map(|i| format!("dm {i}")).collect();
    for text in &sent {
        alice.send_with_receipt(&dm("bob", text), text).await;
    }
    assert_eq!(read(&mut bob_a, 20).await, sent);
    assert_eq!(read(&mut bob_b, 20).await, sent);
    assert!(
        bob_a.is_quiet_for(Duration::from_millis(300)).await,
        "each once"
    );
}

#[tokio::test]
async fn direct_messages_wait_in_redis_and_go_once_to_the_first_subscription_on_any_node() {
    let redis = Redis::start();
    let a = node(&redis, "node-a", &[]);
    let b = node(&redis, "node-b", &[]);
    let c = node(&redis, "node-c", &[]);
    let mut alice = Conn::open_as(&a, "alice").await;
    let sent: Vec<String> = (1..=5).map(|i| format!("while away {i}")).collect();
    for text in &sent {
        // The RECEIPT comes once Redis keeps it.
        alice.send_with_receipt(&dm("carol", text), text).await;
    }
    let (mut first, early) = inbox(&b, "carol").await;
    let mut got = early;
    got.extend(read(&mut first, sent.len() - got.len()).await);
    assert_eq!(got, sent);
    // A second session, on another node: nothing of what waited.
    let (mut second, early) = inbox(&c, "carol").await;
    assert!(early.is_empty(), "{early:?}");
    assert!(second.is_quiet_for(Duration::from_millis(300)).await);
    // Live ones go to both.
    alice.send_with_receipt(&dm("carol", "live"), "live").await;
    assert_eq!(read(&mut first, 1).await, ["live"]);
    assert_eq!(read(&mut second, 1).await, ["live"]);
}

#[tokio::test]
async fn a_dead_node_s_subscriptions_stop_counting_and_messages_wait_for_the_user() {
    let redis = Redis::start();
    let mut a = node(&redis, "node-a", &[]);
    let b = node(&redis, "node-b", &[]);
    let (_dave, _) = inbox(&a, "dave").await;
    a.kill();
    let mut alice = Conn::open_as(&b, "alice").await;
    // Once node a is declared dead (its heartbeat expires after 3 s), DMs to dave wait:
    // probe until a DM is kept rather than published to nobody.
    let deadline = Instant::now() + WAIT;
    let mut n = 0;
    loop {
        n += 1;
        let text = format!("probe {n}");
        alice.send_with_receipt(&dm("dave", &text), &text).await;
        let waiting = redis_llen(&redis, "stoa:dm:dave/dm").await;
        if waiting > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "DMs to dave never waited");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    alice.send_with_receipt(&dm("dave", "kept"), "kept").await;
    let (mut dave, early) = inbox(&b, "dave").await;
    let mut got = early;
    got.extend(read(&mut dave, 2 - got.len().min(2)).await);
    assert_eq!(got, [format!("probe {n}"), "kept".to_owned()]);
}

#[tokio::test]
async fn a_full_user_queue_across_nodes_ends_the_sender_with_an_error() {
    let redis = Redis::start();
    let a = node(&redis, "node-a", &["--user-queue-limit", "2"]);
    let mut alice = Conn::open_as(&a, "alice").await;
    alice.send_with_receipt(&dm("erin", "1"), "r1").await;
    alice.send_with_receipt(&dm("erin", "2"), "r2").await;
    let mut third = dm("erin", "3");
    third.headers.push("receipt", "r3");
    alice.send(&third).await;
    let error = alice.expect_frame().await;
    assert_eq!(error.command.as_str(), "ERROR", "{error:?}");
    assert!(
        error.header("message").unwrap().contains("user queue full"),
        "{error:?}"
    );
    alice.expect_closed().await;
    let (mut erin, early) = inbox(&a, "erin").await;
    let mut got = early;
    got.extend(read(&mut erin, 2 - got.len().min(2)).await);
    assert_eq!(got, ["1", "2"], "the refused one was not kept");
}

/// `LLEN key` asked of Redis directly.
async fn redis_llen(redis: &Redis, key: &str) -> i64 {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", redis.port))
        .await
        .unwrap();
    let command = format!("*2\r\n$4\r\nLLEN\r\n${}\r\n{key}\r\n", key.len());
    socket.write_all(command.as_bytes()).await.unwrap();
    let mut line = String::new();
    BufReader::new(socket).read_line(&mut line).await.unwrap();
    line.trim().trim_start_matches(':').parse().unwrap()
}
