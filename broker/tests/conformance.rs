//! What the broker's shared state must do, whatever keeps it (docs/ARCHITECTURE.md,
//! "Several nodes"): rooms numbered without holes, replay then live
//! with no gap and no duplicate, presence transitions exactly once, queue leases, ACK, NACK,
//! prefetch and redelivery, waiting direct messages delivered once.
//!
//! Written at the level of sessions (frames in, frames out, no sockets) against a
//! [`Deployment`]: the nodes clients connect to. [`OneNode`]: every node is the same
//! in-process broker. [`RedisNodes`]: three brokers in this process sharing a Debian
//! `redis-server` started on a free port (`--cluster`). Every test runs on both.
//! Waiting is on the outbox's own wake-up, never a sleep; the clock is the real one, since
//! durable queues and waiting direct messages are confirmed by the store's writer thread,
//! which a paused tokio clock would not wait for (it would jump to the time-out instead).

// Test code: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use broker::Config;
use broker::cluster::Cluster;
use broker::connection::compose;
use broker::outbox::{Outbox, Outgoing};
use broker::server::join_cluster;
use broker::session::Session;
use broker::state::Broker;
use broker::store::MemoryStore;
use bytes::BytesMut;
use stomp_codec::{Command, Decoder, Frame, Limits, Version};

/// How long any one expectation may take: only a missing frame waits it out.
const WAIT: Duration = Duration::from_secs(10);

/// Where clients connect: node `i` of a deployment.
trait Deployment {
    fn node(&self, i: usize) -> Arc<Broker>;
}

/// One in-process broker: every node index is the same broker. Its data directory goes
/// with it.
struct OneNode(Arc<Broker>, std::path::PathBuf);

impl OneNode {
    fn new() -> OneNode {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("stoa-conformance-{}-{n}", std::process::id()));
        let config =
            Config::try_parse_args(["stoa", "--data-dir", &dir.to_string_lossy()]).unwrap();
        OneNode(
            Arc::new(Broker::with_store(config, Arc::new(MemoryStore::default())).unwrap()),
            dir,
        )
    }
}

impl Drop for OneNode {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

impl Deployment for OneNode {
    fn node(&self, _: usize) -> Arc<Broker> {
        self.0.clone()
    }
}

/// Three brokers in this process, each a node of one cluster on its own `redis-server`.
/// Everything it started goes with it.
struct RedisNodes {
    brokers: Vec<Arc<Broker>>,
    redis: std::process::Child,
    dirs: Vec<std::path::PathBuf>,
    _stop: tokio::sync::watch::Sender<bool>,
}

impl RedisNodes {
    async fn new() -> RedisNodes {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let redis = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start redis-server (scripts/test.sh installs Debian's package)");
        // Ready once it accepts a connection.
        let deadline = std::time::Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server never listened"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let mut brokers = Vec::new();
        let mut dirs = Vec::new();
        for i in 0..3 {
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("stoa-conformance-redis-{}-{n}", std::process::id()));
            let url = format!("redis://127.0.0.1:{port}");
            let name = format!("node-{i}");
            let config = Config::try_parse_args([
                "stoa",
                "--data-dir",
                &dir.to_string_lossy(),
                "--cluster",
                &url,
                "--node-name",
                &name,
            ])
            .unwrap();
            let settings = config.cluster_settings().unwrap();
            let cluster = Arc::new(Cluster::join(settings, 0).await.unwrap());
            let broker = Arc::new(
                Broker::with_store(config, Arc::new(MemoryStore::default()))
                    .unwrap()
                    .with_cluster(cluster.clone()),
            );
            join_cluster(&broker, &cluster, &stop_rx, &stop_rx).await;
            brokers.push(broker);
            dirs.push(dir);
        }
        RedisNodes {
            brokers,
            redis,
            dirs,
            _stop: stop,
        }
    }
}

impl Drop for RedisNodes {
    fn drop(&mut self) {
        let _ = self.redis.kill();
        let _ = self.redis.wait();
        for dir in &self.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Deployment for RedisNodes {
    fn node(&self, i: usize) -> Arc<Broker> {
        self.brokers[i % self.brokers.len()].clone()
    }
}

/// One client's session on one node, and what it has received but not yet looked at.
struct Client {
    session: Option<Session>,
    outbox: Arc<Outbox>,
    inbox: std::collections::VecDeque<Frame>,
    next_receipt: u64,
}

impl Client {
    fn connect(deployment: &dyn Deployment, node: usize, login: &str) -> Client {
        let broker = deployment.node(node);
        let outbox = Arc::new(Outbox::new(broker.shared.config.outbox_bytes));
        let session = Session::new(
            broker.next_session_id(),
            broker.shared.clone(),
            outbox.clone(),
        );
        let mut client = Client {
            session: Some(session),
            outbox,
            inbox: std::collections::VecDeque::new(),
            next_receipt: 0,
        };
        client.handle(frame(
            "CONNECT",
            &[("accept-version", "1.2"), ("host", "x"), ("login", login)],
        ));
        client
    }

    fn handle(&mut self, frame: Frame) {
        let session = self.session.as_mut().unwrap();
        if let Err(rejected) = session.handle(frame) {
            panic!("refused: {}", rejected.error);
        }
    }

    /// Sends `frame` with a receipt and waits for it; the frames before the receipt stay
    /// in the inbox.
    async fn confirmed(&mut self, frame: Frame) -> Frame {
        self.next_receipt += 1;
        let id = format!("r{}", self.next_receipt);
        self.handle(frame.with_header("receipt", &id));
        self.next_where(|f| f.command == Command::Receipt && f.header("receipt-id") == Some(&id))
            .await
    }

    /// Moves what the outbox holds into the inbox, as the writer would write it (batch
    /// after batch: a replay comes a batch at a time).
    fn drain(&mut self) {
        let mut batch = Vec::new();
        while self.outbox.take_all(&mut batch) > 0 {}
        let mut wire = BytesMut::new();
        for item in &batch {
            if let Outgoing::Message { ack: Some(tag), .. } = item {
                self.session.as_mut().unwrap().record_delivery(*tag);
            }
            compose(item, &mut wire);
        }
        let mut decoder = Decoder::with_version(Version::V1_2, Limits::default());
        while let Some(f) = decoder.decode(&mut wire).unwrap() {
            self.inbox.push_back(f);
        }
    }

    /// The first received frame that `matches`, taken out of the inbox (what came before
    /// it stays, in order).
    async fn next_where(&mut self, matches: impl Fn(&Frame) -> bool) -> Frame {
        tokio::time::timeout(WAIT, async {
            loop {
                self.drain();
                if let Some(at) = self.inbox.iter().position(&matches) {
                    return self.inbox.remove(at).unwrap();
                }
                self.outbox.notified().await;
            }
        })
        .await
        .expect("the expected frame did not come")
    }

    /// The next MESSAGE.
    async fn message(&mut self) -> Frame {
        self.next_where(|f| f.command == Command::Message).await
    }

    /// The next MESSAGE that is not a join or leave notice.
    async fn chat(&mut self) -> Frame {
        self.next_where(|f| f.command == Command::Message && f.header("x-event").is_none())
            .await
    }

    /// Whether no message but join and leave notices is waiting now (everything sent so
    /// far has been handled: one node delivers before it answers).
    fn quiet(&mut self) -> bool {
        self.drain();
        !self
            .inbox
            .iter()
            .any(|f| f.command == Command::Message && f.header("x-event").is_none())
    }

    /// Ends the session as a dropped connection does.
    fn drop_connection(&mut self) {
        self.outbox.close();
        self.session = None;
    }
}

fn frame(command: &str, headers: &[(&str, &str)]) -> Frame {
    let mut f = Frame::new(Command::from_bytes(command.as_bytes()).unwrap());
    for (n, v) in headers {
        f.headers.push(n, v);
    }
    f
}

fn subscribe(id: &str, destination: &str, extra: &[(&str, &str)]) -> Frame {
    let mut f = frame("SUBSCRIBE", &[("id", id), ("destination", destination)]);
    for (n, v) in extra {
        f.headers.push(n, v);
    }
    f
}

fn send(destination: &str, body: &str) -> Frame {
    frame("SEND", &[("destination", destination)]).with_body(body.to_owned())
}

fn seq(f: &Frame) -> u64 {
    f.header("x-seq").unwrap().parse().unwrap()
}

// ---- the suite, once per deployment ----

async fn rooms_number_every_message_once_in_one_order(d: &dyn Deployment) {
    let mut clients: Vec<Client> = (0..3)
        .map(|i| Client::connect(d, i, &format!("user{i}")))
        .collect();
    for c in &mut clients {
        let sub = subscribe("s", "/topic/room.numbers", &[("x-history", "0")]);
        c.confirmed(sub).await;
    }
    for round in 0..4 {
        for (i, c) in clients.iter_mut().enumerate() {
            c.confirmed(send("/topic/room.numbers", &format!("{round}-{i}")))
                .await;
        }
    }
    let mut orders = Vec::new();
    for c in &mut clients {
        let mut got = Vec::new();
        while got.len() < 12 {
            got.push(c.chat().await);
        }
        let seqs: Vec<u64> = got.iter().map(seq).collect();
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "no hole, no repeat: {seqs:?}"
        );
        orders.push(got.iter().map(|f| f.body.clone()).collect::<Vec<_>>());
    }
    assert!(
        orders.windows(2).all(|w| w[0] == w[1]),
        "one order for everyone"
    );
}

async fn a_replay_since_joins_live_with_no_gap_and_no_duplicate(d: &dyn Deployment) {
    let mut writer = Client::connect(d, 0, "writer");
    let sub = subscribe("w", "/topic/room.replay", &[("x-history", "0")]);
    writer.confirmed(sub).await;
    let mut seqs = Vec::new();
    for i in 1..=5 {
        let receipt = writer
            .confirmed(send("/topic/room.replay", &format!("m{i}")))
            .await;
        seqs.push(receipt.header("x-seq").unwrap().parse::<u64>().unwrap());
    }
    let since = seqs[1];
    let mut reader = Client::connect(d, 1, "reader");
    let sub = subscribe(
        "r",
        "/topic/room.replay",
        &[("x-since", &since.to_string())],
    );
    reader.confirmed(sub).await;
    writer.confirmed(send("/topic/room.replay", "m6")).await;
    let mut bodies = Vec::new();
    while bodies.len() < 4 {
        let m = reader.chat().await;
        let expected_replay = bodies.len() < 3;
        assert_eq!(
            m.header("x-replay") == Some("true"),
            expected_replay,
            "{m:?}"
        );
        bodies.push(String::from_utf8(m.body.to_vec()).unwrap());
    }
    assert_eq!(bodies, ["m3", "m4", "m5", "m6"]);
    assert!(reader.quiet(), "nothing twice");
}

async fn presence_changes_on_the_first_and_last_session_exactly_once(d: &dyn Deployment) {
    let mut watcher = Client::connect(d, 0, "watcher");
    let sub = subscribe("w", "/topic/room.presence", &[("x-history", "0")]);
    watcher.confirmed(sub).await;
    assert_eq!(
        watcher.message().await.header("x-sender"),
        Some("watcher"),
        "its own join"
    );
    let mut tab1 = Client::connect(d, 1, "alice");
    tab1.confirmed(subscribe("a", "/topic/room.presence", &[]))
        .await;
    let mut tab2 = Client::connect(d, 2, "alice");
    tab2.confirmed(subscribe("a", "/topic/room.presence", &[]))
        .await;
    let mut marker = Client::connect(d, 0, "marker");
    marker
        .confirmed(send("/topic/room.presence", "both tabs in"))
        .await;
    // In order: one join for alice's two sessions, then the marker.
    let join = watcher.message().await;
    assert_eq!(
        (join.header("x-event"), join.header("x-sender")),
        (Some("join"), Some("alice"))
    );
    assert_eq!(
        watcher.message().await.body.as_ref(),
        b"both tabs in",
        "one join only"
    );
    tab1.drop_connection();
    marker
        .confirmed(send("/topic/room.presence", "first tab gone"))
        .await;
    let next = watcher.message().await;
    assert_eq!(
        next.body.as_ref(),
        b"first tab gone",
        "no leave while a session remains: {next:?}"
    );
    tab2.drop_connection();
    marker
        .confirmed(send("/topic/room.presence", "both gone"))
        .await;
    let leave = watcher.message().await;
    assert_eq!(
        (leave.header("x-event"), leave.header("x-sender")),
        (Some("leave"), Some("alice"))
    );
    assert_eq!(
        watcher.message().await.body.as_ref(),
        b"both gone",
        "one leave only"
    );
}

async fn a_queue_leases_to_one_consumer_and_redelivers_what_was_not_acknowledged(
    d: &dyn Deployment,
) {
    let mut producer = Client::connect(d, 0, "producer");
    for i in 1..=3 {
        producer
            .confirmed(send("/queue/conformance", &format!("job{i}")))
            .await;
    }
    let individual = [("ack", "client-individual"), ("prefetch-count", "1")];
    let mut first = Client::connect(d, 1, "first");
    first
        .confirmed(subscribe("q", "/queue/conformance", &individual))
        .await;
    let mut second = Client::connect(d, 2, "second");
    second
        .confirmed(subscribe("q", "/queue/conformance", &individual))
        .await;
    let a = first.message().await;
    let b = second.message().await;
    assert_ne!(a.body, b.body, "each message to one consumer");
    assert!(
        first.quiet() && second.quiet(),
        "prefetch 1: one unacknowledged each"
    );
    // NACK: back at the front of the queue, and the only consumer with room takes it again.
    first
        .confirmed(frame("NACK", &[("id", a.header("ack").unwrap())]))
        .await;
    let again = first.message().await;
    assert_eq!(
        (&again.body, again.header("redelivered")),
        (&a.body, Some("true"))
    );
    // A consumer that goes away hands back what it held; everything reaches the other once.
    second.drop_connection();
    let mut done = Vec::new();
    let mut next = again;
    loop {
        first
            .confirmed(frame("ACK", &[("id", next.header("ack").unwrap())]))
            .await;
        done.push(next.body.to_vec());
        if done.len() == 3 {
            break;
        }
        next = first.message().await;
        if next.body == b.body {
            assert_eq!(next.header("redelivered"), Some("true"), "{next:?}");
        }
    }
    done.sort();
    assert_eq!(done, [b"job1".to_vec(), b"job2".to_vec(), b"job3".to_vec()]);
    assert!(first.quiet(), "nothing twice");
}

async fn a_direct_message_waits_for_its_user_and_goes_once(d: &dyn Deployment) {
    let mut alice = Client::connect(d, 0, "alice");
    alice
        .confirmed(send("/user/bob/queue/dm", "while you were out"))
        .await;
    let mut bob = Client::connect(d, 1, "bob");
    let sub = subscribe("dm", "/user/queue/dm", &[]);
    bob.confirmed(sub).await;
    let m = bob.message().await;
    assert_eq!(m.body.as_ref(), b"while you were out");
    assert_eq!(m.header("x-sender"), Some("alice"));
    let mut again = Client::connect(d, 2, "bob");
    let sub = subscribe("dm", "/user/queue/dm", &[]);
    again.confirmed(sub).await;
    assert!(again.quiet() && bob.quiet(), "delivered once");
    // Live ones reach every session of the user.
    alice.confirmed(send("/user/bob/queue/dm", "live")).await;
    assert_eq!(bob.message().await.body.as_ref(), b"live");
    assert_eq!(again.message().await.body.as_ref(), b"live");
}

// ---- one node, in process ----

#[tokio::test]
async fn one_node_rooms_number_every_message_once_in_one_order() {
    rooms_number_every_message_once_in_one_order(&OneNode::new()).await;
}

#[tokio::test]
async fn one_node_a_replay_since_joins_live_with_no_gap_and_no_duplicate() {
    a_replay_since_joins_live_with_no_gap_and_no_duplicate(&OneNode::new()).await;
}

#[tokio::test]
async fn one_node_presence_changes_on_the_first_and_last_session_exactly_once() {
    presence_changes_on_the_first_and_last_session_exactly_once(&OneNode::new()).await;
}

#[tokio::test]
async fn one_node_a_queue_leases_to_one_consumer_and_redelivers_what_was_not_acknowledged() {
    a_queue_leases_to_one_consumer_and_redelivers_what_was_not_acknowledged(&OneNode::new()).await;
}

#[tokio::test]
async fn one_node_a_direct_message_waits_for_its_user_and_goes_once() {
    a_direct_message_waits_for_its_user_and_goes_once(&OneNode::new()).await;
}

// ---- three nodes sharing Redis ----

#[tokio::test]
async fn redis_rooms_number_every_message_once_in_one_order() {
    rooms_number_every_message_once_in_one_order(&RedisNodes::new().await).await;
}

#[tokio::test]
async fn redis_a_replay_since_joins_live_with_no_gap_and_no_duplicate() {
    a_replay_since_joins_live_with_no_gap_and_no_duplicate(&RedisNodes::new().await).await;
}

#[tokio::test]
async fn redis_presence_changes_on_the_first_and_last_session_exactly_once() {
    presence_changes_on_the_first_and_last_session_exactly_once(&RedisNodes::new().await).await;
}

#[tokio::test]
async fn redis_a_direct_message_waits_for_its_user_and_goes_once() {
    a_direct_message_waits_for_its_user_and_goes_once(&RedisNodes::new().await).await;
}

#[tokio::test]
async fn redis_a_queue_leases_to_one_consumer_and_redelivers_what_was_not_acknowledged() {
    a_queue_leases_to_one_consumer_and_redelivers_what_was_not_acknowledged(
        &RedisNodes::new().await,
    )
    .await;
}
