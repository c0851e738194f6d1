//! A node whose every peer went away reconnects by itself when they return.

use std::time::Duration;

use anyhow::Result;
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
        eventually(
            Duration::from_secs(30),
            "lonely to see both peers",
            || async move {
                let peers = net[lonely].peer_ids().await?;
                Ok((peers.contains(&boot_id) && peers.contains(&other_id)).then_some(()))
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
