//! Every example frame of the STOMP 1.2 specification, as printed there (`^@` is the NUL),
//! decoded and checked header by header, then encoded and decoded again.

// Test code: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used)]

use bytes::BytesMut;
use stomp_codec::{Command, DecodeError, Decoder, Frame, Limits, Version, encode_to_bytes};

/// The spec writes frames indented, one per code block, with `^@` for NUL.
fn wire(example: &str) -> Vec<u8> {
    example.replace("^@", "\0").into_bytes()
}

fn decode_one(bytes: &[u8]) -> Frame {
    let mut buf = BytesMut::from(bytes);
    let frame = Decoder::new(Limits::default())
        .decode(&mut buf)
        .expect("a valid frame")
        .expect("a whole frame");
    assert!(
        buf.is_empty(),
        "left over: {:?}",
        String::from_utf8_lossy(&buf)
    );
    // And back: the encoder writes what the decoder reads.
    let mut again = BytesMut::from(&encode_to_bytes(&frame, Version::V1_2)[..]);
    let round = Decoder::new(Limits::default())
        .decode(&mut again)
        .unwrap()
        .unwrap();
    let strip = |f: &Frame| {
        let mut f = f.clone();
        f.headers.remove("content-length");
        f
    };
    assert_eq!(strip(&round), strip(&frame));
    frame
}

fn headers(frame: &Frame) -> Vec<(&str, &str)> {
    frame.headers.iter().collect()
}

#[test]
fn frame_structure_example_is_rejected_for_its_placeholder_command() {
    let mut buf = BytesMut::from(&wire("COMMAND\nheader1:value1\nheader2:value2\n\nBody^@")[..]);
    let err = Decoder::new(Limits::default())
        .decode(&mut buf)
        .unwrap_err();
    assert_eq!(
        err,
        DecodeError::UnknownCommand {
            command: "COMMAND".into()
        }
    );
}

#[test]
fn repeated_header_example_keeps_the_first_value() {
    let f = decode_one(&wire("MESSAGE\nfoo:World\nfoo:Hello\n\n^@"));
    assert_eq!(f.header("foo"), Some("World"));
    assert_eq!(headers(&f), [("foo", "World"), ("foo", "Hello")]);
}

#[test]
fn connecting_examples() {
    let f = decode_one(&wire(
        "CONNECT\naccept-version:1.2\nhost:stomp.github.org\n\n^@",
    ));
    assert_eq!(f.command, Command::Connect);
    assert_eq!(
        headers(&f),
        [("accept-version", "1.2"), ("host", "stomp.github.org")]
    );

    let f = decode_one(&wire("CONNECTED\nversion:1.2\n\n^@"));
    assert_eq!(f.command, Command::Connected);
    assert_eq!(f.header("version"), Some("1.2"));
}

#[test]
fn protocol_negotiation_examples() {
    let f = decode_one(&wire(
        "CONNECT\naccept-version:1.0,1.1,2.0\nhost:stomp.github.org\n\n^@",
    ));
    assert_eq!(
        Version::negotiate(f.header("accept-version"), &Version::ALL),
        Some(Version::V1_1)
    );
    let f = decode_one(&wire("CONNECTED\nversion:1.1\n\n^@"));
    assert_eq!(f.header("version"), Some("1.1"));

    let f = decode_one(&wire(
        "ERROR\nversion:1.2,2.1\ncontent-type:text/plain\n\nSupported protocol versions are 1.2 2.1^@",
    ));
    assert_eq!(f.command, Command::Error);
    assert_eq!(f.header("version"), Some("1.2,2.1"));
    assert_eq!(&f.body[..], b"Supported protocol versions are 1.2 2.1");
}

#[test]
fn client_frame_examples() {
    let f = decode_one(&wire(
        "SEND\ndestination:/queue/a\ncontent-type:text/plain\n\nhello queue a\n^@",
    ));
    assert_eq!(f.command, Command::Send);
    assert_eq!(
        headers(&f),
        [("destination", "/queue/a"), ("content-type", "text/plain")]
    );
    assert_eq!(&f.body[..], b"hello queue a\n");

    let f = decode_one(&wire(
        "SUBSCRIBE\nid:0\ndestination:/queue/foo\nack:client\n\n^@",
    ));
    assert_eq!(
        headers(&f),
        [
            ("id", "0"),
            ("destination", "/queue/foo"),
            ("ack", "client")
        ]
    );

    let f = decode_one(&wire("UNSUBSCRIBE\nid:0\n\n^@"));
    assert_eq!(f.command, Command::Unsubscribe);
    assert_eq!(f.header("id"), Some("0"));

    let f = decode_one(&wire(
        "ACK\nsubscription:0\nmessage-id:007\ntransaction:tx1\n\n^@",
    ));
    assert_eq!(
        headers(&f),
        [
            ("subscription", "0"),
            ("message-id", "007"),
            ("transaction", "tx1")
        ]
    );

    for (cmd, command) in [
        ("BEGIN", Command::Begin),
        ("COMMIT", Command::Commit),
        ("ABORT", Command::Abort),
    ] {
        let f = decode_one(&wire(&format!("{cmd}\ntransaction:tx1\n\n^@")));
        assert_eq!(f.command, command);
        assert_eq!(f.header("transaction"), Some("tx1"));
    }
}

#[test]
fn disconnect_and_receipt_examples_have_no_blank_line_and_still_decode() {
    // The spec prints these with the NUL straight after the last header.
    let f = decode_one(&wire("DISCONNECT\nreceipt:77\n^@"));
    assert_eq!(f.command, Command::Disconnect);
    assert_eq!(f.header("receipt"), Some("77"));
    assert!(f.body.is_empty());

    let f = decode_one(&wire("RECEIPT\nreceipt-id:77\n^@"));
    assert_eq!(f.command, Command::Receipt);
    assert_eq!(f.header("receipt-id"), Some("77"));
}

#[test]
fn receipt_header_example() {
    let f = decode_one(&wire(
        "SEND\ndestination:/queue/a\nreceipt:message-12345\n\nhello queue a^@",
    ));
    assert_eq!(f.header("receipt"), Some("message-12345"));
    assert_eq!(&f.body[..], b"hello queue a");

    let f = decode_one(&wire("RECEIPT\nreceipt-id:message-12345\n\n^@"));
    assert_eq!(f.header("receipt-id"), Some("message-12345"));
}

#[test]
fn message_example() {
    let f = decode_one(&wire(
        "MESSAGE\nsubscription:0\nmessage-id:007\ndestination:/queue/a\ncontent-type:text/plain\n\nhello queue a^@",
    ));
    assert_eq!(
        headers(&f),
        [
            ("subscription", "0"),
            ("message-id", "007"),
            ("destination", "/queue/a"),
            ("content-type", "text/plain"),
        ]
    );
    assert_eq!(&f.body[..], b"hello queue a");
}

const ERROR_BODY: &str = "The message:\n-----\nMESSAGE\ndestined:/queue/a\nreceipt:message-12345\n\nHello queue a!\n-----\nDid not contain a destination header, which is REQUIRED\nfor message propagation.\n";

#[test]
fn error_example_as_printed_declares_one_byte_more_than_its_body() {
    // The spec prints content-length:171 for a 170-byte body. content-length is binding
    // ("this number of octets MUST be read"), so the printed frame is not whole yet: the
    // decoder waits for the 171st byte and the NUL after it.
    let printed = format!(
        "ERROR\nreceipt-id:message-12345\ncontent-type:text/plain\ncontent-length:171\nmessage: malformed frame received\n\n{ERROR_BODY}^@"
    );
    assert_eq!(ERROR_BODY.len(), 170);
    let mut buf = BytesMut::from(&wire(&printed)[..]);
    let mut decoder = Decoder::new(Limits::default());
    assert_eq!(decoder.decode(&mut buf).unwrap(), None);
    buf.extend_from_slice(b"\0");
    let f = decoder.decode(&mut buf).unwrap().unwrap();
    assert_eq!(f.body.len(), 171);
    assert_eq!(f.body[170], 0);
}

#[test]
fn error_example_with_its_length_corrected() {
    let f = decode_one(&wire(&format!(
        "ERROR\nreceipt-id:message-12345\ncontent-type:text/plain\ncontent-length:170\nmessage: malformed frame received\n\n{ERROR_BODY}^@"
    )));
    // 1.2: header values are never trimmed.
    assert_eq!(f.header("message"), Some(" malformed frame received"));
    assert_eq!(f.header("receipt-id"), Some("message-12345"));
    assert_eq!(&f.body[..], ERROR_BODY.as_bytes());
}

#[test]
fn heart_beat_examples() {
    let f = decode_one(&wire("CONNECT\nheart-beat:10000,20000\n\n^@"));
    let hb = stomp_codec::HeartBeat::parse(f.header("heart-beat").unwrap()).unwrap();
    assert_eq!((hb.send_ms, hb.receive_ms), (10000, 20000));
}

#[test]
fn all_examples_in_one_stream_with_heart_beats_between() {
    let examples = [
        "CONNECT\naccept-version:1.2\nhost:stomp.github.org\n\n^@",
        "SEND\ndestination:/queue/a\ncontent-type:text/plain\n\nhello queue a\n^@",
        "SUBSCRIBE\nid:0\ndestination:/queue/foo\nack:client\n\n^@",
        "ACK\nsubscription:0\nmessage-id:007\ntransaction:tx1\n\n^@",
        "DISCONNECT\nreceipt:77\n^@",
    ];
    let mut stream = Vec::new();
    for e in examples {
        stream.extend_from_slice(b"\n\r\n");
        stream.extend_from_slice(&wire(e));
    }
    let mut buf = BytesMut::from(&stream[..]);
    let mut decoder = Decoder::new(Limits::default());
    let mut commands = Vec::new();
    while let Some(f) = decoder.decode(&mut buf).unwrap() {
        commands.push(f.command);
    }
    assert_eq!(
        commands,
        [
            Command::Connect,
            Command::Send,
            Command::Subscribe,
            Command::Ack,
            Command::Disconnect
        ]
    );
    assert!(buf.is_empty());
}
