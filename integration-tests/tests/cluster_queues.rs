//! Durable queues across nodes (`../shared/design/cluster.md`, "Durable queues"): kept in
//! Redis, each message to one consumer in the cluster, ACK, NACK, prefetch, transactions,
//! and a dead or stopped node's unacknowledged messages redelivered elsewhere with
//! `redelivered:true`. Nodes share Debian's `redis-server`, started here on a free port.

// Test code: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use integration_tests::{Broker, Conn, Event, Redis, frame};
use stomp_codec::Frame;

const WAIT: Duration = Duration::from_secs(20);
const NODE_TIMEOUT_MS: u64 = 3000;

fn node(redis: &Redis, name: &str, extra: &[&str]) -> Broker {
    Broker::cluster_node(redis, name, NODE_TIMEOUT_MS, extra)
}

fn job(text: &str) -> Frame {
    frame("SEND", &[("destination", "/queue/jobs")]).with_body(text.to_owned())
}

/// A consumer of /queue/jobs on `broker` in `ack` mode with `prefetch`.
async fn consumer(broker: &Broker, name: &str, ack: &str, prefetch: &str) -> Conn {
    let mut conn = Conn::open_as(broker, name).await;
    let sub = frame(
        "SUBSCRIBE",
        &[
            ("id", "q"),
            ("destination", "/queue/jobs"),
            ("ack", ack),
            ("prefetch-count", prefetch),
        ],
    );
    let early = conn.send_with_receipt(&sub, "subscribed").await;
    assert!(early.is_empty(), "{early:?}");
    conn
}

/// The next MESSAGE within `wait`, or `None`.
async fn next_message(conn: &mut Conn, wait: Duration) -> Option<Frame> {
    match conn.next_event_within(wait).await {
        Some(Event::Frame(f)) => {
            assert_eq!(f.command.as_str(), "MESSAGE", "{f:?}");
            Some(f)
        }
        _ => None,
    }
}

fn body(f: &Frame) -> String {
    String::from_utf8(f.body.to_vec()).unwrap()
}

/// `GET /api/queues`' entry for `jobs`: (ready, unacked, consumers).
async fn jobs_stats(broker: &Broker) -> (u64, u64, u64) {
    let (status, text) = broker.http_get("/api/queues").await;
    assert_eq!(status, 200, "{text}");
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let jobs = json["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "jobs")
        .cloned()
        .unwrap_or_else(|| serde_json::json!({"ready": 0, "unacked": 0, "consumers": 0}));
    (
        jobs["ready"].as_u64().unwrap(),
        jobs["unacked"].as_u64().unwrap(),
        jobs["consumers"].as_u64().unwrap(),
    )
}

#[tokio::test]
async fn each_message_goes_to_one_consumer_in_the_cluster_and_the_counts_are_cluster_wide() {
    let redis = Redis::start();
    let a = node(&redis, "node-a", &[]);
    let b = node(&redis, "node-b", &[]);
    let c = node(&redis, "node-c", &[]);
    let mut producer = Conn::open_as(&a, "producer").await;
    let sent: BTreeSet<String> = (1..=30).map(|i| format!("job {i:02}")).collect();
    for text in &sent {
        // The RECEIPT comes once Redis keeps it.
        producer.send_with_receipt(&job(text), text).await;
    }
    assert_eq!(jobs_stats(&c).await, (30, 0, 0));
    let mut first = consumer(&b, "first", "client-individual", "5").await;
    let mut second = consumer(&c, "second", "client-individual", "5").await;
    let mut got = Vec::new();
    let deadline = Instant::now() + WAIT;
    while got.len() < 30 {
        assert!(Instant::now() < deadline, "only {got:?}");
        for conn in [&mut first, &mut second] {
            if let Some(m) = next_message(conn, Duration::from_millis(50)).await {
                let ack = frame("ACK", &[("id", m.header("ack").unwrap())]);
                conn.send(&ack).await;
                got.push(body(&m));
            }
        }
    }
    let unique: BTreeSet<String> = got.iter().cloned().collect();
    assert_eq!(unique.len(), got.len(), "each message once: {got:?}");
    assert_eq!(unique, sent);
    let deadline = Instant::now() + WAIT;
    loop {
        let stats = jobs_stats(&a).await;
        if stats == (0, 0, 2) {
            break;
        }
        assert!(Instant::now() < deadline, "still {stats:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_killed_node_s_unacknowledged_messages_go_to_a_consumer_elsewhere_marked_redelivered() {
    let redis = Redis::start();
    let mut a = node(&redis, "node-a", &[]);
    let b = node(&redis, "node-b", &[]);
    let mut holder = consumer(&a, "holder", "client", "10").await;
    let mut producer = Conn::open_as(&b, "producer").await;
    for i in 1..=3 {
        producer
            .send_with_receipt(&job(&format!("held {i}")), &format!("r{i}"))
            .await;
    }
    for i in 1..=3 {
        let m = next_message(&mut holder, WAIT).await.unwrap();
        assert_eq!(body(&m), format!("held {i}"));
    }
    let mut other = consumer(&b, "other", "client-individual", "10").await;
    assert!(
        next_message(&mut other, Duration::from_millis(300))
            .await
            .is_none()
    );
    a.kill();
    let killed = Instant::now();
    let mut again = Vec::new();
    while again.len() < 3 {
        let m = next_message(&mut other, WAIT)
            .await
            .expect("redelivered in time");
        assert_eq!(m.header("redelivered"), Some("true"), "{m:?}");
        again.push(body(&m));
        other
            .send(&frame("ACK", &[("id", m.header("ack").unwrap())]))
            .await;
    }
    assert!(
        killed.elapsed() < Duration::from_millis(NODE_TIMEOUT_MS + 2000),
        "{:?}",
        killed.elapsed()
    );
    assert_eq!(again, ["held 1", "held 2", "held 3"], "in order, once each");
    assert!(
        next_message(&mut other, Duration::from_millis(300))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn a_stopping_node_hands_back_what_its_consumers_held_at_once() {
    let redis = Redis::start();
    let mut a = node(&redis, "node-a", &[]);
    let b = node(&redis, "node-b", &[]);
    let mut holder = consumer(&a, "holder", "client-individual", "10").await;
    let mut producer = Conn::open_as(&b, "producer").await;
    producer.send_with_receipt(&job("one"), "r1").await;
    producer.send_with_receipt(&job("two"), "r2").await;
    next_message(&mut holder, WAIT).await.unwrap();
    next_message(&mut holder, WAIT).await.unwrap();
    let mut other = consumer(&b, "other", "client-individual", "10").await;
    assert!(a.terminate().success());
    let stopped = Instant::now();
    let first = next_message(&mut other, WAIT).await.unwrap();
    let second = next_message(&mut other, WAIT).await.unwrap();
    assert_eq!(
        (body(&first), body(&second)),
        ("one".to_owned(), "two".to_owned())
    );
    assert_eq!(first.header("redelivered"), Some("true"));
    // Handed back on the way out, not when the node time-out passed.
    assert!(
        stopped.elapsed() < Duration::from_millis(NODE_TIMEOUT_MS),
        "{:?}",
        stopped.elapsed()
    );
}

#[tokio::test]
async fn nack_transactions_and_a_full_queue_work_across_nodes() {
    let redis = Redis::start();
    let a = node(&redis, "node-a", &["--queue-max-messages", "3"]);
    let b = node(&redis, "node-b", &[]);
    let mut worker = consumer(&b, "worker", "client-individual", "1").await;
    let mut producer = Conn::open_as(&a, "producer").await;
    // A transaction's SENDs go at COMMIT, and its RECEIPT once Redis kept both.
    producer
        .send_with_receipt(&frame("BEGIN", &[("transaction", "t1")]), "b1")
        .await;
    for text in ["t-first", "t-second"] {
        let mut f = job(text);
        f.headers.push("transaction", "t1");
        producer.send(&f).await;
    }
    assert!(
        next_message(&mut worker, Duration::from_millis(300))
            .await
            .is_none()
    );
    producer
        .send_with_receipt(&frame("COMMIT", &[("transaction", "t1")]), "c1")
        .await;
    let m = next_message(&mut worker, WAIT).await.unwrap();
    assert_eq!(body(&m), "t-first");
    // prefetch 1: nothing more until this one is settled. A NACK puts it back first.
    assert!(
        next_message(&mut worker, Duration::from_millis(300))
            .await
            .is_none()
    );
    worker
        .send(&frame("NACK", &[("id", m.header("ack").unwrap())]))
        .await;
    let again = next_message(&mut worker, WAIT).await.unwrap();
    assert_eq!(
        (body(&again).as_str(), again.header("redelivered")),
        ("t-first", Some("true"))
    );
    // Held: t-first (unacked), t-second (ready); the limit is 3.
    producer.send_with_receipt(&job("third"), "r3").await;
    let mut f = job("fourth");
    f.headers.push("receipt", "r4");
    producer.send(&f).await;
    let error = producer.expect_frame().await;
    assert_eq!(error.command.as_str(), "ERROR", "{error:?}");
    assert!(
        error.header("message").unwrap().contains("queue full"),
        "{error:?}"
    );
}

#[tokio::test]
async fn an_operator_purges_a_shared_queue_from_any_node() {
    let redis = Redis::start();
    let a = node(&redis, "a", &[]);
    let b = node(&redis, "b", &[]);
    let mut producer = Conn::open_as(&a, "producer").await;
    for n in 0..3 {
        producer
            .send_with_receipt(&job("old"), &format!("j{n}"))
            .await;
    }
    // Node b purges what node a put: Redis keeps it.
    let (status, _, answer) = b
        .http_request("POST", "/admin/api/queues/jobs/purge", &[])
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&answer).unwrap()["purged"],
        3
    );
    assert_eq!(jobs_stats(&a).await, (0, 0, 0));
    let (status, _, _) = b
        .http_request("POST", "/admin/api/queues/nothing/purge", &[])
        .await;
    assert_eq!(status, 404);
    producer.send_with_receipt(&job("new"), "j-new").await;
    let mut worker = consumer(&b, "worker", "client-individual", "10").await;
    let first = next_message(&mut worker, WAIT).await.unwrap();
    assert_eq!(body(&first), "new");
}
