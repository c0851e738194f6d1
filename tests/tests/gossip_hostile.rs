//! Regression tests for the two libp2p-gossipsub advisories published after our
//! advisory database snapshot (see tests/advisories.sh, which also keeps
//! libp2p-gossipsub at 0.50.1 or newer):
//!
//! - GHSA-g3g5-x568-qvqx: a GRAFT for a topic the node never joined grew the
//!   per-peer topic set without bound (fixed in 0.50.0);
//! - GHSA-vrx6-jcp8-vm7m: a PRUNE for a topic the node never joined was acted upon,
//!   backoff included (fixed in 0.50.1).
//!
//! A raw gossipsub peer (tests/src/gossip_raw.rs) floods one of two real nodes with
//! 100,000 such control messages, each naming a random 128-byte topic. Gossipsub keeps
//! no per-peer topic counts we can read from outside, so the state is bounded through
//! the node's resident memory: had every topic been stored, 100,000 of them would be
//! well over the 16 MiB allowed. Each test then checks that the flood was processed
//! (a marker sent after it takes effect), that the node stays live, and that the two
//! honest nodes still exchange broadcasts.
//!
//! Servant's own per-peer control budget (`node/src/gossip_budget.rs`) would cut these
//! floods off at 20,000 actions, before gossipsub's handling of them could be seen, so
//! the advisory tests run node a with the budget lifted; the last test floods a node
//! with the default budget and checks that the flooder is disconnected.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use servant_tests::{
    eventually,
    gossip_raw::{rpc, RawGossipPeer},
    Net, Subscription,
};

/// The topic both honest nodes join.
const TOPIC: &str = "hostile";
/// Control messages per flood: the count the hardening issue asks for.
const FLOOD: usize = 100_000;
/// Bytes per random topic name: long names make stored topics expensive, so a
/// regression shows in resident memory.
const TOPIC_BYTES: usize = 128;
/// Most the node's resident memory may grow during a flood.
const MAX_GROWTH_BYTES: f64 = 16.0 * 1024.0 * 1024.0;
/// The largest backoff a PRUNE can carry: gossipsub must clamp it, not add it to a clock.
const HUGE_BACKOFF_SECS: u64 = u64::MAX;

/// Two honest nodes, `a` (the target) and `b` (its bootnode's peer), both in TOPIC's
/// mesh, each with a subscription open.
struct Honest {
    net: Net,
    a: usize,
    b: usize,
    sub_a: Subscription,
    sub_b: Subscription,
}

async fn honest_pair() -> Result<Honest> {
    honest_pair_with(&[
        "--gossip-control-burst".into(),
        "4000000000".into(),
        "--gossip-control-rate".into(),
        "4000000000".into(),
    ])
    .await
}

/// Like [`honest_pair`], node a started with `args`.
async fn honest_pair_with(args: &[String]) -> Result<Honest> {
    let mut net = Net::new();
    let a = net.spawn("a", args).await?;
    let boot = net[a].addr().to_string();
    let b = net.spawn("b", &["--bootnode".into(), boot]).await?;
    let sub_a = net[a].subscribe(TOPIC).await?;
    let sub_b = net[b].subscribe(TOPIC).await?;
    for i in [a, b] {
        let net = &net;
        eventually(
            Duration::from_secs(20),
            &format!("{} to have a mesh peer", net[i].name),
            || async move { Ok((mesh_peers(net, i).await? >= 1).then_some(())) },
        )
        .await?;
    }
    Ok(Honest {
        net,
        a,
        b,
        sub_a,
        sub_b,
    })
}

/// Peers in node `i`'s mesh for TOPIC.
async fn mesh_peers(net: &Net, i: usize) -> Result<usize> {
    let status = net[i].status().await?;
    Ok(status
        .topics
        .iter()
        .find(|t| t.name == TOPIC)
        .map_or(0, |t| t.mesh_peers))
}

/// Node `i`'s resident memory in bytes, as it reports it.
async fn resident(net: &Net, i: usize) -> Result<f64> {
    let rss = net[i].metric("process_resident_memory_bytes").await?;
    ensure!(rss > 0.0, "{} reports no resident memory", net[i].name);
    Ok(rss)
}

/// `n` random topic names the honest nodes never joined.
fn random_topics(n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            hex::encode(
                (0..TOPIC_BYTES / 2)
                    .map(|_| rand::random::<u8>())
                    .collect::<Vec<_>>(),
            )
        })
        .collect()
}

/// The node is live and both honest nodes still deliver each other's broadcasts.
async fn honest_still_served(h: &mut Honest) -> Result<()> {
    ensure!(h.net[h.a].livez().await, "node a stopped answering /livez");
    for (from, to) in [(h.b, h.a), (h.a, h.b)] {
        let body = format!("from {} after the flood", h.net[from].name);
        let sent = h.net[from].publish(TOPIC, "honest", &body).await?;
        let sub = if to == h.a {
            &mut h.sub_a
        } else {
            &mut h.sub_b
        };
        let (got, _) = sub
            .wait_for(&sent.envelope.id, Duration::from_secs(10))
            .await;
        ensure!(got.is_some(), "{} never received {body:?}", h.net[to].name);
    }
    println!("checked: node a is live and the honest nodes exchange broadcasts both ways");
    Ok(())
}

/// Sends a SUBSCRIBE and a GRAFT for the joined topic and waits until node `a` takes
/// the raw peer into its mesh. Sent after a flood on the same stream, it is the marker
/// that every RPC before it has been handled.
async fn join_mesh(hostile: &mut RawGossipPeer, net: &Net, a: usize, what: &str) -> Result<()> {
    let mut join = vec![rpc::subscribe(TOPIC)];
    join.extend(rpc::pack([rpc::graft(TOPIC)]));
    hostile.send_all(&join).await?;
    eventually(Duration::from_secs(20), what, || async move {
        Ok((mesh_peers(net, a).await? >= 2).then_some(()))
    })
    .await
}

/// Node `a`'s resident-memory growth since `before`, printed, and checked against
/// MAX_GROWTH_BYTES; returns the growth in bytes.
async fn memory_growth_bounded(net: &Net, a: usize, before: f64, flood: &str) -> Result<f64> {
    let after = resident(net, a).await?;
    let growth = after - before;
    println!(
        "resident memory of node a: {:.1} MiB before, {:.1} MiB after (+{:.2} MiB)",
        before / 1048576.0,
        after / 1048576.0,
        growth / 1048576.0
    );
    ensure!(
        growth < MAX_GROWTH_BYTES,
        "node a grew by {:.1} MiB under a {flood} flood (limit 16 MiB)",
        growth / 1048576.0
    );
    Ok(growth)
}

/// GHSA-g3g5-x568-qvqx: GRAFTs for 100,000 topics the node never joined are ignored
/// without storing them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graft_flood_for_unjoined_topics_stays_bounded() -> Result<()> {
    let mut h = honest_pair().await?;
    let (a, net) = (h.a, &h.net);
    let mut hostile = RawGossipPeer::connect(net[a].addr()).await?;
    // Let the connection settle (identify, the node's hello RPC) before the baseline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = resident(net, a).await?;

    let topics = random_topics(FLOOD);
    let rpcs = rpc::pack(topics.iter().map(|t| rpc::graft(t)));
    let started = Instant::now();
    hostile.send_all(&rpcs).await?;
    println!(
        "sent {FLOOD} GRAFTs for unjoined {TOPIC_BYTES}-byte topics in {} RPCs ({:.1} MB) in {:?}",
        rpcs.len(),
        rpcs.iter().map(Vec::len).sum::<usize>() as f64 / 1e6,
        started.elapsed()
    );

    // The marker: a SUBSCRIBE and a GRAFT for the joined topic, on the same stream, so
    // the node has handled every GRAFT above once it takes the peer into its mesh.
    join_mesh(
        &mut hostile,
        net,
        a,
        "node a to take the flooder into its mesh (flood processed)",
    )
    .await?;
    println!(
        "checked: the flood was processed (the marker GRAFT took effect) after {:?}",
        started.elapsed()
    );

    memory_growth_bounded(net, a, before, "GRAFT").await?;
    honest_still_served(&mut h).await?;
    h.net.pass();
    Ok(())
}

/// GHSA-vrx6-jcp8-vm7m: PRUNEs for 100,000 topics the node never joined, each with
/// the largest backoff a PRUNE can carry, are ignored; a PRUNE with that backoff for
/// the joined topic is clamped (the peer is backed off, and penalized when it GRAFTs
/// again within the backoff) instead of overflowing a clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_flood_for_unjoined_topics_stays_bounded() -> Result<()> {
    let mut h = honest_pair().await?;
    let (a, net) = (h.a, &h.net);
    let mut hostile = RawGossipPeer::connect(net[a].addr()).await?;

    // Join the mesh first, so the final PRUNE has something to remove.
    join_mesh(
        &mut hostile,
        net,
        a,
        "node a to take the hostile peer into its mesh",
    )
    .await?;
    let before = resident(net, a).await?;

    let topics = random_topics(FLOOD);
    let rpcs = rpc::pack(topics.iter().map(|t| rpc::prune(t, HUGE_BACKOFF_SECS)));
    let started = Instant::now();
    hostile.send_all(&rpcs).await?;
    println!(
        "sent {FLOOD} PRUNEs (backoff {HUGE_BACKOFF_SECS} s) for unjoined topics \
         in {} RPCs ({:.1} MB) in {:?}",
        rpcs.len(),
        rpcs.iter().map(Vec::len).sum::<usize>() as f64 / 1e6,
        started.elapsed()
    );

    // The PRUNE for the joined topic, after the flood on the same stream: once the
    // node drops the peer from its mesh, every PRUNE before it has been handled.
    hostile
        .send_all(&rpc::pack([rpc::prune(TOPIC, HUGE_BACKOFF_SECS)]))
        .await?;
    eventually(
        Duration::from_secs(20),
        "node a to drop the hostile peer from its mesh",
        || async move { Ok((mesh_peers(net, a).await? <= 1).then_some(())) },
    )
    .await?;
    println!(
        "checked: the flood was processed (the joined topic's PRUNE took effect) after {:?}",
        started.elapsed()
    );

    // The backoff holds (clamped, not wrapped into the past): a GRAFT now is a GRAFT
    // within the backoff, which gossipsub penalizes. The penalty decays within
    // seconds, so the GRAFT is repeated until the counter shows it.
    let penalties = "libp2p_gossipsub_scoring_penalties_total{penalty=\"GraftBackoff\"}";
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        hostile.send_all(&rpc::pack([rpc::graft(TOPIC)])).await?;
        if net[a].metric(penalties).await? >= 1.0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no GraftBackoff penalty within 10 s: the PRUNE's backoff was not kept"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ensure!(
        mesh_peers(net, a).await? <= 1,
        "the backed-off peer was taken back into the mesh"
    );
    println!("checked: a GRAFT within the clamped backoff is refused and penalized");

    memory_growth_bounded(net, a, before, "PRUNE").await?;
    honest_still_served(&mut h).await?;
    h.net.pass();
    Ok(())
}

/// SUBSCRIBEs to remember: 10,000 random topics, 100 per RPC. Gossipsub remembers
/// each remote peer's topics; the node's subscription cap keeps the peer within
/// MAX_TOPICS_PER_PEER (an RPC that would pass it is ignored whole), and the flood is
/// neither a memory nor a log problem: gossipsub logs each ignored RPC at error level,
/// and the node's log limit keeps those lines to a burst.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_flood_is_capped_per_peer() -> Result<()> {
    const SUBSCRIBES: usize = 10_000;
    const PER_RPC: usize = 100;
    let cap = servant::subscription_cap::MAX_TOPICS_PER_PEER;
    let mut h = honest_pair().await?;
    let (a, net) = (h.a, &h.net);
    let mut hostile = RawGossipPeer::connect(net[a].addr()).await?;
    let hostile_id = hostile.peer_id.to_string();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = resident(net, a).await?;
    let log_before = net[a].log().lines().count();

    let topics = random_topics(SUBSCRIBES);
    // Repeated protobuf fields concatenate: one RPC carries PER_RPC subscriptions.
    let rpcs: Vec<Vec<u8>> = topics
        .chunks(PER_RPC)
        .map(|chunk| chunk.iter().flat_map(|t| rpc::subscribe(t)).collect())
        .collect();
    let started = Instant::now();
    hostile.send_all(&rpcs).await?;
    // The marker, on the same stream: once the node takes the flooder into its mesh
    // for the joined topic, it has handled every RPC above.
    join_mesh(
        &mut hostile,
        net,
        a,
        "node a to take the flooder into its mesh (flood processed)",
    )
    .await?;
    let remembered = net[a]
        .peers()
        .await?
        .into_iter()
        .find(|p| p.peer_id == hostile_id)
        .map(|p| p.gossip_topics)
        .ok_or_else(|| anyhow::anyhow!("node a lost the flooder"))?;
    ensure!(
        remembered <= cap,
        "node a remembers {remembered} topics for the flooder (cap {cap})"
    );
    println!(
        "checked: {SUBSCRIBES} SUBSCRIBEs in {} RPCs processed after {:?}; node a remembers \
         {remembered} topics for the flooder (cap {cap})",
        rpcs.len(),
        started.elapsed()
    );

    let growth = memory_growth_bounded(net, a, before, "SUBSCRIBE").await?;
    let new_lines = net[a].log().lines().count() - log_before;
    let burst = servant::log_limit::BURST as usize;
    ensure!(
        new_lines <= burst + 10,
        "the flood wrote {new_lines} log lines; the log limit allows a burst of {burst}"
    );
    let dropped = net[a].metric("servant_log_lines_suppressed_total").await?;
    println!(
        "checked: memory +{:.2} MiB (limit 16), {new_lines} new log lines, {dropped} dropped \
         by the log limit",
        growth / 1048576.0
    );
    honest_still_served(&mut h).await?;
    h.net.pass();
    Ok(())
}

/// With the default budget, the GRAFT flood above gets the flooder disconnected once
/// it has sent 20,000 control actions, and counted; nothing of the flood after that is
/// handled, and the honest nodes carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_flood_gets_the_flooder_disconnected() -> Result<()> {
    let mut h = honest_pair_with(&[]).await?;
    let (a, net) = (h.a, &h.net);
    let key = libp2p::identity::Keypair::generate_ed25519();
    let mut hostile = RawGossipPeer::connect_as(key.clone(), net[a].addr()).await?;
    let hostile_id = hostile.peer_id.to_string();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = resident(net, a).await?;

    let topics = random_topics(FLOOD);
    let rpcs = rpc::pack(topics.iter().map(|t| rpc::graft(t)));
    let started = Instant::now();
    // The node closes the connection partway: the writes after that fail.
    let sent = hostile.send_all(&rpcs).await;
    println!(
        "sent {FLOOD} GRAFTs in {} RPCs: {} after {:?}",
        rpcs.len(),
        match &sent {
            Ok(()) => "all written".to_string(),
            Err(e) => format!("cut off ({e:#})"),
        },
        started.elapsed()
    );
    eventually(
        Duration::from_secs(10),
        "node a to disconnect the flooder",
        || {
            let hostile_id = hostile_id.clone();
            async move {
                let peers = net[a].peers().await?;
                Ok((!peers.iter().any(|p| p.peer_id == hostile_id)).then_some(()))
            }
        },
    )
    .await?;
    println!(
        "checked: node a disconnected the flooder {:?} after the flood began",
        started.elapsed()
    );
    let floods = net[a].metric("servant_gossip_control_floods_total").await?;
    ensure!(
        floods >= 1.0,
        "servant_gossip_control_floods_total is {floods}"
    );
    println!("checked: servant_gossip_control_floods_total {floods}");
    // Coming back under the same identity does not buy a fresh budget: the node
    // refuses the flooder's connections for its penalty.
    drop(hostile);
    let denied = "servant_connections_denied_total{reason=\"gossip_flood\"}";
    for attempt in 1..=3 {
        let back = RawGossipPeer::connect_as(key.clone(), net[a].addr()).await;
        ensure!(
            back.is_err(),
            "the flooder's connection {attempt} after its disconnect was accepted"
        );
    }
    let refused = net[a].metric(denied).await?;
    ensure!(refused >= 3.0, "{denied} is {refused}");
    println!("checked: the flooder's next 3 connections were refused ({denied} {refused})");
    memory_growth_bounded(net, a, before, "GRAFT").await?;
    honest_still_served(&mut h).await?;
    h.net.pass();
    Ok(())
}
