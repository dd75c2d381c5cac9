//! A short smoke run of every `stoa-cli bench` scenario against the real broker: each
//! finishes, prints one JSON line with its figures, and loses nothing. The real runs are
//! `scripts/bench.sh`, side by side with RabbitMQ, outside CI.

// Test code: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use integration_tests::Broker;

fn bench(broker: &Broker, url: &str, args: &[&str]) -> serde_json::Value {
    let cli = integration_tests::stoa_bin().with_file_name("stoa-cli");
    let mut all = vec!["--url", url, "bench"];
    all.extend_from_slice(args);
    let out = Command::new(cli).args(&all).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout).unwrap();
    let result: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    let _ = broker;
    result
}

#[test]
fn every_scenario_runs_and_loses_nothing() {
    let broker = Broker::start(&[]);
    let ws = broker.ws_url();
    let tcp = format!("tcp://{}", broker.stomp);

    let fanout = bench(
        &broker,
        &ws,
        &["fanout", "--subscribers", "5", "--messages", "200"],
    );
    assert_eq!(fanout["deliveries"], 1000);
    assert_eq!(
        (fanout["lost"].as_u64(), fanout["out_of_order"].as_u64()),
        (Some(0), Some(0))
    );
    assert!(fanout["deliveries_per_sec"].as_f64().unwrap() > 0.0);
    // The generator's own connection also speaks STOMP straight over TCP.
    let fanout_tcp = bench(
        &broker,
        &tcp,
        &["fanout", "--subscribers", "3", "--messages", "300"],
    );
    assert_eq!(
        (
            fanout_tcp["deliveries"].as_u64(),
            fanout_tcp["lost"].as_u64()
        ),
        (Some(900), Some(0))
    );

    let queue = bench(
        &broker,
        &tcp,
        &["queue", "--publishers", "2", "--messages", "300"],
    );
    assert_eq!(
        (queue["received"].as_u64(), queue["lost"].as_u64()),
        (Some(300), Some(0))
    );

    let rooms = bench(
        &broker,
        &ws,
        &[
            "rooms",
            "--rooms",
            "2",
            "--members",
            "3",
            "--rate",
            "300",
            "--seconds",
            "1",
        ],
    );
    assert_eq!(rooms["lost"], 0);
    assert!(rooms["p99_ms"].as_f64().unwrap() > 0.0);
    assert!(rooms["steps"][0]["messages_sent"].as_u64().unwrap() > 0);

    let pid = broker.pid().to_string();
    let conns = bench(
        &broker,
        &ws,
        &[
            "conns",
            "--connections",
            "50",
            "--rooms",
            "5",
            "--pid",
            &pid,
        ],
    );
    assert_eq!(conns["connections"], 50);
    assert_eq!(conns["probe_reached"], conns["probe_room_members"]);
    assert!(conns["broker_rss_kib_after"].as_u64().unwrap() > 0);
    assert!(conns["cpu_percent_while_connecting"]["broker"].is_number());
}

#[test]
fn fanout_and_rooms_spread_over_two_nodes_lose_nothing() {
    let redis = integration_tests::Redis::start();
    let url = redis.url();
    let a = Broker::start(&["--cluster", &url, "--node-name", "smoke-a"]);
    let b = Broker::start(&["--cluster", &url, "--node-name", "smoke-b"]);
    let both = format!("{},{}", a.ws_url(), b.ws_url());
    // Subscribers alternate a, b; the publisher is on a.
    let fanout = bench(
        &a,
        &both,
        &["fanout", "--subscribers", "6", "--messages", "300"],
    );
    assert_eq!(
        (
            fanout["deliveries"].as_u64(),
            fanout["lost"].as_u64(),
            fanout["out_of_order"].as_u64()
        ),
        (Some(1800), Some(0), Some(0)),
        "{fanout}"
    );
    assert_eq!(fanout["broker"], serde_json::json!(both));
    // Every room has members on both nodes.
    let rooms = bench(
        &b,
        &both,
        &[
            "rooms",
            "--rooms",
            "3",
            "--members",
            "4",
            "--rate",
            "400",
            "--seconds",
            "1",
        ],
    );
    assert_eq!(rooms["lost"], 0, "{rooms}");
    assert!(rooms["steps"][0]["messages_sent"].as_u64().unwrap() > 0);
}

#[test]
fn rooms_over_every_fallback_technique_lose_nothing_and_report_their_costs() {
    let broker = Broker::start(&[]);
    let ws = broker.ws_url();
    for technique in ["ws", "sockjs-xhr-streaming", "sse", "long-poll", "poll"] {
        let rooms = bench(
            &broker,
            &ws,
            &[
                "rooms",
                "--transport",
                technique,
                "--rooms",
                "3",
                "--members",
                "3",
                "--rate",
                "90",
                "--seconds",
                "1",
                "--poll-interval-ms",
                "100",
            ],
        );
        assert_eq!(rooms["transport"], technique);
        assert_eq!(rooms["lost"], 0, "{technique}: {rooms}");
        assert!(
            rooms["deliveries_per_sec"].as_f64().unwrap() > 0.0,
            "{technique}: {rooms}"
        );
        assert!(
            rooms["wire_bytes_per_delivery"].as_f64().unwrap() > 0.0,
            "{technique}: {rooms}"
        );
        let requests = rooms["requests_per_delivery"].as_f64().unwrap();
        // WebSocket makes no request per message; every other technique does.
        assert_eq!(requests > 0.0, technique != "ws", "{technique}: {rooms}");
    }
    for technique in ["sse", "long-poll"] {
        let idle = bench(
            &broker,
            &ws,
            &[
                "conns",
                "--transport",
                technique,
                "--connections",
                "40",
                "--parallel",
                "8",
            ],
        );
        assert_eq!(
            idle["probe_reached"], idle["probe_room_members"],
            "{technique}: {idle}"
        );
        assert_eq!(idle["probe_room_members"], 10, "{technique}: {idle}");
    }
}

#[test]
fn a_short_soak_loses_nothing_and_samples_the_broker() {
    let broker = Broker::start(&[]);
    let pid = broker.pid().to_string();
    let soak = bench(
        &broker,
        &broker.ws_url(),
        &[
            "soak",
            "--seconds",
            "6",
            "--rooms",
            "3",
            "--members",
            "3",
            "--rate",
            "60",
            "--sample-every",
            "1",
            "--pid",
            &pid,
        ],
    );
    assert_eq!(soak["room_missed"], 0, "{soak}");
    assert_eq!(soak["dm_lost"], 0, "{soak}");
    assert_eq!(soak["errors"], 0, "{soak}");
    assert!(soak["room_received"].as_u64().unwrap() > 0, "{soak}");
    let samples = soak["samples"].as_array().unwrap();
    assert!(samples.len() >= 3, "{soak}");
    assert!(
        samples
            .iter()
            .all(|s| s["rss_kib"].as_u64().is_some() && s["fds"].as_u64().is_some())
    );
}
