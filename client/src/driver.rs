//! The task that owns the connection.
//!
//! In: [`Request`]s from [`Client`](crate::Client) handles, and frames from the broker.
//! Out: frames to the broker, MESSAGEs to subscription streams, receipts to waiting calls;
//! heart-beats both ways; reconnection with backoff that subscribes everything again, from
//! the last `x-seq` seen for chat rooms.

use std::collections::HashMap;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use stomp_codec::{Command, Decoder, Frame, HeartBeat, Limits, Version, encode_to_bytes};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until};
use tracing::{debug, info};

use crate::transport::{Endpoint, Link};
use crate::{ClientError, ConnectedInfo, Message, Options, Request, SubscribeOptions};

/// A silent server is dead after this many times its promised heart-beat interval (stomp.js
/// uses 2).
const SILENCE_TOLERANCE: u32 = 2;

type Done = oneshot::Sender<Result<Frame, ClientError>>;

struct Connection {
    link: Link,
    decoder: Decoder,
    buf: BytesMut,
    version: Version,
    send_every: Option<Duration>,
    expect_every: Option<Duration>,
    last_read: Instant,
    last_write: Instant,
    info: ConnectedInfo,
}

impl Connection {
    async fn open(endpoint: &Endpoint, options: &Options) -> Result<Connection, ClientError> {
        let opening = async {
            let mut link = Link::open(endpoint, &options.tls).await?;
            let accept: Vec<&str> = options.versions.iter().map(|v| v.as_str()).collect();
            let mut connect = Frame::new(Command::Connect)
                .with_header("accept-version", &accept.join(","))
                .with_header("heart-beat", &options.heart_beat.to_string());
            // Like stomp.js and Spring, `host` only when asked: RabbitMQ reads it as a
            // virtual host name and refuses the URL's host name.
            if let Some(host) = &options.host {
                connect.headers.push("host", host);
            }
            if let Some(login) = &options.login {
                connect.headers.push("login", login);
            }
            if let Some(passcode) = &options.passcode {
                connect.headers.push("passcode", passcode);
            }
            for (name, value) in &options.headers {
                connect.headers.push(name, value);
            }
            // CONNECT is never escaped, so the version does not matter here.
            link.write(encode_to_bytes(&connect, Version::V1_2)).await?;
            let limits = Limits {
                max_frame_bytes: 64 << 20,
                max_body_bytes: 64 << 20,
                max_headers: 1024,
                max_header_line_bytes: 64 << 10,
            };
            let mut decoder = Decoder::new(limits);
            let mut buf = BytesMut::new();
            let connected = loop {
                match decoder.decode(&mut buf) {
                    Ok(Some(frame)) => break frame,
                    Ok(None) => {}
                    Err(e) => return Err(ClientError::Protocol(e.to_string())),
                }
                if !link.read(&mut buf).await? {
                    return Err(ClientError::Protocol(
                        "the broker closed the connection before CONNECTED".into(),
                    ));
                }
            };
            match connected.command {
                Command::Connected => {}
                Command::Error => return Err(broker_error(&connected)),
                other => {
                    return Err(ClientError::Protocol(format!(
                        "expected CONNECTED, got {other}"
                    )));
                }
            }
            let version = match connected.header("version") {
                None => Version::V1_0,
                Some(v) => v.parse().map_err(|_| {
                    ClientError::Protocol(format!("CONNECTED names unknown version {v:?}"))
                })?,
            };
            decoder.set_version(version);
            let server = connected
                .header("heart-beat")
                .map(HeartBeat::parse)
                .transpose()
                .map_err(|e| ClientError::Protocol(e.to_string()))?
                .unwrap_or_default();
            let every = |ms: u64| (ms > 0).then(|| Duration::from_millis(ms));
            let now = Instant::now();
            Ok(Connection {
                link,
                decoder,
                buf,
                version,
                // A quarter early, so that a broker checking at the interval (plus a little)
                // never sees a beat late when this machine is busy.
                send_every: every(options.heart_beat.send_interval_ms(server))
                    .map(|interval| interval - interval / 4),
                expect_every: every(options.heart_beat.receive_interval_ms(server)),
                last_read: now,
                last_write: now,
                info: ConnectedInfo {
                    version,
                    headers: connected
                        .headers
                        .iter()
                        .map(|(n, v)| (n.to_owned(), v.to_owned()))
                        .collect(),
                },
            })
        };
        match tokio::time::timeout(options.timeout, opening).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout("CONNECTED".into())),
        }
    }

    async fn write(&mut self, frame: &Frame) -> Result<(), ClientError> {
        self.link
            .write(encode_to_bytes(frame, self.version))
            .await?;
        self.last_write = Instant::now();
        Ok(())
    }

    fn next_check(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        let send = self.send_every.map_or(far, |every| self.last_write + every);
        let dead = self
            .expect_every
            .map_or(far, |every| self.last_read + every * SILENCE_TOLERANCE);
        send.min(dead)
    }
}

fn broker_error(frame: &Frame) -> ClientError {
    ClientError::Broker {
        message: frame.header("message").unwrap_or("(no message)").to_owned(),
        details: String::from_utf8_lossy(&frame.body).into_owned(),
    }
}

struct Sub {
    destination: String,
    options: SubscribeOptions,
    messages: mpsc::UnboundedSender<Message>,
    /// The newest `x-seq` delivered, for resuming a chat room.
    last_seq: u64,
    /// Its place among the subscriptions made: after a reconnect they are made again in
    /// that order, as the application made them.
    made: u64,
}

impl Sub {
    fn frame(&self, id: &str, resuming: bool) -> Frame {
        let mut frame = Frame::new(Command::Subscribe)
            .with_header("id", id)
            .with_header("destination", &self.destination);
        if let Some(ack) = &self.options.ack {
            frame.headers.push("ack", ack);
        }
        let resume_room =
            resuming && self.destination.starts_with("/topic/room.") && self.last_seq > 0;
        for (name, value) in &self.options.headers {
            if resume_room && (name == "x-history" || name == "x-since") {
                continue;
            }
            frame.headers.push(name, value);
        }
        if resume_room {
            frame.headers.push("x-since", &self.last_seq.to_string());
        }
        frame
    }
}

struct Driver {
    /// Where it may connect, in order of preference.
    endpoints: Vec<Endpoint>,
    /// The one it is (or was last) connected to.
    current: usize,
    options: Options,
    requests: mpsc::UnboundedReceiver<Request>,
    subs: HashMap<String, Sub>,
    pending: HashMap<String, Done>,
    next_receipt: u64,
    subs_made: u64,
}

/// Connects to the first of `endpoints` that answers (there is at least one), then runs
/// the driver in its own task.
pub(crate) async fn start(
    endpoints: Vec<Endpoint>,
    options: Options,
) -> Result<(mpsc::UnboundedSender<Request>, ConnectedInfo), ClientError> {
    let mut failure = None;
    let mut opened = None;
    for (index, endpoint) in endpoints.iter().enumerate() {
        match Connection::open(endpoint, &options).await {
            Ok(conn) => {
                opened = Some((index, conn));
                break;
            }
            Err(e) => {
                debug!(url = %endpoint, "connect failed: {e}");
                failure = Some(e);
            }
        }
    }
    let Some((current, conn)) = opened else {
        return Err(failure.unwrap_or_else(|| ClientError::InvalidUrl("no URL given".to_owned())));
    };
    let info = conn.info.clone();
    let (tx, rx) = mpsc::unbounded_channel();
    let driver = Driver {
        endpoints,
        current,
        options,
        requests: rx,
        subs: HashMap::new(),
        pending: HashMap::new(),
        next_receipt: 0,
        subs_made: 0,
    };
    tokio::spawn(driver.run(conn));
    Ok((tx, info))
}

enum Lost {
    /// The handles are gone or DISCONNECT completed: stop for good.
    Finished,
    /// The connection failed: reconnect if allowed.
    Failed(ClientError),
}

impl Driver {
    async fn run(mut self, mut conn: Connection) {
        loop {
            let error = match self.serve(&mut conn).await {
                Lost::Finished => return,
                Lost::Failed(error) => error,
            };
            info!("connection lost: {error}");
            for (_, done) in self.pending.drain() {
                let _ = done.send(Err(error.clone()));
            }
            match self.reconnect().await {
                Some(fresh) => conn = fresh,
                // No (more) reconnecting: ending the streams and the request channel tells
                // every handle that the client is closed.
                None => return,
            }
        }
    }

    async fn reconnect(&mut self) -> Option<Connection> {
        let backoff = self.options.reconnect?;
        let mut attempt = 0u32;
        loop {
            if backoff.max_attempts.is_some_and(|max| attempt >= max) {
                return None;
            }
            // The same place first (a blip), then the others; the delay grows per round.
            let count = self.endpoints.len();
            let round = attempt / u32::try_from(count).unwrap_or(u32::MAX).max(1);
            // Jitter from the thread's random generator, so that many clients do not return
            // at once.
            tokio::time::sleep(backoff.delay(round, rand::random::<u64>())).await;
            if self.requests.is_closed() {
                return None;
            }
            let index = (self.current + attempt as usize) % count;
            let endpoint = &self.endpoints[index];
            match Connection::open(endpoint, &self.options).await {
                Ok(mut conn) => {
                    info!(attempt, url = %endpoint, "reconnected");
                    self.current = index;
                    let mut subs: Vec<(&String, &Sub)> = self.subs.iter().collect();
                    subs.sort_by_key(|(_, sub)| sub.made);
                    let resubscribe: Vec<Frame> =
                        subs.iter().map(|(id, sub)| sub.frame(id, true)).collect();
                    let mut ok = true;
                    for frame in &resubscribe {
                        if conn.write(frame).await.is_err() {
                            ok = false;
                            break;
                        }
                    }
                    if ok {
                        return Some(conn);
                    }
                }
                Err(e) => debug!(attempt, url = %endpoint, "reconnect failed: {e}"),
            }
            attempt = attempt.saturating_add(1);
        }
    }

    fn receipt_id(&mut self) -> String {
        self.next_receipt += 1;
        format!("d-{}", self.next_receipt)
    }

    async fn serve(&mut self, conn: &mut Connection) -> Lost {
        loop {
            let deadline = conn.next_check();
            tokio::select! {
                request = self.requests.recv() => {
                    let Some(request) = request else {
                        // Every handle is gone: leave politely.
                        let _ = conn.write(&Frame::new(Command::Disconnect)).await;
                        conn.link.close().await;
                        return Lost::Finished;
                    };
                    match self.on_request(conn, request).await {
                        Ok(true) => {}
                        Ok(false) => return Lost::Finished,
                        Err(e) => return Lost::Failed(e),
                    }
                }
                read = conn.link.read(&mut conn.buf) => match read {
                    Ok(true) => {
                        conn.last_read = Instant::now();
                        if let Err(e) = self.on_frames(conn).await {
                            return Lost::Failed(e);
                        }
                    }
                    Ok(false) => return Lost::Failed(ClientError::Protocol("the broker closed the connection".into())),
                    Err(e) => return Lost::Failed(e),
                },
                () = sleep_until(deadline) => {
                    let now = Instant::now();
                    if let Some(every) = conn.expect_every
                        && now.duration_since(conn.last_read) >= every * SILENCE_TOLERANCE
                    {
                        let silent = now.duration_since(conn.last_read).as_millis();
                        return Lost::Failed(ClientError::Protocol(format!("no heart-beat from the broker for {silent} ms")));
                    }
                    if conn.send_every.is_some_and(|every| now.duration_since(conn.last_write) >= every) {
                        if let Err(e) = conn.link.write(Bytes::from_static(b"\n")).await {
                            return Lost::Failed(e);
                        }
                        conn.last_write = now;
                    }
                }
            }
        }
    }

    /// `Ok(false)` once DISCONNECT has completed.
    async fn on_request(
        &mut self,
        conn: &mut Connection,
        request: Request,
    ) -> Result<bool, ClientError> {
        match request {
            Request::Frame { frame, done } => {
                let frame = *frame;
                if let (Some(done), Some(receipt)) = (done, frame.header("receipt")) {
                    self.pending.insert(receipt.to_owned(), done);
                }
                conn.write(&frame).await?;
            }
            Request::Subscribe {
                id,
                destination,
                options,
                messages,
                done,
            } => {
                self.subs_made += 1;
                let sub = Sub {
                    destination,
                    options,
                    messages,
                    last_seq: 0,
                    made: self.subs_made,
                };
                let receipt = self.receipt_id();
                let frame = sub.frame(&id, false).with_header("receipt", &receipt);
                self.subs.insert(id, sub);
                self.pending.insert(receipt, done);
                conn.write(&frame).await?;
            }
            Request::Unsubscribe { id, done } => {
                self.subs.remove(&id);
                let receipt = self.receipt_id();
                self.pending.insert(receipt.clone(), done);
                let frame = Frame::new(Command::Unsubscribe)
                    .with_header("id", &id)
                    .with_header("receipt", &receipt);
                conn.write(&frame).await?;
            }
            Request::Disconnect { done } => {
                let receipt = self.receipt_id();
                conn.write(&Frame::new(Command::Disconnect).with_header("receipt", &receipt))
                    .await?;
                // Wait for the RECEIPT (everything sent before it has been processed).
                let result = loop {
                    match conn.decoder.decode(&mut conn.buf) {
                        Ok(Some(frame))
                            if frame.command == Command::Receipt
                                && frame.header("receipt-id") == Some(receipt.as_str()) =>
                        {
                            break Ok(frame);
                        }
                        Ok(Some(frame)) if frame.command == Command::Error => {
                            break Err(broker_error(&frame));
                        }
                        Ok(Some(frame)) => self.dispatch(frame).await,
                        Ok(None) => match conn.link.read(&mut conn.buf).await {
                            Ok(true) => {}
                            // Closing in answer to DISCONNECT is a graceful end too:
                            // RabbitMQ's Web-STOMP does that instead of sending the RECEIPT.
                            Ok(false) => break Ok(Frame::new(Command::Receipt)),
                            Err(e) => break Err(e),
                        },
                        Err(e) => break Err(ClientError::Protocol(e.to_string())),
                    }
                };
                conn.link.close().await;
                let _ = done.send(result);
                return Ok(false);
            }
        }
        Ok(true)
    }

    async fn on_frames(&mut self, conn: &mut Connection) -> Result<(), ClientError> {
        loop {
            match conn.decoder.decode(&mut conn.buf) {
                Ok(Some(frame)) if frame.command == Command::Error => {
                    let error = broker_error(&frame);
                    if let Some(done) = frame
                        .header("receipt-id")
                        .and_then(|id| self.pending.remove(id))
                    {
                        let _ = done.send(Err(error.clone()));
                    }
                    // The broker closes after an ERROR.
                    return Err(error);
                }
                Ok(Some(frame)) => self.dispatch(frame).await,
                Ok(None) => return Ok(()),
                Err(e) => return Err(ClientError::Protocol(e.to_string())),
            }
        }
    }

    async fn dispatch(&mut self, frame: Frame) {
        match frame.command {
            Command::Receipt => {
                if let Some(done) = frame
                    .header("receipt-id")
                    .and_then(|id| self.pending.remove(id))
                {
                    let _ = done.send(Ok(frame));
                }
            }
            Command::Message => {
                let Some(sub) = frame
                    .header("subscription")
                    .and_then(|id| self.subs.get_mut(id))
                else {
                    return;
                };
                if frame.header("x-event") == Some("gap")
                    && let Some(first) = frame
                        .header("x-first-seq")
                        .and_then(|s| s.parse::<u64>().ok())
                {
                    // The room numbers from below what was seen: it was forgotten (nothing
                    // kept and nobody in it) or lost its last messages. The old numbers
                    // mean nothing now; the replay that follows is all new.
                    if first <= sub.last_seq {
                        sub.last_seq = first.saturating_sub(1);
                    }
                }
                if let Some(seq) = frame.header("x-seq").and_then(|s| s.parse::<u64>().ok()) {
                    // Replayed history can overlap what was already delivered: skip it.
                    if seq <= sub.last_seq {
                        return;
                    }
                    sub.last_seq = seq;
                }
                let _ = sub.messages.send(Message { frame });
            }
            _ => {}
        }
    }
}
