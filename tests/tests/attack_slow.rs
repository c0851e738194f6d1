//! Slow readers: a peer that subscribes or asks for chunks, keeps its connection alive
//! (so ping does not catch it) and never reads what it is sent. The node's memory
//! stays flat and the peer is dropped within 30 s (see `node/src/slow_peers.rs`).
//!
//! The hostile peer is a bare rust-libp2p peer (`servant_tests::raw_peer`) that holds
//! the node's streams unread: the node's writes stop once each stream's yamux window
//! is full, and what it has for the peer waits in its queues.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use futures::AsyncWriteExt;
use libp2p::request_response::Codec;
use servant::codecs::{FileCodec, FILE_PROTOCOL};
use servant_protocol::file::Request;
use servant_tests::{
    gossip_raw::{rpc, RawGossipPeer},
    hostile::{self, mib},
    raw_peer::RawPeer,
    Net,
};

const TOPIC: &str = "slow-readers";
/// The promise: dropped within this long of becoming a slow reader.
const DROPPED_WITHIN: Duration = Duration::from_secs(30);
/// Broadcast bodies: big enough to fill the stream's window in a few dozen messages.
const BODY_BYTES: usize = 4 * 1024;
/// Broadcasts per second while the slow subscriber is connected.
const PUBLISH_RATE: usize = 200;
/// Resident memory the node may grow by while a slow reader is connected: its
/// gossipsub queue (1,000 messages of ~4 KiB here) or its pending chunk responses
/// (16 of 1 MiB), plus allocator slack.
const MAX_GROWTH: u64 = 48 * 1024 * 1024;

/// Whether node `i` of `net` is connected to `peer`.
async fn connected(net: &Net, i: usize, peer: &str) -> Result<bool> {
    Ok(net[i].peers().await?.iter().any(|p| p.peer_id == peer))
}

/// The checks both slow readers share: dropped within [`DROPPED_WITHIN`], counted
/// under `protocol`, and the node's memory grown by at most [`MAX_GROWTH`].
async fn dropped_counted_and_bounded(
    net: &Net,
    a: usize,
    protocol: &str,
    dropped_after: Duration,
    growth: u64,
) -> Result<()> {
    ensure!(
        dropped_after <= DROPPED_WITHIN,
        "dropped after {dropped_after:?}, over {DROPPED_WITHIN:?}"
    );
    println!(
        "checked: dropped {:.1} s after it stopped reading (at most {DROPPED_WITHIN:?})",
        dropped_after.as_secs_f64()
    );
    let series = format!("servant_slow_peers_dropped_total{{protocol=\"{protocol}\"}}");
    let counted = net[a].metric(&series).await?;
    ensure!(counted >= 1.0, "{series} is {counted}");
    println!("checked: {series} {counted}");
    ensure!(
        growth <= MAX_GROWTH,
        "resident memory grew {:.1} MiB (at most {:.0})",
        mib(growth),
        mib(MAX_GROWTH)
    );
    println!(
        "checked: resident memory grew {:.1} MiB (at most {:.0} MiB)",
        mib(growth),
        mib(MAX_GROWTH)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_is_dropped() -> Result<()> {
    let mut net = Net::new();
    let a = net.spawn("a", &[]).await?;
    let boot = net[a].addr().to_string();
    let b = net.spawn("b", &["--bootnode".into(), boot]).await?;
    let _sub_a = net[a].subscribe(TOPIC).await?;
    let mut sub_b = net[b].subscribe(TOPIC).await?;
    net[a].wait_mesh(TOPIC, 1, Duration::from_secs(20)).await?;

    let mut slow = RawGossipPeer::connect_unread(net[a].addr()).await?;
    slow.send_all(&[rpc::subscribe(TOPIC)]).await?;
    let slow_id = slow.peer_id.to_string();
    let proc = hostile::Proc::of_data_dir(&net[a].data_dir)?;
    let rss_before = proc.rss()?;
    let started = Instant::now();

    // Broadcast from a at PUBLISH_RATE until the slow peer is gone: enough to fill
    // its queue in a few seconds, not so much that the load itself grows the node.
    let body = "x".repeat(BODY_BYTES);
    let mut sent = Vec::new();
    let mut rss_peak = rss_before;
    let mut dropped_after = None;
    let mut pace = tokio::time::interval(Duration::from_millis(100));
    while started.elapsed() < DROPPED_WITHIN + Duration::from_secs(10) {
        pace.tick().await;
        for _ in 0..PUBLISH_RATE / 10 {
            let unique = format!("{} {body}", sent.len());
            let d = net[a].publish(TOPIC, "load", &unique).await?;
            sent.push(d.envelope.id);
        }
        rss_peak = rss_peak.max(proc.rss()?);
        if !connected(&net, a, &slow_id).await? {
            dropped_after = Some(started.elapsed());
            break;
        }
    }
    println!(
        "slow subscriber (node's gossipsub stream held unread, {} held): {} broadcasts of {} \
         KiB sent, dropped after {:?}; resident memory {:.1} MiB before, peak {:.1} MiB",
        slow.held(),
        sent.len(),
        BODY_BYTES / 1024,
        dropped_after.map(|d| format!("{:.1} s", d.as_secs_f64())),
        mib(rss_before),
        mib(rss_peak)
    );
    let dropped_after = dropped_after.context("the slow subscriber was never dropped")?;
    dropped_counted_and_bounded(
        &net,
        a,
        "gossipsub",
        dropped_after,
        rss_peak.saturating_sub(rss_before),
    )
    .await?;

    // The honest subscriber got what was sent meanwhile.
    let wanted: HashSet<String> = sent.iter().cloned().collect();
    let mut got = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < wanted.len() && Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        let (_, seen) = sub_b
            .wait_for("no such id", left.min(Duration::from_secs(1)))
            .await;
        got.extend(
            seen.into_iter()
                .map(|d| d.envelope.id)
                .filter(|id| wanted.contains(id)),
        );
    }
    let share = got.len() as f64 / wanted.len().max(1) as f64;
    ensure!(
        share >= 0.99,
        "b received {} of {} broadcasts",
        got.len(),
        wanted.len()
    );
    println!(
        "checked: the honest subscriber received {} of {} broadcasts ({:.1}%)",
        got.len(),
        wanted.len(),
        share * 100.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetcher_that_stops_reading_is_dropped() -> Result<()> {
    let mut net = Net::new();
    let a = net.spawn("a", &[]).await?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("big.bin");
    let data: Vec<u8> = (0..32u32 * 1024 * 1024)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, &data)?;
    let info = net[a].share(&path).await?;

    let mut slow = RawPeer::connect(net[a].addr(), &[]).await?;
    let slow_id = slow.peer_id.to_string();
    let proc = hostile::Proc::of_data_dir(&net[a].data_dir)?;
    let rss_before = proc.rss()?;
    // As many chunk requests as a peer may have answered at once, none read.
    const REQUESTS: u64 = 16;
    let mut streams = Vec::new();
    let started = Instant::now();
    for index in 0..REQUESTS.min(info.chunks) {
        let mut stream = slow.open(FILE_PROTOCOL).await?;
        let request = Request::Chunk { id: info.id, index };
        FileCodec
            .write_request(&FILE_PROTOCOL, &mut stream, request)
            .await?;
        stream.flush().await?;
        streams.push(stream);
    }
    let mut rss_peak = rss_before;
    let mut dropped_after = None;
    while started.elapsed() < DROPPED_WITHIN + Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss_peak = rss_peak.max(proc.rss()?);
        if !connected(&net, a, &slow_id).await? {
            dropped_after = Some(started.elapsed());
            break;
        }
    }
    println!(
        "slow fetcher: {} chunk requests of {} KiB each left unread, dropped after {:?}; \
         resident memory {:.1} MiB before, peak {:.1} MiB",
        streams.len(),
        info.size / info.chunks.max(1) / 1024,
        dropped_after.map(|d| format!("{:.1} s", d.as_secs_f64())),
        mib(rss_before),
        mib(rss_peak)
    );
    let dropped_after = dropped_after.context("the slow fetcher was never dropped")?;
    dropped_counted_and_bounded(
        &net,
        a,
        "file",
        dropped_after,
        rss_peak.saturating_sub(rss_before),
    )
    .await?;
    ensure!(net[a].livez().await, "node a is not live");
    println!("checked: the node is live");
    Ok(())
}
