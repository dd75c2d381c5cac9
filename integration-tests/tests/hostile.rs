//! Malformed and hostile input: each case gets a clear ERROR and a closed connection, over
//! TCP and WebSocket, while a bystander in the same room keeps receiving.

// Test code: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used)]

use integration_tests::{Broker, Conn, Event, Transport, WsMessage, frame};
use stomp_codec::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::Frame as WsFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

/// Small limits so the limit cases stay small.
const ARGS: &[&str] = &[
    "--max-frame-bytes",
    "40000",
    "--max-body-bytes",
    "32768",
    "--max-headers",
    "16",
    "--max-header-line-bytes",
    "1024",
    "--max-subscriptions",
    "4",
    "--max-transactions",
    "2",
];

const CONNECT: &[u8] = b"CONNECT\naccept-version:1.2\nhost:x\nlogin:mallory\nheart-beat:0,0\n\n\0";

struct Case {
    name: &'static str,
    /// Whether to CONNECT before sending `input`.
    connect: bool,
    input: Vec<u8>,
    /// A word the ERROR's message must contain.
    error: &'static str,
}

fn case(name: &'static str, connect: bool, input: impl Into<Vec<u8>>, error: &'static str) -> Case {
    Case {
        name,
        connect,
        input: input.into(),
        error,
    }
}

fn cases() -> Vec<Case> {
    let many_headers: String = (0..17).map(|i| format!("h{i}:v\n")).collect();
    let long_line = format!("SEND\ndestination:/topic/a\nx:{}\n\n\0", "v".repeat(2000));
    let big_body = format!("SEND\ndestination:/topic/a\n\n{}\0", "b".repeat(40_000));
    // Body under its 32 KiB limit, headers under theirs, the whole over 40,000 bytes.
    let wide_headers: String = (0..12)
        .map(|i| format!("x{i}:{}\n", "v".repeat(950)))
        .collect();
    let big_frame = format!(
        "SEND\ndestination:/topic/a\ncontent-length:30000\n{wide_headers}\n{}\0",
        "b".repeat(30_000)
    );
    let too_long_login = format!(
        "CONNECT\naccept-version:1.2\nlogin:{}\n\n\0",
        "n".repeat(40)
    );
    let subs: String = (0..5)
        .map(|i| format!("SUBSCRIBE\nid:{i}\ndestination:/topic/s{i}\n\n\0"))
        .collect();
    vec![
        case(
            "unknown command",
            true,
            "SNED\ndestination:/topic/a\n\n\0",
            "unknown command",
        ),
        case(
            "lowercase command",
            true,
            "send\ndestination:/topic/a\n\n\0",
            "unknown command",
        ),
        case(
            "garbage bytes",
            false,
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n".to_vec(),
            "malformed frame",
        ),
        case(
            "http request on the stomp port",
            false,
            "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            "unknown command",
        ),
        case(
            "send before connect",
            false,
            "SEND\ndestination:/topic/a\n\nhi\0",
            "not connected",
        ),
        case(
            "subscribe before connect",
            false,
            "SUBSCRIBE\nid:0\ndestination:/topic/a\n\n\0",
            "not connected",
        ),
        case(
            "second connect",
            true,
            CONNECT.to_vec(),
            "already connected",
        ),
        case(
            "no common version",
            false,
            "CONNECT\naccept-version:2.0,3.0\n\n\0",
            "unsupported STOMP version",
        ),
        case(
            "bad heart-beat",
            false,
            "CONNECT\naccept-version:1.2\nheart-beat:soon\n\n\0",
            "heart-beat",
        ),
        case("login too long", false, too_long_login, "at most 32"),
        case(
            "send without destination",
            true,
            "SEND\n\nhi\0",
            "no destination header",
        ),
        case(
            "subscribe without destination",
            true,
            "SUBSCRIBE\nid:0\n\n\0",
            "no destination header",
        ),
        case(
            "subscribe without id",
            true,
            "SUBSCRIBE\ndestination:/topic/a\n\n\0",
            "no id header",
        ),
        case(
            "unknown ack mode",
            true,
            "SUBSCRIBE\nid:0\ndestination:/topic/a\nack:maybe\n\n\0",
            "unknown ack mode",
        ),
        case(
            "duplicate subscription id",
            true,
            "SUBSCRIBE\nid:0\ndestination:/topic/a\n\n\0SUBSCRIBE\nid:0\ndestination:/topic/b\n\n\0",
            "already in use",
        ),
        case(
            "too many subscriptions",
            true,
            subs,
            "more than 4 subscriptions",
        ),
        case(
            "unsubscribe unknown id",
            true,
            "UNSUBSCRIBE\nid:nope\n\n\0",
            "no subscription",
        ),
        case(
            "ack of an unknown id",
            true,
            "ACK\nid:12-345\n\n\0",
            "no unacknowledged message",
        ),
        case("nack without id", true, "NACK\n\n\0", "no id header"),
        case(
            "commit of an unknown transaction",
            true,
            "COMMIT\ntransaction:t9\n\n\0",
            "not open",
        ),
        case(
            "abort of an unknown transaction",
            true,
            "ABORT\ntransaction:t9\n\n\0",
            "not open",
        ),
        case(
            "begin twice",
            true,
            "BEGIN\ntransaction:t\n\n\0BEGIN\ntransaction:t\n\n\0",
            "already open",
        ),
        case(
            "too many transactions",
            true,
            "BEGIN\ntransaction:a\n\n\0BEGIN\ntransaction:b\n\n\0BEGIN\ntransaction:c\n\n\0",
            "open transactions",
        ),
        case(
            "send in an unknown transaction",
            true,
            "SEND\ndestination:/topic/a\ntransaction:t\n\n\0",
            "not open",
        ),
        case(
            "send to a wildcard",
            true,
            "SEND\ndestination:/topic/room.*\n\nx\0",
            "wildcard",
        ),
        case(
            "send to an unknown destination",
            true,
            "SEND\ndestination:/nowhere\n\nx\0",
            "not supported",
        ),
        case(
            "send to an empty topic",
            true,
            "SEND\ndestination:/topic/\n\nx\0",
            "empty",
        ),
        case(
            "client sends MESSAGE",
            true,
            "MESSAGE\ndestination:/topic/a\n\n\0",
            "sent by servers",
        ),
        case(
            "bad escape",
            true,
            "SEND\ndestination:/topic/a\nx:a\\tb\n\n\0",
            "undefined escape",
        ),
        case(
            "bad utf-8 in a header",
            true,
            b"SEND\ndestination:/topic/\xff\xfe\n\n\0".to_vec(),
            "UTF-8",
        ),
        case(
            "header line without colon",
            true,
            "SEND\ndestination /topic/a\n\n\0",
            "no colon",
        ),
        case(
            "empty header name",
            true,
            "SEND\n:value\n\n\0",
            "empty name",
        ),
        case(
            "NUL inside the headers",
            true,
            "SEND\ndestination:/topic/a\0SEND\n\n\0",
            "NUL",
        ),
        case(
            "content-length not a number",
            true,
            "SEND\ndestination:/topic/a\ncontent-length:ten\n\n\0",
            "not a number",
        ),
        case(
            "content-length shorter than the body",
            true,
            "SEND\ndestination:/topic/a\ncontent-length:2\n\nhello\0",
            "not followed by a NUL",
        ),
        case(
            "a terabyte content-length",
            true,
            "SEND\ndestination:/topic/a\ncontent-length:1099511627776\n\n",
            "exceeds the limit",
        ),
        case("body over the limit", true, big_body, "exceeds the limit"),
        case(
            "frame over the limit",
            true,
            big_frame,
            "frame exceeds the limit of 40000 bytes",
        ),
        case(
            "too many headers",
            true,
            format!("SEND\ndestination:/topic/a\n{many_headers}\n\0"),
            "more than 16 headers",
        ),
        case(
            "header line too long",
            true,
            long_line,
            "exceeds the limit of 1024",
        ),
        case(
            "body on a SUBSCRIBE",
            true,
            "SUBSCRIBE\nid:0\ndestination:/topic/a\n\nbody\0",
            "must not have a body",
        ),
    ]
}

/// A subscriber in the room and a publisher: after every hostile case, a message still
/// goes from one to the other.
struct Bystander {
    listener: Conn,
    publisher: Conn,
    sent: u32,
}

impl Bystander {
    async fn new(broker: &Broker) -> Bystander {
        let mut listener = Conn::open(broker, Transport::Tcp).await;
        listener.login("bystander").await;
        // A real room: its own join notice comes before the subscription's receipt.
        let join = frame(
            "SUBSCRIBE",
            &[("id", "0"), ("destination", "/topic/room.lobby")],
        );
        let early = listener.send_with_receipt(&join, "joined").await;
        assert_eq!(early.len(), 1, "the bystander's own join notice");
        let mut publisher = Conn::open(broker, Transport::Ws).await;
        publisher.login("publisher").await;
        Bystander {
            listener,
            publisher,
            sent: 0,
        }
    }

    async fn still_served(&mut self, after: &str) {
        self.sent += 1;
        let body = format!("after {after} #{}", self.sent);
        let send = frame("SEND", &[("destination", "/topic/room.lobby")]).with_body(body.clone());
        self.publisher
            .send_with_receipt(&send, &format!("p{}", self.sent))
            .await;
        // Hostile connections never join the room, so no notice comes between.
        let got: Frame = self.listener.expect_frame().await;
        assert_eq!(
            got.body,
            body.as_bytes(),
            "bystander missed a message after {after}"
        );
        assert!(got.header("x-seq").is_some(), "room messages are numbered");
    }
}

async fn run_cases(kind: Transport) {
    let broker = Broker::start(ARGS);
    let mut bystander = Bystander::new(&broker).await;
    let cases = cases();
    assert!(cases.len() >= 30, "the table must hold at least 30 cases");
    for case in cases {
        eprintln!("case: {} over {kind:?}", case.name);
        let mut conn = Conn::open(&broker, kind).await;
        if case.connect {
            conn.send_raw(CONNECT).await;
            assert_eq!(
                conn.expect_frame().await.command.as_str(),
                "CONNECTED",
                "{}",
                case.name
            );
        }
        conn.send_raw(&case.input).await;
        let error = match conn.next_event().await {
            Event::Frame(f) => f,
            Event::Closed => panic!("{}: closed without an ERROR", case.name),
        };
        assert_eq!(
            error.command.as_str(),
            "ERROR",
            "{}: got {error:?}",
            case.name
        );
        let message = error.header("message").unwrap_or_default().to_owned();
        assert!(
            message.contains(case.error),
            "{}: ERROR message {message:?} lacks {:?}",
            case.name,
            case.error
        );
        assert!(!error.body.is_empty(), "{}: ERROR body explains", case.name);
        conn.expect_closed().await;
        bystander.still_served(case.name).await;
    }
}

#[tokio::test]
async fn hostile_input_over_tcp_gets_an_error_and_a_close() {
    run_cases(Transport::Tcp).await;
}

#[tokio::test]
async fn hostile_input_over_websocket_gets_an_error_and_a_close() {
    run_cases(Transport::Ws).await;
}

#[tokio::test]
async fn an_error_names_the_receipt_of_the_frame_that_caused_it() {
    let broker = Broker::start(ARGS);
    for kind in [Transport::Tcp, Transport::Ws] {
        let mut conn = Conn::open(&broker, kind).await;
        conn.login("a").await;
        conn.send_raw(b"SEND\nreceipt:r-77\n\nno destination\0")
            .await;
        let error = conn.expect_error_then_close("no destination").await;
        assert_eq!(error.header("receipt-id"), Some("r-77"));
    }
}

#[tokio::test]
async fn an_oversized_websocket_message_gets_an_error_not_a_silent_close() {
    let broker = Broker::start(ARGS);
    let mut bystander = Bystander::new(&broker).await;
    let mut conn = Conn::open(&broker, Transport::Ws).await;
    conn.login("big").await;
    // Over the WebSocket message cap (frame limit + 64 KiB) in one message.
    conn.send_ws(WsMessage::binary(vec![b'x'; 40_000 + 65536 + 1024]))
        .await;
    conn.expect_error_then_close("websocket message exceeds the limit")
        .await;
    bystander
        .still_served("an oversized websocket message")
        .await;
}

#[tokio::test]
async fn a_websocket_text_message_that_is_not_utf8_gets_an_error() {
    let broker = Broker::start(ARGS);
    let mut bystander = Bystander::new(&broker).await;
    let mut conn = Conn::open(&broker, Transport::Ws).await;
    conn.login("latin1").await;
    // A raw frame with the text opcode and a Latin-1 payload, as a careless client sends.
    let payload = b"SEND\ndestination:/topic/a\n\ncaf\xe9\0".to_vec();
    let frame = WsFrame::message(payload, OpCode::Data(Data::Text), true);
    conn.send_ws(WsMessage::Frame(frame)).await;
    conn.expect_error_then_close("not valid UTF-8").await;
    bystander
        .still_served("a text message that is not UTF-8")
        .await;
}

#[tokio::test]
async fn a_frame_cut_midway_then_closed_disturbs_nobody() {
    let broker = Broker::start(ARGS);
    let mut bystander = Bystander::new(&broker).await;
    for kind in [Transport::Tcp, Transport::Ws] {
        let mut conn = Conn::open(&broker, kind).await;
        conn.login("cut").await;
        conn.send_raw(b"SEND\ndestination:/topic/room.lobby\ncontent-length:100\n\nonly part")
            .await;
        conn.close().await;
        bystander.still_served("a cut frame").await;
    }
}

#[tokio::test]
async fn a_client_that_never_connects_is_dropped_with_an_error() {
    let broker = Broker::start(&["--connect-timeout-ms", "300"]);
    let mut conn = Conn::open(&broker, Transport::Tcp).await;
    conn.expect_error_then_close("no CONNECT within 300 ms")
        .await;
}

/// Reads from a raw HTTP connection until the broker closes it; what it said before.
async fn read_until_closed(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut said = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut said),
    );
    match read.await {
        Ok(Ok(_)) => said,
        Ok(Err(e)) => panic!("reading until the close failed: {e}"),
        Err(_) => panic!("still open after 10 s; it said {said:?}"),
    }
}

#[tokio::test]
async fn an_http_connection_gets_the_connect_timeout_for_each_request_head() {
    use tokio::io::AsyncWriteExt;
    let broker = Broker::start(&["--connect-timeout-ms", "300"]);
    let started = std::time::Instant::now();
    // Nothing at all; half a request head; a whole request, then an idle keep-alive.
    let mut silent = tokio::net::TcpStream::connect(broker.http).await.unwrap();
    let mut half = tokio::net::TcpStream::connect(broker.http).await.unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: stoa\r\n")
        .await
        .unwrap();
    let mut idle = tokio::net::TcpStream::connect(broker.http).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: stoa\r\n\r\n")
        .await
        .unwrap();
    // A WebSocket session is past its request head: it stays, as silent as the others.
    let mut member = Conn::open(&broker, Transport::Ws).await;
    member.login("carol").await;
    member.subscribe("0", "/topic/watched").await;

    assert_eq!(read_until_closed(&mut silent).await, b"");
    assert_eq!(read_until_closed(&mut half).await, b"");
    let answered = String::from_utf8(read_until_closed(&mut idle).await).unwrap();
    assert!(
        answered.starts_with("HTTP/1.1 200") && answered.ends_with("ok\n"),
        "the request before the idle time was answered: {answered:?}"
    );
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(300),
        "closed before the timeout: {:?}",
        started.elapsed()
    );

    let mut sender = Conn::open(&broker, Transport::Tcp).await;
    sender.login("dave").await;
    sender
        .send_with_receipt(
            &frame("SEND", &[("destination", "/topic/watched")]).with_body("still here"),
            "s1",
        )
        .await;
    let got = member.expect_frame().await;
    assert_eq!(got.body.as_ref(), b"still here");
}
