//! `stoa-cli bench`: load scenarios against any STOMP broker, each bounded in messages and
//! seconds, each ending with one JSON line of results after a readable summary.
//!
//! In: a broker URL and a scenario's sizes. Out: throughput, latency percentiles, and the
//! count of lost, duplicated and out-of-order messages, which are reported, never hidden.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use client::{Client, ClientError, Options, SubscribeOptions};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use stomp_codec::{Command, Frame};

#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// Durable queue throughput: publishers send with receipts, one consumer takes all.
    Queue(QueueArgs),
    /// One publisher, N subscribers on one topic: deliveries per second, all in order.
    Fanout(FanoutArgs),
}

#[derive(Debug, Args)]
pub struct QueueArgs {
    /// Publishing connections.
    #[arg(long, default_value_t = 8)]
    publishers: usize,
    /// Messages in all.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Body size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Receipts each publisher may wait for at once.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120.0)]
    seconds: f64,
}

#[derive(Debug, Args)]
pub struct FanoutArgs {
    /// Subscribing connections.
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// Messages published.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Body size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// The publisher asks for a receipt every this many messages...
    #[arg(long, default_value_t = 100)]
    receipt_every: usize,
    /// ...and waits once this many receipts are outstanding.
    #[arg(long, default_value_t = 4)]
    window: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120.0)]
    seconds: f64,
}

/// What a scenario failed on.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The broker.
    #[error("{0}")]
    Client(#[from] ClientError),
    /// The time bound.
    #[error("the scenario did not finish within {0} s")]
    Timeout(f64),
}

pub async fn run(
    url: &str,
    options: &Options,
    scenario: Scenario,
) -> Result<serde_json::Value, BenchError> {
    match scenario {
        Scenario::Queue(args) => queue(url, options, args).await,
        Scenario::Fanout(args) => fanout(url, options, args).await,
    }
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{prefix}{:x}", nanos & 0xffff_ffff_ffff)
}

fn per_second(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

async fn queue(
    url: &str,
    options: &Options,
    args: QueueArgs,
) -> Result<serde_json::Value, BenchError> {
    let destination = format!("/queue/{}", unique("bench-"));
    let body = bytes::Bytes::from(vec![b'q'; args.size]);
    let consumer = Client::connect(url, options.clone()).await?;
    let mut sub = consumer
        .subscribe(&destination, SubscribeOptions::new())
        .await?;
    let mut publishers = Vec::new();
    for _ in 0..args.publishers {
        publishers.push(Client::connect(url, options.clone()).await?);
    }
    let deadline = Duration::from_secs_f64(args.seconds);
    let started = Instant::now();
    let receive = async {
        let mut seen = HashSet::with_capacity(args.messages);
        let mut duplicates = 0usize;
        while seen.len() < args.messages {
            let Some(m) = sub.next().await else { break };
            let n: usize = m
                .header("x-n")
                .and_then(|n| n.parse().ok())
                .unwrap_or(usize::MAX);
            if !seen.insert(n) {
                duplicates += 1;
            }
        }
        (seen.len(), duplicates, started.elapsed())
    };
    let per = args.messages.div_ceil(args.publishers);
    let sends = publishers.iter().enumerate().map(|(p, client)| {
        let (destination, body) = (destination.clone(), body.clone());
        async move {
            let mut in_flight = FuturesUnordered::new();
            let range = (p * per)..((p + 1) * per).min(args.messages);
            for n in range {
                let frame = Frame::new(Command::Send)
                    .with_header("destination", &destination)
                    .with_header("persistent", "true")
                    .with_header("x-n", &n.to_string())
                    .with_body(body.clone());
                in_flight.push(client.send_frame(frame, true));
                if in_flight.len() >= args.window
                    && let Some(result) = in_flight.next().await
                {
                    result?;
                }
            }
            while let Some(result) = in_flight.next().await {
                result?;
            }
            Ok::<(), ClientError>(())
        }
    });
    let publish = async {
        for result in futures_util::future::join_all(sends).await {
            result?;
        }
        Ok::<Duration, ClientError>(started.elapsed())
    };
    let work = async { tokio::join!(publish, receive) };
    let (published, (received, duplicates, consumed)) = tokio::time::timeout(deadline, work)
        .await
        .map_err(|_| BenchError::Timeout(args.seconds))?;
    let published = published?;
    for client in publishers.iter().chain([&consumer]) {
        let _ = client.disconnect().await;
    }
    Ok(serde_json::json!({
        "scenario": "queue",
        "broker": url,
        "publishers": args.publishers,
        "messages": args.messages,
        "size": args.size,
        "window": args.window,
        "receipted_per_sec": per_second(args.messages, published),
        "consumed_per_sec": per_second(received, consumed),
        "seconds": consumed.as_secs_f64(),
        "received": received,
        "lost": args.messages - received,
        "duplicates": duplicates,
    }))
}

async fn fanout(
    url: &str,
    options: &Options,
    args: FanoutArgs,
) -> Result<serde_json::Value, BenchError> {
    let destination = format!("/topic/{}", unique("bench.fanout."));
    let body = bytes::Bytes::from(vec![b'f'; args.size]);
    let mut subscribers = Vec::new();
    for _ in 0..args.subscribers {
        let client = Client::connect(url, options.clone()).await?;
        let sub = client
            .subscribe(&destination, SubscribeOptions::new())
            .await?;
        subscribers.push((client, sub));
    }
    let publisher = Client::connect(url, options.clone()).await?;
    let lost = Arc::new(AtomicU64::new(0));
    let out_of_order = Arc::new(AtomicU64::new(0));
    let delivered = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = Duration::from_secs_f64(args.seconds);
    let readers: Vec<_> = subscribers
        .into_iter()
        .map(|(client, mut sub)| {
            let (lost, out_of_order, delivered) =
                (lost.clone(), out_of_order.clone(), delivered.clone());
            let total = args.messages;
            tokio::spawn(async move {
                let mut expected = 0usize;
                let mut got = 0usize;
                let end = tokio::time::Instant::now() + deadline;
                while got < total {
                    let Ok(Some(m)) = tokio::time::timeout_at(end, sub.next()).await else {
                        break;
                    };
                    got += 1;
                    let n: usize = m
                        .header("x-n")
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(usize::MAX);
                    if n < expected {
                        out_of_order.fetch_add(1, Ordering::Relaxed);
                    } else {
                        expected = n + 1;
                    }
                }
                delivered.fetch_add(got as u64, Ordering::Relaxed);
                lost.fetch_add((total - got) as u64, Ordering::Relaxed);
                let last = started.elapsed();
                let _ = client.disconnect().await;
                last
            })
        })
        .collect();
    let mut receipts = FuturesUnordered::new();
    for n in 0..args.messages {
        let frame = Frame::new(Command::Send)
            .with_header("destination", &destination)
            .with_header("x-n", &n.to_string())
            .with_body(body.clone());
        let with_receipt = (n + 1) % args.receipt_every == 0 || n + 1 == args.messages;
        receipts.push(publisher.send_frame(frame, with_receipt));
        // Fire-and-forget sends complete at once; receipted ones bound how far ahead we run.
        while receipts.len() >= args.window * args.receipt_every.max(1) {
            if let Some(r) = receipts.next().await {
                r?;
            }
        }
    }
    while let Some(r) = receipts.next().await {
        r?;
    }
    let mut last = Duration::ZERO;
    for reader in readers {
        last = last.max(reader.await.unwrap_or(deadline));
    }
    let _ = publisher.disconnect().await;
    let delivered = delivered.load(Ordering::Relaxed);
    Ok(serde_json::json!({
        "scenario": "fanout",
        "broker": url,
        "subscribers": args.subscribers,
        "messages": args.messages,
        "size": args.size,
        "deliveries": delivered,
        "deliveries_per_sec": per_second(delivered as usize, last),
        "seconds": last.as_secs_f64(),
        "lost": lost.load(Ordering::Relaxed),
        "out_of_order": out_of_order.load(Ordering::Relaxed),
    }))
}
