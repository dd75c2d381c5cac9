//! The rooms scenario over the techniques that came before WebSocket: STOMP over SockJS
//! xhr-streaming, and Stoa's HTTP room API read by Server-Sent Events, long polling or
//! polling and written by POST.
//!
//! In: the broker's HTTP address, a room, a member's name. Out: each delivered message's
//! `x-step` and `x-sent` headers handed to the scenario's tally, and a count of the HTTP
//! requests made. Connections are hyper's HTTP/1.1 client, kept alive.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use stomp_codec::{Command, Decoder, Frame, Limits, Version, encode_to_bytes};
use tokio::net::TcpStream;

use super::wire::WireError;

/// How members read (and write) in the rooms scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Technique {
    /// STOMP over WebSocket.
    Ws,
    /// STOMP over SockJS: `xhr_streaming` to read, `xhr_send` to write.
    SockjsXhrStreaming,
    /// `GET /api/rooms/<room>/events` (Server-Sent Events) to read, POST to write.
    Sse,
    /// `GET .../messages?since=S&wait=30` to read, POST to write.
    LongPoll,
    /// `GET .../messages?since=S` every `--poll-interval-ms` to read, POST to write.
    Poll,
}

impl Technique {
    /// The name `--transport` takes.
    pub fn name(self) -> &'static str {
        match self {
            Technique::Ws => "ws",
            Technique::SockjsXhrStreaming => "sockjs-xhr-streaming",
            Technique::Sse => "sse",
            Technique::LongPoll => "long-poll",
            Technique::Poll => "poll",
        }
    }
}

/// HTTP requests made, all members together.
pub type Requests = Arc<AtomicU64>;

/// A socket that adds what it reads and writes to [`WIRE_BYTES`](super::wire::WIRE_BYTES).
struct Counted(TcpStream);

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.0).poll_read(cx, buf);
        super::wire::count_wire_bytes(buf.filled().len() - before);
        polled
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.0).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &polled {
            super::wire::count_wire_bytes(*n);
        }
        polled
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Where a delivered message's timing goes: `(x-step, x-sent)`.
pub type Record = Arc<dyn Fn(&str, &str) + Send + Sync>;

fn protocol(what: impl std::fmt::Display) -> WireError {
    WireError::Protocol(what.to_string())
}

/// One kept-alive HTTP/1.1 connection.
pub struct Http {
    send: SendRequest<Full<Bytes>>,
    host: String,
    requests: Requests,
}

impl Http {
    /// Connects to `addr` (`host:port`).
    ///
    /// # Errors
    /// The socket or the HTTP handshake.
    pub async fn connect(addr: &str, requests: Requests) -> Result<Http, WireError> {
        let socket = TcpStream::connect(addr)
            .await
            .map_err(|source| WireError::Io {
                context: "connecting over HTTP",
                source,
            })?;
        let _ = socket.set_nodelay(true);
        let (send, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(Counted(socket)))
                .await
                .map_err(protocol)?;
        tokio::spawn(connection);
        Ok(Http {
            send,
            host: addr.to_owned(),
            requests,
        })
    }

    /// Sends one request; the response with its body still to read.
    ///
    /// # Errors
    /// The connection.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        body: Option<(&'static str, Bytes)>,
    ) -> Result<Response<Incoming>, WireError> {
        self.send.ready().await.map_err(protocol)?;
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host);
        let body = match body {
            Some((content_type, bytes)) => {
                request = request.header("content-type", content_type);
                Full::new(bytes)
            }
            None => Full::new(Bytes::new()),
        };
        let request = request.body(body).map_err(protocol)?;
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.send.send_request(request).await.map_err(protocol)
    }

    /// Sends one request and reads the whole answer, which must be a success.
    ///
    /// # Errors
    /// The connection, or a status that is not 2xx.
    pub async fn fetch(
        &mut self,
        method: Method,
        path: &str,
        body: Option<(&'static str, Bytes)>,
    ) -> Result<Bytes, WireError> {
        let response = self.request(method, path, body).await?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(protocol)?
            .to_bytes();
        if !status.is_success() {
            return Err(protocol(format!(
                "{path}: {status} {}",
                String::from_utf8_lossy(&bytes)
            )));
        }
        Ok(bytes)
    }
}

/// A member writing through the HTTP API: one POST per message.
pub struct Poster {
    http: Http,
    path: String,
}

impl Poster {
    /// A poster for `room` as `name`.
    ///
    /// # Errors
    /// As [`Http::connect`].
    pub async fn connect(
        addr: &str,
        room: &str,
        name: &str,
        requests: Requests,
    ) -> Result<Poster, WireError> {
        Ok(Poster {
            http: Http::connect(addr, requests).await?,
            path: format!("/api/rooms/{room}/messages?name={name}"),
        })
    }

    /// POSTs one message with the scenario's timing headers.
    ///
    /// # Errors
    /// As [`Http::fetch`].
    pub async fn send(&mut self, step: &str, sent: &str, body: &Bytes) -> Result<(), WireError> {
        let message = serde_json::json!({
            "body": String::from_utf8_lossy(body),
            "headers": { "x-step": step, "x-sent": sent },
        });
        let bytes = Bytes::from(message.to_string());
        self.http
            .fetch(Method::POST, &self.path, Some(("application/json", bytes)))
            .await?;
        Ok(())
    }
}

/// Hands each message of a poll answer to `record`; the answer's `last_seq`.
fn record_poll(answer: &[u8], record: &Record) -> Result<u64, WireError> {
    let answer: serde_json::Value = serde_json::from_slice(answer).map_err(protocol)?;
    for message in answer["messages"].as_array().into_iter().flatten() {
        let headers = &message["headers"];
        if let (Some(step), Some(sent)) = (headers["x-step"].as_str(), headers["x-sent"].as_str()) {
            record(step, sent);
        }
    }
    answer["last_seq"]
        .as_u64()
        .ok_or_else(|| protocol("a poll answer without last_seq"))
}

/// Reads `room` by polling every `interval` (`None`: long polling, each poll held up to
/// 30 s), until the task is dropped.
///
/// # Errors
/// The connection.
pub async fn poll(
    mut http: Http,
    room: String,
    name: String,
    interval: Option<Duration>,
    record: Record,
) -> Result<(), WireError> {
    let mut since = 0u64;
    let mut ticks = interval.map(|every| {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks
    });
    loop {
        if let Some(ticks) = &mut ticks {
            ticks.tick().await;
        }
        let wait = if interval.is_none() { "&wait=30" } else { "" };
        let path = format!("/api/rooms/{room}/messages?since={since}&limit=1000&name={name}{wait}");
        let answer = http.fetch(Method::GET, &path, None).await?;
        since = since.max(record_poll(&answer, &record)?);
    }
}

/// Reads `room` as Server-Sent Events from `since` on, until the task is dropped.
///
/// # Errors
/// The connection, or a stream that ends.
pub async fn sse(
    mut http: Http,
    room: String,
    name: String,
    record: Record,
) -> Result<(), WireError> {
    let path = format!("/api/rooms/{room}/events?since=0&name={name}");
    let response = http.request(Method::GET, &path, None).await?;
    if !response.status().is_success() {
        return Err(protocol(format!("{path}: {}", response.status())));
    }
    let mut body = response.into_body();
    let mut buffer = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(protocol)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buffer.extend_from_slice(&data);
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let block = buffer.split_to(end + 2);
            let block = String::from_utf8_lossy(&block);
            for line in block.lines() {
                let Some(data) = line.strip_prefix("data: ") else {
                    continue;
                };
                let Ok(message) = serde_json::from_str::<serde_json::Value>(data) else {
                    continue;
                };
                let headers = &message["headers"];
                if let (Some(step), Some(sent)) =
                    (headers["x-step"].as_str(), headers["x-sent"].as_str())
                {
                    record(step, sent);
                }
            }
        }
    }
    Err(WireError::Closed)
}

/// How a probe message's body looks in the API's JSON.
const PROBE: &[u8] = br#""body":"probe""#;

/// An idle reader of `room` (reader `n`): a Server-Sent Events stream, or a long poll held
/// for up to 60 s and asked again; says `ready` once its request is out (for SSE, once the
/// stream began), and counts in `reached` the first message whose body is `probe`.
///
/// # Errors
/// The connection.
pub async fn idle_reader(
    mut http: Http,
    technique: Technique,
    room: &str,
    n: usize,
    ready: tokio::sync::mpsc::Sender<Result<(), WireError>>,
    reached: &AtomicU64,
) -> Result<(), WireError> {
    let name = format!("r{n}");
    if technique == Technique::Sse {
        let path = format!("/api/rooms/{room}/events?name={name}");
        let response = http.request(Method::GET, &path, None).await?;
        let mut body = response.into_body();
        let mut signalled = false;
        while let Some(frame) = body.frame().await {
            if !signalled {
                signalled = true;
                let _ = ready.send(Ok(())).await;
            }
            if let Ok(data) = frame.map_err(protocol)?.into_data()
                && data.windows(PROBE.len()).any(|w| w == PROBE)
            {
                reached.fetch_add(1, Ordering::Relaxed);
            }
        }
        return Err(WireError::Closed);
    }
    let path = format!("/api/rooms/{room}/messages?since=0&wait=60&name={name}");
    let mut signalled = false;
    loop {
        let answer = http.request(Method::GET, &path, None);
        tokio::pin!(answer);
        if !signalled {
            // Out once hyper has written it: poll it until it waits for the answer.
            if futures_util::poll!(answer.as_mut()).is_pending() {
                signalled = true;
                let _ = ready.send(Ok(())).await;
            }
        }
        let response = answer.await?;
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(protocol)?
            .to_bytes();
        if !signalled {
            signalled = true;
            let _ = ready.send(Ok(())).await;
        }
        if body.windows(PROBE.len()).any(|w| w == PROBE) {
            reached.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
    }
}

/// STOMP over one SockJS session: `xhr_streaming` responses read one after the other,
/// `xhr_send` for every frame sent.
pub struct SockJs {
    receive: Http,
    base: String,
    stream: Option<Incoming>,
    lines: BytesMut,
    stomp: BytesMut,
    decoder: Decoder,
}

/// Writes to a SockJS session.
pub struct SockJsSender {
    http: Http,
    base: String,
}

impl SockJsSender {
    /// Sends one STOMP frame as one SockJS message.
    ///
    /// # Errors
    /// As [`Http::fetch`].
    pub async fn send(&mut self, frame: &Frame) -> Result<(), WireError> {
        let bytes = encode_to_bytes(frame, Version::V1_2);
        let text = String::from_utf8_lossy(&bytes);
        let payload = serde_json::to_string(&[text]).map_err(protocol)?;
        self.http
            .fetch(
                Method::POST,
                &format!("{}/xhr_send", self.base),
                Some(("text/plain", Bytes::from(payload))),
            )
            .await?;
        Ok(())
    }
}

impl SockJs {
    /// Opens a session as `login`, subscribed to `destination` (its RECEIPT read), with the
    /// sending half apart.
    ///
    /// # Errors
    /// The connections, or a refusal from the broker.
    pub async fn open(
        addr: &str,
        session: &str,
        login: &str,
        destination: &str,
        requests: Requests,
    ) -> Result<(SockJs, SockJsSender), WireError> {
        let base = format!("/ws/000/{session}");
        let mut receiver = SockJs {
            receive: Http::connect(addr, requests.clone()).await?,
            base: base.clone(),
            stream: None,
            lines: BytesMut::new(),
            stomp: BytesMut::new(),
            decoder: Decoder::new(Limits::default()),
        };
        let mut sender = SockJsSender {
            http: Http::connect(addr, requests).await?,
            base,
        };
        receiver.reopen().await?;
        let connect = Frame::new(Command::Connect)
            .with_header("accept-version", "1.2")
            .with_header("login", login)
            .with_header("heart-beat", "0,0");
        sender.send(&connect).await?;
        expect(&mut receiver, Command::Connected).await?;
        let subscribe = Frame::new(Command::Subscribe)
            .with_header("destination", destination)
            .with_header("id", "0")
            .with_header("receipt", "subscribed");
        sender.send(&subscribe).await?;
        expect(&mut receiver, Command::Receipt).await?;
        Ok((receiver, sender))
    }

    async fn reopen(&mut self) -> Result<(), WireError> {
        let path = format!("{}/xhr_streaming", self.base);
        let response = self.receive.request(Method::POST, &path, None).await?;
        if !response.status().is_success() {
            return Err(protocol(format!("{path}: {}", response.status())));
        }
        self.stream = Some(response.into_body());
        Ok(())
    }

    /// The next STOMP frame, opening the next streaming response when one ends.
    ///
    /// # Errors
    /// The connection, a close frame, or bytes that are not SockJS or STOMP.
    pub async fn next(&mut self) -> Result<Frame, WireError> {
        loop {
            if let Some(frame) = self.decoder.decode(&mut self.stomp).map_err(protocol)? {
                return Ok(frame);
            }
            if let Some(end) = self.lines.iter().position(|b| *b == b'\n') {
                let line = self.lines.split_to(end + 1);
                let line = &line[..end];
                match line.first() {
                    Some(b'a') => {
                        let messages: Vec<String> =
                            serde_json::from_slice(&line[1..]).map_err(protocol)?;
                        for message in messages {
                            self.stomp.extend_from_slice(message.as_bytes());
                        }
                    }
                    Some(b'c') => return Err(protocol(String::from_utf8_lossy(line))),
                    // `o`, `h` and the prelude of `h`s.
                    _ => {}
                }
                continue;
            }
            let Some(stream) = &mut self.stream else {
                self.reopen().await?;
                continue;
            };
            match stream.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.lines.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => return Err(protocol(e)),
                // The response reached the streaming limit: the next one goes on.
                None => self.stream = None,
            }
        }
    }
}

/// The next frame that is not a MESSAGE (a room's join notices come before the
/// SUBSCRIBE's RECEIPT), which must be `command`.
async fn expect(receiver: &mut SockJs, command: Command) -> Result<Frame, WireError> {
    let mut frame = receiver.next().await?;
    while frame.command == Command::Message {
        frame = receiver.next().await?;
    }
    if frame.command == Command::Error {
        return Err(WireError::Refused(
            frame.header("message").unwrap_or_default().to_owned(),
        ));
    }
    if frame.command != command {
        return Err(protocol(format!(
            "expected {command:?}, got {:?}",
            frame.command
        )));
    }
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poll_answer_gives_its_timings_and_last_seq() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record: Record = {
            let seen = seen.clone();
            Arc::new(move |step: &str, sent: &str| {
                if let Ok(mut seen) = seen.lock() {
                    seen.push((step.to_owned(), sent.to_owned()));
                }
            })
        };
        let answer = br#"{"room":"r","last_seq":7,"messages":[
            {"seq":6,"headers":{"x-step":"0","x-sent":"12"}},
            {"seq":7,"event":"join","headers":{}}]}"#;
        assert_eq!(record_poll(answer, &record).ok(), Some(7));
        assert_eq!(
            seen.lock().map(|s| s.clone()).unwrap_or_default(),
            vec![("0".to_owned(), "12".to_owned())]
        );
    }
}
