//! `servant-bench files`: fetch throughput and CPU cost.
//!
//! 1. One provider over loopback: two real `servant` processes (data on tmpfs) move a
//!    generated file with `POST /v1/fetch`; side by side, repeat by repeat, two bare
//!    libp2p processes move the same bytes over one stream on the same transport
//!    ([`files_stream`](crate::files_stream)).
//! 2. Many providers (root only): each provider in a network namespace of its own,
//!    its link to the fetcher limited to the same rate; a fetch from one provider,
//!    then from all of them.

use std::{
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use libp2p::Multiaddr;
use rand::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};
use servant::config::ByteSize;

use crate::{
    files_netns::{self, Lab},
    files_node::{FetchTrace, ServantProcess, Spec},
    files_report::{
        self, BaselineRun, FilesReport, MultiResult, MultiRun, ServantRun, SingleResult,
    },
    files_stream, openmetrics, process,
};

/// The parameters of one `files` run.
#[derive(Debug, Clone, Serialize, Deserialize, clap::Args)]
pub struct FilesParams {
    /// Size of the file fetched from one provider over loopback.
    #[arg(long, default_value = "1GiB")]
    pub size: ByteSize,
    /// Fetches of each kind over loopback, Servant and baseline taking turns; the
    /// report gives the median.
    #[arg(long, default_value_t = 5)]
    pub repeat: u32,
    /// Also measure over QUIC (TCP is always measured).
    #[arg(long)]
    pub quic: bool,
    /// Size of the file of the multi-source run: several seconds from one provider
    /// at `--rate-mbit`.
    #[arg(long, default_value = "256MiB")]
    pub multi_size: ByteSize,
    /// Providers in the multi-source run.
    #[arg(long, default_value_t = 4)]
    pub providers: usize,
    /// Each provider's link rate in the multi-source run, Mbit/s. All providers
    /// together must stay well below what one fetcher does on loopback, so the
    /// links, not the CPU, limit the fetch.
    #[arg(long, default_value_t = 200)]
    pub rate_mbit: u32,
    /// Skip the loopback comparison.
    #[arg(long)]
    pub skip_single: bool,
    /// Skip the multi-source run.
    #[arg(long)]
    pub skip_multi: bool,
    /// Scratch directory for data dirs and files; on tmpfs so the disk stays out of
    /// the measurement. Removed before and after.
    #[arg(long, default_value = "/dev/shm/servant-bench-files")]
    pub work_dir: PathBuf,
    /// Keep the scratch directory (nodes' data dirs and logs) for inspection.
    #[arg(long)]
    pub keep_work_dir: bool,
    /// The `servant` binary [default: `servant` beside this executable, i.e.
    /// `target/release/servant` after `cargo build --release -p servant`].
    #[arg(long)]
    pub servant_bin: Option<PathBuf>,
    /// An extra argument for every `servant run`, repeatable (for experiments such
    /// as `--servant-arg=--fetch-window-per-provider=64`).
    #[arg(long = "servant-arg", allow_hyphen_values = true)]
    pub servant_args: Vec<String>,
    /// Before each measurement, wait up to this many seconds for other processes to
    /// leave the CPU; then measure anyway.
    #[arg(long, default_value_t = 120)]
    pub quiet_wait_secs: u64,
    /// Cores other processes may keep busy for the machine to count as quiet.
    #[arg(long, default_value_t = 0.25)]
    pub quiet_cores: f64,
}

impl FilesParams {
    fn check(&self) -> Result<()> {
        ensure!(self.size.get() >= 1 << 20, "--size must be at least 1MiB");
        ensure!(
            self.multi_size.get() >= 1 << 20,
            "--multi-size must be at least 1MiB"
        );
        ensure!(self.repeat >= 1, "--repeat must be at least 1");
        ensure!(
            (2..=16).contains(&self.providers),
            "--providers must be between 2 and 16"
        );
        ensure!(self.rate_mbit >= 1, "--rate-mbit must be at least 1");
        ensure!(
            self.work_dir.is_absolute(),
            "--work-dir must be an absolute path"
        );
        Ok(())
    }
}

/// Bytes in a GiB, the unit of the CPU figures.
const GIB: f64 = (1u64 << 30) as f64;
/// The API port every namespaced node uses (each namespace has its own loopback).
const NS_API: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 5100);
/// The p2p port of namespaced nodes.
const NS_P2P_PORT: u16 = 4001;
/// How long the fetcher of the multi-source run may take to see every provider
/// through its bootnode and the DHT before it is told to connect to the rest.
const DISCOVERY_WAIT: Duration = Duration::from_secs(30);

fn log(what: impl std::fmt::Display) {
    eprintln!("[files] {what}");
}

/// The parent: both parts, then the report.
pub fn run(params: &FilesParams, out: &Path) -> Result<FilesReport> {
    params.check()?;
    let bin = match &params.servant_bin {
        Some(bin) => bin.clone(),
        None => std::env::current_exe()
            .context("path of this executable")?
            .with_file_name("servant"),
    };
    if !bin.is_file() {
        bail!(
            "{} not found: build it first with `cargo build --release -p servant` (or give \
             --servant-bin)",
            bin.display()
        );
    }
    let bin = std::path::absolute(&bin)?;
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let _ = std::fs::remove_dir_all(&params.work_dir);
    std::fs::create_dir_all(&params.work_dir)
        .with_context(|| format!("create {}", params.work_dir.display()))?;
    let result = runtime.block_on(async {
        let mut single = Vec::new();
        if !params.skip_single {
            single.push(single_provider(params, &bin, false).await?);
            if params.quic {
                single.push(single_provider(params, &bin, true).await?);
            }
        }
        let (multi, multi_skipped) = if params.skip_multi {
            (None, Some("skipped with --skip-multi".to_string()))
        } else {
            match files_netns::available() {
                Ok(()) => (Some(multi_source(params, &bin).await?), None),
                Err(why) => {
                    eprintln!(
                        "\n*** SKIPPED: the multi-source run needs network namespaces: {why} ***\n"
                    );
                    (None, Some(why))
                }
            }
        };
        anyhow::Ok((single, multi, multi_skipped))
    });
    if params.keep_work_dir {
        log(format!("kept {}", params.work_dir.display()));
    } else {
        let _ = std::fs::remove_dir_all(&params.work_dir);
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    let (single, multi, multi_skipped) = result?;

    let comparison = files_report::compare(&single, multi.as_ref());
    let all_targets_met = comparison.iter().all(|r| r.pass != Some(false));
    let report = FilesReport {
        benchmark: "files",
        finished_unix: crate::unix_now(),
        machine: process::Machine::detect(),
        params: params.clone(),
        method: files_report::METHOD.to_vec(),
        comparison,
        all_targets_met,
        servant_description: "two `servant run` processes (release build, default settings \
            unless --servant-arg), data dirs on tmpfs; the fetcher has the provider as its \
            bootnode; POST /v1/fetch (loopback) or `servant fetch --json` (namespaces)"
            .into(),
        baseline_description: files_stream::DESCRIPTION.into(),
        single,
        multi,
        multi_skipped,
    };
    crate::publish(out, &report, &files_report::table(&report))?;
    Ok(report)
}

/// Writes `size` pseudo-random bytes to `path` (incompressible, like real content).
fn generate(path: &Path, size: u64, seed: u64) -> Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?,
    );
    let mut buffer = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buffer.len() as u64) as usize;
        rng.fill_bytes(&mut buffer[..n]);
        file.write_all(&buffer[..n])?;
        left -= n as u64;
    }
    file.flush()?;
    Ok(())
}

/// A free TCP port on 127.0.0.1 that is free for UDP too (the QUIC listener).
fn free_port() -> Result<u16> {
    for _ in 0..100 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = tcp.local_addr()?.port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port free for both TCP and UDP on 127.0.0.1")
}

fn loopback_listen(port: u16) -> Result<Vec<Multiaddr>> {
    Ok(vec![
        format!("/ip4/127.0.0.1/tcp/{port}").parse()?,
        format!("/ip4/127.0.0.1/udp/{port}/quic-v1").parse()?,
    ])
}

/// Waits for a quiet machine and returns how busy others kept it (see
/// `main::wait_for_quiet`). It sleeps: off the async workers.
fn quiet(name: &str, params: &FilesParams) -> Result<f64> {
    tokio::task::block_in_place(|| {
        crate::wait_for_quiet(name, params.quiet_wait_secs, params.quiet_cores)
    })
}

/// One provider over loopback against the bare stream, on one transport.
async fn single_provider(params: &FilesParams, bin: &Path, quic: bool) -> Result<SingleResult> {
    let transport = if quic { "QUIC" } else { "TCP" };
    let work = params
        .work_dir
        .join(format!("single-{}", transport.to_lowercase()));
    std::fs::create_dir_all(&work)?;
    let size = params.size.get();
    let payload = work.join("payload.bin");
    log(format!("{transport}: writing a {} payload", params.size));
    generate(&payload, size, 1)?;

    let provider = ServantProcess::start(
        bin,
        Spec {
            name: "provider".into(),
            netns: None,
            data_dir: work.join("provider"),
            listen: loopback_listen(free_port()?)?,
            api: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
            bootnode: None,
            extra: params.servant_args.clone(),
        },
        &work.join("logs"),
    )
    .await?;
    let importing = Instant::now();
    let info = provider.share(&payload).await?;
    let import_secs = importing.elapsed().as_secs_f64();
    // The store holds its own copy now; tmpfs is memory.
    std::fs::remove_file(&payload)?;
    let id = info.id.to_string();
    log(format!(
        "{transport}: shared {} chunks in {import_secs:.2} s",
        info.chunks
    ));

    let fetcher = ServantProcess::start(
        bin,
        Spec {
            name: "fetcher".into(),
            netns: None,
            data_dir: work.join("fetcher"),
            listen: loopback_listen(free_port()?)?,
            api: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
            bootnode: Some(provider.addr(quic)?),
            extra: params.servant_args.clone(),
        },
        &work.join("logs"),
    )
    .await?;
    let missing = fetcher
        .wait_for_peers(&[provider.peer_id], Duration::from_secs(20))
        .await?;
    if !missing.is_empty() {
        bail!(
            "the fetcher did not connect to its bootnode; its log:\n{}",
            fetcher.log_tail(30)
        );
    }

    let listen: Multiaddr = if quic {
        "/ip4/127.0.0.1/udp/0/quic-v1".parse()?
    } else {
        "/ip4/127.0.0.1/tcp/0".parse()?
    };
    let server = files_stream::Server::start(None, &listen)?;
    let client_result = work.join("stream-client.json");
    let out = work.join("out.bin");

    let mut servant_runs = Vec::new();
    let mut store_only_runs = Vec::new();
    let mut baseline_runs = Vec::new();
    for round in 0..params.repeat {
        let others = quiet(&format!("{transport} baseline"), params)?;
        let machine0 = process::machine_busy_seconds()?;
        let (client, server_cpu) =
            tokio::task::block_in_place(|| server.fetch(None, size, &client_result))?;
        let machine = process::machine_busy_seconds()? - machine0;
        let mut run = BaselineRun::new(&client, server_cpu, others);
        // The client's own CPU covers the transfer only; its start-up and dial are
        // this harness's to the machine, and small.
        run.other_cores_busy_during =
            ((machine - client.cpu_secs - server_cpu) / client.secs.max(1e-9)).max(0.0);
        log(format!(
            "{transport} baseline {}/{}: {:.2} Gbit/s, CPU {:.2} s/GiB receiving, {:.2} s/GiB \
             sending, others {:.2} cores",
            round + 1,
            params.repeat,
            run.gbit_per_sec,
            run.client_cpu_per_gib,
            run.server_cpu_per_gib,
            run.other_cores_busy_during
        ));
        baseline_runs.push(run);

        // Two Servant fetches: to a file (what a user does, and the target), and into
        // the store only (no output path, so no export copy).
        for (to_file, runs) in [(true, &mut servant_runs), (false, &mut store_only_runs)] {
            // Every fetch starts from nothing; the first has nothing to remove.
            if round > 0 || !to_file {
                fetcher.unshare(&id).await?;
            }
            // Replacing the last run's output would free its pages inside the fetch.
            let _ = std::fs::remove_file(&out);
            let what = if to_file {
                "servant"
            } else {
                "servant, store only"
            };
            let others = quiet(&format!("{transport} {what}"), params)?;
            let machine0 = process::machine_busy_seconds()?;
            let (f0, p0) = (fetcher.cpu_seconds()?, provider.cpu_seconds()?);
            let trace = fetcher.fetch(&id, to_file.then_some(out.as_path())).await?;
            let (f1, p1) = (fetcher.cpu_seconds()?, provider.cpu_seconds()?);
            let machine = process::machine_busy_seconds()? - machine0;
            let mut run = ServantRun::new(trace, f1 - f0, p1 - p0, others);
            run.other_cores_busy_during =
                ((machine - (f1 - f0) - (p1 - p0)) / run.trace.wall_secs.max(1e-9)).max(0.0);
            log(format!(
                "{transport} {what} {}/{}: {:.2} Gbit/s ({:.2} s; started after {:.3} s; node \
                 says {} ms), CPU {:.2} s/GiB fetching, {:.2} s/GiB serving, others {:.2} cores",
                round + 1,
                params.repeat,
                run.gbit_per_sec,
                run.trace.wall_secs,
                run.trace.started_after_secs,
                run.trace.node_elapsed_ms,
                run.fetcher_cpu_per_gib,
                run.provider_cpu_per_gib,
                run.other_cores_busy_during
            ));
            runs.push(run);
        }
    }
    drop(server);

    let mut metrics = std::collections::BTreeMap::new();
    for (who, node) in [("provider", &provider), ("fetcher", &fetcher)] {
        let text = node.metrics().await?;
        for (reason, n) in
            openmetrics::by_label(&text, "servant_file_requests_served_total", "reason")
        {
            metrics.insert(format!("{who} requests served, {reason}"), n);
        }
        let rejected = openmetrics::sum(&text, "servant_file_chunks_rejected_total");
        if rejected > 0.0 {
            metrics.insert(format!("{who} chunks rejected"), rejected);
        }
    }
    let mut provider = provider;
    let mut fetcher = fetcher;
    fetcher.stop();
    provider.stop();
    if !params.keep_work_dir {
        let _ = std::fs::remove_dir_all(&work);
    }
    SingleResult::new(
        transport,
        size,
        import_secs,
        servant_runs,
        store_only_runs,
        baseline_runs,
        metrics,
    )
}

/// The fetcher and providers of the multi-source run, in their namespaces.
async fn multi_source(params: &FilesParams, bin: &Path) -> Result<MultiResult> {
    let work = params.work_dir.join("multi");
    std::fs::create_dir_all(&work)?;
    let size = params.multi_size.get();
    let payload = work.join("payload.bin");
    log(format!(
        "multi-source: writing a {} payload",
        params.multi_size
    ));
    generate(&payload, size, 2)?;
    log(format!(
        "multi-source: {} provider namespaces, each link limited to {} Mbit/s",
        params.providers, params.rate_mbit
    ));
    let lab = Lab::create(params.providers, params.rate_mbit)?;
    let fetcher_ns = lab.fetcher_ns().to_string();

    // The link alone: a bare stream through one shaped link.
    let link_check = {
        let listen: Multiaddr = format!("/ip4/{}/tcp/0", Lab::provider_ip(0)).parse()?;
        let server = files_stream::Server::start(Some(&Lab::provider_ns(0)), &listen)?;
        let bytes = (size / 4).max(1 << 20);
        let result = work.join("link-check.json");
        let (client, _) =
            tokio::task::block_in_place(|| server.fetch(Some(&fetcher_ns), bytes, &result))?;
        let mbit = client.bytes as f64 * 8.0 / client.secs / 1e6;
        log(format!(
            "multi-source: a bare stream through one link moved {mbit:.0} Mbit/s"
        ));
        mbit
    };

    let provider_spec = |i: usize, bootnode: Option<Multiaddr>| -> Result<Spec> {
        Ok(Spec {
            name: format!("provider{}", i + 1),
            netns: Some(Lab::provider_ns(i)),
            data_dir: work.join(format!("provider{}", i + 1)),
            listen: vec![format!("/ip4/{}/tcp/{NS_P2P_PORT}", Lab::provider_ip(i)).parse()?],
            api: NS_API,
            bootnode,
            extra: params.servant_args.clone(),
        })
    };
    // Each fetcher listens on a port of its own: a provider that knew the first
    // fetcher redials its address, and a new node with another PeerId there would
    // take that dial (see the report's notes).
    let fetcher_spec = |name: &str, port: u16, bootnode: Multiaddr| -> Result<Spec> {
        Ok(Spec {
            name: name.into(),
            netns: Some(fetcher_ns.clone()),
            data_dir: work.join(name),
            listen: vec![format!("/ip4/{}/tcp/{port}", Lab::fetcher_ip()).parse()?],
            api: NS_API,
            bootnode: Some(bootnode),
            extra: params.servant_args.clone(),
        })
    };
    let logs = work.join("logs");

    let mut providers = vec![ServantProcess::start(bin, provider_spec(0, None)?, &logs).await?];
    let first = providers[0].addr(false)?;
    let info = providers[0].share(&payload).await?;
    let id = info.id.to_string();
    let out = work.join("out.bin");

    // One provider.
    let one = {
        let mut fetcher = ServantProcess::start(
            bin,
            fetcher_spec("fetcher1", NS_P2P_PORT + 1, first.clone())?,
            &logs,
        )
        .await?;
        let run = measure_multi(params, &fetcher, &providers, &id, &out).await?;
        fetcher.stop();
        run
    };

    // All of them.
    for i in 1..lab.providers() {
        let node =
            ServantProcess::start(bin, provider_spec(i, Some(first.clone()))?, &logs).await?;
        let shared = node.share(&payload).await?;
        ensure!(
            shared.id == info.id,
            "provider {} got id {} for the same file, not {id}",
            i + 1,
            shared.id
        );
        providers.push(node);
    }
    let many = {
        let mut fetcher = ServantProcess::start(
            bin,
            fetcher_spec("fetcher2", NS_P2P_PORT + 2, first)?,
            &logs,
        )
        .await?;
        let run = measure_multi(params, &fetcher, &providers, &id, &out).await?;
        fetcher.stop();
        run
    };
    for p in &mut providers {
        p.stop();
    }
    drop(lab);
    if !params.keep_work_dir {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(MultiResult::new(
        params.rate_mbit,
        size,
        link_check,
        one,
        many,
    ))
}

/// Connects the fetcher to every provider (waiting for it to find them itself
/// first), then fetches once and measures.
async fn measure_multi(
    params: &FilesParams,
    fetcher: &ServantProcess,
    providers: &[ServantProcess],
    id: &str,
    out: &Path,
) -> Result<MultiRun> {
    let n = providers.len();
    let peers: Vec<_> = providers.iter().map(|p| p.peer_id).collect();
    let waiting = Instant::now();
    let missing = fetcher.wait_for_peers(&peers, DISCOVERY_WAIT).await?;
    let found_secs = waiting.elapsed().as_secs_f64();
    let found_by_itself = n - missing.len();
    if !missing.is_empty() {
        log(format!(
            "multi-source: the fetcher found {found_by_itself} of {n} providers by itself in {found_secs:.0} s; \
             connecting to the rest"
        ));
        for p in providers.iter().filter(|p| missing.contains(&p.peer_id)) {
            fetcher.connect(&p.addr(false)?).await?;
        }
    }
    let others = quiet(&format!("multi-source, {n} provider(s)"), params)?;
    let f0 = fetcher.cpu_seconds()?;
    let mut p0 = Vec::with_capacity(n);
    for p in providers {
        p0.push(p.cpu_seconds()?);
    }
    let trace: FetchTrace = fetcher.fetch(id, Some(out)).await?;
    let fetcher_cpu = fetcher.cpu_seconds()? - f0;
    let mut provider_cpu = 0.0;
    for (p, before) in providers.iter().zip(p0) {
        provider_cpu += p.cpu_seconds()? - before;
    }
    let run = MultiRun::new(
        n,
        found_by_itself,
        found_secs,
        trace,
        fetcher_cpu,
        provider_cpu,
        others,
        providers,
    );
    log(format!(
        "multi-source, {n} provider(s): {:.0} Mbit/s in {:.2} s, chunks per provider {:?}",
        run.mbit_per_sec, run.trace.wall_secs, run.chunks_per_provider
    ));
    Ok(run)
}

/// CPU seconds per GiB of `bytes`.
pub fn per_gib(cpu_secs: f64, bytes: u64) -> f64 {
    if bytes == 0 {
        0.0
    } else {
        cpu_secs / (bytes as f64 / GIB)
    }
}
