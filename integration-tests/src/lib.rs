//! Helpers for black-box tests of the `stoa` binary: start it on free ports, and talk raw
//! STOMP to it over TCP or WebSocket with small send/expect helpers.
//!
//! In: the built `stoa` binary (`cargo build -p broker`, or `STOA_BIN`). Out: running
//! brokers that are killed when dropped, and connections that speak frames.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use stomp_codec::{DecodeError, Decoder, Frame, Limits, Version, encode_to_bytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single expectation waits before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// The `stoa` binary: `$STOA_BIN`, or `target/<profile>/stoa` next to this test binary.
pub fn stoa_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("STOA_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> -> target/<profile>/stoa
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>");
    let bin = dir.join("stoa");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p broker` first",
        bin.display()
    );
    bin
}

/// The `stoa-cli` binary, beside `stoa`.
pub fn cli_bin() -> PathBuf {
    let cli = stoa_bin().with_file_name("stoa-cli");
    assert!(
        cli.exists(),
        "{} is missing: run `cargo build -p client` first",
        cli.display()
    );
    cli
}

/// A running `stoa`, killed on drop.
pub struct Broker {
    child: Child,
    /// HTTP and WebSocket address.
    pub http: SocketAddr,
    /// STOMP over TCP address.
    pub stomp: SocketAddr,
    /// Its data directory, removed on drop unless a restart took it over.
    pub data_dir: PathBuf,
    owns_data: bool,
    /// Where its standard error goes, when captured (removed on drop).
    stderr: Option<PathBuf>,
}

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

impl Broker {
    /// A node of the cluster on `redis` named `name`, with a node time-out of
    /// `node_timeout_ms` and a Redis time-out of 2 s (so that failures show within a test),
    /// and `extra` options.
    pub fn cluster_node(redis: &Redis, name: &str, node_timeout_ms: u64, extra: &[&str]) -> Broker {
        let (url, timeout) = (redis.url(), node_timeout_ms.to_string());
        let mut args = vec![
            "--cluster",
            url.as_str(),
            "--node-name",
            name,
            "--cluster-node-timeout-ms",
            timeout.as_str(),
            "--cluster-timeout-ms",
            "2000",
        ];
        args.extend_from_slice(extra);
        Broker::start(&args)
    }

    /// Starts `stoa` on free loopback ports with `args` added, and waits for its
    /// `listening` line.
    pub fn start(args: &[&str]) -> Broker {
        let data_dir = std::env::temp_dir().join(format!(
            "stoa-it-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        Broker::start_in(&data_dir, args)
    }

    /// Like [`Broker::start`], with a given data directory (kept across restarts).
    pub fn start_in(data_dir: &std::path::Path, args: &[&str]) -> Broker {
        Broker::start_with(data_dir, args, &[])
    }

    /// Like [`Broker::start`], with environment variables set for the broker.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Broker {
        let data_dir = std::env::temp_dir().join(format!(
            "stoa-it-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        Broker::start_with(&data_dir, args, env)
    }

    /// Starts again where `previous` ran: the same addresses and data directory, which the
    /// new broker then owns. `previous` must have been [`Broker::kill`]ed.
    pub fn restart_of(previous: &mut Broker, args: &[&str]) -> Broker {
        previous.owns_data = false;
        let (http, stomp) = (previous.http.to_string(), previous.stomp.to_string());
        Broker::start_at(&previous.data_dir, &http, &stomp, args, &[])
    }

    fn start_with(data_dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Broker {
        Broker::start_at(data_dir, "127.0.0.1:0", "127.0.0.1:0", args, env)
    }

    /// Like [`Broker::start`], with its standard error kept in a file ([`Broker::stderr`]).
    pub fn start_capturing_stderr(args: &[&str], env: &[(&str, &str)]) -> Broker {
        let data_dir = std::env::temp_dir().join(format!(
            "stoa-it-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        Broker::start_in_capturing_stderr(&data_dir, args, env)
    }

    /// Like [`Broker::start_capturing_stderr`], in a given data directory.
    pub fn start_in_capturing_stderr(
        data_dir: &std::path::Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Broker {
        let path = data_dir.with_extension("stderr");
        let file = std::fs::File::create(&path).expect("create the stderr file");
        let mut broker = Broker::spawn(
            data_dir,
            ("127.0.0.1:0", "127.0.0.1:0"),
            args,
            env,
            Stdio::from(file),
        );
        broker.stderr = Some(path);
        broker
    }

    /// What it wrote on standard error so far (when captured), lossily decoded.
    pub fn stderr(&self) -> String {
        self.stderr
            .as_ref()
            .and_then(|path| std::fs::read(path).ok())
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    fn start_at(
        data_dir: &std::path::Path,
        http: &str,
        stomp: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Broker {
        Broker::spawn(data_dir, (http, stomp), args, env, Stdio::inherit())
    }

    fn spawn(
        data_dir: &std::path::Path,
        (http, stomp): (&str, &str),
        args: &[&str],
        env: &[(&str, &str)],
        stderr: Stdio,
    ) -> Broker {
        let mut child = Command::new(stoa_bin())
            .envs(env.iter().copied())
            .args(["--http-listen", http, "--stomp-listen", stomp, "--data-dir"])
            .arg(data_dir)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start stoa");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the listening line");
        let addr = |key: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .unwrap_or_else(|| panic!("no {key} in {line:?}"))
                .parse()
                .expect("an address")
        };
        Broker {
            http: addr("http="),
            stomp: addr("stomp="),
            child,
            data_dir: data_dir.to_owned(),
            owns_data: true,
            stderr: None,
        }
    }

    /// GETs `path` over HTTP/1.1 and returns the status code and body.
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        self.http_get_with(path, &[]).await
    }

    /// GETs `path` with extra headers (`Authorization`, `Origin`, ...).
    pub async fn http_get_with(&self, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
        let (status, _, body) = self.http_request("GET", path, headers).await;
        (status, body)
    }

    /// Sends a request without a body; its status, head and body.
    pub async fn http_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, String, String) {
        let mut stream = TcpStream::connect(self.http).await.expect("http connect");
        let extra: String = headers
            .iter()
            .map(|(n, v)| format!("{n}: {v}\r\n"))
            .collect();
        let request =
            format!("{method} {path} HTTP/1.1\r\nHost: stoa\r\n{extra}Connection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("http write");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .await
            .expect("http read");
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("an HTTP status line");
        let (head, body) = response
            .split_once("\r\n\r\n")
            .map(|(h, b)| (h.to_owned(), b.to_owned()))
            .unwrap_or_default();
        (status, head, body)
    }

    /// The WebSocket URL.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.http)
    }

    /// The process id (for /proc reads).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit, up to [`WAIT`].
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for stoa") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "stoa did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the process (SIGKILL, no chance to flush) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Resident memory in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS in /proc status")
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
        if self.owns_data {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
        if let Some(path) = &self.stderr {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Runs `stoa users ARGS --data-dir DIR`, with `stdin` as standard input.
pub fn stoa_users(dir: &std::path::Path, args: &[&str], stdin: &str) -> std::process::Output {
    use std::io::Write as _;
    let mut child = Command::new(stoa_bin())
        .arg("users")
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start stoa users");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(stdin.as_bytes())
        .expect("write to stoa users");
    child.wait_with_output().expect("wait for stoa users")
}

/// Adds account `name` with `password` in `groups` to the data directory `dir`.
pub fn add_account(dir: &std::path::Path, name: &str, password: &str, groups: &[&str]) {
    let mut args = vec!["add", name, "--password-stdin"];
    for group in groups {
        args.extend(["--group", group]);
    }
    let out = stoa_users(dir, &args, &format!("{password}\n"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `stoa` on free loopback ports in `data_dir` with `args`, to its end: for settings
/// that must stop it from starting. Its standard input is closed.
pub fn run_stoa_to_end(data_dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(stoa_bin())
        .args([
            "--http-listen",
            "127.0.0.1:0",
            "--stomp-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run stoa")
}

/// Debian's `redis-server` on a free loopback port, stopped on drop: in memory only, or
/// with an append-only file written on every change (as docs/CLUSTER.md asks for).
pub struct Redis {
    child: Child,
    /// Its port.
    pub port: u16,
    /// Where it keeps its append-only file, if it keeps one.
    pub dir: Option<PathBuf>,
}

impl Redis {
    /// Starts it on a free port and waits until it accepts connections.
    pub fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        Redis::start_on(port)
    }

    /// Starts it on `port` (again, after [`Redis::stop`]).
    pub fn start_on(port: u16) -> Redis {
        Redis::start_with(port, None)
    }

    /// Starts it on a free port with `appendonly yes` and `appendfsync always` in `dir`.
    pub fn start_durable(dir: &std::path::Path) -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        Redis::start_with(port, Some(dir.to_owned()))
    }

    /// Starts it again after [`Redis::stop`], on the same port and files.
    pub fn restart(&mut self) -> Redis {
        Redis::start_with(self.port, self.dir.clone())
    }

    fn start_with(port: u16, dir: Option<PathBuf>) -> Redis {
        let mut command = Command::new("redis-server");
        command.args(["--bind", "127.0.0.1", "--port", &port.to_string()]);
        command.args(["--save", "", "--daemonize", "no"]);
        match &dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).expect("make Redis's directory");
                command
                    .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
                    .arg(dir);
            }
            None => {
                command.args(["--appendonly", "no"]);
            }
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect(
                "start redis-server (Debian's redis-server package; scripts/test.sh installs it)",
            );
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        // Its log says when it listens; what it logs after that goes nowhere.
        loop {
            let line = lines
                .next()
                .expect("redis-server exited before it was ready")
                .expect("read redis-server's log");
            if line.contains("Ready to accept connections") {
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Redis { child, port, dir }
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs one command, as `redis-cli` would; the first line of the answer (`+OK`,
    /// `:12`, `$2` for a bulk string, whose value is the second line...), both lines for a
    /// bulk string joined by a space.
    pub fn command(&self, args: &[&str]) -> String {
        use std::io::{BufRead, Write};
        let mut socket =
            std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect to Redis");
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        socket.write_all(request.as_bytes()).expect("send to Redis");
        let mut reader = std::io::BufReader::new(socket);
        let mut line = String::new();
        reader.read_line(&mut line).expect("read Redis's answer");
        let mut answer = line.trim_end().to_owned();
        if answer.starts_with('$') && answer != "$-1" {
            let mut value = String::new();
            reader.read_line(&mut value).expect("read Redis's answer");
            answer = format!("{answer} {}", value.trim_end());
        }
        answer
    }

    /// Stops it at once (`kill -9`).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What came back from the broker.
// Events live for one match in a test; boxing the frame would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Event {
    /// A frame.
    Frame(Frame),
    /// The broker closed the connection.
    Closed,
}

enum Link {
    Tcp(TcpStream),
    Ws(Box<WebSocketStream<MaybeTlsStream<TcpStream>>>),
}

/// A raw STOMP connection over TCP or WebSocket.
pub struct Conn {
    link: Link,
    buf: BytesMut,
    decoder: Decoder,
    /// WebSocket message kinds received, in order: `true` for text (tests of the framing).
    pub ws_text_flags: Vec<bool>,
    /// The subprotocol the server chose, for WebSocket connections.
    pub subprotocol: Option<String>,
    version: Version,
}

/// The transports a test can run over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// STOMP over TCP.
    Tcp,
    /// STOMP over WebSocket, offering all three subprotocols.
    Ws,
}

impl Conn {
    /// Opens a connection of `kind` to `broker` (no CONNECT sent yet).
    pub async fn open(broker: &Broker, kind: Transport) -> Conn {
        match kind {
            Transport::Tcp => Conn::tcp(broker.stomp).await,
            Transport::Ws => {
                Conn::ws(&broker.ws_url(), Some("v12.stomp, v11.stomp, v10.stomp")).await
            }
        }
    }

    /// Opens a TCP connection.
    pub async fn tcp(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).await.expect("tcp connect");
        Conn::new(Link::Tcp(stream), None)
    }

    /// Opens a WebSocket connection offering `subprotocols` (a header value), or none.
    pub async fn ws(url: &str, subprotocols: Option<&str>) -> Conn {
        Conn::try_ws(url, subprotocols, &[])
            .await
            .unwrap_or_else(|e| panic!("ws connect: {e}"))
    }

    /// Opens a WebSocket connection with extra headers on the upgrade request; the error
    /// (an HTTP refusal, say) if it fails.
    ///
    /// # Errors
    /// What tungstenite said.
    pub async fn try_ws(
        url: &str,
        subprotocols: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Result<Conn, tungstenite::Error> {
        let mut request = url.into_client_request()?;
        if let Some(p) = subprotocols {
            request.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                HeaderValue::from_str(p).expect("header"),
            );
        }
        for (name, value) in headers {
            let name =
                tungstenite::http::HeaderName::from_bytes(name.as_bytes()).expect("header name");
            request
                .headers_mut()
                .insert(name, HeaderValue::from_str(value).expect("header"));
        }
        let (socket, response) = tokio_tungstenite::connect_async(request).await?;
        let chosen = response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok(Conn::new(Link::Ws(Box::new(socket)), chosen))
    }

    /// Opens a TCP connection from a given loopback source address (127.x.y.z).
    pub async fn tcp_from(source: std::net::IpAddr, addr: SocketAddr) -> Conn {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(source, 0))
            .expect("bind the source");
        let stream = socket.connect(addr).await.expect("tcp connect");
        Conn::new(Link::Tcp(stream), None)
    }

    fn new(link: Link, subprotocol: Option<String>) -> Conn {
        let limits = Limits {
            max_frame_bytes: 64 << 20,
            max_body_bytes: 64 << 20,
            ..Limits::default()
        };
        Conn {
            link,
            buf: BytesMut::new(),
            decoder: Decoder::new(limits),
            ws_text_flags: Vec::new(),
            subprotocol,
            version: Version::V1_2,
        }
    }

    /// Sends raw bytes (over WebSocket as one text message if UTF-8, else binary).
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        match &mut self.link {
            Link::Tcp(stream) => stream.write_all(bytes).await.expect("tcp write"),
            Link::Ws(socket) => {
                let message = match std::str::from_utf8(bytes) {
                    Ok(text) => Message::text(text),
                    Err(_) => Message::binary(bytes.to_vec()),
                };
                socket.send(message).await.expect("ws send");
            }
        }
    }

    /// Sends raw bytes like [`Conn::send_raw`]; whether the connection took them (a broker
    /// that closed it may not).
    pub async fn try_send_raw(&mut self, bytes: &[u8]) -> bool {
        match &mut self.link {
            Link::Tcp(stream) => stream.write_all(bytes).await.is_ok(),
            Link::Ws(socket) => {
                let message = match std::str::from_utf8(bytes) {
                    Ok(text) => Message::text(text),
                    Err(_) => Message::binary(bytes.to_vec()),
                };
                socket.send(message).await.is_ok()
            }
        }
    }

    /// Whether this is a WebSocket connection.
    pub fn is_ws(&self) -> bool {
        matches!(self.link, Link::Ws(_))
    }

    /// Sends one WebSocket message of the given kind (WebSocket only).
    pub async fn send_ws(&mut self, message: Message) {
        match &mut self.link {
            Link::Ws(socket) => socket.send(message).await.expect("ws send"),
            Link::Tcp(_) => panic!("send_ws on a TCP connection"),
        }
    }

    /// Sends several WebSocket messages at once, flushing only after the last; whether the
    /// socket took them all (a broker that already closed may refuse the rest).
    pub async fn send_ws_burst(&mut self, messages: Vec<Message>) -> bool {
        let Link::Ws(socket) = &mut self.link else {
            panic!("send_ws_burst on a TCP connection");
        };
        for message in messages {
            if socket.feed(message).await.is_err() {
                return false;
            }
        }
        socket.flush().await.is_ok()
    }

    /// Sends a frame encoded for the negotiated version.
    pub async fn send(&mut self, frame: &Frame) {
        let bytes = encode_to_bytes(frame, self.version);
        self.send_raw(&bytes).await;
    }

    /// Sends CONNECT with `headers` and returns the CONNECTED frame.
    pub async fn connect(&mut self, headers: &[(&str, &str)]) -> Frame {
        self.send(&frame("CONNECT", headers)).await;
        let connected = self.expect_frame().await;
        assert_eq!(connected.command.as_str(), "CONNECTED", "got {connected:?}");
        if let Some(v) = connected.header("version").and_then(|v| v.parse().ok()) {
            self.version = v;
            self.decoder.set_version(v);
        }
        connected
    }

    /// CONNECT as 1.2 with `login` and no heart-beats.
    pub async fn login(&mut self, login: &str) -> Frame {
        self.connect(&[
            ("accept-version", "1.2"),
            ("host", "localhost"),
            ("login", login),
            ("heart-beat", "0,0"),
        ])
        .await
    }

    /// The next frame or close, skipping heart-beats; panics after [`WAIT`].
    pub async fn next_event(&mut self) -> Event {
        self.next_event_within(WAIT)
            .await
            .expect("nothing from the broker in time")
    }

    /// The next frame or close within `wait`, or `None` if nothing came.
    pub async fn next_event_within(&mut self, wait: Duration) -> Option<Event> {
        self.try_next_event_within(wait)
            .await
            .unwrap_or_else(|e| panic!("broker sent a malformed frame: {e}"))
    }

    /// Like [`Conn::next_event_within`], with bytes that do not decode as an error rather
    /// than a panic. A CONNECTED switches the decoder to the version it names.
    ///
    /// # Errors
    /// What the decoder said.
    pub async fn try_next_event_within(
        &mut self,
        wait: Duration,
    ) -> Result<Option<Event>, DecodeError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(frame) = self.decoder.decode(&mut self.buf)? {
                if frame.command.as_str() == "CONNECTED" {
                    let version = frame.header("version").and_then(|v| v.parse().ok());
                    self.set_version(version.unwrap_or(Version::V1_0));
                }
                return Ok(Some(Event::Frame(frame)));
            }
            let more = tokio::time::timeout_at(deadline, self.read_more()).await;
            match more {
                Err(_) => return Ok(None),
                Ok(false) => return Ok(Some(Event::Closed)),
                Ok(true) => {}
            }
        }
    }

    /// Decodes (and encodes) as `version` from now on: what a CONNECT without CONNECTED yet
    /// will speak.
    pub fn set_version(&mut self, version: Version) {
        self.version = version;
        self.decoder.set_version(version);
    }

    /// Reads once; `false` on close.
    async fn read_more(&mut self) -> bool {
        match &mut self.link {
            Link::Tcp(stream) => {
                self.buf.reserve(64 * 1024);
                matches!(stream.read_buf(&mut self.buf).await, Ok(n) if n > 0)
            }
            Link::Ws(socket) => loop {
                match socket.next().await {
                    Some(Ok(Message::Text(t))) => {
                        self.ws_text_flags.push(true);
                        self.buf.extend_from_slice(t.as_bytes());
                        return true;
                    }
                    Some(Ok(Message::Binary(b))) => {
                        self.ws_text_flags.push(false);
                        self.buf.extend_from_slice(&b);
                        return true;
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return false,
                    Some(Ok(_)) => {}
                }
            },
        }
    }

    /// Waits up to `wait` for raw bytes and returns them undecoded (heart-beat EOLs
    /// included); empty if nothing came or the connection closed.
    pub async fn read_raw_within(&mut self, wait: Duration) -> Vec<u8> {
        let before = self.buf.len();
        match tokio::time::timeout(wait, self.read_more()).await {
            Ok(true) => self.buf.split_off(before).to_vec(),
            _ => Vec::new(),
        }
    }

    /// The next frame; panics on close or timeout.
    pub async fn expect_frame(&mut self) -> Frame {
        match self.next_event().await {
            Event::Frame(f) => f,
            Event::Closed => panic!("connection closed while a frame was expected"),
        }
    }

    /// Expects an ERROR whose message contains `needle`, then the connection closing.
    pub async fn expect_error_then_close(&mut self, needle: &str) -> Frame {
        let error = self.expect_frame().await;
        assert_eq!(
            error.command.as_str(),
            "ERROR",
            "expected an ERROR about {needle:?}, got {error:?}"
        );
        let message = error.header("message").unwrap_or_default();
        assert!(
            message.contains(needle),
            "ERROR message {message:?} does not mention {needle:?}"
        );
        self.expect_closed().await;
        error
    }

    /// Expects the connection to close (frames before the close are an error).
    pub async fn expect_closed(&mut self) {
        match self.next_event().await {
            Event::Closed => {}
            Event::Frame(f) => panic!("expected the connection to close, got {f:?}"),
        }
    }

    /// Whether nothing arrives within `wait`.
    pub async fn is_quiet_for(&mut self, wait: Duration) -> bool {
        self.next_event_within(wait).await.is_none()
    }

    /// Sends a frame with a receipt and waits for that RECEIPT (frames before it are
    /// returned).
    pub async fn send_with_receipt(&mut self, frame: &Frame, receipt: &str) -> Vec<Frame> {
        let mut with = frame.clone();
        with.headers.push("receipt", receipt);
        self.send(&with).await;
        let mut before = Vec::new();
        loop {
            let f = self.expect_frame().await;
            if f.command.as_str() == "RECEIPT" && f.header("receipt-id") == Some(receipt) {
                return before;
            }
            assert_ne!(
                f.command.as_str(),
                "ERROR",
                "ERROR instead of RECEIPT {receipt}: {f:?}"
            );
            before.push(f);
        }
    }

    /// SUBSCRIBE and wait for its receipt.
    pub async fn subscribe(&mut self, id: &str, destination: &str) {
        let sub = frame("SUBSCRIBE", &[("id", id), ("destination", destination)]);
        let early = self.send_with_receipt(&sub, &format!("sub-{id}")).await;
        assert!(
            early.is_empty(),
            "frames before the SUBSCRIBE receipt: {early:?}"
        );
    }

    /// A TCP connection to `broker`, connected as `login`.
    pub async fn open_as(broker: &Broker, login: &str) -> Conn {
        let mut conn = Conn::open(broker, Transport::Tcp).await;
        conn.login(login).await;
        conn
    }

    /// Closes the client side.
    pub async fn close(mut self) {
        match &mut self.link {
            Link::Tcp(stream) => {
                let _ = stream.shutdown().await;
            }
            Link::Ws(socket) => {
                let _ = socket.send(Message::Close(None)).await;
            }
        }
    }
}

/// A frame from a command name and headers.
pub fn frame(command: &str, headers: &[(&str, &str)]) -> Frame {
    let command = stomp_codec::Command::from_bytes(command.as_bytes()).expect("a STOMP command");
    let mut f = Frame::new(command);
    for (n, v) in headers {
        f.headers.push(n, v);
    }
    f
}

/// Decodes one whole frame from `bytes` (for tests that inspect raw output).
///
/// # Errors
/// The decoder's error.
pub fn decode_one(bytes: &[u8]) -> Result<Option<Frame>, DecodeError> {
    Decoder::new(Limits::default()).decode(&mut BytesMut::from(bytes))
}

/// Re-exported for tests that build WebSocket messages.
pub use tungstenite::Message as WsMessage;

/// A test CA and a certificate it signed for `localhost` and 127.0.0.1, in PEM.
pub struct TestPki {
    /// The CA's certificate (what clients trust).
    pub ca_pem: String,
    /// The CA's certificate, DER.
    pub ca_der: Vec<u8>,
    /// The server's certificate.
    pub cert_pem: String,
    /// The server's private key (PKCS#8).
    pub key_pem: String,
    /// The server's certificate, DER (what a client sees).
    pub cert_der: Vec<u8>,
}

impl TestPki {
    /// A fresh CA and server certificate; `name` is the server certificate's common name.
    pub fn new(name: &str) -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "stoa test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA certificate");
        let key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("server params");
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.signed_by(&key, &ca).expect("server certificate");
        TestPki {
            ca_pem: ca.pem(),
            ca_der: ca.der().to_vec(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().to_vec(),
        }
    }

    /// Writes the server's certificate and key as `cert.pem` and `key.pem` in `dir`, and
    /// the CA as `ca.pem`; returns the three paths.
    pub fn write(&self, dir: &std::path::Path) -> (PathBuf, PathBuf, PathBuf) {
        std::fs::create_dir_all(dir).expect("the directory");
        let paths = (
            dir.join("cert.pem"),
            dir.join("key.pem"),
            dir.join("ca.pem"),
        );
        std::fs::write(&paths.0, &self.cert_pem).expect("cert.pem");
        std::fs::write(&paths.1, &self.key_pem).expect("key.pem");
        std::fs::write(&paths.2, &self.ca_pem).expect("ca.pem");
        paths
    }
}

/// The reference broker's STOMP and Web-STOMP URLs (`tcp://...`, `ws://.../ws`), when the
/// test command started RabbitMQ (on ports of its own, not Stoa's 61613): `STOA_RABBITMQ_STOMP`
/// and `STOA_RABBITMQ_WS`. `None`, saying so, when they are not set.
pub fn rabbitmq() -> Option<(String, String)> {
    match (
        std::env::var("STOA_RABBITMQ_STOMP"),
        std::env::var("STOA_RABBITMQ_WS"),
    ) {
        (Ok(tcp), Ok(ws)) => Some((tcp, ws)),
        _ => {
            eprintln!(
                "RabbitMQ tests skipped: scripts/test.sh starts RabbitMQ and sets STOA_RABBITMQ_STOMP and STOA_RABBITMQ_WS"
            );
            None
        }
    }
}
