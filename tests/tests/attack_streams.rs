//! A stream flood on one established connection: a hostile peer (tests/src/hostile.rs)
//! completes TCP, noise and yamux with a node, then opens 10,000 yamux streams, each
//! carrying only multistream-select's header and never a protocol, so none finishes
//! its negotiation.
//!
//! The node must stay within its caps: yamux's 512 streams per connection, and
//! libp2p-swarm's 128 inbound streams negotiating at once, each for at most its 10 s
//! negotiation timeout (a stream over either cap is reset). The attacker keeps fewer
//! than 512 streams open at a time (the most yamux allows, so every stream reaches the
//! node's stream handling instead of ending the connection), and watches from the
//! wire which streams the node took up (answered the header) and when it reset them.
//! The node may end the connection once its pings go unanswered (20 s in); all 10,000
//! streams must have been opened by then. A burst of 1,000 streams at once on a second
//! connection, past yamux's cap, follows: what the node does with it is printed. The
//! node's own count of streams still negotiating (`servant_streams{protocol="negotiating"}`)
//! stays within that cap and is back to 0 afterwards. Throughout, the node's resident memory grows
//! by at most 32 MiB; afterwards it is live and two honest nodes still exchange
//! broadcasts.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::identity::Keypair;
use servant_tests::{
    eventually,
    hostile::{self, mib, yamux, Proc},
    Net,
};
use tokio::sync::Notify;

/// Streams the flood opens.
const STREAMS: u32 = 10_000;
/// Most streams the attacker keeps open (opened, not yet reset by the node): just
/// under yamux's 512, which would end the connection.
const WINDOW: u32 = 500;
/// Streams in the burst past yamux's cap.
const BURST: u32 = 1_000;
/// libp2p-swarm's cap on inbound streams negotiating at once, per connection.
const MAX_NEGOTIATING: usize = 128;
/// libp2p-swarm's negotiation timeout is 10 s; a taken-up stream must be reset
/// within this (the timeout plus scheduling slack in a debug build).
const MAX_NEGOTIATION: Duration = Duration::from_secs(12);
/// Most the node's resident memory may grow.
const MAX_RSS_GROWTH: u64 = 32 * 1024 * 1024;
/// The topic the honest nodes join.
const TOPIC: &str = "streams";

/// What the attacker has seen on the wire, per stream it opened.
#[derive(Default)]
struct Book {
    /// Streams opened.
    opened: u32,
    /// Streams the node reset.
    reset: u32,
    /// Streams the node half-closed.
    fin: u32,
    /// Streams the node acknowledged.
    acked: u32,
    /// Streams the node answered (took up for negotiation), with when, until reset.
    engaged: HashMap<u32, Instant>,
    /// Streams ever answered.
    engaged_total: u32,
    /// Most streams taken up and not yet reset at once.
    peak_engaged: usize,
    /// Longest a taken-up stream lived before its reset.
    longest_engaged: Duration,
    /// Most streams open (opened and not reset) at once.
    peak_open: u32,
    /// The node sent GoAway.
    go_away: Option<u32>,
    /// The connection ended.
    closed: bool,
}

impl Book {
    fn open_now(&self) -> u32 {
        self.opened - self.reset
    }
}

/// Reads the node's frames until the connection ends, keeping the book.
async fn read_frames(
    mut rx: futures::io::ReadHalf<hostile::Secured>,
    book: Arc<Mutex<Book>>,
    changed: Arc<Notify>,
) {
    let mut body = vec![0u8; 64 * 1024];
    loop {
        let mut raw = [0u8; 12];
        if rx.read_exact(&mut raw).await.is_err() {
            break;
        }
        let h = yamux::Header::decode(&raw);
        let mut left = if h.kind == yamux::DATA {
            h.length as usize
        } else {
            0
        };
        while left > 0 {
            let n = left.min(body.len());
            if rx.read_exact(&mut body[..n]).await.is_err() {
                break;
            }
            left -= n;
        }
        {
            let mut b = book.lock().unwrap_or_else(|e| e.into_inner());
            if h.kind == yamux::GO_AWAY {
                b.go_away = Some(h.length);
            }
            // Odd ids are the streams we opened; the node's own are even.
            if h.stream % 2 == 1 {
                if h.flags & yamux::ACK != 0 {
                    b.acked += 1;
                }
                if h.flags & yamux::FIN != 0 {
                    b.fin += 1;
                }
                if h.flags & yamux::RST != 0 {
                    b.reset += 1;
                    if let Some(since) = b.engaged.remove(&h.stream) {
                        b.longest_engaged = b.longest_engaged.max(since.elapsed());
                    }
                } else if h.kind == yamux::DATA && h.length > 0 {
                    if let std::collections::hash_map::Entry::Vacant(e) = b.engaged.entry(h.stream)
                    {
                        e.insert(Instant::now());
                        b.engaged_total += 1;
                        b.peak_engaged = b.peak_engaged.max(b.engaged.len());
                    }
                }
            }
        }
        changed.notify_one();
    }
    book.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
    changed.notify_one();
}

/// Two honest nodes in one topic's mesh; node 0 is the target.
async fn honest_pair() -> Result<Net> {
    let mut net = Net::new();
    let a = net.spawn("target", &[]).await?;
    let boot = net[a].addr().to_string();
    net.spawn("honest", &["--bootnode".into(), boot]).await?;
    Ok(net)
}

/// Mesh peers of node `i` in TOPIC.
async fn mesh_peers(net: &Net, i: usize) -> Result<usize> {
    Ok(net[i]
        .status()
        .await?
        .topics
        .iter()
        .find(|t| t.name == TOPIC)
        .map_or(0, |t| t.mesh_peers))
}

/// The node's `servant_streams{protocol="negotiating"}`.
async fn negotiating(metrics_url: &str) -> Option<f64> {
    let text = reqwest::get(metrics_url).await.ok()?.text().await.ok()?;
    servant_tests::metric_value(&text, "servant_streams{protocol=\"negotiating\"}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_flood_stays_within_the_caps() -> Result<()> {
    let mut net = honest_pair().await?;
    let mut sub_a = net[0].subscribe(TOPIC).await?;
    let mut sub_b = net[1].subscribe(TOPIC).await?;
    for i in [0, 1] {
        let net = &net;
        eventually(Duration::from_secs(20), "a mesh peer", || async move {
            Ok((mesh_peers(net, i).await? >= 1).then_some(()))
        })
        .await?;
    }
    let proc = Proc::of_data_dir(&net[0].data_dir)?;
    let dst = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), net[0].p2p_port);
    let io = hostile::establish(
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
        dst,
        &Keypair::generate_ed25519(),
        Duration::from_secs(10),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base_rss = proc.rss()?;

    let stop = Arc::new(AtomicBool::new(false));
    let max_rss = Arc::new(AtomicU64::new(base_rss));
    let max_negotiating = Arc::new(AtomicU64::new(0));
    let watch = {
        let (stop, max_rss) = (stop.clone(), max_rss.clone());
        let (max_negotiating, metrics) = (max_negotiating.clone(), net[0].api_url() + "/metrics");
        tokio::spawn(async move {
            let mut scraped = Instant::now() - Duration::from_secs(1);
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = proc.rss() {
                    max_rss.fetch_max(n, Ordering::Relaxed);
                }
                // What an operator would see: the node's own gauge, not the wire.
                if scraped.elapsed() >= Duration::from_millis(250) {
                    scraped = Instant::now();
                    if let Some(n) = negotiating(&metrics).await {
                        max_negotiating.fetch_max(n as u64, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let (rx, mut tx) = io.split();
    let book = Arc::new(Mutex::new(Book::default()));
    let changed = Arc::new(Notify::new());
    let reader = tokio::spawn(read_frames(rx, book.clone(), changed.clone()));

    // Phase 1: 10,000 streams, never more than WINDOW open.
    let started = Instant::now();
    let mut next_id: u32 = 1;
    let mut batch = Vec::new();
    'flood: for _ in 0..STREAMS {
        loop {
            let (ended, room) = {
                let b = book.lock().unwrap_or_else(|e| e.into_inner());
                (b.closed || b.go_away.is_some(), b.open_now() < WINDOW)
            };
            if ended {
                break 'flood;
            }
            if room {
                break;
            }
            if !batch.is_empty() {
                tx.write_all(&batch).await.context("write streams")?;
                tx.flush().await?;
                batch.clear();
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), changed.notified()).await;
        }
        batch.extend(yamux::open_with(next_id, hostile::MULTISTREAM_HEADER));
        next_id += 2;
        {
            let mut b = book.lock().unwrap_or_else(|e| e.into_inner());
            b.opened += 1;
            b.peak_open = b.peak_open.max(b.open_now());
        }
        if batch.len() >= 16 * 1024 {
            tx.write_all(&batch).await.context("write streams")?;
            batch.clear();
        }
        ensure!(
            started.elapsed() < Duration::from_secs(40),
            "the flood did not get through its streams within 40 s"
        );
    }
    tx.write_all(&batch).await.context("write streams")?;
    tx.flush().await?;
    let sent_in = started.elapsed();
    // Wait for the node to reset every stream it took up. It negotiates 128 at once;
    // up to 256 more wait in libp2p-yamux's inbound buffer and are taken up as slots
    // free, 128 each time a round times out: three rounds. (While the node negotiated
    // its own streams eagerly, its first ping timed out in negotiation, was retried at
    // once and closed the connection after the second round; negotiated lazily, the
    // ping is sent and waits out its 10 s timeout, then the interval, so the third round runs.)
    let drained = eventually(
        3 * MAX_NEGOTIATION + Duration::from_secs(3),
        "the node to reset every stream it took up",
        || {
            let book = book.clone();
            async move {
                let b = book.lock().unwrap_or_else(|e| e.into_inner());
                Ok((b.engaged.is_empty() || b.closed).then_some(()))
            }
        },
    )
    .await;
    // Streams still taken up when the connection ended count with their age then.
    let oldest_unreset = {
        let b = book.lock().unwrap_or_else(|e| e.into_inner());
        let oldest = b.engaged.values().map(Instant::elapsed).max();
        println!(
            "after the flood: {} streams were still taken up when the node ended the connection \
             (oldest {:.2} s); {} half-closed by the node",
            b.engaged.len(),
            oldest.unwrap_or_default().as_secs_f64(),
            b.fin
        );
        oldest.unwrap_or_default()
    };
    let (opened, reset, acked, engaged_total, peak_engaged, longest, peak_open, closed, away) = {
        let b = book.lock().unwrap_or_else(|e| e.into_inner());
        (
            b.opened,
            b.reset,
            b.acked,
            b.engaged_total,
            b.peak_engaged,
            b.longest_engaged.max(oldest_unreset),
            b.peak_open,
            b.closed,
            b.go_away,
        )
    };
    println!(
        "flood: {opened} streams opened on one connection in {:.1} s (at most {peak_open} open at \
         once); the node acknowledged {acked}, took up {engaged_total} for negotiation and reset \
         {reset}; connection closed: {closed}, go-away: {away:?}",
        sent_in.as_secs_f64()
    );
    ensure!(
        opened == STREAMS,
        "the node ended the connection after {opened} streams, with never more than {WINDOW} open"
    );
    println!(
        "checked: at most {peak_engaged} streams negotiating at once (libp2p-swarm's cap {MAX_NEGOTIATING})"
    );
    ensure!(
        peak_engaged <= MAX_NEGOTIATING,
        "{peak_engaged} streams negotiated at once"
    );
    drained?;
    println!(
        "checked: every stream taken up was reset (or ended with the connection) at most {:.2} s \
         after (at most {MAX_NEGOTIATION:?})",
        longest.as_secs_f64()
    );
    ensure!(
        longest <= MAX_NEGOTIATION,
        "a stream negotiated for {:.2} s",
        longest.as_secs_f64()
    );

    drop(tx);
    reader.abort();

    // Phase 2: on a new connection, a burst past yamux's cap without waiting for resets.
    let io = hostile::establish(
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)),
        dst,
        &Keypair::generate_ed25519(),
        Duration::from_secs(10),
    )
    .await?;
    let (rx, mut tx) = io.split();
    let book = Arc::new(Mutex::new(Book::default()));
    let reader = tokio::spawn(read_frames(rx, book.clone(), changed.clone()));
    let mut burst = Vec::new();
    for i in 0..BURST {
        burst.extend(yamux::open_with(2 * i + 1, hostile::MULTISTREAM_HEADER));
    }
    let burst_sent = tx.write_all(&burst).await.and(tx.flush().await).is_ok();
    let ended = eventually(
        Duration::from_secs(5),
        "the node to end the connection",
        || {
            let book = book.clone();
            async move {
                let b = book.lock().unwrap_or_else(|e| e.into_inner());
                Ok((b.closed || b.go_away.is_some()).then_some(()))
            }
        },
    )
    .await;
    {
        let b = book.lock().unwrap_or_else(|e| e.into_inner());
        println!(
            "burst: {BURST} streams at once on a new connection (written: {burst_sent}): {}; \
             go-away code {:?}, streams reset {}",
            if ended.is_ok() {
                "the node ended the connection"
            } else {
                "the connection stayed up for 5 s"
            },
            b.go_away,
            b.reset
        );
    }
    drop(tx);
    reader.abort();

    stop.store(true, Ordering::Relaxed);
    let _ = watch.await;
    let peak = max_rss.load(Ordering::Relaxed);
    let growth = peak.saturating_sub(base_rss);
    println!(
        "checked: resident memory {:.1} MiB before, peak {:.1} MiB, grew {:.1} MiB (at most {} MiB)",
        mib(base_rss),
        mib(peak),
        mib(growth),
        mib(MAX_RSS_GROWTH)
    );
    ensure!(
        growth <= MAX_RSS_GROWTH,
        "resident memory grew {:.1} MiB",
        mib(growth)
    );

    let peak_negotiating = max_negotiating.load(Ordering::Relaxed);
    println!(
        "checked: the node's servant_streams{{protocol=\"negotiating\"}} peaked at \
         {peak_negotiating} (at most {MAX_NEGOTIATING} per connection, one hostile connection \
         at a time)"
    );
    ensure!(
        peak_negotiating > 0 && peak_negotiating as usize <= MAX_NEGOTIATING + 8,
        "servant_streams negotiating peaked at {peak_negotiating}"
    );
    let metrics = net[0].api_url() + "/metrics";
    eventually(
        Duration::from_secs(15),
        "no stream left negotiating",
        || {
            let metrics = metrics.clone();
            async move { Ok((negotiating(&metrics).await == Some(0.0)).then_some(())) }
        },
    )
    .await?;
    println!("checked: after the flood no stream is left negotiating");

    ensure!(net[0].livez().await, "the target stopped answering /livez");
    for (from, sub) in [(1, &mut sub_a), (0, &mut sub_b)] {
        let body = format!("from {} after the stream flood", net[from].name);
        let sent = net[from].publish(TOPIC, "honest", &body).await?;
        let (got, _) = sub
            .wait_for(&sent.envelope.id, Duration::from_secs(10))
            .await;
        ensure!(got.is_some(), "{body:?} never arrived");
    }
    println!("checked: the target is live and the honest nodes exchange broadcasts both ways");
    net.pass();
    Ok(())
}
