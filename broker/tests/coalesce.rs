//! Write coalescing through a real TCP connection: while the broker counts as busy, frames
//! queued right after a write wait for the window and go out together, in order; while it
//! is quiet, they go out at once.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use broker::Config;
use broker::connection;
use broker::state::Broker;
use broker::store::MemoryStore;
use broker::transport::tcp::TcpTransport;
use bytes::BytesMut;
use stomp_codec::{Command, Decoder, Frame, Limits, Version, encode_to_bytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, timeout};

const WINDOW: Duration = Duration::from_millis(400);
const WAIT: Duration = Duration::from_secs(10);

struct Peer {
    stream: TcpStream,
    decoder: Decoder,
    buf: BytesMut,
}

impl Peer {
    async fn send(&mut self, frame: Frame) {
        let bytes = encode_to_bytes(&frame, Version::V1_2);
        self.stream.write_all(&bytes).await.unwrap();
    }

    async fn next(&mut self) -> Frame {
        loop {
            if let Some(frame) = self.decoder.decode(&mut self.buf).unwrap() {
                return frame;
            }
            let n = timeout(WAIT, self.stream.read_buf(&mut self.buf))
                .await
                .expect("a frame within the wait")
                .unwrap();
            assert!(n > 0, "the broker closed the connection");
        }
    }
}

/// A broker serving TCP connections on loopback, whose coalescing window is `window`.
async fn broker_with_window(
    window: Duration,
) -> ((Arc<Broker>, tempfile::TempDir), std::net::SocketAddr) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_string_lossy().into_owned();
    let max = format!("{}", WINDOW.as_millis());
    let args = ["stoa", "--data-dir", &dir, "--write-coalesce-max-ms", &max];
    let config = Config::try_parse_args(args).unwrap();
    let broker = Arc::new(Broker::with_store(config, Arc::new(MemoryStore::default())).unwrap());
    // Busy enough for exactly `window`: the fraction between quiet and saturated.
    let span = broker::pace::SATURATED - broker::pace::QUIET;
    let busy = broker::pace::QUIET
        + u64::try_from(window.as_micros() * u128::from(span) / WINDOW.as_micros()).unwrap();
    for _ in 0..50 {
        broker.pace.record(busy, WINDOW);
    }
    assert_eq!(broker.pace.window(), window);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = broker.clone();
    tokio::spawn(async move {
        let (_stop, shutdown) = watch::channel(false);
        while let Ok((stream, peer)) = listener.accept().await {
            let transport = TcpTransport::new(stream, 1024);
            tokio::spawn(connection::serve(
                transport,
                serving.clone(),
                shutdown.clone(),
                connection::Arrival::new(peer, "tcp"),
            ));
        }
    });
    ((broker, tmp), addr)
}

fn subscribe_with_receipt() -> Frame {
    Frame::new(Command::Subscribe)
        .with_header("id", "0")
        .with_header("destination", "/topic/news")
        .with_header("receipt", "sub")
}

async fn connect(addr: std::net::SocketAddr, login: &str) -> Peer {
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut peer = Peer {
        stream,
        decoder: Decoder::new(Limits::default()),
        buf: BytesMut::new(),
    };
    peer.send(
        Frame::new(Command::Connect)
            .with_header("accept-version", "1.2")
            .with_header("host", "localhost")
            .with_header("login", login),
    )
    .await;
    assert_eq!(peer.next().await.command, Command::Connected);
    peer
}

/// A member subscribed to /topic/news that has written nothing for longer than the window
/// (so its next write goes out at once), and a publisher.
async fn quiet_member_and_publisher(window: Duration) -> (Peer, Peer) {
    let (_broker, addr) = broker_with_window(window).await;
    let mut member = connect(addr, "member").await;
    member.send(subscribe_with_receipt()).await;
    assert_eq!(member.next().await.command, Command::Receipt);
    tokio::time::sleep(WINDOW + Duration::from_millis(100)).await;
    let publisher = connect(addr, "publisher").await;
    (member, publisher)
}

/// Subscribes, waits out the window, then publishes one message, and
/// two more once the first arrived. Returns the bodies in arrival order and the gaps
/// between the first and second and between the second and third arrivals.
async fn three_messages(window: Duration) -> (Vec<String>, Duration, Duration) {
    let (mut member, mut publisher) = quiet_member_and_publisher(window).await;
    let message = |body: &str| {
        Frame::new(Command::Send)
            .with_header("destination", "/topic/news")
            .with_body(body.to_owned())
    };
    publisher.send(message("one")).await;
    let first = member.next().await;
    let first_at = Instant::now();
    publisher.send(message("two")).await;
    publisher.send(message("three")).await;
    let second = member.next().await;
    let second_at = Instant::now();
    let third = member.next().await;
    let third_at = Instant::now();
    let bodies = [first, second, third]
        .iter()
        .map(|f| {
            assert_eq!(f.command, Command::Message);
            String::from_utf8(f.body.to_vec()).unwrap()
        })
        .collect();
    (bodies, second_at - first_at, third_at - second_at)
}

#[tokio::test]
async fn a_busy_broker_holds_frames_for_the_window_and_writes_them_together() {
    let (bodies, first_to_second, second_to_third) = three_messages(WINDOW).await;
    assert_eq!(bodies, ["one", "two", "three"]);
    assert!(
        first_to_second >= WINDOW - Duration::from_millis(100),
        "the second message waited only {first_to_second:?}"
    );
    assert!(
        second_to_third < WINDOW / 2,
        "the third message came {second_to_third:?} after the second, not in the same write"
    );
}

#[tokio::test]
async fn replies_to_the_clients_own_frames_are_not_held() {
    let (_broker, addr) = broker_with_window(WINDOW).await;
    let mut member = connect(addr, "member").await;
    // Right after CONNECTED was written, so within the window: the receipt still goes out.
    let asked = Instant::now();
    member.send(subscribe_with_receipt()).await;
    assert_eq!(member.next().await.command, Command::Receipt);
    let waited = asked.elapsed();
    assert_not_held(waited, "the receipt");
}

#[tokio::test]
async fn a_reply_sends_a_held_batch_at_once() {
    let (mut member, mut publisher) = quiet_member_and_publisher(WINDOW).await;
    let message = |body: &str| {
        Frame::new(Command::Send)
            .with_header("destination", "/topic/news")
            .with_header("receipt", body)
            .with_body(body.to_owned())
    };
    publisher.send(message("one")).await;
    assert_eq!(publisher.next().await.command, Command::Receipt);
    assert_eq!(member.next().await.body, "one".as_bytes());
    // "two" is queued for the member (its receipt to the publisher says so) and held.
    publisher.send(message("two")).await;
    assert_eq!(publisher.next().await.command, Command::Receipt);
    let asked = Instant::now();
    member
        .send(
            Frame::new(Command::Unsubscribe)
                .with_header("id", "0")
                .with_header("receipt", "unsub"),
        )
        .await;
    let held = member.next().await;
    assert_eq!(held.body, "two".as_bytes());
    let reply = member.next().await;
    assert_eq!(reply.command, Command::Receipt);
    let waited = asked.elapsed();
    assert_not_held(waited, "the held message and the receipt");
}

#[tokio::test]
async fn a_quiet_broker_writes_at_once() {
    let (bodies, first_to_second, _) = three_messages(Duration::ZERO).await;
    assert_eq!(bodies, ["one", "two", "three"]);
    assert_not_held(first_to_second, "the second message");
}

/// `what` came well within the window: it was not held.
fn assert_not_held(waited: Duration, what: &str) {
    assert!(
        waited < WINDOW - Duration::from_millis(100),
        "{what} came {waited:?} after it was due: held"
    );
}
