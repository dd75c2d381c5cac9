//! SockJS: the protocol as the sockjs-protocol suite defines it, checked against
//! `sockjs-test-server` (Stoa's SockJS layer with the conformance services), then STOMP over
//! it in the broker: origins, bad input, sessions whose client vanished.

// Test code: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use integration_tests::{Broker, Conn};
use reqwest::header::HeaderMap;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(10);

/// `sockjs-test-server` on a free port, stopped when dropped.
struct TestServer {
    child: Child,
    addr: SocketAddr,
}

impl TestServer {
    fn start(args: &[&str]) -> TestServer {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sockjs-test-server"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("sockjs-test-server starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening http=")
            .expect("the listening line")
            .parse()
            .unwrap();
        TestServer { child, addr }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().build().unwrap()
}

/// A fresh session path under `base`.
fn session(base: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{base}/000/s{}-{n}", std::process::id())
}

struct Answer {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

async fn request(method: &str, url: &str, body: Option<&str>, headers: &[(&str, &str)]) -> Answer {
    let mut request = http().request(method.parse().unwrap(), url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if let Some(body) = body {
        request = request.body(body.to_owned());
    }
    let response = tokio::time::timeout(WAIT, request.send())
        .await
        .expect("an answer in time")
        .expect("an answer");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.text().await.unwrap();
    Answer {
        status,
        headers,
        body,
    }
}

async fn post(url: &str, body: &str) -> Answer {
    request("POST", url, Some(body), &[]).await
}

/// A streaming response read piece by piece, whatever the chunking on the wire.
struct Streamed {
    status: u16,
    headers: HeaderMap,
    response: reqwest::Response,
    buffer: Vec<u8>,
}

impl Streamed {
    async fn open(method: &str, url: &str, headers: &[(&str, &str)]) -> Streamed {
        let mut request = http().request(method.parse().unwrap(), url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = tokio::time::timeout(WAIT, request.send())
            .await
            .expect("a response head in time")
            .expect("a response");
        Streamed {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            response,
            buffer: Vec::new(),
        }
    }

    /// The next `expected.len()` bytes, which must be `expected`.
    async fn expect(&mut self, expected: &str) {
        while self.buffer.len() < expected.len() {
            let chunk = tokio::time::timeout(WAIT, self.response.chunk())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {expected:?}"))
                .unwrap();
            match chunk {
                Some(chunk) => self.buffer.extend_from_slice(&chunk),
                None => panic!(
                    "the stream ended before {expected:?}; had {:?}",
                    String::from_utf8_lossy(&self.buffer)
                ),
            }
        }
        let got: Vec<u8> = self.buffer.drain(..expected.len()).collect();
        assert_eq!(String::from_utf8_lossy(&got), expected);
    }

    /// The stream ends with nothing more.
    async fn expect_end(&mut self) {
        let rest = tokio::time::timeout(WAIT, async {
            while let Some(chunk) = self.response.chunk().await.unwrap() {
                self.buffer.extend_from_slice(&chunk);
            }
        })
        .await;
        assert!(rest.is_ok(), "the stream did not end");
        assert!(
            self.buffer.is_empty(),
            "more before the end: {:?}",
            String::from_utf8_lossy(&self.buffer)
        );
    }
}

const NO_CACHE: &str = "no-store, no-cache, no-transform, must-revalidate, max-age=0";

#[tokio::test]
async fn the_greeting_info_and_unknown_paths() {
    let server = TestServer::start(&[]);
    for path in ["/echo", "/echo/"] {
        let answer = request("GET", &server.url(path), None, &[]).await;
        assert_eq!(answer.status, 200);
        assert_eq!(
            answer.header("content-type"),
            Some("text/plain; charset=UTF-8")
        );
        assert_eq!(answer.body, "Welcome to SockJS!\n");
        assert!(answer.header("set-cookie").is_none());
    }
    for suffix in ["/a", "/a.html", "//", "///", "/a/a", "/a/a/", "/a/"] {
        let answer = request("GET", &server.url(&format!("/echo{suffix}")), None, &[]).await;
        assert_eq!(answer.status, 404, "{suffix}");
    }

    let info = request(
        "GET",
        &server.url("/echo/info"),
        None,
        &[("Origin", "test")],
    )
    .await;
    assert_eq!(info.status, 200);
    assert_eq!(
        info.header("content-type"),
        Some("application/json; charset=UTF-8")
    );
    assert_eq!(info.header("cache-control"), Some(NO_CACHE));
    assert!(info.header("expires").is_none());
    assert_eq!(info.header("access-control-allow-origin"), Some("test"));
    assert_eq!(
        info.header("access-control-allow-credentials"),
        Some("true")
    );
    let first: serde_json::Value = serde_json::from_str(&info.body).unwrap();
    assert_eq!(first["websocket"], true);
    assert_eq!(first["cookie_needed"], false);
    assert_eq!(first["origins"], serde_json::json!(["*:*"]));
    let second = request("GET", &server.url("/echo/info"), None, &[]).await;
    assert_eq!(second.header("access-control-allow-origin"), Some("*"));
    assert!(second.header("access-control-allow-credentials").is_none());
    let second: serde_json::Value = serde_json::from_str(&second.body).unwrap();
    assert!(first["entropy"].is_u64() && second["entropy"].is_u64());
    assert_ne!(first["entropy"], second["entropy"], "entropy must change");

    let off = request(
        "GET",
        &server.url("/disabled_websocket_echo/info"),
        None,
        &[],
    )
    .await;
    let off: serde_json::Value = serde_json::from_str(&off.body).unwrap();
    assert_eq!(off["websocket"], false);
    let cookies = request("GET", &server.url("/cookie_needed_echo/info"), None, &[]).await;
    assert!(cookies.header("set-cookie").is_none());
    let cookies: serde_json::Value = serde_json::from_str(&cookies.body).unwrap();
    assert_eq!(cookies["cookie_needed"], true);
}

#[tokio::test]
async fn preflights_are_cacheable_and_echo_origin_and_headers() {
    let server = TestServer::start(&[]);
    let cases = [
        ("/echo/info", "OPTIONS, GET"),
        ("/echo/abc/abc/xhr", "OPTIONS, POST"),
        ("/echo/abc/abc/xhr_send", "OPTIONS, POST"),
        ("/echo/abc/abc/xhr_streaming", "OPTIONS, POST"),
    ];
    for (path, methods) in cases {
        for origin in ["test", "null"] {
            let answer = request(
                "OPTIONS",
                &server.url(path),
                None,
                &[
                    ("Origin", origin),
                    ("Access-Control-Request-Method", methods),
                ],
            )
            .await;
            assert_eq!(answer.status, 204, "{path}");
            assert_eq!(
                answer.header("cache-control"),
                Some("public, max-age=31536000")
            );
            assert!(answer.header("expires").is_some());
            assert_eq!(answer.header("access-control-max-age"), Some("31536000"));
            assert_eq!(answer.header("access-control-allow-methods"), Some(methods));
            assert_eq!(answer.header("access-control-allow-origin"), Some(origin));
            assert_eq!(
                answer.header("access-control-allow-credentials"),
                Some("true")
            );
            assert!(answer.body.is_empty());
        }
    }
    let asked = [
        ("Origin", "test"),
        ("Access-Control-Request-Method", "POST"),
        ("Access-Control-Request-Headers", "a, b, c"),
    ];
    let answer = request("OPTIONS", &server.url("/echo/x/y/xhr"), None, &asked).await;
    assert_eq!(
        answer.header("access-control-allow-headers"),
        Some("a, b, c")
    );
    let answer = request(
        "OPTIONS",
        &server.url("/echo/x/y/xhr"),
        None,
        &[("Origin", "test"), ("Access-Control-Request-Headers", "")],
    )
    .await;
    assert!(answer.header("access-control-allow-headers").is_none());
}

#[tokio::test]
async fn the_iframe_page_is_served_cacheable_under_every_versioned_name() {
    let server = TestServer::start(&[]);
    let mut etags = Vec::new();
    for page in [
        "/iframe.html",
        "/iframe-a.html",
        "/iframe-.html",
        "/iframe-0.1.2.html",
        "/iframe-0.1.2abc-dirty.2144.html",
        "/iframe-a.html?t=1234",
    ] {
        let answer = request("GET", &server.url(&format!("/echo{page}")), None, &[]).await;
        assert_eq!(answer.status, 200, "{page}");
        assert_eq!(
            answer.header("content-type"),
            Some("text/html; charset=UTF-8")
        );
        assert!(answer.header("cache-control").unwrap().contains("public"));
        assert!(
            answer
                .header("cache-control")
                .unwrap()
                .contains("max-age=31536000")
        );
        assert!(answer.header("expires").is_some());
        assert!(answer.header("last-modified").is_none());
        assert!(answer.header("set-cookie").is_none());
        assert!(answer.body.starts_with("<!DOCTYPE html>\n<html>\n<head>"));
        assert!(
            answer
                .body
                .contains("<script src=\"/vendor/sockjs.min.js\"></script>")
        );
        assert!(answer.body.contains("SockJS.bootstrap_iframe();"));
        etags.push(answer.header("etag").unwrap().to_owned());
    }
    etags.dedup();
    assert_eq!(etags.len(), 1, "one ETag for every name: {etags:?}");
    let cached = request(
        "GET",
        &server.url("/echo/iframe.html"),
        None,
        &[("If-None-Match", &etags[0])],
    )
    .await;
    assert_eq!(cached.status, 304);
    assert!(cached.header("content-type").is_none());
    assert!(cached.body.is_empty());
    for page in [
        "/iframe.htm",
        "/iframe",
        "/IFRAME.HTML",
        "/IFRAME",
        "/iframe.HTML",
        "/iframe.xml",
        "/iframe-/.html",
    ] {
        let answer = request("GET", &server.url(&format!("/echo{page}")), None, &[]).await;
        assert_eq!(answer.status, 404, "{page}");
    }
}

#[tokio::test]
async fn an_xhr_polling_session_opens_echoes_and_keeps_one_receiver() {
    let server = TestServer::start(&[]);
    let base = server.url(&session("/echo"));
    let opened = request("POST", &format!("{base}/xhr"), None, &[("Origin", "test")]).await;
    assert_eq!((opened.status, opened.body.as_str()), (200, "o\n"));
    assert_eq!(
        opened.header("content-type"),
        Some("application/javascript; charset=UTF-8")
    );
    assert_eq!(opened.header("cache-control"), Some(NO_CACHE));
    assert_eq!(opened.header("access-control-allow-origin"), Some("test"));

    let sent = request(
        "POST",
        &format!("{base}/xhr_send"),
        Some("[\"x\"]"),
        &[("Origin", "test")],
    )
    .await;
    assert_eq!(sent.status, 204);
    assert!(sent.body.is_empty());
    assert_eq!(
        sent.header("content-type"),
        Some("text/plain; charset=UTF-8")
    );
    assert_eq!(sent.header("cache-control"), Some(NO_CACHE));
    assert_eq!(sent.header("access-control-allow-origin"), Some("test"));
    assert_eq!(post(&format!("{base}/xhr"), "").await.body, "a[\"x\"]\n");

    // The server id is ignored: the session is its id alone.
    let other_server = base.replace("/000/", "/999/");
    assert_eq!(
        post(&format!("{other_server}/xhr_send"), "[\"y\"]")
            .await
            .status,
        204
    );
    assert_eq!(post(&format!("{base}/xhr"), "").await.body, "a[\"y\"]\n");

    // Any server and session values but empty ones or ones with dots.
    for part in ["/a/a1", "/_/_1", "/1/1", "/abcdefgh_i-j%20/abcdefg_i-j%20"] {
        let answer = post(
            &server.url(&format!("/echo{part}-{}/xhr", std::process::id())),
            "",
        )
        .await;
        assert_eq!(
            (answer.status, answer.body.as_str()),
            (200, "o\n"),
            "{part}"
        );
    }
    for part in ["//", "/a./a", "/a/a.", "/./.", "/", "///"] {
        let url = server.url(&format!("/echo{part}/xhr"));
        assert_eq!(post(&url, "").await.status, 404, "{part}");
        assert_eq!(request("GET", &url, None, &[]).await.status, 404, "{part}");
    }

    // Sending to a session that does not exist.
    let unknown = server.url(&session("/echo"));
    assert_eq!(
        post(&format!("{unknown}/xhr_send"), "[\"x\"]").await.status,
        404
    );
}

/// Polls `url` until a poll answers with messages (a poll that began before another one
/// attached gets the 2010 close frame; an idle one a heart-beat), and returns them.
fn receive_messages(url: String) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        loop {
            let body = post(&url, "").await.body;
            if body.starts_with('a') {
                return body;
            }
        }
    })
}

#[tokio::test]
async fn a_second_receiving_request_gets_the_2010_close_frame_and_the_first_goes_on() {
    // Heart-beats every second: a poll that lost the race to attach is answered soon.
    let server = TestServer::start(&["--heartbeat-ms", "1000"]);
    let base = server.url(&session("/echo"));
    assert_eq!(post(&format!("{base}/xhr"), "").await.body, "o\n");
    let receiving = receive_messages(format!("{base}/xhr"));
    let busy = wait_for_body(&format!("{base}/xhr"), |body| body.starts_with("c[2010")).await;
    assert_eq!(busy, "c[2010,\"Another connection still open\"]\n");
    assert_eq!(
        post(&format!("{base}/xhr_send"), "[\"z\"]").await.status,
        204
    );
    assert_eq!(receiving.await.unwrap(), "a[\"z\"]\n");
}

/// POSTs to `url` until the body satisfies `done` (another request must be in place first).
async fn wait_for_body(url: &str, done: impl Fn(&str) -> bool) -> String {
    let started = Instant::now();
    loop {
        let body = post(url, "").await.body;
        if done(&body) {
            return body;
        }
        assert!(started.elapsed() < WAIT, "never got there; last {body:?}");
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn an_aborted_poll_interrupts_the_session() {
    let server = TestServer::start(&["--heartbeat-ms", "1000"]);
    let base = server.url(&session("/echo"));
    assert_eq!(post(&format!("{base}/xhr"), "").await.body, "o\n");
    let receiving = receive_messages(format!("{base}/xhr"));
    // Once another poll is refused, the receiving one is attached: cut it.
    wait_for_body(&format!("{base}/xhr"), |body| body.starts_with("c[2010")).await;
    receiving.abort();
    let _ = receiving.await;
    let after = wait_for_body(&format!("{base}/xhr"), |body| !body.starts_with("c[2010")).await;
    assert_eq!(after, "c[1002,\"Connection interrupted\"]\n");
}

#[tokio::test]
async fn broken_and_empty_payloads_get_the_protocols_answer_and_the_session_goes_on() {
    let server = TestServer::start(&[]);
    let base = server.url(&session("/echo"));
    assert_eq!(post(&format!("{base}/xhr"), "").await.body, "o\n");
    let broken = post(&format!("{base}/xhr_send"), "[\"x").await;
    assert_eq!(broken.status, 500);
    assert!(
        broken.body.contains("Broken JSON encoding."),
        "{}",
        broken.body
    );
    for not_strings in ["[1]", "{\"a\":1}", "nul"] {
        let answer = post(&format!("{base}/xhr_send"), not_strings).await;
        assert_eq!(answer.status, 500, "{not_strings}");
    }
    let empty = post(&format!("{base}/xhr_send"), "").await;
    assert_eq!(empty.status, 500);
    assert!(empty.body.contains("Payload expected."), "{}", empty.body);
    assert_eq!(post(&format!("{base}/xhr_send"), "[]").await.status, 204);
    let types = [
        "text/plain",
        "T",
        "application/json",
        "application/xml",
        "",
        "application/json; charset=utf-8",
        "text/xml; charset=utf-8",
        "text/xml",
    ];
    for content_type in types {
        let answer = request(
            "POST",
            &format!("{base}/xhr_send"),
            Some("[\"a\"]"),
            &[("Content-Type", content_type)],
        )
        .await;
        assert_eq!(answer.status, 204, "{content_type}");
    }
    let all = vec!["\"a\""; types.len()].join(",");
    assert_eq!(
        post(&format!("{base}/xhr"), "").await.body,
        format!("a[{all}]\n")
    );
}

#[tokio::test]
async fn a_closed_session_serves_its_close_frame_to_every_request() {
    let server = TestServer::start(&[]);
    let base = server.url(&session("/close"));
    assert_eq!(post(&format!("{base}/xhr"), "").await.body, "o\n");
    for _ in 0..2 {
        let answer = post(&format!("{base}/xhr"), "").await;
        assert_eq!(
            (answer.status, answer.body.as_str()),
            (200, "c[3000,\"Go away!\"]\n")
        );
    }

    let base = server.url(&session("/close"));
    let mut first = Streamed::open("POST", &format!("{base}/xhr_streaming"), &[]).await;
    first.expect(&format!("{}\n", "h".repeat(2048))).await;
    first.expect("o\n").await;
    first.expect("c[3000,\"Go away!\"]\n").await;
    first.expect_end().await;
    let mut second = Streamed::open("POST", &format!("{base}/xhr_streaming"), &[]).await;
    second.expect(&format!("{}\n", "h".repeat(2048))).await;
    second.expect("c[3000,\"Go away!\"]\n").await;
    second.expect_end().await;
}

#[tokio::test]
async fn xhr_streaming_sends_a_prelude_then_frames_and_ends_at_the_byte_limit() {
    let server = TestServer::start(&[]);
    let base = server.url(&session("/echo"));
    let mut stream = Streamed::open(
        "POST",
        &format!("{base}/xhr_streaming"),
        &[("Origin", "test")],
    )
    .await;
    assert_eq!(stream.status, 200);
    assert_eq!(
        stream.headers.get("content-type").unwrap(),
        "application/javascript; charset=UTF-8"
    );
    assert_eq!(stream.headers.get("cache-control").unwrap(), NO_CACHE);
    assert_eq!(
        stream.headers.get("access-control-allow-origin").unwrap(),
        "test"
    );
    stream.expect(&format!("{}\n", "h".repeat(2048))).await;
    stream.expect("o\n").await;

    // A second stream on the same session is refused and ended.
    let mut second = Streamed::open("POST", &format!("{base}/xhr_streaming"), &[]).await;
    second.expect(&format!("{}\n", "h".repeat(2048))).await;
    second
        .expect("c[2010,\"Another connection still open\"]\n")
        .await;
    second.expect_end().await;

    // The test server ends a stream after 4096 bytes: 31 frames of 134 bytes.
    let message = format!("\"{}\"", "x".repeat(128));
    for _ in 0..31 {
        let sent = post(&format!("{base}/xhr_send"), &format!("[{message}]")).await;
        assert_eq!(sent.status, 204);
        stream.expect(&format!("a[{message}]\n")).await;
    }
    stream.expect_end().await;

    // The session lives on: the next stream picks it up without an open frame.
    let mut next = Streamed::open("POST", &format!("{base}/xhr_streaming"), &[]).await;
    next.expect(&format!("{}\n", "h".repeat(2048))).await;
    assert_eq!(
        post(&format!("{base}/xhr_send"), "[\"again\"]")
            .await
            .status,
        204
    );
    next.expect("a[\"again\"]\n").await;
}

#[tokio::test]
async fn an_aborted_stream_interrupts_the_session() {
    let server = TestServer::start(&[]);
    let base = server.url(&session("/echo"));
    let mut stream = Streamed::open("POST", &format!("{base}/xhr_streaming"), &[]).await;
    stream.expect(&format!("{}\n", "h".repeat(2048))).await;
    stream.expect("o\n").await;
    drop(stream);
    let started = Instant::now();
    loop {
        let mut next = Streamed::open("POST", &format!("{base}/xhr_streaming"), &[]).await;
        next.expect(&format!("{}\n", "h".repeat(2048))).await;
        let mut frame = Vec::new();
        while !frame.ends_with(b"\n") {
            let chunk = next.response.chunk().await.unwrap().unwrap();
            frame.extend_from_slice(&chunk);
        }
        let frame = String::from_utf8(frame).unwrap();
        if frame.starts_with("c[2010") {
            // The server has not seen the abort yet.
            assert!(started.elapsed() < WAIT);
            continue;
        }
        assert_eq!(frame, "c[1002,\"Connection interrupted\"]\n");
        break;
    }
}

#[tokio::test]
async fn eventsource_frames_are_data_lines_and_escape_what_must_be_escaped() {
    let server = TestServer::start(&[]);
    let base = server.url(&session("/echo"));
    let mut stream = Streamed::open("GET", &format!("{base}/eventsource"), &[]).await;
    assert_eq!(stream.status, 200);
    assert_eq!(
        stream.headers.get("content-type").unwrap(),
        "text/event-stream"
    );
    assert_eq!(stream.headers.get("cache-control").unwrap(), NO_CACHE);
    stream.expect("\r\n").await;
    stream.expect("data: o\r\n\r\n").await;
    assert_eq!(
        post(&format!("{base}/xhr_send"), "[\"x\"]").await.status,
        204
    );
    stream.expect("data: a[\"x\"]\r\n\r\n").await;
    assert_eq!(
        post(&format!("{base}/xhr_send"), r#"["  \u0000\n\r "]"#)
            .await
            .status,
        204
    );
    stream.expect("data: a[\"  \\u0000\\n\\r \"]\r\n\r\n").await;
    let large = format!("\"{}\"", "x".repeat(4096));
    assert_eq!(
        post(&format!("{base}/xhr_send"), &format!("[{large}]"))
            .await
            .status,
        204
    );
    stream.expect(&format!("data: a[{large}]\r\n\r\n")).await;
    stream.expect_end().await;
}

#[tokio::test]
async fn htmlfile_wraps_frames_in_scripts_for_a_checked_callback() {
    let server = TestServer::start(&[]);
    let no_callback = request("GET", &server.url("/echo/a/a/htmlfile"), None, &[]).await;
    assert_eq!(no_callback.status, 500);
    assert!(no_callback.body.contains("\"callback\" parameter required"));
    for bad in ["%20", "*", "abc(", "abc%28"] {
        let answer = request(
            "GET",
            &server.url(&format!("/echo/a/a/htmlfile?c={bad}")),
            None,
            &[],
        )
        .await;
        assert_eq!(answer.status, 500, "{bad}");
        assert!(
            answer.body.contains("invalid \"callback\" parameter"),
            "{bad}"
        );
    }

    let base = server.url(&session("/echo"));
    let mut stream = Streamed::open("GET", &format!("{base}/htmlfile?c=%63allback"), &[]).await;
    assert_eq!(stream.status, 200);
    assert_eq!(
        stream.headers.get("content-type").unwrap(),
        "text/html; charset=UTF-8"
    );
    assert_eq!(stream.headers.get("cache-control").unwrap(), NO_CACHE);
    // The head, padded past 1 KiB; then each frame as a script.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.extend_from_slice(&stream.response.chunk().await.unwrap().unwrap());
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.len() > 1024);
    assert!(head.starts_with("<!doctype html>"));
    assert!(head.contains("var c = parent.callback;"));
    stream.expect("<script>\np(\"o\");\n</script>\r\n").await;
    assert_eq!(
        post(&format!("{base}/xhr_send"), "[\"x\"]").await.status,
        204
    );
    stream
        .expect("<script>\np(\"a[\\\"x\\\"]\");\n</script>\r\n")
        .await;
    // A message cannot end the script element.
    assert_eq!(
        post(&format!("{base}/xhr_send"), "[\"</script>\"]")
            .await
            .status,
        204
    );
    stream
        .expect("<script>\np(\"a[\\\"\\u003c/script\\u003e\\\"]\");\n</script>\r\n")
        .await;
    let large = "x".repeat(4096);
    assert_eq!(
        post(&format!("{base}/xhr_send"), &format!("[\"{large}\"]"))
            .await
            .status,
        204
    );
    stream
        .expect(&format!(
            "<script>\np(\"a[\\\"{large}\\\"]\");\n</script>\r\n"
        ))
        .await;
    stream.expect_end().await;
}

#[tokio::test]
async fn the_server_escapes_unsafe_characters_and_reads_the_clients_escapes() {
    let server = TestServer::start(&[]);
    let base = server.url(&session("/echo"));
    assert_eq!(post(&format!("{base}/xhr"), "").await.body, "o\n");
    let unsafe_chars: String = (0x200c..=0x200f)
        .chain(0x2028..=0x202f)
        .chain(0x2060..=0x206f)
        .chain(0xfff0..=0xffff)
        .filter_map(char::from_u32)
        .collect();
    let payload = serde_json::to_string(&vec![unsafe_chars.clone()]).unwrap();
    assert_eq!(
        post(&format!("{base}/xhr_send"), &payload).await.status,
        204
    );
    let body = post(&format!("{base}/xhr"), "").await.body;
    let expected: String = unsafe_chars
        .chars()
        .map(|c| format!("\\u{:04x}", u32::from(c)))
        .collect();
    assert_eq!(body, format!("a[\"{expected}\"]\n"));

    // What a client escapes comes back as the same characters.
    let escaped: String = (0x00..0x20)
        .chain(0x7f..0xa0)
        .chain([0xad, 0x2000, 0x20ff, 0xfeff, 0x0600])
        .map(|c| format!("\\u{c:04x}"))
        .collect();
    assert_eq!(
        post(&format!("{base}/xhr_send"), &format!("[\"{escaped}\"]"))
            .await
            .status,
        204
    );
    let body = post(&format!("{base}/xhr"), "").await.body;
    let echoed: Vec<String> = serde_json::from_str(body.trim().strip_prefix('a').unwrap()).unwrap();
    let sent: String = serde_json::from_str(&format!("\"{escaped}\"")).unwrap();
    assert_eq!(echoed, vec![sent]);
}

#[tokio::test]
async fn cookie_needed_sessions_set_jsessionid() {
    let server = TestServer::start(&[]);
    let check = |answer_cookie: Option<&str>, expected: &str| {
        let cookie = answer_cookie.expect("a Set-Cookie");
        let mut parts = cookie.split(';');
        assert_eq!(parts.next().unwrap().trim(), expected);
        assert_eq!(parts.next().unwrap().trim().to_ascii_lowercase(), "path=/");
    };
    let base = server.url(&session("/cookie_needed_echo"));
    let answer = post(&format!("{base}/xhr"), "").await;
    assert_eq!(answer.body, "o\n");
    check(answer.header("set-cookie"), "JSESSIONID=dummy");
    let base = server.url(&session("/cookie_needed_echo"));
    let answer = request(
        "POST",
        &format!("{base}/xhr"),
        None,
        &[("Cookie", "JSESSIONID=abcdef")],
    )
    .await;
    check(answer.header("set-cookie"), "JSESSIONID=abcdef");
    for (method, transport) in [
        ("POST", "xhr_streaming"),
        ("GET", "eventsource"),
        ("GET", "htmlfile?c=cb"),
    ] {
        let base = server.url(&session("/cookie_needed_echo"));
        let stream = Streamed::open(method, &format!("{base}/{transport}"), &[]).await;
        let cookie = stream
            .headers
            .get("set-cookie")
            .map(|v| v.to_str().unwrap());
        check(cookie, "JSESSIONID=dummy");
    }
    let plain = post(&format!("{}/xhr", server.url(&session("/echo"))), "").await;
    assert!(plain.header("set-cookie").is_none());
}

async fn ws_connect(
    url: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("a WebSocket in time")
        .expect("a WebSocket")
        .0
}

async fn ws_next(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Option<Message> {
    tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("a message in time")
        .and_then(Result::ok)
}

#[tokio::test]
async fn the_websocket_transport_frames_messages_and_ends_on_broken_json() {
    let server = TestServer::start(&[]);
    let ws_base = format!("ws://{}", server.addr);
    let url = format!("{ws_base}{}/websocket", session("/echo"));
    let mut ws = ws_connect(&url).await;
    assert_eq!(ws_next(&mut ws).await, Some(Message::text("o")));
    ws.send(Message::text("")).await.unwrap();
    ws.send(Message::text("[]")).await.unwrap();
    ws.send(Message::text("[\"a\"]")).await.unwrap();
    assert_eq!(ws_next(&mut ws).await, Some(Message::text("a[\"a\"]")));
    // The same session id again is a session of its own.
    let mut again = ws_connect(&url).await;
    assert_eq!(ws_next(&mut again).await, Some(Message::text("o")));
    again.send(Message::text("[\"b\"]")).await.unwrap();
    assert_eq!(ws_next(&mut again).await, Some(Message::text("a[\"b\"]")));

    ws.send(Message::text("[\"a")).await.unwrap();
    let after = ws_next(&mut ws).await;
    assert!(
        matches!(after, None | Some(Message::Close(_))),
        "after broken JSON: {after:?}"
    );

    let mut closing = ws_connect(&format!("{ws_base}{}/websocket", session("/close"))).await;
    assert_eq!(ws_next(&mut closing).await, Some(Message::text("o")));
    assert_eq!(
        ws_next(&mut closing).await,
        Some(Message::text("c[3000,\"Go away!\"]"))
    );
    assert!(matches!(
        ws_next(&mut closing).await,
        None | Some(Message::Close(_))
    ));

    let plain_get = request("GET", &server.url("/echo/0/0/websocket"), None, &[]).await;
    assert_eq!(plain_get.status, 400);
    let mangled = request(
        "GET",
        &server.url("/echo/0/0/websocket"),
        None,
        &[("Upgrade", "WebSocket"), ("Connection", "close")],
    )
    .await;
    assert_eq!(mangled.status, 400);
    let posted = request("POST", &server.url("/echo/0/0/websocket"), None, &[]).await;
    assert_eq!(posted.status, 405);
    assert!(posted.header("allow").is_some());
    assert!(posted.header("content-type").is_none());
    assert!(posted.body.is_empty());
    let off = request(
        "GET",
        &server.url("/disabled_websocket_echo/0/0/websocket"),
        None,
        &[],
    )
    .await;
    assert_eq!(off.status, 404);
}

#[tokio::test]
async fn the_raw_websocket_carries_plain_messages() {
    let server = TestServer::start(&[]);
    let mut ws = ws_connect(&format!("ws://{}/echo/websocket", server.addr)).await;
    ws.send(Message::text("Hello world!\u{ffff}"))
        .await
        .unwrap();
    assert_eq!(
        ws_next(&mut ws).await,
        Some(Message::text("Hello world!\u{ffff}"))
    );
    let mut closing = ws_connect(&format!("ws://{}/close/websocket", server.addr)).await;
    match ws_next(&mut closing).await {
        Some(Message::Close(Some(frame))) => assert_eq!(frame.reason.as_str(), "Go away!"),
        other => panic!("expected a close with a reason, got {other:?}"),
    }
}

#[tokio::test]
async fn a_session_without_a_receiving_request_is_gone_after_the_disconnect_delay() {
    let delay = Duration::from_millis(300);
    let server = TestServer::start(&["--disconnect-delay-ms", "300"]);
    let base = server.url(&session("/echo"));
    let opened_at = Instant::now();
    assert_eq!(post(&format!("{base}/xhr"), "").await.body, "o\n");
    assert_eq!(
        post(&format!("{base}/xhr_send"), "[\"kept\"]").await.status,
        204
    );
    // Gone once the delay has passed with nobody receiving: sends are refused.
    let gone_at = loop {
        let status = post(&format!("{base}/xhr_send"), "[\"x\"]").await.status;
        if status == 404 {
            break Instant::now();
        }
        assert_eq!(status, 204);
        assert!(opened_at.elapsed() < WAIT, "the session never went");
        tokio::task::yield_now().await;
    };
    assert!(
        gone_at - opened_at >= delay,
        "gone after {:?}",
        gone_at - opened_at
    );
    // The same id now opens a new session.
    assert_eq!(post(&format!("{base}/xhr"), "").await.body, "o\n");
}

/// A STOMP client over raw SockJS xhr polling: frames as SockJS messages, read back as STOMP.
struct XhrStomp {
    base: String,
    frames: std::collections::VecDeque<String>,
    pending: String,
}

impl XhrStomp {
    async fn open(broker: &Broker) -> XhrStomp {
        let base = format!("http://{}{}", broker.http, session("/ws"));
        assert_eq!(post(&format!("{base}/xhr"), "").await.body, "o\n");
        XhrStomp {
            base,
            frames: std::collections::VecDeque::new(),
            pending: String::new(),
        }
    }

    /// Sends `messages` in one `xhr_send`.
    async fn send(&self, messages: &[&str]) {
        let body = serde_json::to_string(messages).unwrap();
        let answer = post(&format!("{}/xhr_send", self.base), &body).await;
        assert_eq!(answer.status, 204, "{}", answer.body);
    }

    /// The next STOMP frame's text (heart-beat EOLs skipped), polling as needed.
    async fn next_frame(&mut self) -> String {
        let started = Instant::now();
        loop {
            if let Some(frame) = self.frames.pop_front() {
                return frame;
            }
            assert!(started.elapsed() < WAIT, "no frame in time");
            let body = post(&format!("{}/xhr", self.base), "").await.body;
            let Some(array) = body.trim_end().strip_prefix('a') else {
                assert!(body == "h\n", "unexpected poll answer {body:?}");
                continue;
            };
            let messages: Vec<String> = serde_json::from_str(array).unwrap();
            for message in messages {
                self.pending.push_str(&message);
            }
            while let Some(end) = self.pending.find('\0') {
                let frame: String = self.pending.drain(..=end).collect();
                let frame = frame.trim_start_matches(['\n', '\r']).to_owned();
                self.frames.push_back(frame);
            }
        }
    }

    /// The next frame, which must start with `command`.
    async fn expect(&mut self, command: &str) -> String {
        let frame = self.next_frame().await;
        assert!(
            frame.starts_with(command),
            "expected {command}, got {frame:?}"
        );
        frame
    }
}

#[tokio::test]
async fn stomp_frames_may_span_sockjs_messages_and_share_them() {
    let broker = Broker::start(&[]);
    let mut client = XhrStomp::open(&broker).await;
    client
        .send(&[
            "CONNECT\naccept-version:1.2\nhost:x\nlog",
            "in:bob\nheart-beat:0,0\n\n\0",
        ])
        .await;
    let connected = client.expect("CONNECTED").await;
    assert!(connected.contains("version:1.2"), "{connected}");
    // Two frames in one message, the second one split into the next.
    client
        .send(&["SUBSCRIBE\nid:0\ndestination:/topic/t.split\n\n\0SUBSCRIBE\nid:1\ndestin"])
        .await;
    client
        .send(&["ation:/topic/t.other\nreceipt:r1\n\n\0"])
        .await;
    assert!(client.expect("RECEIPT").await.contains("receipt-id:r1"));

    let mut publisher = Conn::open_as(&broker, "alice").await;
    publisher
        .send(
            &integration_tests::frame("SEND", &[("destination", "/topic/t.split")])
                .with_body("héllo \"you\""),
        )
        .await;
    let message = client.expect("MESSAGE").await;
    assert!(message.contains("subscription:0"), "{message}");
    assert!(message.ends_with("héllo \"you\"\0"), "{message}");
}

#[tokio::test]
async fn sockjs_requests_from_other_origins_are_refused() {
    let broker = Broker::start(&["--allowed-origins", "http://app.example"]);
    let own = format!("http://{}", broker.http);
    let session_url = |transport: &str| format!("{own}{}/{transport}", session("/ws"));
    let urls = [
        ("GET", format!("{own}/ws/info")),
        ("GET", format!("{own}/ws/iframe.html")),
        ("POST", session_url("xhr")),
        ("POST", session_url("xhr_send")),
        ("GET", session_url("eventsource")),
        ("OPTIONS", session_url("xhr")),
    ];
    for (method, url) in &urls {
        let answer = request(method, url, None, &[("Origin", "http://evil.example")]).await;
        assert_eq!(answer.status, 403, "{method} {url}");
        assert!(
            answer.body.contains("origin not allowed"),
            "{}",
            answer.body
        );
    }
    for origin in ["http://app.example", own.as_str()] {
        let answer = request(
            "GET",
            &format!("{own}/ws/info"),
            None,
            &[("Origin", origin)],
        )
        .await;
        assert_eq!(answer.status, 200, "{origin}");
        assert_eq!(answer.header("access-control-allow-origin"), Some(origin));
        let opened = request("POST", &session_url("xhr"), None, &[("Origin", origin)]).await;
        assert_eq!((opened.status, opened.body.as_str()), (200, "o\n"));
    }
}

#[tokio::test]
async fn the_iframe_page_may_be_framed_by_allowed_pages_and_nothing_else_may() {
    let broker = Broker::start(&["--allowed-origins", "http://app.example"]);
    let (status, head, body) = broker.http_request("GET", "/ws/iframe.html", &[]).await;
    assert_eq!(status, 200);
    let head = head.to_ascii_lowercase();
    assert!(
        head.contains("frame-ancestors 'self' http://app.example"),
        "{head}"
    );
    assert!(head.contains("script-src 'self' 'sha256-"), "{head}");
    assert!(!head.contains("x-frame-options"), "{head}");
    assert!(body.contains("<script src=\"/vendor/sockjs.min.js\"></script>"));
    let (status, script) = broker.http_get("/vendor/sockjs.min.js").await;
    assert_eq!(status, 200);
    assert!(script.starts_with("/* sockjs-client v1.6.1"));
    // Everything else keeps its frame-ancestors 'none'.
    let (_, head, _) = broker.http_request("GET", "/ws/info", &[]).await;
    assert!(
        head.to_ascii_lowercase().contains("frame-ancestors 'none'"),
        "{head}"
    );
}

#[tokio::test]
async fn a_vanished_sockjs_client_leaves_its_room_after_the_disconnect_delay() {
    let delay = Duration::from_millis(500);
    let broker = Broker::start(&["--sockjs-disconnect-delay-ms", "500"]);
    let mut alice = Conn::open_as(&broker, "alice").await;
    // Alice's own join notice may come before the receipt.
    let subscribe = integration_tests::frame(
        "SUBSCRIBE",
        &[("id", "0"), ("destination", "/topic/room.gone")],
    );
    alice.send_with_receipt(&subscribe, "in").await;
    let mut bob = XhrStomp::open(&broker).await;
    bob.send(&["CONNECT\naccept-version:1.2\nhost:x\nlogin:bob\nheart-beat:0,0\n\n\0"])
        .await;
    bob.expect("CONNECTED").await;
    bob.send(&["SUBSCRIBE\nid:0\ndestination:/topic/room.gone\nreceipt:in\n\n\0"])
        .await;
    // Bob's own join notice and history may come first; the receipt means he is in.
    while !bob.next_frame().await.starts_with("RECEIPT") {}
    let last_poll = Instant::now();
    let joined = alice.expect_frame().await;
    assert_eq!(joined.header("x-event"), Some("join"), "{joined:?}");
    assert_eq!(joined.header("x-sender"), Some("bob"));
    // Bob polls no more: after the delay his session ends and he leaves the room.
    let left = alice.expect_frame().await;
    assert_eq!(left.header("x-event"), Some("leave"), "{left:?}");
    assert_eq!(left.header("x-sender"), Some("bob"));
    assert!(
        last_poll.elapsed() >= delay,
        "left after {:?}",
        last_poll.elapsed()
    );
}

#[tokio::test]
async fn bad_sockjs_input_gets_an_answer_and_leaves_other_sessions_alone() {
    let broker = Broker::start(&["--max-frame-bytes", "4096"]);
    let mut bystander = XhrStomp::open(&broker).await;
    bystander
        .send(&["CONNECT\naccept-version:1.2\nhost:x\nlogin:carol\nheart-beat:0,0\n\n\0"])
        .await;
    bystander.expect("CONNECTED").await;
    bystander
        .send(&["SUBSCRIBE\nid:0\ndestination:/topic/t.calm\nreceipt:r\n\n\0"])
        .await;
    bystander.expect("RECEIPT").await;

    let victim = XhrStomp::open(&broker).await;
    let send_url = format!("{}/xhr_send", victim.base);
    let broken = post(&send_url, "[\"CONN").await;
    assert_eq!(
        (broken.status, broken.body.as_str()),
        (500, "Broken JSON encoding.")
    );
    let empty = post(&send_url, "").await;
    assert_eq!(
        (empty.status, empty.body.as_str()),
        (500, "Payload expected.")
    );
    // Over six times the frame limit (plus slack) is refused before it is read whole.
    let huge = format!("[\"{}\"]", "x".repeat(1024 * 1024));
    let too_large = post(&send_url, &huge).await;
    assert_eq!(too_large.status, 413);
    let reason: serde_json::Value = serde_json::from_str(&too_large.body).unwrap();
    assert!(
        reason["error"].as_str().unwrap().contains("bytes"),
        "{reason}"
    );
    let unknown = post(
        &format!("http://{}{}/xhr_send", broker.http, session("/ws")),
        "[\"x\"]",
    )
    .await;
    assert_eq!(unknown.status, 404);
    // A frame over the limit inside good JSON is the STOMP error it always is.
    victim
        .send(&[&format!(
            "SEND\ndestination:/topic/t.calm\n\n{}\0",
            "y".repeat(5000)
        )])
        .await;
    let mut victim = victim;
    let error = victim.expect("ERROR").await;
    assert!(error.contains("exceeds the limit"), "{error}");

    let mut publisher = Conn::open_as(&broker, "dave").await;
    publisher
        .send(
            &integration_tests::frame("SEND", &[("destination", "/topic/t.calm")])
                .with_body("still fine"),
        )
        .await;
    assert!(bystander.expect("MESSAGE").await.ends_with("still fine\0"));
}
