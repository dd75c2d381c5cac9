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
        "stoa_delivery_latency_seconds_count",
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
    // Each reader's writes carried MESSAGEs: one latency at least per reader, at most one
    // per MESSAGE (the oldest of each write).
    assert!(
        (2.0..=6.0).contains(&delta(13)),
        "delivery latencies: {}",
        delta(13)
    );
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

/// `GET path` of the admin API as JSON, asserting a 200.
async fn admin_json(broker: &Broker, path: &str, headers: &[(&str, &str)]) -> serde_json::Value {
    let (status, body) = broker.http_get_with(path, headers).await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// The overview's session of `user`.
async fn admin_session(broker: &Broker, user: &str) -> serde_json::Value {
    let view = admin_json(broker, "/admin/api/overview", &[]).await;
    view["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["user"] == user)
        .cloned()
        .unwrap_or_else(|| panic!("no session of {user}: {view}"))
}

#[tokio::test]
async fn an_operator_sees_sessions_and_closes_one_and_the_log_says_who() {
    let broker = Broker::start_capturing_stderr(&[], &[]);
    let mut ada = Conn::open(&broker, Transport::Ws).await;
    ada.login("ada").await;
    let sub = frame(
        "SUBSCRIBE",
        &[("id", "0"), ("destination", "/topic/room.ops")],
    );
    ada.send(&sub).await;
    let join = ada.expect_frame().await;
    assert_eq!(join.header("x-event"), Some("join"), "{join:?}");
    let mut bystander = Conn::open_as(&broker, "bea").await;
    let session = admin_session(&broker, "ada").await;
    assert_eq!(session["transport"], "ws");
    assert!(
        session["address"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{session}"
    );
    assert_eq!(
        session["subscriptions"],
        serde_json::json!(["/topic/room.ops"])
    );
    let view = admin_json(&broker, "/admin/api/overview", &[]).await;
    assert!(
        view["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["room"] == "ops" && r["members"] == 1),
        "{view}"
    );
    assert_eq!(view["nodes"][0]["name"], "local");
    assert_eq!(view["cluster"], "ok");
    let id = session["id"].as_u64().unwrap();
    let close = format!("/admin/api/sessions/{id}/close");
    // A page of another origin cannot act, whatever the chat's allowed origins.
    let (status, _, _) = broker
        .http_request("POST", &close, &[("Origin", "http://evil.example")])
        .await;
    assert_eq!(status, 403);
    let (status, _, body) = broker
        .http_request("POST", &close, &[("Origin", "http://stoa")])
        .await;
    assert_eq!(status, 200, "{body}");
    ada.expect_error_then_close("session closed by an operator")
        .await;
    let (status, _, _) = broker
        .http_request("POST", "/admin/api/sessions/999999/close", &[])
        .await;
    assert_eq!(status, 404, "no such session");
    // The other client goes on.
    bystander
        .send_with_receipt(&frame("SEND", &[("destination", "/topic/x")]), "still")
        .await;
    // With the default RUST_LOG, one line each: the action refused and the one done.
    let log = stderr_until(&broker, |t| t.contains("close-session")).await;
    assert!(
        log.contains("admin action from another origin refused"),
        "{log}"
    );
    assert!(
        log.contains(&format!("session={id}")) && log.contains("done=true"),
        "{log}"
    );
    let (status, page) = broker.http_get("/admin").await;
    assert_eq!(status, 200);
    assert!(page.contains("Stoa admin"));
    // Through a proxy on this machine every visitor would be a loopback client: refused.
    let (status, _) = broker
        .http_get_with("/admin", &[("X-Forwarded-For", "203.0.113.9")])
        .await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn an_operator_purges_a_queue_and_clears_a_rooms_history_for_good() {
    let mut broker = Broker::start(&[]);
    let mut publisher = Conn::open_as(&broker, "pub").await;
    for n in 0..3 {
        let send = frame("SEND", &[("destination", "/queue/admin-jobs")]).with_body("old");
        publisher.send_with_receipt(&send, &format!("q{n}")).await;
    }
    for n in 0..2 {
        let send = frame("SEND", &[("destination", "/topic/room.kept")]).with_body("old");
        publisher.send_with_receipt(&send, &format!("r{n}")).await;
    }
    let (status, _, body) = broker
        .http_request("POST", "/admin/api/queues/admin-jobs/purge", &[])
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["purged"],
        3
    );
    let (status, _, body) = broker
        .http_request("POST", "/admin/api/rooms/kept/clear", &[])
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["cleared"],
        2
    );
    for missing in [
        "/admin/api/queues/nothing/purge",
        "/admin/api/rooms/nothing/clear",
    ] {
        let (status, _, _) = broker.http_request("POST", missing, &[]).await;
        assert_eq!(status, 404, "{missing}");
    }
    // What comes after is all there is: the consumer's first message is the new one.
    let send = frame("SEND", &[("destination", "/queue/admin-jobs")]).with_body("new");
    publisher.send_with_receipt(&send, "q-new").await;
    let take = frame(
        "SUBSCRIBE",
        &[("id", "0"), ("destination", "/queue/admin-jobs")],
    );
    let mut consumer = Conn::open_as(&broker, "worker").await;
    consumer.send(&take).await;
    assert_eq!(&consumer.expect_frame().await.body[..], b"new");
    // And gone from the disk too: the room has nothing after a restart.
    drop(publisher);
    drop(consumer);
    broker.terminate();
    let broker = Broker::restart_of(&mut broker, &[]);
    let view = admin_json(&broker, "/api/rooms/kept/messages", &[]).await;
    assert_eq!(view["messages"], serde_json::json!([]), "{view}");
    let mut publisher = Conn::open_as(&broker, "pub").await;
    let send = frame("SEND", &[("destination", "/queue/admin-jobs")]).with_body("newer");
    publisher.send_with_receipt(&send, "q-newer").await;
    let mut consumer = Conn::open_as(&broker, "worker").await;
    consumer.send(&take).await;
    assert_eq!(&consumer.expect_frame().await.body[..], b"newer");
}

#[tokio::test]
async fn with_accounts_only_group_admin_reaches_the_dashboard() {
    let dir = tempfile::tempdir().unwrap();
    integration_tests::add_account(dir.path(), "boss", "pw-boss", &["admin"]);
    integration_tests::add_account(dir.path(), "pleb", "pw-pleb", &["staff"]);
    let broker = Broker::start_in(
        dir.path(),
        &["--auth", "users", "--auth-failure-delay-ms", "0"],
    );
    let basic = |user: &str, pw: &str| {
        use base64::Engine as _;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"));
        format!("Basic {token}")
    };
    let (status, head, _) = broker.http_request("GET", "/admin", &[]).await;
    assert_eq!(status, 401);
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: basic"),
        "{head}"
    );
    let pleb = basic("pleb", "pw-pleb");
    for path in ["/admin", "/admin/api/overview"] {
        let (status, _) = broker
            .http_get_with(path, &[("Authorization", &pleb)])
            .await;
        assert_eq!(status, 403, "{path}");
    }
    let (status, _, _) = broker
        .http_request(
            "POST",
            "/admin/api/sessions/1/close",
            &[("Authorization", &pleb)],
        )
        .await;
    assert_eq!(status, 403);
    let boss = basic("boss", "pw-boss");
    let (status, _) = broker
        .http_get_with("/admin", &[("Authorization", &boss)])
        .await;
    assert_eq!(status, 200);
    let view = admin_json(&broker, "/admin/api/overview", &[("Authorization", &boss)]).await;
    assert_eq!(view["auth"], "users");
    // /metrics too is an operations endpoint once there are accounts.
    let (status, _) = broker.http_get("/metrics").await;
    assert_eq!(status, 401);
    let (status, _) = broker
        .http_get_with("/metrics", &[("Authorization", &pleb)])
        .await;
    assert_eq!(status, 403);
    let (status, page) = broker
        .http_get_with("/metrics", &[("Authorization", &boss)])
        .await;
    assert_eq!(status, 200);
    assert!(page.ends_with("# EOF\n"), "{page}");
}
