//! Heart-beats on a real connection task, over an in-memory stream, in paused time: the
//! broker beats well before the negotiated interval ends.

// Test code: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use broker::Config;
use broker::connection;
use broker::state::Broker;
use broker::store::MemoryStore;
use broker::transport::tcp::StreamTransport;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

#[tokio::test(start_paused = true)]
async fn beats_go_out_a_quarter_before_the_negotiated_interval_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_string_lossy().into_owned();
    let args = ["stoa", "--data-dir", &dir, "--heart-beat", "1000,0"];
    let config = Config::try_parse_args(args).unwrap();
    let broker = Arc::new(Broker::with_store(config, Arc::new(MemoryStore::default())).unwrap());
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let (_stop, shutdown) = watch::channel(false);
    tokio::spawn(connection::serve(
        StreamTransport::over(server, 1024),
        broker,
        shutdown,
        connection::Arrival::new(([127, 0, 0, 1], 1).into(), "memory"),
    ));
    // The client wants a beat every second and sends none itself.
    client
        .write_all(b"CONNECT\naccept-version:1.2\nheart-beat:0,1000\n\n\0")
        .await
        .unwrap();
    let mut connected = Vec::new();
    while !connected.ends_with(b"\0") {
        let mut byte = [0u8; 1];
        client.read_exact(&mut byte).await.unwrap();
        connected.push(byte[0]);
    }
    assert!(connected.starts_with(b"CONNECTED\n"), "{connected:?}");
    let mut last = Instant::now();
    for beat in 0..5 {
        let mut byte = [0u8; 1];
        client.read_exact(&mut byte).await.unwrap();
        assert_eq!(byte[0], b'\n', "beat {beat} is an EOL");
        let gap = last.elapsed();
        last = Instant::now();
        // A client checking at its interval plus 100 ms (stompit) never sees one late.
        assert!(
            gap <= Duration::from_millis(800) && gap >= Duration::from_millis(500),
            "beat {beat} came {gap:?} after the one before"
        );
    }
    drop(tmp);
}
