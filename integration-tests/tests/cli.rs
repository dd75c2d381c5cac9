//! The `stoa` command: options as flags, `STOA_*` variables and TOML keys; `--help`; the
//! HTTP endpoints.

// Test code: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use integration_tests::{Broker, Conn, Transport, stoa_bin};

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
async fn healthz_and_metrics_answer_over_http() {
    let broker = Broker::start(&[]);
    assert_eq!(broker.http_get("/healthz").await, (200, "ok\n".to_owned()));
    assert_eq!(
        broker.http_get("/readyz").await,
        (200, r#"{"status":"ready"}"#.to_owned())
    );
    let mut c = Conn::open(&broker, Transport::Ws).await;
    c.login("counted").await;
    let (status, page) = broker.http_get("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        page.contains("# TYPE stoa_connections_open gauge"),
        "{page}"
    );
    assert!(
        page.lines().any(|l| l == "stoa_connections_open 1"),
        "{page}"
    );
    let (status, page) = broker.http_get("/").await;
    assert_eq!(status, 200);
    assert!(page.contains("<html"));
}
