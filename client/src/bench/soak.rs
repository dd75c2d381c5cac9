//! `stoa-cli bench soak`: a chat-like mix for a bounded time — room messages, typing, direct
//! messages, members leaving and rejoining rooms, connections dropped and made again —
//! sampling the broker's resident memory, open descriptors and deliveries as it goes.
//!
//! In: a broker URL and the mix's sizes. Out: the samples and a summary: growth of memory and
//! descriptors after warm-up, and what was lost. Nothing may be lost: every member checks
//! that its room's `x-seq` numbers arrive without a hole (rejoining with `x-since`, as the
//! page does), and every direct message sent must arrive (they wait for offline users).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use client::Options;
use stomp_codec::{Command, Frame};

use super::wire::{Target, WireError};
use super::{BenchError, open, rss_kib, target, unique};

/// The soak scenario's sizes.
#[derive(Debug, Args)]
pub struct SoakArgs {
    /// Seconds to run.
    #[arg(long, default_value_t = 1200.0)]
    seconds: f64,
    /// Rooms.
    #[arg(long, default_value_t = 100)]
    rooms: usize,
    /// Members per room (each its own connection).
    #[arg(long, default_value_t = 10)]
    members: usize,
    /// Room messages per second, all members together (each reaches every member).
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 10.0)]
    sample_every: f64,
    /// Share of the run counted as warm-up (memory fills history to its caps meanwhile).
    #[arg(long, default_value_t = 0.25)]
    warm_up: f64,
    /// The broker's process id, to sample its memory and descriptors.
    #[arg(long)]
    pid: Option<u32>,
}

/// What every member counts.
#[derive(Debug, Default)]
struct Counts {
    room_sent: AtomicU64,
    room_received: AtomicU64,
    /// Room `x-seq` numbers a member never saw (holes in its sequence).
    room_missed: AtomicU64,
    dm_sent: AtomicU64,
    dm_received: AtomicU64,
    typing_sent: AtomicU64,
    rejoins: AtomicU64,
    reconnects: AtomicU64,
    errors: AtomicU64,
}

/// Open descriptors of a process.
fn fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// A small deterministic generator for the mix (which member talks, when they leave).
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        // xorshift64*: the mix only needs to vary, not to be unpredictable.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// `true` once in `n` throws.
    fn one_in(&mut self, n: u64) -> bool {
        self.next().is_multiple_of(n.max(1))
    }
}

/// One member: a connection in its room and its direct messages, until `end`.
async fn member(
    target: Target,
    n: usize,
    room: String,
    peers: usize,
    interval: Duration,
    end: tokio::time::Instant,
    counts: Arc<Counts>,
) -> Result<(), BenchError> {
    let mut dice = Dice(0x9e37_79b9_7f4a_7c15 ^ (n as u64 + 1));
    // The last tenth (at most 10 s): nobody sends or hangs up, so that what was sent last
    // (direct messages to members who had just left above all) arrives before the end.
    let quiet = (end - tokio::time::Instant::now())
        .div_f64(10.0)
        .min(Duration::from_secs(10));
    let send_until = end - quiet;
    let destination = format!("/topic/room.{room}");
    let mut last_seq = 0u64;
    while tokio::time::Instant::now() < end {
        let (mut reader, mut writer) = open(&target, &Options::default()).await?;
        writer
            .send(
                &Frame::new(Command::Subscribe)
                    .with_header("destination", "/user/queue/dm")
                    .with_header("id", "dm"),
            )
            .await?;
        let join = |since: u64| {
            let frame = Frame::new(Command::Subscribe)
                .with_header("destination", &destination)
                .with_header("id", "room");
            if since > 0 {
                frame.with_header("x-since", &since.to_string())
            } else {
                frame
            }
        };
        writer.send(&join(last_seq)).await?;
        let mut ticks = tokio::time::interval_at(
            tokio::time::Instant::now() + interval.mul_f64((n % 97) as f64 / 97.0),
            interval,
        );
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Connections last between about one and three minutes, or to the end.
        let hang_up_at = tokio::time::Instant::now() + Duration::from_secs(60 + dice.next() % 120);
        let hang_up_at = if hang_up_at < send_until {
            hang_up_at
        } else {
            end
        };
        let mut in_room = true;
        loop {
            tokio::select! {
                frame = reader.next() => {
                    let frame = match frame {
                        Ok(frame) => frame,
                        Err(WireError::Closed) => break,
                        Err(e) => return Err(e.into()),
                    };
                    match frame.command {
                        Command::Message if frame.header("subscription") == Some("dm") => {
                            counts.dm_received.fetch_add(1, Ordering::Relaxed);
                        }
                        Command::Message => {
                            let Some(seq) = frame.header("x-seq").and_then(|s| s.parse::<u64>().ok()) else {
                                continue; // typing, not kept
                            };
                            if seq <= last_seq {
                                continue; // replay overlapping what was seen
                            }
                            if last_seq > 0 && seq > last_seq + 1 {
                                counts.room_missed.fetch_add(seq - last_seq - 1, Ordering::Relaxed);
                            }
                            last_seq = seq;
                            counts.room_received.fetch_add(1, Ordering::Relaxed);
                        }
                        Command::Error => {
                            counts.errors.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        _ => {}
                    }
                }
                at = ticks.tick() => {
                    if at >= hang_up_at {
                        break;
                    }
                    if at >= send_until {
                        continue;
                    }
                    if !in_room {
                        writer.send(&join(last_seq)).await?;
                        in_room = true;
                        counts.rejoins.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    // Most ticks a message; now and then typing first, a direct message, or
                    // a walk out of the room (back at the next tick, with x-since).
                    if dice.one_in(5) {
                        writer
                            .send(&Frame::new(Command::Send)
                                .with_header("destination", &destination)
                                .with_header("x-transient", "true")
                                .with_header("x-typing", "true"))
                            .await?;
                        counts.typing_sent.fetch_add(1, Ordering::Relaxed);
                    }
                    writer
                        .send(&Frame::new(Command::Send)
                            .with_header("destination", &destination)
                            .with_body(format!("message {} from m{n}", dice.next() % 1000)))
                        .await?;
                    counts.room_sent.fetch_add(1, Ordering::Relaxed);
                    if dice.one_in(10) {
                        let to = dice.next() as usize % peers;
                        writer
                            .send(&Frame::new(Command::Send)
                                .with_header("destination", &format!("/user/m{to}/queue/dm"))
                                .with_body("psst"))
                            .await?;
                        counts.dm_sent.fetch_add(1, Ordering::Relaxed);
                    }
                    if dice.one_in(50) {
                        writer
                            .send(&Frame::new(Command::Unsubscribe).with_header("id", "room"))
                            .await?;
                        in_room = false;
                    }
                }
            }
        }
        // A clean goodbye most of the time; now and then the socket just goes.
        if dice.one_in(3) {
            drop(writer);
        } else {
            let _ = writer.send(&Frame::new(Command::Disconnect)).await;
        }
        drop(reader);
        if tokio::time::Instant::now() < end {
            counts.reconnects.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Runs the soak; the samples and the verdict as JSON.
///
/// # Errors
/// A member's connection failed in a way a client would not retry.
pub async fn soak(
    url: &str,
    options: &Options,
    args: SoakArgs,
) -> Result<serde_json::Value, BenchError> {
    let base = target(url, options)?;
    let tag = unique("soak");
    let counts = Arc::new(Counts::default());
    let started = Instant::now();
    let end = tokio::time::Instant::now() + Duration::from_secs_f64(args.seconds);
    let peers = args.rooms * args.members;
    // Each member sends every `interval`: `rate` messages a second in all.
    let interval = Duration::from_secs_f64(peers as f64 / args.rate.max(0.001));
    let mut members = Vec::with_capacity(peers);
    for n in 0..peers {
        let target = base.with_login(format!("m{n}"));
        let room = format!("{tag}-{}", n % args.rooms);
        let counts = counts.clone();
        members.push(tokio::spawn(member(
            target, n, room, peers, interval, end, counts,
        )));
    }
    let mut samples = Vec::new();
    let every = Duration::from_secs_f64(args.sample_every.max(0.1));
    let mut ticks = tokio::time::interval(every);
    while tokio::time::Instant::now() < end {
        ticks.tick().await;
        let sample = serde_json::json!({
            "seconds": started.elapsed().as_secs_f64().round(),
            "rss_kib": args.pid.and_then(rss_kib),
            "fds": args.pid.and_then(fds),
            "room_received": counts.room_received.load(Ordering::Relaxed),
            "dm_received": counts.dm_received.load(Ordering::Relaxed),
        });
        eprintln!("soak: {sample}");
        samples.push(sample);
    }
    let mut failures = Vec::new();
    for member in members {
        match member.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(e.to_string()),
            Err(e) => failures.push(e.to_string()),
        }
    }
    // Direct messages to members that were away arrive when they are back; the last
    // ones sent may still be on their way.
    let drain = Instant::now();
    while counts.dm_received.load(Ordering::Relaxed) < counts.dm_sent.load(Ordering::Relaxed)
        && drain.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after_warm_up: Vec<&serde_json::Value> = samples
        .iter()
        .filter(|s| s["seconds"].as_f64().unwrap_or(0.0) >= args.seconds * args.warm_up)
        .collect();
    let growth = |key: &str| {
        let first = after_warm_up.first()?[key].as_f64()?;
        let max = after_warm_up
            .iter()
            .filter_map(|s| s[key].as_f64())
            .fold(first, f64::max);
        Some((max - first) / first.max(1.0) * 100.0)
    };
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    Ok(serde_json::json!({
        "scenario": "soak",
        "broker": url,
        "seconds": args.seconds,
        "rooms": args.rooms,
        "members": args.members,
        "rate": args.rate,
        "room_sent": load(&counts.room_sent),
        "room_received": load(&counts.room_received),
        "room_missed": load(&counts.room_missed),
        "dm_sent": load(&counts.dm_sent),
        "dm_received": load(&counts.dm_received),
        "dm_lost": load(&counts.dm_sent).saturating_sub(load(&counts.dm_received)),
        "typing_sent": load(&counts.typing_sent),
        "rejoins": load(&counts.rejoins),
        "reconnects": load(&counts.reconnects),
        "errors": load(&counts.errors),
        "member_failures": failures,
        "rss_growth_after_warm_up_percent": growth("rss_kib"),
        "fds_growth_after_warm_up_percent": growth("fds"),
        "samples": samples,
    }))
}
