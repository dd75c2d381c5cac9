//! One connection's task: bytes in through the codec to the [`Session`], the [`Outbox`] out
//! through the transport, heart-beats both ways, and an orderly close.
//!
//! In: a [`Transport`] (TCP or WebSocket) and the shared [`Broker`]. Out: nothing; it runs
//! until the client leaves, breaks the protocol, falls silent or the broker shuts down.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use std::time::SystemTime;

use bytes::{BufMut, BytesMut};
use stomp_codec::{Command, Decoder, Frame, Version, encode_to_bytes};
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use tracing::{Instrument, debug, info};

use crate::admission::Ticket;
use crate::auth::{Credentials, Mode, Refusal};
use crate::error::{Rejected, SessionError};
use crate::metrics::Metrics;
use crate::outbox::{Outbox, Outgoing};
use crate::session::{Outcome, Session, write_ack_id};
use crate::sessions::SessionInfo;
use crate::state::Broker;

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The socket broke: close without an ERROR.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The peer broke a transport rule (e.g. an oversized WebSocket message): answer with
    /// an ERROR frame, then close.
    #[error("{0}")]
    Protocol(SessionError),
}

/// How the connection ends, which decides what is still written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseKind {
    /// After DISCONNECT or at the peer's request.
    Normal,
    /// After an ERROR frame.
    Error,
    /// The broker is stopping.
    Shutdown,
}

/// A byte transport under the STOMP codec.
pub trait Transport: Send {
    /// Appends newly received bytes to `buf`; `Ok(false)` when the peer closed cleanly.
    ///
    /// Must be cancel safe: it runs inside `select!`.
    fn read(
        &mut self,
        buf: &mut BytesMut,
    ) -> impl Future<Output = Result<bool, TransportError>> + Send;

    /// Writes every frame of `batch`, then flushes once.
    fn write(&mut self, batch: &[Outgoing]) -> impl Future<Output = io::Result<()>> + Send;

    /// Like `write`, reading and dropping whatever the peer sends meanwhile: when the
    /// connection ends, a peer still busy writing (and not reading until it is done) must
    /// not hold back its last frames, its ERROR above all.
    fn write_discarding(
        &mut self,
        batch: &[Outgoing],
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// Writes one heart-beat EOL.
    fn heart_beat(&mut self) -> impl Future<Output = io::Result<()>> + Send;

    /// Closes politely, giving the peer a moment to read what was written last.
    fn close(&mut self, kind: CloseKind) -> impl Future<Output = ()> + Send;

    /// Gives back write buffers kept between writes (called after a small batch).
    fn shrink(&mut self) {}
}

/// Writes one outgoing frame into `dst`: for a MESSAGE, the subscription's head, its `ack`
/// header if it needs one, then the shared part.
pub fn compose(item: &Outgoing, dst: &mut BytesMut) {
    match item {
        Outgoing::Frame(bytes) => dst.put_slice(bytes),
        Outgoing::Message {
            head,
            ack,
            tail,
            mark,
            ..
        } => {
            dst.reserve(head.len() + tail.len() + 40);
            dst.put_slice(head);
            dst.put_slice(mark.header());
            if let Some(tag) = ack {
                dst.put_slice(b"ack:");
                write_ack_id(*tag, dst);
                dst.put_u8(b'\n');
            }
            dst.put_slice(tail);
        }
    }
}

/// Counts a written batch: its frames by command and its bytes (one atomic add each, per
/// batch).
fn count_sent(metrics: &Metrics, batch: &[Outgoing]) {
    let mut messages = 0u64;
    let mut bytes = 0u64;
    for item in batch {
        bytes += item.len() as u64;
        match item {
            Outgoing::Message { .. } => messages += 1,
            Outgoing::Frame(frame) => {
                let line = frame.split(|b| *b == b'\n').next().unwrap_or_default();
                if let Some(command) = Command::from_bytes(line) {
                    metrics.frames_sent(command, 1);
                }
            }
        }
    }
    if messages > 0 {
        metrics.frames_sent(Command::Message, messages);
    }
    metrics.bytes_sent.inc_by(bytes);
}

/// An error's kind for `/metrics` (its variant's name: a bounded set of labels).
fn error_kind(error: &SessionError) -> String {
    format!("{error:?}")
        .chars()
        .take_while(char::is_ascii_alphanumeric)
        .collect()
}

/// Batches written per wake-up before the connection looks at its reads again.
const MAX_BATCHES_PER_WAKE: usize = 4;

/// Batches of at most this many frames leave no buffers behind.
const FEW: usize = 4;

/// Why writing the outbox stopped.
enum Flush {
    /// The socket broke.
    Io(io::Error),
    /// A batch could not be written in time: the client reads nothing.
    TimedOut,
    /// A producer was refused: the client does not read fast enough.
    Slow,
}

/// How long a connection with no heart-beat either way lets its timer sleep.
const IDLE_RECHECK: Duration = Duration::from_secs(3600);

/// When the timer must next look at a connected connection: when a beat is due, or when the
/// silence allowed ends; `IDLE_RECHECK` from `now` when neither applies. (It must never be in
/// the past with nothing due: the timer would fire at once, again and again.)
fn heart_beat_check(
    now: Instant,
    (last_read, last_write): (Instant, Instant),
    send_every: Option<Duration>,
    silence_allowed: Option<Duration>,
) -> Instant {
    let send = send_every.map(|every| last_write + every);
    let expect = silence_allowed.map(|allowed| last_read + allowed);
    match (send, expect) {
        (Some(send), Some(expect)) => send.min(expect),
        (Some(at), None) | (None, Some(at)) => at,
        (None, None) => now + IDLE_RECHECK,
    }
}

/// How often a connection that stopped reading (the history store is behind) looks again.
const PAUSE_POLL: Duration = Duration::from_millis(2);

/// How long a closing connection waits for the peer to read its last frames.
pub const LINGER: Duration = Duration::from_secs(1);

/// How often the broker beats on a connection whose negotiated interval is `interval`: a
/// quarter early, so that a client checking at the interval plus a little (stompit allows
/// about 100 ms) never sees a beat late when the machine is busy.
pub fn beat_every(interval: Duration) -> Duration {
    interval - interval / 4
}

enum Stop {
    /// DISCONNECT: flush, then close.
    Disconnect,
    /// The peer went away or the socket broke: nothing more to write.
    Gone,
    /// A protocol error: flush earlier replies, ERROR, close.
    Reject(Rejected),
    /// Shutdown: flush, ERROR "server shutting down", close.
    Shutdown,
}

/// Serves one connection until it ends. Spawn one per accepted socket.
pub fn serve<T: Transport>(
    transport: T,
    broker: Arc<Broker>,
    shutdown: watch::Receiver<bool>,
    arrival: Arrival,
) -> impl Future<Output = ()> + Send {
    let Arrival {
        peer,
        transport: kind,
        bearer,
        ticket,
    } = arrival;
    let id = broker.next_session_id();
    let span = tracing::info_span!(
        "session",
        id = id.0,
        %peer,
        transport = kind,
        user = tracing::field::Empty
    );
    // Built here rather than inside the future: an async fn keeps its arguments for its whole
    // life, which held the transport twice more in every idle connection's task.
    let mut conn = Connection::new(transport, broker, id, SessionInfo::new(peer, kind));
    conn.ticket = ticket;
    if conn.broker.auth.mode() != Mode::None {
        conn.auth = Some(Box::new(AuthContext {
            ip: peer.ip(),
            bearer,
            expires: None,
        }));
    }
    async move {
        let open = conn.broker.shared.metrics.connection_opened(kind);
        info!("connected");
        let stop = conn.run(shutdown).await;
        Box::pin(conn.finish(stop)).await;
        conn.broker.shared.metrics.connection_closed(&open);
        info!("closed");
    }
    .instrument(span)
}

/// How a connection came in.
#[derive(Debug)]
pub struct Arrival {
    /// The client's address.
    pub peer: SocketAddr,
    /// `tcp`, `ws`, ...: for the log.
    pub transport: &'static str,
    /// A token the WebSocket upgrade carried (`Authorization: Bearer`, or `access_token`
    /// in its query), for `--auth jwt`.
    pub bearer: Option<String>,
    /// Its place in the connection counts (`--max-connections`), given back at the end.
    pub ticket: Option<Box<Ticket>>,
}

impl Arrival {
    /// A connection from `peer` over `transport`, with no token and no ticket.
    pub fn new(peer: SocketAddr, transport: &'static str) -> Arrival {
        Arrival {
            peer,
            transport,
            bearer: None,
            ticket: None,
        }
    }
}

/// Answers a connection that may not be served (`--max-connections`) with `error`, then
/// closes it: nothing it sends is acted on.
pub async fn refuse<T: Transport>(mut transport: T, error: SessionError, timeout: Duration) {
    let frame = error.to_error_frame(None);
    let bytes = [Outgoing::Frame(encode_to_bytes(&frame, Version::V1_2))];
    let _ = tokio::time::timeout(timeout, transport.write_discarding(&bytes)).await;
    transport.close(CloseKind::Error).await;
}

/// What a connection keeps only when clients authenticate (boxed: most connections of a
/// `--auth none` broker are idle chat connections, whose size counts).
struct AuthContext {
    ip: IpAddr,
    /// The upgrade's token, until CONNECT takes it.
    bearer: Option<String>,
    /// When the token the session was opened with expires.
    expires: Option<Instant>,
}

/// What handling the frames of a read came to, when it stops before the buffer is empty.
enum Step {
    /// The connection ends.
    Stop(Stop),
    /// A CONNECT whose credentials must be checked (which waits) before it is handled.
    Authenticate(Box<Frame>),
    /// A SEND over `--max-send-rate`, held until this moment.
    Throttled(Instant),
}

/// `--max-send-rate`: a token bucket on one connection's SEND frames.
struct Throttle {
    /// Tokens per second.
    rate: f64,
    /// Most tokens kept.
    burst: f64,
    tokens: f64,
    last: Instant,
    /// A SEND that came before its token.
    held: Option<Box<Frame>>,
}

impl Throttle {
    fn new(rate: u32, burst: u32) -> Throttle {
        Throttle {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: Instant::now(),
            held: None,
        }
    }

    /// Takes a token if there is one; else when there will be.
    fn take(&mut self, now: Instant) -> Option<Instant> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            None
        } else {
            Some(now + Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

struct Connection<T> {
    transport: T,
    broker: Arc<Broker>,
    ticket: Option<Box<Ticket>>,
    /// `--max-send-rate` (boxed: most brokers have none).
    throttle: Option<Box<Throttle>>,
    auth: Option<Box<AuthContext>>,
    outbox: Arc<Outbox>,
    session: Session,
    decoder: Decoder,
    read_buf: BytesMut,
    /// What the read buffer held after the last frames were handled: a read added the rest.
    read_seen: usize,
    batch: Vec<Outgoing>,
    /// When the oldest MESSAGE of `batch` was queued, for the delivery latency.
    batch_since: Option<std::time::Instant>,
    last_read: Instant,
    last_write: Instant,
    started: Instant,
    send_every: Option<Duration>,
    expect_every: Option<Duration>,
}

impl<T: Transport> Connection<T> {
    fn new(
        transport: T,
        broker: Arc<Broker>,
        id: crate::message::SessionId,
        info: SessionInfo,
    ) -> Connection<T> {
        let (session, outbox) = broker.open_session(id, info);
        let config = &broker.shared.config;
        let now = Instant::now();
        let throttle = (config.max_send_rate > 0).then(|| {
            let burst = config.max_send_burst.unwrap_or(config.max_send_rate);
            Box::new(Throttle::new(config.max_send_rate, burst))
        });
        Connection {
            ticket: None,
            throttle,
            auth: None,
            transport,
            decoder: Decoder::new(config.limits()),
            read_buf: BytesMut::new(),
            read_seen: 0,
            batch: Vec::new(),
            batch_since: None,
            outbox,
            session,
            last_read: now,
            last_write: now,
            started: now,
            send_every: None,
            expect_every: None,
            broker,
        }
    }

    /// The next moment the timer must look at the connection.
    fn next_check(&self) -> Instant {
        let config = &self.broker.shared.config;
        if !self.session.is_connected() {
            return self.started + config.connect_timeout();
        }
        let check = heart_beat_check(
            Instant::now(),
            (self.last_read, self.last_write),
            self.send_every,
            self.expect_every
                .map(|every| every * config.heart_beat_tolerance),
        );
        match self.auth.as_ref().and_then(|context| context.expires) {
            Some(expires) => check.min(expires),
            None => check,
        }
    }

    async fn run(&mut self, mut shutdown: watch::Receiver<bool>) -> Stop {
        // One timer for the heart-beat and connect checks and for coalesced writes: an idle
        // connection's task holds a single timer entry.
        let timer = sleep_until(self.next_check());
        tokio::pin!(timer);
        // While set, queued frames wait for the coalescing window to pass (see pace.rs).
        let mut flush_at: Option<Instant> = None;
        // While set, nothing is read: the history store is behind, and a client that keeps
        // publishing would otherwise grow what waits for it without bound. The timer looks
        // again at that moment (a poll: a wait of its own would make every connection's task
        // larger, and the store is rarely behind).
        let mut paused_until: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => return Stop::Shutdown,
                () = self.outbox.notified() => {
                    if let Some(end) = self.outbox.ended() {
                        return Stop::Reject(SessionError::from(end).into());
                    }
                    if self.outbox.may_hold() {
                        if flush_at.is_some() {
                            // More for a batch already held: it goes out when the window ends.
                            continue;
                        }
                        if let Some(at) = self.hold_until() {
                            flush_at = Some(at);
                            timer.as_mut().reset(self.deadline(flush_at, paused_until));
                            continue;
                        }
                    }
                    flush_at = None;
                    if let Some(stop) = self.flush(Some(MAX_BATCHES_PER_WAKE)).await {
                        return stop;
                    }
                }
                read = self.transport.read(&mut self.read_buf), if paused_until.is_none() => match read {
                    Ok(true) => {
                        self.last_read = Instant::now();
                        let added = self.read_buf.len().saturating_sub(self.read_seen);
                        self.broker.shared.metrics.bytes_received.inc_by(added as u64);
                        let connected = self.session.is_connected();
                        let taken = self.take_input().await;
                        // What is left (a partial frame, or frames held back) was counted.
                        self.read_seen = self.read_buf.len();
                        match taken {
                            Ok(pause) => paused_until = pause,
                            Err(stop) => return stop,
                        }
                        if connected != self.session.is_connected() || paused_until.is_some() {
                            timer.as_mut().reset(self.deadline(flush_at, paused_until));
                        }
                    }
                    Ok(false) => return Stop::Gone,
                    Err(TransportError::Io(e)) => {
                        debug!("read failed: {e}");
                        return Stop::Gone;
                    }
                    Err(TransportError::Protocol(error)) => return Stop::Reject(error.into()),
                },
                () = &mut timer => {
                    let now = Instant::now();
                    if paused_until.is_some_and(|at| now >= at) {
                        paused_until = if self.broker.shared.router.store_pending().is_over() {
                            Some(now + PAUSE_POLL)
                        } else {
                            // The client was not read meanwhile: its silence is the broker's.
                            self.last_read = now;
                            // Frames left in the buffer (a SEND held for the rate) go first.
                            let taken = self.take_input().await;
                            self.read_seen = self.read_buf.len();
                            match taken {
                                Ok(pause) => pause,
                                Err(stop) => return stop,
                            }
                        };
                    }
                    if flush_at.is_some_and(|at| now >= at) {
                        flush_at = None;
                        if let Some(stop) = self.flush(Some(MAX_BATCHES_PER_WAKE)).await {
                            return stop;
                        }
                    }
                    if now >= self.next_check()
                        && let Some(stop) = Box::pin(self.on_timer()).await
                    {
                        return stop;
                    }
                    timer.as_mut().reset(self.deadline(flush_at, paused_until));
                }
            }
        }
    }

    /// Until when newly queued frames wait, if the broker is busy and this connection wrote
    /// less than the coalescing window ago (see pace.rs). Never for the first write; the
    /// caller has checked that the outbox allows holding (no reply queued, not slow).
    fn hold_until(&self) -> Option<Instant> {
        let window = self.broker.pace.window();
        let wrote = self.last_write > self.started;
        let at = self.last_write + window;
        (wrote && !window.is_zero() && Instant::now() < at).then_some(at)
    }

    /// When the timer must fire next: the next check, or a coalesced write or a paused
    /// read due earlier.
    fn deadline(&self, flush_at: Option<Instant>, paused_until: Option<Instant>) -> Instant {
        let check = self.next_check();
        [flush_at, paused_until]
            .into_iter()
            .flatten()
            .fold(check, Instant::min)
    }

    /// Writes the outbox, at most `batches` batches (all of it if `None`); the reason to
    /// stop, if writing failed.
    async fn flush(&mut self, batches: Option<usize>) -> Option<Stop> {
        // Boxed, like the timer's and the final futures: an idle connection's task then
        // holds only what waiting needs (see docs/PERFORMANCE.md).
        match Box::pin(self.flush_outbox(batches)).await {
            Ok(()) => None,
            Err(Flush::Slow) => Some(self.slow_consumer()),
            Err(Flush::TimedOut) => {
                self.broker.shared.metrics.slow_consumers.inc();
                let ms = self.broker.shared.config.write_timeout_ms;
                Some(Stop::Reject(SessionError::WriteTimeout(ms).into()))
            }
            Err(Flush::Io(e)) => {
                debug!("write failed: {e}");
                Some(Stop::Gone)
            }
        }
    }

    /// Handles what was read: every whole frame in the buffer, authenticating a CONNECT on
    /// the way. Returns when reading must wait until a moment (a SEND over the rate, the
    /// history store behind), or why the connection ends.
    async fn take_input(&mut self) -> Result<Option<Instant>, Stop> {
        loop {
            match self.process_frames() {
                None => break,
                Some(Step::Stop(stop)) => return Err(stop),
                Some(Step::Authenticate(frame)) => {
                    if let Some(stop) = Box::pin(self.authenticate(*frame)).await {
                        return Err(stop);
                    }
                }
                Some(Step::Throttled(until)) => return Ok(Some(until)),
            }
        }
        self.reclaim_read_buffer();
        Ok(self
            .broker
            .shared
            .router
            .store_pending()
            .is_over()
            .then(|| Instant::now() + PAUSE_POLL))
    }

    /// Decodes and handles every whole frame in the read buffer, until one ends the
    /// connection. A subscription cut as a slow consumer ends it too, before the next frame
    /// is acted on: the cut came first, and its ERROR is the one the client gets.
    fn process_frames(&mut self) -> Option<Step> {
        loop {
            if self.outbox.is_slow() {
                return Some(Step::Stop(self.slow_consumer()));
            }
            let held = self.throttle.as_mut().and_then(|t| t.held.take());
            let frame = match held {
                Some(frame) => *frame,
                None => match self.decoder.decode(&mut self.read_buf) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => return None,
                    Err(e) => {
                        return Some(Step::Stop(Stop::Reject(SessionError::Decode(e).into())));
                    }
                },
            };
            if frame.command == Command::Send
                && let Some(throttle) = self.throttle.as_mut()
                && let Some(until) = throttle.take(Instant::now())
            {
                // Over --max-send-rate: nothing more is read until it may be handled.
                throttle.held = Some(Box::new(frame));
                return Some(Step::Throttled(until));
            }
            debug!(command = %frame.command, "frame");
            if self.auth.is_some()
                && !self.session.is_connected()
                && matches!(frame.command, Command::Connect | Command::Stomp)
            {
                return Some(Step::Authenticate(Box::new(frame)));
            }
            match self.session.handle(frame) {
                Ok(outcome) => {
                    if let Some(stop) = self.on_outcome(outcome) {
                        return Some(Step::Stop(stop));
                    }
                }
                Err(rejected) => return Some(Step::Stop(Stop::Reject(rejected))),
            }
        }
    }

    /// Acts on what a handled frame changed; the reason to stop, if it ends the connection.
    fn on_outcome(&mut self, outcome: Outcome) -> Option<Stop> {
        match outcome {
            Outcome::Continue => None,
            Outcome::Connected {
                version,
                send_interval_ms,
                receive_interval_ms,
            } => {
                self.decoder.set_version(version);
                self.send_every = (send_interval_ms > 0)
                    .then(|| beat_every(Duration::from_millis(send_interval_ms)));
                self.expect_every =
                    (receive_interval_ms > 0).then(|| Duration::from_millis(receive_interval_ms));
                tracing::Span::current().record("user", self.session.user());
                info!(%version, "stomp session open");
                None
            }
            Outcome::Disconnect => Some(Stop::Disconnect),
        }
    }

    /// Checks a CONNECT's credentials, then hands it to the session. A refusal's ERROR
    /// leaves no sooner than `--auth-failure-delay-ms` after the CONNECT.
    async fn authenticate(&mut self, frame: Frame) -> Option<Stop> {
        let started = Instant::now();
        let auth = self.broker.auth.clone();
        let context = self.auth.as_mut()?;
        let bearer = context.bearer.take();
        let credentials = Credentials {
            login: frame.header("login"),
            passcode: frame.header("passcode"),
            bearer: bearer.as_deref(),
        };
        match auth.authenticate(credentials, context.ip).await {
            Ok(identity) => {
                context.expires = identity.expires_at.map(|at| {
                    let left = at.duration_since(SystemTime::now()).unwrap_or_default();
                    Instant::now() + left
                });
                let registered = identity.clone();
                match self.session.handle_authenticated(frame, identity) {
                    Ok(outcome) => {
                        auth.register(&registered, self.session.id(), &self.outbox);
                        self.on_outcome(outcome)
                    }
                    Err(rejected) => Some(Stop::Reject(rejected)),
                }
            }
            Err(refusal) => {
                self.broker.shared.metrics.authentication_failures.inc();
                tokio::time::sleep_until(started + auth.failure_delay()).await;
                let error = match refusal {
                    Refusal::Failed => SessionError::AuthenticationFailed,
                    Refusal::TooManyFailures => SessionError::TooManyFailedLogins,
                };
                Some(Stop::Reject(error.into()))
            }
        }
    }

    /// Gives the read buffer back once everything in it was handled: an idle connection
    /// then holds none (the next read takes a fresh one), which matters with tens of
    /// thousands of idle chat connections.
    fn reclaim_read_buffer(&mut self) {
        if self.read_buf.is_empty() && self.read_buf.capacity() > 0 {
            self.read_buf = BytesMut::new();
        }
    }

    async fn on_timer(&mut self) -> Option<Stop> {
        let now = Instant::now();
        let config = &self.broker.shared.config;
        if self
            .auth
            .as_ref()
            .and_then(|context| context.expires)
            .is_some_and(|expires| now >= expires)
        {
            return Some(Stop::Reject(SessionError::TokenExpired.into()));
        }
        if !self.session.is_connected() {
            if now >= self.started + config.connect_timeout() {
                return Some(Stop::Reject(
                    SessionError::ConnectTimeout(config.connect_timeout_ms).into(),
                ));
            }
            return None;
        }
        if let Some(every) = self.expect_every {
            let window = every * config.heart_beat_tolerance;
            if now.duration_since(self.last_read) >= window {
                self.broker.shared.metrics.heart_beat_timeouts.inc();
                let silent = u64::try_from(now.duration_since(self.last_read).as_millis())
                    .unwrap_or(u64::MAX);
                return Some(Stop::Reject(SessionError::HeartBeatTimeout(silent).into()));
            }
        }
        if let Some(every) = self.send_every
            && now.duration_since(self.last_write) >= every
        {
            let write =
                tokio::time::timeout(config.write_timeout(), self.transport.heart_beat()).await;
            if !matches!(write, Ok(Ok(()))) {
                return Some(Stop::Gone);
            }
            self.last_write = Instant::now();
        }
        None
    }

    fn slow_consumer(&self) -> Stop {
        Stop::Reject(self.slow_consumer_error())
    }

    fn slow_consumer_error(&self) -> Rejected {
        self.broker.shared.metrics.slow_consumers.inc();
        SessionError::SlowConsumer(self.broker.shared.config.outbox_bytes).into()
    }

    /// Writes what is queued, batch by batch, recording deliveries that await an ACK. A write
    /// races the outbox: if a producer is refused while the socket is full, this stops at
    /// once rather than when the write times out.
    async fn flush_outbox(&mut self, batches: Option<usize>) -> Result<(), Flush> {
        // A few batches at most while the connection is open, so that reads are served too
        // under a constant flood; everything when it ends.
        let mut left = batches;
        while left != Some(0) {
            left = left.map(|n| n - 1);
            if !self.take_batch()? {
                return Ok(());
            }
            // The pinned write borrows the batch: keep it to this block.
            {
                let timeout = self.broker.shared.config.write_timeout();
                let outbox = &self.outbox;
                let write = tokio::time::timeout(timeout, self.transport.write(&self.batch));
                tokio::pin!(write);
                loop {
                    tokio::select! {
                        biased;
                        done = &mut write => match done {
                            Ok(result) => {
                                result.map_err(Flush::Io)?;
                                break;
                            }
                            Err(_) => return Err(Flush::TimedOut),
                        },
                        // More was queued meanwhile (the next round takes it), or a refusal.
                        () = outbox.notified() => {
                            if outbox.is_slow() {
                                return Err(Flush::Slow);
                            }
                        }
                    }
                }
            }
            self.last_write = Instant::now();
            let metrics = &self.broker.shared.metrics;
            count_sent(metrics, &self.batch);
            if let Some(since) = self.batch_since {
                let latency = self.last_write.into_std().saturating_duration_since(since);
                metrics.delivery_latency.observe(latency);
            }
            if self.batch.len() <= FEW {
                // Most chat connections write a frame now and then and are idle between:
                // they keep no buffers, which is most of an idle connection's memory. A busy
                // connection writes larger batches and keeps its buffers for the next one.
                self.batch = Vec::new();
                self.outbox.shrink();
                self.transport.shrink();
            } else if self.batch.capacity() > 4096 {
                self.batch = Vec::new();
            }
        }
        if self.outbox.has_queued() {
            self.outbox.wake();
        }
        Ok(())
    }

    /// Takes the next batch from the outbox, recording its MESSAGEs that wait for an ACK
    /// (or, `ack:auto` on a queue, are consumed once written); `false` when nothing waits.
    fn take_batch(&mut self) -> Result<bool, Flush> {
        if self.outbox.is_slow() {
            return Err(Flush::Slow);
        }
        self.batch.clear();
        let (taken, since) = self.outbox.take_timed(&mut self.batch);
        self.batch_since = since;
        if taken == 0 {
            return Ok(false);
        }
        for item in &self.batch {
            if let Outgoing::Message { ack: Some(tag), .. } = item {
                self.session.record_delivery(*tag);
            }
        }
        Ok(true)
    }

    /// Writes out everything queued, dropping whatever the client sends meanwhile (the
    /// connection is ending: nothing more is read).
    async fn write_out(&mut self) -> Result<(), Flush> {
        let timeout = self.broker.shared.config.write_timeout();
        while self.take_batch()? {
            match tokio::time::timeout(timeout, self.transport.write_discarding(&self.batch)).await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(Flush::Io(e)),
                Err(_) => return Err(Flush::TimedOut),
            }
        }
        Ok(())
    }

    async fn finish(&mut self, stop: Stop) {
        let (mut error, kind) = match stop {
            // The peer left or the socket broke: there is no one to write to.
            Stop::Gone => {
                self.end_session();
                return;
            }
            Stop::Disconnect => {
                // RECEIPTs that wait for the disk (the DISCONNECT's among them) must reach
                // the outbox before the final flush.
                if self.session.has_waiting_receipts() {
                    let broker = self.broker.clone();
                    let _ =
                        tokio::task::spawn_blocking(move || broker.shared.router.flush_durable())
                            .await;
                    // Answers from the cluster come within its time-out, or fail.
                    if let Some(receipts) = self.session.receipts() {
                        let config = &self.broker.shared.config;
                        let wait = Duration::from_millis(config.cluster_timeout_ms)
                            + Duration::from_secs(1);
                        let _ = tokio::time::timeout(wait, receipts.idle()).await;
                    }
                }
                (None, CloseKind::Normal)
            }
            Stop::Shutdown => (
                Some(Rejected::from(SessionError::ShuttingDown)),
                CloseKind::Shutdown,
            ),
            Stop::Reject(rejected) => (Some(rejected), CloseKind::Error),
        };
        // Nothing is queued from here on. After DISCONNECT everything queued goes out, a
        // replay included, so that its RECEIPT does too; after an error only the frames
        // queued (RECEIPTs of earlier frames), then the ERROR; to a client cut for not
        // reading, only the ERROR (after any frame already half written, which stays whole).
        self.outbox.seal();
        if error.is_some() {
            self.outbox.drop_backlogs();
        }
        let cut = error.as_ref().is_some_and(|r| r.error.is_slow_consumer());
        let writable = cut
            || match self.write_out().await {
                Ok(()) => true,
                // The outbox overflowed before the end (the DISCONNECT came in the read
                // that overflowed it, say), or the client stopped reading: skip the rest,
                // and say why the connection ends.
                Err(Flush::Slow) => {
                    error = Some(self.slow_consumer_error());
                    true
                }
                Err(Flush::TimedOut) => {
                    self.broker.shared.metrics.slow_consumers.inc();
                    let ms = self.broker.shared.config.write_timeout_ms;
                    error = Some(SessionError::WriteTimeout(ms).into());
                    true
                }
                Err(Flush::Io(e)) => {
                    debug!("final write failed: {e}");
                    false
                }
            };
        let kind = if error.is_some() && kind == CloseKind::Normal {
            CloseKind::Error
        } else {
            kind
        };
        if let (true, Some(rejected)) = (writable, &error) {
            info!(error = %rejected.error, "sending ERROR");
            let frame = rejected.error.to_error_frame(rejected.receipt.as_deref());
            let bytes = encode_to_bytes(&frame, self.session.version());
            let error_frame = [Outgoing::Frame(bytes)];
            let write = self.transport.write_discarding(&error_frame);
            if matches!(
                tokio::time::timeout(self.broker.shared.config.write_timeout(), write).await,
                Ok(Ok(()))
            ) {
                let metrics = &self.broker.shared.metrics;
                metrics.error_sent(&error_kind(&rejected.error));
                metrics.frames_sent(Command::Error, 1);
            }
        }
        self.transport.close(kind).await;
        self.end_session();
    }

    /// Drops what is queued, and ends the session: its subscriptions leave, its user's
    /// sessions no longer count it.
    fn end_session(&mut self) {
        self.outbox.close();
        self.broker.close_session(self.session.id());
        if let Some(identity) = self.session.identity() {
            self.broker
                .auth
                .unregister(&identity.name, self.session.id());
        }
        self.session.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_without_heart_beats_idle_for_hours_is_not_due_at_once() {
        let long_ago = Instant::now();
        let now = long_ago + Duration::from_secs(2 * 3600);
        assert!(heart_beat_check(now, (long_ago, long_ago), None, None) > now);
        // With beats negotiated, what is due is due.
        let every = Duration::from_secs(10);
        assert_eq!(
            heart_beat_check(now, (long_ago, long_ago), Some(every), None),
            long_ago + every
        );
        assert_eq!(
            heart_beat_check(now, (now, long_ago), Some(every), Some(every * 3)),
            long_ago + every
        );
    }
}
