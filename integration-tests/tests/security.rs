//! Identity (`../shared/design/security.md`): `--auth users` with `stoa users`, `--auth jwt`,
//! the one refusal text and its delay, the per-address failure limit, revocation, token
//! expiry, the HTTP API's identity, and no secret in the logs.

// Test code: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use integration_tests::{
    Broker, Conn, Event, Transport, add_account as add_user, frame, run_stoa_to_end,
    stoa_users as users,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use stomp_codec::Frame;

fn connect_frame(login: Option<&str>, passcode: Option<&str>) -> Frame {
    let mut f = frame(
        "CONNECT",
        &[("accept-version", "1.2"), ("heart-beat", "0,0")],
    );
    if let Some(login) = login {
        f.headers.push("login", login);
    }
    if let Some(passcode) = passcode {
        f.headers.push("passcode", passcode);
    }
    f
}

/// CONNECTs and returns the first frame back (CONNECTED or ERROR).
async fn try_connect(conn: &mut Conn, login: Option<&str>, passcode: Option<&str>) -> Frame {
    conn.send(&connect_frame(login, passcode)).await;
    conn.expect_frame().await
}

/// A fresh data directory, removed when the broker that takes it over is dropped.
fn data_dir(name: &str) -> std::path::PathBuf {
    // Tests run at once: each its own directory, even for the same name.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("stoa-security-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn stoa_users_adds_lists_changes_and_removes_accounts() {
    let dir = data_dir("cli");
    add_user(&dir, "alice", "correct horse", &["staff", "admin"]);
    add_user(&dir, "bob", "battery staple", &[]);
    let out = users(&dir, &["add", "bob", "--password-stdin"], "again\n");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let out = users(&dir, &["list"], "");
    let listed = String::from_utf8(out.stdout).unwrap();
    assert_eq!(listed, "alice staff,admin\nbob\n");
    assert!(!listed.contains("argon2"), "never a hash");
    let out = users(&dir, &["passwd", "alice", "--password-stdin"], "new one\n");
    assert!(out.status.success());
    let out = users(&dir, &["remove", "bob"], "");
    assert!(out.status.success());
    let out = users(&dir, &["remove", "bob"], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no user \"bob\""));
    // No terminal and no --password-stdin: a usage error, not a silent empty password.
    let out = users(&dir, &["add", "carol"], "");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--password-stdin"));
    // The database holds hashes, never the passwords.
    let db = std::fs::read(dir.join("users.db")).unwrap();
    let text = String::from_utf8_lossy(&db);
    assert!(text.contains("$argon2id$"));
    assert!(!text.contains("correct horse") && !text.contains("new one"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn accounts_added_at_the_same_moment_to_a_new_data_dir_all_land() {
    // Several `stoa users add` on a data directory that has no users.db yet: each may find
    // the file unmigrated while another creates its tables.
    for round in 0..5 {
        let dir = data_dir(&format!("race-{round}"));
        let adds: Vec<_> = (0..6)
            .map(|n| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    users(&dir, &["add", &format!("u{n}"), "--password-stdin"], "pw\n")
                })
            })
            .collect();
        for add in adds {
            let out = add.join().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let out = users(&dir, &["list"], "");
        assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 6);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[tokio::test]
async fn users_mode_checks_passwords_and_refuses_alike_after_the_delay() {
    let dir = data_dir("users");
    add_user(&dir, "alice", "s3cret", &[]);
    let broker = Broker::start_in(&dir, &["--auth", "users", "--auth-failure-delay-ms", "300"]);
    for kind in [Transport::Tcp, Transport::Ws] {
        let mut ok = Conn::open(&broker, kind).await;
        let connected = try_connect(&mut ok, Some("alice"), Some("s3cret")).await;
        assert_eq!(connected.command.as_str(), "CONNECTED", "{connected:?}");
        assert_eq!(connected.header("user-name"), Some("alice"));
        // Nothing a client sends changes who it is.
        ok.subscribe("0", "/topic/me").await;
        let spoof = frame(
            "SEND",
            &[("destination", "/topic/me"), ("x-sender", "mallory")],
        );
        ok.send(&spoof.with_body("hi")).await;
        assert_eq!(ok.expect_frame().await.header("x-sender"), Some("alice"));
        for (login, passcode) in [
            (Some("alice"), Some("wrong")),
            (Some("nobody"), Some("s3cret")),
            (Some("alice"), None),
            (None, Some("s3cret")),
        ] {
            let mut refused = Conn::open(&broker, kind).await;
            let started = Instant::now();
            let error = try_connect(&mut refused, login, passcode).await;
            assert_eq!(error.command.as_str(), "ERROR", "{login:?}/{passcode:?}");
            assert_eq!(
                error.header("message"),
                Some("authentication failed"),
                "the same text whatever was wrong"
            );
            assert!(
                started.elapsed() >= Duration::from_millis(300),
                "refused after {:?}, before the delay",
                started.elapsed()
            );
            refused.expect_closed().await;
        }
    }
}

#[tokio::test]
async fn too_many_failures_from_one_address_refuse_it_and_not_others() {
    let dir = data_dir("failures");
    add_user(&dir, "alice", "s3cret", &[]);
    let broker = Broker::start_in(
        &dir,
        &[
            "--auth",
            "users",
            "--auth-failure-delay-ms",
            "0",
            "--auth-max-failures",
            "3",
        ],
    );
    let here: std::net::IpAddr = [127, 0, 0, 7].into();
    for _ in 0..3 {
        let mut c = Conn::tcp_from(here, broker.stomp).await;
        let error = try_connect(&mut c, Some("alice"), Some("guess")).await;
        assert_eq!(error.header("message"), Some("authentication failed"));
    }
    // The right password, but from an address that failed three times within 60 s.
    let mut c = Conn::tcp_from(here, broker.stomp).await;
    let error = try_connect(&mut c, Some("alice"), Some("s3cret")).await;
    assert_eq!(error.header("message"), Some("too many failed logins"));
    // Elsewhere, untouched.
    let mut other = Conn::tcp_from([127, 0, 0, 8].into(), broker.stomp).await;
    let connected = try_connect(&mut other, Some("alice"), Some("s3cret")).await;
    assert_eq!(connected.command.as_str(), "CONNECTED");
}

/// Reads until an ERROR arrives (MESSAGEs before it are skipped), within `wait`.
async fn error_within(conn: &mut Conn, wait: Duration) -> Frame {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match conn.next_event_within(left).await {
            Some(Event::Frame(f)) if f.command.as_str() == "ERROR" => return f,
            Some(Event::Frame(_)) => {}
            Some(Event::Closed) => panic!("closed without an ERROR"),
            None => panic!("no ERROR within {wait:?}"),
        }
    }
}

#[tokio::test]
async fn a_changed_password_or_a_removed_account_ends_its_live_sessions() {
    let dir = data_dir("revoke");
    add_user(&dir, "alice", "one", &[]);
    add_user(&dir, "bob", "two", &[]);
    add_user(&dir, "carol", "three", &[]);
    let broker = Broker::start_in(&dir, &["--auth", "users"]);
    let mut alice = Conn::open(&broker, Transport::Ws).await;
    try_connect(&mut alice, Some("alice"), Some("one")).await;
    let mut bob = Conn::open(&broker, Transport::Tcp).await;
    try_connect(&mut bob, Some("bob"), Some("two")).await;
    let mut carol = Conn::open(&broker, Transport::Tcp).await;
    try_connect(&mut carol, Some("carol"), Some("three")).await;

    let started = Instant::now();
    let out = users(&dir, &["passwd", "alice", "--password-stdin"], "changed\n");
    assert!(out.status.success());
    let out = users(&dir, &["remove", "bob"], "");
    assert!(out.status.success());
    for conn in [&mut alice, &mut bob] {
        let error = error_within(conn, Duration::from_secs(5)).await;
        assert_eq!(error.header("message"), Some("session revoked"));
        conn.expect_closed().await;
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    // Carol's account did not change: her session goes on.
    carol.subscribe("0", "/topic/still").await;
    // The old password no longer opens a session; the new one does.
    let mut again = Conn::open(&broker, Transport::Tcp).await;
    let error = try_connect(&mut again, Some("alice"), Some("one")).await;
    assert_eq!(error.header("message"), Some("authentication failed"));
    let mut again = Conn::open(&broker, Transport::Tcp).await;
    let connected = try_connect(&mut again, Some("alice"), Some("changed")).await;
    assert_eq!(connected.command.as_str(), "CONNECTED");
}

#[tokio::test]
async fn the_http_api_takes_the_same_identity_and_config_and_health_stay_open() {
    let dir = data_dir("http");
    add_user(&dir, "alice", "s3cret", &[]);
    let broker = Broker::start_in(&dir, &["--auth", "users", "--auth-failure-delay-ms", "0"]);
    let (status, body) = broker.http_get("/api/config").await;
    assert_eq!((status, body.as_str()), (200, r#"{"auth":"users"}"#));
    assert_eq!(broker.http_get("/healthz").await.0, 200);
    let (status, head, _) = broker.http_request("GET", "/api/rooms", &[]).await;
    assert_eq!(status, 401);
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: basic"),
        "{head}"
    );
    // alice:s3cret and alice:wrong in Basic.
    let good = [("Authorization", "Basic YWxpY2U6czNjcmV0")];
    let bad = [("Authorization", "Basic YWxpY2U6d3Jvbmc=")];
    assert_eq!(broker.http_get_with("/api/rooms", &good).await.0, 200);
    // The node list is part of the API: names and counts only for those who logged in.
    assert_eq!(broker.http_get("/api/nodes").await.0, 401);
    let (status, body) = broker.http_get_with("/api/nodes", &good).await;
    assert_eq!(status, 200, "{body}");
    let nodes: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        nodes["nodes"][0]["name"], "local",
        "one node without --cluster: {body}"
    );
    let (status, body) = broker.http_get_with("/api/queues", &bad).await;
    assert_eq!(
        (status, body.as_str()),
        (401, r#"{"error":"authentication failed"}"#)
    );
}

// ---- JWT ----

const SECRET: &str = "a shared secret that is long enough";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(claims: serde_json::Value, alg: Algorithm, key: &EncodingKey) -> String {
    jsonwebtoken::encode(&Header::new(alg), &claims, key).unwrap()
}

fn hs256(claims: serde_json::Value) -> String {
    token(
        claims,
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
}

/// A token signed with nothing at all, as `alg:none` asks.
fn unsigned(claims: &serde_json::Value) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(claims.to_string())
    )
}

fn jwt_broker(extra: &[&str]) -> (Broker, std::path::PathBuf) {
    let dir = data_dir(&format!("jwt-{}", extra.len()));
    let secret = dir.join("secret");
    // A trailing newline, as editors leave: trimmed.
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let mut args = vec![
        "--auth",
        "jwt",
        "--jwt-secret-file",
        secret.to_str().unwrap(),
        "--auth-failure-delay-ms",
        "0",
        // Every refusal below comes from 127.0.0.1.
        "--auth-max-failures",
        "1000",
    ];
    args.extend_from_slice(extra);
    (Broker::start(&args), dir)
}

#[tokio::test]
async fn a_valid_token_is_the_identity_and_every_bad_one_is_refused() {
    let (broker, _dir) = jwt_broker(&["--jwt-issuer", "stoa-tests", "--jwt-audience", "chat"]);
    let good = serde_json::json!({
        "sub": "dana", "exp": now() + 600, "iss": "stoa-tests", "aud": "chat", "groups": ["staff"]
    });
    let mut c = Conn::open(&broker, Transport::Tcp).await;
    let connected = try_connect(&mut c, Some("someone-else"), Some(&hs256(good.clone()))).await;
    assert_eq!(
        connected.header("user-name"),
        Some("dana"),
        "sub, not login"
    );
    let with = |key: &str, value: serde_json::Value| {
        let mut claims = good.clone();
        claims[key] = value;
        claims
    };
    let without = |key: &str| {
        let mut claims = good.clone();
        claims.as_object_mut().unwrap().remove(key);
        claims
    };
    let other_secret = EncodingKey::from_secret(b"another secret").unwrap();
    let rsa = EncodingKey::from_rsa_pem(include_bytes!("../fixtures/jwt-rsa-private.pem")).unwrap();
    let cases: Vec<(&str, String)> = vec![
        ("expired", hs256(with("exp", (now() - 120).into()))),
        ("not yet valid", hs256(with("nbf", (now() + 600).into()))),
        ("no exp", hs256(without("exp"))),
        ("no sub", hs256(without("sub"))),
        (
            "a sub that is no user name",
            hs256(with("sub", "a/b".into())),
        ),
        ("wrong issuer", hs256(with("iss", "elsewhere".into()))),
        ("wrong audience", hs256(with("aud", "other".into()))),
        (
            "groups that are not strings",
            hs256(with("groups", 7.into())),
        ),
        (
            "bad signature",
            token(good.clone(), Algorithm::HS256, &other_secret),
        ),
        ("alg:none", unsigned(&good)),
        (
            "RS256 under an HMAC secret",
            token(good.clone(), Algorithm::RS256, &rsa),
        ),
        ("not a token", "abc.def".to_owned()),
    ];
    for (what, bad) in cases {
        let mut c = Conn::open(&broker, Transport::Ws).await;
        let error = try_connect(&mut c, None, Some(&bad)).await;
        assert_eq!(
            error.header("message"),
            Some("authentication failed"),
            "{what}"
        );
        c.expect_closed().await;
    }
    // No token at all.
    let mut c = Conn::open(&broker, Transport::Tcp).await;
    let error = try_connect(&mut c, Some("dana"), None).await;
    assert_eq!(error.header("message"), Some("authentication failed"));
}

#[tokio::test]
async fn the_token_may_come_on_the_websocket_upgrade() {
    let (broker, _dir) = jwt_broker(&[]);
    let bearer = hs256(serde_json::json!({ "sub": "erin", "exp": now() + 600 }));
    let query = hs256(serde_json::json!({ "sub": "frank", "exp": now() + 600 }));
    let protocols = Some("v12.stomp");
    let header = format!("Bearer {bearer}");
    let mut c = Conn::try_ws(&broker.ws_url(), protocols, &[("Authorization", &header)])
        .await
        .unwrap();
    let connected = try_connect(&mut c, None, None).await;
    assert_eq!(connected.header("user-name"), Some("erin"));
    let url = format!("{}?access_token={query}", broker.ws_url());
    let mut c = Conn::try_ws(&url, protocols, &[]).await.unwrap();
    let connected = try_connect(&mut c, None, None).await;
    assert_eq!(connected.header("user-name"), Some("frank"));
    // CONNECT's passcode comes first.
    let mut c = Conn::try_ws(&url, protocols, &[("Authorization", &header)])
        .await
        .unwrap();
    let connected = try_connect(&mut c, None, Some(&bearer)).await;
    assert_eq!(connected.header("user-name"), Some("erin"));
    // The HTTP API takes a Bearer token too.
    let (status, _) = broker
        .http_get_with("/api/rooms", &[("Authorization", &header)])
        .await;
    assert_eq!(status, 200);
    assert_eq!(broker.http_get("/api/rooms").await.0, 401);
}

#[tokio::test]
async fn a_session_whose_token_expires_is_closed_with_an_error() {
    let (broker, _dir) = jwt_broker(&[]);
    // Expired 28 s ago: still within the 30 s leeway, for 2 s more.
    let short = hs256(serde_json::json!({ "sub": "gina", "exp": now() - 28 }));
    let mut c = Conn::open(&broker, Transport::Ws).await;
    let connected = try_connect(&mut c, None, Some(&short)).await;
    assert_eq!(connected.command.as_str(), "CONNECTED");
    let error = error_within(&mut c, Duration::from_secs(6)).await;
    assert_eq!(error.header("message"), Some("token expired"));
    c.expect_closed().await;
}

/// A public key of each kind the contract names checks the tokens its private key signs;
/// an HS256 token signed with the public key's PEM as its secret (algorithm confusion) is
/// refused.
#[tokio::test]
async fn public_keys_of_every_kind_and_no_algorithm_confusion() {
    let ec256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let ec384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let rsa_private = include_bytes!("../fixtures/jwt-rsa-private.pem");
    let rsa_public = include_str!("../fixtures/jwt-rsa-public.pem").to_owned();
    let kinds: Vec<(&str, String, Algorithm, EncodingKey)> = vec![
        (
            "RS256",
            rsa_public.clone(),
            Algorithm::RS256,
            EncodingKey::from_rsa_pem(rsa_private).unwrap(),
        ),
        (
            "RS512",
            rsa_public,
            Algorithm::RS512,
            EncodingKey::from_rsa_pem(rsa_private).unwrap(),
        ),
        (
            "ES256",
            ec256.public_key_pem(),
            Algorithm::ES256,
            EncodingKey::from_ec_pem(ec256.serialize_pem().as_bytes()).unwrap(),
        ),
        (
            "ES384",
            ec384.public_key_pem(),
            Algorithm::ES384,
            EncodingKey::from_ec_pem(ec384.serialize_pem().as_bytes()).unwrap(),
        ),
        (
            "EdDSA",
            ed.public_key_pem(),
            Algorithm::EdDSA,
            EncodingKey::from_ed_pem(ed.serialize_pem().as_bytes()).unwrap(),
        ),
    ];
    for (name, public_pem, alg, signing) in kinds {
        let dir = data_dir(&format!("pk-{name}"));
        let key_file = dir.join("public.pem");
        std::fs::write(&key_file, &public_pem).unwrap();
        let broker = Broker::start(&[
            "--auth",
            "jwt",
            "--jwt-public-key-file",
            key_file.to_str().unwrap(),
            "--auth-failure-delay-ms",
            "0",
        ]);
        let claims = serde_json::json!({ "sub": "hal", "exp": now() + 600 });
        let mut c = Conn::open(&broker, Transport::Tcp).await;
        let connected =
            try_connect(&mut c, None, Some(&token(claims.clone(), alg, &signing))).await;
        assert_eq!(connected.header("user-name"), Some("hal"), "{name}");
        let confused = token(
            claims,
            Algorithm::HS256,
            &EncodingKey::from_secret(public_pem.as_bytes()).unwrap(),
        );
        let mut c = Conn::open(&broker, Transport::Tcp).await;
        let error = try_connect(&mut c, None, Some(&confused)).await;
        assert_eq!(
            error.header("message"),
            Some("authentication failed"),
            "{name}: an HS256 token under a public key"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn a_jwt_broker_without_a_usable_key_does_not_start() {
    let dir = data_dir("nokey");
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not a key").unwrap();
    for (args, says) in [
        (vec!["--auth", "jwt"], "exactly one of --jwt-secret-file"),
        (
            vec![
                "--auth",
                "jwt",
                "--jwt-public-key-file",
                garbage.to_str().unwrap(),
            ],
            "garbage.pem",
        ),
        (
            vec!["--auth", "jwt", "--jwt-secret-file", "/nonexistent/secret"],
            "/nonexistent/secret",
        ),
    ] {
        let out = run_stoa_to_end(&dir, &args);
        assert!(!out.status.success(), "{args:?} started");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn no_secret_reaches_the_log_even_at_debug() {
    let dir = data_dir("logs");
    add_user(&dir, "ivan", "pa55word-in-the-log?", &[]);
    let broker = Broker::start_in_capturing_stderr(
        &dir,
        &["--auth", "users", "--auth-failure-delay-ms", "0"],
        &[("RUST_LOG", "debug")],
    );
    for password in ["pa55word-in-the-log?", "wr0ng-password-in-the-log?"] {
        let mut c = Conn::open(&broker, Transport::Ws).await;
        try_connect(&mut c, Some("ivan"), Some(password)).await;
    }
    let basic = "Basic aXZhbjpwYTU1d29yZC1pbi10aGUtbG9nPw==";
    broker
        .http_get_with("/api/rooms", &[("Authorization", basic)])
        .await;
    let jwt_dir = data_dir("logs-jwt");
    let secret = jwt_dir.join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let jwt = Broker::start_capturing_stderr(
        &[
            "--auth",
            "jwt",
            "--jwt-secret-file",
            secret.to_str().unwrap(),
        ],
        &[("RUST_LOG", "debug")],
    );
    let token = hs256(serde_json::json!({ "sub": "judy", "exp": now() + 600 }));
    let mut c = Conn::open(&jwt, Transport::Tcp).await;
    try_connect(&mut c, None, Some(&token)).await;
    let url = format!("{}?access_token={token}", jwt.ws_url());
    let mut c = Conn::try_ws(&url, None, &[]).await.unwrap();
    try_connect(&mut c, None, None).await;
    let log = broker.stderr() + &jwt.stderr();
    assert!(
        log.contains("authentication failed"),
        "the failure is logged: {log}"
    );
    assert!(
        log.contains("stomp session open"),
        "debug logs were on: {log}"
    );
    let signature = token.rsplit('.').next().unwrap();
    for secret in [
        "pa55word-in-the-log?",
        "wr0ng-password-in-the-log?",
        "aXZhbjpwYTU1d29yZC1pbi10aGUtbG9nPw",
        "$argon2id$",
        SECRET,
        signature,
    ] {
        assert!(!log.contains(secret), "{secret:?} is in the log");
    }
    std::fs::remove_dir_all(&jwt_dir).unwrap();
}

#[tokio::test]
async fn stoa_cli_sends_its_token_as_the_passcode() {
    let (broker, _dir) = jwt_broker(&[]);
    let mut watcher = Conn::open(&broker, Transport::Tcp).await;
    let watching = hs256(serde_json::json!({ "sub": "watcher", "exp": now() + 600 }));
    try_connect(&mut watcher, None, Some(&watching)).await;
    watcher.subscribe("w", "/topic/cli.token").await;
    let cli = |token: &str, body: &str| {
        Command::new(integration_tests::cli_bin())
            .args(["--url", &broker.ws_url(), "--token", token])
            .args(["send", "/topic/cli.token", body, "--receipt"])
            .output()
            .unwrap()
    };
    let good = hs256(serde_json::json!({ "sub": "gina", "exp": now() + 600 }));
    let out = cli(&good, "from the cli");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = watcher.expect_frame().await;
    assert_eq!(&got.body[..], b"from the cli");
    assert_eq!(got.header("x-sender"), Some("gina"), "the token's sub");
    // An expired token: the broker's ERROR, exit code 4, and the token is not echoed.
    let expired = hs256(serde_json::json!({ "sub": "gina", "exp": now() - 600 }));
    let out = cli(&expired, "too late");
    assert_eq!(out.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("authentication failed"), "{stderr}");
    assert!(!stderr.contains(&expired), "the token is not printed");
}

#[tokio::test]
async fn jwt_tokens_come_in_the_query_where_headers_cannot_be_set() {
    let (broker, _dir) = jwt_broker(&[]);
    let token = hs256(serde_json::json!({ "sub": "grace", "exp": now() + 600 }));
    let http = reqwest::Client::new();
    let base = format!("http://{}", broker.http);
    // EventSource sends no Authorization: the room API takes `access_token` instead.
    let status = |r: reqwest::Response| r.status().as_u16();
    let sent = http
        .post(format!(
            "{base}/api/rooms/jwtq/messages?access_token={token}"
        ))
        .body("by token")
        .send()
        .await
        .unwrap();
    assert_eq!(status(sent), 201);
    let refused = http
        .get(format!("{base}/api/rooms/jwtq/messages"))
        .send()
        .await
        .unwrap();
    assert_eq!(status(refused), 401);
    let forged = http
        .get(format!(
            "{base}/api/rooms/jwtq/messages?access_token={token}x"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(status(forged), 401);
    let read: serde_json::Value = http
        .get(format!(
            "{base}/api/rooms/jwtq/messages?since=0&access_token={token}"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(read["messages"][0]["sender"], "grace");
    // SockJS keeps the URL's query on every request: CONNECT needs no passcode then.
    let session = format!("{base}/ws/000/jwtq{}", std::process::id());
    let open = http
        .post(format!("{session}/xhr?access_token={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(open.text().await.unwrap(), "o\n");
    let connect =
        serde_json::to_string(&["CONNECT\naccept-version:1.2\nheart-beat:0,0\n\n\u{0}"]).unwrap();
    let sent = http
        .post(format!("{session}/xhr_send?access_token={token}"))
        .body(connect)
        .send()
        .await
        .unwrap();
    assert_eq!(status(sent), 204);
    let answer = http
        .post(format!("{session}/xhr?access_token={token}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        answer.contains("CONNECTED") && answer.contains("user-name:grace"),
        "{answer}"
    );
}

#[tokio::test]
async fn with_tokens_the_dashboard_opens_to_group_admin_by_query_or_header() {
    let (broker, _dir) = jwt_broker(&[]);
    let ops = hs256(serde_json::json!({ "sub": "ops", "exp": now() + 600, "groups": ["admin"] }));
    let staff =
        hs256(serde_json::json!({ "sub": "dana", "exp": now() + 600, "groups": ["staff"] }));
    // The page is opened with its token in the query; its requests send it as a header.
    let (status, page) = broker.http_get(&format!("/admin?access_token={ops}")).await;
    assert_eq!(status, 200);
    assert!(page.contains("Stoa admin"));
    let bearer = format!("Bearer {ops}");
    let (status, body) = broker
        .http_get_with("/admin/api/overview", &[("Authorization", &bearer)])
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = broker
        .http_get(&format!("/admin?access_token={staff}"))
        .await;
    assert_eq!(status, 403, "a token outside group admin");
    let (status, _) = broker.http_get("/admin/api/overview").await;
    assert_eq!(status, 401, "no token");
}
