//! Durable queues through the project's client and raw frames: round robin, waiting,
//! acknowledgement modes, redelivery, prefetch, transactions, limits, stats, restarts.

// Test code: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use client::{Client, Message, Options, SubscribeOptions};
use futures_util::StreamExt;
use integration_tests::{Broker, Conn, Transport, frame};

const WAIT: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(300);

async fn connect(broker: &Broker, login: &str) -> Client {
    Client::connect(
        &format!("tcp://{}", broker.stomp),
        Options::new().login(login),
    )
    .await
    .unwrap()
}

async fn next(sub: &mut client::Subscription) -> Message {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap()
        .unwrap()
}

async fn fill(client: &Client, queue: &str, bodies: impl IntoIterator<Item = String>) {
    for body in bodies {
        client.send_with_receipt(queue, body).await.unwrap();
    }
}

#[tokio::test]
async fn each_message_goes_to_one_consumer_round_robin() {
    let broker = Broker::start(&[]);
    let a = connect(&broker, "a").await;
    let b = connect(&broker, "b").await;
    let mut sa = a
        .subscribe("/queue/rr", SubscribeOptions::new())
        .await
        .unwrap();
    let mut sb = b
        .subscribe("/queue/rr", SubscribeOptions::new())
        .await
        .unwrap();
    let p = connect(&broker, "p").await;
    fill(&p, "/queue/rr", (0..10).map(|i| i.to_string())).await;
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        got_a.push(next(&mut sa).await.text());
        got_b.push(next(&mut sb).await.text());
    }
    assert_eq!(got_a, ["0", "2", "4", "6", "8"]);
    assert_eq!(got_b, ["1", "3", "5", "7", "9"]);
    assert!(
        sa.next_within(QUIET).await.is_none() && sb.next_within(QUIET).await.is_none(),
        "nothing twice"
    );
}

#[tokio::test]
async fn messages_wait_for_a_consumer_and_survive_a_restart() {
    let mut broker = Broker::start(&[]);
    let p = connect(&broker, "p").await;
    fill(&p, "/queue/later", (0..5).map(|i| format!("m{i}"))).await;
    assert_eq!(queue_stats(&broker, "later").await, (5, 0, 0));
    // kill -9: only what the disk holds can come back, and every receipted message must.
    broker.kill();
    let broker = Broker::restart_of(&mut broker, &[]);
    let c = connect(&broker, "c").await;
    let mut sub = c
        .subscribe(
            "/queue/later",
            SubscribeOptions::new().ack("client-individual"),
        )
        .await
        .unwrap();
    for i in 0..5 {
        let m = next(&mut sub).await;
        assert_eq!(m.text(), format!("m{i}"));
        // It may have gone out before the crash: say so.
        assert_eq!(m.header("redelivered"), Some("true"));
        c.ack(&m).await.unwrap();
    }
    assert_eq!(queue_stats(&broker, "later").await, (0, 0, 1));
}

#[tokio::test]
async fn client_acks_are_cumulative_and_nack_redelivers() {
    let broker = Broker::start(&[]);
    let c = connect(&broker, "c").await;
    let p = connect(&broker, "p").await;
    fill(&p, "/queue/acks", (0..4).map(|i| format!("m{i}"))).await;
    let mut sub = c
        .subscribe("/queue/acks", SubscribeOptions::new().ack("client"))
        .await
        .unwrap();
    let got = [
        next(&mut sub).await,
        next(&mut sub).await,
        next(&mut sub).await,
        next(&mut sub).await,
    ];
    c.ack(&got[1]).await.unwrap(); // settles m0 and m1
    c.nack(&got[2]).await.unwrap(); // m2 back to the queue, delivered again
    let again = next(&mut sub).await;
    assert_eq!(
        (again.text().as_str(), again.header("redelivered")),
        ("m2", Some("true"))
    );
    // m3 went out before the redelivered m2, so acking m2 cumulatively settles m3 too.
    c.ack(&again).await.unwrap();
    assert_eq!(queue_stats(&broker, "acks").await, (0, 0, 1));
    let err = c.ack(&got[3]).await.unwrap_err();
    assert!(
        err.to_string().contains("no unacknowledged message"),
        "{err}"
    );
}

/// `(ready, unacked, consumers)` of one queue, from `GET /api/queues`.
async fn queue_stats(broker: &Broker, queue: &str) -> (u64, u64, u64) {
    let (status, body) = broker.http_get("/api/queues").await;
    assert_eq!(status, 200);
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    let q = stats["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == queue)
        .unwrap();
    (
        q["ready"].as_u64().unwrap(),
        q["unacked"].as_u64().unwrap(),
        q["consumers"].as_u64().unwrap(),
    )
}

#[tokio::test]
async fn a_lost_consumer_s_messages_go_to_another_marked_redelivered() {
    let broker = Broker::start(&[]);
    let p = connect(&broker, "p").await;
    let mut first = Conn::open(&broker, Transport::Tcp).await;
    first.login("first").await;
    first
        .send_with_receipt(
            &frame(
                "SUBSCRIBE",
                &[
                    ("id", "q"),
                    ("destination", "/queue/orphans"),
                    ("ack", "client-individual"),
                ],
            ),
            "s",
        )
        .await;
    fill(&p, "/queue/orphans", (0..3).map(|i| format!("m{i}"))).await;
    for i in 0..3 {
        assert_eq!(first.expect_frame().await.body, format!("m{i}").as_bytes());
    }
    drop(first); // gone without acking
    let second = connect(&broker, "second").await;
    let mut sub = second
        .subscribe(
            "/queue/orphans",
            SubscribeOptions::new().ack("client-individual"),
        )
        .await
        .unwrap();
    for i in 0..3 {
        let m = next(&mut sub).await;
        assert_eq!(
            (m.text(), m.header("redelivered")),
            (format!("m{i}"), Some("true"))
        );
        second.ack(&m).await.unwrap();
    }
}

#[tokio::test]
async fn prefetch_count_bounds_unacknowledged_messages() {
    let broker = Broker::start(&[]);
    let c = connect(&broker, "c").await;
    let p = connect(&broker, "p").await;
    fill(&p, "/queue/prefetch", (0..5).map(|i| format!("m{i}"))).await;
    let options = SubscribeOptions::new()
        .ack("client-individual")
        .header("prefetch-count", "2");
    let mut sub = c.subscribe("/queue/prefetch", options).await.unwrap();
    let a = next(&mut sub).await;
    let _b = next(&mut sub).await;
    assert!(
        sub.next_within(QUIET).await.is_none(),
        "a third before any ack"
    );
    c.ack(&a).await.unwrap();
    assert_eq!(next(&mut sub).await.text(), "m2");
    assert!(sub.next_within(QUIET).await.is_none());
}

#[tokio::test]
async fn acks_in_a_transaction_count_at_commit_and_not_at_abort() {
    let broker = Broker::start(&[]);
    let p = connect(&broker, "p").await;
    fill(&p, "/queue/txacks", ["kept".to_owned(), "acked".to_owned()]).await;
    let c = connect(&broker, "c").await;
    let mut sub = c
        .subscribe(
            "/queue/txacks",
            SubscribeOptions::new().ack("client-individual"),
        )
        .await
        .unwrap();
    let (kept, acked) = (next(&mut sub).await, next(&mut sub).await);
    let tx = c.begin().await.unwrap();
    tx.ack(&kept).await.unwrap();
    tx.abort().await.unwrap();
    let tx = c.begin().await.unwrap();
    tx.ack(&acked).await.unwrap();
    tx.commit().await.unwrap();
    c.disconnect().await.unwrap();
    // The aborted ACK left "kept" unacknowledged: it comes back; "acked" does not.
    let d = connect(&broker, "d").await;
    let mut sub = d
        .subscribe("/queue/txacks", SubscribeOptions::new())
        .await
        .unwrap();
    let m = next(&mut sub).await;
    assert_eq!(
        (m.text().as_str(), m.header("redelivered")),
        ("kept", Some("true"))
    );
    assert!(sub.next_within(QUIET).await.is_none());
}

#[tokio::test]
async fn a_full_queue_refuses_the_send_with_a_clear_error() {
    let broker = Broker::start(&["--queue-max-messages", "3"]);
    let p = connect(&broker, "p").await;
    fill(&p, "/queue/small", (0..3).map(|i| i.to_string())).await;
    let err = p
        .send_with_receipt("/queue/small", "one too many")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("queue \"small\" is full"), "{err}");
    let broker = Broker::start(&["--queue-max-bytes", "10"]);
    let p = connect(&broker, "p").await;
    let err = p
        .send_with_receipt("/queue/bytes", "eleven bytes")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("is full"), "{err}");
}

#[tokio::test]
async fn a_send_receipt_names_the_message_id_and_a_redelivery_keeps_it() {
    let broker = Broker::start(&[]);
    let p = connect(&broker, "p").await;
    let receipt = p.send_with_receipt("/queue/ids", "x").await.unwrap();
    let id = receipt.header("message-id").unwrap().to_owned();
    let c = connect(&broker, "c").await;
    let mut sub = c
        .subscribe(
            "/queue/ids",
            SubscribeOptions::new().ack("client-individual"),
        )
        .await
        .unwrap();
    let m = next(&mut sub).await;
    assert_eq!(m.header("message-id"), Some(id.as_str()));
    c.nack(&m).await.unwrap();
    let again = next(&mut sub).await;
    assert_eq!(again.header("message-id"), Some(id.as_str()));
    let ids: BTreeSet<String> = [again.header("message-id").unwrap().to_owned()].into();
    assert_eq!(ids.len(), 1);
}

#[tokio::test]
async fn a_receipted_direct_message_to_an_offline_user_survives_kill_9() {
    let mut broker = Broker::start(&[]);
    let alice = connect(&broker, "alice").await;
    let receipt = alice
        .send_with_receipt("/user/bob/queue/dm", "while you sleep")
        .await
        .unwrap();
    assert!(receipt.header("message-id").is_some());
    broker.kill();
    let broker = Broker::restart_of(&mut broker, &[]);
    let bob = connect(&broker, "bob").await;
    let mut dm = bob
        .subscribe("/user/queue/dm", SubscribeOptions::new())
        .await
        .unwrap();
    let m = next(&mut dm).await;
    assert_eq!(
        (m.text().as_str(), m.header("x-sender"), m.destination()),
        ("while you sleep", Some("alice"), "/user/queue/dm")
    );
    assert!(dm.next_within(QUIET).await.is_none(), "delivered once");
}
