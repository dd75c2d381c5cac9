//! The `stoa-cli` binary: what `sub` prints is what `send` sent, `--json` parses, and exit
//! codes tell refused connections, broker errors and timeouts apart; against stoa and
//! against RabbitMQ.

// Test code: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Output, Stdio};

use integration_tests::{Broker, cli_bin};

fn cli(args: &[&str]) -> Output {
    Command::new(cli_bin()).args(args).output().unwrap()
}

/// Starts `sub` and returns once it reports its subscription confirmed, with its output.
fn spawn_sub(args: &[&str]) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut child = Command::new(cli_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.starts_with("subscribed to "), "sub said {line:?}");
    let out = BufReader::new(child.stdout.take().unwrap());
    (child, out)
}

#[test]
fn sub_prints_exactly_what_send_sent_as_json() {
    let broker = Broker::start(&[]);
    let url = broker.ws_url();
    let tcp = format!("tcp://{}", broker.stomp);
    let (mut sub, out) = spawn_sub(&[
        "--url",
        &url,
        "sub",
        "/topic/cli.json",
        "--count",
        "3",
        "--timeout",
        "20",
        "--json",
    ]);
    let out_send = cli(&[
        "--url",
        &tcp,
        "--login",
        "alice",
        "send",
        "/topic/cli.json",
        "안녕 from args",
        "-H",
        "x-note:a:b",
        "--receipt",
    ]);
    assert!(
        out_send.status.success(),
        "{}",
        String::from_utf8_lossy(&out_send.stderr)
    );
    assert!(String::from_utf8_lossy(&out_send.stderr).contains("message-id="));
    let mut piped = Command::new(cli_bin())
        .args([
            "--url",
            &url,
            "send",
            "/topic/cli.json",
            "--content-type",
            "text/plain",
        ])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    piped
        .stdin
        .take()
        .unwrap()
        .write_all(b"line one\nline two")
        .unwrap();
    assert!(piped.wait().unwrap().success());
    let binary = cli(&[
        "--url",
        &url,
        "--stomp-version",
        "1.1",
        "send",
        "/topic/cli.json",
        "third",
        "--receipt",
    ]);
    assert!(binary.status.success());
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    assert!(sub.wait().unwrap().success());
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["body"], "안녕 from args");
    assert_eq!(lines[0]["destination"], "/topic/cli.json");
    assert_eq!(lines[0]["headers"]["x-note"], "a:b");
    assert_eq!(lines[0]["headers"]["x-sender"], "alice");
    assert_eq!(lines[1]["body"], "line one\nline two");
    assert_eq!(lines[1]["headers"]["content-type"], "text/plain");
    assert_eq!(lines[2]["body"], "third");
}

#[test]
fn sub_replays_room_history_and_acks_in_client_mode() {
    let broker = Broker::start(&[]);
    let url = broker.ws_url();
    for i in 1..=3 {
        assert!(
            cli(&[
                "--url",
                &url,
                "--login",
                "bob",
                "send",
                "/topic/room.cli",
                &format!("m{i}"),
                "--receipt"
            ])
            .status
            .success()
        );
    }
    let out = cli(&[
        "--url",
        &url,
        "sub",
        "/topic/room.cli",
        "--history",
        "2",
        "--count",
        "3",
        "--timeout",
        "10",
        "--ack",
        "client-individual",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            "/topic/room.cli #2 bob: m2",
            "/topic/room.cli #3 bob: m3",
            "/topic/room.cli #4: * guest-4 join"
        ]
    );
    let out = cli(&[
        "--url",
        &url,
        "sub",
        "/topic/room.cli",
        "--since",
        "3",
        "--count",
        "1",
        "--timeout",
        "10",
        "--json",
    ]);
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["headers"]["x-seq"], "4");
    assert_eq!(line["headers"]["x-replay"], "true");
}

#[test]
fn exit_codes_say_what_failed() {
    let broker = Broker::start(&[]);
    let url = broker.ws_url();
    let refused = cli(&["--url", "tcp://127.0.0.1:1", "send", "/topic/a", "x"]);
    assert_eq!(refused.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("connection refused"));
    let error = cli(&[
        "--url",
        &url,
        "send",
        "/topic/room.no good",
        "x",
        "--receipt",
    ]);
    assert_eq!(error.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&error.stderr).contains("invalid room name"));
    let quiet = cli(&[
        "--url",
        &url,
        "sub",
        "/topic/quiet",
        "--count",
        "1",
        "--timeout",
        "0.3",
    ]);
    assert_eq!(quiet.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&quiet.stderr).contains("timed out after 0 of 1"));
    let usage = cli(&["--url", &url, "sub"]);
    assert_eq!(usage.status.code(), Some(2));
    let bad_url = cli(&["--url", "http://x", "send", "/topic/a", "x"]);
    assert_eq!(bad_url.status.code(), Some(3));
}

#[test]
fn send_and_sub_work_against_rabbitmq() {
    let Some((tcp, ws)) = integration_tests::rabbitmq() else {
        return;
    };
    let (tcp, ws) = (tcp.as_str(), ws.as_str());
    let guest = ["--login", "guest", "--passcode", "guest"];
    let mut args = vec!["--url", ws];
    args.extend(guest);
    args.extend([
        "sub",
        "/topic/stoa-cli.rabbit",
        "--count",
        "2",
        "--timeout",
        "20",
        "--json",
    ]);
    let (mut sub, out) = spawn_sub(&args);
    for (url, body) in [(ws, "over web-stomp"), (tcp, "over stomp")] {
        let mut args = vec!["--url", url];
        args.extend(guest);
        args.extend(["send", "/topic/stoa-cli.rabbit", body, "--receipt"]);
        let sent = cli(&args);
        assert!(
            sent.status.success(),
            "{url}: {}",
            String::from_utf8_lossy(&sent.stderr)
        );
    }
    let bodies: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(&l.unwrap()).unwrap()["body"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(sub.wait().unwrap().success());
    assert_eq!(bodies, ["over web-stomp", "over stomp"]);
}

#[test]
fn several_urls_reach_the_first_that_answers() {
    let broker = Broker::start(&[]);
    // A loopback port where nothing listens.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (mut sub, mut out) = spawn_sub(&[
        "--url",
        &format!("tcp://{dead}"),
        "--url",
        &broker.ws_url(),
        "sub",
        "/topic/cli.urls",
        "--count",
        "1",
        "--timeout",
        "20",
    ]);
    let urls = format!("ws://{dead}/ws,tcp://{}", broker.stomp);
    let sent = cli(&[
        "--url",
        &urls,
        "send",
        "/topic/cli.urls",
        "by the second",
        "--receipt",
    ]);
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.contains("by the second"), "sub printed {line:?}");
    assert!(sub.wait().unwrap().success());
    // Only dead ones: connection refused, exit code 3.
    let refused = cli(&[
        "--url",
        &format!("tcp://{dead}"),
        "send",
        "/topic/cli.urls",
        "x",
    ]);
    assert_eq!(refused.status.code(), Some(3));
}
