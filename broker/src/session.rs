//! Per-connection STOMP state machine.
//!
//! In: decoded [`Frame`]s from one client. Out: frames for that client, queued on its
//! [`Outbox`]; subscriptions and publishes handed to the [`Router`](crate::router::Router);
//! and an [`Outcome`] that tells the connection task what changed. No I/O, no waiting.
//! This is the one place where a protocol error becomes an ERROR frame.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::BytesMut;
use stomp_codec::{Command, Frame, HeartBeat, Version, encode, encode_message_head};

use crate::acl::{AclHandle, Action, User, Viewer};
use crate::auth::Identity;
use crate::config::Config;
use crate::error::{Rejected, SessionError};
use crate::router::Router;
use crate::service::{PublishRequest, Published, Replay, SubscribeRequest, Subscriber};

use crate::destination::{Destination, is_pattern};
use crate::message::{SessionId, check_user_name};
use crate::metrics::Metrics;
use crate::outbox::{AckTag, Outbox, Outgoing};
use crate::receipts::{Pending, Receipts};
use crate::sessions::SessionInfo;

/// A SUBSCRIBE's `ack` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// Delivered is consumed.
    Auto,
    /// ACK and NACK are cumulative.
    Client,
    /// ACK and NACK cover one message.
    ClientIndividual,
}

/// What a handled frame changed, for the connection task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing the connection task needs to act on.
    Continue,
    /// CONNECT succeeded: switch the decoder to `version`, start heart-beats.
    Connected {
        /// The negotiated version.
        version: Version,
        /// Send something at least this often, in ms; 0 for never.
        send_interval_ms: u64,
        /// Expect something at least this often, in ms; 0 for never.
        receive_interval_ms: u64,
    },
    /// DISCONNECT: flush what is queued (its RECEIPT included), then close.
    Disconnect,
}

#[derive(Debug)]
struct Subscription {
    id: String,
    /// Shared with the registry's entry (`/admin`), which lists it.
    destination: Arc<str>,
    /// The router's handle on it, for UNSUBSCRIBE and close.
    subscriber: Subscriber,
    ack: AckMode,
    /// Delivered, not yet acknowledged message ids, oldest first.
    unacked: VecDeque<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitingConnect,
    Connected,
    Disconnected,
}

/// What every session shares: the settings, the router with its services, the ACL and the
/// counters. The broker ([`crate::state::Broker`]) holds one; a session holds nothing else
/// of it.
#[derive(Debug)]
pub struct Shared {
    /// Settings.
    pub config: Config,
    /// What users may do (`--acl`).
    pub acl: Option<Arc<AclHandle>>,
    /// Destinations and the services behind them.
    pub router: Router,
    /// Counters for `/metrics`.
    pub metrics: Metrics,
}

/// One connection's protocol state.
#[derive(Debug)]
pub struct Session {
    id: SessionId,
    shared: Arc<Shared>,
    outbox: Arc<Outbox>,
    state: State,
    version: Version,
    user: Arc<str>,
    /// Boxed: a map's smallest table has room for several entries, and an idle chat
    /// connection has one subscription.
    subscriptions: HashMap<u32, Box<Subscription>>,
    subscription_ids: HashMap<String, u32>,
    next_key: u32,
    transactions: HashMap<String, Vec<Frame>>,
    /// What the SEND being handled became, for its RECEIPT's `message-id` and `x-seq`.
    published: Option<Published>,
    /// Who authenticated, before CONNECT is handled (`--auth users` or `jwt`).
    identity: Option<Identity>,
    /// The user as the ACL sees them, once connected (`--acl` only).
    viewer: Option<Arc<Viewer>>,
    /// Whether the frame being handled put something in durable storage.
    durable_published: bool,
    /// Answers the frame being handled waits for (room messages kept in Redis).
    waits: Vec<Pending>,
    /// RECEIPTs waiting for the disk or the cluster, in order.
    receipts: Option<Arc<Receipts>>,
    /// A reader of the HTTP API: in rooms without being a member.
    reader: bool,
    /// What the operator sees of it (`/admin`), kept current here.
    info: Option<Arc<SessionInfo>>,
}

impl Session {
    /// A session waiting for CONNECT, whose frames go to `outbox`.
    pub fn new(id: SessionId, shared: Arc<Shared>, outbox: Arc<Outbox>) -> Session {
        Session {
            id,
            shared,
            state: State::AwaitingConnect,
            version: Version::V1_2,
            user: Arc::from(""),
            subscriptions: HashMap::new(),
            subscription_ids: HashMap::new(),
            next_key: 0,
            transactions: HashMap::new(),
            published: None,
            identity: None,
            viewer: None,
            durable_published: false,
            waits: Vec::new(),
            receipts: None,
            reader: false,
            info: None,
            outbox,
        }
    }

    /// Keeps `info` (the registry's entry) current with this session's user and
    /// subscriptions.
    pub fn set_info(&mut self, info: Arc<SessionInfo>) {
        self.info = Some(info);
    }

    /// Makes this a reader's session (the HTTP API): its room subscriptions deliver
    /// messages without making it a member (no presence, no join or leave notice).
    pub fn set_reader(&mut self) {
        self.reader = true;
    }

    /// This session's id.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// The negotiated version (1.2 until CONNECT).
    pub fn version(&self) -> Version {
        self.version
    }

    /// The connected user's name; empty before CONNECT.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// Handles a CONNECT (or STOMP) whose credentials the connection has checked: the
    /// session is `identity`'s, whatever `login` the frame carries.
    ///
    /// # Errors
    /// As [`Session::handle`].
    pub fn handle_authenticated(
        &mut self,
        frame: Frame,
        identity: Identity,
    ) -> Result<Outcome, Rejected> {
        self.identity = Some(identity);
        self.handle(frame)
    }

    /// The authenticated identity (`--auth users` or `jwt`), once connected.
    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    /// Whether CONNECT has succeeded and DISCONNECT has not come.
    pub fn is_connected(&self) -> bool {
        self.state == State::Connected
    }

    /// Handles one frame from the client.
    ///
    /// # Errors
    /// [`Rejected`] when the frame breaks the protocol: send
    /// [`SessionError::to_error_frame`] and close.
    pub fn handle(&mut self, frame: Frame) -> Result<Outcome, Rejected> {
        self.shared.metrics.frame_received(frame.command);
        // CONNECT may not ask for a receipt (1.2 "Header receipt"); any other frame may.
        let receipt = match frame.command {
            Command::Connect | Command::Stomp => None,
            _ => frame.header("receipt").map(str::to_owned),
        };
        let result = self.dispatch(frame);
        let published = self.published.take();
        match result {
            Ok(outcome) => {
                let receipt = receipt.map(|id| {
                    let mut receipt = Frame::new(Command::Receipt).with_header("receipt-id", &id);
                    // DESIGN.md "Guarantees": a SEND's RECEIPT names what the broker assigned.
                    if let Some(p) = &published {
                        let mut digits = itoa::Buffer::new();
                        receipt
                            .headers
                            .push("message-id", digits.format(p.message_id));
                        if let Some(seq) = p.seq {
                            receipt.headers.push("x-seq", digits.format(seq));
                        }
                    }
                    receipt
                });
                self.settle_frame(receipt);
                Ok(outcome)
            }
            Err(error) => {
                // What the frame handed on before failing still ends the session if it
                // fails; its RECEIPT is not sent.
                self.settle_frame(None);
                Err(Rejected { error, receipt })
            }
        }
    }

    /// Sends the handled frame's RECEIPT (if it asked for one) once everything it handed on
    /// is done: durable writes on disk, room messages kept in Redis. A RECEIPT confirms every
    /// earlier frame too, so receipts go out in order. An answer that fails ends the
    /// session with the reason it carries (`cluster unavailable`, a full queue), receipt
    /// or not.
    fn settle_frame(&mut self, receipt: Option<Frame>) {
        let durable = std::mem::take(&mut self.durable_published);
        let waits = std::mem::take(&mut self.waits);
        let Some(receipt) = receipt else {
            for wait in waits {
                let outbox = self.outbox.clone();
                wait.then(move |settled| {
                    if let Err(end) = settled {
                        outbox.end(end);
                    }
                });
            }
            return;
        };
        let answers = waits.len() + usize::from(durable);
        if answers == 0 && !self.has_waiting_receipts() {
            self.reply(&receipt);
            return;
        }
        // Made on first use: most sessions never wait for a receipt.
        let receipts = self
            .receipts
            .get_or_insert_with(|| Arc::new(Receipts::new(self.outbox.clone())))
            .clone();
        let ticket = receipts.open(receipt, self.version, answers);
        if durable {
            let receipts = receipts.clone();
            // Only what is on disk is confirmed; either way the receipt no longer waits.
            let release = move |on_disk: bool| receipts.settle(ticket, on_disk, None);
            self.shared.router.after_durable(release);
        }
        for wait in waits {
            let receipts = receipts.clone();
            let outbox = self.outbox.clone();
            wait.then(move |settled| match settled {
                Ok(seq) => receipts.settle(ticket, true, seq),
                Err(end) => {
                    outbox.end(end);
                    receipts.settle(ticket, false, None);
                }
            });
        }
    }

    /// Whether RECEIPTs are still waiting for the store or the cluster (the connection
    /// waits for them before it closes after DISCONNECT).
    pub fn has_waiting_receipts(&self) -> bool {
        self.receipts.as_ref().is_some_and(|r| !r.is_idle())
    }

    /// The RECEIPTs that wait, to wait for them (none if none ever did).
    pub fn receipts(&self) -> Option<Arc<Receipts>> {
        self.receipts.clone()
    }

    fn dispatch(&mut self, frame: Frame) -> Result<Outcome, SessionError> {
        match (self.state, frame.command) {
            (
                _,
                c @ (Command::Connected | Command::Message | Command::Receipt | Command::Error),
            ) => Err(SessionError::ServerCommand(c)),
            (State::AwaitingConnect, Command::Connect | Command::Stomp) => self.on_connect(&frame),
            (State::AwaitingConnect, command) => Err(SessionError::NotConnected(command)),
            (_, Command::Connect | Command::Stomp) => Err(SessionError::AlreadyConnected),
            (State::Disconnected, command) => Err(SessionError::NotConnected(command)),
            (State::Connected, Command::Send) => self.on_send(frame).map(|()| Outcome::Continue),
            (State::Connected, Command::Subscribe) => {
                self.on_subscribe(&frame).map(|()| Outcome::Continue)
            }
            (State::Connected, Command::Unsubscribe) => {
                self.on_unsubscribe(&frame).map(|()| Outcome::Continue)
            }
            (State::Connected, Command::Ack | Command::Nack) => {
                self.on_ack(frame).map(|()| Outcome::Continue)
            }
            (State::Connected, Command::Begin) => self.on_begin(&frame).map(|()| Outcome::Continue),
            (State::Connected, Command::Commit) => {
                self.on_commit(&frame).map(|()| Outcome::Continue)
            }
            (State::Connected, Command::Abort) => self.on_abort(&frame).map(|()| Outcome::Continue),
            (State::Connected, Command::Disconnect) => Ok(self.on_disconnect()),
        }
    }

    fn reply(&self, frame: &Frame) {
        let mut buf = BytesMut::new();
        encode(frame, self.version, &mut buf);
        // A refusal marks the outbox slow; the connection task closes the connection.
        self.outbox.offer(Outgoing::Frame(buf.freeze()));
    }

    fn on_connect(&mut self, frame: &Frame) -> Result<Outcome, SessionError> {
        let accept = frame.header("accept-version");
        let version = Version::negotiate(accept, &Version::ALL).ok_or_else(|| {
            SessionError::UnsupportedVersion(accept.unwrap_or_default().to_owned())
        })?;
        // Version first: the ERROR for anything else below is written in it.
        self.version = version;
        let client_beat = frame
            .header("heart-beat")
            .map(HeartBeat::parse)
            .transpose()?
            .unwrap_or_default();
        self.user = match (&self.identity, frame.header("login")) {
            (Some(identity), _) => identity.name.clone(),
            (None, Some(login)) => check_user_name(login)?.into(),
            (None, None) => format!("guest-{}", self.id).into(),
        };
        if let Some(acl) = &self.shared.acl {
            let groups = self
                .identity
                .as_ref()
                .map_or_else(|| Arc::from([]), |identity| identity.groups.clone());
            self.viewer = Some(Arc::new(Viewer {
                name: self.user.clone(),
                groups,
                acl: acl.clone(),
            }));
        }
        if let Some(info) = &self.info {
            info.connected_as(&self.user);
        }
        let config = &self.shared.config;
        let server_beat = config.heart_beat;
        self.state = State::Connected;
        let limits = config.limits();
        let mut connected = Frame::new(Command::Connected)
            .with_header("version", version.as_str())
            .with_header("server", concat!("stoa/", env!("CARGO_PKG_VERSION")))
            .with_header("heart-beat", &server_beat.to_string())
            .with_header("session", &self.id.to_string())
            .with_header("user-name", &self.user);
        for (name, value) in [
            ("x-max-frame-bytes", limits.max_frame_bytes),
            ("x-max-body-bytes", limits.max_body_bytes),
            ("x-max-headers", limits.max_headers),
            ("x-max-header-line-bytes", limits.max_header_line_bytes),
            ("x-max-subscriptions", config.max_subscriptions),
        ] {
            connected.headers.push(name, &value.to_string());
        }
        self.reply(&connected);
        Ok(Outcome::Connected {
            version,
            send_interval_ms: server_beat.send_interval_ms(client_beat),
            receive_interval_ms: server_beat.receive_interval_ms(client_beat),
        })
    }

    fn on_send(&mut self, frame: Frame) -> Result<(), SessionError> {
        let destination = required(&frame, "destination")?;
        // Check the destination now, also inside a transaction, so COMMIT cannot fail on it.
        let (service, key) = self.shared.router.resolve(destination)?;
        service.check_send(key)?;
        self.check_access(Action::Publish, destination)?;
        if let Some(tx) = frame.header("transaction") {
            return self.hold(tx.to_owned(), frame);
        }
        self.published = Some(self.publish(&frame)?);
        Ok(())
    }

    /// With `--acl`, whether this user may do `action` with `destination`; a wildcard
    /// SUBSCRIBE needs only that some destination it matches could be allowed (its
    /// deliveries are checked one by one).
    fn check_access(&self, action: Action, destination: &str) -> Result<(), SessionError> {
        let Some(viewer) = &self.viewer else {
            return Ok(());
        };
        let acl = viewer.acl.get();
        let user = User {
            name: &viewer.name,
            groups: &viewer.groups,
        };
        let allowed = match (action, Destination::parse(destination)) {
            (Action::Subscribe, Destination::Topic(key)) if is_pattern(key) => {
                acl.may_watch(user, key)
            }
            _ => acl.allows(user, action, destination),
        };
        if allowed {
            Ok(())
        } else {
            Err(SessionError::AccessDenied(destination.to_owned()))
        }
    }

    fn publish(&mut self, frame: &Frame) -> Result<Published, SessionError> {
        let destination = required(frame, "destination")?;
        let router = &self.shared.router;
        let (service, key) = router.resolve(destination)?;
        let published = service.publish(PublishRequest {
            key,
            destination,
            frame,
            user: &self.user,
            message_id: router.ids.next(),
        })?;
        let metrics = &self.shared.metrics;
        metrics.messages_published.inc();
        metrics
            .messages_delivered
            .inc_by(published.fanout.delivered as u64);
        if published.fanout.refused > 0 {
            metrics
                .deliveries_dropped
                .inc_by(published.fanout.refused as u64);
        }
        self.durable_published |= published.durable;
        let mut published = published;
        if let Some(pending) = published.pending.take() {
            self.waits.push(pending);
        }
        Ok(published)
    }

    fn on_subscribe(&mut self, frame: &Frame) -> Result<(), SessionError> {
        let destination = required(frame, "destination")?;
        // 1.0 has no required `id`: the destination names the subscription.
        let id = match (frame.header("id"), self.version) {
            (Some(id), _) => id,
            (None, Version::V1_0) => destination,
            (None, _) => {
                return Err(SessionError::MissingHeader {
                    command: Command::Subscribe,
                    header: "id",
                });
            }
        };
        let ack = match frame.header("ack").unwrap_or("auto") {
            "auto" => AckMode::Auto,
            "client" => AckMode::Client,
            "client-individual" => AckMode::ClientIndividual,
            other => return Err(SessionError::InvalidAckMode(other.to_owned())),
        };
        let limit = self.shared.config.max_subscriptions;
        if self.subscriptions.len() >= limit {
            return Err(SessionError::TooManySubscriptions(limit));
        }
        if self.subscription_ids.contains_key(id) {
            return Err(SessionError::DuplicateSubscription(id.to_owned()));
        }
        let replay = replay_of(frame)?;
        let (service, key) = self.shared.router.resolve(destination)?;
        self.check_access(Action::Subscribe, destination)?;
        let sub_key = self.next_key;
        let mut head = BytesMut::new();
        encode_message_head(self.version, &[("subscription", id)], &mut head);
        // Queue deliveries are always tracked, so that ack:auto ones are settled as they are
        // written: that paces a backlog to the client's socket.
        let tracked = ack != AckMode::Auto || destination.starts_with("/queue/");
        let subscriber = Subscriber {
            session: self.id,
            key: sub_key,
            user: self.user.clone(),
            outbox: self.outbox.clone(),
            head: head.freeze(),
            version: self.version,
            needs_ack: tracked,
            viewer: self.viewer.clone(),
        };
        let pending = service.subscribe(SubscribeRequest {
            key,
            destination,
            subscriber: subscriber.clone(),
            replay,
            prefetch: prefetch_of(frame)?,
            presence: !self.reader,
        })?;
        self.waits.extend(pending);
        self.next_key = self.next_key.wrapping_add(1);
        self.subscription_ids.insert(id.to_owned(), sub_key);
        let destination: Arc<str> = Arc::from(destination);
        if let Some(info) = &self.info {
            info.subscribed(sub_key, &destination);
        }
        self.subscriptions.insert(
            sub_key,
            Box::new(Subscription {
                id: id.to_owned(),
                destination,
                subscriber,
                ack,
                unacked: VecDeque::new(),
            }),
        );
        Ok(())
    }

    fn on_unsubscribe(&mut self, frame: &Frame) -> Result<(), SessionError> {
        let id = match (
            frame.header("id"),
            frame.header("destination"),
            self.version,
        ) {
            (Some(id), _, _) => id,
            (None, Some(destination), Version::V1_0) => destination,
            _ => {
                return Err(SessionError::MissingHeader {
                    command: Command::Unsubscribe,
                    header: "id",
                });
            }
        };
        let key = self
            .subscription_ids
            .remove(id)
            .ok_or_else(|| SessionError::UnknownSubscription(id.to_owned()))?;
        if let Some(info) = &self.info {
            info.unsubscribed(key);
        }
        if let Some(sub) = self.subscriptions.remove(&key) {
            self.leave(&sub);
            // A replay still on its way to it stops here.
            self.outbox.cancel(key);
        }
        Ok(())
    }

    /// Finds the subscription and message an ACK or NACK names, per version:
    /// 1.2 `id` (the MESSAGE's `ack` header), 1.1 `message-id` and `subscription`,
    /// 1.0 `message-id` (and `subscription` if given).
    fn ack_target(&self, frame: &Frame) -> Result<(u32, u64), SessionError> {
        let command = frame.command;
        let missing = |header| SessionError::MissingHeader { command, header };
        if self.version == Version::V1_2 {
            let id = frame.header("id").ok_or_else(|| missing("id"))?;
            return parse_ack_id(id)
                .filter(|(key, message)| self.is_unacked(*key, *message))
                .ok_or_else(|| SessionError::UnknownAck(id.to_owned()));
        }
        let message_id = frame
            .header("message-id")
            .ok_or_else(|| missing("message-id"))?;
        let unknown = || SessionError::UnknownAck(message_id.to_owned());
        let message: u64 = message_id.parse().map_err(|_| unknown())?;
        let key = match frame.header("subscription") {
            Some(id) => *self
                .subscription_ids
                .get(id)
                .ok_or_else(|| SessionError::UnknownSubscription(id.to_owned()))?,
            None if self.version == Version::V1_0 => self
                .subscriptions
                .iter()
                .find(|(_, s)| s.unacked.contains(&message))
                .map(|(key, _)| *key)
                .ok_or_else(unknown)?,
            None => return Err(missing("subscription")),
        };
        if self.is_unacked(key, message) {
            Ok((key, message))
        } else {
            Err(unknown())
        }
    }

    fn is_unacked(&self, key: u32, message: u64) -> bool {
        self.subscriptions
            .get(&key)
            .is_some_and(|s| s.unacked.contains(&message))
    }

    fn on_ack(&mut self, frame: Frame) -> Result<(), SessionError> {
        let target = self.ack_target(&frame)?;
        if let Some(tx) = frame.header("transaction") {
            return self.hold(tx.to_owned(), frame);
        }
        self.settle(target, frame.command == Command::Ack);
        Ok(())
    }

    /// Applies an ACK (`ack`) or NACK: `client` mode settles everything delivered before the
    /// named message too (1.2 "SUBSCRIBE ack"). Topics deliver at most once, so there it just
    /// ends the wait; services that keep messages (queues) are told.
    fn settle(&mut self, (key, message): (u32, u64), ack: bool) {
        let Some(sub) = self.subscriptions.get_mut(&key) else {
            return;
        };
        let Some(pos) = sub.unacked.iter().position(|m| *m == message) else {
            return;
        };
        let ids: Vec<u64> = match sub.ack {
            AckMode::Client => sub.unacked.drain(..=pos).collect(),
            AckMode::ClientIndividual | AckMode::Auto => {
                sub.unacked.remove(pos).into_iter().collect()
            }
        };
        if let Ok((service, service_key)) = self.shared.router.resolve(&sub.destination) {
            service.settle(service_key, &sub.subscriber, &ids, ack);
        }
    }

    /// Records that a MESSAGE needing acknowledgement was written to the client.
    pub fn record_delivery(&mut self, tag: AckTag) {
        let limit = self.shared.config.max_unacked;
        let Some(sub) = self.subscriptions.get_mut(&tag.subscription) else {
            return;
        };
        if sub.ack == AckMode::Auto {
            // ack:auto on a queue: written is consumed, and the queue may send the next one.
            if let Ok((service, key)) = self.shared.router.resolve(&sub.destination) {
                service.settle(key, &sub.subscriber, &[tag.message_id], true);
            }
            return;
        }
        if sub.unacked.len() >= limit {
            sub.unacked.pop_front();
        }
        sub.unacked.push_back(tag.message_id);
    }

    fn hold(&mut self, tx: String, frame: Frame) -> Result<(), SessionError> {
        let limit = self.shared.config.max_transaction_frames;
        let held = self
            .transactions
            .get_mut(&tx)
            .ok_or_else(|| SessionError::UnknownTransaction(tx.clone()))?;
        if held.len() >= limit {
            return Err(SessionError::TransactionTooLarge {
                transaction: tx,
                limit,
            });
        }
        held.push(frame);
        Ok(())
    }

    fn on_begin(&mut self, frame: &Frame) -> Result<(), SessionError> {
        let tx = transaction_of(frame)?;
        let limit = self.shared.config.max_transactions;
        if self.transactions.contains_key(tx) {
            return Err(SessionError::DuplicateTransaction(tx.to_owned()));
        }
        if self.transactions.len() >= limit {
            return Err(SessionError::TooManyTransactions(limit));
        }
        self.transactions.insert(tx.to_owned(), Vec::new());
        Ok(())
    }

    fn on_commit(&mut self, frame: &Frame) -> Result<(), SessionError> {
        let tx = transaction_of(frame)?;
        let held = self
            .transactions
            .remove(tx)
            .ok_or_else(|| SessionError::UnknownTransaction(tx.to_owned()))?;
        for frame in held {
            match frame.command {
                Command::Send => {
                    self.publish(&frame)?;
                }
                // Checked when held; a message acknowledged since is simply settled already.
                _ => {
                    if let Ok(target) = self.ack_target(&frame) {
                        self.settle(target, frame.command == Command::Ack);
                    }
                }
            }
        }
        Ok(())
    }

    fn on_abort(&mut self, frame: &Frame) -> Result<(), SessionError> {
        let tx = transaction_of(frame)?;
        self.transactions
            .remove(tx)
            .map(drop)
            .ok_or_else(|| SessionError::UnknownTransaction(tx.to_owned()))
    }

    fn on_disconnect(&mut self) -> Outcome {
        // 1.2 "BEGIN": open transactions are aborted on DISCONNECT. Subscriptions end now
        // too: nothing may follow the DISCONNECT's RECEIPT, even one that waits for the
        // disk while live messages keep coming.
        self.close();
        Outcome::Disconnect
    }

    /// Ends the session: subscriptions leave the router, open transactions are aborted.
    pub fn close(&mut self) {
        let subscriptions: Vec<Box<Subscription>> =
            self.subscriptions.drain().map(|(_, s)| s).collect();
        for sub in &subscriptions {
            self.leave(sub);
        }
        self.subscription_ids.clear();
        if let Some(info) = &self.info {
            info.unsubscribed_all();
        }
        self.transactions.clear();
        self.state = State::Disconnected;
    }

    fn leave(&self, sub: &Subscription) {
        // It resolved when the subscription was made; destinations do not change meaning.
        if let Ok((service, key)) = self.shared.router.resolve(&sub.destination) {
            service.unsubscribe(key, &sub.subscriber);
        }
    }

    /// The client-visible id of a subscription, by its connection-local number.
    pub fn subscription_id(&self, key: u32) -> Option<&str> {
        self.subscriptions.get(&key).map(|s| s.id.as_str())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.close();
    }
}

fn required<'f>(frame: &'f Frame, header: &'static str) -> Result<&'f str, SessionError> {
    frame.header(header).ok_or(SessionError::MissingHeader {
        command: frame.command,
        header,
    })
}

fn transaction_of(frame: &Frame) -> Result<&str, SessionError> {
    required(frame, "transaction")
}

/// `prefetch-count` from a SUBSCRIBE: how many unacknowledged messages a queue consumer
/// may hold (RabbitMQ's header).
fn prefetch_of(frame: &Frame) -> Result<Option<usize>, SessionError> {
    frame
        .header("prefetch-count")
        .map(|v| {
            v.parse::<usize>()
                .map_err(|_| SessionError::InvalidPrefetch(v.to_owned()))
        })
        .transpose()
}

/// `x-history: N` or `x-since: SEQ` from a SUBSCRIBE (DESIGN.md "Rooms").
fn replay_of(frame: &Frame) -> Result<Replay, SessionError> {
    let number = |name: &str, value: &str| {
        value
            .parse::<u64>()
            .map_err(|_| SessionError::InvalidReplay(format!("{name} {value:?} is not a number")))
    };
    match (frame.header("x-history"), frame.header("x-since")) {
        (Some(_), Some(_)) => Err(SessionError::InvalidReplay(
            "x-history and x-since cannot be used together".into(),
        )),
        (Some(n), None) => Ok(Replay::Last(number("x-history", n)?)),
        (None, Some(seq)) => Ok(Replay::Since(number("x-since", seq)?)),
        (None, None) => Ok(Replay::None),
    }
}

/// The `ack` header value the writer puts on a MESSAGE: `<subscription number>-<message id>`.
pub fn write_ack_id(tag: AckTag, dst: &mut BytesMut) {
    let mut digits = itoa::Buffer::new();
    dst.extend_from_slice(digits.format(tag.subscription).as_bytes());
    dst.extend_from_slice(b"-");
    dst.extend_from_slice(digits.format(tag.message_id).as_bytes());
}

fn parse_ack_id(id: &str) -> Option<(u32, u64)> {
    let (key, message) = id.split_once('-')?;
    Some((key.parse().ok()?, message.parse().ok()?))
}
