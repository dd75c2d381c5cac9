//! What the broker counts, kept with prometheus-client and exposed at `/metrics` in the
//! OpenMetrics text format.
//!
//! In: increments from connections, sessions and the router (each a relaxed atomic add on a
//! handle made once: no lookup on the paths that carry messages). Out: the registry's text;
//! what is read at scrape time (rooms, queues, stores, the cluster) is added by the HTTP side
//! through [`Metrics::encode_with`].
//!
//! Labels are bounded: transports, STOMP commands and ERROR reasons are fixed sets; nothing
//! is labelled by room or user.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use stomp_codec::Command;

/// The label of a connection's transport (`tcp`, `ws`, `sockjs-xhr-streaming`, ...).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    /// How the client is connected.
    pub transport: &'static str,
}

/// The label of a STOMP command.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabel {
    command: &'static str,
}

/// The label of an ERROR's reason (the kind of error, not its text).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

/// A command's place in [`Command::ALL`]: its discriminant (declared in that order), so that
/// counting a frame is an index, not a search.
fn command_index(command: Command) -> usize {
    command as usize
}

/// Broker-wide counters and gauges.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    connections: Family<TransportLabel, Counter>,
    connections_open: Family<TransportLabel, Gauge>,
    /// Connections open now, all transports (for the cluster's node list).
    open_now: AtomicU64,
    frames_received: Vec<Counter>,
    frames_sent: Vec<Counter>,
    /// Bytes read from clients (STOMP bytes, after WebSocket or SockJS framing).
    pub bytes_received: Counter,
    /// Bytes written to clients (STOMP bytes, before WebSocket or SockJS framing).
    pub bytes_sent: Counter,
    /// SENDs that reached the router.
    pub messages_published: Counter,
    /// MESSAGE frames queued for subscribers.
    pub messages_delivered: Counter,
    /// Deliveries an outbox refused (its connection is closed as a slow consumer).
    pub deliveries_dropped: Counter,
    /// Connections closed as slow consumers.
    pub slow_consumers: Counter,
    /// Connections closed for missing heart-beats.
    pub heart_beat_timeouts: Counter,
    /// Logins and tokens refused (STOMP CONNECT and the HTTP API).
    pub authentication_failures: Counter,
    errors: Family<ReasonLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// Every metric at zero, registered under `stoa_`.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("stoa");
        let connections = Family::<TransportLabel, Counter>::default();
        registry.register(
            "connections",
            "Connections accepted, by transport",
            connections.clone(),
        );
        let connections_open = Family::<TransportLabel, Gauge>::default();
        registry.register(
            "connections_open",
            "Connections open now, by transport",
            connections_open.clone(),
        );
        let by_command = |registry: &mut Registry, name: &str, help: &str| {
            let family = Family::<CommandLabel, Counter>::default();
            registry.register(name, help, family.clone());
            Command::ALL
                .iter()
                .map(|c| {
                    family
                        .get_or_create(&CommandLabel {
                            command: c.as_str(),
                        })
                        .clone()
                })
                .collect::<Vec<_>>()
        };
        let frames_received = by_command(
            &mut registry,
            "frames_received",
            "STOMP frames received, by command",
        );
        let frames_sent = by_command(
            &mut registry,
            "frames_sent",
            "STOMP frames sent, by command",
        );
        let mut counter = |name: &str, help: &str| {
            let counter = Counter::default();
            registry.register(name, help, counter.clone());
            counter
        };
        let bytes_received = counter("received_bytes", "STOMP bytes read from clients");
        let bytes_sent = counter("sent_bytes", "STOMP bytes written to clients");
        let messages_published = counter("messages_published", "SENDs that reached the router");
        let messages_delivered = counter(
            "messages_delivered",
            "MESSAGE frames queued for subscribers",
        );
        let deliveries_dropped = counter(
            "deliveries_dropped",
            "Deliveries a full outbox refused (its connection is closed as a slow consumer)",
        );
        let slow_consumers = counter("slow_consumers", "Connections closed as slow consumers");
        let heart_beat_timeouts = counter(
            "heart_beat_timeouts",
            "Connections closed for missing heart-beats",
        );
        let authentication_failures = counter(
            "authentication_failures",
            "Logins and tokens refused, over STOMP and HTTP",
        );
        let errors = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "errors_sent",
            "ERROR frames sent, by reason",
            errors.clone(),
        );
        Metrics {
            registry,
            connections,
            connections_open,
            open_now: AtomicU64::new(0),
            frames_received,
            frames_sent,
            bytes_received,
            bytes_sent,
            messages_published,
            messages_delivered,
            deliveries_dropped,
            slow_consumers,
            heart_beat_timeouts,
            authentication_failures,
            errors,
        }
    }

    /// A connection over `transport` opened: its gauge, to be given back with
    /// [`Metrics::connection_closed`].
    pub fn connection_opened(&self, transport: &'static str) -> Gauge {
        let label = TransportLabel { transport };
        self.connections.get_or_create(&label).inc();
        let gauge = self.connections_open.get_or_create(&label).clone();
        gauge.inc();
        self.open_now.fetch_add(1, Ordering::Relaxed);
        gauge
    }

    /// The connection whose gauge this is closed.
    pub fn connection_closed(&self, gauge: &Gauge) {
        gauge.dec();
        self.open_now.fetch_sub(1, Ordering::Relaxed);
    }

    /// Connections open now, all transports.
    pub fn connections_open(&self) -> u64 {
        self.open_now.load(Ordering::Relaxed)
    }

    /// A frame received.
    pub fn frame_received(&self, command: Command) {
        if let Some(counter) = self.frames_received.get(command_index(command)) {
            counter.inc();
        }
    }

    /// `n` frames of `command` sent.
    pub fn frames_sent(&self, command: Command, n: u64) {
        if let Some(counter) = self.frames_sent.get(command_index(command)) {
            counter.inc_by(n);
        }
    }

    /// An ERROR sent for `reason` (the kind of error: a bounded set of names).
    pub fn error_sent(&self, reason: &str) {
        self.errors
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// The registry's text, then what `more` registers (read at scrape time), as one
    /// OpenMetrics page.
    pub fn encode_with(&self, more: &Registry) -> String {
        let mut page = String::new();
        let _ = prometheus_client::encoding::text::encode_registry(&mut page, &self.registry);
        let _ = prometheus_client::encoding::text::encode_registry(&mut page, more);
        let _ = prometheus_client::encoding::text::encode_eof(&mut page);
        page
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commands_index_is_its_place_in_the_list() {
        for (i, command) in Command::ALL.iter().enumerate() {
            assert_eq!(command_index(*command), i, "{command:?}");
        }
    }

    #[test]
    fn counts_show_on_the_page_with_bounded_labels() {
        let metrics = Metrics::new();
        let gauge = metrics.connection_opened("ws");
        metrics.frame_received(Command::Send);
        metrics.frame_received(Command::Send);
        metrics.frames_sent(Command::Message, 5);
        metrics.error_sent("AccessDenied");
        metrics.messages_delivered.inc_by(7);
        let page = metrics.encode_with(&Registry::default());
        assert!(
            page.contains("stoa_connections_total{transport=\"ws\"} 1"),
            "{page}"
        );
        assert!(
            page.contains("stoa_connections_open{transport=\"ws\"} 1"),
            "{page}"
        );
        assert!(
            page.contains("stoa_frames_received_total{command=\"SEND\"} 2"),
            "{page}"
        );
        assert!(
            page.contains("stoa_frames_sent_total{command=\"MESSAGE\"} 5"),
            "{page}"
        );
        assert!(
            page.contains("stoa_errors_sent_total{reason=\"AccessDenied\"} 1"),
            "{page}"
        );
        assert!(page.contains("stoa_messages_delivered_total 7"), "{page}");
        assert!(page.ends_with("# EOF\n"), "{page}");
        metrics.connection_closed(&gauge);
        assert_eq!(metrics.connections_open(), 0);
    }
}
