//! DHT store flood: 100,000 ADD_PROVIDER records from 100 identities. The node keeps
//! at most `provider_store::MAX_REMOTE_PROVIDER_KEYS` keys of remote records and
//! refuses (and counts) the rest; its own provider records live apart and are still
//! found, so a peer can still fetch what the node shares.
//!
//! The flooders are raw peers (`servant_tests::raw_peer`) writing hand-encoded
//! Kademlia messages (`servant_tests::kad_raw`) on one stream each: libp2p-kad itself
//! sends ADD_PROVIDER only for keys its node provides.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use futures::AsyncWriteExt;
use rand::RngCore;
use servant::{behaviour::KAD_PROTOCOL, provider_store::MAX_REMOTE_PROVIDER_KEYS};
use servant_tests::{
    eventually,
    hostile::{self, mib},
    kad_raw,
    raw_peer::RawPeer,
    Net,
};

/// Identities that flood.
const FLOODERS: usize = 100;
/// Records each sends, every one for a fresh random key.
const RECORDS_EACH: usize = 1_000;
/// Most the node's resident memory may grow: the capped store (4,096 keys, about
/// 2.3 MiB, see `provider_store`) and a hundred connections held open at once, which
/// are most of it: +28.4 MiB in one run with this store, about +29 in earlier runs
/// with libp2p's `MemoryStore` (much of whose reserved room was never written, so
/// never resident).
const MAX_GROWTH: u64 = 48 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_record_flood_stays_within_the_store_caps() -> Result<()> {
    let mut net = Net::new();
    let a = net.spawn("a", &[]).await?;
    let boot = net[a].addr().to_string();
    let c = net.spawn("c", &["--bootnode".into(), boot]).await?;
    let dir = tempfile::tempdir()?;
    let shared = dir.path().join("shared.bin");
    let data: Vec<u8> = (0..3u32 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    std::fs::write(&shared, &data)?;
    let info = net[a].share(&shared).await?;

    let proc = hostile::Proc::of_data_dir(&net[a].data_dir)?;
    let rss_before = proc.rss()?;
    let refused = "servant_kad_provider_records_refused_total";
    let refused_before = net[a].metric(refused).await?;
    let addr: libp2p::Multiaddr = "/ip4/127.0.0.1/tcp/1".parse()?;
    let started = Instant::now();
    let mut rng = rand::thread_rng();
    let mut rss_peak = rss_before;
    // Kept connected until the node has read everything: a closed connection resets
    // the streams on it, unread bytes and all.
    let mut flooders = Vec::with_capacity(FLOODERS);
    for _ in 0..FLOODERS {
        let mut peer = RawPeer::connect(net[a].addr(), &[]).await?;
        let mut stream = peer.open(KAD_PROTOCOL).await?;
        let mut batch = Vec::with_capacity(RECORDS_EACH * 100);
        for _ in 0..RECORDS_EACH {
            let mut key = [0u8; 32];
            rng.fill_bytes(&mut key);
            batch.extend(kad_raw::add_provider(
                &key,
                &peer.peer_id,
                std::slice::from_ref(&addr),
            ));
        }
        stream.write_all(&batch).await?;
        stream.flush().await?;
        // Let the node read the stream to its end before the connection goes.
        stream.close().await?;
        flooders.push((peer, stream));
        rss_peak = rss_peak.max(proc.rss()?);
    }
    let sent = FLOODERS * RECORDS_EACH;
    println!(
        "flood: {sent} ADD_PROVIDER records for fresh keys from {FLOODERS} identities, \
         written in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Every record is either stored or refused; with fresh keys, stored ones are keys.
    let must_refuse = (sent - MAX_REMOTE_PROVIDER_KEYS) as f64;
    {
        let net = &net;
        eventually(
            Duration::from_secs(60),
            "the node to refuse the records over its cap",
            || async move {
                let n = net[a].metric(refused).await? - refused_before;
                Ok((n >= must_refuse).then_some(n))
            },
        )
        .await?;
    }
    // Settled: every record is counted, and exactly those over the cap were refused
    // (a store refusing everything would refuse more, one without a cap fewer).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let n = net[a].metric(refused).await? - refused_before;
    let stored = sent as f64 - n;
    ensure!(
        n == must_refuse,
        "{n} records refused, expected exactly {must_refuse} ({stored} keys stored, cap \
         {MAX_REMOTE_PROVIDER_KEYS})"
    );
    println!(
        "checked: {n} records refused, at most {stored} keys stored (cap \
         {MAX_REMOTE_PROVIDER_KEYS}), {:.1} s after the flood began",
        started.elapsed().as_secs_f64()
    );
    rss_peak = rss_peak.max(proc.rss()?);
    let growth = rss_peak.saturating_sub(rss_before);
    ensure!(
        growth <= MAX_GROWTH,
        "resident memory grew {:.1} MiB (at most {:.0})",
        mib(growth),
        mib(MAX_GROWTH)
    );
    println!(
        "checked: resident memory {:.1} MiB before, peak {:.1} MiB (+{:.1}, at most {:.0})",
        mib(rss_before),
        mib(rss_peak),
        mib(growth),
        mib(MAX_GROWTH)
    );

    // The node's own record is still found: c looks it up in the DHT and fetches.
    let out = dir.path().join("fetched.bin");
    let t = Instant::now();
    let events = net[c].fetch(&info.id.to_string(), &out).await?;
    let last = events.last().map(|e| format!("{e:?}")).unwrap_or_default();
    ensure!(
        std::fs::read(&out).ok().as_deref() == Some(&data[..]),
        "c could not fetch what a shares after the flood: {last}"
    );
    println!(
        "checked: the node's own provider record is still found: c fetched its share in \
         {:.2} s",
        t.elapsed().as_secs_f64()
    );
    ensure!(net[a].livez().await, "node a is not live");
    println!("checked: the node is live");
    Ok(())
}
