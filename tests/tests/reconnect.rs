//! A node whose every peer went away reconnects by itself when they return.

use std::time::Duration;

use anyhow::{Context, Result};
use servant_tests::{eventually, Net};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_when_peers_return() -> Result<()> {
    let mut net = Net::new();
    let boot = net.spawn("boot", &[]).await?;
    let boot_addr = net[boot].addr().to_string();
    let lonely = net
        .spawn("lonely", &["--bootnode".into(), boot_addr.clone()])
        .await?;
    let other = net
        .spawn("other", &["--bootnode".into(), boot_addr])
        .await?;
    let (boot_id, other_id) = (net[boot].id(), net[other].id());
    {
        let net = &net;
        // Both in its routing table too: other comes back knowing nobody, and the
        // bootnode with an empty DHT, so lonely can find other again only at an address
        // it learned before (identify), which a connection a few milliseconds old may
        // not have brought yet (CI once killed both 6 ms after other connected).
        eventually(
            Duration::from_secs(30),
            "lonely to see both peers and hold both in its routing table",
            || async move {
                let peers = net[lonely].peer_ids().await?;
                let status = net[lonely].status().await?;
                Ok((peers.contains(&boot_id)
                    && peers.contains(&other_id)
                    && status.routing_table_size >= 2)
                    .then_some(()))
            },
        )
        .await?;
    }

    // Everyone else goes away.
    net[boot].kill();
    net[other].kill();
    {
        let net = &net;
        eventually(
            Duration::from_secs(30),
            "lonely to be alone",
            || async move { Ok(net[lonely].peer_ids().await?.is_empty().then_some(())) },
        )
        .await?;
    }
    assert_eq!(net[lonely].readyz().await?, 503, "alone means not ready");
    println!("checked: with every peer gone the node is alone and not ready");

    // They come back with no memory of the lonely node, so any reconnection is its
    // own doing: the bootnode through its retries, the other through the routing
    // table and the known-peer list.
    std::fs::remove_file(net[boot].data_dir.join("known-peers.json")).ok();
    std::fs::remove_file(net[other].data_dir.join("known-peers.json")).ok();
    net[boot].args.clear();
    net[other].args.clear();
    net[boot].start().await?;
    net[other].start().await?;
    {
        let net = &net;
        eventually(
            Duration::from_secs(60),
            "lonely to reconnect to both",
            || async move {
                let peers = net[lonely].peer_ids().await?;
                Ok((peers.contains(&boot_id) && peers.contains(&other_id)).then_some(()))
            },
        )
        .await?;
        eventually(
            Duration::from_secs(10),
            "lonely to be ready again",
            || async move { Ok((net[lonely].readyz().await? == 200).then_some(())) },
        )
        .await?;
    }
    println!("checked: the node reconnected to its returning peers by itself");
    net.pass();
    Ok(())
}

/// The nodes' own debug lines and gossipsub's.
const GOSSIP_LOG: &str = "info,servant=debug,libp2p_gossipsub::behaviour=debug";
/// Lines of a node's log that tell how its connections and mesh came and went.
const GOSSIP_CLUES: &[&str] = &[
    "connected",
    "closing",
    "restart",
    "GRAFT",
    "PRUNE",
    "New peer connected",
];

/// A node killed without warning comes back over QUIC before its peer has noticed the
/// old connection is dead (nothing like a TCP reset ends a QUIC connection), so the
/// peer sees the new connection as its second. Gossipsub greets a peer only on its
/// first connection: unless the peer starts afresh, the restarted node never learns
/// its topics and cannot join the mesh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_restarted_behind_a_live_quic_connection_is_greeted_afresh() -> Result<()> {
    const TOPIC: &str = "restarts";
    let mut net = Net::new();
    // Gossipsub's own lines say which GRAFT was refused and why, should this fail.
    let gossip_log = ("SERVANT_LOG_LEVEL".to_string(), GOSSIP_LOG.to_string());
    let steady = net.add("steady", &[]);
    net[steady].env.push(gossip_log.clone());
    net[steady].start().await?;
    let quic = format!(
        "/ip4/{}/udp/{}/quic-v1/p2p/{}",
        net[steady].p2p_host,
        net[steady].p2p_port,
        net[steady].id()
    );
    let restarter = net.add("restarter", &["--bootnode".into(), quic.clone()]);
    net[restarter].env.push(gossip_log);
    net[restarter].start().await?;
    let mut steady_sub = net[steady].subscribe(TOPIC).await?;
    let restarter_sub = net[restarter].subscribe(TOPIC).await?;
    net[restarter]
        .wait_mesh(TOPIC, 1, Duration::from_secs(30))
        .await?;
    net[steady]
        .wait_mesh(TOPIC, 1, Duration::from_secs(30))
        .await?;
    let over_quic = net[steady]
        .peers()
        .await?
        .iter()
        .any(|p| p.addrs.iter().any(|a| a.contains("quic-v1")));
    assert!(over_quic, "the two nodes should talk over QUIC");
    println!("checked: two nodes share a mesh over QUIC");

    drop(restarter_sub);
    net[restarter].kill();
    net[restarter].start().await?;
    // What this test is about: the restarted node's new connection lands beside the
    // old one, which QUIC keeps for up to its 10 s idle timeout.
    let restarter_id = net[restarter].id().to_string();
    {
        let (net, restarter_id) = (&net, &restarter_id);
        eventually(
            Duration::from_secs(5),
            "steady to hold the old connection and the new one at once (the premise)",
            || async move {
                let peers = net[steady].peers().await?;
                Ok(peers
                    .iter()
                    .any(|p| &p.peer_id == restarter_id && p.addrs.len() >= 2)
                    .then_some(()))
            },
        )
        .await?;
    }
    let mut restarter_sub = net[restarter].subscribe(TOPIC).await?;
    // The old connection times out within QUIC's 10 s idle limit or a failed ping
    // (10 s + 10 s); the reset waits for the new one to answer a ping after that
    // (every 10 s), and the new mesh takes a heartbeat more.
    net[restarter]
        .wait_mesh(TOPIC, 1, Duration::from_secs(40))
        .await
        .context("the restarted node never joined the mesh: its peer never greeted it")?;
    // The restarter counts steady in its mesh once it has sent its GRAFT; steady takes
    // the restarter into its own (and learns it subscribes) only when that arrives,
    // which on a loaded machine can be later than the first publish below.
    if let Err(e) = net[steady]
        .wait_mesh(TOPIC, 1, Duration::from_secs(20))
        .await
    {
        let log = net[steady].log();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| GOSSIP_CLUES.iter().any(|c| l.contains(c)))
            .collect();
        let tail = &lines[lines.len().saturating_sub(60)..];
        return Err(e.context(format!(
            "steady never took the restarted node back into its mesh; steady's connection and GRAFT lines:\n{}",
            tail.join("\n")
        )));
    }
    let restarts = net[steady].metric("servant_peer_restarts_total").await?;
    assert!(
        restarts >= 1.0,
        "steady should count the restart it answered ({restarts})"
    );
    assert!(
        net[steady].log().contains("it restarted; reconnecting"),
        "steady should log why it reconnected"
    );
    println!("checked: the peer noticed the restart ({restarts}) and greeted the node afresh");

    // Broadcasts flow both ways again.
    for (from, to, sub) in [
        (steady, restarter, &mut restarter_sub),
        (restarter, steady, &mut steady_sub),
    ] {
        let body = format!("from {} after the restart", net[from].name);
        let sent = net[from].publish(TOPIC, "test", &body).await?;
        let (delivery, _) = sub
            .wait_for(&sent.envelope.id, Duration::from_secs(10))
            .await;
        let delivery =
            delivery.with_context(|| format!("{} never received {body:?}", net[to].name))?;
        assert_eq!(delivery.envelope.body, body);
    }
    println!("checked: broadcasts reach both nodes after the restart");
    net.pass();
    Ok(())
}
