//! `--cluster` (`../shared/design/cluster.md`), as far as it is built: nodes join through
//! Debian's `redis-server` (started here on a free port), refuse to start without it
//! (naming the URL, never its password), list each other on `/api/nodes`, leave the list at
//! once on a graceful stop, and report a Redis outage on `/healthz` until Redis is back.

// Test code: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use integration_tests::{Broker, Conn, Redis, Transport, run_stoa_to_end};

const WAIT: Duration = Duration::from_secs(15);

fn node(redis: &Redis, name: &str) -> Broker {
    Broker::start(&[
        "--cluster",
        &redis.url(),
        "--node-name",
        name,
        "--cluster-node-timeout-ms",
        "3000",
    ])
}

/// `/api/nodes` as (name, connections) pairs, by name.
async fn nodes(broker: &Broker) -> Vec<(String, u64)> {
    let (status, body) = broker.http_get("/api/nodes").await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    json["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            assert!(n["last_seen_ms"].as_u64().unwrap() > 0);
            (
                n["name"].as_str().unwrap().to_owned(),
                n["connections"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Asks `ask` until `done` holds of its answer (heartbeats come once a second), at most
/// [`WAIT`]; the last answer.
async fn until<T: std::fmt::Debug, F: std::future::Future<Output = T>>(
    mut ask: impl FnMut() -> F,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        let answer = ask().await;
        if done(&answer) {
            return answer;
        }
        assert!(Instant::now() < deadline, "still {answer:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn a_node_that_cannot_reach_redis_does_not_start_and_names_the_url_without_its_password() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("stoa-cluster-dead-{}", std::process::id()));
    let url = format!("redis://stoa:hunter2@{dead}/0");
    let out = run_stoa_to_end(&dir, &["--cluster", &url, "--cluster-timeout-ms", "1000"]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot reach Redis at redis://stoa@{dead}/0")),
        "{stderr}"
    );
    assert!(
        !stderr.contains("hunter2"),
        "the password stays out: {stderr}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).is_empty(),
        "never listening"
    );
}

#[tokio::test]
async fn nodes_list_each_other_with_their_connections_and_a_stopped_one_leaves_at_once() {
    let redis = Redis::start();
    let a = node(&redis, "node-a");
    let mut b = node(&redis, "node-b");
    // Each wrote its first heartbeat before it said it was listening.
    let names: Vec<String> = nodes(&a).await.into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["node-a", "node-b"]);
    let mut client = Conn::open(&b, Transport::Tcp).await;
    client.login("visitor").await;
    let listed = until(|| nodes(&a), |n| n.contains(&("node-b".to_owned(), 1))).await;
    assert!(listed.contains(&("node-a".to_owned(), 0)), "{listed:?}");
    drop(client);
    // A graceful stop takes the node out of the list before the process ends.
    assert!(b.terminate().success());
    let names: Vec<String> = nodes(&a).await.into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["node-a"]);
}

#[tokio::test]
async fn a_node_that_dies_leaves_the_list_when_its_heartbeat_expires() {
    let redis = Redis::start();
    let a = node(&redis, "node-a");
    let mut c = node(&redis, "node-c");
    assert_eq!(nodes(&a).await.len(), 2);
    c.kill();
    let started = Instant::now();
    let left = until(|| nodes(&a), |n| n.len() == 1).await;
    assert_eq!(left, [("node-a".to_owned(), 0)]);
    // The node time-out is 3 s: gone no later than that after its last heartbeat.
    assert!(
        started.elapsed() < Duration::from_millis(3000 + 2000),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn healthz_reports_a_redis_outage_and_recovers_without_a_restart() {
    let mut redis = Redis::start();
    let port = redis.port;
    let a = node(&redis, "node-a");
    assert_eq!(a.http_get("/healthz").await, (200, "ok\n".to_owned()));
    // /metrics shows the cluster: reachable, its nodes, Redis's round trip.
    let (_, page) = a.http_get("/metrics").await;
    assert!(
        page.lines().any(|l| l == "stoa_cluster_reachable 1"),
        "{page}"
    );
    assert!(page.lines().any(|l| l == "stoa_cluster_nodes 1"), "{page}");
    let round_trip = page
        .lines()
        .find_map(|l| l.strip_prefix("stoa_cluster_redis_round_trip_seconds "))
        .and_then(|v| v.parse::<f64>().ok())
        .expect("the round trip on /metrics");
    assert!(round_trip > 0.0 && round_trip < 5.0, "{round_trip}");
    redis.stop();
    let (status, body) = until(|| a.http_get("/healthz"), |(s, _)| *s == 503).await;
    assert_eq!(status, 503);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        json,
        serde_json::json!({ "status": "degraded", "cluster": "unreachable" })
    );
    // Not ready for new traffic either, and says why.
    let (status, body) = a.http_get("/readyz").await;
    assert_eq!(status, 503);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        json,
        serde_json::json!({ "status": "unready", "cluster": "unreachable" })
    );
    // Clients are still served meanwhile, and the dashboard still shows them.
    let mut client = Conn::open(&a, Transport::Tcp).await;
    client.login("during-the-outage").await;
    let (status, body) = a.http_get("/admin/api/overview").await;
    assert_eq!(status, 200, "{body}");
    let view: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(view["cluster"], "unreachable", "{view}");
    assert!(
        view["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["user"] == "during-the-outage"),
        "{view}"
    );
    let _redis = Redis::start_on(port);
    until(|| a.http_get("/healthz"), |(s, _)| *s == 200).await;
    until(|| a.http_get("/readyz"), |(s, _)| *s == 200).await;
    let names: Vec<String> = until(|| nodes(&a), |n| !n.is_empty())
        .await
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        names,
        ["node-a"],
        "back in the list (Redis forgot everything)"
    );
}

/// Redis's answer to `PUBSUB NUMSUB <channel>`: how many connections listen to it.
async fn listeners(redis: &Redis, channel: &str) -> i64 {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", redis.port))
        .await
        .unwrap();
    let command = format!(
        "*3\r\n$6\r\nPUBSUB\r\n$6\r\nNUMSUB\r\n${}\r\n{channel}\r\n",
        channel.len()
    );
    socket.write_all(command.as_bytes()).await.unwrap();
    // *2, $len, the channel, :count
    let mut lines = BufReader::new(socket).lines();
    let mut last = String::new();
    for _ in 0..4 {
        last = lines.next_line().await.unwrap().unwrap();
    }
    last.trim_start_matches(':').parse().unwrap()
}

#[tokio::test]
async fn a_topic_message_reaches_subscribers_on_every_node_once_and_in_order() {
    let redis = Redis::start();
    let a = node(&redis, "node-a");
    let b = node(&redis, "node-b");
    let mut far = Conn::open(&b, Transport::Tcp).await;
    far.login("far").await;
    far.subscribe("x", "/topic/news.sport").await;
    let mut watcher = Conn::open(&b, Transport::Ws).await;
    watcher.login("watcher").await;
    watcher.subscribe("w", "/topic/news.*").await;
    let mut near = Conn::open(&a, Transport::Tcp).await;
    near.login("near").await;
    near.subscribe("n", "/topic/news.sport").await;
    let mut publisher = Conn::open(&a, Transport::Tcp).await;
    publisher.login("publisher").await;
    let send = |body: &str| {
        integration_tests::frame("SEND", &[("destination", "/topic/news.sport")])
            .with_body(body.to_owned())
    };
    // Node b starts listening to Redis shortly after the subscriptions' receipts: probe
    // until a message gets through to both of its subscribers.
    let mut probes = 0;
    for (conn, name) in [(&mut far, "far"), (&mut watcher, "watcher")] {
        let deadline = Instant::now() + WAIT;
        loop {
            probes += 1;
            publisher
                .send_with_receipt(&send("probe"), &format!("p{probes}"))
                .await;
            if let Some(integration_tests::Event::Frame(f)) =
                conn.next_event_within(Duration::from_millis(200)).await
            {
                assert_eq!(&f.body[..], b"probe", "{name}");
                break;
            }
            assert!(Instant::now() < deadline, "{name} never heard from node a");
        }
    }
    for i in 1..=50 {
        publisher.send(&send(&format!("m{i}"))).await;
    }
    publisher.send_with_receipt(&send("end"), "end").await;
    let expected: Vec<String> = (1..=50)
        .map(|i| format!("m{i}"))
        .chain(["end".to_owned()])
        .collect();
    for (conn, name) in [
        (&mut far, "far"),
        (&mut watcher, "watcher"),
        (&mut near, "near"),
    ] {
        let mut got = Vec::new();
        while got.last().map(String::as_str) != Some("end") {
            let f = conn.expect_frame().await;
            let body = String::from_utf8(f.body.to_vec()).unwrap();
            if body != "probe" {
                assert_eq!(f.header("destination"), Some("/topic/news.sport"));
                got.push(body);
            }
        }
        assert_eq!(got, expected, "{name}: each once, in publish order");
    }
    // One listener per node with subscribers to the key, not one per subscriber; none for
    // a key nobody subscribes to (the watcher's pattern has a glob of its own).
    let mut second = Conn::open(&b, Transport::Tcp).await;
    second.login("second").await;
    second.subscribe("y", "/topic/news.sport").await;
    assert_eq!(listeners(&redis, "stoa:topic:news.sport").await, 2);
    assert_eq!(listeners(&redis, "stoa:topic:news.weather").await, 0);
}

#[tokio::test]
async fn topics_flow_between_nodes_again_after_redis_restarts() {
    let mut redis = Redis::start();
    let port = redis.port;
    let a = node(&redis, "node-a");
    let b = node(&redis, "node-b");
    let mut far = Conn::open(&b, Transport::Tcp).await;
    far.login("far").await;
    far.subscribe("x", "/topic/alerts").await;
    let mut publisher = Conn::open(&a, Transport::Tcp).await;
    publisher.login("publisher").await;
    let mut n = 0;
    // Sends until `far` hears one; the body it heard.
    let mut probe = async |publisher: &mut Conn, far: &mut Conn, what: &str| -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            n += 1;
            let body = format!("{what} {n}");
            let send = integration_tests::frame("SEND", &[("destination", "/topic/alerts")])
                .with_body(body.clone());
            publisher.send_with_receipt(&send, &format!("r{n}")).await;
            if let Some(integration_tests::Event::Frame(f)) =
                far.next_event_within(Duration::from_millis(200)).await
            {
                return String::from_utf8(f.body.to_vec()).unwrap();
            }
            assert!(Instant::now() < deadline, "nothing from node a: {what}");
        }
    };
    assert!(
        probe(&mut publisher, &mut far, "before")
            .await
            .starts_with("before")
    );
    redis.stop();
    let _back = Redis::start_on(port);
    // Both nodes reconnect by themselves; node b listens to its keys again.
    assert!(
        probe(&mut publisher, &mut far, "after")
            .await
            .starts_with("after")
    );
}

#[tokio::test]
async fn clusters_with_different_prefixes_share_a_redis_without_seeing_each_other() {
    let redis = Redis::start();
    let a = node(&redis, "node-a");
    let other = Broker::start(&[
        "--cluster",
        &redis.url(),
        "--node-name",
        "elsewhere",
        "--cluster-prefix",
        "other:",
    ]);
    let names = |list: Vec<(String, u64)>| list.into_iter().map(|(n, _)| n).collect::<Vec<_>>();
    assert_eq!(names(nodes(&a).await), ["node-a"]);
    assert_eq!(names(nodes(&other).await), ["elsewhere"]);
}

#[tokio::test]
async fn after_a_topic_subscribe_s_receipt_a_message_sent_on_another_node_arrives() {
    let redis = Redis::start();
    let a = node(&redis, "node-a");
    let b = node(&redis, "node-b");
    let mut publisher = Conn::open(&a, Transport::Tcp).await;
    publisher.login("publisher").await;
    // Each key new to node b: its RECEIPT waits until b listens in Redis, so the one
    // message sent right after it reaches the subscriber, every time, with no probe.
    for i in 0..20 {
        let destination = format!("/topic/fresh.{i}");
        let mut subscriber = Conn::open(&b, Transport::Tcp).await;
        subscriber.login("subscriber").await;
        subscriber.subscribe("s", &destination).await;
        let send = integration_tests::frame("SEND", &[("destination", &destination)])
            .with_body(format!("m{i}"));
        publisher.send_with_receipt(&send, &format!("r{i}")).await;
        let f = subscriber.expect_frame().await;
        assert_eq!(f.body.as_ref(), format!("m{i}").as_bytes(), "{f:?}");
    }
}
