//! Private networks: a pre-shared key (libp2p pnet) closes a network to nodes without
//! it, and an allow list of PeerIds closes it to all but its members. A node left out
//! cannot complete a handshake, and its log says why.

use std::time::Duration;

use anyhow::{bail, Result};
use servant_tests::{eventually, run_cli, Net};

fn psk(net: &Net, name: &str) -> Result<String> {
    let path = net.dir().join(name);
    let out = run_cli(
        &["key", "psk", "--out", path.to_str().unwrap_or_default()],
        &[],
    );
    if !out.status.success() {
        bail!("key psk: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(path.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pre_shared_key_keeps_outsiders_out_and_says_why() -> Result<()> {
    let mut net = Net::new();
    let key = psk(&net, "swarm.key")?;
    let other_key = psk(&net, "other.key")?;
    let private = vec!["--psk-file".to_string(), key.clone()];
    let boot = net.spawn("boot", &private).await?;
    let status = net[boot].status().await?;
    if status.listen_addrs.iter().any(|a| a.contains("quic")) {
        bail!("a private node listens on QUIC: {:?}", status.listen_addrs);
    }
    println!("checked: a node with a pre-shared key listens on TCP only");

    let bootnode = net[boot].addr().to_string();
    let mut member_args = private.clone();
    member_args.extend(["--bootnode".to_string(), bootnode.clone()]);
    let member = net.spawn("member", &member_args).await?;
    let boot_id = net[boot].id();
    eventually(Duration::from_secs(15), "the member to join", || {
        let net = &net;
        async move {
            Ok(net[member]
                .peer_ids()
                .await?
                .contains(&boot_id)
                .then_some(()))
        }
    })
    .await?;
    println!("checked: a node with the same key joins through the bootnode");

    let outsider = net
        .spawn("outsider", &["--bootnode".to_string(), bootnode.clone()])
        .await?;
    let wrong = net
        .spawn(
            "wrong-key",
            &[
                "--psk-file".to_string(),
                other_key,
                "--bootnode".to_string(),
                bootnode.clone(),
            ],
        )
        .await?;
    eventually(
        Duration::from_secs(15),
        "the outsiders' dials to fail",
        || {
            let net = &net;
            async move {
                let told = net[outsider]
                    .log()
                    .contains("if this network is private, set psk_file")
                    && net[wrong].log().contains(
                        "a peer without the same pre-shared key cannot complete the handshake",
                    );
                Ok(told.then_some(()))
            }
        },
    )
    .await?;
    for node in [outsider, wrong] {
        if net[node].peer_ids().await?.contains(&boot_id) {
            bail!("{} got in", net[node].name);
        }
    }
    let boot_peers = net[boot].peer_ids().await?;
    if boot_peers.contains(&net[outsider].id()) || boot_peers.contains(&net[wrong].id()) {
        bail!("the bootnode lists an outsider: {boot_peers:?}");
    }
    println!("checked: a node without the key, and one with another key, cannot connect, and their logs say why");

    // An allow list on top: only listed PeerIds, even among key holders.
    let member_id = net[member].id().to_string();
    let mut guarded_args = private.clone();
    guarded_args.extend(["--allow-peer".to_string(), member_id]);
    let guarded = net.spawn("guarded", &guarded_args).await?;
    let guarded_addr = net[guarded].addr().to_string();
    net[member].connect(&guarded_addr).await?;
    let refused = net[boot].connect(&guarded_addr).await;
    let guarded_id = net[guarded].id();
    eventually(Duration::from_secs(10), "the allow list to hold", || {
        let net = &net;
        async move {
            let peers = net[guarded].peer_ids().await?;
            let refusals = net[guarded]
                .metric("servant_connections_denied_total{reason=\"not_allowed\"}")
                .await?;
            Ok(
                (peers.contains(&net[member].id()) && !peers.contains(&boot_id) && refusals >= 1.0)
                    .then_some(()),
            )
        }
    })
    .await?;
    if net[boot].peer_ids().await?.contains(&guarded_id) {
        bail!("the bootnode stayed connected to the guarded node: {refused:?}");
    }
    println!("checked: with allow_peers, the listed member connects and another key holder is refused ({refused:?})");
    net.pass();
    Ok(())
}
