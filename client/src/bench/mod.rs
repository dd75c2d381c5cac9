//! `stoa-cli bench`: load scenarios against any STOMP broker, each bounded in messages and
//! seconds, each ending with one JSON line of results after a readable summary.
//!
//! In: a broker URL and a scenario's sizes. Out: throughput, latency percentiles, and the
//! count of lost, duplicated and out-of-order messages, which are reported, never hidden.

mod http;
mod soak;
mod wire;

use http::{Poster, Record, Requests, SockJs, SockJsSender, Technique};
use wire::{Target, WireError, WireReader, WireWriter, request};

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
    /// R rooms of k members, every member publishing at a fixed total rate: latency.
    Rooms(RoomsArgs),
    /// C connections, each subscribed to a room: connect rate and broker memory each.
    Conns(ConnsArgs),
    /// A chat-like mix (rooms, typing, direct messages, leaving and rejoining, reconnects)
    /// for a bounded time, sampling the broker's memory and descriptors.
    Soak(soak::SoakArgs),
}

#[derive(Debug, Args)]
pub struct RoomsArgs {
    /// Rooms.
    #[arg(long, default_value_t = 100)]
    rooms: usize,
    /// Members per room (each its own connection).
    #[arg(long, default_value_t = 10)]
    members: usize,
    /// Deliveries per second in all (messages per second times members).
    #[arg(long, default_value_t = 100_000)]
    rate: u64,
    /// Seconds to publish (per step with --step).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Raise the rate by half each step until p99 passes 50 ms or messages are lost;
    /// report the highest rate that stayed under.
    #[arg(long)]
    step: bool,
    /// Body size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// The broker's process id, to report its CPU use next to the generator's.
    #[arg(long)]
    pid: Option<u32>,
    /// How members read and write: STOMP over WebSocket or SockJS xhr-streaming, or the
    /// HTTP room API by Server-Sent Events, long polling or polling (writing by POST).
    #[arg(long, value_enum, default_value_t = Technique::Ws)]
    transport: Technique,
    /// `--transport poll`: milliseconds between a member's polls.
    #[arg(long, default_value_t = 1000)]
    poll_interval_ms: u64,
    /// `--step` goes on while p99 stays under this many milliseconds (polling's own
    /// interval is the floor of its latency: give it room).
    #[arg(long, default_value_t = 50.0)]
    p99_limit_ms: f64,
}

#[derive(Debug, Args)]
pub struct ConnsArgs {
    /// Connections.
    #[arg(long, default_value_t = 1_000)]
    connections: usize,
    /// Rooms the connections are spread over [default: one per 10 connections, the room
    /// size of the rooms scenario]. Every join posts a notice to each member already in the
    /// room, so larger rooms cost more writes per connection.
    #[arg(long)]
    rooms: Option<usize>,
    /// Connections opened at once.
    #[arg(long, default_value_t = 256)]
    parallel: usize,
    /// The broker's process id, to read its resident memory and CPU use from /proc.
    #[arg(long)]
    pid: Option<u32>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300.0)]
    seconds: f64,
    /// Keep the connections open this many seconds after measuring, e.g. to inspect the
    /// broker's memory by hand.
    #[arg(long, default_value_t = 0.0)]
    hold: f64,
    /// What each connection is: a STOMP member over WebSocket (`ws`), or an idle reader of
    /// the HTTP room API holding a Server-Sent Events stream (`sse`) or a long poll
    /// (`long-poll`).
    #[arg(long, value_enum, default_value_t = Technique::Ws)]
    transport: Technique,
    /// For `--auth users`: connection n logs in as `u<n>` with the passcode `<PREFIX><n>`
    /// (accounts made beforehand with `stoa users add`).
    #[arg(long, value_name = "PREFIX", conflicts_with = "tokens")]
    passcode_prefix: Option<String>,
    /// For `--auth jwt`: a file of tokens, one a line; connection n sends line n (modulo
    /// their number) as its passcode.
    #[arg(long, value_name = "FILE")]
    tokens: Option<std::path::PathBuf>,
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
    /// The broker's process id, to report its CPU use next to the generator's.
    #[arg(long)]
    pid: Option<u32>,
}

/// What a scenario failed on.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The broker.
    #[error("{0}")]
    Client(#[from] ClientError),
    /// The generator's own connection.
    #[error("{0}")]
    Wire(#[from] WireError),
    /// The time bound.
    #[error("the scenario did not finish within {0} s")]
    Timeout(f64),
    /// A file the scenario reads.
    #[error("{0}: {1}")]
    File(String, std::io::Error),
    /// A tokens file with no token in it.
    #[error("{0}: no token in it")]
    NoTokens(String),
}

/// Runs `scenario` against `urls`: the fan-out and rooms scenarios spread their
/// connections over every URL given (the nodes of a cluster: subscribers and members
/// round-robin, the fan-out's publisher on the first); the others use the first.
pub async fn run(
    urls: &[&str],
    options: &Options,
    scenario: Scenario,
) -> Result<serde_json::Value, BenchError> {
    let url = urls.first().copied().unwrap_or_default();
    match scenario {
        Scenario::Queue(args) => queue(url, options, args).await,
        Scenario::Fanout(args) => fanout(urls, options, args).await,
        Scenario::Rooms(args) => rooms(urls, options, args).await,
        Scenario::Conns(args) => conns(url, options, args).await,
        Scenario::Soak(args) => soak::soak(url, options, args).await,
    }
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{prefix}{:x}", nanos & 0xffff_ffff_ffff)
}

/// The targets of `urls`, in order; the first URL's alone when none is given.
fn targets(urls: &[&str], options: &Options) -> Result<Vec<Target>, BenchError> {
    match urls {
        [] => Ok(vec![target("", options)?]),
        urls => urls.iter().map(|url| target(url, options)).collect(),
    }
}

/// The lean connection's target for `url` with the command line's credentials.
fn target(url: &str, options: &Options) -> Result<Target, BenchError> {
    let mut target = Target::parse(url, options.login.clone(), options.passcode.clone())?;
    target.host.clone_from(&options.host);
    Ok(target)
}

/// Connects within the command line's timeout.
async fn open(target: &Target, options: &Options) -> Result<(WireReader, WireWriter), BenchError> {
    tokio::time::timeout(options.timeout, wire::connect(target))
        .await
        .map_err(|_| BenchError::Timeout(options.timeout.as_secs_f64()))?
        .map_err(BenchError::from)
}

/// Subscribes to `destination` and waits for the SUBSCRIBE's receipt.
async fn subscribe(
    reader: &mut WireReader,
    writer: &mut WireWriter,
    destination: &str,
) -> Result<(), BenchError> {
    // No x-* headers: RabbitMQ reads them as queue arguments.
    let frame = Frame::new(Command::Subscribe)
        .with_header("destination", destination)
        .with_header("id", "0")
        .with_header("ack", "auto");
    Ok(request(reader, writer, frame, "subscribed").await?)
}

/// Says DISCONNECT and closes, without waiting for an answer.
async fn hang_up(mut writer: WireWriter) {
    let _ = writer.send(&Frame::new(Command::Disconnect)).await;
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
    urls: &[&str],
    options: &Options,
    args: FanoutArgs,
) -> Result<serde_json::Value, BenchError> {
    let targets = targets(urls, options)?;
    let url = urls.join(",");
    let destination = format!("/topic/{}", unique("bench.fanout."));
    let body = bytes::Bytes::from(vec![b'f'; args.size]);
    let mut subscribers = Vec::new();
    for i in 0..args.subscribers {
        let (mut reader, mut writer) = open(&targets[i % targets.len()], options).await?;
        subscribe(&mut reader, &mut writer, &destination).await?;
        subscribers.push((reader, writer));
    }
    let (mut receipts, mut publisher) = open(&targets[0], options).await?;
    let lost = Arc::new(AtomicU64::new(0));
    let out_of_order = Arc::new(AtomicU64::new(0));
    let delivered = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let cpu = CpuMeter::start(args.pid);
    let deadline = Duration::from_secs_f64(args.seconds);
    let end = tokio::time::Instant::now() + deadline;
    let readers: Vec<_> = subscribers
        .into_iter()
        .map(|(mut reader, writer)| {
            let (lost, out_of_order, delivered) =
                (lost.clone(), out_of_order.clone(), delivered.clone());
            let total = args.messages;
            tokio::spawn(async move {
                let mut expected = 0usize;
                let mut got = 0usize;
                while got < total {
                    let Ok(Ok(m)) = tokio::time::timeout_at(end, reader.next()).await else {
                        break;
                    };
                    if m.command != Command::Message {
                        continue;
                    }
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
                hang_up(writer).await;
                last
            })
        })
        .collect();
    // The publisher writes a batch of `receipt_every` SENDs at a time, the last with a
    // receipt, and waits once `window` receipts are outstanding.
    let publish = async {
        let mut outstanding = 0usize;
        let mut n = 0usize;
        let mut digits = itoa::Buffer::new();
        while n < args.messages {
            let batch_end = (n + args.receipt_every.max(1)).min(args.messages);
            for i in n..batch_end {
                let mut frame = Frame::new(Command::Send)
                    .with_header("destination", &destination)
                    .with_header("x-n", digits.format(i));
                if i + 1 == batch_end {
                    frame = frame.with_header("receipt", digits.format(i));
                }
                publisher.queue(&frame.with_body(body.clone()));
            }
            publisher.flush().await?;
            outstanding += 1;
            n = batch_end;
            while outstanding >= args.window.max(1) || (n == args.messages && outstanding > 0) {
                if receipts.next_ok().await?.command == Command::Receipt {
                    outstanding -= 1;
                }
            }
        }
        Ok::<(), WireError>(())
    };
    tokio::time::timeout_at(end, publish)
        .await
        .map_err(|_| BenchError::Timeout(args.seconds))??;
    let mut last = Duration::ZERO;
    for reader in readers {
        last = last.max(reader.await.unwrap_or(deadline));
    }
    let cpu = cpu.percent();
    hang_up(publisher).await;
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
        "cpu_percent": cpu,
    }))
}

/// What every reader together saw in one step: deliveries and their latencies.
///
/// A step makes its tally before it starts publishing. (One histogram per member, made by
/// the readers as the first messages came in, took about 150 KB each, 150 MB to zero in
/// rooms of 100 × 10, and held the generator's core for the first ~150 ms of every step.)
struct StepTally {
    received: u64,
    latency: hdrhistogram::Histogram<u64>,
}

impl StepTally {
    fn new() -> StepTally {
        StepTally {
            received: 0,
            // 1 µs to 60 s, three significant digits.
            latency: hdrhistogram::Histogram::new_with_bounds(1_000, 60_000_000_000, 3)
                .expect("valid bounds"),
        }
    }
}

/// The tallies of the steps so far, shared by every reader.
type Tallies = Arc<std::sync::Mutex<Vec<StepTally>>>;

/// What the readers saw and the HTTP requests the members made.
struct Seen {
    tallies: Tallies,
    requests: Requests,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A room member as the steps see it: its room, and its writing half (lent to each step's
/// publishing task and handed back).
struct Member {
    room: usize,
    writer: Option<Writer>,
}

/// How a member sends.
enum Writer {
    /// A STOMP SEND on its own connection.
    Wire(WireWriter),
    /// `xhr_send` to its SockJS session.
    SockJs(SockJsSender),
    /// A POST to the room API.
    Post(Poster),
}

impl Writer {
    async fn send(
        &mut self,
        destination: &str,
        step: &str,
        sent: &str,
        body: &bytes::Bytes,
    ) -> Result<(), WireError> {
        match self {
            Writer::Wire(_) | Writer::SockJs(_) => {
                let frame = Frame::new(Command::Send)
                    .with_header("destination", destination)
                    .with_header("x-step", step)
                    .with_header("x-sent", sent)
                    .with_body(body.clone());
                match self {
                    Writer::Wire(writer) => writer.send(&frame).await,
                    Writer::SockJs(writer) => writer.send(&frame).await,
                    Writer::Post(_) => Ok(()),
                }
            }
            Writer::Post(poster) => poster.send(step, sent, body).await,
        }
    }

    async fn hang_up(self) {
        match self {
            Writer::Wire(writer) => hang_up(writer).await,
            Writer::SockJs(mut writer) => {
                let _ = writer.send(&Frame::new(Command::Disconnect)).await;
            }
            Writer::Post(_) => {}
        }
    }
}

/// Hands a delivered MESSAGE's `x-step` and `x-sent` to the tally.
fn record_timing(message: &Frame, record: &Record) {
    if let (Some(step), Some(sent)) = (message.header("x-step"), message.header("x-sent")) {
        record(step, sent);
    }
}

/// Bytes the generator's sockets carried so far (see [`wire::WIRE_BYTES`]).
fn own_io_bytes() -> Option<u64> {
    Some(wire::WIRE_BYTES.load(Ordering::Relaxed))
}

/// The broker's HTTP address (`host:port`) from a `ws://` URL.
fn http_addr(url: &str) -> Result<String, BenchError> {
    let unsupported = || BenchError::Wire(WireError::Unsupported(url.to_owned()));
    let parsed = url::Url::parse(url).map_err(|_| unsupported())?;
    match (
        parsed.scheme(),
        parsed.host_str(),
        parsed.port_or_known_default(),
    ) {
        ("ws", Some(host), Some(port)) if !host.is_empty() => Ok(format!("{host}:{port}")),
        _ => Err(unsupported()),
    }
}

async fn rooms(
    urls: &[&str],
    options: &Options,
    args: RoomsArgs,
) -> Result<serde_json::Value, BenchError> {
    let targets = targets(urls, options)?;
    let url = urls.join(",");
    let tag = unique("bench");
    let epoch = Instant::now();
    let mut members = Vec::new();
    let mut readers = Vec::new();
    let tallies = Tallies::default();
    let requests = Requests::default();
    let record: Record = {
        let tallies = tallies.clone();
        Arc::new(move |step: &str, sent: &str| {
            let (Ok(sent), Ok(step)) = (sent.parse::<u128>(), step.parse::<usize>()) else {
                return;
            };
            let latency = epoch.elapsed().as_nanos().saturating_sub(sent);
            if let Some(tally) = lock(&tallies).get_mut(step) {
                tally.received += 1;
                let latency = u64::try_from(latency).unwrap_or(u64::MAX).max(1_000);
                let _ = tally.latency.record(latency);
            }
        })
    };
    for room in 0..args.rooms {
        for k in 0..args.members {
            let n = room * args.members + k;
            let url = urls.get(n % urls.len().max(1)).copied().unwrap_or_default();
            let room_name = format!("{tag}-{room}");
            let login = format!("m{n}");
            let record = record.clone();
            let writer = match args.transport {
                Technique::Ws => {
                    let target = &targets[n % targets.len()];
                    let (mut reader, mut writer) = open(target, options).await?;
                    subscribe(
                        &mut reader,
                        &mut writer,
                        &format!("/topic/room.{room_name}"),
                    )
                    .await?;
                    readers.push(tokio::spawn(async move {
                        while let Ok(m) = reader.next().await {
                            record_timing(&m, &record);
                        }
                    }));
                    Writer::Wire(writer)
                }
                Technique::SockjsXhrStreaming => {
                    let addr = http_addr(url)?;
                    let destination = format!("/topic/room.{room_name}");
                    let session = format!("{tag}-{n}");
                    let (mut reader, writer) =
                        SockJs::open(&addr, &session, &login, &destination, requests.clone())
                            .await?;
                    readers.push(tokio::spawn(async move {
                        while let Ok(m) = reader.next().await {
                            record_timing(&m, &record);
                        }
                    }));
                    Writer::SockJs(writer)
                }
                technique => {
                    let addr = http_addr(url)?;
                    let http = http::Http::connect(&addr, requests.clone()).await?;
                    let poster =
                        Poster::connect(&addr, &room_name, &login, requests.clone()).await?;
                    let interval = Duration::from_millis(args.poll_interval_ms.max(1));
                    readers.push(tokio::spawn(async move {
                        let _ = match technique {
                            Technique::Sse => http::sse(http, room_name, login, record).await,
                            Technique::LongPoll => {
                                http::poll(http, room_name, login, None, record).await
                            }
                            _ => http::poll(http, room_name, login, Some(interval), record).await,
                        };
                    }));
                    Writer::Post(poster)
                }
            };
            members.push(Member {
                room,
                writer: Some(writer),
            });
        }
    }
    let mut steps = Vec::new();
    let mut rate = args.rate;
    let mut best_under_50ms = None;
    for step in 0.. {
        lock(&tallies).push(StepTally::new());
        let seen = Seen {
            tallies: tallies.clone(),
            requests: requests.clone(),
        };
        let result = rooms_step(&mut members, &seen, &args, &tag, epoch, step, rate).await?;
        let p99_ms = result["p99_ms"].as_f64().unwrap_or(f64::MAX);
        let lost = result["lost"].as_u64().unwrap_or(u64::MAX);
        let ok = p99_ms <= args.p99_limit_ms && lost == 0;
        if ok {
            best_under_50ms = Some(result["deliveries_per_sec"].clone());
        }
        eprintln!("rooms step {step}: {result}");
        steps.push(result);
        if !args.step || !ok || step >= 12 {
            break;
        }
        rate = rate * 3 / 2;
    }
    for member in &mut members {
        if let Some(writer) = member.writer.take() {
            writer.hang_up().await;
        }
    }
    for reader in readers {
        reader.abort();
    }
    let last = steps.last().cloned().unwrap_or_default();
    Ok(serde_json::json!({
        "scenario": "rooms",
        "transport": args.transport.name(),
        "broker": url,
        "rooms": args.rooms,
        "members": args.members,
        "size": args.size,
        "target_deliveries_per_sec": args.rate,
        "deliveries_per_sec": last["deliveries_per_sec"],
        "p50_ms": last["p50_ms"],
        "p90_ms": last["p90_ms"],
        "p99_ms": last["p99_ms"],
        "p999_ms": last["p999_ms"],
        "max_ms": last["max_ms"],
        "lost": last["lost"],
        "cpu_percent": last["cpu_percent"],
        "wire_bytes_per_delivery": last["wire_bytes_per_delivery"],
        "requests_per_delivery": last["requests_per_delivery"],
        "broker_cpu_us_per_delivery": last["broker_cpu_us_per_delivery"],
        "p99_limit_ms": args.p99_limit_ms,
        "highest_rate_p99_under_limit": best_under_50ms,
        "steps": steps,
    }))
}

/// Publishes at `rate` deliveries per second for `args.seconds`, then waits for the
/// stragglers and summarises what the readers saw for this step.
async fn rooms_step(
    members: &mut [Member],
    seen: &Seen,
    args: &RoomsArgs,
    tag: &str,
    epoch: Instant,
    step: usize,
    rate: u64,
) -> Result<serde_json::Value, BenchError> {
    let Seen { tallies, requests } = seen;
    let messages_per_sec = rate as f64 / args.members as f64;
    let per_member = messages_per_sec / members.len() as f64;
    let interval = Duration::from_secs_f64(1.0 / per_member.max(1e-3));
    let body = bytes::Bytes::from(vec![b'r'; args.size]);
    let sent = Arc::new(AtomicU64::new(0));
    let started = tokio::time::Instant::now();
    let cpu = CpuMeter::start(args.pid);
    let io_before = own_io_bytes();
    let requests_before = requests.load(Ordering::Relaxed);
    let end = started + Duration::from_secs_f64(args.seconds);
    let count = members.len();
    let mut tasks = Vec::new();
    for (i, member) in members.iter_mut().enumerate() {
        let Some(mut writer) = member.writer.take() else {
            continue;
        };
        let destination = format!("/topic/room.{tag}-{}", member.room);
        let (sent, body) = (sent.clone(), body.clone());
        // Spread the members' first sends over one interval.
        let offset = interval.mul_f64(i as f64 / count as f64);
        tasks.push((
            i,
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval_at(started + offset, interval);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let mut digits = itoa::Buffer::new();
                let step = step.to_string();
                loop {
                    if ticks.tick().await >= end {
                        break;
                    }
                    let sent_at = digits.format(epoch.elapsed().as_nanos()).to_owned();
                    if writer
                        .send(&destination, &step, &sent_at, &body)
                        .await
                        .is_err()
                    {
                        return None;
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                Some(writer)
            }),
        ));
    }
    for (i, task) in tasks {
        members[i].writer = task.await.ok().flatten();
    }
    let sent = sent.load(Ordering::Relaxed);
    let expected = sent * args.members as u64;
    // Wait for the deliveries to come in: until all have, or nothing more for a second.
    let mut received = 0u64;
    let mut last_change = Instant::now();
    while received < expected && last_change.elapsed() < Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = lock(tallies).get(step).map_or(0, |t| t.received);
        if now != received {
            received = now;
            last_change = Instant::now();
        }
    }
    // Measured to here: what the last deliveries cost counts too.
    let broker_cpu_seconds = cpu.broker_seconds();
    let cpu = cpu.percent();
    let per_delivery = |total: f64| (received > 0).then(|| total / received as f64);
    let wire_bytes = match (io_before, own_io_bytes()) {
        (Some(before), Some(after)) => per_delivery(after.saturating_sub(before) as f64),
        _ => None,
    };
    let requests_made = requests
        .load(Ordering::Relaxed)
        .saturating_sub(requests_before);
    let latency = lock(tallies)
        .get(step)
        .map_or_else(|| StepTally::new().latency, |t| t.latency.clone());
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1e6;
    Ok(serde_json::json!({
        "step": step,
        "target_deliveries_per_sec": rate,
        "messages_sent": sent,
        "deliveries": received,
        "deliveries_per_sec": received as f64 / args.seconds,
        "lost": expected.saturating_sub(received),
        "p50_ms": ms(0.5),
        "p90_ms": ms(0.9),
        "p99_ms": ms(0.99),
        "p999_ms": ms(0.999),
        "max_ms": latency.max() as f64 / 1e6,
        "cpu_percent": cpu,
        "wire_bytes_per_delivery": wire_bytes,
        "requests_per_delivery": per_delivery(requests_made as f64),
        "broker_cpu_us_per_delivery": broker_cpu_seconds.and_then(|s| per_delivery(s * 1e6)),
    }))
}

/// CPU time used by this process and, given its PID, the broker, from `/proc`: which of the
/// two limited a run.
struct CpuMeter {
    broker: Option<u32>,
    started: Instant,
    broker_ticks: Option<u64>,
    own_ticks: Option<u64>,
}

/// utime + stime of a process, in clock ticks (USER_HZ, 100 on Linux).
fn cpu_ticks(pid: &str) -> Option<u64> {
    ticks_in_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// utime + stime from the text of a `/proc/PID/stat` file (fields 14 and 15).
fn ticks_in_stat(stat: &str) -> Option<u64> {
    // The command name may hold spaces and parentheses; the fields after its last closing
    // parenthesis do not.
    let mut after = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: u64 = after.next()?.parse().ok()?;
    let stime: u64 = after.next()?.parse().ok()?;
    Some(utime + stime)
}

impl CpuMeter {
    fn start(broker: Option<u32>) -> CpuMeter {
        CpuMeter {
            broker,
            started: Instant::now(),
            broker_ticks: broker.and_then(|pid| cpu_ticks(&pid.to_string())),
            own_ticks: cpu_ticks("self"),
        }
    }

    /// CPU seconds the broker used since the start.
    fn broker_seconds(&self) -> Option<f64> {
        let now = cpu_ticks(&self.broker?.to_string())?;
        Some(now.saturating_sub(self.broker_ticks?) as f64 / 100.0)
    }

    /// Percent of one core each used since the start: `{"broker": .., "generator": ..}`.
    fn percent(&self) -> serde_json::Value {
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-9);
        let percent = |before: Option<u64>, now: Option<u64>| match (before, now) {
            (Some(b), Some(n)) => {
                serde_json::json!((n.saturating_sub(b) as f64 / 100.0 / elapsed * 100.0).round())
            }
            _ => serde_json::Value::Null,
        };
        serde_json::json!({
            "broker": percent(self.broker_ticks, self.broker.and_then(|pid| cpu_ticks(&pid.to_string()))),
            "generator": percent(self.own_ticks, cpu_ticks("self")),
        })
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

async fn conns(
    url: &str,
    options: &Options,
    args: ConnsArgs,
) -> Result<serde_json::Value, BenchError> {
    if args.transport != Technique::Ws {
        return idle_readers(url, args).await;
    }
    let target = target(url, options)?;
    let tokens = match &args.tokens {
        Some(path) => {
            let name = path.display().to_string();
            let text =
                std::fs::read_to_string(path).map_err(|e| BenchError::File(name.clone(), e))?;
            let tokens: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect();
            if tokens.is_empty() {
                return Err(BenchError::NoTokens(name));
            }
            tokens
        }
        None => Vec::new(),
    };
    let tag = unique("bench");
    let before = args.pid.and_then(rss_kib);
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(args.seconds);
    let started = Instant::now();
    let cpu = CpuMeter::start(args.pid);
    let rooms = args.rooms.unwrap_or(args.connections.div_ceil(10)).max(1);
    let mut connected: Vec<(usize, WireReader, WireWriter)> = Vec::with_capacity(args.connections);
    let mut pending = FuturesUnordered::new();
    let mut next = 0usize;
    while connected.len() < args.connections {
        while pending.len() < args.parallel && next < args.connections {
            let room = next % rooms;
            let destination = format!("/topic/room.{tag}-{room}");
            // Distinct names make distinct room members; a login given on the command line
            // (RabbitMQ's guest) is kept.
            let mut target = match target.login {
                Some(_) => target.clone(),
                None => target.with_login(format!("u{next}")),
            };
            if let Some(prefix) = &args.passcode_prefix {
                target.passcode = Some(format!("{prefix}{next}"));
            } else if !tokens.is_empty() {
                target.passcode = Some(tokens[next % tokens.len()].clone());
            }
            pending.push(async move {
                let (mut reader, mut writer) = open(&target, options).await?;
                // CONNECT, SUBSCRIBE and its RECEIPT, as a page does.
                subscribe(&mut reader, &mut writer, &destination).await?;
                Ok::<_, BenchError>((room, reader, writer))
            });
            next += 1;
        }
        match tokio::time::timeout_at(deadline, pending.next()).await {
            Ok(Some(result)) => connected.push(result?),
            Ok(None) => break,
            Err(_) => return Err(BenchError::Timeout(args.seconds)),
        }
    }
    let elapsed = started.elapsed();
    let cpu = cpu.percent();
    // Let join notices settle so resident memory is measured idle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = args.pid.and_then(rss_kib);
    // A room message still reaches every member of its room.
    let probe_room = connected.first().map_or(0, |c| c.0);
    let probe_destination = format!("/topic/room.{tag}-{probe_room}");
    if let Some((_, _, writer)) = connected.first_mut() {
        let probe = Frame::new(Command::Send)
            .with_header("destination", &probe_destination)
            .with_body("probe");
        writer.send(&probe).await?;
    }
    let mut members = 0usize;
    let mut reached = 0usize;
    let probe_deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for (_, reader, _) in connected
        .iter_mut()
        .filter(|(room, _, _)| *room == probe_room)
    {
        members += 1;
        // Join notices of later members come first; the probe follows them.
        while let Ok(Ok(m)) = tokio::time::timeout_at(probe_deadline, reader.next()).await {
            if m.command == Command::Message && &m.body[..] == b"probe" {
                reached += 1;
                break;
            }
        }
    }
    tokio::time::sleep(Duration::from_secs_f64(args.hold.max(0.0))).await;
    for (_, _, writer) in connected {
        hang_up(writer).await;
    }
    let mut result = conns_result(
        url,
        &args,
        rooms,
        elapsed,
        (before, after),
        (members, reached),
    );
    result["cpu_percent_while_connecting"] = cpu;
    Ok(result)
}

/// The conns scenario's figures, whatever the connections are.
fn conns_result(
    url: &str,
    args: &ConnsArgs,
    rooms: usize,
    elapsed: Duration,
    (before, after): (Option<u64>, Option<u64>),
    (members, reached): (usize, usize),
) -> serde_json::Value {
    let per_connection_kib = match (before, after) {
        (Some(b), Some(a)) => Some((a.saturating_sub(b)) as f64 / args.connections as f64),
        _ => None,
    };
    serde_json::json!({
        "scenario": "conns",
        "transport": args.transport.name(),
        "broker": url,
        "connections": args.connections,
        "rooms": rooms,
        "connects_per_sec": per_second(args.connections, elapsed),
        "seconds": elapsed.as_secs_f64(),
        "broker_rss_kib_before": before,
        "broker_rss_kib_after": after,
        "broker_kib_per_connection": per_connection_kib,
        "probe_room_members": members,
        "probe_reached": reached,
    })
}

/// The conns scenario with idle HTTP readers: C Server-Sent Events streams or long polls
/// held open, the broker's memory per reader, and a probe message that must reach every
/// reader of its room.
async fn idle_readers(url: &str, args: ConnsArgs) -> Result<serde_json::Value, BenchError> {
    let technique = args.transport;
    if !matches!(technique, Technique::Sse | Technique::LongPoll) {
        return Err(BenchError::Wire(WireError::Unsupported(format!(
            "conns --transport {}",
            technique.name()
        ))));
    }
    let addr = http_addr(url)?;
    let tag = unique("bench");
    let rooms = args.rooms.unwrap_or(args.connections.div_ceil(10)).max(1);
    let before = args.pid.and_then(rss_kib);
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(args.seconds);
    let requests = Requests::default();
    let reached = Arc::new(AtomicU64::new(0));
    let (ready_tx, mut ready_rx) =
        tokio::sync::mpsc::channel::<Result<(), WireError>>(args.parallel.max(1));
    let mut tasks = Vec::with_capacity(args.connections);
    let mut opened = 0usize;
    for n in 0..args.connections {
        if n >= args.parallel {
            match tokio::time::timeout_at(deadline, ready_rx.recv()).await {
                Ok(Some(ready)) => ready?,
                Ok(None) => break,
                Err(_) => return Err(BenchError::Timeout(args.seconds)),
            }
            opened += 1;
        }
        let room = format!("{tag}-{}", n % rooms);
        let (addr, requests, reached, ready) = (
            addr.clone(),
            requests.clone(),
            reached.clone(),
            ready_tx.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let http = match http::Http::connect(&addr, requests).await {
                Ok(http) => http,
                Err(e) => {
                    let _ = ready.send(Err(e)).await;
                    return;
                }
            };
            let _ = http::idle_reader(http, technique, &room, n, ready, &reached).await;
        }));
    }
    while opened < args.connections {
        match tokio::time::timeout_at(deadline, ready_rx.recv()).await {
            Ok(Some(ready)) => ready?,
            Ok(None) => break,
            Err(_) => return Err(BenchError::Timeout(args.seconds)),
        }
        opened += 1;
    }
    let elapsed = started.elapsed();
    // Long polls are sent but their reader may not be subscribed yet: let them settle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = args.pid.and_then(rss_kib);
    let probe_room = format!("{tag}-0");
    let members = (0..args.connections).filter(|n| n % rooms == 0).count() as u64;
    let mut poster = Poster::connect(&addr, &probe_room, "prober", requests.clone()).await?;
    poster
        .send("probe", "0", &bytes::Bytes::from_static(b"probe"))
        .await?;
    let probe_deadline = Instant::now() + Duration::from_secs(10);
    while reached.load(Ordering::Relaxed) < members && Instant::now() < probe_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs_f64(args.hold.max(0.0))).await;
    for task in tasks {
        task.abort();
    }
    let reached = usize::try_from(reached.load(Ordering::Relaxed)).unwrap_or(usize::MAX);
    let members = usize::try_from(members).unwrap_or(usize::MAX);
    Ok(conns_result(
        url,
        &args,
        rooms,
        elapsed,
        (before, after),
        (members, reached),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_past_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (my (odd) cmd) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 75 0 0 20 0 3 0 1000 2000000 300 18446744073709551615";
        assert_eq!(ticks_in_stat(stat), Some(325));
        assert_eq!(ticks_in_stat("4242 (cut) S 1"), None);
        assert!(cpu_ticks("self").is_some());
    }
}
