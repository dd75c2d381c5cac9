//! Transport security (`../shared/design/security.md`): `--tls-cert`/`--tls-key` on both
//! listeners (HTTPS, wss://, STOMP over TLS), the pair checked at start, reloaded on SIGHUP
//! without dropping connections; security headers on every HTTP answer.

// Test code: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use client::{Client, Options, SubscribeOptions};
use futures_util::StreamExt;
use integration_tests::{Broker, TestPki, WAIT, cli_bin, run_stoa_to_end};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

fn tls_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("stoa-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

async fn tls_connect(addr: SocketAddr, ca_der: &[u8]) -> TlsStream<TcpStream> {
    let mut roots = RootCertStore::empty();
    roots.add(ca_der.to_vec().into()).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let stream = TcpStream::connect(addr).await.unwrap();
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), stream)
        .await
        .unwrap()
}

fn peer_certificate(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// GET over TLS: the response's head (lowercase) and body.
async fn https_get(addr: SocketAddr, ca_der: &[u8], path: &str) -> (String, String) {
    let mut tls = tls_connect(addr, ca_der).await;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    // rustls reports the peer's close without close_notify as an error; what came is kept.
    let _ = tls.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_ascii_lowercase(), body.to_owned())
}

/// A broker with TLS on both listeners.
fn tls_broker(cert: &std::path::Path, key: &std::path::Path) -> Broker {
    Broker::start(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ])
}

#[tokio::test]
async fn both_listeners_speak_tls_and_plain_clients_get_nothing() {
    let pki = TestPki::new("stoa one");
    let dir = tls_dir("both");
    let (cert, key, ca) = pki.write(&dir);
    let broker = tls_broker(&cert, &key);
    // STOMP over TLS and wss://, through the client library trusting the test CA.
    for url in [
        format!("tcp+tls://127.0.0.1:{}", broker.stomp.port()),
        format!("wss://localhost:{}/ws", broker.http.port()),
    ] {
        let options = Options::new().login("secure").trust_der(pki.ca_der.clone());
        let client = Client::connect(&url, options)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        let mut sub = client
            .subscribe("/topic/tls", SubscribeOptions::new())
            .await
            .unwrap();
        client
            .send_with_receipt("/topic/tls", "over tls")
            .await
            .unwrap();
        let got = tokio::time::timeout(WAIT, sub.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.text(), "over tls", "{url}");
    }
    // stoa-cli with --tls-ca.
    let out = Command::new(cli_bin())
        .args([
            "--url",
            &format!("tcp+tls://127.0.0.1:{}", broker.stomp.port()),
        ])
        .args(["--tls-ca", ca.to_str().unwrap(), "--login", "cli"])
        .args(["send", "/topic/tls", "from the cli", "--receipt"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without the CA the certificate is not trusted.
    let out = Command::new(cli_bin())
        .args([
            "--url",
            &format!("wss://localhost:{}/ws", broker.http.port()),
        ])
        .args(["send", "/topic/tls", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "an unknown CA is refused");
    // HTTPS, with HSTS among the security headers.
    let (head, body) = https_get(broker.http, &pki.ca_der, "/healthz").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, "ok\n");
    assert!(
        head.contains("strict-transport-security: max-age="),
        "{head}"
    );
    // A plain STOMP client on the TLS port gets no CONNECTED.
    let mut plain = TcpStream::connect(broker.stomp).await.unwrap();
    plain
        .write_all(b"CONNECT\naccept-version:1.2\n\n\0")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, plain.read_to_end(&mut answer)).await;
    assert!(
        !String::from_utf8_lossy(&answer).contains("CONNECTED"),
        "plain STOMP was served on the TLS port"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn sighup_reloads_the_pair_and_open_connections_stay() {
    let first = TestPki::new("stoa before");
    let dir = tls_dir("reload");
    let (cert, key, _) = first.write(&dir);
    let broker = tls_broker(&cert, &key);
    let before = tls_connect(broker.stomp, &first.ca_der).await;
    assert_eq!(peer_certificate(&before), first.cert_der);
    let options = Options::new()
        .login("stays")
        .trust_der(first.ca_der.clone());
    let url = format!("tcp+tls://127.0.0.1:{}", broker.stomp.port());
    let client = Client::connect(&url, options).await.unwrap();
    let mut sub = client
        .subscribe("/topic/stays", SubscribeOptions::new())
        .await
        .unwrap();

    let second = TestPki::new("stoa after");
    second.write(&dir);
    let status = Command::new("kill")
        .args(["-HUP", &broker.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // New connections get the new certificate once the signal is handled.
    let deadline = Instant::now() + WAIT;
    loop {
        // The old CA is not the new certificate's: connect trusting the new one.
        match tokio::time::timeout(
            Duration::from_secs(2),
            try_tls_certificate(broker.stomp, &second.ca_der),
        )
        .await
        {
            Ok(Some(der)) if der == second.cert_der => break,
            _ => assert!(Instant::now() < deadline, "the new pair never came"),
        }
    }
    // The connection opened before is still served.
    client
        .send_with_receipt("/topic/stays", "still here")
        .await
        .unwrap();
    let got = tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.text(), "still here");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The certificate a TLS connection trusting `ca_der` gets, if the handshake succeeds.
async fn try_tls_certificate(addr: SocketAddr, ca_der: &[u8]) -> Option<Vec<u8>> {
    let mut roots = RootCertStore::empty();
    roots.add(ca_der.to_vec().into()).ok()?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let stream = TcpStream::connect(addr).await.ok()?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").ok()?, stream)
        .await
        .ok()?;
    Some(peer_certificate(&tls))
}

#[test]
fn a_missing_or_mismatched_pair_stops_the_start_naming_the_file() {
    let dir = tls_dir("bad");
    let one = TestPki::new("one");
    let other = TestPki::new("other");
    let (cert, _, _) = one.write(&dir.join("one"));
    let (_, other_key, _) = other.write(&dir.join("other"));
    let cert = cert.to_str().unwrap();
    let other_key = other_key.to_str().unwrap();
    for (args, says) in [
        (
            vec!["--tls-cert", cert],
            "--tls-cert and --tls-key go together",
        ),
        (
            vec!["--tls-cert", cert, "--tls-key", other_key],
            "does not match the certificate",
        ),
        (
            vec![
                "--tls-cert",
                "/nonexistent/cert.pem",
                "--tls-key",
                other_key,
            ],
            "/nonexistent/cert.pem",
        ),
        (
            vec!["--tls-cert", other_key, "--tls-key", other_key],
            "no certificate",
        ),
    ] {
        let out = run_stoa_to_end(&dir.join("data"), &args);
        assert!(!out.status.success(), "{args:?} started");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn every_http_answer_carries_the_security_headers() {
    let broker = Broker::start(&["--auth", "users"]);
    for (method, path) in [
        ("GET", "/"),
        ("GET", "/chat.js"),
        ("GET", "/api/config"),
        ("GET", "/api/rooms"),
        ("GET", "/healthz"),
        ("GET", "/no-such-page"),
        ("GET", "/ws"),
        ("POST", "/api/rooms"),
    ] {
        let (status, head, _) = broker.http_request(method, path, &[]).await;
        let head = head.to_ascii_lowercase();
        for expected in [
            "content-security-policy: default-src 'self'; script-src 'self'",
            "frame-ancestors 'none'",
            "x-content-type-options: nosniff",
            "referrer-policy: no-referrer",
        ] {
            assert!(
                head.contains(expected),
                "{method} {path} ({status}) lacks {expected:?}: {head}"
            );
        }
    }
}
