//! `--acl FILE` (`../shared/design/security.md`, "What a user may do"): SEND and SUBSCRIBE
//! allowed and denied, wildcard watchers that learn only of rooms they may enter, room lists
//! and presence filtered the same way, groups from the file and from accounts, SIGHUP.

// Test code: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use integration_tests::{Broker, Conn, Transport, frame, stoa_bin};

const RULES: &str = r#"
[groups]
staff = ["alice", "bob"]

[[allow]]
users = ["*"]
subscribe = ["/topic/room.*", "/user/queue/#", "/app/#"]
publish   = ["/topic/room.*", "/user/*/queue/*"]

[[deny]]
users = ["*"]
subscribe = ["/topic/room.staff"]
publish   = ["/topic/room.staff"]
except = ["@staff"]

[[allow]]
users = ["@staff"]
subscribe = ["/queue/#"]
publish   = ["/queue/#"]
"#;

fn acl_file(name: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("stoa-acl-{name}-{}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

async fn user(broker: &Broker, name: &str, kind: Transport) -> Conn {
    let mut c = Conn::open(broker, kind).await;
    c.login(name).await;
    c
}

#[tokio::test]
async fn sends_and_subscriptions_are_allowed_or_denied_with_a_bystander_unaffected() {
    let path = acl_file("rules", RULES);
    let broker = Broker::start(&["--acl", path.to_str().unwrap()]);
    let mut bystander = user(&broker, "bystander", Transport::Tcp).await;
    let join = frame(
        "SUBSCRIBE",
        &[("id", "0"), ("destination", "/topic/room.lobby")],
    );
    bystander.send_with_receipt(&join, "in").await;
    let denied: &[(&str, &str, &str)] = &[
        ("carol", "SUBSCRIBE", "/topic/room.staff"),
        ("carol", "SEND", "/topic/room.staff"),
        ("carol", "SEND", "/queue/jobs"),
        ("carol", "SUBSCRIBE", "/topic/news"),
        ("carol", "SUBSCRIBE", "/topic/news.*"),
        ("carol", "SEND", "/topic/lobby"),
    ];
    for (who, command, destination) in denied {
        for kind in [Transport::Tcp, Transport::Ws] {
            let mut c = user(&broker, who, kind).await;
            let mut f = frame(command, &[("destination", destination), ("receipt", "r")]);
            if *command == "SUBSCRIBE" {
                f.headers.push("id", "0");
            }
            c.send(&f).await;
            let error = c
                .expect_error_then_close(&format!("access denied: {destination}"))
                .await;
            assert_eq!(error.header("receipt-id"), Some("r"));
            // Nobody else noticed.
            let send =
                frame("SEND", &[("destination", "/topic/room.lobby")]).with_body(*destination);
            let mut publisher = user(&broker, "publisher", Transport::Tcp).await;
            publisher.send_with_receipt(&send, "p").await;
            loop {
                let got = bystander.expect_frame().await;
                if got.header("x-event").is_none() {
                    assert_eq!(got.body, destination.as_bytes());
                    break;
                }
            }
        }
    }
    let allowed: &[(&str, &str, &str)] = &[
        ("alice", "SUBSCRIBE", "/topic/room.staff"),
        ("alice", "SEND", "/queue/jobs"),
        ("carol", "SEND", "/user/dana/queue/dm"),
        ("carol", "SUBSCRIBE", "/user/queue/dm"),
        ("carol", "SUBSCRIBE", "/app/rooms"),
    ];
    for (who, command, destination) in allowed {
        let mut c = user(&broker, who, Transport::Tcp).await;
        let mut f = frame(command, &[("destination", destination)]);
        if *command == "SUBSCRIBE" {
            f.headers.push("id", "0");
        }
        c.send_with_receipt(&f, "ok").await;
    }
}

#[tokio::test]
async fn a_wildcard_watcher_learns_only_of_rooms_it_may_enter() {
    let path = acl_file("watch", RULES);
    let broker = Broker::start(&["--acl", path.to_str().unwrap()]);
    let mut carol = user(&broker, "carol", Transport::Ws).await;
    carol.subscribe("w", "/topic/room.*").await;
    let mut alice = user(&broker, "alice", Transport::Tcp).await;
    // Alice joins and talks in the staff room, then in the lobby.
    let join = frame(
        "SUBSCRIBE",
        &[("id", "s"), ("destination", "/topic/room.staff")],
    );
    alice.send_with_receipt(&join, "in").await;
    for (room, body) in [("staff", "secret plans"), ("lobby", "hello all")] {
        let send =
            frame("SEND", &[("destination", &format!("/topic/room.{room}"))]).with_body(body);
        alice.send_with_receipt(&send, room).await;
    }
    // The first thing carol sees is the lobby line: no join notice, no line from the staff
    // room came before it.
    let first = carol.expect_frame().await;
    assert_eq!(first.header("destination"), Some("/topic/room.lobby"));
    assert_eq!(first.body.as_ref(), b"hello all");
    assert!(carol.is_quiet_for(Duration::from_millis(200)).await);
    // Alice, staff, watching everything, sees both rooms.
    let mut watcher = user(&broker, "bob", Transport::Tcp).await;
    watcher.subscribe("w", "/topic/room.#").await;
    for room in ["staff", "lobby"] {
        let send =
            frame("SEND", &[("destination", &format!("/topic/room.{room}"))]).with_body(room);
        alice.send_with_receipt(&send, room).await;
        assert_eq!(
            watcher.expect_frame().await.header("destination"),
            Some(format!("/topic/room.{room}").as_str())
        );
    }
}

#[tokio::test]
async fn room_lists_and_presence_show_only_rooms_one_may_enter() {
    let dir = std::env::temp_dir().join(format!("stoa-acl-users-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // Erin is staff through her account's group, not the file's.
    for (name, group) in [("erin", Some("staff")), ("carol", None)] {
        let mut args = vec!["users", "add", name, "--password-stdin", "--data-dir"];
        args.push(dir.to_str().unwrap());
        if let Some(group) = group {
            args.extend(["--group", group]);
        }
        let mut child = Command::new(stoa_bin())
            .args(&args)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(b"pw\n").unwrap();
        assert!(child.wait().unwrap().success());
    }
    let path = acl_file("lists", RULES);
    let broker = Broker::start_in(&dir, &["--auth", "users", "--acl", path.to_str().unwrap()]);
    let connect = |name: &str| {
        frame(
            "CONNECT",
            &[
                ("accept-version", "1.2"),
                ("login", name),
                ("passcode", "pw"),
                ("heart-beat", "0,0"),
            ],
        )
    };
    let mut erin = Conn::open(&broker, Transport::Tcp).await;
    erin.send(&connect("erin")).await;
    assert_eq!(erin.expect_frame().await.command.as_str(), "CONNECTED");
    for room in ["staff", "lobby"] {
        let join = frame(
            "SUBSCRIBE",
            &[
                ("id", room),
                ("destination", &format!("/topic/room.{room}")),
            ],
        );
        erin.send_with_receipt(&join, room).await;
    }
    let mut carol = Conn::open(&broker, Transport::Ws).await;
    carol.send(&connect("carol")).await;
    assert_eq!(carol.expect_frame().await.command.as_str(), "CONNECTED");
    let ask = |id: &str, destination: &str| {
        frame("SUBSCRIBE", &[("id", id), ("destination", destination)])
    };
    let answer = carol.send_with_receipt(&ask("a", "/app/rooms"), "a").await;
    let rooms: serde_json::Value = serde_json::from_slice(&answer[0].body).unwrap();
    let names: Vec<&str> = rooms["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["room"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["lobby"]);
    let answer = carol
        .send_with_receipt(&ask("b", "/app/room.staff.members"), "b")
        .await;
    assert_eq!(
        std::str::from_utf8(&answer[0].body).unwrap(),
        r#"{"last_seq":0,"members":[],"room":"staff"}"#,
        "as for a room that never existed"
    );
    // Over HTTP, carol (carol:pw) and erin (erin:pw).
    let carol_auth = [("Authorization", "Basic Y2Fyb2w6cHc=")];
    let erin_auth = [("Authorization", "Basic ZXJpbjpwdw==")];
    let (status, body) = broker.http_get_with("/api/rooms", &carol_auth).await;
    assert_eq!(status, 200);
    assert!(!body.contains("staff") && body.contains("lobby"), "{body}");
    assert_eq!(
        broker
            .http_get_with("/api/rooms/staff", &carol_auth)
            .await
            .0,
        404
    );
    let (status, body) = broker.http_get_with("/api/rooms/staff", &erin_auth).await;
    assert_eq!(status, 200);
    assert!(body.contains("erin"), "{body}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn sighup_reloads_the_rules_and_a_bad_file_keeps_the_old_ones() {
    let path = acl_file("reload", RULES);
    let broker = Broker::start(&["--acl", path.to_str().unwrap()]);
    let send = frame("SEND", &[("destination", "/queue/jobs")]).with_body("work");
    let mut carol = user(&broker, "carol", Transport::Tcp).await;
    carol.send(&send).await;
    carol.expect_error_then_close("access denied").await;
    let hangup = || {
        let status = Command::new("kill")
            .args(["-HUP", &broker.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    std::fs::write(
        &path,
        RULES.replace(r#"users = ["@staff"]"#, r#"users = ["@staff", "carol"]"#),
    )
    .unwrap();
    hangup();
    // The reload happens a moment after the signal: ask until the new rule answers.
    let deadline = std::time::Instant::now() + integration_tests::WAIT;
    loop {
        let mut carol = user(&broker, "carol", Transport::Tcp).await;
        let mut with = send.clone();
        with.headers.push("receipt", "sent");
        carol.send(&with).await;
        let reply = carol.expect_frame().await;
        if reply.command.as_str() == "RECEIPT" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new rules never applied: {reply:?}"
        );
    }
    std::fs::write(&path, "this is not [toml").unwrap();
    hangup();
    // Whatever the timing, the rules in force stay: carol may still send.
    for _ in 0..3 {
        let mut carol = user(&broker, "carol", Transport::Tcp).await;
        carol.send_with_receipt(&send, "still").await;
    }
}
