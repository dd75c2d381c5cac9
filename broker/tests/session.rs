//! The session state machine, frame in and frames out, with no runtime and no sockets.

// Test code: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use broker::Config;
use broker::connection::compose;
use broker::error::{Rejected, SessionError};
use broker::outbox::{Outbox, Outgoing};
use broker::session::{Outcome, Session};
use broker::state::Broker;
use broker::store::MemoryStore;
use bytes::BytesMut;
use stomp_codec::{Command, Decoder, Frame, Limits, Version};

struct Client {
    session: Session,
    outbox: Arc<Outbox>,
    version: Version,
}

/// A broker on a fresh data directory, removed when the test is done with it.
struct TestBroker {
    broker: Arc<Broker>,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for TestBroker {
    type Target = Arc<Broker>;

    fn deref(&self) -> &Arc<Broker> {
        &self.broker
    }
}

fn broker_with(args: &[&str]) -> TestBroker {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_string_lossy().into_owned();
    let mut all = vec!["stoa", "--data-dir", &path];
    all.extend_from_slice(args);
    let config = Config::try_parse_args(all).unwrap();
    TestBroker {
        broker: Arc::new(Broker::with_store(config, Arc::new(MemoryStore::default())).unwrap()),
        _dir: dir,
    }
}

impl Client {
    fn new(broker: &Arc<Broker>) -> Client {
        let outbox = Arc::new(Outbox::new(broker.shared.config.outbox_bytes));
        let session = Session::new(
            broker.next_session_id(),
            broker.shared.clone(),
            outbox.clone(),
        );
        Client {
            session,
            outbox,
            version: Version::V1_2,
        }
    }

    fn connected(broker: &Arc<Broker>, login: &str) -> Client {
        let mut c = Client::new(broker);
        c.send(frame(
            "CONNECT",
            &[
                ("accept-version", "1.0,1.1,1.2"),
                ("host", "x"),
                ("login", login),
            ],
        ))
        .unwrap();
        assert_eq!(c.received()[0].command, Command::Connected);
        c
    }

    fn send(&mut self, frame: Frame) -> Result<Outcome, Rejected> {
        let outcome = self.session.handle(frame);
        if let Ok(Outcome::Connected { version, .. }) = outcome {
            self.version = version;
        }
        outcome
    }

    /// Everything queued for this client, as the writer would write it.
    fn received(&mut self) -> Vec<Frame> {
        let mut batch = Vec::new();
        self.outbox.take_all(&mut batch);
        let mut wire = BytesMut::new();
        for item in &batch {
            if let Outgoing::Message { ack: Some(tag), .. } = item {
                self.session.record_delivery(*tag);
            }
            compose(item, &mut wire);
        }
        let mut decoder = Decoder::with_version(self.version, Limits::default());
        let mut frames = Vec::new();
        while let Some(f) = decoder.decode(&mut wire).unwrap() {
            frames.push(f);
        }
        frames
    }
}

fn frame(command: &str, headers: &[(&str, &str)]) -> Frame {
    let command = Command::from_bytes(command.as_bytes()).unwrap();
    let mut f = Frame::new(command);
    for (n, v) in headers {
        f.headers.push(n, v);
    }
    f
}

fn send_to(dest: &str, body: &str) -> Frame {
    frame("SEND", &[("destination", dest)]).with_body(body.to_owned())
}

fn error_of(result: Result<Outcome, Rejected>) -> (String, Option<String>) {
    let rejected = result.unwrap_err();
    (rejected.error.to_string(), rejected.receipt)
}

#[test]
fn connect_negotiates_the_highest_common_version_and_announces_limits() {
    let broker = broker_with(&[]);
    let mut c = Client::new(&broker);
    let outcome = c
        .send(frame(
            "CONNECT",
            &[
                ("accept-version", "1.1,1.2"),
                ("heart-beat", "5000,20000"),
                ("login", "민수"),
            ],
        ))
        .unwrap();
    assert_eq!(
        outcome,
        Outcome::Connected {
            version: Version::V1_2,
            send_interval_ms: 20000,
            receive_interval_ms: 10000
        }
    );
    let connected = &c.received()[0];
    assert_eq!(connected.header("version"), Some("1.2"));
    assert_eq!(connected.header("user-name"), Some("민수"));
    assert_eq!(connected.header("heart-beat"), Some("10000,10000"));
    assert!(connected.header("server").unwrap().starts_with("stoa/"));
    assert!(connected.header("session").is_some());
    assert_eq!(connected.header("x-max-frame-bytes"), Some("4194304"));
}

#[test]
fn stomp_frame_is_connect_and_no_accept_version_means_1_0() {
    let broker = broker_with(&[]);
    let mut c = Client::new(&broker);
    let outcome = c.send(frame("STOMP", &[])).unwrap();
    assert!(matches!(
        outcome,
        Outcome::Connected {
            version: Version::V1_0,
            ..
        }
    ));
    assert!(
        c.received()[0]
            .header("user-name")
            .unwrap()
            .starts_with("guest-")
    );
}

#[test]
fn no_common_version_is_an_error_naming_the_supported_ones() {
    let broker = broker_with(&[]);
    let mut c = Client::new(&broker);
    let rejected = c
        .send(frame("CONNECT", &[("accept-version", "2.0")]))
        .unwrap_err();
    let error = rejected.error.to_error_frame(None);
    assert_eq!(error.header("version"), Some("1.0,1.1,1.2"));
    assert!(
        error
            .header("message")
            .unwrap()
            .contains("unsupported STOMP version")
    );
}

#[test]
fn frames_before_connect_and_a_second_connect_are_refused() {
    let broker = broker_with(&[]);
    let mut c = Client::new(&broker);
    let (message, _) = error_of(c.send(send_to("/topic/a", "x")));
    assert_eq!(message, "not connected: send CONNECT before SEND");
    let mut c = Client::connected(&broker, "a");
    assert_eq!(
        error_of(c.send(frame("CONNECT", &[]))).0,
        "already connected"
    );
    assert_eq!(
        error_of(c.send(frame("MESSAGE", &[]))).0,
        "MESSAGE frames are sent by servers, not clients"
    );
}

#[test]
fn logins_must_make_sensible_names() {
    let broker = broker_with(&[]);
    for (login, reason) in [
        ("", "at least one character"),
        (&"x".repeat(33), "at most 32"),
        ("a\tb", "control characters"),
        ("a/b", "'/'"),
        ("   ", "only spaces"),
    ] {
        let mut c = Client::new(&broker);
        let (message, _) = error_of(c.send(frame(
            "CONNECT",
            &[("accept-version", "1.2"), ("login", login)],
        )));
        assert!(message.contains(reason), "{login:?}: {message}");
    }
}

#[test]
fn a_published_message_reaches_subscribers_with_broker_owned_headers() {
    let broker = broker_with(&[]);
    let mut alice = Client::connected(&broker, "alice");
    let mut bob = Client::connected(&broker, "bob");
    bob.send(frame(
        "SUBSCRIBE",
        &[("id", "sub-0"), ("destination", "/topic/chat.lobby")],
    ))
    .unwrap();
    let send = frame(
        "SEND",
        &[
            ("destination", "/topic/chat.lobby"),
            ("content-type", "text/plain"),
            ("x-sender", "mallory"),
            ("x-timestamp", "1"),
            ("x-seq", "99"),
            ("message-id", "forged"),
            ("x-stoa-cleared", "99"),
            ("receipt", "r-1"),
            ("x-custom", "kept"),
        ],
    )
    .with_body("안녕");
    alice.send(send).unwrap();
    let got = bob.received();
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_eq!(m.command, Command::Message);
    assert_eq!(m.header("subscription"), Some("sub-0"));
    assert_eq!(m.header("destination"), Some("/topic/chat.lobby"));
    assert_eq!(m.header("x-sender"), Some("alice"));
    assert_ne!(m.header("x-timestamp"), Some("1"));
    assert_ne!(m.header("message-id"), Some("forged"));
    assert_eq!(m.header("x-seq"), None);
    assert_eq!(m.header("x-stoa-cleared"), None, "the cluster's clear word");
    assert_eq!(m.header("receipt"), None);
    assert_eq!(m.header("x-custom"), Some("kept"));
    assert_eq!(m.header("content-type"), Some("text/plain"));
    assert_eq!(
        m.header("ack"),
        None,
        "auto subscriptions carry no ack header"
    );
    assert_eq!(&m.body[..], "안녕".as_bytes());
    // The publisher got its receipt.
    let receipts = alice.received();
    assert_eq!(receipts[0].header("receipt-id"), Some("r-1"));
}

#[test]
fn every_subscriber_sees_the_same_message_id() {
    let broker = broker_with(&[]);
    let mut a = Client::connected(&broker, "a");
    let mut b = Client::connected(&broker, "b");
    a.send(frame(
        "SUBSCRIBE",
        &[("id", "0"), ("destination", "/topic/t")],
    ))
    .unwrap();
    b.send(frame(
        "SUBSCRIBE",
        &[("id", "0"), ("destination", "/topic/t")],
    ))
    .unwrap();
    a.send(send_to("/topic/t", "x")).unwrap();
    let (ma, mb) = (a.received(), b.received());
    assert_eq!(ma[0].header("message-id"), mb[0].header("message-id"));
}

#[test]
fn subscription_rules() {
    let broker = broker_with(&["--max-subscriptions", "2"]);
    let mut c = Client::connected(&broker, "c");
    assert_eq!(
        error_of(c.send(frame("SUBSCRIBE", &[("destination", "/topic/a")]))).0,
        "SUBSCRIBE frame has no id header"
    );
    let mut c = Client::connected(&broker, "c");
    c.send(frame(
        "SUBSCRIBE",
        &[("id", "0"), ("destination", "/topic/a")],
    ))
    .unwrap();
    assert_eq!(
        error_of(c.send(frame(
            "SUBSCRIBE",
            &[("id", "0"), ("destination", "/topic/b")]
        )))
        .0,
        "subscription id \"0\" is already in use on this connection"
    );
    let mut c = Client::connected(&broker, "c");
    c.send(frame(
        "SUBSCRIBE",
        &[("id", "0"), ("destination", "/topic/a")],
    ))
    .unwrap();
    c.send(frame(
        "SUBSCRIBE",
        &[("id", "1"), ("destination", "/topic/b")],
    ))
    .unwrap();
    assert_eq!(
        error_of(c.send(frame(
            "SUBSCRIBE",
            &[("id", "2"), ("destination", "/topic/c")]
        )))
        .0,
        "more than 2 subscriptions on one connection"
    );
    let mut c = Client::connected(&broker, "c");
    assert_eq!(
        error_of(c.send(frame(
            "SUBSCRIBE",
            &[
                ("id", "0"),
                ("destination", "/topic/a"),
                ("ack", "sometimes")
            ]
        )))
        .0,
        "unknown ack mode \"sometimes\": use auto, client or client-individual"
    );
    let mut c = Client::connected(&broker, "c");
    assert!(
        error_of(c.send(frame(
            "SUBSCRIBE",
            &[("id", "0"), ("destination", "/elsewhere")]
        )))
        .0
        .contains("not supported")
    );
}

#[test]
fn v1_0_subscriptions_may_omit_the_id() {
    let broker = broker_with(&[]);
    let mut c = Client::new(&broker);
    c.send(frame("CONNECT", &[])).unwrap();
    c.received();
    c.send(frame("SUBSCRIBE", &[("destination", "/topic/a")]))
        .unwrap();
    c.send(send_to("/topic/a", "x")).unwrap();
    assert_eq!(c.received()[0].header("subscription"), Some("/topic/a"));
    c.send(frame("UNSUBSCRIBE", &[("destination", "/topic/a")]))
        .unwrap();
    c.send(send_to("/topic/a", "x")).unwrap();
    assert!(c.received().is_empty());
}

#[test]
fn unsubscribe_stops_delivery_and_unknown_ids_are_errors() {
    let broker = broker_with(&[]);
    let mut c = Client::connected(&broker, "c");
    c.send(frame(
        "SUBSCRIBE",
        &[("id", "s"), ("destination", "/topic/a")],
    ))
    .unwrap();
    c.send(frame("UNSUBSCRIBE", &[("id", "s")])).unwrap();
    c.send(send_to("/topic/a", "x")).unwrap();
    assert!(c.received().is_empty());
    assert_eq!(
        error_of(c.send(frame("UNSUBSCRIBE", &[("id", "s")]))).0,
        "no subscription with id \"s\""
    );
}

#[test]
fn sends_to_wildcards_or_unknown_places_are_refused() {
    let broker = broker_with(&[]);
    for dest in ["/topic/room.*", "/topic/", "/topic/a..b", "/nowhere"] {
        let mut c = Client::connected(&broker, "c");
        assert!(c.send(send_to(dest, "x")).is_err(), "{dest}");
    }
    let mut c = Client::connected(&broker, "c");
    let (message, receipt) = error_of(c.send(frame("SEND", &[("receipt", "r9")])));
    assert_eq!(message, "SEND frame has no destination header");
    assert_eq!(receipt.as_deref(), Some("r9"));
}

fn ack_setup(mode: &str) -> (TestBroker, Client, Vec<Frame>) {
    let broker = broker_with(&[]);
    let mut c = Client::connected(&broker, "c");
    c.send(frame(
        "SUBSCRIBE",
        &[("id", "s"), ("destination", "/topic/a"), ("ack", mode)],
    ))
    .unwrap();
    for i in 0..3 {
        c.send(send_to("/topic/a", &i.to_string())).unwrap();
    }
    let messages = c.received();
    assert_eq!(messages.len(), 3);
    (broker, c, messages)
}

#[test]
fn client_acks_are_cumulative() {
    let (_b, mut c, m) = ack_setup("client");
    let ack_of = |f: &Frame| f.header("ack").unwrap().to_owned();
    c.send(frame("ACK", &[("id", &ack_of(&m[1]))])).unwrap();
    // The first was settled by the cumulative ACK of the second.
    assert!(c.send(frame("ACK", &[("id", &ack_of(&m[0]))])).is_err());
    let (_b, mut c, m) = ack_setup("client");
    c.send(frame("ACK", &[("id", &ack_of(&m[1]))])).unwrap();
    c.send(frame("NACK", &[("id", &ack_of(&m[2]))])).unwrap();
}

#[test]
fn client_individual_acks_cover_one_message() {
    let (_b, mut c, m) = ack_setup("client-individual");
    let ack_of = |f: &Frame| f.header("ack").unwrap().to_owned();
    c.send(frame("ACK", &[("id", &ack_of(&m[1]))])).unwrap();
    c.send(frame("NACK", &[("id", &ack_of(&m[0]))])).unwrap();
    c.send(frame("ACK", &[("id", &ack_of(&m[2]))])).unwrap();
    let (message, _) = error_of(c.send(frame("ACK", &[("id", &ack_of(&m[2]))])));
    assert!(
        message.starts_with("no unacknowledged message with ack id"),
        "{message}"
    );
}

#[test]
fn acks_for_unknown_ids_are_errors() {
    let (_b, mut c, _) = ack_setup("client");
    for id in ["nonsense", "0-1", "99-1", ""] {
        assert!(c.send(frame("ACK", &[("id", id)])).is_err(), "{id:?}");
    }
    let (_b, mut c, _) = ack_setup("auto");
    assert!(c.send(frame("ACK", &[("id", "0-1")])).is_err());
}

#[test]
fn v1_1_acks_use_message_id_and_subscription() {
    let broker = broker_with(&[]);
    let mut c = Client::new(&broker);
    c.send(frame("CONNECT", &[("accept-version", "1.1")]))
        .unwrap();
    c.received();
    c.send(frame(
        "SUBSCRIBE",
        &[
            ("id", "s"),
            ("destination", "/topic/a"),
            ("ack", "client-individual"),
        ],
    ))
    .unwrap();
    c.send(send_to("/topic/a", "x")).unwrap();
    let m = c.received();
    let message_id = m[0].header("message-id").unwrap().to_owned();
    assert!(
        c.send(frame("ACK", &[("message-id", &message_id)]))
            .is_err(),
        "1.1 needs subscription"
    );
    let mut c = Client::new(&broker);
    c.send(frame("CONNECT", &[("accept-version", "1.1")]))
        .unwrap();
    c.received();
    c.send(frame(
        "SUBSCRIBE",
        &[("id", "s"), ("destination", "/topic/a"), ("ack", "client")],
    ))
    .unwrap();
    c.send(send_to("/topic/a", "x")).unwrap();
    let m = c.received();
    let message_id = m[0].header("message-id").unwrap().to_owned();
    c.send(frame(
        "ACK",
        &[("message-id", &message_id), ("subscription", "s")],
    ))
    .unwrap();
}

#[test]
fn sends_in_a_transaction_wait_for_commit_and_vanish_on_abort() {
    let broker = broker_with(&[]);
    let mut c = Client::connected(&broker, "c");
    c.send(frame(
        "SUBSCRIBE",
        &[("id", "s"), ("destination", "/topic/a")],
    ))
    .unwrap();
    c.send(frame("BEGIN", &[("transaction", "t1")])).unwrap();
    c.send(
        frame(
            "SEND",
            &[("destination", "/topic/a"), ("transaction", "t1")],
        )
        .with_body("one"),
    )
    .unwrap();
    c.send(
        frame(
            "SEND",
            &[("destination", "/topic/a"), ("transaction", "t1")],
        )
        .with_body("two"),
    )
    .unwrap();
    assert!(c.received().is_empty());
    c.send(frame("COMMIT", &[("transaction", "t1")])).unwrap();
    let bodies: Vec<_> = c.received().iter().map(|f| f.body.clone()).collect();
    assert_eq!(bodies, ["one", "two"]);
    c.send(frame("BEGIN", &[("transaction", "t2")])).unwrap();
    c.send(
        frame(
            "SEND",
            &[("destination", "/topic/a"), ("transaction", "t2")],
        )
        .with_body("gone"),
    )
    .unwrap();
    c.send(frame("ABORT", &[("transaction", "t2")])).unwrap();
    assert!(c.received().is_empty());
    assert_eq!(
        error_of(c.send(frame("COMMIT", &[("transaction", "t2")]))).0,
        "transaction \"t2\" is not open"
    );
}

#[test]
fn transaction_rules() {
    let broker = broker_with(&["--max-transaction-frames", "1"]);
    let mut c = Client::connected(&broker, "c");
    c.send(frame("BEGIN", &[("transaction", "t")])).unwrap();
    assert_eq!(
        error_of(c.send(frame("BEGIN", &[("transaction", "t")]))).0,
        "transaction \"t\" is already open"
    );
    let mut c = Client::connected(&broker, "c");
    assert!(
        c.send(frame(
            "SEND",
            &[("destination", "/topic/a"), ("transaction", "nope")]
        ))
        .is_err()
    );
    let mut c = Client::connected(&broker, "c");
    c.send(frame("BEGIN", &[("transaction", "t")])).unwrap();
    c.send(frame(
        "SEND",
        &[("destination", "/topic/a"), ("transaction", "t")],
    ))
    .unwrap();
    assert_eq!(
        error_of(c.send(frame(
            "SEND",
            &[("destination", "/topic/a"), ("transaction", "t")]
        )))
        .0,
        "transaction \"t\" holds more than 1 frames"
    );
    let mut c = Client::connected(&broker, "c");
    assert_eq!(
        error_of(c.send(frame("BEGIN", &[]))).0,
        "BEGIN frame has no transaction header"
    );
}

#[test]
fn acks_in_a_transaction_take_effect_at_commit() {
    let (_b, mut c, m) = ack_setup("client-individual");
    let id = m[0].header("ack").unwrap().to_owned();
    c.send(frame("BEGIN", &[("transaction", "t")])).unwrap();
    c.send(frame("ACK", &[("id", &id), ("transaction", "t")]))
        .unwrap();
    c.send(frame("ABORT", &[("transaction", "t")])).unwrap();
    // Aborted: the message is still unacknowledged, so acking it again works.
    c.send(frame("BEGIN", &[("transaction", "t2")])).unwrap();
    c.send(frame("ACK", &[("id", &id), ("transaction", "t2")]))
        .unwrap();
    c.send(frame("COMMIT", &[("transaction", "t2")])).unwrap();
    assert!(
        c.send(frame("ACK", &[("id", &id)])).is_err(),
        "settled by the commit"
    );
}

#[test]
fn disconnect_answers_its_receipt_and_drops_open_transactions() {
    let broker = broker_with(&[]);
    let mut c = Client::connected(&broker, "c");
    c.send(frame(
        "SUBSCRIBE",
        &[("id", "s"), ("destination", "/topic/a")],
    ))
    .unwrap();
    c.send(frame("BEGIN", &[("transaction", "t")])).unwrap();
    c.send(frame(
        "SEND",
        &[("destination", "/topic/a"), ("transaction", "t")],
    ))
    .unwrap();
    assert_eq!(
        c.send(frame("DISCONNECT", &[("receipt", "bye")])).unwrap(),
        Outcome::Disconnect
    );
    let got = c.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].header("receipt-id"), Some("bye"));
    assert!(matches!(
        c.send(send_to("/topic/a", "x")).unwrap_err().error,
        SessionError::NotConnected(_)
    ));
}

#[test]
fn a_closed_session_leaves_the_router() {
    let broker = broker_with(&[]);
    let mut c = Client::connected(&broker, "c");
    c.send(frame(
        "SUBSCRIBE",
        &[("id", "s"), ("destination", "/topic/a")],
    ))
    .unwrap();
    assert_eq!(broker.shared.router.topics.exact_subscribers("a"), 1);
    drop(c);
    assert_eq!(broker.shared.router.topics.exact_subscribers("a"), 0);
}

#[test]
fn subscription_ids_are_escaped_in_the_message_head() {
    let broker = broker_with(&[]);
    let mut c = Client::connected(&broker, "c");
    c.send(frame(
        "SUBSCRIBE",
        &[("id", "a:b\nc"), ("destination", "/topic/a")],
    ))
    .unwrap();
    c.send(send_to("/topic/a", "x")).unwrap();
    assert_eq!(c.received()[0].header("subscription"), Some("a:b\nc"));
}
