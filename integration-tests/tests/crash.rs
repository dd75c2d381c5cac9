//! The durable-queue promise under `kill -9`: publishers send 20,000 messages with receipts
//! while the broker is killed with SIGKILL at random moments and restarted, five times. At
//! the end a consumer has every message whose RECEIPT arrived and none that was never sent;
//! a message comes twice only if it was redelivered (`redelivered:true`) or sent again by
//! its publisher after its RECEIPT was lost in a crash.

// Test code: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used)]

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use client::{Client, Options, SubscribeOptions};
use futures_util::future::join_all;
use integration_tests::Broker;
use stomp_codec::{Command, Frame};
use tokio::sync::watch;

const PUBLISHERS: usize = 4;
const PER_PUBLISHER: usize = 5_000;
const WINDOW: usize = 64;
const KILLS: usize = 5;
const QUEUE: &str = "/queue/crash";

#[derive(Default)]
struct Ledger {
    /// How many times each id was sent.
    attempts: HashMap<String, u32>,
    /// Ids whose RECEIPT arrived.
    confirmed: HashSet<String>,
}

fn random(seed: u64) -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(seed);
    h.finish()
}

async fn publisher(
    p: usize,
    url: String,
    ledger: Arc<Mutex<Ledger>>,
    progress: Arc<watch::Sender<usize>>,
) {
    let ids: Vec<String> = (0..PER_PUBLISHER).map(|i| format!("p{p}-{i}")).collect();
    let mut done = vec![false; PER_PUBLISHER];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    while done.iter().any(|d| !d) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "publisher {p} could not finish"
        );
        let Ok(client) = Client::connect(
            &url,
            Options::new()
                .login(format!("p{p}"))
                .timeout(Duration::from_secs(5)),
        )
        .await
        else {
            // The broker is down or restarting: try again shortly.
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        'connected: loop {
            let todo: Vec<usize> = (0..PER_PUBLISHER)
                .filter(|i| !done[*i])
                .take(WINDOW)
                .collect();
            if todo.is_empty() {
                break;
            }
            let sends = todo.iter().map(|&i| {
                let frame = Frame::new(Command::Send)
                    .with_header("destination", QUEUE)
                    .with_header("x-id", &ids[i])
                    .with_body(format!("body of {}", ids[i]));
                client.send_frame(frame, true)
            });
            {
                let mut l = ledger.lock().unwrap();
                for &i in &todo {
                    *l.attempts.entry(ids[i].clone()).or_default() += 1;
                }
            }
            let results = join_all(sends).await;
            let mut failed = false;
            for (&i, result) in todo.iter().zip(results) {
                match result {
                    Ok(_) => {
                        done[i] = true;
                        ledger.lock().unwrap().confirmed.insert(ids[i].clone());
                    }
                    Err(_) => failed = true,
                }
            }
            let confirmed = ledger.lock().unwrap().confirmed.len();
            progress.send_replace(confirmed);
            if failed {
                break 'connected;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_receipted_message_survives_kill_9_and_none_is_invented() {
    let mut broker = Broker::start(&[]);
    let url = format!("tcp://{}", broker.stomp);
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let (progress, mut watch_progress) = watch::channel(0usize);
    let progress = Arc::new(progress);

    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let (url, ledger, progress) = (url.clone(), ledger.clone(), progress.clone());
            tokio::spawn(publisher(p, url, ledger, progress))
        })
        .collect();

    // Kill at random points of the stream: after a random number of confirmed messages.
    let total = PUBLISHERS * PER_PUBLISHER;
    let mut thresholds: Vec<usize> = (0..KILLS)
        .map(|k| 1_000 + (random(k as u64) as usize) % (total - 4_000))
        .collect();
    thresholds.sort_unstable();
    let mut kills = 0;
    for threshold in thresholds {
        watch_progress.wait_for(|&n| n >= threshold).await.unwrap();
        broker.kill();
        broker = Broker::restart_of(&mut broker, &[]);
        kills += 1;
    }
    for p in publishers {
        p.await.unwrap();
    }
    assert_eq!(kills, KILLS);

    // Drain the queue.
    let consumer = Client::connect(&url, Options::new().login("auditor"))
        .await
        .unwrap();
    let mut sub = consumer
        .subscribe(QUEUE, SubscribeOptions::new())
        .await
        .unwrap();
    let mut received: HashMap<String, Vec<bool>> = HashMap::new();
    while let Some(m) = sub.next_within(Duration::from_secs(3)).await {
        let id = m.header("x-id").unwrap().to_owned();
        assert_eq!(m.text(), format!("body of {id}"));
        received
            .entry(id)
            .or_default()
            .push(m.header("redelivered") == Some("true"));
    }
    let (_, stats) = broker.http_get("/api/queues").await;
    assert!(
        stats.contains(r#""ready":0"#),
        "the queue was not drained: {stats}"
    );

    let ledger = ledger.lock().unwrap();
    let lost: Vec<&String> = ledger
        .confirmed
        .iter()
        .filter(|id| !received.contains_key(*id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} receipted messages lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    let invented: Vec<&String> = received
        .keys()
        .filter(|id| !ledger.attempts.contains_key(*id))
        .collect();
    assert!(invented.is_empty(), "messages nobody sent: {invented:?}");
    let mut duplicates = 0;
    for (id, copies) in &received {
        if copies.len() > 1 {
            duplicates += 1;
            let resent = ledger.attempts[id] > 1;
            let redelivered = copies.iter().any(|r| *r);
            assert!(
                resent || redelivered,
                "{id} came {} times, never resent nor redelivered",
                copies.len()
            );
        }
    }
    assert_eq!(
        ledger.confirmed.len(),
        total,
        "every message was eventually confirmed"
    );
    eprintln!(
        "crash test: {total} messages, {kills} kills, {} sends, {} duplicates delivered (all resent or redelivered)",
        ledger.attempts.values().sum::<u32>(),
        duplicates
    );
}
