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

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};
use stomp_codec::Command;

/// The upper bounds of [`LatencyHistogram`]'s buckets, in microseconds (then `+Inf`).
const LATENCY_BOUNDS_US: [u64; 17] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// A latency histogram of plain atomics: observing is three relaxed adds and no lock (the
/// prometheus-client histogram takes a mutex per observation, which the write path of every
/// connection would contend on). Exposed through prometheus-client as a histogram.
#[derive(Debug, Clone, Default)]
pub struct LatencyHistogram {
    inner: Arc<LatencyInner>,
}

#[derive(Debug, Default)]
struct LatencyInner {
    /// Per bucket (not cumulative); the last is `+Inf`.
    buckets: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

/// A histogram's counts at one moment: per bucket (not cumulative), the last `+Inf`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LatencyCounts(pub Vec<u64>);

impl LatencyHistogram {
    /// Counts one latency.
    pub fn observe(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let index = LATENCY_BOUNDS_US
            .iter()
            .position(|&bound| us <= bound)
            .unwrap_or(LATENCY_BOUNDS_US.len());
        let inner = &self.inner;
        inner.buckets[index].fetch_add(1, Ordering::Relaxed);
        inner.count.fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        inner.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn counts(&self) -> LatencyCounts {
        LatencyCounts(
            self.inner
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
        )
    }
}

impl LatencyCounts {
    /// What was counted since `earlier`.
    pub fn since(&self, earlier: &LatencyCounts) -> LatencyCounts {
        LatencyCounts(
            self.0
                .iter()
                .enumerate()
                .map(|(i, n)| n.saturating_sub(earlier.0.get(i).copied().unwrap_or(0)))
                .collect(),
        )
    }

    /// The `q` quantile (0 to 1) in seconds, interpolated within its bucket as Prometheus's
    /// `histogram_quantile` does; `None` when nothing was counted. Past the last bound, the
    /// last bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total: u64 = self.0.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut below = 0u64;
        for (i, &n) in self.0.iter().enumerate() {
            if n > 0 && (below + n) as f64 >= rank {
                let Some(&upper) = LATENCY_BOUNDS_US.get(i) else {
                    return LATENCY_BOUNDS_US.last().map(|&b| b as f64 / 1e6);
                };
                let lower = if i == 0 { 0 } else { LATENCY_BOUNDS_US[i - 1] };
                let within = (rank - below as f64) / n as f64;
                return Some((lower as f64 + (upper - lower) as f64 * within) / 1e6);
            }
            below += n;
        }
        None
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let counts = self.counts();
        let buckets: Vec<(f64, u64)> = counts
            .0
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let bound = LATENCY_BOUNDS_US
                    .get(i)
                    .map_or(f64::INFINITY, |&us| us as f64 / 1e6);
                (bound, n)
            })
            .collect();
        // Read after the buckets: the count and sum may be a little ahead of them, never
        // behind.
        let count = self.inner.count.load(Ordering::Relaxed);
        let sum = self.inner.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

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

/// What the dashboard reads every second: the open connections, and counters whose
/// differences are its rates.
#[derive(Debug, Clone, Default)]
pub struct Reading {
    /// Connections open now.
    pub connections: u64,
    /// SENDs that reached the router.
    pub published: u64,
    /// MESSAGE frames written to clients.
    pub written: u64,
    /// Connections closed as slow consumers.
    pub slow_consumers: u64,
    /// ERROR frames sent.
    pub errors: u64,
    /// The delivery latency histogram's counts.
    pub latency: LatencyCounts,
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
    /// From a MESSAGE's queueing for a connection (its publish) to the end of the write
    /// that carries it: the oldest MESSAGE of each write that empties the outbox.
    pub delivery_latency: LatencyHistogram,
    errors: Family<ReasonLabel, Counter>,
    /// Every ERROR sent, all reasons (for the dashboard's chart).
    errors_total: Counter,
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
        let delivery_latency = LatencyHistogram::default();
        registry.register_with_unit(
            "delivery_latency",
            "From a message's publish to the end of the write that carries it to a \
             subscriber (the oldest message of each write)",
            Unit::Seconds,
            delivery_latency.clone(),
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
            delivery_latency,
            errors,
            errors_total: Counter::default(),
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
        self.errors_total.inc();
        self.errors
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// The figures the dashboard charts, now.
    pub fn reading(&self) -> Reading {
        let sent_messages = self
            .frames_sent
            .get(command_index(Command::Message))
            .map_or(0, Counter::get);
        Reading {
            connections: self.connections_open(),
            published: self.messages_published.get(),
            written: sent_messages,
            slow_consumers: self.slow_consumers.get(),
            errors: self.errors_total.get(),
            latency: self.delivery_latency.counts(),
        }
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
    fn latencies_land_in_their_buckets_and_quantiles_come_from_the_differences() {
        let histogram = LatencyHistogram::default();
        let before = histogram.counts();
        for _ in 0..90 {
            histogram.observe(Duration::from_micros(80));
        }
        for _ in 0..10 {
            histogram.observe(Duration::from_millis(20));
        }
        histogram.observe(Duration::from_secs(60));
        let counts = histogram.counts().since(&before);
        assert_eq!(counts.0[1], 90, "50-100 us");
        assert_eq!(counts.0[8], 10, "10-25 ms");
        assert_eq!(counts.0[LATENCY_BOUNDS_US.len()], 1, "+Inf");
        let p50 = counts.quantile(0.5).unwrap();
        assert!((50e-6..=100e-6).contains(&p50), "{p50}");
        let p95 = counts.quantile(0.95).unwrap();
        assert!((10e-3..=25e-3).contains(&p95), "{p95}");
        assert_eq!(counts.quantile(1.0), Some(10.0), "past the last bound");
        assert_eq!(LatencyCounts::default().quantile(0.5), None);
    }

    #[test]
    fn the_latency_histogram_is_an_openmetrics_histogram() {
        let metrics = Metrics::new();
        metrics.delivery_latency.observe(Duration::from_micros(300));
        let page = metrics.encode_with(&Registry::default());
        assert!(
            page.contains("# TYPE stoa_delivery_latency_seconds histogram"),
            "{page}"
        );
        assert!(
            page.contains("stoa_delivery_latency_seconds_bucket{le=\"0.00025\"} 0"),
            "{page}"
        );
        assert!(
            page.contains("stoa_delivery_latency_seconds_bucket{le=\"0.0005\"} 1"),
            "{page}"
        );
        assert!(
            page.contains("stoa_delivery_latency_seconds_bucket{le=\"+Inf\"} 1"),
            "{page}"
        );
        assert!(
            page.contains("stoa_delivery_latency_seconds_count 1"),
            "{page}"
        );
    }

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
