//! One Prometheus registry for the node: libp2p-metrics' `libp2p_*` families, the
//! transport's bandwidth counters and Servant's own `servant_*` families.
//!
//! No label value is ever chosen by a remote peer: topics appear only if this node
//! subscribes to them (everything else is `other`), and reasons are fixed strings.
//! That keeps the number of series bounded whatever the network sends.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
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

/// Label for a family split by one of Servant's protocols (a fixed name).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabel {
    /// A fixed name: `gossipsub` or `file`, or one of [`crate::stream_count::KNOWN`].
    pub protocol: &'static str,
}

/// Label for dials, by why they were made.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DialLabel {
    /// `bootnode`, `known`, `discovered` or `api`; failures also `protocol` (dials
    /// libp2p's behaviours made themselves).
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
    /// Peers reconnected because they restarted behind a connection we still held.
    pub peer_restarts: Counter,
    /// Peers disconnected for not reading what the node sent, by protocol.
    pub slow_peers_dropped: Family<ProtocolLabel, Counter>,
    /// Open streams, by the protocol their opener proposed first.
    pub streams: crate::stream_count::StreamGauge,
    /// Provider records pushed by peers that the store refused (over its caps).
    pub kad_provider_records_refused: Counter,
    /// Time from a broadcast's origin time to its delivery here.
    pub message_latency: Histogram,
    /// 1 when `/readyz` answers ready.
    pub ready: Gauge,
    /// File sharing and search.
    pub files: FileMetrics,
    /// Reachability, roles, relays and hole punching.
    pub nat: NatMetrics,
}

/// Label for one-hot state gauges.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// A fixed state name.
    pub state: &'static str,
}

/// Reachability, role, relay and hole-punch families.
#[derive(Debug, Clone)]
pub struct NatMetrics {
    /// 1 for the current reachability verdict (`public`, `private`, `unknown`).
    pub reachability: Family<StateLabel, Gauge>,
    /// 1 for the current role (`super`, `peer`, `undecided`).
    pub role: Family<StateLabel, Gauge>,
    /// Reachability probes of our addresses, by outcome.
    pub probes: Family<ReasonLabel, Counter>,
    /// Dial-backs this node's AutoNAT server made for others, by result (`ok`,
    /// `error`, `throttled`).
    pub dial_backs_served: Family<ReasonLabel, Counter>,
    /// Relay reservations this node holds on super-peers (accepted).
    pub reservations_held: Gauge,
    /// Relay reservations that ended and were replaced.
    pub reservations_replaced: Counter,
    /// Reservations this node's relay holds for others.
    pub reservations_served: Gauge,
    /// Relay requests this node refused, by kind (`reservation`, `circuit`).
    pub relay_denied: Family<ReasonLabel, Counter>,
    /// Circuits this node's relay carries now.
    pub circuits_served: Gauge,
    /// Reads of circuit streams held back by the data profile's per-peer rate.
    pub relay_throttle_waits: Counter,
    /// Hole punches attempted (DCUtR on a relayed connection).
    pub holepunch_attempts: Counter,
    /// Hole-punch outcomes, by result (`direct`, `failed`).
    pub holepunch_results: Family<ReasonLabel, Counter>,
    /// Seconds from a relayed connection to the direct one that replaced it.
    pub time_to_direct: Histogram,
    /// Ports the local gateway forwards to this node by UPnP.
    pub upnp_mappings: Gauge,
}

impl NatMetrics {
    fn register(r: &mut Registry) -> NatMetrics {
        let m = NatMetrics {
            reachability: Family::default(),
            role: Family::default(),
            probes: Family::default(),
            dial_backs_served: Family::default(),
            reservations_held: Gauge::default(),
            reservations_replaced: Counter::default(),
            reservations_served: Gauge::default(),
            relay_denied: Family::default(),
            circuits_served: Gauge::default(),
            relay_throttle_waits: Counter::default(),
            holepunch_attempts: Counter::default(),
            holepunch_results: Family::default(),
            time_to_direct: Histogram::new([0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]),
            upnp_mappings: Gauge::default(),
        };
        r.register(
            "upnp_mappings",
            "Ports the local gateway forwards to this node by UPnP",
            m.upnp_mappings.clone(),
        );
        for state in ["public", "private", "unknown"] {
            m.reachability.get_or_create(&StateLabel { state }).set(0);
        }
        for role in crate::role::Role::ALL {
            m.role
                .get_or_create(&StateLabel {
                    state: role.as_str(),
                })
                .set(0);
        }
        r.register(
            "reachability",
            "1 for the current reachability verdict",
            m.reachability.clone(),
        );
        r.register("role", "1 for the current role", m.role.clone());
        r.register(
            "reach_probes",
            "Reachability probes of this node's addresses, by outcome",
            m.probes.clone(),
        );
        r.register(
            "autonat_dial_backs_served",
            "Dial-backs made for other peers, by result",
            m.dial_backs_served.clone(),
        );
        r.register(
            "relay_reservations_held",
            "Relay reservations this node holds on super-peers",
            m.reservations_held.clone(),
        );
        r.register(
            "relay_reservations_replaced",
            "Relay reservations that ended and were replaced",
            m.reservations_replaced.clone(),
        );
        r.register(
            "relay_reservations_served",
            "Reservations this node's relay holds for other peers",
            m.reservations_served.clone(),
        );
        r.register(
            "relay_denied",
            "Relay requests refused, by kind",
            m.relay_denied.clone(),
        );
        r.register(
            "relay_circuits_served",
            "Circuits this node's relay carries",
            m.circuits_served.clone(),
        );
        r.register(
            "relay_throttle_waits",
            "Reads of circuit streams held back by relay_rate_per_peer",
            m.relay_throttle_waits.clone(),
        );
        r.register(
            "holepunch_attempts",
            "Hole punches attempted on relayed connections",
            m.holepunch_attempts.clone(),
        );
        r.register(
            "holepunch_results",
            "Hole-punch outcomes, by result",
            m.holepunch_results.clone(),
        );
        r.register_with_unit(
            "time_to_direct",
            "Time from a relayed connection to the direct one that replaced it",
            Unit::Seconds,
            m.time_to_direct.clone(),
        );
        m
    }

    /// Sets the one-hot reachability and role gauges.
    pub fn set_state(&self, reachability: &'static str, role: &'static str) {
        for state in ["public", "private", "unknown"] {
            self.reachability
                .get_or_create(&StateLabel { state })
                .set(i64::from(state == reachability));
        }
        for r in crate::role::Role::ALL {
            self.role
                .get_or_create(&StateLabel { state: r.as_str() })
                .set(i64::from(r.as_str() == role));
        }
    }
}

/// File sharing and search families (`servant_file_*`, `servant_store_*`,
/// `servant_search_*`).
#[derive(Debug, Clone)]
pub struct FileMetrics {
    /// Chunk and manifest bytes sent to other peers.
    pub bytes_served: Counter,
    /// Chunk bytes received, verified and stored.
    pub bytes_fetched: Counter,
    /// Chunks whose hash matched the manifest.
    pub chunks_verified: Counter,
    /// Chunks refused because their hash did not match (the provider lied).
    pub chunks_rejected: Counter,
    /// Requests served, by outcome (`chunk`, `manifest`, `not_found`, `busy`, `bad_request`).
    pub requests_served: Family<ReasonLabel, Counter>,
    /// Fetches under way.
    pub active_fetches: Gauge,
    /// Fetches finished, by result.
    pub fetches: Family<ReasonLabel, Counter>,
    /// Providers that delivered at least one chunk, per finished fetch.
    pub providers_per_fetch: Histogram,
    /// Bytes of chunk blocks in the store.
    pub store_bytes: Gauge,
    /// Contents in the store, complete or not.
    pub store_contents: Gauge,
    /// Contents this node announces as provider in the DHT.
    pub provided: Gauge,
    /// Fetched contents evicted to stay within the quota.
    pub store_evictions: Counter,
    /// Search queries answered from this node's shares.
    pub search_answered: Counter,
    /// Search queries forwarded to other peers (one per peer sent to).
    pub search_forwarded: Counter,
    /// Search messages dropped by the per-peer rate limit.
    pub search_rate_limited: Counter,
    /// Search hits received for this node's own queries or passed back towards askers.
    pub search_hits: Family<ReasonLabel, Counter>,
    /// Penalties given to peers for misbehaviour, by reason.
    pub peer_penalties: Family<ReasonLabel, Counter>,
    /// Requests our codecs refused as malformed, by protocol (`file`, `search`).
    pub malformed_frames: Family<ReasonLabel, Counter>,
}

impl FileMetrics {
    fn register(r: &mut Registry) -> FileMetrics {
        let m = FileMetrics {
            bytes_served: Counter::default(),
            bytes_fetched: Counter::default(),
            chunks_verified: Counter::default(),
            chunks_rejected: Counter::default(),
            requests_served: Family::default(),
            active_fetches: Gauge::default(),
            fetches: Family::default(),
            providers_per_fetch: Histogram::new([1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0]),
            store_bytes: Gauge::default(),
            store_contents: Gauge::default(),
            provided: Gauge::default(),
            store_evictions: Counter::default(),
            search_answered: Counter::default(),
            search_forwarded: Counter::default(),
            search_rate_limited: Counter::default(),
            search_hits: Family::default(),
            peer_penalties: Family::default(),
            malformed_frames: Family::default(),
        };
        r.register_with_unit(
            "file_served",
            "Manifest and chunk bytes sent to other peers",
            Unit::Bytes,
            m.bytes_served.clone(),
        );
        r.register_with_unit(
            "file_fetched",
            "Chunk bytes received, verified and stored",
            Unit::Bytes,
            m.bytes_fetched.clone(),
        );
        r.register(
            "file_chunks_verified",
            "Fetched chunks whose hash matched the manifest",
            m.chunks_verified.clone(),
        );
        r.register(
            "file_chunks_rejected",
            "Fetched chunks refused because their hash did not match",
            m.chunks_rejected.clone(),
        );
        r.register(
            "file_requests_served",
            "File requests answered, by outcome",
            m.requests_served.clone(),
        );
        r.register(
            "file_active_fetches",
            "Fetches under way",
            m.active_fetches.clone(),
        );
        r.register(
            "file_fetches",
            "Fetches finished, by result",
            m.fetches.clone(),
        );
        r.register(
            "file_providers_per_fetch",
            "Providers that delivered chunks, per finished fetch",
            m.providers_per_fetch.clone(),
        );
        r.register_with_unit(
            "store",
            "Bytes of chunk blocks in the content store",
            Unit::Bytes,
            m.store_bytes.clone(),
        );
        r.register(
            "store_contents",
            "Contents in the store, complete or not",
            m.store_contents.clone(),
        );
        r.register(
            "store_provided",
            "Contents this node announces as provider in the DHT",
            m.provided.clone(),
        );
        r.register(
            "store_evictions",
            "Fetched contents evicted to stay within the store quota",
            m.store_evictions.clone(),
        );
        r.register(
            "search_answered",
            "Search queries answered from this node's shares",
            m.search_answered.clone(),
        );
        r.register(
            "search_forwarded",
            "Search queries forwarded, one per peer sent to",
            m.search_forwarded.clone(),
        );
        r.register(
            "search_rate_limited",
            "Search messages dropped by the per-peer rate limit",
            m.search_rate_limited.clone(),
        );
        r.register(
            "search_hits",
            "Search hits: delivered to a local search or passed back towards the asker",
            m.search_hits.clone(),
        );
        r.register(
            "peer_penalties",
            "Penalties given to peers for misbehaviour, by reason",
            m.peer_penalties.clone(),
        );
        r.register(
            "malformed_frames",
            "Requests refused as malformed by the file and search codecs, by protocol",
            m.malformed_frames.clone(),
        );
        m
    }
}

impl Metrics {
    /// Registers every family in `registry` under the `servant_` prefix.
    pub fn register(registry: &mut Registry) -> Metrics {
        let files = FileMetrics::register(registry.sub_registry_with_prefix("servant"));
        let nat = NatMetrics::register(registry.sub_registry_with_prefix("servant"));
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
            peer_restarts: Counter::default(),
            slow_peers_dropped: Family::default(),
            streams: Family::default(),
            kad_provider_records_refused: Counter::default(),
            message_latency: Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            ready: Gauge::default(),
            files,
            nat,
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
        r.register(
            "peer_restarts",
            "Peers reconnected afresh because they restarted behind a connection still held",
            metrics.peer_restarts.clone(),
        );
        r.register(
            "kad_provider_records_refused",
            "Provider records pushed by peers that the store refused (over its caps)",
            metrics.kad_provider_records_refused.clone(),
        );
        for protocol in crate::stream_count::KNOWN.iter().chain([
            &crate::stream_count::NEGOTIATING,
            &crate::stream_count::OTHER,
        ]) {
            metrics
                .streams
                .get_or_create(&ProtocolLabel { protocol })
                .set(0);
        }
        r.register(
            "streams",
            "Open streams, by the protocol proposed first \
             (negotiating: none yet; other: one Servant does not speak)",
            metrics.streams.clone(),
        );
        r.register(
            "slow_peers_dropped",
            "Peers disconnected for not reading what the node sent, by protocol",
            metrics.slow_peers_dropped.clone(),
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
            start_time: crate::clock::unix_secs(),
            started: Instant::now(),
        }
    }
}

/// Resident memory of this process in bytes, from `/proc/self/statm`.
pub fn resident_memory_bytes() -> Option<u64> {
    Some(resident_memory()?.total)
}

/// Resident memory in bytes, all of it and the part backed by no file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resident {
    /// Every resident page.
    pub total: u64,
    /// Pages backed by no file: heaps, stacks, anonymous maps. The rest are shared
    /// pages, here those of the executable and libraries, read in the first time a
    /// code path runs: bounded by those files' size, and the kernel can drop them.
    pub anon: u64,
}

/// This process's resident memory, from `/proc/self/statm` (resident and shared
/// pages).
pub fn resident_memory() -> Option<Resident> {
    // SAFETY: sysconf has no preconditions; it returns -1 on an unknown name.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let mut fields = statm.split_whitespace().skip(1);
    let resident: u64 = fields.next()?.parse().ok()?;
    let shared: u64 = fields.next()?.parse().ok()?;
    Some(Resident {
        total: resident * page,
        anon: resident.saturating_sub(shared) * page,
    })
}

/// Open file descriptors of this process, from `/proc/self/fd`.
pub fn open_fds() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Memory figures, all gauges in bytes: resident memory (all of it and the
        // anonymous part) and, where the allocator is glibc's, what its heaps hold.
        let mut bytes: Vec<(&str, &str, u64)> = Vec::with_capacity(5);
        if let Some(rss) = resident_memory() {
            bytes.push((
                "process_resident_memory",
                "Resident memory of the node process",
                rss.total,
            ));
            bytes.push((
                "servant_resident_anon_memory",
                "Resident memory of the node process backed by no file (heaps, stacks)",
                rss.anon,
            ));
        }
        if let Some(heap) = crate::allocator::heap() {
            bytes.push((
                "servant_heap_in_use",
                "Bytes the allocator has handed out from its heaps and not had back",
                heap.in_use,
            ));
            bytes.push((
                "servant_heap_mapped",
                "Bytes of large blocks the allocator mapped one by one (resident once written)",
                heap.mapped,
            ));
            bytes.push((
                "servant_heap_free",
                "Freed bytes the allocator keeps in its heaps instead of returning them",
                heap.free,
            ));
        }
        for (name, help, value) in bytes {
            let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
            let metric =
                encoder.encode_descriptor(name, help, Some(&Unit::Bytes), gauge.metric_type())?;
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
        let suppressed = ConstCounter::new(crate::log_limit::suppressed());
        let metric = encoder.encode_descriptor(
            "servant_log_lines_suppressed",
            "Log lines dropped by the per-callsite rate limit",
            None,
            suppressed.metric_type(),
        )?;
        suppressed.encode(metric)?;
        // The runtime serving this scrape is the node's: `servant run` has one, and
        // a task that outlives its connection or request shows up here.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let tasks = ConstGauge::new(runtime.metrics().num_alive_tasks() as i64);
            let metric = encoder.encode_descriptor(
                "servant_tokio_alive_tasks",
                "Tasks alive in the node's tokio runtime",
                None,
                tasks.metric_type(),
            )?;
            tasks.encode(metric)?;
        }
        let panics = ConstCounter::new(PANICS.load(Ordering::Relaxed));
        let metric = encoder.encode_descriptor(
            "servant_panics",
            "Panics in any thread of the process since it started",
            None,
            panics.metric_type(),
        )?;
        panics.encode(metric)?;
        Ok(())
    }
}

static PANICS: AtomicU64 = AtomicU64::new(0);

/// Counts every panic in `servant_panics_total`, then hands it to the hook that was
/// there before (the standard one prints the message and location to stderr, where
/// the logs go). The `servant` binary installs it; a library embedding [`Node`]
/// keeps its own process-wide hook unless it calls this.
///
/// The hook does not log through `tracing`: a panic inside the subscriber, with its
/// rate-limit lock held, would deadlock there.
///
/// [`Node`]: crate::Node
pub fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::Relaxed);
        previous(info);
    }));
}
