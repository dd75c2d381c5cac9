//! Rooms across nodes (`../shared/design/cluster.md`, "Rooms", "Presence", "When things
//! fail"): three `stoa` nodes sharing Debian's `redis-server` (started here on a free port),
//! members on different nodes. Every test counts what each member heard: one `x-seq`
//! order for everyone, no gap, no duplicate, each join and leave notice exactly once.

// Test code: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use integration_tests::{Broker, Conn, Event, Redis, Transport, frame};
use stomp_codec::Frame;

const WAIT: Duration = Duration::from_secs(20);
const NODE_TIMEOUT_MS: u64 = 3000;

fn node(redis: &Redis, name: &str) -> Broker {
    Broker::cluster_node(redis, name, NODE_TIMEOUT_MS, &[])
}

/// What a member heard: a room message or notice.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Heard {
    seq: u64,
    event: Option<String>,
    sender: String,
    body: String,
    replay: bool,
    message_id: String,
}

fn heard(f: &Frame) -> Heard {
    assert_eq!(f.command.as_str(), "MESSAGE", "{f:?}");
    Heard {
        seq: f
            .header("x-seq")
            .unwrap_or_else(|| panic!("no x-seq: {f:?}"))
            .parse()
            .unwrap(),
        event: f.header("x-event").map(str::to_owned),
        sender: f.header("x-sender").unwrap_or_default().to_owned(),
        body: String::from_utf8(f.body.to_vec()).unwrap(),
        replay: f.header("x-replay") == Some("true"),
        message_id: f.header("message-id").unwrap_or_default().to_owned(),
    }
}

/// `user` on `broker`, in `room` (with extra SUBSCRIBE headers); what came before the
/// SUBSCRIBE's RECEIPT.
async fn member(
    broker: &Broker,
    user: &str,
    room: &str,
    extra: &[(&str, &str)],
) -> (Conn, Vec<Heard>) {
    let mut conn = Conn::open(broker, Transport::Tcp).await;
    conn.login(user).await;
    let destination = format!("/topic/room.{room}");
    let mut headers = vec![("id", "r"), ("destination", destination.as_str())];
    headers.extend_from_slice(extra);
    let early = conn
        .send_with_receipt(&frame("SUBSCRIBE", &headers), "joined")
        .await;
    let early = early.iter().map(heard).collect();
    (conn, early)
}

fn say(room: &str, body: &str) -> Frame {
    frame("SEND", &[("destination", &format!("/topic/room.{room}"))]).with_body(body.to_owned())
}

/// Reads room messages until one with body `last` (kept in the list), at most [`WAIT`].
async fn until_body(conn: &mut Conn, last: &str) -> Vec<Heard> {
    until(conn, |h| h.body == last && h.event.is_none()).await
}

/// Sends with a receipt; the `x-seq` the RECEIPT gave, and what came before it.
async fn send_numbered(conn: &mut Conn, room: &str, body: &str) -> (u64, Vec<Heard>) {
    let mut f = say(room, body);
    f.headers.push("receipt", body);
    conn.send(&f).await;
    let mut before = Vec::new();
    loop {
        let f = conn.expect_frame().await;
        if f.command.as_str() == "RECEIPT" {
            assert_eq!(f.header("receipt-id"), Some(body));
            return (f.header("x-seq").unwrap().parse().unwrap(), before);
        }
        before.push(heard(&f));
    }
}

/// Checks that `heard` runs 1 by 1 from its first `x-seq` with no gap and no duplicate.
fn assert_in_order(who: &str, heard: &[Heard]) {
    for pair in heard.windows(2) {
        assert_eq!(
            pair[1].seq,
            pair[0].seq + 1,
            "{who}: a gap or a repeat: {heard:#?}"
        );
    }
}

fn notices<'a>(heard: &'a [Heard], event: &str, user: &str) -> Vec<&'a Heard> {
    heard
        .iter()
        .filter(|h| h.event.as_deref() == Some(event) && h.sender == user)
        .collect()
}

#[tokio::test]
async fn members_on_three_nodes_hear_one_numbering_with_no_gap_and_no_repeat() {
    let redis = Redis::start();
    let nodes = [
        node(&redis, "node-a"),
        node(&redis, "node-b"),
        node(&redis, "node-c"),
    ];
    let users = ["alice", "bob", "carol"];
    let mut members = Vec::new();
    let mut early = Vec::new();
    for (broker, user) in nodes.iter().zip(users) {
        let (conn, before) = member(broker, user, "lobby", &[]).await;
        members.push(conn);
        early.push(before);
    }
    // Everyone talks at once: 40 messages each, interleaved across the nodes.
    let mut receipts: BTreeMap<String, u64> = BTreeMap::new();
    let mut logs: Vec<Vec<Heard>> = early;
    for i in 0..40 {
        for (k, conn) in members.iter_mut().enumerate() {
            let body = format!("{}-{i}", users[k]);
            conn.send(&{
                let mut f = say("lobby", &body);
                f.headers.push("receipt", &body);
                f
            })
            .await;
        }
    }
    for (k, conn) in members.iter_mut().enumerate() {
        let mut mine = 0;
        let deadline = Instant::now() + WAIT;
        // Every member's own 40 receipts, and everyone's 120 messages.
        while mine < 40 || logs[k].iter().filter(|h| h.event.is_none()).count() < 120 {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(Event::Frame(f)) = conn.next_event_within(left).await else {
                panic!("{}: not everything arrived: {:?}", users[k], logs[k]);
            };
            if f.command.as_str() == "RECEIPT" {
                let id = f.header("receipt-id").unwrap().to_owned();
                let seq = f
                    .header("x-seq")
                    .expect("a RECEIPT names the x-seq")
                    .parse()
                    .unwrap();
                assert!(receipts.insert(id, seq).is_none());
                mine += 1;
            } else {
                logs[k].push(heard(&f));
            }
        }
    }
    // Each member: no gap, no repeat, from its first message on.
    for (k, h) in logs.iter().enumerate() {
        assert_in_order(users[k], h);
    }
    // One numbering for everyone: the same x-seq is the same message on every node, and
    // the one its sender's RECEIPT named.
    let by_seq = |h: &Vec<Heard>| -> BTreeMap<u64, (Option<String>, String, String)> {
        h.iter()
            .map(|h| (h.seq, (h.event.clone(), h.sender.clone(), h.body.clone())))
            .collect()
    };
    let carol = by_seq(&logs[2]);
    for (k, h) in logs.iter().enumerate().take(2) {
        for (seq, what) in by_seq(h) {
            if let Some(theirs) = carol.get(&seq) {
                assert_eq!(
                    &what, theirs,
                    "{} and carol differ at x-seq {seq}",
                    users[k]
                );
            }
        }
    }
    for (body, seq) in &receipts {
        let (_, sender, said) = &carol[seq];
        assert_eq!(said, body, "the RECEIPT's x-seq is the message's");
        assert!(body.starts_with(sender.as_str()));
    }
    // Messages from three nodes, one message-id each, never the same.
    let ids: std::collections::BTreeSet<&str> =
        logs[2].iter().map(|h| h.message_id.as_str()).collect();
    assert_eq!(
        ids.len(),
        logs[2].len(),
        "message-ids unique in the cluster"
    );
    // Carol joined last: she heard her own join first, then all 120 messages.
    assert_eq!(logs[2][0].event.as_deref(), Some("join"));
    assert_eq!(logs[2][0].sender, "carol");
    assert_eq!(receipts.len(), 120);
    // Alice, first in, heard bob's and carol's joins once each.
    assert_eq!(notices(&logs[0], "join", "bob").len(), 1);
    assert_eq!(notices(&logs[0], "join", "carol").len(), 1);
}

#[tokio::test]
async fn x_since_from_another_node_replays_then_goes_live_and_history_survives_every_node() {
    let redis = Redis::start();
    let mut a = node(&redis, "node-a");
    let mut b = node(&redis, "node-b");
    let (mut alice, _) = member(&a, "alice", "den", &[]).await;
    let mut seqs = Vec::new();
    for i in 1..=10 {
        seqs.push(send_numbered(&mut alice, "den", &format!("m{i}")).await.0);
    }
    // Bob, on the other node, saw up to m3 before his connection broke.
    let since = seqs[2].to_string();
    let (mut bob, early) = member(&b, "bob", "den", &[("x-since", &since)]).await;
    let mut got = early;
    if !got.iter().any(|h| h.body == "m10") {
        got.extend(until_body(&mut bob, "m10").await);
    }
    let replayed: Vec<&str> = got
        .iter()
        .filter(|h| h.replay)
        .map(|h| h.body.as_str())
        .collect();
    assert_eq!(replayed, ["m4", "m5", "m6", "m7", "m8", "m9", "m10"]);
    // Then live, in order, no gap: his own join, then what alice says now.
    send_numbered(&mut alice, "den", "live").await;
    got.extend(until_body(&mut bob, "live").await);
    assert_in_order("bob", &got);
    assert_eq!(got.first().map(|h| h.seq), Some(seqs[2] + 1));
    assert_eq!(notices(&got, "join", "bob").len(), 1);
    // Every node stops; history is in Redis.
    drop((alice, bob));
    assert!(a.terminate().success());
    assert!(b.terminate().success());
    let c = node(&redis, "node-c");
    let (mut carol, early) = member(&c, "carol", "den", &[("x-history", "3")]).await;
    let mut got = early;
    let carol_joined = |h: &Heard| h.event.as_deref() == Some("join") && h.sender == "carol";
    if !got.iter().any(carol_joined) {
        got.extend(until(&mut carol, carol_joined).await);
    }
    let replayed: Vec<&Heard> = got.iter().filter(|h| h.replay).collect();
    assert_eq!(replayed.len(), 3, "{got:#?}");
    assert_eq!(replayed[0].body, "live");
    let mut left: Vec<&str> = replayed[1..].iter().map(|h| h.sender.as_str()).collect();
    left.sort_unstable();
    assert_eq!(left, ["alice", "bob"], "both left when their node stopped");
    assert!(
        replayed[1..]
            .iter()
            .all(|h| h.event.as_deref() == Some("leave"))
    );
    assert_in_order("carol", &got);
}

/// Reads room messages until one satisfies `last` (kept in the list), at most [`WAIT`].
async fn until(conn: &mut Conn, last: impl Fn(&Heard) -> bool) -> Vec<Heard> {
    let deadline = Instant::now() + WAIT;
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match conn.next_event_within(left).await {
            Some(Event::Frame(f)) => {
                let h = heard(&f);
                let done = last(&h);
                got.push(h);
                if done {
                    return got;
                }
            }
            other => panic!("still waiting after {got:#?}: {other:?}"),
        }
    }
}

/// Sends a marker from `conn` and reads `watcher` up to it: everything the watcher heard
/// in between, marker included.
async fn heard_up_to_marker(
    conn: &mut Conn,
    watcher: &mut Conn,
    room: &str,
    marker: &str,
) -> Vec<Heard> {
    send_numbered(conn, room, marker).await;
    until_body(watcher, marker).await
}

/// `/app/room.<room>.members` asked on `broker`: the member names.
async fn members_seen_from(broker: &Broker, room: &str) -> Vec<String> {
    let mut conn = Conn::open(broker, Transport::Tcp).await;
    conn.login("asker").await;
    let destination = format!("/app/room.{room}.members");
    let sub = frame("SUBSCRIBE", &[("id", "q"), ("destination", &destination)]);
    let before = conn.send_with_receipt(&sub, "asked").await;
    let answer = match before.into_iter().next() {
        Some(f) => f,
        None => conn.expect_frame().await,
    };
    let json: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    json["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_user_joins_on_the_first_session_anywhere_and_leaves_on_the_last_exactly_once() {
    let redis = Redis::start();
    let a = node(&redis, "node-a");
    let b = node(&redis, "node-b");
    let c = node(&redis, "node-c");
    let (mut watcher, _) = member(&c, "watcher", "hall", &[]).await;
    let (alice_a, _) = member(&a, "alice", "hall", &[]).await;
    let (alice_b, _) = member(&b, "alice", "hall", &[]).await;
    let heard = heard_up_to_marker(
        &mut Conn::open_as(&a, "marker-1").await,
        &mut watcher,
        "hall",
        "after both joined",
    )
    .await;
    assert_eq!(notices(&heard, "join", "alice").len(), 1, "{heard:#?}");
    // Cluster-wide from any node, HTTP and STOMP alike.
    assert_eq!(members_seen_from(&b, "hall").await, ["alice", "watcher"]);
    let (status, body) = c.http_get("/api/rooms/hall").await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["members"], serde_json::json!(["alice", "watcher"]));
    let (_, body) = a.http_get("/api/rooms").await;
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let hall = json["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["room"] == "hall")
        .unwrap()
        .clone();
    assert_eq!(hall["members"], 2);
    // One of alice's sessions goes: she is still in the room.
    alice_a.close().await;
    let mut marker = Conn::open_as(&b, "marker-2").await;
    let heard = heard_up_to_marker(&mut marker, &mut watcher, "hall", "after one left").await;
    assert!(notices(&heard, "leave", "alice").is_empty(), "{heard:#?}");
    // Her last goes: one leave notice.
    alice_b.close().await;
    let deadline = Instant::now() + WAIT;
    let mut heard = Vec::new();
    while notices(&heard, "leave", "alice").is_empty() {
        assert!(Instant::now() < deadline, "no leave notice: {heard:#?}");
        heard.extend(heard_up_to_marker(&mut marker, &mut watcher, "hall", "probe").await);
    }
    heard.extend(heard_up_to_marker(&mut marker, &mut watcher, "hall", "after both left").await);
    assert_eq!(notices(&heard, "leave", "alice").len(), 1, "{heard:#?}");
    assert_eq!(members_seen_from(&a, "hall").await, ["watcher"]);
}

#[tokio::test]
async fn a_killed_node_s_users_leave_once_within_the_node_timeout_and_its_clients_resume() {
    let redis = Redis::start();
    let mut a = node(&redis, "node-a");
    let b = node(&redis, "node-b");
    let (mut watcher, _) = member(&b, "watcher", "plaza", &[]).await;
    let (mut alice, _) = member(&a, "alice", "plaza", &[]).await;
    // Dave is on both nodes: losing one session does not take him out.
    let (_dave_a, _) = member(&a, "dave", "plaza", &[]).await;
    let (_dave_b, _) = member(&b, "dave", "plaza", &[]).await;
    let (seen, _) = send_numbered(&mut alice, "plaza", "before the crash").await;
    a.kill();
    let killed = Instant::now();
    let heard = until(&mut watcher, |h| {
        h.event.as_deref() == Some("leave") && h.sender == "alice"
    })
    .await;
    assert!(
        killed.elapsed() < Duration::from_millis(NODE_TIMEOUT_MS + 2000),
        "left after {:?}",
        killed.elapsed()
    );
    let mut marker = Conn::open_as(&b, "marker").await;
    let mut heard = heard;
    heard.extend(heard_up_to_marker(&mut marker, &mut watcher, "plaza", "after the crash").await);
    assert_eq!(notices(&heard, "leave", "alice").len(), 1, "{heard:#?}");
    assert!(
        notices(&heard, "leave", "dave").is_empty(),
        "dave is still on node b"
    );
    assert_eq!(members_seen_from(&b, "plaza").await, ["dave", "watcher"]);
    // Alice reconnects to node b and resumes after what she saw: no gap, no repeat.
    let since = seen.to_string();
    let (mut back, early) = member(&b, "alice", "plaza", &[("x-since", &since)]).await;
    let mut got = early;
    let rejoined = |h: &Heard| h.event.as_deref() == Some("join") && h.sender == "alice";
    if !got.iter().any(rejoined) {
        got.extend(until(&mut back, rejoined).await);
    }
    assert_in_order("alice", &got);
    assert_eq!(got[0].seq, seen + 1);
    assert!(got.iter().any(|h| h.body == "after the crash"));
}

#[tokio::test]
async fn a_frozen_node_declared_dead_closes_its_sessions_and_rejoins_when_it_resumes() {
    let redis = Redis::start();
    let a = node(&redis, "node-a");
    let b = node(&redis, "node-b");
    let (mut watcher, _) = member(&b, "watcher", "attic", &[]).await;
    let (mut alice, _) = member(&a, "alice", "attic", &[]).await;
    signal(&a, "STOP");
    until(&mut watcher, |h| {
        h.event.as_deref() == Some("leave") && h.sender == "alice"
    })
    .await;
    signal(&a, "CONT");
    // Within the node time-out of resuming, alice's session ends with the reason.
    error_after_messages(&mut alice, "cluster membership lost").await;
    // No stale notice: alice left once, and did not come back.
    let mut marker = Conn::open_as(&b, "marker").await;
    let heard = heard_up_to_marker(&mut marker, &mut watcher, "attic", "after").await;
    assert!(notices(&heard, "leave", "alice").is_empty(), "{heard:#?}");
    assert!(notices(&heard, "join", "alice").is_empty(), "{heard:#?}");
    // It is a member again, and serves.
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, body) = b.http_get("/api/nodes").await;
        if body.contains("node-a") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node-a never listed again: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut again, _) = member(&a, "alice", "attic", &[]).await;
    send_numbered(&mut again, "attic", "back").await;
    let heard = until_body(&mut watcher, "back").await;
    assert_eq!(notices(&heard, "join", "alice").len(), 1, "{heard:#?}");
}

/// Reads past room messages to an ERROR whose message contains `needle`, then the close.
async fn error_after_messages(conn: &mut Conn, needle: &str) {
    loop {
        let f = conn.expect_frame().await;
        if f.command.as_str() == "MESSAGE" {
            continue;
        }
        assert_eq!(f.command.as_str(), "ERROR", "{f:?}");
        assert!(
            f.header("message").unwrap_or_default().contains(needle),
            "{f:?}"
        );
        conn.expect_closed().await;
        return;
    }
}

fn signal(broker: &Broker, which: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{which}"), &broker.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn rooms_carry_on_after_redis_restarts_and_a_send_without_redis_ends_with_cluster_unavailable()
 {
    let dir = std::env::temp_dir().join(format!("stoa-redis-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut redis = Redis::start_durable(&dir);
    let a = node(&redis, "node-a");
    let b = node(&redis, "node-b");
    let (mut watcher, mut heard) = member(&b, "watcher", "cellar", &[]).await;
    let (mut alice, _) = member(&a, "alice", "cellar", &[]).await;
    send_numbered(&mut alice, "cellar", "before").await;
    heard.extend(until_body(&mut watcher, "before").await);
    redis.stop();
    // A SEND that needs Redis waits at most --cluster-timeout-ms (2 s here), then ends.
    let started = Instant::now();
    let mut f = say("cellar", "during");
    f.headers.push("receipt", "during");
    alice.send(&f).await;
    error_after_messages(&mut alice, "cluster unavailable").await;
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    // Redis comes back with what it kept: the nodes serve again, unrestarted.
    let _back = redis.restart();
    let deadline = Instant::now() + WAIT;
    let mut bob = loop {
        let mut conn = Conn::open_as(&a, "bob").await;
        let sub = frame(
            "SUBSCRIBE",
            &[
                ("id", "r"),
                ("destination", "/topic/room.cellar"),
                ("receipt", "in"),
            ],
        );
        conn.send(&sub).await;
        match conn.next_event_within(WAIT).await {
            Some(Event::Frame(f)) if f.command.as_str() != "ERROR" => break conn,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "node a never served again: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let mut f = say("cellar", "after");
    f.headers.push("receipt", "after");
    bob.send(&f).await;
    heard.extend(until_body(&mut watcher, "after").await);
    // Alice's leave is posted once her connection has closed, which may come later.
    if notices(&heard, "leave", "alice").is_empty() {
        heard.extend(until(&mut watcher, |h| h.event.as_deref() == Some("leave")).await);
    }
    let mut marker = Conn::open_as(&b, "marker").await;
    heard.extend(heard_up_to_marker(&mut marker, &mut watcher, "cellar", "last").await);
    // The watcher, connected throughout: no gap, no repeat; alice left once; the SEND
    // that got no RECEIPT was not kept.
    assert_in_order("watcher", &heard);
    assert_eq!(notices(&heard, "leave", "alice").len(), 1, "{heard:#?}");
    assert!(!heard.iter().any(|h| h.body == "during"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn redis_refusing_writes_is_an_outage_for_those_frames_and_nothing_is_half_written() {
    let redis = Redis::start();
    let a = node(&redis, "node-a");
    let (mut watcher, mut heard) = member(&a, "watcher", "vault", &[]).await;
    let (mut alice, _) = member(&a, "alice", "vault", &[]).await;
    let (kept, _) = send_numbered(&mut alice, "vault", "before").await;
    heard.extend(until_body(&mut watcher, "before").await);
    // Out of memory under maxmemory with noeviction (Debian's default policy).
    assert_eq!(redis.command(&["CONFIG", "SET", "maxmemory", "1"]), "+OK");
    let deadline = Instant::now() + WAIT;
    let body = loop {
        let (status, body) = a.http_get("/healthz").await;
        if status == 503 {
            break body;
        }
        assert!(Instant::now() < deadline, "healthz stayed {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["status"], "degraded");
    assert!(json["reason"].as_str().unwrap().contains("OOM"), "{json}");
    let mut f = say("vault", "during");
    f.headers.push("receipt", "during");
    alice.send(&f).await;
    error_after_messages(&mut alice, "cluster unavailable").await;
    // The next x-seq was not taken, nothing was kept.
    assert_eq!(
        redis.command(&["HGET", "stoa:room:vault", "seq"]),
        format!("${} {kept}", kept.to_string().len())
    );
    assert_eq!(
        redis.command(&["XLEN", "stoa:room:vault:log"]),
        format!(":{kept}")
    );
    // Memory back: the node serves again, unrestarted, and the room goes on without a gap.
    assert_eq!(redis.command(&["CONFIG", "SET", "maxmemory", "0"]), "+OK");
    let deadline = Instant::now() + WAIT;
    while a.http_get("/healthz").await.0 != 200 {
        assert!(Instant::now() < deadline, "healthz never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut marker = Conn::open_as(&a, "marker").await;
    heard.extend(heard_up_to_marker(&mut marker, &mut watcher, "vault", "after").await);
    assert_in_order("watcher", &heard);
    assert!(!heard.iter().any(|h| h.body == "during"));
}

/// The bodies of the room messages `broker` serves over HTTP from the start, and whether it
/// says some are no longer kept.
async fn kept_bodies(broker: &Broker, room: &str) -> (Vec<String>, bool) {
    let (status, text) = broker
        .http_get(&format!("/api/rooms/{room}/messages?since=0"))
        .await;
    assert_eq!(status, 200, "{text}");
    let view: serde_json::Value = serde_json::from_str(&text).unwrap();
    let bodies = view["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["event"] == "message")
        .map(|m| m["body"].as_str().unwrap_or_default().to_owned())
        .collect();
    (bodies, view.get("gap").is_some())
}

#[tokio::test]
async fn an_operator_clears_a_rooms_history_in_redis_and_in_every_nodes_copy() {
    let redis = Redis::start();
    let a = node(&redis, "a");
    let b = node(&redis, "b");
    // Node b holds a copy of the room for its member; a pattern watcher on a hears the room.
    let (mut bea, _) = member(&b, "bea", "kept", &[]).await;
    let mut watcher = Conn::open_as(&a, "watcher").await;
    watcher.subscribe("w", "/topic/room.*").await;
    let mut ann = Conn::open_as(&a, "ann").await;
    send_numbered(&mut ann, "kept", "old 1").await;
    send_numbered(&mut ann, "kept", "old 2").await;
    until_body(&mut bea, "old 2").await;
    until_body(&mut watcher, "old 2").await;
    let (status, _, answer) = a
        .http_request("POST", "/admin/api/rooms/kept/clear", &[])
        .await;
    assert_eq!(status, 200, "{answer}");
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["cleared"], 3, "bea's join notice and two messages");
    let (seq, _) = send_numbered(&mut ann, "kept", "after").await;
    // Nobody is told anything but the next message, numbered on from before.
    let heard = until_body(&mut bea, "after").await;
    assert_eq!(heard.len(), 1, "{heard:?}");
    assert_eq!(heard[0].seq, 4);
    assert_eq!(seq, 4);
    let heard = until_body(&mut watcher, "after").await;
    assert_eq!(heard.len(), 1, "{heard:?}");
    // Node b replays from its copy, node a from Redis: neither keeps the old messages.
    for broker in [&a, &b] {
        let (bodies, gap) = kept_bodies(broker, "kept").await;
        assert_eq!(bodies, vec!["after".to_owned()]);
        assert!(gap, "recovering from before the clear is told what is gone");
    }
    let (status, _, _) = b
        .http_request("POST", "/admin/api/rooms/never/clear", &[])
        .await;
    assert_eq!(status, 404);
}
