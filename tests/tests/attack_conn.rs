//! Connection-level attacks on one node, each by a hostile peer written for the test
//! (tests/src/hostile.rs), each checked against a figure:
//!
//! - a connection flood: 2,000 dials from 500 fresh identities over eight source
//!   addresses (127.0.0.2 to 127.0.0.9, standing for eight attacking hosts), each
//!   completing TCP, noise and yamux and then holding the connection without speaking
//!   any protocol. The node never holds more established connections than its
//!   `--max-connections`, nor more per address than its `--max-connections-per-ip`,
//!   its descriptors stay under that cap plus 64, its resident
//!   memory grows by at most 256 MiB, an honest node still joins during the flood, and
//!   its descriptors return to their baseline once the flood ends.
//! - slowloris: 500 TCP connections that trickle the multistream header one byte every
//!   5 s and so never finish a handshake: the node closes every one of them within
//!   15 s (libp2p's `SwarmBuilder` puts a 10 s deadline on the whole transport upgrade,
//!   and connections over `max_pending_connections` are closed at once).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use libp2p::identity::Keypair;
use servant_tests::{
    eventually,
    hostile::{self, mib, Flood, FloodOutcomes, Proc},
    Net,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The node's cap on established connections for the flood: small, so the flood
/// overruns it many times over.
const CAP: u32 = 64;
/// Its per-IP cap: the eight attacking addresses may hold 32 connections together,
/// half of `CAP`, so the rest stays open to honest peers from other addresses. (With
/// 16 per address, 128 together, the flood held every slot and the honest node could
/// not join for as long as the flood lasted: the per-IP cap times the attacker's
/// addresses must stay under the total for newcomers to get in.)
const PER_IP: u32 = 4;
/// Dials in the flood.
const DIALS: usize = 2_000;
/// Fresh identities the dials use in turn.
const IDENTITIES: usize = 500;
/// Source addresses: 127.0.0.2 ..= 127.0.0.(1 + SOURCES).
const SOURCES: u8 = 8;
/// The dials start evenly spread over this.
const FLOOD_DURATION: Duration = Duration::from_secs(15);
/// Most hostile dials in flight (connecting or holding) at once.
const MAX_IN_FLIGHT: usize = 400;
/// How long a hostile connection is held once established (unless the node closes it).
const HOLD: Duration = Duration::from_secs(3);
/// Most descriptors the node may hold above its connection cap (listeners, API, data
/// files, connections still in their handshake).
const FD_HEADROOM: usize = 64;
/// Most its resident memory may grow during the flood.
const MAX_RSS_GROWTH: u64 = 256 * 1024 * 1024;
/// An honest node started during the flood must be connected within this.
const HONEST_CONNECT: Duration = Duration::from_secs(10);
/// Descriptors must be back within this of the flood's end ...
const FD_RECOVERY: Duration = Duration::from_secs(30);
/// ... to at most this many above the baseline: the honest node's connection stays,
/// and the node may have opened a file or two (known peers) meanwhile.
const FD_TOLERANCE: usize = 8;

/// Highest value seen.
fn raise(max: &AtomicU64, value: u64) {
    max.fetch_max(value, Ordering::Relaxed);
}

/// Median of three samples 200 ms apart: one stray descriptor (a file being saved)
/// should not move a baseline.
async fn fds_settled(p: Proc) -> Result<usize> {
    let mut v = Vec::new();
    for _ in 0..3 {
        v.push(p.open_fds()?);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    v.sort_unstable();
    Ok(v[1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_flood_stays_under_the_caps() -> Result<()> {
    let limit = hostile::raise_fd_limit();
    let mut net = Net::new();
    let t = net
        .spawn(
            "target",
            &[
                "--max-connections".into(),
                CAP.to_string(),
                "--max-connections-per-ip".into(),
                PER_IP.to_string(),
            ],
        )
        .await?;
    let proc = Proc::of_data_dir(&net[t].data_dir)?;
    println!(
        "test process open-file limit {limit}; node pid {} open-file limit {}",
        proc.pid,
        proc.fd_limit()?
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base_fds = fds_settled(proc).await?;
    let base_rss = proc.rss()?;
    println!(
        "baseline: {base_fds} descriptors, {:.1} MiB resident",
        mib(base_rss)
    );

    // Watch the node: descriptors and memory from /proc every 50 ms, established
    // connections as it reports them, as often as its API answers.
    let stop = Arc::new(AtomicBool::new(false));
    let max_fds = Arc::new(AtomicU64::new(0));
    let max_rss = Arc::new(AtomicU64::new(0));
    let max_conns = Arc::new(AtomicU64::new(0));
    let conn_samples = Arc::new(AtomicU64::new(0));
    let watch_proc = {
        let (stop, max_fds, max_rss) = (stop.clone(), max_fds.clone(), max_rss.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = proc.open_fds() {
                    raise(&max_fds, n as u64);
                }
                if let Ok(n) = proc.rss() {
                    raise(&max_rss, n);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let watch_conns = {
        let (stop, max_conns, samples) = (stop.clone(), max_conns.clone(), conn_samples.clone());
        let api = (*net[t]).clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(s) = api.status().await {
                    raise(&max_conns, s.connections as u64);
                    samples.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // The flood.
    let keys: Arc<Vec<Keypair>> = Arc::new(
        (0..IDENTITIES)
            .map(|_| Keypair::generate_ed25519())
            .collect(),
    );
    let dst = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), net[t].p2p_port);
    let outcomes = Arc::new(FloodOutcomes::default());
    let flood_started = Instant::now();
    // Dials start at a steady pace, so the flood lasts long enough for an honest node
    // to join in the middle of it; `max_in_flight` bounds the test's own sockets.
    let flood = tokio::spawn(
        Flood {
            dials: DIALS,
            sources: SOURCES,
            spread: FLOOD_DURATION,
            max_in_flight: MAX_IN_FLIGHT,
            hold: HOLD,
        }
        .run(dst, keys.clone(), outcomes.clone()),
    );

    // An honest node joins while the flood runs.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let boot = net[t].addr().to_string();
    let h = net.spawn("honest", &["--bootnode".into(), boot]).await?;
    let honest_started = Instant::now();
    let honest_id = net[h].id();
    let (net_ref, target) = (&net, t);
    let joined = eventually(
        HONEST_CONNECT,
        "the honest node to be connected to the target during the flood",
        || async move {
            Ok(net_ref[target]
                .peer_ids()
                .await?
                .contains(&honest_id)
                .then_some(()))
        },
    )
    .await;
    let honest_took = honest_started.elapsed();
    let dials_when_joined = outcomes.started.load(Ordering::Relaxed);

    flood.await.context("the flood panicked")?;
    let flood_ended = Instant::now();
    let flood_took = flood_ended - flood_started;

    // Descriptors back to baseline once the attackers are gone.
    let recovered = eventually(
        FD_RECOVERY,
        "the node's descriptors to return to their baseline",
        || async move {
            let n = proc.open_fds()?;
            Ok((n <= base_fds + FD_TOLERANCE).then_some(n))
        },
    )
    .await;
    let recovery_took = flood_ended.elapsed();
    stop.store(true, Ordering::Relaxed);
    let _ = watch_proc.await;
    let _ = watch_conns.await;

    let peak_fds = max_fds.load(Ordering::Relaxed) as usize;
    let peak_rss = max_rss.load(Ordering::Relaxed);
    let peak_conns = max_conns.load(Ordering::Relaxed);
    let growth = peak_rss.saturating_sub(base_rss);
    println!(
        "flood: {DIALS} dials from {IDENTITIES} identities over {SOURCES} source addresses, \
         at most {MAX_IN_FLIGHT} in flight, in {:.1} s: {} established (the node closed {} of them within \
         {HOLD:?}), {} refused or cut off in the handshake",
        flood_took.as_secs_f64(),
        outcomes.established.load(Ordering::Relaxed),
        outcomes.closed_by_node.load(Ordering::Relaxed),
        outcomes.refused.load(Ordering::Relaxed),
    );
    let metrics = net[t].metrics().await?;
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("servant_connections_denied_total"))
    {
        println!("  {line}");
    }

    ensure!(
        outcomes.started.load(Ordering::Relaxed) >= DIALS,
        "the flood did not make its {DIALS} dials"
    );
    println!(
        "checked: established connections at the node peaked at {peak_conns} (cap {CAP}; \
         {} status samples during the flood)",
        conn_samples.load(Ordering::Relaxed)
    );
    ensure!(
        peak_conns <= u64::from(CAP),
        "the node held {peak_conns} established connections, over its cap of {CAP}"
    );
    // The attackers' share: per-IP cap times their addresses; the honest node (two
    // connections at most, TCP and QUIC, before duplicates close) comes on top.
    let attackers_max = u64::from(SOURCES) * u64::from(PER_IP);
    ensure!(
        peak_conns <= attackers_max + 2,
        "the node held {peak_conns} established connections, over {attackers_max} \
         (per-IP cap {PER_IP} x {SOURCES} addresses) + 2 honest"
    );
    let per_ip_refused = net[t]
        .metric("servant_connections_denied_total{reason=\"ip_limit\"}")
        .await?;
    ensure!(per_ip_refused > 0.0, "the per-IP cap refused nothing");
    println!(
        "checked: at most {attackers_max} of them from the eight attacking addresses \
         (per-IP cap {PER_IP}); {per_ip_refused} refused by it"
    );
    println!(
        "checked: open descriptors peaked at {peak_fds} (baseline {base_fds}, at most cap {CAP} + \
         {FD_HEADROOM} = {})",
        CAP as usize + FD_HEADROOM
    );
    ensure!(
        peak_fds <= CAP as usize + FD_HEADROOM,
        "the node held {peak_fds} descriptors, over cap + {FD_HEADROOM}"
    );
    println!(
        "checked: resident memory peaked at {:.1} MiB, {:.1} MiB over its baseline (at most {} MiB)",
        mib(peak_rss),
        mib(growth),
        mib(MAX_RSS_GROWTH)
    );
    ensure!(
        growth <= MAX_RSS_GROWTH,
        "resident memory grew {:.1} MiB",
        mib(growth)
    );
    let now = recovered?;
    println!(
        "checked: descriptors back to {now} (baseline {base_fds}, tolerance +{FD_TOLERANCE}) \
         {:.1} s after the flood ended (at most {FD_RECOVERY:?})",
        recovery_took.as_secs_f64()
    );
    ensure!(net[t].livez().await, "the node stopped answering /livez");
    println!("checked: the node is live");
    if let Err(e) = joined {
        let later = eventually(
            Duration::from_secs(20),
            "the honest node to be connected after the flood",
            || async move {
                Ok(net_ref[target]
                    .peer_ids()
                    .await?
                    .contains(&honest_id)
                    .then_some(()))
            },
        )
        .await;
        println!(
            "the honest node was not connected within {HONEST_CONNECT:?} of its start during the \
             flood; {}",
            match later {
                Ok(()) => format!(
                    "it was {:.1} s after its start, {:.1} s after the flood ended",
                    honest_started.elapsed().as_secs_f64(),
                    flood_ended.elapsed().as_secs_f64()
                ),
                Err(_) => "nor within 20 s after".to_string(),
            }
        );
        return Err(e.context(
            "connection flood: the hostile connections held every slot under the cap and the \
             honest node was refused at each dial",
        ));
    }
    println!(
        "checked: the honest node was connected {:.2} s after it started, during the flood \
         ({dials_when_joined} of {DIALS} hostile dials made by then; at most {HONEST_CONNECT:?})",
        honest_took.as_secs_f64()
    );
    ensure!(
        dials_when_joined < DIALS,
        "the flood had ended before the honest node joined: nothing was shown"
    );
    net.pass();
    Ok(())
}

/// Connections in the slowloris attack.
const SLOW_CONNECTIONS: usize = 500;
/// Seconds between the bytes each one trickles.
const TRICKLE: Duration = Duration::from_secs(5);
/// Every slow connection must be closed by the node within this of its opening.
const SLOW_DEADLINE: Duration = Duration::from_secs(15);
/// How long the test waits for a close before calling the connection kept open.
const SLOW_GIVE_UP: Duration = Duration::from_secs(25);

/// One slow connection from `src`: trickles the multistream header one byte per
/// `TRICKLE` and returns how long after its opening the node closed it (`None`:
/// still open after `SLOW_GIVE_UP`; `Err`: it could not be opened).
async fn slow_connection(src: IpAddr, dst: SocketAddr) -> Result<Option<Duration>> {
    let stream = hostile::tcp_from(src, dst).await.context("connect")?;
    let opened = Instant::now();
    let (mut rx, mut tx) = stream.into_split();
    let writer = tokio::spawn(async move {
        for byte in hostile::MULTISTREAM_HEADER {
            if tx.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(TRICKLE).await;
        }
        // Never more: the handshake stays unfinished. Keep the write half open.
        std::future::pending::<()>().await;
    });
    let mut sink = [0u8; 1024];
    let closed = tokio::time::timeout(SLOW_GIVE_UP, async {
        while matches!(rx.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
    writer.abort();
    Ok(closed.ok().map(|()| opened.elapsed()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_dropped() -> Result<()> {
    hostile::raise_fd_limit();
    let mut net = Net::new();
    let t = net.spawn("target", &[]).await?;
    let proc = Proc::of_data_dir(&net[t].data_dir)?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base_fds = fds_settled(proc).await?;
    let dst = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), net[t].p2p_port);

    let started = Instant::now();
    let tasks: Vec<_> = (0..SLOW_CONNECTIONS)
        .map(|i| {
            let src = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % 8) as u8));
            tokio::spawn(slow_connection(src, dst))
        })
        .collect();
    // The node's descriptors while the slow connections are open.
    let mut peak_fds = 0;
    while started.elapsed() < Duration::from_secs(12) {
        peak_fds = peak_fds.max(proc.open_fds()?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut closed = Vec::new();
    let mut kept_open = 0;
    let mut failed = 0;
    for task in tasks {
        match task.await.context("a slow connection panicked")? {
            Ok(Some(after)) => closed.push(after),
            Ok(None) => kept_open += 1,
            Err(_) => failed += 1,
        }
    }
    closed.sort_unstable();
    let quick = closed
        .iter()
        .filter(|d| **d < Duration::from_secs(1))
        .count();
    let pct = |p: usize| {
        closed
            .get((closed.len().saturating_sub(1)) * p / 100)
            .map_or(0.0, Duration::as_secs_f64)
    };
    println!(
        "slowloris: {SLOW_CONNECTIONS} connections trickling one byte per {TRICKLE:?}; {} closed \
         by the node ({quick} within 1 s), {kept_open} still open after {SLOW_GIVE_UP:?}, \
         {failed} could not connect; close times p50 {:.2} s, p90 {:.2} s, max {:.2} s; \
         node descriptors {base_fds} before, peak {peak_fds}",
        closed.len(),
        pct(50),
        pct(90),
        pct(100),
    );
    ensure!(failed == 0, "{failed} slow connections could not be opened");
    ensure!(
        kept_open == 0,
        "{kept_open} slow connections were still open after {SLOW_GIVE_UP:?}"
    );
    let worst = closed.last().copied().unwrap_or_default();
    println!(
        "checked: the node dropped all {SLOW_CONNECTIONS} slow connections, the last {:.2} s after \
         it opened (at most {SLOW_DEADLINE:?})",
        worst.as_secs_f64()
    );
    ensure!(
        worst <= SLOW_DEADLINE,
        "a slow connection lived {:.2} s",
        worst.as_secs_f64()
    );
    ensure!(net[t].livez().await, "the node stopped answering /livez");
    println!("checked: the node is live");
    net.pass();
    Ok(())
}
