//! The combined report: both implementations' figures, Servant's as ratios to the
//! baseline's, each checked against its target; as JSON and as a table.

use std::fmt::Write as _;

use serde::Serialize;

use crate::{driver::ImplResult, memory::FullMeshMemory, params::Params, process::Machine};

/// Most a ratio to the baseline may be for the latency and CPU targets.
pub const MAX_RATIO: f64 = 1.5;
/// Most resident memory per idle connection endpoint, in bytes, with every Servant
/// behaviour on.
pub const MAX_BYTES_PER_IDLE_CONNECTION: f64 = 150_000.0;

/// One line of the comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// What is measured.
    pub metric: &'static str,
    /// Its unit.
    pub unit: &'static str,
    /// Servant's figure.
    pub servant: f64,
    /// The baseline's figure.
    pub baseline: f64,
    /// `servant / baseline`, when the baseline is not zero.
    pub ratio: Option<f64>,
    /// The target, in words; empty when the figure is for information.
    pub target: &'static str,
    /// Whether Servant met the target; absent when there is none.
    pub pass: Option<bool>,
}

impl Row {
    fn new(metric: &'static str, unit: &'static str, servant: f64, baseline: f64) -> Row {
        Row {
            metric,
            unit,
            servant,
            baseline,
            ratio: (baseline != 0.0).then(|| servant / baseline),
            target: "",
            pass: None,
        }
    }

    fn target(mut self, target: &'static str, pass: bool) -> Row {
        self.target = target;
        self.pass = Some(pass);
        self
    }

    fn ratio_at_most(self, target: &'static str, max: f64) -> Row {
        let pass = self.ratio.is_some_and(|r| r <= max);
        self.target(target, pass)
    }
}

/// Both implementations' full-mesh memory runs.
#[derive(Debug, Clone, Serialize)]
pub struct FullMesh {
    /// Servant's.
    pub servant: FullMeshMemory,
    /// The baseline's.
    pub baseline: FullMeshMemory,
}

/// The whole report, as written to the JSON file.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Which benchmark.
    pub benchmark: &'static str,
    /// When it finished, Unix seconds.
    pub finished_unix: u64,
    /// The machine.
    pub machine: Machine,
    /// The parameters.
    pub params: Params,
    /// The planned topology, before Servant ran on it.
    pub planned_edges: usize,
    /// How the comparison was made; read before the numbers.
    pub method: Vec<&'static str>,
    /// Servant versus baseline, row by row.
    pub comparison: Vec<Row>,
    /// Whether every target was met.
    pub all_targets_met: bool,
    /// Servant's full figures.
    pub servant: ImplResult,
    /// The baseline's full figures.
    pub baseline: ImplResult,
    /// Memory per idle connection on a full mesh (see `memory`).
    pub full_mesh: FullMesh,
}

/// The method, stated once in every report.
pub const METHOD: &[&str] = &[
    "Each implementation runs in its own child process (this binary re-executed), all nodes of it \
     in one multi-threaded tokio runtime with one worker per core; the process's CPU time \
     (getrusage) and resident memory (VmRSS) are that implementation's plus the shared harness.",
    "Topology: a seeded random graph with min..max degree is planned; Servant's nodes start with \
     no bootnodes and client.connect() dials every planned edge. The graph Servant actually had \
     when the load began (its own discovery and trimming included) is read back with \
     client.peers() and given, edge for edge and dialer for dialer, to the baseline.",
    "Load: publishers take turns at a fixed total rate; each message's latency runs from the \
     moment the harness asks a node to publish until another node's application receives it \
     (Servant: a client.subscribe() receiver; baseline: gossipsub's Message event).",
    "Delivery ratio = distinct deliveries / (messages x (nodes - 1)). Duplicates = gossipsub's \
     topic_msg_recv_counts_unfiltered minus topic_msg_recv_counts, summed over nodes, per \
     first receipt.",
    "CPU per 1000 deliveries = process CPU seconds from the first publish until everything \
     arrived (at most drain_secs after the last publish) / deliveries x 1000. When an \
     implementation keeps every core busy it is saturated: its latency is queueing, and it \
     sheds duplicates (gossipsub drops stale queued messages), so compare at a lower --rate.",
    "Memory per idle connection (the target) is measured in a third and fourth child, one per \
     implementation: every pair of the nodes connected up front (a full mesh, Servant's \
     watermarks set to it), idle for idle_secs; (RSS then - RSS with every node started and \
     subscribed but unconnected) / connection endpoints (2 per connection). In the sparse load \
     topology a Servant node's first Kademlia lookups reach most of a 50-node network before \
     its watermarks trim it back, and that heap stays resident: the 'cold start' rows show \
     that growth per final connection (raw, and after malloc_trim(0)), for information.",
    "Both sides wait (up to quiet_wait_secs) for other processes to leave the CPU before they \
     start; 'other processes' cores busy' shows what they took during the load window. \
     Latency is only comparable when both are near zero; CPU seconds per delivery much less \
     depends on it.",
    "The baseline's gossipsub has no validate_messages(): it forwards on arrival, while Servant \
     forwards after its event loop checked the envelope (JSON, id, origin, age, duplicates).",
];

/// Builds the comparison rows.
pub fn compare(
    servant: &ImplResult,
    baseline: &ImplResult,
    mesh: &FullMesh,
    nodes: usize,
) -> Vec<Row> {
    let (s, b) = (servant, baseline);
    let nodes = nodes.max(1) as f64;
    let complete = s.delivery.deliveries == s.delivery.expected && s.delivery.expected > 0;
    vec![
        Row::new(
            "delivery ratio",
            "%",
            s.delivery.delivery_ratio * 100.0,
            b.delivery.delivery_ratio * 100.0,
        )
        .target("100%", complete),
        Row::new(
            "p50 to last node",
            "ms",
            s.delivery.to_last_node_ms.p50,
            b.delivery.to_last_node_ms.p50,
        ),
        Row::new(
            "p99 to last node",
            "ms",
            s.delivery.to_last_node_ms.p99,
            b.delivery.to_last_node_ms.p99,
        )
        .ratio_at_most("<= 1.5x baseline", MAX_RATIO),
        Row::new(
            "max to last node",
            "ms",
            s.delivery.to_last_node_ms.max,
            b.delivery.to_last_node_ms.max,
        ),
        Row::new(
            "p50 per delivery",
            "ms",
            s.delivery.per_delivery_ms.p50,
            b.delivery.per_delivery_ms.p50,
        ),
        Row::new(
            "duplicates per delivery",
            "",
            s.duplicates.per_delivery,
            b.duplicates.per_delivery,
        ),
        Row::new(
            "CPU per 1000 deliveries",
            "s",
            s.cpu.per_1000_deliveries,
            b.cpu.per_1000_deliveries,
        )
        .ratio_at_most("<= 1.5x baseline", MAX_RATIO),
        Row::new(
            "cores busy under load",
            "",
            s.cpu.cores_busy_under_load,
            b.cpu.cores_busy_under_load,
        ),
        Row::new(
            "other processes' cores busy",
            "",
            s.cpu.other_cores_busy_under_load,
            b.cpu.other_cores_busy_under_load,
        ),
        Row::new(
            "cores busy idle",
            "",
            s.cpu.cores_busy_idle,
            b.cpu.cores_busy_idle,
        ),
        Row::new(
            "RSS per idle connection, full mesh",
            "KB",
            mesh.servant.per_idle_connection / 1000.0,
            mesh.baseline.per_idle_connection / 1000.0,
        )
        .target(
            "< 150 KB",
            mesh.servant.per_idle_connection < MAX_BYTES_PER_IDLE_CONNECTION,
        ),
        Row::new(
            "RSS growth per connection, cold start",
            "KB",
            s.memory.per_idle_connection / 1000.0,
            b.memory.per_idle_connection / 1000.0,
        ),
        Row::new(
            "  same, heap trimmed",
            "KB",
            s.memory.per_idle_connection_trimmed / 1000.0,
            b.memory.per_idle_connection_trimmed / 1000.0,
        ),
        Row::new(
            "connections",
            "",
            s.topology.connections as f64,
            b.topology.connections as f64,
        ),
        Row::new(
            "connections opened per node",
            "",
            s.counters.connections_established / nodes,
            b.counters.connections_established / nodes,
        ),
        Row::new(
            "mean mesh peers",
            "",
            s.topology.mesh.mean,
            b.topology.mesh.mean,
        ),
    ]
}

/// A figure with as many digits as are worth reading.
pub fn number(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else if v.abs() >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

/// One table row: the metric with its unit, Servant's figure, the reference figure,
/// their ratio, the target and the verdict.
pub fn cells(
    metric: &str,
    unit: &str,
    value: f64,
    reference: f64,
    ratio: Option<f64>,
    target: &str,
    pass: Option<bool>,
) -> [String; 6] {
    let unit = if unit.is_empty() {
        String::new()
    } else {
        format!(" ({unit})")
    };
    [
        format!("{metric}{unit}"),
        number(value),
        number(reference),
        ratio.map_or("-".into(), |r| format!("{r:.2}x")),
        if target.is_empty() {
            "-".into()
        } else {
            target.into()
        },
        match pass {
            Some(true) => "PASS".into(),
            Some(false) => "FAIL".into(),
            None => String::new(),
        },
    ]
}

/// Writes `lines` (the first is the header) as aligned columns, text left and
/// numbers right, with a rule under the header.
pub fn write_table<const N: usize>(out: &mut String, lines: &[[String; N]]) {
    let mut widths = [0usize; N];
    for line in lines {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.len());
        }
    }
    for (i, line) in lines.iter().enumerate() {
        let cells: Vec<String> = line
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(c, (cell, w))| {
                if c == 0 || c >= 4 {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
        if i == 0 {
            let total = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
            let _ = writeln!(out, "{}", "-".repeat(total));
        }
    }
}

/// The human table.
pub fn table(report: &Report) -> String {
    let header = ["metric", "Servant", "baseline", "ratio", "target", "result"];
    let mut lines: Vec<[String; 6]> = vec![header.map(String::from)];
    for row in &report.comparison {
        lines.push(cells(
            row.metric,
            row.unit,
            row.servant,
            row.baseline,
            row.ratio,
            row.target,
            row.pass,
        ));
    }
    let p = &report.params;
    let m = &report.machine;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "gossip: {} nodes, {} planned edges ({}..{} peers), {} msg/s from {} publishers for {} s, {} B bodies",
        p.nodes, report.planned_edges, p.min_degree, p.max_degree, p.rate, p.publishers, p.secs, p.body_bytes
    );
    let _ = writeln!(
        out,
        "machine: {} cores, {}, kernel {}{}",
        m.nproc,
        m.cpu_model,
        m.kernel,
        if m.release_build {
            ""
        } else {
            ", DEBUG BUILD (numbers meaningless)"
        }
    );
    let settled = |r: &ImplResult| {
        if r.settling.settled {
            "settled"
        } else {
            "DID NOT SETTLE"
        }
    };
    let _ = writeln!(
        out,
        "graph before the load: Servant {}, baseline {} (same edges: {})",
        settled(&report.servant),
        settled(&report.baseline),
        crate::topology::pairs(&report.servant.topology.edges)
            == crate::topology::pairs(&report.baseline.topology.edges)
    );
    let busy = report
        .servant
        .cpu
        .other_cores_busy_under_load
        .max(report.baseline.cpu.other_cores_busy_under_load);
    if busy > p.quiet_cores {
        let _ = writeln!(
            out,
            "WARNING: other processes kept up to {busy:.2} cores busy during a load window; \
             latencies are inflated"
        );
    }
    for r in [&report.servant, &report.baseline] {
        if r.cpu.cores_busy_under_load >= 0.9 * m.nproc.max(1) as f64 {
            let _ = writeln!(
                out,
                "WARNING: {} kept {:.2} of {} cores busy under load: saturated, latency is \
                 queueing; try a lower --rate",
                r.implementation, r.cpu.cores_busy_under_load, m.nproc
            );
        }
    }
    let _ = writeln!(out);
    write_table(&mut out, &lines);
    let _ = writeln!(
        out,
        "\n{}",
        if report.all_targets_met {
            "all targets met"
        } else {
            "TARGETS MISSED"
        }
    );
    out
}
