//! One implementation's run, the same phases for Servant and the baseline: start
//! the nodes, measure memory, connect along the given edges, wait for the mesh,
//! idle, measure memory again, put the load on, wait for stragglers, read the
//! gossipsub counters.
//!
//! Each implementation runs in a child process of its own, so the process's CPU
//! time and resident memory belong to that implementation (and this harness,
//! which is the same for both).

use std::{
    collections::BTreeMap,
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::{
    load::{self, DeliveryStats, Key, Recorders, Sent},
    openmetrics,
    params::Params,
    process,
    topology::{self, Degrees, Edge},
};

/// How the nodes look from inside, one entry per node.
#[derive(Debug, Clone)]
pub struct NodeView {
    /// Connected peers subscribed to the topic.
    pub topic_peers: usize,
    /// Of those, the node's gossipsub mesh.
    pub mesh_peers: usize,
    /// Established connections.
    pub connections: usize,
    /// Connected peers by index, with whether this node dialed.
    pub peers: Vec<(usize, bool)>,
}

/// Counters summed over all nodes at the end of the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Counters {
    /// Gossipsub messages received including duplicates.
    pub received_unfiltered: f64,
    /// Gossipsub messages received the first time.
    pub received_first: f64,
    /// Messages gossipsub gave up sending because a peer's queue was full or stale.
    pub failed_messages: f64,
    /// Connections established since start, counted at both ends.
    pub connections_established: f64,
    /// Implementation-specific counters (Servant: dials by purpose, trims, DHT queries).
    pub other: BTreeMap<String, f64>,
}

impl Counters {
    /// Adds gossipsub's receive and failure counters from one node's metrics text.
    pub fn add_gossipsub(&mut self, text: &str) {
        self.received_unfiltered += openmetrics::sum(
            text,
            "libp2p_gossipsub_topic_msg_recv_counts_unfiltered_total",
        );
        self.received_first +=
            openmetrics::sum(text, "libp2p_gossipsub_topic_msg_recv_counts_total");
        self.failed_messages += openmetrics::sum(text, "libp2p_gossipsub_failed_messages_sum");
    }
}

/// A network of one implementation, driven through the same calls.
pub trait BenchNet: Sized {
    /// Starts every node, listening and subscribed, recording deliveries into
    /// `recorders`; nothing is connected yet.
    async fn start(params: &Params, recorders: Arc<Recorders>) -> Result<Self>;
    /// Dials every edge and returns once all are connected.
    async fn connect(&self, edges: &[Edge]) -> Result<()>;
    /// Every node's view.
    async fn views(&self) -> Result<Vec<NodeView>>;
    /// Publishes `body` from `node`; the future is spawned and yields the key.
    fn publish(
        &self,
        node: usize,
        body: String,
    ) -> impl Future<Output = Result<Key, String>> + Send + 'static;
    /// Gossipsub's receive counters.
    async fn counters(&self) -> Result<Counters>;
    /// Stops everything.
    async fn shutdown(self);
}

/// Time spent in each phase before the load.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Timings {
    /// Starting every node.
    pub start_secs: f64,
    /// Dialing every edge.
    pub connect_secs: f64,
    /// From connected until meshes formed and connections held still (or the
    /// settle timeout).
    pub settle_secs: f64,
}

/// How the network came to rest before the load.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settling {
    /// Whether every mesh formed and the connection count held still for
    /// [`STABLE_POLLS`] polls a second apart before the settle timeout.
    pub settled: bool,
    /// Connection endpoints at each poll, for judging churn.
    pub endpoints: Vec<usize>,
}

/// Polls, a second apart, with an unchanged connection count that count as settled.
/// Longer than Servant's trim grace (10 s) plus a tick, so a network still trimming
/// the connections of its first DHT lookups is not taken for a settled one.
pub const STABLE_POLLS: usize = 6;

/// The graph the run used.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Topology {
    /// The connections when the load started, `(dialer, listener)`.
    pub edges: Vec<Edge>,
    /// Their count.
    pub connections: usize,
    /// Connection endpoints the nodes reported (two per connection).
    pub endpoints: usize,
    /// Peers per node.
    pub degrees: Degrees,
    /// Mesh peers per node when the load started.
    pub mesh: Degrees,
    /// Given edges that were not connected at the start of the load.
    pub given_missing: usize,
    /// Connections at the start of the load that were not given.
    pub given_extra: usize,
    /// Pairs connected at the end of the load and not at its start, and the reverse.
    pub churn_during_load: usize,
}

/// Gossipsub's duplicates.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Duplicates {
    /// Received copies beyond the first.
    pub duplicates: f64,
    /// `duplicates / received_first`.
    pub per_delivery: f64,
}

/// CPU use of the whole process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cpu {
    /// From the first publish until every message was delivered everywhere, or
    /// `drain_secs` after the last publish, whichever came first.
    pub load_window_secs: f64,
    /// CPU seconds in that window.
    pub load_cpu_secs: f64,
    /// `load_cpu_secs / deliveries * 1000`.
    pub per_1000_deliveries: f64,
    /// `load_cpu_secs / load_window_secs`.
    pub cores_busy_under_load: f64,
    /// Cores busy with other processes during the load window (the machine's busy
    /// time minus this process's): contention that inflates latency.
    pub other_cores_busy_under_load: f64,
    /// Cores other processes kept busy just before this implementation started.
    #[serde(default)]
    pub other_cores_busy_before: f64,
    /// Cores busy while the connected network idled before the load.
    pub cores_busy_idle: f64,
    /// The machine's 1-minute load average when the load began.
    pub loadavg_at_load: f64,
    /// CPU seconds starting the nodes.
    pub start_cpu_secs: f64,
}

/// Resident memory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Memory {
    /// Every node started and subscribed, nothing connected.
    pub rss_before_connect: u64,
    /// Connected, mesh formed, idle for the settle time.
    pub rss_connected_idle: u64,
    /// Connection endpoints at that moment.
    pub endpoints: usize,
    /// `(rss_connected_idle - rss_before_connect) / endpoints`.
    pub per_idle_connection: f64,
    /// The same two readings taken right after each, with freed heap pages handed
    /// back to the kernel first (`malloc_trim`): what live state costs, without the
    /// fragmentation that connection churn leaves behind.
    pub rss_before_connect_trimmed: u64,
    /// See `rss_before_connect_trimmed`.
    pub rss_connected_idle_trimmed: u64,
    /// `(rss_connected_idle_trimmed - rss_before_connect_trimmed) / endpoints`.
    pub per_idle_connection_trimmed: f64,
    /// After the load.
    pub rss_after_load: u64,
    /// The process's peak.
    pub rss_peak: u64,
}

/// Everything one implementation measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImplResult {
    /// `servant` or `baseline`.
    pub implementation: String,
    /// What exactly ran.
    pub description: String,
    /// Phase durations.
    pub timings: Timings,
    /// Whether the graph held still before the load.
    pub settling: Settling,
    /// Counters at the end.
    pub counters: Counters,
    /// The graph.
    pub topology: Topology,
    /// Deliveries and latency.
    pub delivery: DeliveryStats,
    /// Duplicates.
    pub duplicates: Duplicates,
    /// CPU.
    pub cpu: Cpu,
    /// Memory.
    pub memory: Memory,
}

fn log(name: &str, what: impl std::fmt::Display) {
    eprintln!("[{name}] {what}");
}

/// Runs every phase on a fresh network of `N` connected along `edges`.
pub async fn run<N: BenchNet>(
    name: &str,
    description: &str,
    params: &Params,
    edges: &[Edge],
) -> Result<ImplResult> {
    let recorders = Arc::new(Recorders::new(params.nodes));
    let cpu0 = process::cpu_seconds()?;
    let started = Instant::now();
    let net = N::start(params, recorders.clone()).await?;
    let start_secs = started.elapsed().as_secs_f64();
    let start_cpu_secs = process::cpu_seconds()? - cpu0;
    log(
        name,
        format!("{} nodes started in {start_secs:.1} s", params.nodes),
    );

    // Let start-up allocations and timers settle before the unconnected baseline.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before = process::rss()?.now;
    process::trim_heap();
    let rss_before_trimmed = process::rss()?.now;

    let connecting = Instant::now();
    net.connect(edges).await?;
    let connect_secs = connecting.elapsed().as_secs_f64();
    log(
        name,
        format!("{} edges connected in {connect_secs:.2} s", edges.len()),
    );

    let settling_t0 = Instant::now();
    let max_peers = (params.conn_high as usize).max(params.max_degree);
    let settling = settle(
        &net,
        name,
        Duration::from_secs(params.settle_timeout_secs),
        max_peers,
    )
    .await?;
    let settle_secs = settling_t0.elapsed().as_secs_f64();
    if settling.settled {
        log(
            name,
            format!("meshes formed, connections still, after {settle_secs:.1} s"),
        );
    } else {
        log(
            name,
            format!(
                "WARNING: not settled after {settle_secs:.1} s (connection endpoints per second: {:?}); measuring anyway",
                settling.endpoints
            ),
        );
    }

    let idle_cpu0 = process::cpu_seconds()?;
    let idle_t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(params.idle_secs)).await;
    let cores_busy_idle =
        (process::cpu_seconds()? - idle_cpu0) / idle_t0.elapsed().as_secs_f64().max(1e-9);
    let rss_connected = process::rss()?.now;
    process::trim_heap();
    let rss_connected_trimmed = process::rss()?.now;
    let views = net.views().await?;
    let endpoints: usize = views.iter().map(|v| v.connections).sum();
    let peers: Vec<Vec<(usize, bool)>> = views.iter().map(|v| v.peers.clone()).collect();
    let used_edges = topology::from_views(&peers);
    let mesh = mesh_degrees(&views);
    let given = topology::pairs(edges);
    let used = topology::pairs(&used_edges);
    log(
        name,
        format!(
            "idle: {endpoints} connection endpoints, RSS {:.1} MB -> {:.1} MB, {cores_busy_idle:.2} cores busy",
            rss_before as f64 / 1e6,
            rss_connected as f64 / 1e6
        ),
    );

    // The load.
    log(
        name,
        format!(
            "load: {} messages of {} B body at {}/s from {} nodes",
            params.messages(),
            params.body_bytes,
            params.rate,
            params.publishers
        ),
    );
    let publishers = load::publisher_nodes(params.nodes, params.publishers);
    let total = params.messages();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(params.rate)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let loadavg_at_load = process::loadavg();
    let machine0 = process::machine_busy_seconds()?;
    let cpu_load0 = process::cpu_seconds()?;
    let load_t0 = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for seq in 0..total {
        tick.tick().await;
        let node = publishers[(seq % publishers.len() as u64) as usize];
        let body = load::body(seq, params.body_bytes);
        let at = Instant::now();
        let publish = net.publish(node, body);
        tasks.push(tokio::spawn(async move {
            let key = publish.await;
            Sent { node, at, key }
        }));
    }
    let mut sent = Vec::with_capacity(tasks.len());
    for task in tasks {
        match task.await {
            Ok(s) => sent.push(s),
            Err(e) => bail!("a publish task failed: {e}"),
        }
    }
    let load_end = Instant::now();
    let ok = sent.iter().filter(|s| s.key.is_ok()).count();
    let want = ok * (params.nodes - 1);
    // CPU until everything arrived (so a backlog's work counts), or the drain time.
    let drain_deadline = load_end + Duration::from_secs(params.drain_secs);
    while recorders.total() < want && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let load_window_secs = load_t0.elapsed().as_secs_f64();
    let load_cpu_secs = process::cpu_seconds()? - cpu_load0;
    let machine_busy = process::machine_busy_seconds()? - machine0;
    let other_cores_busy_under_load =
        ((machine_busy - load_cpu_secs) / load_window_secs.max(1e-9)).max(0.0);
    let delivery = load::analyse(
        params.nodes,
        &sent,
        &recorders.snapshot(),
        recorders.lagged(),
    );
    log(
        name,
        format!(
            "delivered {}/{} ({:.4}%), to last node p50 {:.2} ms p99 {:.2} ms, {load_cpu_secs:.2} CPU s in {load_window_secs:.2} s",
            delivery.deliveries,
            delivery.expected,
            delivery.delivery_ratio * 100.0,
            delivery.to_last_node_ms.p50,
            delivery.to_last_node_ms.p99
        ),
    );

    let counters = net.counters().await?;
    let after = net.views().await?;
    let after_peers: Vec<Vec<(usize, bool)>> = after.iter().map(|v| v.peers.clone()).collect();
    let after_pairs = topology::pairs(&topology::from_views(&after_peers));
    let churn_during_load = used.symmetric_difference(&after_pairs).count();
    let rss_after = process::rss()?;
    net.shutdown().await;

    let duplicates = counters.received_unfiltered - counters.received_first;
    let per_delivery = if counters.received_first > 0.0 {
        duplicates / counters.received_first
    } else {
        0.0
    };
    Ok(ImplResult {
        implementation: name.to_string(),
        description: description.to_string(),
        timings: Timings {
            start_secs,
            connect_secs,
            settle_secs,
        },
        settling,
        topology: Topology {
            connections: used_edges.len(),
            endpoints,
            degrees: topology::degrees(params.nodes, &used_edges),
            mesh,
            given_missing: given.difference(&used).count(),
            given_extra: used.difference(&given).count(),
            churn_during_load,
            edges: used_edges,
        },
        cpu: Cpu {
            load_window_secs,
            load_cpu_secs,
            per_1000_deliveries: if delivery.deliveries == 0 {
                0.0
            } else {
                load_cpu_secs / delivery.deliveries as f64 * 1000.0
            },
            cores_busy_under_load: load_cpu_secs / load_window_secs.max(1e-9),
            other_cores_busy_under_load,
            other_cores_busy_before: 0.0,
            cores_busy_idle,
            loadavg_at_load,
            start_cpu_secs,
        },
        delivery,
        counters,
        duplicates: Duplicates {
            duplicates,
            per_delivery,
        },
        memory: Memory {
            rss_before_connect: rss_before,
            rss_connected_idle: rss_connected,
            endpoints,
            per_idle_connection: per_endpoint(rss_before, rss_connected, endpoints),
            rss_before_connect_trimmed: rss_before_trimmed,
            rss_connected_idle_trimmed: rss_connected_trimmed,
            per_idle_connection_trimmed: per_endpoint(
                rss_before_trimmed,
                rss_connected_trimmed,
                endpoints,
            ),
            rss_after_load: rss_after.now,
            rss_peak: rss_after.peak,
        },
    })
}

fn per_endpoint(before: u64, after: u64, endpoints: usize) -> f64 {
    if endpoints == 0 {
        0.0
    } else {
        (after as f64 - before as f64) / endpoints as f64
    }
}

fn mesh_degrees(views: &[NodeView]) -> Degrees {
    let sizes: Vec<usize> = views.iter().map(|v| v.mesh_peers).collect();
    Degrees {
        min: sizes.iter().copied().min().unwrap_or(0),
        max: sizes.iter().copied().max().unwrap_or(0),
        mean: sizes.iter().sum::<usize>() as f64 / sizes.len().max(1) as f64,
    }
}

/// Waits until every node has peers on the topic and holds at least `mesh_n_low` of
/// them in its mesh (or all, if fewer), no node has more than `max_peers` peers (a
/// Servant node above its high watermark is still trimming), and the connection count
/// held still for [`STABLE_POLLS`] polls; or until `timeout`.
pub async fn settle<N: BenchNet>(
    net: &N,
    name: &str,
    timeout: Duration,
    max_peers: usize,
) -> Result<Settling> {
    let mesh_n_low = libp2p::gossipsub::Config::default().mesh_n_low();
    let deadline = Instant::now() + timeout;
    let mut history = Vec::new();
    let mut still = 0;
    loop {
        let views = net.views().await?;
        let endpoints: usize = views.iter().map(|v| v.connections).sum();
        let formed = views.iter().all(|v| {
            v.topic_peers >= 1
                && v.mesh_peers >= mesh_n_low.min(v.topic_peers)
                && v.peers.len() <= max_peers
        });
        still = if history.last() == Some(&endpoints) {
            still + 1
        } else {
            1
        };
        history.push(endpoints);
        if formed && still >= STABLE_POLLS {
            return Ok(Settling {
                settled: true,
                endpoints: history,
            });
        }
        if Instant::now() > deadline {
            let unsubscribed = views
                .iter()
                .filter(|v| v.topic_peers != v.peers.len())
                .count();
            let thin = views
                .iter()
                .filter(|v| v.mesh_peers < mesh_n_low.min(v.topic_peers))
                .count();
            log(
                name,
                format!(
                    "at the settle timeout: {thin} nodes below {mesh_n_low} mesh peers, \
                     {unsubscribed} with connected peers not (yet) on the topic"
                ),
            );
            return Ok(Settling {
                settled: false,
                endpoints: history,
            });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
