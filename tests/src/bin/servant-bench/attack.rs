//! `attack`: what a connection flood costs an honest peer. One `servant` process
//! with small caps; an honest peer connects to it again and again (TCP, noise and
//! yamux from 127.0.0.1 with a fresh identity each time), first on a quiet node and
//! then while the flood of `tests/tests/attack_conn.rs` runs (thousands of dials from
//! hundreds of identities over several source addresses, each holding its
//! connection). The latencies go into the report side by side; the attack test
//! asserts the caps, this measures what staying under them costs.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::Args;
use futures::AsyncReadExt;
use libp2p::identity::Keypair;
use serde::{Deserialize, Serialize};
use servant_tests::{
    hostile::{self, Flood, FloodOutcomes, Proc},
    Net,
};

use crate::process::Machine;

/// Parameters of `servant-bench attack`.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct AttackParams {
    /// Hostile dials in the flood.
    #[arg(long, default_value_t = 2_000)]
    pub dials: usize,
    /// Identities the hostile dials use in turn.
    #[arg(long, default_value_t = 500)]
    pub identities: usize,
    /// Hostile source addresses (127.0.0.2 and up).
    #[arg(long, default_value_t = 8)]
    pub sources: u8,
    /// Seconds over which the hostile dials start.
    #[arg(long, default_value_t = 15)]
    pub spread_secs: u64,
    /// Honest connections timed in each phase.
    #[arg(long, default_value_t = 40)]
    pub honest: usize,
    /// The node's `--max-connections`.
    #[arg(long, default_value_t = 64)]
    pub cap: u32,
    /// The node's `--max-connections-per-ip`.
    #[arg(long, default_value_t = 4)]
    pub per_ip: u32,
}

/// Honest connections of one phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Phase {
    /// `quiet` or `flood`.
    pub name: String,
    /// Connections tried.
    pub tried: usize,
    /// Handshakes that completed and were not closed by the node within `KEPT`.
    pub kept: usize,
    /// Handshake times of the kept connections, milliseconds: median, 99th
    /// percentile, worst.
    pub p50_ms: f64,
    /// See `p50_ms`.
    pub p99_ms: f64,
    /// See `p50_ms`.
    pub max_ms: f64,
}

/// The report.
#[derive(Debug, Serialize, Deserialize)]
pub struct AttackReport {
    /// Always `attack`.
    pub benchmark: &'static str,
    /// When the run finished, seconds since the Unix epoch.
    pub finished_unix: u64,
    /// The machine.
    pub machine: Machine,
    /// The parameters.
    pub params: AttackParams,
    /// How each phase went for the honest peer.
    pub phases: Vec<Phase>,
    /// Flood p50 over quiet p50, and the same for p99.
    pub p50_ratio: f64,
    /// See `p50_ratio`.
    pub p99_ratio: f64,
    /// Hostile dials that completed their handshake.
    pub flood_established: usize,
    /// Hostile dials that did not.
    pub flood_refused: usize,
    /// Node resident memory before and at the end of the flood, MiB.
    pub rss_mib: (f64, f64),
}

/// How long an honest connection must stay open to count as kept: the node closes
/// a refused one right after the handshake.
const KEPT: Duration = Duration::from_millis(200);

/// One honest connection: the handshake time if the node kept it.
async fn honest_connect(dst: SocketAddr) -> Option<Duration> {
    let key = Keypair::generate_ed25519();
    let started = Instant::now();
    let mut io = hostile::establish(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        dst,
        &key,
        Duration::from_secs(10),
    )
    .await
    .ok()?;
    let took = started.elapsed();
    let mut buf = vec![0u8; 4096];
    // Whatever the node sends (its own streams) is read; an end of stream within
    // KEPT is a refusal.
    let closed = tokio::time::timeout(KEPT, async {
        loop {
            match io.read(&mut buf).await {
                Ok(n) if n > 0 => continue,
                _ => return,
            }
        }
    })
    .await;
    closed.is_err().then_some(took)
}

async fn phase(name: &str, dst: SocketAddr, n: usize, gap: Duration) -> Phase {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        if let Some(t) = honest_connect(dst).await {
            times.push(t.as_secs_f64() * 1000.0);
        }
        tokio::time::sleep(gap).await;
    }
    times.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if times.is_empty() {
            f64::NAN
        } else {
            times[((times.len() - 1) as f64 * q).round() as usize]
        }
    };
    Phase {
        name: name.to_string(),
        tried: n,
        kept: times.len(),
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        max_ms: at(1.0),
    }
}

/// Runs the benchmark and writes the report and its table.
pub async fn run(params: &AttackParams, out: &Path) -> Result<AttackReport> {
    hostile::raise_fd_limit();
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    if std::env::var_os("SERVANT_BIN").is_none() {
        let bin = std::env::current_exe()?.with_file_name("servant");
        std::env::set_var("SERVANT_BIN", bin);
    }
    let mut net = Net::new();
    let t = net
        .spawn(
            "target",
            &[
                "--max-connections".into(),
                params.cap.to_string(),
                "--max-connections-per-ip".into(),
                params.per_ip.to_string(),
            ],
        )
        .await?;
    let proc = Proc::of_data_dir(&net[t].data_dir)?;
    let dst = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), net[t].p2p_port);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = proc.rss()?;

    eprintln!(
        "[attack] {} honest connections on a quiet node",
        params.honest
    );
    let quiet = phase("quiet", dst, params.honest, Duration::from_millis(100)).await;

    let keys: Arc<Vec<Keypair>> = Arc::new(
        (0..params.identities.max(1))
            .map(|_| Keypair::generate_ed25519())
            .collect(),
    );
    let outcomes = Arc::new(FloodOutcomes::default());
    let spread = Duration::from_secs(params.spread_secs);
    let flood = tokio::spawn(
        Flood {
            dials: params.dials,
            sources: params.sources,
            spread,
            max_in_flight: 400,
            hold: Duration::from_secs(3),
        }
        .run(dst, keys, outcomes.clone()),
    );
    eprintln!(
        "[attack] {} hostile dials over {spread:?}; {} honest connections meanwhile",
        params.dials, params.honest
    );
    // The honest connections spread over the flood once it is under way.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let gap = spread.saturating_sub(Duration::from_secs(2)) / params.honest.max(1) as u32;
    let flooded = phase("flood", dst, params.honest, gap).await;
    let rss_after = proc.rss()?;
    flood.await.context("the flood panicked")?;
    net.pass();

    let report = AttackReport {
        benchmark: "attack",
        finished_unix: crate::unix_now(),
        machine: Machine::detect(),
        params: params.clone(),
        p50_ratio: flooded.p50_ms / quiet.p50_ms,
        p99_ratio: flooded.p99_ms / quiet.p99_ms,
        phases: vec![quiet, flooded],
        flood_established: outcomes.established.load(Ordering::Relaxed),
        flood_refused: outcomes.refused.load(Ordering::Relaxed),
        rss_mib: (hostile::mib(rss_before), hostile::mib(rss_after)),
    };
    crate::publish(out, &report, &table(&report))?;
    Ok(report)
}

/// The report as a table.
pub fn table(r: &AttackReport) -> String {
    let p = &r.params;
    let mut s = format!(
        "attack: {} hostile dials from {} identities on {} addresses over {} s against a node \
         capped at {} connections ({} per IP); {} honest connections per phase\n\
         flood: {} hostile handshakes completed, {} refused; node memory {:.1} -> {:.1} MiB\n\n",
        p.dials,
        p.identities,
        p.sources,
        p.spread_secs,
        p.cap,
        p.per_ip,
        p.honest,
        r.flood_established,
        r.flood_refused,
        r.rss_mib.0,
        r.rss_mib.1
    );
    s.push_str("phase   kept/tried   p50 ms   p99 ms   max ms\n");
    s.push_str("---------------------------------------------\n");
    for ph in &r.phases {
        s.push_str(&format!(
            "{:<7} {:>5}/{:<5} {:>8.1} {:>8.1} {:>8.1}\n",
            ph.name, ph.kept, ph.tried, ph.p50_ms, ph.p99_ms, ph.max_ms
        ));
    }
    s.push_str(&format!(
        "\nflood / quiet: p50 {:.2}x, p99 {:.2}x (reported, not a target)\n",
        r.p50_ratio, r.p99_ratio
    ));
    s
}
