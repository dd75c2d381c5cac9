//! One SockJS session: what the application sent and no receiving request has taken yet,
//! what the client sent and the application has not read, and how the session ended.
//!
//! In: messages from the application ([`Channel::send`]) and from the client
//! ([`Session::deliver`], fed by `xhr_send` or a WebSocket). Out: frames for the one
//! receiving request at a time ([`Receiver::next`]), messages for the application
//! ([`Channel::recv`]).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::frame::{self, Close};

/// Batches of client messages (one `xhr_send` or WebSocket message each) waiting for the
/// application: past this, `xhr_send` waits (back-pressure on the client, nothing dropped).
const INBOUND_BATCHES: usize = 16;

/// What the session holds between the application and the receiving requests.
#[derive(Debug)]
struct State {
    /// Messages for the client, each JSON-encoded, separated by commas: the inside of the
    /// next `a[...]` frame.
    queue: String,
    /// How the session ended, once it has; served to every receiving request after the
    /// queue is empty.
    close: Option<Close>,
    /// A receiving request is attached.
    receiving: bool,
    /// When the last receiving request ended (the disconnect delay counts from there); `None`
    /// while one is attached.
    idle_since: Option<Instant>,
}

/// A SockJS session, shared by its requests and its application.
#[derive(Debug)]
pub struct Session {
    state: Mutex<State>,
    /// Wakes the receiving request: messages or the close arrived.
    changed: Notify,
    /// Wakes the application: the queue was taken and has room again.
    drained: Notify,
    /// The client's messages, for the application.
    inbound: mpsc::Sender<Vec<String>>,
    /// Cancelled when the session ends for the application (closed, interrupted, expired).
    gone: CancellationToken,
    /// Most bytes queued for the client before the application waits.
    queue_bytes: usize,
}

/// Why a receiving request gets no messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Another request is receiving: `c[2010,"Another connection still open"]`.
    Busy,
    /// The session ended: its close frame.
    Closed(Close),
}

/// What a receiving request sends next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// The inside of an `a[...]` frame.
    Messages(String),
    /// The session ended.
    Close(Close),
    /// Nothing for a heart-beat interval: `h`.
    HeartBeat,
}

/// The session was closed: nothing more goes to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the SockJS session is closed")]
pub struct Closed;

impl Session {
    /// A new session, idle since now, and the application's end of it.
    pub fn new(queue_bytes: usize) -> (Arc<Session>, Channel) {
        let (inbound, receiver) = mpsc::channel(INBOUND_BATCHES);
        let session = Arc::new(Session {
            state: Mutex::new(State {
                queue: String::new(),
                close: None,
                receiving: false,
                idle_since: Some(Instant::now()),
            }),
            changed: Notify::new(),
            drained: Notify::new(),
            inbound,
            gone: CancellationToken::new(),
            queue_bytes,
        });
        let channel = Channel {
            session: session.clone(),
            inbound: receiver,
        };
        (session, channel)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind: go on with it.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Attaches the one receiving request.
    ///
    /// # Errors
    /// [`Refusal::Busy`] while another is attached; [`Refusal::Closed`] once the session
    /// ended and everything queued before its end was taken.
    pub fn attach(self: &Arc<Self>) -> Result<Receiver, Refusal> {
        let mut state = self.state();
        if state.receiving {
            return Err(Refusal::Busy);
        }
        if state.queue.is_empty()
            && let Some(close) = &state.close
        {
            return Err(Refusal::Closed(close.clone()));
        }
        state.receiving = true;
        state.idle_since = None;
        Ok(Receiver {
            session: self.clone(),
            finished: false,
        })
    }

    /// Hands the client's messages to the application, waiting while it is behind.
    ///
    /// # Errors
    /// [`Closed`] once the session ended.
    pub async fn deliver(&self, messages: Vec<String>) -> Result<(), Closed> {
        if self.gone.is_cancelled() {
            return Err(Closed);
        }
        if messages.is_empty() {
            return Ok(());
        }
        tokio::select! {
            sent = self.inbound.send(messages) => sent.map_err(|_| Closed),
            () = self.gone.cancelled() => Err(Closed),
        }
    }

    /// Room for one batch of client messages, once the application has taken enough.
    ///
    /// # Errors
    /// [`Closed`] once the session ended.
    ///
    /// # Cancel safety
    /// Safe in `select!` (the place in line is lost).
    pub async fn reserve(&self) -> Result<mpsc::Permit<'_, Vec<String>>, Closed> {
        tokio::select! {
            permit = self.inbound.reserve() => permit.map_err(|_| Closed),
            () = self.gone.cancelled() => Err(Closed),
        }
    }

    /// Ends the session with `close` (the first close wins): the application reads no more,
    /// receivers get what was queued, then the close frame.
    pub fn close(&self, close: Close) {
        {
            let mut state = self.state();
            if state.close.is_none() {
                state.close = Some(close);
            }
        }
        self.gone.cancel();
        self.changed.notify_waiters();
        self.drained.notify_waiters();
    }

    /// Whether the session has had no receiving request for `delay`: the client is gone.
    pub fn expired(&self, now: Instant, delay: Duration) -> bool {
        self.state()
            .idle_since
            .is_some_and(|since| now.saturating_duration_since(since) >= delay)
    }

    /// Whether the session ended.
    pub fn is_closed(&self) -> bool {
        self.state().close.is_some()
    }

    /// Takes what a receiver sends next, if anything is ready.
    fn take(&self) -> Option<Next> {
        let mut state = self.state();
        if !state.queue.is_empty() {
            let messages = std::mem::take(&mut state.queue);
            drop(state);
            self.drained.notify_waiters();
            return Some(Next::Messages(messages));
        }
        state.close.clone().map(Next::Close)
    }

    /// Queues `messages` for the client if there is room (or the queue is empty: one
    /// message larger than the budget still goes).
    fn try_queue(&self, messages: &[&str]) -> Result<bool, Closed> {
        let mut state = self.state();
        if state.close.is_some() {
            return Err(Closed);
        }
        if !state.queue.is_empty() && state.queue.len() >= self.queue_bytes {
            return Ok(false);
        }
        for message in messages {
            if !state.queue.is_empty() {
                state.queue.push(',');
            }
            frame::push_json_string(&mut state.queue, message);
        }
        drop(state);
        self.changed.notify_waiters();
        Ok(true)
    }
}

/// The one request receiving a session's frames. Dropped before [`Receiver::finish`] (the
/// client aborted the request), it ends the session: `c[1002,"Connection interrupted"]`.
#[derive(Debug)]
pub struct Receiver {
    session: Arc<Session>,
    finished: bool,
}

impl Receiver {
    /// The next frame: queued messages, the close, or a heart-beat after `heart_beat` of
    /// nothing.
    ///
    /// # Cancel safety
    /// Safe in `select!`: messages are taken only in the poll that returns them.
    pub async fn next(&mut self, heart_beat: Duration) -> Next {
        let deadline = Instant::now() + heart_beat;
        loop {
            let changed = self.session.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(next) = self.session.take() {
                return next;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Next::HeartBeat;
            }
        }
    }

    /// Detaches in good order: the response was written whole.
    pub fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        {
            let mut state = self.session.state();
            state.receiving = false;
            state.idle_since = Some(Instant::now());
        }
        if !self.finished {
            // sockjs-protocol "Handling close": a receiving request cut by the network leaves
            // the session in an unknown state (frames may have been lost): end it.
            self.session.close(Close::interrupted());
        }
    }
}

/// The application's end of a session.
#[derive(Debug)]
pub struct Channel {
    session: Arc<Session>,
    inbound: mpsc::Receiver<Vec<String>>,
}

impl Channel {
    /// The client's next messages; `None` once the session ended.
    ///
    /// # Cancel safety
    /// Safe in `select!`.
    pub async fn recv(&mut self) -> Option<Vec<String>> {
        tokio::select! {
            biased;
            batch = self.inbound.recv() => batch,
            () = self.session.gone.cancelled() => None,
        }
    }

    /// Queues `messages` for the client, waiting while the queue is over its budget.
    ///
    /// # Errors
    /// [`Closed`] once the session ended.
    pub async fn send(&self, messages: &[&str]) -> Result<(), Closed> {
        loop {
            let drained = self.session.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if self.session.try_queue(messages)? {
                return Ok(());
            }
            drained.await;
        }
    }

    /// Ends the session with `close`.
    pub fn close(&self, close: Close) {
        self.session.close(close);
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        // An application that ends without a word closes the session as SockJS servers do.
        self.session.close(Close::go_away());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_receiver_is_refused_while_the_first_is_attached() {
        let (session, _channel) = Session::new(1024);
        let first = session.attach();
        assert!(first.is_ok());
        assert_eq!(session.attach().err(), Some(Refusal::Busy));
        if let Ok(first) = first {
            first.finish();
        }
        assert!(session.attach().is_ok());
    }

    #[tokio::test]
    async fn queued_messages_come_before_the_close_frame() {
        let (session, channel) = Session::new(1024);
        assert_eq!(channel.send(&["a", "b\"c"]).await, Ok(()));
        channel.close(Close::go_away());
        let mut receiver = session.attach().map_err(|_| ()).expect("attached");
        let heart_beat = Duration::from_secs(1);
        assert_eq!(
            receiver.next(heart_beat).await,
            Next::Messages(r#""a","b\"c""#.to_owned())
        );
        assert_eq!(
            receiver.next(heart_beat).await,
            Next::Close(Close::go_away())
        );
        receiver.finish();
        assert_eq!(
            session.attach().err(),
            Some(Refusal::Closed(Close::go_away()))
        );
    }

    #[tokio::test]
    async fn an_aborted_receiver_interrupts_the_session() {
        let (session, mut channel) = Session::new(1024);
        drop(session.attach());
        assert_eq!(
            session.attach().err(),
            Some(Refusal::Closed(Close::interrupted()))
        );
        assert_eq!(channel.recv().await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_receiver_gets_a_heart_beat() {
        let (session, _channel) = Session::new(1024);
        let mut receiver = session.attach().map_err(|_| ()).expect("attached");
        assert_eq!(
            receiver.next(Duration::from_secs(25)).await,
            Next::HeartBeat
        );
        receiver.finish();
    }

    #[tokio::test]
    async fn the_application_waits_while_the_queue_is_over_budget() {
        let (session, channel) = Session::new(4);
        assert_eq!(channel.send(&["12345"]).await, Ok(()));
        let second = channel.send(&["x"]);
        tokio::pin!(second);
        assert!(futures_util::poll!(second.as_mut()).is_pending());
        let mut receiver = session.attach().map_err(|_| ()).expect("attached");
        assert_eq!(
            receiver.next(Duration::from_secs(1)).await,
            Next::Messages("\"12345\"".to_owned())
        );
        assert_eq!(second.await, Ok(()));
        receiver.finish();
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_expires_only_while_nobody_receives() {
        let (session, _channel) = Session::new(64);
        let delay = Duration::from_secs(5);
        let receiver = session.attach().map_err(|_| ()).expect("attached");
        tokio::time::advance(delay * 2).await;
        assert!(!session.expired(Instant::now(), delay));
        receiver.finish();
        tokio::time::advance(delay - Duration::from_millis(1)).await;
        assert!(!session.expired(Instant::now(), delay));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(session.expired(Instant::now(), delay));
    }
}
