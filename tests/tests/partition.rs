//! Two halves of a network cut apart keep working on their own side, and merge again
//! by themselves once the cut heals; broadcasts published after the heal reach everyone.
//!
//! The halves listen on different loopback addresses and run as different users. The
//! cut is iptables dropping every packet a half's user sends to the other half's
//! address: the owner match is what separates them, because the kernel picks 127.0.0.1
//! as the source of many loopback connections whatever address a node listens on.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{bail, Result};
use libp2p::PeerId;
use servant_tests::{eventually, has_program, is_root, skip_unless, Net, Subscription};

const TOPIC: &str = "halves";
const HALF_A: &str = "127.0.0.2";
const HALF_B: &str = "127.0.0.3";
const UID_A: u32 = 64_021;
const UID_B: u32 = 64_022;

/// An iptables chain that drops traffic between the halves while it exists.
struct Cut {
    chain: String,
}

fn iptables(args: &[&str]) -> Result<()> {
    let out = Command::new("iptables").args(args).output()?;
    if !out.status.success() {
        bail!(
            "iptables {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Removes the cut chains of earlier runs whose process is gone (a run killed before
/// its `Cut` was dropped): left in place, they split this run's halves from the start.
fn remove_stale_cuts() -> Result<()> {
    let out = Command::new("iptables").arg("-S").output()?;
    let rules = String::from_utf8_lossy(&out.stdout);
    for line in rules.lines() {
        let Some(chain) = line.strip_prefix("-N ") else {
            continue;
        };
        let Some(pid) = chain.strip_prefix("SERVANT_CUT_") else {
            continue;
        };
        if Path::new("/proc").join(pid).exists() {
            continue;
        }
        println!("removing {chain}, left by a run that no longer exists");
        let _ = iptables(&["-D", "OUTPUT", "-j", chain]);
        iptables(&["-F", chain])?;
        iptables(&["-X", chain])?;
    }
    Ok(())
}

impl Cut {
    fn new() -> Result<Cut> {
        let chain = format!("SERVANT_CUT_{}", std::process::id());
        iptables(&["-N", &chain])?;
        let cut = Cut { chain };
        for (uid, to) in [(UID_A, HALF_B), (UID_B, HALF_A)] {
            let uid = uid.to_string();
            iptables(&[
                "-A",
                &cut.chain,
                "-m",
                "owner",
                "--uid-owner",
                &uid,
                "-d",
                to,
                "-j",
                "DROP",
            ])?;
        }
        iptables(&["-I", "OUTPUT", "-j", &cut.chain])?;
        Ok(cut)
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        let _ = iptables(&["-D", "OUTPUT", "-j", &self.chain]);
        let _ = iptables(&["-F", &self.chain]);
        let _ = iptables(&["-X", &self.chain]);
    }
}

async fn peers_across(net: &Net, i: usize, other_half: &[PeerId]) -> Result<usize> {
    let peers = net[i].peer_ids().await?;
    Ok(other_half.iter().filter(|p| peers.contains(p)).count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halves_merge_after_a_cut_heals() -> Result<()> {
    if skip_unless(is_root() && has_program("iptables"), "root and iptables") {
        return Ok(());
    }
    remove_stale_cuts()?;
    let mut net = Net::new();
    let boot = net.add("boot", &[]);
    net[boot].p2p_host = HALF_A.into();
    net[boot].uid = Some(UID_A);
    net[boot].start().await?;
    let boot_addr = net[boot].addr().to_string();
    let mut half_a = vec![boot];
    let mut half_b = Vec::new();
    for (name, host) in [
        ("a1", HALF_A),
        ("a2", HALF_A),
        ("b1", HALF_B),
        ("b2", HALF_B),
        ("b3", HALF_B),
    ] {
        let i = net.add(name, &["--bootnode".into(), boot_addr.clone()]);
        net[i].p2p_host = host.into();
        net[i].uid = Some(if host == HALF_A { UID_A } else { UID_B });
        net[i].start().await?;
        if host == HALF_A {
            half_a.push(i);
        } else {
            half_b.push(i);
        }
    }
    let all: Vec<usize> = half_a.iter().chain(&half_b).copied().collect();
    let ids_a: Vec<PeerId> = half_a.iter().map(|&i| net[i].id()).collect();
    let ids_b: Vec<PeerId> = half_b.iter().map(|&i| net[i].id()).collect();

    let mut subs: Vec<(usize, Subscription)> = Vec::new();
    for &i in &all {
        subs.push((i, net[i].subscribe(TOPIC).await?));
    }
    let others = all.len() - 1;
    for &i in &all {
        let net = &net;
        eventually(
            Duration::from_secs(30),
            "a full mesh across both halves",
            || async move {
                let status = net[i].status().await?;
                let meshed = status
                    .topics
                    .iter()
                    .any(|t| t.name == TOPIC && t.mesh_peers >= 2);
                Ok((status.connected_peers == others && meshed).then_some(()))
            },
        )
        .await?;
    }
    println!("checked: six nodes, three per half, all connected");

    // The cut: connections across it die when their pings time out.
    let cut = Cut::new()?;
    for &i in &half_a {
        let (net, ids_b) = (&net, &ids_b);
        eventually(
            Duration::from_secs(60),
            "the halves to fall apart",
            || async move { Ok((peers_across(net, i, ids_b).await? == 0).then_some(())) },
        )
        .await?;
    }
    for &i in &half_b {
        let (net, ids_a) = (&net, &ids_a);
        eventually(
            Duration::from_secs(60),
            "the halves to fall apart",
            || async move { Ok((peers_across(net, i, ids_a).await? == 0).then_some(())) },
        )
        .await?;
    }
    println!("checked: the cut separated the halves");

    // Each half still broadcasts within itself.
    let sent = net[half_b[0]].publish(TOPIC, "cut", "only half b").await?;
    for (i, sub) in subs.iter_mut() {
        let (got, _) = sub
            .wait_for(
                &sent.envelope.id,
                Duration::from_secs(if half_b.contains(i) { 10 } else { 2 }),
            )
            .await;
        assert_eq!(
            got.is_some(),
            half_b.contains(i),
            "{} and the message from half b during the cut",
            net[*i].name
        );
    }
    println!("checked: during the cut, a broadcast reaches its own half only");

    // The heal: nobody is told; the halves find each other again.
    drop(cut);
    for &i in &all {
        let (net, other) = (&net, if half_a.contains(&i) { &ids_b } else { &ids_a });
        eventually(
            Duration::from_secs(90),
            "the halves to merge again",
            || async move { Ok((peers_across(net, i, other).await? >= 1).then_some(())) },
        )
        .await?;
    }
    println!("checked: the halves merged again by themselves");
    for &i in &all {
        let net = &net;
        eventually(
            Duration::from_secs(30),
            "the mesh to span the halves",
            || async move {
                let status = net[i].status().await?;
                Ok(status
                    .topics
                    .iter()
                    .any(|t| t.name == TOPIC && t.mesh_peers >= 2)
                    .then_some(()))
            },
        )
        .await?;
    }
    let sent = net[half_a[1]]
        .publish(TOPIC, "healed", "for everyone")
        .await?;
    for (i, sub) in subs.iter_mut() {
        if *i == half_a[1] {
            continue;
        }
        let (got, _) = sub
            .wait_for(&sent.envelope.id, Duration::from_secs(10))
            .await;
        assert!(
            got.is_some(),
            "{} missed the message after the heal",
            net[*i].name
        );
    }
    println!("checked: a broadcast after the heal reaches every node");
    net.pass();
    Ok(())
}
