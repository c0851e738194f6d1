//! The connection watermarks: a busy node trims down into its band, keeps the peer it
//! connected to on purpose, and the network it trimmed stays connected through the
//! peers it found on its own.

use std::time::Duration;

use anyhow::Result;
use servant_tests::{eventually, Net};

const LEAVES: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trims_to_the_band_and_keeps_protected_peers() -> Result<()> {
    let mut net = Net::new();
    let hub = net
        .spawn(
            "hub",
            &[
                "--conn-low".into(),
                "2".into(),
                "--conn-high".into(),
                "4".into(),
            ],
        )
        .await?;
    let hub_addr = net[hub].addr().to_string();
    let mut leaves = Vec::new();
    for n in 0..LEAVES {
        let args = [
            "--bootnode".into(),
            hub_addr.clone(),
            "--conn-low".into(),
            "3".into(),
        ];
        leaves.push(net.spawn(&format!("leaf{n}"), &args).await?);
    }
    // The hub connects to one leaf on purpose: that connection is never trimmed.
    let friend = leaves[0];
    let friend_id = net[friend].id();
    net[hub].connect(&net[friend].addr().to_string()).await?;

    // Over the high watermark, the hub trims to the middle of its band (3). Leaves it
    // let go find their own peers through the DHT; once each has its own low
    // watermark's worth, none needs the hub and it stays in its band.
    for &leaf in &leaves {
        let net = &net;
        eventually(
            Duration::from_secs(60),
            "every leaf to hold its own peers",
            || async move { Ok((net[leaf].status().await?.connected_peers >= 3).then_some(())) },
        )
        .await?;
    }
    {
        let net = &net;
        eventually(
            Duration::from_secs(30),
            "the hub to settle in its band",
            || async move {
                let status = net[hub].status().await?;
                let trimmed = net[hub].metric("servant_peers_trimmed_total").await?;
                Ok((status.connected_peers <= 4 && trimmed >= 1.0).then_some(()))
            },
        )
        .await?;
    }
    // Peers still reach the hub now and then (a DHT query opens a connection), so it
    // may step over its high watermark; once the new connection is past its grace
    // period (10 s), the next tick (2 s) trims it back. Sample for twenty seconds:
    // never out of the band for longer than that.
    let mut samples = Vec::new();
    for _ in 0..20 {
        samples.push(net[hub].status().await?.connected_peers);
        assert!(
            net[hub].peer_ids().await?.contains(&friend_id),
            "the peer connected on purpose was trimmed"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut longest_out = 0;
    let mut run = 0;
    for &n in &samples {
        run = if (2..=4).contains(&n) { 0 } else { run + 1 };
        longest_out = longest_out.max(run);
    }
    assert!(
        longest_out <= 14,
        "hub connection counts {samples:?} stayed out of the band 2..=4 for {longest_out} samples"
    );
    let trimmed = net[hub].metric("servant_peers_trimmed_total").await?;
    println!("checked: the hub holds {samples:?} peers (band 2..=4), trimmed {trimmed}, kept its protected peer");
    let peers = net[hub].peers().await?;
    let friend_view = peers
        .iter()
        .find(|p| p.peer_id == friend_id.to_string())
        .expect("friend listed");
    assert!(friend_view.protected);

    // Everyone the hub let go still has peers of its own.
    for &leaf in &leaves {
        let status = net[leaf].status().await?;
        assert!(
            status.connected_peers >= 2,
            "{} has {} peers after the hub trimmed",
            net[leaf].name,
            status.connected_peers
        );
    }
    println!("checked: every trimmed leaf kept at least two peers of its own");
    net.pass();
    Ok(())
}

/// Connections outside any gossipsub mesh stay open past libp2p's idle timeout (10 s)
/// until the node decides otherwise: no churn on a node without topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_stay_open() -> Result<()> {
    let mut net = Net::new();
    let a = net.spawn("a", &[]).await?;
    let b = net
        .spawn("b", &["--bootnode".into(), net[a].addr().to_string()])
        .await?;
    let a_id = net[a].id();
    {
        let net = &net;
        eventually(Duration::from_secs(10), "b connected", || async move {
            Ok(net[b].peer_ids().await?.contains(&a_id).then_some(()))
        })
        .await?;
    }
    let since = net[b].peers().await?[0].connected_since;
    tokio::time::sleep(Duration::from_secs(15)).await;
    let peers = net[b].peers().await?;
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(
        peers[0].connected_since, since,
        "the same connection, never closed"
    );
    println!(
        "checked: an idle connection outside any mesh is still the same connection after 15 s"
    );
    net.pass();
    Ok(())
}
