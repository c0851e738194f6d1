//! One Prometheus registry for the node: libp2p-metrics' `libp2p_*` families, the
//! transport's bandwidth counters and Servant's own `servant_*` families.
//!
//! No label value is ever chosen by a remote peer: topics appear only if this node
//! subscribes to them (everything else is `other`), and reasons are fixed strings.
//! That keeps the number of series bounded whatever the network sends.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::Histogram,
        MetricType,
    },
    registry::{Registry, Unit},
};

/// Label for families counted per topic.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabel {
    /// A topic this node subscribes to, or `other`.
    pub topic: String,
}

/// Label for rejected messages.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabel {
    /// A topic this node subscribes to, or `other`.
    pub topic: String,
    /// A fixed reason (`malformed`, `too_old`, `duplicate`, ...).
    pub reason: &'static str,
}

/// Label for connection counts.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabel {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// `tcp`, `quic` or `other`.
    pub transport: &'static str,
}

/// Label for counters keyed by a fixed reason.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// A fixed reason.
    pub reason: &'static str,
}

/// Label for dials, by why they were made.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DialLabel {
    /// `bootnode`, `known`, `discovered` or `api`.
    pub purpose: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabel {
    version: String,
}

/// Servant's own metric families, cheap to clone (each is an `Arc` inside).
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Peers with at least one established connection.
    pub connected_peers: Gauge,
    /// Established connections by direction and transport.
    pub connections: Family<ConnectionLabel, Gauge>,
    /// Broadcasts this node published.
    pub messages_published: Family<TopicLabel, Counter>,
    /// Broadcasts received from the network and delivered to local subscribers.
    pub messages_received: Family<TopicLabel, Counter>,
    /// Broadcasts refused, by reason.
    pub messages_rejected: Family<RejectLabel, Counter>,
    /// Peers in the Kademlia routing table.
    pub routing_table_peers: Gauge,
    /// Peers remembered in the data dir.
    pub known_peers: Gauge,
    /// 1 once a Kademlia bootstrap has succeeded, 0 before.
    pub bootstrapped: Gauge,
    /// Kademlia bootstrap runs, by result.
    pub bootstrap_runs: Family<ReasonLabel, Counter>,
    /// Dials started, by purpose.
    pub dials: Family<DialLabel, Counter>,
    /// Dial failures, by purpose.
    pub dial_failures: Family<DialLabel, Counter>,
    /// Connections refused by the deny lists or the limits, by reason.
    pub connections_denied: Family<ReasonLabel, Counter>,
    /// Connections this node closed to stay under the high watermark.
    pub peers_trimmed: Counter,
    /// Connections closed because the peer stopped answering pings.
    pub ping_failures: Counter,
    /// Time from a broadcast's origin time to its delivery here.
    pub message_latency: Histogram,
    /// 1 when `/readyz` answers ready.
    pub ready: Gauge,
}

impl Metrics {
    /// Registers every family in `registry` under the `servant_` prefix.
    pub fn register(registry: &mut Registry) -> Metrics {
        let metrics = Metrics {
            connected_peers: Gauge::default(),
            connections: Family::default(),
            messages_published: Family::default(),
            messages_received: Family::default(),
            messages_rejected: Family::default(),
            routing_table_peers: Gauge::default(),
            known_peers: Gauge::default(),
            bootstrapped: Gauge::default(),
            bootstrap_runs: Family::default(),
            dials: Family::default(),
            dial_failures: Family::default(),
            connections_denied: Family::default(),
            peers_trimmed: Counter::default(),
            ping_failures: Counter::default(),
            message_latency: Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            ready: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("servant");
        r.register(
            "connected_peers",
            "Peers with at least one established connection",
            metrics.connected_peers.clone(),
        );
        r.register(
            "connections",
            "Established connections by direction and transport",
            metrics.connections.clone(),
        );
        r.register(
            "messages_published",
            "Broadcasts published by this node, by topic",
            metrics.messages_published.clone(),
        );
        r.register(
            "messages_received",
            "Broadcasts received and delivered, by topic",
            metrics.messages_received.clone(),
        );
        r.register(
            "messages_rejected",
            "Broadcasts refused, by topic and reason",
            metrics.messages_rejected.clone(),
        );
        r.register(
            "routing_table_peers",
            "Peers in the Kademlia routing table",
            metrics.routing_table_peers.clone(),
        );
        r.register(
            "known_peers",
            "Peers remembered in the data dir for the next start",
            metrics.known_peers.clone(),
        );
        r.register(
            "bootstrapped",
            "1 once a Kademlia bootstrap has succeeded",
            metrics.bootstrapped.clone(),
        );
        r.register(
            "bootstrap_runs",
            "Kademlia bootstrap runs, by result",
            metrics.bootstrap_runs.clone(),
        );
        r.register("dials", "Dials started, by purpose", metrics.dials.clone());
        r.register(
            "dial_failures",
            "Dials that failed, by purpose",
            metrics.dial_failures.clone(),
        );
        r.register(
            "connections_denied",
            "Connections refused by deny lists or limits, by reason",
            metrics.connections_denied.clone(),
        );
        r.register(
            "peers_trimmed",
            "Connections closed to stay under the high watermark",
            metrics.peers_trimmed.clone(),
        );
        r.register(
            "ping_failures",
            "Connections closed because the peer stopped answering pings",
            metrics.ping_failures.clone(),
        );
        r.register_with_unit(
            "message_latency",
            "Time from a broadcast's origin time to its delivery here",
            Unit::Seconds,
            metrics.message_latency.clone(),
        );
        r.register(
            "ready",
            "1 when the node reports ready",
            metrics.ready.clone(),
        );
        let build = Family::<BuildLabel, ConstGauge>::new_with_constructor(|| ConstGauge::new(1));
        let _ = build.get_or_create(&BuildLabel {
            version: crate::VERSION.to_string(),
        });
        r.register("build_info", "Build of this node (always 1)", build);
        registry.register_collector(Box::new(ProcessCollector::new()));
        metrics
    }
}

/// Process figures read from `/proc` on every scrape: resident memory, open file
/// descriptors and start time, under their conventional `process_*` names.
#[derive(Debug)]
struct ProcessCollector {
    start_time: u64,
    started: Instant,
}

impl ProcessCollector {
    fn new() -> Self {
        ProcessCollector {
            start_time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            started: Instant::now(),
        }
    }
}

/// Resident memory of this process in bytes, from `/proc/self/statm`.
pub fn resident_memory_bytes() -> Option<u64> {
    // SAFETY: sysconf has no preconditions; it returns -1 on an unknown name.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page)
}

/// Open file descriptors of this process, from `/proc/self/fd`.
pub fn open_fds() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(rss) = resident_memory_bytes() {
            let gauge = ConstGauge::new(rss as i64);
            let metric = encoder.encode_descriptor(
                "process_resident_memory",
                "Resident memory of the node process",
                Some(&Unit::Bytes),
                gauge.metric_type(),
            )?;
            gauge.encode(metric)?;
        }
        if let Some(fds) = open_fds() {
            let gauge = ConstGauge::new(fds as i64);
            let metric = encoder.encode_descriptor(
                "process_open_fds",
                "Open file descriptors of the node process",
                None,
                gauge.metric_type(),
            )?;
            gauge.encode(metric)?;
        }
        let start = ConstGauge::new(self.start_time as i64);
        let metric = encoder.encode_descriptor(
            "process_start_time",
            "Start time of the node process since the Unix epoch",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        start.encode(metric)?;
        let uptime = ConstGauge::new(self.started.elapsed().as_secs() as i64);
        let metric = encoder.encode_descriptor(
            "servant_uptime",
            "Seconds since the node started",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        uptime.encode(metric)?;
        Ok(())
    }
}
