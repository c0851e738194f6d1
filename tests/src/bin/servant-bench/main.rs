//! `servant-bench`: Servant measured against bare rust-libp2p in the same run.
//!
//! ```text
//! cargo run --release -p servant-tests --bin servant-bench -- gossip \
//!     [--nodes 50 --rate 50 --publishers 5 --secs 20 --out target/bench/gossip.json]
//! ```
//!
//! ```text
//! cargo run --release -p servant-tests --bin servant-bench -- files \
//!     [--size 1GiB --repeat 3 --quic --multi-size 256MiB --providers 4 --rate-mbit 200]
//! ```
//!
//! `gossip` plans a topology, runs Servant's nodes in one child process and the bare
//! gossipsub baseline in another (this binary re-executed in the hidden
//! `gossip-child` mode), then writes a JSON report and prints a table with Servant's
//! figures, the baseline's, their ratio and the targets.
//!
//! ```text
//! cargo run --release -p servant-tests --bin servant-bench -- nat [--trials 30 --transports tcp,quic]
//! ```
//!
//! `files` times fetches between real `servant` processes against a bare libp2p
//! stream moving the same bytes (children in the hidden `stream-server` and
//! `stream-client` modes), then, as root, fetches from rate-limited providers in
//! network namespaces; see [`files`].
//!
//! `nat` (root) runs hole-punch trials in fresh NAT labs, Servant against a bare
//! rust-libp2p relay and DCUtR (children in the hidden `nat-node` mode); see [`nat`].
//!
//! ```text
//! cargo run -p servant-tests --bin servant-bench -- soak \
//!     [--duration 5m --churn-multiplier 10 --out target/bench/soak.json --check]
//! ```
//!
//! ```text
//! cargo build -p servant && cargo run -p servant-tests --bin servant-bench -- attack \
//!     [--dials 2000 --honest 40 --out target/bench/attack.json]
//! ```
//!
//! `attack` times an honest peer's connections to a node on its own and then under
//! the connection flood of the attack tests; see [`attack`].
//!
//! `soak` runs real `servant` processes under churn and load for `--duration` (hours
//! for a long soak) and checks resident memory, descriptors, tasks and panics of the
//! nodes that stayed; see [`soak`].

mod attack;
mod baseline_net;
mod driver;
mod files;
mod files_netns;
mod files_node;
mod files_report;
mod files_stream;
mod load;
mod memory;
mod nat;
mod nat_node;
mod nat_path;
mod openmetrics;
mod params;
mod process;
mod report;
mod servant_net;
mod soak;
mod stats;
mod topology;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use crate::{
    baseline_net::BaselineNet, driver::ImplResult, params::Params, report::Report,
    servant_net::ServantNet, topology::Edge,
};

#[derive(Parser)]
#[command(about = "Benchmarks Servant against bare rust-libp2p in the same run")]
struct Cli {
    #[command(subcommand)]
    command: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Broadcast: Servant's gossipsub against a bare gossipsub baseline.
    Gossip {
        #[command(flatten)]
        params: Params,
        /// Where the JSON report goes; the table is written beside it as `.txt`.
        #[arg(long, default_value = "target/bench/gossip.json")]
        out: PathBuf,
        /// Exit with status 1 when Servant misses a target.
        #[arg(long)]
        check: bool,
    },
    /// File transfer: Servant's fetch against a bare libp2p stream, and fetches
    /// from several rate-limited providers (namespaces; root only).
    Files {
        #[command(flatten)]
        params: files::FilesParams,
        /// Where the JSON report goes; the table is written beside it as `.txt`.
        #[arg(long, default_value = "target/bench/files.json")]
        out: PathBuf,
        /// Exit with status 1 when Servant misses a target.
        #[arg(long)]
        check: bool,
    },
    /// Hole punching in the NAT lab (root): Servant against bare rust-libp2p.
    Nat {
        #[command(flatten)]
        params: nat::NatParams,
        /// Where the JSON report goes; the table is written beside it as `.txt`.
        #[arg(long, default_value = "target/bench/nat.json")]
        out: PathBuf,
        /// Exit with status 1 when Servant misses a target.
        #[arg(long)]
        check: bool,
    },
    /// Soak: a network under churn and load for a set time, checked for leaks
    /// (memory, descriptors, tasks) and panics.
    Soak {
        #[command(flatten)]
        params: soak::SoakParams,
        /// Where the JSON report goes; the table is written beside it as `.txt`.
        #[arg(long, default_value = "target/bench/soak.json")]
        out: PathBuf,
        /// Exit with status 1 when a criterion fails.
        #[arg(long)]
        check: bool,
    },
    /// What a connection flood costs an honest peer's connects, side by side with a
    /// quiet node.
    Attack {
        #[command(flatten)]
        params: attack::AttackParams,
        /// Where the JSON report goes; the table is written beside it as `.txt`.
        #[arg(long, default_value = "target/bench/attack.json")]
        out: PathBuf,
    },
    /// A bare rust-libp2p relay or peer (used by `nat`).
    #[command(hide = true)]
    NatNode {
        /// `relay`, `listen` or `dial`.
        role: String,
        /// Where to listen.
        #[arg(long)]
        listen: libp2p::Multiaddr,
        /// The relay, with `/p2p/` (peers).
        #[arg(long)]
        relay: Option<libp2p::Multiaddr>,
        /// The circuit address to dial (`dial`).
        #[arg(long)]
        target: Option<libp2p::Multiaddr>,
        /// Where to write the relay's id, the circuit address or the outcome.
        #[arg(long)]
        file: PathBuf,
        /// Where `listen` writes its side of the hole punch.
        #[arg(long)]
        outcome: Option<PathBuf>,
    },
    /// The bare-stream server (used by `files`).
    #[command(hide = true)]
    StreamServer {
        /// Where to listen.
        #[arg(long)]
        listen: libp2p::Multiaddr,
    },
    /// The bare-stream client (used by `files`).
    #[command(hide = true)]
    StreamClient {
        /// The server, with `/p2p/`.
        #[arg(long)]
        addr: libp2p::Multiaddr,
        /// Bytes to read.
        #[arg(long)]
        bytes: u64,
        /// Where to write the result as JSON.
        #[arg(long)]
        result: PathBuf,
    },
    /// One implementation's full-mesh memory run (used by `gossip`).
    #[command(hide = true)]
    MemoryChild {
        /// Which implementation.
        #[arg(long, value_enum)]
        implementation: Implementation,
        /// The parameters, as JSON.
        #[arg(long)]
        params: String,
        /// Where to write the result as JSON.
        #[arg(long)]
        result: PathBuf,
    },
    /// One implementation's run (used by `gossip`).
    #[command(hide = true)]
    GossipChild {
        /// Which implementation.
        #[arg(long, value_enum)]
        implementation: Implementation,
        /// The parameters, as JSON.
        #[arg(long)]
        params: String,
        /// A JSON file with the edges to connect.
        #[arg(long)]
        edges: PathBuf,
        /// Where to write the result as JSON.
        #[arg(long)]
        result: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Implementation {
    Servant,
    Baseline,
}

impl Implementation {
    fn name(self) -> &'static str {
        match self {
            Implementation::Servant => "servant",
            Implementation::Baseline => "baseline",
        }
    }
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Mode::Gossip { params, out, check } => {
            let report = gossip(&params, &out)?;
            if check && !report.all_targets_met {
                std::process::exit(1);
            }
            Ok(())
        }
        Mode::Files { params, out, check } => {
            let report = files::run(&params, &out)?;
            if check && !report.all_targets_met {
                std::process::exit(1);
            }
            Ok(())
        }
        Mode::Nat { params, out, check } => {
            let report = stream_runtime()?.block_on(nat::run(&params, &out))?;
            if check && !report.all_targets_met {
                std::process::exit(1);
            }
            Ok(())
        }
        Mode::Soak { params, out, check } => {
            let report = stream_runtime()?.block_on(soak::run(&params, &out))?;
            if check && !report.asserted_criteria_met {
                std::process::exit(1);
            }
            Ok(())
        }
        Mode::Attack { params, out } => {
            stream_runtime()?.block_on(attack::run(&params, &out))?;
            Ok(())
        }
        Mode::NatNode {
            role,
            listen,
            relay,
            target,
            file,
            outcome,
        } => stream_runtime()?.block_on(async move {
            // The same filter variable as Servant's, so a trial's logs line up.
            if let Ok(filter) = std::env::var("SERVANT_LOG_LEVEL") {
                servant::logging::init(&filter, servant::config::LogFormat::Text);
            }
            match (role.as_str(), relay, target) {
                ("relay", _, _) => nat_node::relay(listen, &file).await,
                ("listen", Some(relay), _) => {
                    nat_node::listen(listen, relay, &file, outcome.as_deref()).await
                }
                ("dial", Some(relay), Some(target)) => {
                    nat_node::dial(listen, relay, target, &file).await
                }
                _ => bail!("nat-node: relay, listen --relay, or dial --relay --target"),
            }
        }),
        Mode::StreamServer { listen } => stream_runtime()?.block_on(files_stream::server(listen)),
        Mode::StreamClient {
            addr,
            bytes,
            result,
        } => {
            let outcome = stream_runtime()?.block_on(files_stream::client(addr, bytes))?;
            write_json(&result, &outcome)
        }
        Mode::MemoryChild {
            implementation,
            params,
            result,
        } => {
            let params: Params = serde_json::from_str(&params).context("--params")?;
            let outcome = memory_child(implementation, &params)?;
            write_json(&result, &outcome)
        }
        Mode::GossipChild {
            implementation,
            params,
            edges,
            result,
        } => {
            let params: Params = serde_json::from_str(&params).context("--params")?;
            let edges: Vec<Edge> = read_json(&edges)?;
            let outcome = child(implementation, &params, &edges)?;
            std::fs::write(&result, serde_json::to_vec_pretty(&outcome)?)
                .with_context(|| format!("write {}", result.display()))
        }
    }
}

/// The runtime of a bare-stream child: multi-threaded, one worker per core, as
/// `servant run` has.
fn stream_runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parse {}", path.display()))
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("write {}", path.display()))
}

/// Seconds since the Unix epoch, for a report's `finished_unix` (0 if the clock is
/// before 1970).
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Writes a report as JSON to `out` and its table beside it (`.txt`), and prints both
/// places and the table.
fn publish(out: &Path, report: &impl serde::Serialize, table: &str) -> Result<()> {
    // A report made after a long run must not be lost to a directory not made yet.
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    write_json(out, report)?;
    let table_path = out.with_extension("txt");
    std::fs::write(&table_path, table)
        .with_context(|| format!("write {}", table_path.display()))?;
    println!("\n{table}");
    println!(
        "report: {}\ntable:  {}",
        out.display(),
        table_path.display()
    );
    Ok(())
}

/// The parent: plan, run both children, report.
fn gossip(params: &Params, out: &Path) -> Result<Report> {
    params.check()?;
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("gossip");

    let planned = topology::plan(
        params.nodes,
        params.min_degree,
        params.max_degree,
        params.seed,
    )?;
    let plan_path = dir.join(format!("{stem}.planned-edges.json"));
    write_json(&plan_path, &planned)?;

    let servant = run_child(Implementation::Servant, params, &plan_path, dir, stem)?;
    if !topology::is_connected(params.nodes, &servant.topology.edges) {
        eprintln!("warning: Servant's graph at the start of the load was not connected");
    }
    // The baseline gets the graph Servant actually had, not the plan.
    let edges_path = dir.join(format!("{stem}.servant-edges.json"));
    write_json(&edges_path, &servant.topology.edges)?;
    let baseline = run_child(Implementation::Baseline, params, &edges_path, dir, stem)?;
    if topology::pairs(&baseline.topology.edges) != topology::pairs(&servant.topology.edges) {
        eprintln!(
            "warning: the baseline's graph differs from Servant's (see topology in the report)"
        );
    }

    let mesh_params = memory::params(params);
    let full_mesh = report::FullMesh {
        servant: run_memory_child(Implementation::Servant, &mesh_params, dir, stem)?,
        baseline: run_memory_child(Implementation::Baseline, &mesh_params, dir, stem)?,
    };

    let comparison = report::compare(&servant, &baseline, &full_mesh, params.nodes);
    let all_targets_met = comparison.iter().all(|r| r.pass != Some(false));
    let report = Report {
        benchmark: "gossip",
        finished_unix: unix_now(),
        machine: process::Machine::detect(),
        params: params.clone(),
        planned_edges: planned.len(),
        method: report::METHOD.to_vec(),
        comparison,
        all_targets_met,
        servant,
        baseline,
        full_mesh,
    };
    publish(out, &report, &report::table(&report))?;
    Ok(report)
}

fn run_child(
    implementation: Implementation,
    params: &Params,
    edges: &Path,
    dir: &Path,
    stem: &str,
) -> Result<ImplResult> {
    let name = implementation.name();
    let other_cores = wait_for_quiet(name, params.quiet_wait_secs, params.quiet_cores)?;
    let result = dir.join(format!("{stem}.{name}.json"));
    let _ = std::fs::remove_file(&result);
    let exe = std::env::current_exe().context("path of this executable")?;
    eprintln!("[{name}] starting child process");
    let status = Command::new(exe)
        .arg("gossip-child")
        .args(["--implementation", name])
        .arg("--params")
        .arg(serde_json::to_string(params)?)
        .arg("--edges")
        .arg(edges)
        .arg("--result")
        .arg(&result)
        .status()
        .with_context(|| format!("run the {name} child"))?;
    if !status.success() {
        bail!("the {name} child failed: {status}");
    }
    let mut outcome: ImplResult = read_json(&result)?;
    outcome.cpu.other_cores_busy_before = other_cores;
    Ok(outcome)
}

fn run_memory_child(
    implementation: Implementation,
    params: &Params,
    dir: &Path,
    stem: &str,
) -> Result<memory::FullMeshMemory> {
    let name = implementation.name();
    wait_for_quiet(name, params.quiet_wait_secs, params.quiet_cores)?;
    let result = dir.join(format!("{stem}.{name}.full-mesh.json"));
    let _ = std::fs::remove_file(&result);
    let exe = std::env::current_exe().context("path of this executable")?;
    eprintln!("[{name}] starting the full-mesh memory child");
    let status = Command::new(exe)
        .arg("memory-child")
        .args(["--implementation", name])
        .arg("--params")
        .arg(serde_json::to_string(params)?)
        .arg("--result")
        .arg(&result)
        .status()
        .with_context(|| format!("run the {name} memory child"))?;
    if !status.success() {
        bail!("the {name} memory child failed: {status}");
    }
    read_json(&result)
}

/// A full-mesh memory child: one implementation in a fresh runtime.
fn memory_child(implementation: Implementation, params: &Params) -> Result<memory::FullMeshMemory> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let limit = Duration::from_secs(params.idle_secs + params.settle_timeout_secs + 180);
    let name = implementation.name();
    let result = runtime.block_on(async {
        let run = async {
            match implementation {
                Implementation::Servant => memory::run::<ServantNet>(name, params).await,
                Implementation::Baseline => memory::run::<BaselineNet>(name, params).await,
            }
        };
        tokio::time::timeout(limit, run)
            .await
            .unwrap_or_else(|_| bail!("[{name}] did not finish within {limit:?}"))
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// Waits until other processes use at most `quiet_cores` (measured over 2 s, while
/// this process sleeps), or `wait_secs` passed; returns the last measurement.
fn wait_for_quiet(name: &str, wait_secs: u64, quiet_cores: f64) -> Result<f64> {
    let deadline = std::time::Instant::now() + Duration::from_secs(wait_secs);
    let window = Duration::from_secs(2);
    loop {
        let before = process::machine_busy_seconds()?;
        std::thread::sleep(window);
        let others = (process::machine_busy_seconds()? - before) / window.as_secs_f64();
        if others <= quiet_cores {
            return Ok(others);
        }
        if std::time::Instant::now() >= deadline {
            eprintln!(
                "[{name}] WARNING: other processes still keep {others:.2} cores busy; running anyway \
                 (latency will be inflated)"
            );
            return Ok(others);
        }
        eprintln!(
            "[{name}] other processes keep {others:.2} cores busy; waiting for a quiet machine"
        );
    }
}

/// A child: one implementation in a fresh runtime, with a watchdog.
fn child(implementation: Implementation, params: &Params, edges: &[Edge]) -> Result<ImplResult> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Start-up, meshing and draining take well under two minutes on a laptop.
    let limit = Duration::from_secs(
        params.secs + params.idle_secs + params.settle_timeout_secs + params.drain_secs + 180,
    );
    let name = implementation.name();
    let result = runtime.block_on(async {
        let run = async {
            match implementation {
                Implementation::Servant => {
                    driver::run::<ServantNet>(name, servant_net::DESCRIPTION, params, edges).await
                }
                Implementation::Baseline => {
                    driver::run::<BaselineNet>(name, baseline_net::DESCRIPTION, params, edges).await
                }
            }
        };
        tokio::time::timeout(limit, run)
            .await
            .unwrap_or_else(|_| bail!("[{name}] did not finish within {limit:?}"))
    });
    // Nodes may leave tasks behind (API servers, connection handlers): do not wait.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}
