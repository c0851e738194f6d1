//! Spam and sybils: 10 honest Servant nodes and 20 sybils (bare gossipsub peers in
//! the test process) that first behave, then half of them forge messages and the
//! other half stop forwarding. Asserted: every forger is graylisted (score under
//! gossipsub's graylist threshold) by every honest node it is connected to within
//! 10 heartbeats of its first forgery; no honest node ever graylists an honest peer;
//! at least 99% of the honest broadcasts reach every honest node meanwhile. Droppers
//! are measured and printed: Servant's topic scoring has no mesh-delivery penalty
//! (README, "Broadcast"), so they lose standing only by delivering nothing first.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Result};
use servant_protocol::Envelope;
use servant_tests::{gossip_peer::GossipPeer, Net, Subscription};

const TOPIC: &str = "sybils";
const HONEST: usize = 10;
const SYBILS: usize = 20;
/// Honest nodes each sybil dials.
const SYBIL_LINKS: usize = 4;
/// gossipsub's default graylist threshold (`PeerScoreThresholds::default()`).
const GRAYLIST: f64 = -80.0;
/// gossipsub's heartbeat (its default, which Servant keeps).
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Honest broadcasts while the sybils misbehave.
const MESSAGES: usize = 100;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Every honest node's gossipsub score of every peer it is connected to.
async fn scores(net: &Net) -> Result<Vec<HashMap<String, f64>>> {
    let mut all = Vec::with_capacity(net.nodes.len());
    for node in &net.nodes {
        let peers = node.peers().await?;
        all.push(
            peers
                .into_iter()
                .filter_map(|p| p.gossipsub_score.map(|s| (p.peer_id, s)))
                .collect(),
        );
    }
    Ok(all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgers_are_graylisted_and_honest_delivery_holds() -> Result<()> {
    let mut net = Net::new();
    // Everything runs on 127.0.0.1: lift the per-IP cap the sybils would otherwise
    // meet first (that defence has its own test, attack_conn.rs).
    let common: Vec<String> = ["--max-connections-per-ip", "128", "--conn-high", "64"]
        .map(String::from)
        .to_vec();
    let boot = net.spawn("honest0", &common).await?;
    let boot_addr = net[boot].addr().to_string();
    for i in 1..HONEST {
        let mut args = common.clone();
        args.extend(["--bootnode".to_string(), boot_addr.clone()]);
        net.spawn(&format!("honest{i}"), &args).await?;
    }
    let mut subs: Vec<Subscription> = Vec::with_capacity(HONEST);
    for i in 0..HONEST {
        subs.push(net[i].subscribe(TOPIC).await?);
    }
    for i in 0..HONEST {
        net[i].wait_mesh(TOPIC, 2, Duration::from_secs(60)).await?;
    }
    let honest_ids: HashSet<String> = (0..HONEST).map(|i| net[i].id().to_string()).collect();

    // Sybil k dials SYBIL_LINKS honest nodes spread over the ten; the first half
    // will forge, the second half will drop.
    let forwarding = Arc::new(AtomicBool::new(true));
    let mut sybils = Vec::with_capacity(SYBILS);
    let mut links: HashMap<String, Vec<usize>> = HashMap::new();
    for k in 0..SYBILS {
        let targets: Vec<usize> = (0..SYBIL_LINKS).map(|j| (k + j * 3) % HONEST).collect();
        let addrs: Vec<_> = targets.iter().map(|&t| net[t].addr()).collect();
        let forward = (k >= SYBILS / 2).then(|| forwarding.clone());
        let peer = GossipPeer::start_with(&addrs, TOPIC, forward).await?;
        links.insert(peer.peer_id.to_string(), targets);
        sybils.push(peer);
    }
    let forgers: Vec<String> = sybils[..SYBILS / 2]
        .iter()
        .map(|p| p.peer_id.to_string())
        .collect();
    let droppers: Vec<String> = sybils[SYBILS / 2..]
        .iter()
        .map(|p| p.peer_id.to_string())
        .collect();

    // They behave for a while: connected, subscribed, in meshes, forwarding.
    let behave_until = Instant::now() + Duration::from_secs(20);
    let mut warmup = 0;
    while Instant::now() < behave_until {
        net[warmup % HONEST]
            .publish(TOPIC, "warmup", &format!("w{warmup}"))
            .await?;
        warmup += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let before = scores(&net).await?;
    let mut connected_sybils = 0;
    for (id, targets) in &links {
        connected_sybils += targets
            .iter()
            .filter(|&&t| before[t].contains_key(id))
            .count();
    }
    println!(
        "checked: after 20 s of good behaviour {connected_sybils} of {} sybil links are up",
        SYBILS * SYBIL_LINKS
    );
    if connected_sybils < SYBILS * SYBIL_LINKS * 3 / 4 {
        bail!("only {connected_sybils} sybil links up: the attack would not test much");
    }
    for sub in &mut subs {
        sub.drain_now();
    }

    // Then they turn: forgers publish envelopes in an honest node's name (their
    // gossipsub signature is valid, the envelope's origin is not theirs), droppers
    // stop forwarding, and the honest nodes keep broadcasting.
    forwarding.store(false, Ordering::Relaxed);
    let turned = Instant::now();
    let victim = net[0].id().to_string();
    let forge = {
        let sybils = &sybils[..SYBILS / 2];
        let victim = victim.clone();
        async move {
            for n in 0..20 {
                for forger in sybils {
                    let fake = Envelope::new("forged", format!("f{n}"), now_ms(), victim.clone())?;
                    // A graylisted forger's publish may find nobody left to take it.
                    let _ = tokio::time::timeout(
                        Duration::from_millis(200),
                        forger.publish(fake.encode()?),
                    )
                    .await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            anyhow::Ok(())
        }
    };
    let watch = {
        let net = &net;
        let forgers = &forgers;
        let links = &links;
        let honest_ids = &honest_ids;
        async move {
            // (honest node, forger) -> when its score first fell under GRAYLIST.
            let mut graylisted: HashMap<(usize, String), Duration> = HashMap::new();
            let mut worst_honest = f64::MAX;
            let mut dropper_scores = Vec::new();
            while turned.elapsed() < Duration::from_secs(25) {
                let now = scores(net).await?;
                for (i, view) in now.iter().enumerate() {
                    for (peer, &score) in view {
                        if honest_ids.contains(peer) {
                            worst_honest = worst_honest.min(score);
                        }
                        if score < GRAYLIST && forgers.contains(peer) {
                            graylisted
                                .entry((i, peer.clone()))
                                .or_insert(turned.elapsed());
                        }
                    }
                }
                dropper_scores = now
                    .iter()
                    .flat_map(|view| {
                        view.iter()
                            .filter(|(p, _)| links.contains_key(*p) && !forgers.contains(*p))
                            .map(|(_, s)| *s)
                    })
                    .collect();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            anyhow::Ok((graylisted, worst_honest, dropper_scores))
        }
    };
    let publish = {
        let net = &net;
        async move {
            let mut sent = Vec::with_capacity(MESSAGES);
            for n in 0..MESSAGES {
                let from = n % HONEST;
                let d = net[from].publish(TOPIC, "honest", &format!("h{n}")).await?;
                sent.push((from, d.envelope.id));
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            anyhow::Ok(sent)
        }
    };
    let (forged, watched, sent) = tokio::join!(forge, watch, publish);
    forged?;
    let (graylisted, worst_honest, dropper_scores) = watched?;
    let sent = sent?;

    // Every forger, at every honest node it was still connected to when it turned.
    let mut slowest = Duration::ZERO;
    let mut pairs = 0;
    for forger in &forgers {
        for &t in &links[forger] {
            if !before[t].contains_key(forger) {
                continue;
            }
            pairs += 1;
            let Some(&at) = graylisted.get(&(t, forger.clone())) else {
                bail!(
                    "{} never graylisted forger {forger} (score {:?})",
                    net[t].name,
                    scores(&net).await?[t].get(forger)
                );
            };
            slowest = slowest.max(at);
        }
    }
    println!(
        "checked: {pairs} (honest node, forger) pairs graylisted, the slowest {:.1} s after \
         the forging began",
        slowest.as_secs_f64()
    );
    assert!(
        slowest <= HEARTBEAT * 10,
        "a forger took {slowest:?} to be graylisted (10 heartbeats: {:?})",
        HEARTBEAT * 10
    );
    assert!(
        worst_honest >= GRAYLIST,
        "an honest node graylisted an honest peer (score {worst_honest:.1})"
    );
    println!("checked: no honest peer graylisted; the lowest honest score seen {worst_honest:.1}");

    // Honest delivery: every message to every honest node but its sender.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut expected = 0;
    let mut delivered = 0;
    for (i, sub) in subs.iter_mut().enumerate() {
        let got: HashSet<String> = sub.drain_now().into_iter().map(|d| d.envelope.id).collect();
        for (from, id) in &sent {
            if *from != i {
                expected += 1;
                delivered += usize::from(got.contains(id));
            }
        }
    }
    let ratio = delivered as f64 / expected as f64;
    println!(
        "checked: {delivered} of {expected} honest deliveries ({:.2}%) with {} forgers and {} \
         droppers in the meshes",
        ratio * 100.0,
        forgers.len(),
        droppers.len()
    );
    assert!(ratio >= 0.99, "honest delivery {:.2}% < 99%", ratio * 100.0);
    let (lo, hi) = dropper_scores
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), s| (lo.min(*s), hi.max(*s)));
    println!(
        "measured: droppers' scores at the honest nodes after 25 s of dropping: {lo:.1} to \
         {hi:.1} (not graylisted: no mesh-delivery penalty)"
    );
    net.pass();
    Ok(())
}
