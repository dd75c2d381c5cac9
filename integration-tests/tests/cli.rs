//! The `stoa` command: options as flags, `STOA_*` variables and TOML keys; `--help`; the
//! HTTP endpoints.

// Test code: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use integration_tests::{Broker, Conn, Transport, frame, stoa_bin};

/// Ten headers: more than any limit below, which all let the 4-header CONNECT through.
const TEN_HEADERS: &[u8] =
    b"SEND\ndestination:/topic/a\na:1\nb:2\nc:3\nd:4\ne:5\nf:6\ng:7\nh:8\ni:9\n\n\0";

#[test]
fn help_documents_every_option_with_its_variable() {
    let out = Command::new(stoa_bin()).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for (flag, var) in [
        ("--http-listen", "STOA_HTTP_LISTEN"),
        ("--stomp-listen", "STOA_STOMP_LISTEN"),
        ("--data-dir", "STOA_DATA_DIR"),
        ("--config", "STOA_CONFIG"),
        ("--max-frame-bytes", "STOA_MAX_FRAME_BYTES"),
        ("--max-body-bytes", "STOA_MAX_BODY_BYTES"),
        ("--max-headers", "STOA_MAX_HEADERS"),
        ("--max-header-line-bytes", "STOA_MAX_HEADER_LINE_BYTES"),
        ("--max-subscriptions", "STOA_MAX_SUBSCRIPTIONS"),
        ("--outbox-bytes", "STOA_OUTBOX_BYTES"),
        ("--heart-beat", "STOA_HEART_BEAT"),
        ("--heart-beat-tolerance", "STOA_HEART_BEAT_TOLERANCE"),
        ("--connect-timeout-ms", "STOA_CONNECT_TIMEOUT_MS"),
        ("--write-timeout-ms", "STOA_WRITE_TIMEOUT_MS"),
        ("--shutdown-grace-ms", "STOA_SHUTDOWN_GRACE_MS"),
        ("--room-history-bytes", "STOA_ROOM_HISTORY_BYTES"),
        ("--history-total-bytes", "STOA_HISTORY_TOTAL_BYTES"),
        ("--store-pending-bytes", "STOA_STORE_PENDING_BYTES"),
        ("--user-queue-bytes", "STOA_USER_QUEUE_BYTES"),
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
        assert!(help.contains(var), "--help lacks {var}");
    }
}

#[test]
fn a_bad_option_exits_2_with_a_message() {
    let out = Command::new(stoa_bin())
        .args(["--max-headers", "lots"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-headers"));
    let out = Command::new(stoa_bin())
        .args(["--config", "/nonexistent/stoa.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config file"));
}

async fn ten_headers_refused(broker: &Broker, limit: usize) {
    let mut c = Conn::open(broker, Transport::Tcp).await;
    c.login("limits").await;
    c.send_raw(TEN_HEADERS).await;
    c.expect_error_then_close(&format!("more than {limit} headers"))
        .await;
}

#[tokio::test]
async fn a_limit_can_be_set_by_flag_variable_or_file() {
    ten_headers_refused(&Broker::start(&["--max-headers", "5"]), 5).await;
    ten_headers_refused(
        &Broker::start_with_env(&[], &[("STOA_MAX_HEADERS", "6")]),
        6,
    )
    .await;
    let dir = std::env::temp_dir().join(format!("stoa-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("stoa.toml");
    std::fs::write(&file, "max-headers = 7\nheart-beat = \"0,0\"\n").unwrap();
    let path = file.to_str().unwrap();
    ten_headers_refused(&Broker::start(&["--config", path]), 7).await;
    // A flag wins over the file, and so does a variable.
    ten_headers_refused(&Broker::start(&["--config", path, "--max-headers", "8"]), 8).await;
    ten_headers_refused(
        &Broker::start_with_env(&["--config", path], &[("STOA_MAX_HEADERS", "9")]),
        9,
    )
    .await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn healthz_readyz_and_the_page_answer_over_http() {
    let broker = Broker::start(&[]);
    assert_eq!(broker.http_get("/healthz").await, (200, "ok\n".to_owned()));
    assert_eq!(
        broker.http_get("/readyz").await,
        (200, r#"{"status":"ready"}"#.to_owned())
    );
    let (status, page) = broker.http_get("/").await;
    assert_eq!(status, 200);
    assert!(page.contains("<html"));
}

/// The value of the sample `line_start` (name and labels) on the `/metrics` page.
async fn sample(broker: &Broker, line_start: &str) -> f64 {
    let (status, page) = broker.http_get("/metrics").await;
    assert_eq!(status, 200);
    assert!(page.ends_with("# EOF\n"), "an OpenMetrics page: {page}");
    page.lines()
        .find_map(|l| l.strip_prefix(line_start)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_count_known_traffic() {
    let broker = Broker::start(&["--auth-failure-delay-ms", "0"]);
    let names = [
        "stoa_connections_total{transport=\"ws\"}",
        "stoa_connections_open{transport=\"ws\"}",
        "stoa_connections_open{transport=\"tcp\"}",
        "stoa_frames_received_total{command=\"SEND\"}",
        "stoa_frames_sent_total{command=\"MESSAGE\"}",
        "stoa_frames_sent_total{command=\"RECEIPT\"}",
        "stoa_messages_published_total",
        "stoa_messages_delivered_total",
        "stoa_errors_sent_total{reason=\"UnsupportedDestination\"}",
        "stoa_queue_ready{queue=\"metrics-jobs\"}",
        "stoa_rooms",
        "stoa_sent_bytes_total",
        "stoa_received_bytes_total",
    ];
    let mut before = Vec::new();
    for name in names {
        before.push(sample(&broker, name).await);
    }
    // Two WebSocket readers and one TCP publisher; three SENDs with receipts to a topic
    // (six deliveries), one to a room, one to a queue nobody consumes, then a bad one.
    let mut readers = Vec::new();
    for n in 0..2 {
        let mut r = Conn::open(&broker, Transport::Ws).await;
        r.login(&format!("reader{n}")).await;
        r.subscribe("0", "/topic/metrics").await;
        readers.push(r);
    }
    let mut publisher = Conn::open(&broker, Transport::Tcp).await;
    publisher.login("publisher").await;
    for n in 0..3 {
        let send = frame("SEND", &[("destination", "/topic/metrics")]).with_body("x");
        publisher.send_with_receipt(&send, &format!("p{n}")).await;
    }
    for r in &mut readers {
        for _ in 0..3 {
            r.expect_frame().await;
        }
    }
    let send = frame("SEND", &[("destination", "/topic/room.metrics")]).with_body("hi");
    publisher.send_with_receipt(&send, "room").await;
    let send = frame("SEND", &[("destination", "/queue/metrics-jobs")]).with_body("job");
    publisher.send_with_receipt(&send, "queue").await;
    let mut after = Vec::new();
    for name in names {
        after.push(sample(&broker, name).await);
    }
    let delta = |i: usize| after[i] - before[i];
    assert_eq!(delta(0), 2.0, "two WebSocket connections");
    assert_eq!(after[1], 2.0, "both still open");
    assert_eq!(after[2], 1.0, "one TCP connection open");
    assert_eq!(delta(3), 5.0, "five SENDs");
    assert_eq!(delta(4), 6.0, "six MESSAGEs (three to each reader)");
    assert!(
        delta(5) >= 5.0 + 2.0,
        "RECEIPTs for the SENDs and SUBSCRIBEs"
    );
    assert_eq!(delta(6), 5.0, "five published");
    assert_eq!(delta(7), 6.0, "six delivered");
    assert_eq!(after[9], 1.0, "one job waits in its queue");
    assert_eq!(after[10], 1.0, "one room");
    assert!(delta(11) > 0.0 && delta(12) > 0.0, "bytes both ways");
    // An ERROR counts by its kind; the connection goes.
    publisher
        .send(&frame("SEND", &[("destination", "/nowhere")]).with_body("x"))
        .await;
    publisher.expect_error_then_close("").await;
    let mut errors = 0.0;
    for _ in 0..100 {
        errors = sample(&broker, names[8]).await - before[8];
        if errors > 0.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(errors, 1.0, "one ERROR for the unknown destination");
}
/// Waits (bounded) until the broker's captured standard error satisfies `done`.
async fn stderr_until(broker: &Broker, done: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let text = broker.stderr();
        if done(&text) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not logged in time: {text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn json_logs_are_one_object_a_line_with_the_sessions_fields() {
    let broker = Broker::start_capturing_stderr(&["--log-format", "json"], &[("RUST_LOG", "info")]);
    let mut c = Conn::open(&broker, Transport::Tcp).await;
    c.login("logged").await;
    c.close().await;
    let text = stderr_until(&broker, |t| t.contains("\"closed\"")).await;
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    assert!(
        lines
            .iter()
            .all(|l| l["timestamp"].is_string() && l["level"].is_string())
    );
    let open = lines
        .iter()
        .find(|l| l["fields"]["message"] == "stomp session open")
        .expect("the session's open line");
    assert_eq!(open["span"]["user"], "logged");
    assert_eq!(open["span"]["transport"], "tcp");
    assert!(open["span"]["id"].is_u64(), "{open}");
    assert!(
        open["span"]["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:"))
    );
}

#[tokio::test]
async fn an_authentication_failure_is_logged_once_by_default_without_the_password() {
    let dir = std::env::temp_dir().join(format!("stoa-authlog-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let broker = Broker::start_in_capturing_stderr(
        &dir,
        &[
            "--auth",
            "users",
            "--auth-failure-delay-ms",
            "0",
            "--log-format",
            "json",
        ],
        &[],
    );
    let mut c = Conn::open(&broker, Transport::Tcp).await;
    c.send(&frame(
        "CONNECT",
        &[
            ("accept-version", "1.2"),
            ("login", "nobody"),
            ("passcode", "s3cret-pw"),
        ],
    ))
    .await;
    c.expect_error_then_close("authentication failed").await;
    let text = stderr_until(&broker, |t| t.contains("authentication failed")).await;
    let failures: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|l| l["fields"]["message"] == "authentication failed")
        .collect();
    assert_eq!(failures.len(), 1, "{text}");
    assert_eq!(failures[0]["level"], "WARN");
    assert_eq!(failures[0]["fields"]["login"], "nobody");
    assert!(
        !text.contains("s3cret-pw"),
        "the password was logged: {text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn docs_config_md_is_what_stoa_config_prints() {
    let out = Command::new(stoa_bin())
        .args(["config", "--markdown"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let generated = String::from_utf8(out.stdout).unwrap();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/CONFIG.md");
    let committed = std::fs::read_to_string(&path).unwrap();
    assert!(
        generated == committed,
        "docs/CONFIG.md differs from the options: run `target/debug/stoa config --markdown > docs/CONFIG.md`"
    );
    // The plain form is the same TOML, without the page around it.
    let toml = Command::new(stoa_bin()).arg("config").output().unwrap();
    let toml = String::from_utf8(toml.stdout).unwrap();
    assert!(committed.contains(&toml));
    assert!(
        toml.contains("# Environment: STOA_SOCKJS_STREAM_BYTES\n#sockjs-stream-bytes = 131072\n")
    );
    let bad = Command::new(stoa_bin())
        .args(["config", "--yaml"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn the_systemd_unit_is_hardened_and_starts_stoa_with_flags_it_knows() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/stoa.service");
    let unit = std::fs::read_to_string(path).unwrap();
    for hardening in [
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/stoa",
        "LimitNOFILE=",
    ] {
        assert!(unit.contains(hardening), "{hardening} is missing");
    }
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("an ExecStart line");
    let help = Command::new(stoa_bin()).arg("--help").output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for flag in exec.split_whitespace().filter(|w| w.starts_with("--")) {
        assert!(help.contains(flag), "stoa does not know {flag}");
    }
}
