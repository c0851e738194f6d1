//! The `files` report: every run's figures, the medians compared, each target
//! checked; as JSON and as a table.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use crate::{
    files::{per_gib, FilesParams},
    files_node::{FetchTrace, ServantProcess},
    files_stream::ClientResult,
    process::Machine,
};

/// Least Servant's single-provider throughput may be, as a share of the bare stream's.
pub const MIN_SINGLE_RATIO: f64 = 0.8;
/// Least the throughput from all providers may be, as a multiple of one provider's.
pub const MIN_SCALING: f64 = 3.5;

/// The method, stated once in every report.
pub const METHOD: &[&str] = &[
    "Loopback, one provider: two `servant run` processes (the release binary, default settings), \
     data dirs and files on tmpfs (/dev/shm) so no disk is involved. The provider shares a \
     generated file of pseudo-random bytes; the fetcher has the provider as its only bootnode and \
     is connected before anything is timed. A fetch is POST /v1/fetch with an output path on \
     tmpfs, timed from sending the request to the `finished` event: provider lookup, manifest, \
     every chunk (verified, written to the store), and the export copy to the output path. \
     Between repeats the fetcher unshares the content so every fetch starts from nothing.",
    "Baseline: the same number of bytes over one stream of a bare libp2p Swarm (libp2p-stream \
     only) between two processes of this binary, on the same transport with Servant's settings \
     (TCP nodelay, noise, yamux defaults; or QUIC), timed from opening the stream to the last \
     byte read. No disk, no hashing, no per-chunk requests: the ceiling of the transport.",
    "The two take turns in one run (baseline, Servant, baseline, ...), each after waiting for a \
     quiet CPU; the table shows each side's median run; the JSON has every run.",
    "CPU: utime+stime of each process from /proc/<pid>/stat (10 ms ticks), before and after the \
     transfer; per GiB of the file. The baseline client measures itself (getrusage) over the \
     transfer only.",
    "'into the store only': each round also fetches with no output path (the API allows it), \
     so the node verifies and stores every chunk but writes no output file: the difference \
     from the fetch to a file is the export copy (every block read, hashed again and written \
     to the output).",
    "'others' = cores busy with anything but the measured processes during a run (machine busy \
     time from /proc/stat, steal included, less their CPU): other work on a shared machine.",
    "Multi-source (root only): a fetcher namespace with a bridge and one namespace per provider, \
     each provider's veth egress limited with tbf to the same rate. The providers share the same \
     file (same content id); provider 1 is the bootnode of the fetcher and of the other \
     providers; the fetcher must see every provider connected before the fetch (through its \
     bootnode and the DHT; if not within 30 s it is told to connect, and the report says so). \
     A fresh fetcher fetches from provider 1 alone, then another from all providers; in the \
     namespaces the fetch is `servant fetch --json` run inside the fetcher's namespace.",
    "The link check is a bare stream through one shaped link: what one provider's link carries.",
];

/// One Servant fetch over loopback.
#[derive(Debug, Clone, Serialize)]
pub struct ServantRun {
    /// What the client saw.
    pub trace: FetchTrace,
    /// Throughput from request to `finished`, Gbit/s.
    pub gbit_per_sec: f64,
    /// Throughput by the node's own `elapsed_ms`, Gbit/s.
    pub node_gbit_per_sec: f64,
    /// The fetcher's CPU seconds over the fetch.
    pub fetcher_cpu_secs: f64,
    /// The provider's CPU seconds over the fetch.
    pub provider_cpu_secs: f64,
    /// `fetcher_cpu_secs` per GiB fetched.
    pub fetcher_cpu_per_gib: f64,
    /// `provider_cpu_secs` per GiB served.
    pub provider_cpu_per_gib: f64,
    /// Cores other processes kept busy just before.
    pub other_cores_busy_before: f64,
    /// Cores busy with anything but the two nodes during the fetch (this harness,
    /// other processes, the hypervisor's steal).
    pub other_cores_busy_during: f64,
}

impl ServantRun {
    /// Derives the rates from one fetch and the CPU it cost.
    pub fn new(trace: FetchTrace, fetcher_cpu: f64, provider_cpu: f64, others: f64) -> Self {
        let bits = trace.size as f64 * 8.0;
        ServantRun {
            gbit_per_sec: bits / trace.wall_secs.max(1e-9) / 1e9,
            node_gbit_per_sec: bits / (trace.node_elapsed_ms.max(1) as f64 / 1e3) / 1e9,
            fetcher_cpu_secs: fetcher_cpu,
            provider_cpu_secs: provider_cpu,
            fetcher_cpu_per_gib: per_gib(fetcher_cpu, trace.size),
            provider_cpu_per_gib: per_gib(provider_cpu, trace.size),
            other_cores_busy_before: others,
            other_cores_busy_during: 0.0,
            trace,
        }
    }
}

/// One bare-stream transfer.
#[derive(Debug, Clone, Serialize)]
pub struct BaselineRun {
    /// What the client measured.
    pub client: ClientResult,
    /// Gbit/s.
    pub gbit_per_sec: f64,
    /// The server's CPU seconds while the client ran.
    pub server_cpu_secs: f64,
    /// The client's CPU seconds per GiB received.
    pub client_cpu_per_gib: f64,
    /// The server's CPU seconds per GiB sent.
    pub server_cpu_per_gib: f64,
    /// Cores other processes kept busy just before.
    pub other_cores_busy_before: f64,
    /// Cores busy with anything but the two processes during the transfer.
    pub other_cores_busy_during: f64,
}

impl BaselineRun {
    /// Derives the rates from one transfer.
    pub fn new(client: &ClientResult, server_cpu: f64, others: f64) -> Self {
        BaselineRun {
            gbit_per_sec: client.bytes as f64 * 8.0 / client.secs.max(1e-9) / 1e9,
            server_cpu_secs: server_cpu,
            client_cpu_per_gib: per_gib(client.cpu_secs, client.bytes),
            server_cpu_per_gib: per_gib(server_cpu, client.bytes),
            other_cores_busy_before: others,
            other_cores_busy_during: 0.0,
            client: client.clone(),
        }
    }
}

/// One provider over loopback on one transport.
#[derive(Debug, Clone, Serialize)]
pub struct SingleResult {
    /// `TCP` or `QUIC`.
    pub transport: &'static str,
    /// Bytes per fetch.
    pub size: u64,
    /// Seconds the provider took to import (share) the file.
    pub import_secs: f64,
    /// Servant's median run (by throughput).
    pub servant: ServantRun,
    /// The baseline's median run.
    pub baseline: BaselineRun,
    /// `servant.gbit_per_sec / baseline.gbit_per_sec`.
    pub ratio: f64,
    /// Servant's median fetch into the store only (no output path, no export copy).
    pub store_only: ServantRun,
    /// Every store-only fetch.
    pub store_only_runs: Vec<ServantRun>,
    /// Every Servant run.
    pub servant_runs: Vec<ServantRun>,
    /// Every baseline run.
    pub baseline_runs: Vec<BaselineRun>,
    /// Request counters of both nodes after all runs.
    pub metrics: BTreeMap<String, f64>,
}

/// The median by `key` (the lower middle one of an even count).
fn median<T: Clone>(runs: &[T], key: impl Fn(&T) -> f64) -> Option<T> {
    let mut sorted: Vec<&T> = runs.iter().collect();
    sorted.sort_by(|a, b| key(a).total_cmp(&key(b)));
    sorted
        .get(sorted.len().saturating_sub(1) / 2)
        .map(|r| (*r).clone())
}

impl SingleResult {
    /// Picks the medians and derives the ratio.
    pub fn new(
        transport: &'static str,
        size: u64,
        import_secs: f64,
        servant_runs: Vec<ServantRun>,
        store_only_runs: Vec<ServantRun>,
        baseline_runs: Vec<BaselineRun>,
        metrics: BTreeMap<String, f64>,
    ) -> anyhow::Result<Self> {
        let servant = median(&servant_runs, |r| r.gbit_per_sec)
            .ok_or_else(|| anyhow::anyhow!("no Servant run"))?;
        let baseline = median(&baseline_runs, |r| r.gbit_per_sec)
            .ok_or_else(|| anyhow::anyhow!("no baseline run"))?;
        let store_only = median(&store_only_runs, |r| r.gbit_per_sec)
            .ok_or_else(|| anyhow::anyhow!("no store-only run"))?;
        Ok(SingleResult {
            transport,
            size,
            import_secs,
            ratio: servant.gbit_per_sec / baseline.gbit_per_sec.max(1e-12),
            store_only,
            store_only_runs,
            servant,
            baseline,
            servant_runs,
            baseline_runs,
            metrics,
        })
    }
}

/// One fetch of the multi-source run.
#[derive(Debug, Clone, Serialize)]
pub struct MultiRun {
    /// Providers running.
    pub providers: usize,
    /// Of those, connected to the fetcher through its bootnode and the DHT alone.
    pub found_by_itself: usize,
    /// Seconds the fetcher was given to find them.
    pub found_secs: f64,
    /// What the client saw.
    pub trace: FetchTrace,
    /// Throughput from request to `finished`, Mbit/s.
    pub mbit_per_sec: f64,
    /// Throughput from `started` to `finished`, Mbit/s.
    pub transfer_mbit_per_sec: f64,
    /// Chunks each provider delivered, in provider order.
    pub chunks_per_provider: Vec<u64>,
    /// The fetcher's CPU seconds per GiB fetched.
    pub fetcher_cpu_per_gib: f64,
    /// All providers' CPU seconds together per GiB served.
    pub providers_cpu_per_gib: f64,
    /// Cores other processes kept busy just before.
    pub other_cores_busy_before: f64,
}

impl MultiRun {
    /// Derives the rates and each provider's share.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        providers: usize,
        found_by_itself: usize,
        found_secs: f64,
        trace: FetchTrace,
        fetcher_cpu: f64,
        providers_cpu: f64,
        others: f64,
        nodes: &[ServantProcess],
    ) -> Self {
        let bits = trace.size as f64 * 8.0;
        let chunks_per_provider = nodes
            .iter()
            .map(|n| {
                let id = n.peer_id.to_string();
                trace
                    .shares
                    .iter()
                    .find(|s| s.peer == id)
                    .map_or(0, |s| s.chunks)
            })
            .collect();
        MultiRun {
            providers,
            found_by_itself,
            found_secs,
            mbit_per_sec: bits / trace.wall_secs.max(1e-9) / 1e6,
            transfer_mbit_per_sec: bits
                / (trace.wall_secs - trace.started_after_secs).max(1e-9)
                / 1e6,
            chunks_per_provider,
            fetcher_cpu_per_gib: per_gib(fetcher_cpu, trace.size),
            providers_cpu_per_gib: per_gib(providers_cpu, trace.size),
            other_cores_busy_before: others,
            trace,
        }
    }
}

/// The multi-source run.
#[derive(Debug, Clone, Serialize)]
pub struct MultiResult {
    /// Each provider's link rate, Mbit/s.
    pub rate_mbit: u32,
    /// Bytes per fetch.
    pub size: u64,
    /// A bare stream through one shaped link, Mbit/s.
    pub link_check_mbit_per_sec: f64,
    /// From provider 1 alone.
    pub one: MultiRun,
    /// From every provider.
    pub many: MultiRun,
    /// `many.mbit_per_sec / one.mbit_per_sec`.
    pub ratio: f64,
}

impl MultiResult {
    /// Derives the ratio.
    pub fn new(rate_mbit: u32, size: u64, link_check: f64, one: MultiRun, many: MultiRun) -> Self {
        MultiResult {
            rate_mbit,
            size,
            link_check_mbit_per_sec: link_check,
            ratio: many.mbit_per_sec / one.mbit_per_sec.max(1e-12),
            one,
            many,
        }
    }
}

/// One line of a comparison table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Which table: `single` (Servant against the bare stream) or `multi` (all
    /// providers against one).
    pub table: &'static str,
    /// What is measured.
    pub metric: String,
    /// Its unit.
    pub unit: &'static str,
    /// Servant's figure (multi: from every provider).
    pub value: f64,
    /// The baseline's figure (multi: from one provider).
    pub reference: f64,
    /// `value / reference`.
    pub ratio: Option<f64>,
    /// The target, in words; empty when the figure is for information.
    pub target: &'static str,
    /// Whether the target was met; absent when there is none.
    pub pass: Option<bool>,
}

impl Row {
    fn new(
        table: &'static str,
        metric: String,
        unit: &'static str,
        value: f64,
        reference: f64,
    ) -> Self {
        Row {
            table,
            metric,
            unit,
            value,
            reference,
            ratio: (reference != 0.0).then(|| value / reference),
            target: "",
            pass: None,
        }
    }

    fn ratio_at_least(mut self, target: &'static str, min: f64) -> Self {
        self.target = target;
        self.pass = Some(self.ratio.is_some_and(|r| r >= min));
        self
    }
}

/// The whole report, as written to the JSON file.
#[derive(Debug, Clone, Serialize)]
pub struct FilesReport {
    /// Which benchmark.
    pub benchmark: &'static str,
    /// When it finished, Unix seconds.
    pub finished_unix: u64,
    /// The machine.
    pub machine: Machine,
    /// The parameters.
    pub params: FilesParams,
    /// How it was measured; read before the numbers.
    pub method: Vec<&'static str>,
    /// The comparison, row by row.
    pub comparison: Vec<Row>,
    /// Whether every measured target was met.
    pub all_targets_met: bool,
    /// What Servant's side ran.
    pub servant_description: String,
    /// What the baseline ran.
    pub baseline_description: String,
    /// One provider over loopback, per transport.
    pub single: Vec<SingleResult>,
    /// The multi-source run; null when skipped.
    pub multi: Option<MultiResult>,
    /// Why the multi-source run was skipped.
    pub multi_skipped: Option<String>,
}

/// Builds the comparison rows.
pub fn compare(single: &[SingleResult], multi: Option<&MultiResult>) -> Vec<Row> {
    let mut rows = Vec::new();
    for s in single {
        let t = s.transport;
        rows.push(
            Row::new(
                "single",
                format!("fetch throughput, {t}"),
                "Gbit/s",
                s.servant.gbit_per_sec,
                s.baseline.gbit_per_sec,
            )
            .ratio_at_least(">= 0.8x bare stream", MIN_SINGLE_RATIO),
        );
        rows.push(Row::new(
            "single",
            format!("  into the store only (no export copy), {t}"),
            "Gbit/s",
            s.store_only.gbit_per_sec,
            s.baseline.gbit_per_sec,
        ));
        rows.push(Row::new(
            "single",
            format!("CPU per GiB fetched (receiver), {t}"),
            "s",
            s.servant.fetcher_cpu_per_gib,
            s.baseline.client_cpu_per_gib,
        ));
        rows.push(Row::new(
            "single",
            format!("CPU per GiB served (sender), {t}"),
            "s",
            s.servant.provider_cpu_per_gib,
            s.baseline.server_cpu_per_gib,
        ));
        rows.push(Row::new(
            "single",
            format!("  CPU per GiB fetched, store only, {t}"),
            "s",
            s.store_only.fetcher_cpu_per_gib,
            s.baseline.client_cpu_per_gib,
        ));
    }
    if let Some(m) = multi {
        let n = m.many.providers;
        rows.push(
            Row::new(
                "multi",
                format!("fetch throughput, {n} providers vs 1"),
                "Mbit/s",
                m.many.mbit_per_sec,
                m.one.mbit_per_sec,
            )
            .ratio_at_least(">= 3.5x", MIN_SCALING),
        );
        rows.push(Row::new(
            "multi",
            "  same, from the started event".into(),
            "Mbit/s",
            m.many.transfer_mbit_per_sec,
            m.one.transfer_mbit_per_sec,
        ));
        rows.push(Row::new(
            "multi",
            "CPU per GiB fetched (fetcher)".into(),
            "s",
            m.many.fetcher_cpu_per_gib,
            m.one.fetcher_cpu_per_gib,
        ));
        rows.push(Row::new(
            "multi",
            "CPU per GiB served (all providers)".into(),
            "s",
            m.many.providers_cpu_per_gib,
            m.one.providers_cpu_per_gib,
        ));
    }
    rows
}

fn render(out: &mut String, header: [&str; 6], rows: &[&Row]) {
    let mut lines: Vec<[String; 6]> = vec![header.map(String::from)];
    for row in rows {
        lines.push(crate::report::cells(
            &row.metric,
            row.unit,
            row.value,
            row.reference,
            row.ratio,
            row.target,
            row.pass,
        ));
    }
    crate::report::write_table(out, &lines);
}

/// Every run's rate, `1.23/1.45/...`.
fn rates(each: impl Iterator<Item = f64>) -> String {
    each.map(|r| format!("{r:.2}"))
        .collect::<Vec<_>>()
        .join("/")
}

fn mib(bytes: u64) -> String {
    servant::config::ByteSize(bytes).to_string()
}

/// The human table.
pub fn table(report: &FilesReport) -> String {
    let m = &report.machine;
    let p = &report.params;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "files: machine {} cores, {}, kernel {}{}",
        m.nproc,
        m.cpu_model,
        m.kernel,
        if m.release_build {
            ""
        } else {
            ", DEBUG BUILD (numbers meaningless)"
        }
    );
    if !report.single.is_empty() {
        let _ = writeln!(
            out,
            "\none provider over loopback: {} file, median of {} runs each, Servant and a bare \
             libp2p stream taking turns",
            p.size, p.repeat
        );
        let rows: Vec<&Row> = report
            .comparison
            .iter()
            .filter(|r| r.table == "single")
            .collect();
        render(
            &mut out,
            [
                "metric",
                "Servant",
                "bare stream",
                "ratio",
                "target",
                "result",
            ],
            &rows,
        );
        for s in &report.single {
            let busy: Vec<String> = s
                .metrics
                .iter()
                .filter(|(k, _)| k.contains("busy"))
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            let _ = writeln!(
                out,
                "{}: fetch {:.2} s (lookup and manifest {:.0} ms, node's elapsed_ms {}), store \
                 only {:.2} s, share (import) {:.1} s; runs to a file {} Gbit/s, store only {} \
                 Gbit/s, bare {} Gbit/s{}",
                s.transport,
                s.servant.trace.wall_secs,
                s.servant.trace.started_after_secs * 1e3,
                s.servant.trace.node_elapsed_ms,
                s.store_only.trace.wall_secs,
                s.import_secs,
                rates(s.servant_runs.iter().map(|r| r.gbit_per_sec)),
                rates(s.store_only_runs.iter().map(|r| r.gbit_per_sec)),
                rates(s.baseline_runs.iter().map(|r| r.gbit_per_sec)),
                if busy.is_empty() {
                    String::new()
                } else {
                    format!("; {}", busy.join(", "))
                }
            );
        }
    }
    match (&report.multi, &report.multi_skipped) {
        (Some(mr), _) => {
            let _ = writeln!(
                out,
                "\nmulti-source: {} file, each provider's link limited to {} Mbit/s (a bare \
                 stream through one link: {:.0} Mbit/s)",
                mib(mr.size),
                mr.rate_mbit,
                mr.link_check_mbit_per_sec
            );
            let rows: Vec<&Row> = report
                .comparison
                .iter()
                .filter(|r| r.table == "multi")
                .collect();
            let many = format!("{} providers", mr.many.providers);
            render(
                &mut out,
                ["metric", &many, "1 provider", "ratio", "target", "result"],
                &rows,
            );
            for run in [&mr.one, &mr.many] {
                let _ = writeln!(
                    out,
                    "{} provider(s): {:.2} s, chunks per provider {:?}, found by the fetcher \
                     itself {} of {}{}",
                    run.providers,
                    run.trace.wall_secs,
                    run.chunks_per_provider,
                    run.found_by_itself,
                    run.providers,
                    if run.trace.dropped.is_empty() {
                        String::new()
                    } else {
                        format!(", dropped: {}", run.trace.dropped.join("; "))
                    }
                );
            }
        }
        (None, Some(why)) => {
            let _ = writeln!(
                out,
                "\nmulti-source: SKIPPED ({why}); its target is not checked"
            );
        }
        (None, None) => {}
    }
    let others = report
        .single
        .iter()
        .flat_map(|s| {
            s.servant_runs
                .iter()
                .chain(&s.store_only_runs)
                .map(|r| r.other_cores_busy_before.max(r.other_cores_busy_during))
                .chain(
                    s.baseline_runs
                        .iter()
                        .map(|r| r.other_cores_busy_before.max(r.other_cores_busy_during)),
                )
        })
        .fold(0.0f64, f64::max);
    if others > p.quiet_cores {
        let _ = writeln!(
            out,
            "WARNING: other processes (or the hypervisor) kept up to {others:.2} cores busy \
             before or during a loopback run; its throughput is understated"
        );
    }
    let _ = writeln!(
        out,
        "\n{}",
        match (report.all_targets_met, report.multi.is_some()) {
            (true, true) => "all targets met",
            (true, false) => "all measured targets met (multi-source not measured)",
            (false, _) => "TARGETS MISSED",
        }
    );
    out
}
