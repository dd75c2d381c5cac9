//! The SockJS conformance server: Stoa's SockJS layer with the four services every SockJS
//! server's conformance setup has (`/echo`, `/close`, `/disabled_websocket_echo`,
//! `/cookie_needed_echo`), so that the sockjs-protocol suite can be pointed at it.
//!
//! `sockjs-test-server --listen 127.0.0.1:0` prints `listening http=ADDR` once it accepts.
//! Streaming responses end after 4096 bytes, as the suite expects of a test server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::Response;
use axum::routing::any;
use broker::sockjs::{Channel, Close, Endpoint, Opened, Service, Settings};
use clap::Parser;

/// Serves the SockJS conformance services.
#[derive(Debug, Parser)]
#[command(name = "sockjs-test-server")]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// Bytes after which a streaming response ends.
    #[arg(long, default_value_t = 4096)]
    stream_bytes: usize,
    /// Milliseconds a session lives without a receiving request.
    #[arg(long, default_value_t = 5000)]
    disconnect_delay_ms: u64,
    /// Milliseconds between heart-beat frames.
    #[arg(long, default_value_t = 25_000)]
    heartbeat_ms: u64,
}

/// Sends every message back.
struct Echo;

impl Service for Echo {
    fn open(&self, mut channel: Channel, _opened: Opened) {
        tokio::spawn(async move {
            while let Some(messages) = channel.recv().await {
                let messages: Vec<&str> = messages.iter().map(String::as_str).collect();
                if channel.send(&messages).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Closes every session at once with `3000 "Go away!"`.
struct CloseAtOnce;

impl Service for CloseAtOnce {
    fn open(&self, channel: Channel, _opened: Opened) {
        channel.close(Close::go_away());
    }
}

fn mount(router: Router, base: &'static str, endpoint: Arc<Endpoint>) -> Router {
    let handler = move |State(endpoint): State<Arc<Endpoint>>,
                        ConnectInfo(peer): ConnectInfo<SocketAddr>,
                        request: Request| async move {
        let path = request.uri().path().to_owned();
        let rest = path.strip_prefix(base).unwrap_or_default().to_owned();
        let response: Response = endpoint.handle(&rest, request, peer).await;
        response
    };
    let service = Router::new()
        .route(base, any(handler))
        .route(&format!("{base}/"), any(handler))
        .route(&format!("{base}/{{*rest}}"), any(handler))
        .with_state(endpoint);
    router.merge(service)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let settings = Settings {
        heart_beat: Duration::from_millis(args.heartbeat_ms),
        disconnect_delay: Duration::from_millis(args.disconnect_delay_ms),
        stream_bytes: args.stream_bytes,
        frame_ancestors: "*".to_owned(),
        ..Settings::default()
    };
    let echo: Arc<dyn Service> = Arc::new(Echo);
    let mut router = Router::new();
    router = mount(
        router,
        "/echo",
        Endpoint::new(settings.clone(), echo.clone()),
    );
    router = mount(
        router,
        "/close",
        Endpoint::new(settings.clone(), Arc::new(CloseAtOnce)),
    );
    router = mount(
        router,
        "/disabled_websocket_echo",
        Endpoint::new(
            Settings {
                websocket: false,
                ..settings.clone()
            },
            echo.clone(),
        ),
    );
    router = mount(
        router,
        "/cookie_needed_echo",
        Endpoint::new(
            Settings {
                cookie_needed: true,
                ..settings
            },
            echo,
        ),
    );
    let router = router.route(
        "/vendor/sockjs.min.js",
        any(|| async {
            (
                [("content-type", "text/javascript; charset=utf-8")],
                include_str!("../../../web/vendor/sockjs.min.js"),
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("listening http={}", listener.local_addr()?);
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await
}
