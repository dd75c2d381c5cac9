//! Rooms over plain HTTP: polling, long polling, Server-Sent Events and POST, against the
//! real broker, with STOMP members in the same rooms.

// Test code: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use integration_tests::{Broker, Conn, frame};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

fn http() -> reqwest::Client {
    reqwest::Client::builder().build().unwrap()
}

fn url(broker: &Broker, path: &str) -> String {
    format!("http://{}{path}", broker.http)
}

/// GETs `path`: status and JSON body.
async fn get_json(broker: &Broker, path: &str) -> (u16, Value) {
    let response = tokio::time::timeout(
        Duration::from_secs(90),
        http().get(url(broker, path)).send(),
    )
    .await
    .expect("an answer in time")
    .unwrap();
    let status = response.status().as_u16();
    (
        status,
        serde_json::from_str(&response.text().await.unwrap()).unwrap(),
    )
}

/// POSTs `body` with `content_type` to `path`: status and JSON body.
async fn post(
    broker: &Broker,
    path: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    let response = http()
        .post(url(broker, path))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (
        status,
        serde_json::from_str(&response.text().await.unwrap()).unwrap(),
    )
}

/// A STOMP member of `room`, with its own join notice (and anything before) read.
async fn member(broker: &Broker, name: &str, room: &str) -> Conn {
    let mut conn = Conn::open_as(broker, name).await;
    let subscribe = frame(
        "SUBSCRIBE",
        &[("id", "0"), ("destination", &format!("/topic/room.{room}"))],
    );
    conn.send_with_receipt(&subscribe, "in").await;
    conn
}

#[tokio::test]
async fn posted_messages_reach_stomp_members_and_polls_read_them_in_one_shape() {
    let broker = Broker::start(&[]);
    let mut alice = member(&broker, "alice", "poll").await;

    let (status, sent) = post(
        &broker,
        "/api/rooms/poll/messages?name=bot",
        "application/json",
        r#"{"body":"hello","headers":{"x-custom":"v"}}"#,
    )
    .await;
    assert_eq!(status, 201, "{sent}");
    assert_eq!(sent["seq"], 2, "alice's join was 1: {sent}");
    let live = alice.expect_frame().await;
    assert_eq!(live.header("message-id"), sent["message_id"].as_str());
    assert_eq!(live.header("x-seq"), Some("2"));
    assert_eq!(live.header("x-sender"), Some("bot"));
    assert_eq!(live.header("x-custom"), Some("v"));
    assert_eq!(&live.body[..], b"hello");

    // Any other body is the message body, its Content-Type kept; the sender from the header.
    let response = http()
        .post(url(&broker, "/api/rooms/poll/messages"))
        .header("content-type", "application/octet-stream")
        .header("x-stoa-name", "robot")
        .body(vec![0xff_u8, 0x00, 0x41])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    let binary = alice.expect_frame().await;
    assert_eq!(&binary.body[..], b"\xff\x00A");
    assert_eq!(
        binary.header("content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(binary.header("x-sender"), Some("robot"));
    // JSON that is not the wrapped shape is a body like any other.
    let (status, _) = post(
        &broker,
        "/api/rooms/poll/messages",
        "application/json",
        r#"[1,2]"#,
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(&alice.expect_frame().await.body[..], b"[1,2]");

    let (status, answer) = get_json(&broker, "/api/rooms/poll/messages?since=0").await;
    assert_eq!(status, 200);
    assert_eq!(answer["room"], "poll");
    assert_eq!(answer["last_seq"], 4);
    assert!(answer.get("gap").is_none());
    let messages = answer["messages"].as_array().unwrap();
    let events: Vec<_> = messages
        .iter()
        .map(|m| (m["seq"].as_u64().unwrap(), m["event"].as_str().unwrap()))
        .collect();
    assert_eq!(
        events,
        [(1, "join"), (2, "message"), (3, "message"), (4, "message")]
    );
    let hello = &messages[1];
    assert_eq!(hello["sender"], "bot");
    assert_eq!(hello["body"], "hello");
    assert_eq!(hello["message_id"], sent["message_id"]);
    assert_eq!(hello["headers"], json!({ "x-custom": "v" }));
    assert_eq!(hello["content_type"], "text/plain;charset=utf-8");
    assert!(hello["timestamp"].as_u64().unwrap() > 1_700_000_000_000);
    assert_eq!(messages[2]["body_base64"], "/wBB");
    assert!(messages[2].get("body").is_none());

    // limit: the first N after since; without since, the last N.
    let (_, first_two) = get_json(&broker, "/api/rooms/poll/messages?since=0&limit=2").await;
    let seqs = |answer: &Value| -> Vec<u64> {
        answer["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(seqs(&first_two), [1, 2]);
    assert_eq!(first_two["last_seq"], 2);
    let (_, last_two) = get_json(&broker, "/api/rooms/poll/messages?limit=2").await;
    assert_eq!(seqs(&last_two), [3, 4]);
    let (_, nothing_new) = get_json(&broker, "/api/rooms/poll/messages?since=4").await;
    assert_eq!(seqs(&nothing_new), Vec::<u64>::new());
    assert_eq!(nothing_new["last_seq"], 4);

    // The HTTP reader is no member: no join or leave notice came to alice, and the room's
    // members are alice alone.
    assert!(alice.is_quiet_for(Duration::from_millis(200)).await);
    let (_, detail) = get_json(&broker, "/api/rooms/poll").await;
    assert_eq!(detail["members"], json!(["alice"]));
}

#[tokio::test]
async fn a_long_poll_is_held_until_a_stomp_send_and_answers_empty_when_the_time_is_up() {
    let broker = Broker::start(&[]);
    let mut bob = member(&broker, "bob", "lp").await;
    let held = tokio::spawn({
        let url = url(&broker, "/api/rooms/lp/messages?since=1&wait=30");
        async move {
            let answer: Value = http().get(url).send().await.unwrap().json().await.unwrap();
            answer
        }
    });
    // Held: nothing after seq 1 yet, so no answer for as long as we look.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !held.is_finished(),
        "the long poll answered with nothing to say"
    );
    // One SEND releases it, whether the poll subscribed before it (live) or after (replay).
    bob.send_with_receipt(
        &frame("SEND", &[("destination", "/topic/room.lp")]).with_body("release"),
        "r",
    )
    .await;
    let answer = tokio::time::timeout(WAIT, held)
        .await
        .expect("released in time")
        .unwrap();
    let messages = answer["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1, "{answer}");
    assert_eq!(messages[0]["body"], "release");
    assert_eq!(messages[0]["seq"], 2);
    assert_eq!(answer["last_seq"], 2);

    let started = Instant::now();
    let (status, empty) = get_json(&broker, "/api/rooms/lp/messages?since=1000&wait=1").await;
    assert_eq!(status, 200);
    assert_eq!(empty["messages"], json!([]));
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "answered after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_since_older_than_what_is_kept_says_where_the_kept_messages_begin() {
    let broker = Broker::start(&["--room-history", "3"]);
    for n in 0..6 {
        let (status, _) = post(
            &broker,
            "/api/rooms/gap/messages",
            "text/plain",
            format!("m{n}"),
        )
        .await;
        assert_eq!(status, 201);
    }
    let (_, answer) = get_json(&broker, "/api/rooms/gap/messages?since=1").await;
    assert_eq!(answer["gap"], json!({ "first_seq": 4 }));
    let bodies: Vec<_> = answer["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(bodies, ["m3", "m4", "m5"]);
}

#[tokio::test]
async fn bad_parameters_get_400_with_a_reason_and_no_effect() {
    let broker = Broker::start(&["--max-body-bytes", "1000"]);
    for path in [
        "/api/rooms/x/messages?since=abc",
        "/api/rooms/x/messages?limit=-1",
        "/api/rooms/x/messages?limit=0",
        "/api/rooms/x/messages?wait=soon",
        "/api/rooms/x/events?since=1e3",
        "/api/rooms/bad.name/messages",
        "/api/rooms/bad%20name/events",
    ] {
        let (status, answer) = get_json(&broker, path).await;
        assert_eq!(status, 400, "{path}: {answer}");
        assert!(
            answer["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{path}: {answer}"
        );
    }
    let response = http()
        .get(url(&broker, "/api/rooms/x/events"))
        .header("last-event-id", "seven")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let answer: Value = response.json().await.unwrap();
    assert!(answer["error"].as_str().unwrap().contains("Last-Event-ID"));

    let (status, answer) = post(
        &broker,
        "/api/rooms/x/messages",
        "text/plain",
        "y".repeat(2000),
    )
    .await;
    assert_eq!(status, 413, "{answer}");
    let (status, answer) = post(
        &broker,
        "/api/rooms/x/messages?name=a%2Fb",
        "text/plain",
        "hi",
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = post(
        &broker,
        "/api/rooms/x/messages",
        "application/json",
        r#"{"body":"a","headers":{"h":1}}"#,
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    for reserved in ["receipt", "destination", "transaction"] {
        let body = format!(r#"{{"body":"a","headers":{{"{reserved}":"x"}}}}"#);
        let (status, answer) =
            post(&broker, "/api/rooms/x/messages", "application/json", body).await;
        assert_eq!(status, 400, "{reserved}: {answer}");
    }
    // Rooms over HTTP are a transport: pages of other origins are refused, as on /ws.
    for method in [reqwest::Method::GET, reqwest::Method::POST] {
        let response = http()
            .request(method.clone(), url(&broker, "/api/rooms/x/messages"))
            .header("origin", "http://evil.example")
            .body("from elsewhere")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 403, "{method}");
    }
    // Nothing of that reached the room.
    let (_, answer) = get_json(&broker, "/api/rooms/x/messages?since=0").await;
    assert_eq!(answer["messages"], json!([]));
}

/// Server-Sent Events read one event at a time.
struct Events {
    response: reqwest::Response,
    buffer: String,
}

#[derive(Debug, Default, Clone, PartialEq)]
struct Event {
    id: Option<String>,
    event: Option<String>,
    data: Option<Value>,
    comment: bool,
}

impl Events {
    async fn open(broker: &Broker, path: &str, last_event_id: Option<&str>) -> Events {
        let mut request = http().get(url(broker, path));
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Events {
            response,
            buffer: String::new(),
        }
    }

    /// The next event or comment block (`retry:` skipped).
    async fn next(&mut self) -> Event {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = Event::default();
                for line in block.lines() {
                    if line.starts_with(':') {
                        event.comment = true;
                    } else if let Some(id) = line.strip_prefix("id: ") {
                        event.id = Some(id.to_owned());
                    } else if let Some(name) = line.strip_prefix("event: ") {
                        event.event = Some(name.to_owned());
                    } else if let Some(data) = line.strip_prefix("data: ") {
                        event.data = Some(serde_json::from_str(data).unwrap());
                    }
                }
                if block.starts_with("retry:") {
                    continue;
                }
                return event;
            }
            let chunk = tokio::time::timeout(WAIT, self.response.chunk())
                .await
                .expect("an event in time")
                .unwrap()
                .expect("the stream goes on");
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// The next event that is not a keep-alive comment.
    async fn next_event(&mut self) -> Event {
        loop {
            let event = self.next().await;
            if !event.comment {
                return event;
            }
        }
    }
}

#[tokio::test]
async fn sse_streams_the_room_and_recovers_from_last_event_id_with_no_gap_and_no_duplicate() {
    let broker = Broker::start(&["--sse-keepalive-ms", "200"]);
    let mut carol = member(&broker, "carol", "sse").await;
    let mut stream = Events::open(&broker, "/api/rooms/sse/events", None).await;
    let joined = stream.next_event().await;
    assert_eq!(
        (joined.id.as_deref(), joined.event.as_deref()),
        (Some("1"), Some("join"))
    );
    assert_eq!(joined.data.as_ref().unwrap()["sender"], "carol");

    for n in 0..3 {
        carol
            .send_with_receipt(
                &frame("SEND", &[("destination", "/topic/room.sse")]).with_body(format!("m{n}")),
                &format!("r{n}"),
            )
            .await;
    }
    // A transient message (typing) comes without an id.
    carol
        .send_with_receipt(
            &frame(
                "SEND",
                &[("destination", "/topic/room.sse"), ("x-transient", "true")],
            )
            .with_body("typing"),
            "typing",
        )
        .await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        let event = stream.next_event().await;
        assert_eq!(event.event.as_deref(), Some("message"));
        seen.push(event.id.unwrap());
    }
    assert_eq!(seen, ["2", "3", "4"]);
    let typing = stream.next_event().await;
    assert_eq!(
        (typing.id, typing.event.as_deref()),
        (None, Some("transient"))
    );
    assert_eq!(typing.data.unwrap()["body"], "typing");
    // Idle: keep-alive comments.
    assert!(stream.next().await.comment);
    drop(stream);

    // Messages while the reader was away; it comes back with the last id it saw.
    for n in 3..6 {
        carol
            .send_with_receipt(
                &frame("SEND", &[("destination", "/topic/room.sse")]).with_body(format!("m{n}")),
                &format!("r{n}"),
            )
            .await;
    }
    let mut again = Events::open(&broker, "/api/rooms/sse/events", Some("4")).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let event = again.next_event().await;
        ids.push(event.id.unwrap());
    }
    assert_eq!(ids, ["5", "6", "7"]);
    carol
        .send_with_receipt(
            &frame("SEND", &[("destination", "/topic/room.sse")]).with_body("live"),
            "live",
        )
        .await;
    let live = again.next_event().await;
    assert_eq!(live.id.as_deref(), Some("8"));
    assert_eq!(live.data.unwrap()["body"], "live");
    // The reader was never a member: carol heard no notices.
    assert!(carol.is_quiet_for(Duration::from_millis(200)).await);
}

#[tokio::test]
async fn sse_from_an_id_no_longer_kept_starts_with_a_gap_event() {
    let broker = Broker::start(&["--room-history", "2"]);
    for n in 0..5 {
        post(
            &broker,
            "/api/rooms/old/messages",
            "text/plain",
            format!("m{n}"),
        )
        .await;
    }
    let mut stream = Events::open(&broker, "/api/rooms/old/events", Some("1")).await;
    let gap = stream.next_event().await;
    assert_eq!((gap.id, gap.event.as_deref()), (None, Some("gap")));
    assert_eq!(gap.data.unwrap(), json!({ "first_seq": 4 }));
    assert_eq!(stream.next_event().await.id.as_deref(), Some("4"));
    assert_eq!(stream.next_event().await.id.as_deref(), Some("5"));
}

#[tokio::test]
async fn http_readers_and_senders_take_the_callers_identity() {
    let dir = std::env::temp_dir().join(format!("stoa-room-http-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut add = std::process::Command::new(integration_tests::stoa_bin())
        .args(["users", "add", "erin", "--password-stdin", "--data-dir"])
        .arg(&dir)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut add.stdin.take().unwrap(), b"pw-erin-1\n").unwrap();
    assert!(add.wait().unwrap().success());
    let broker = Broker::start_in(&dir, &["--auth", "users"]);
    let (status, _) = get_json(&broker, "/api/rooms/id/messages").await;
    assert_eq!(status, 401);
    let response = http()
        .post(url(&broker, "/api/rooms/id/messages?name=mallory"))
        .basic_auth("erin", Some("pw-erin-1"))
        .body("signed")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    let answer: Value = http()
        .get(url(&broker, "/api/rooms/id/messages?since=0"))
        .basic_auth("erin", Some("pw-erin-1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // The authenticated name, whatever the request claims.
    assert_eq!(answer["messages"][0]["sender"], "erin");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn across_nodes_a_post_on_one_reaches_sse_and_polls_on_the_other() {
    let redis = integration_tests::Redis::start();
    let a = Broker::cluster_node(&redis, "a", 3000, &[]);
    let b = Broker::cluster_node(&redis, "b", 3000, &[]);
    let mut stream = Events::open(&b, "/api/rooms/shared/events", Some("0")).await;
    let mut dave = member(&a, "dave", "shared").await;
    let joined = stream.next_event().await;
    assert_eq!(
        (joined.id.as_deref(), joined.event.as_deref()),
        (Some("1"), Some("join"))
    );
    let (status, sent) = post(
        &a,
        "/api/rooms/shared/messages?name=bot",
        "text/plain",
        "from a",
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(sent["seq"], 2);
    let event = stream.next_event().await;
    assert_eq!(event.id.as_deref(), Some("2"));
    assert_eq!(
        event.data.as_ref().unwrap()["message_id"],
        sent["message_id"]
    );
    // With several nodes dave's own join notice may come after his SUBSCRIBE's receipt.
    let mut live = dave.expect_frame().await;
    while live.header("x-event").is_some() {
        live = dave.expect_frame().await;
    }
    assert_eq!(live.header("x-seq"), Some("2"));
    let (_, polled) = get_json(&b, "/api/rooms/shared/messages?since=1").await;
    assert_eq!(polled["messages"][0]["body"], "from a");
    assert_eq!(polled["last_seq"], 2);
}
