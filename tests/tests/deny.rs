//! Deny lists (the seeds' bans): a denied PeerId cannot connect, a runtime ban drops
//! a live peer and outlives a restart, and IP ranges are enforced too.

use std::time::Duration;

use anyhow::Result;
use servant_tests::{eventually, run_cli, Net};

async fn denied_peers(net: &Net, node: usize) -> Result<f64> {
    net[node]
        .metric("servant_connections_denied_total{reason=\"peer_denied\"}")
        .await
}

/// Waits until `node` refused another connection by PeerId.
async fn refused_since(net: &Net, node: usize, before: f64) -> Result<()> {
    eventually(
        Duration::from_secs(10),
        "a refusal by PeerId",
        || async move { Ok((denied_peers(net, node).await? > before).then_some(())) },
    )
    .await
}

/// Waits until `node` lists `peer` as connected (its own view, not the dialer's).
async fn guard_sees(net: &Net, node: usize, peer: libp2p::PeerId) -> Result<()> {
    eventually(
        Duration::from_secs(10),
        "the guard to accept the peer",
        || async move { Ok(net[node].peer_ids().await?.contains(&peer).then_some(())) },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_peers_and_runtime_bans() -> Result<()> {
    let mut net = Net::new();

    // The outcast's key is made ahead, so the guard can deny it in its config.
    let key = net.dir().join("outcast.key");
    let out = run_cli(&["key", "generate", "--out", key.to_str().unwrap()], &[]);
    assert!(out.status.success());
    let outcast_id = String::from_utf8(out.stdout)?.trim().to_string();

    let guard = net
        .spawn("guard", &["--deny-peer".into(), outcast_id.clone()])
        .await?;
    let outcast = net
        .spawn(
            "outcast",
            &["--identity-file".into(), key.display().to_string()],
        )
        .await?;
    assert_eq!(net[outcast].id().to_string(), outcast_id);

    // A denied peer cannot connect, whichever side dials. The guard learns the
    // dialer's PeerId only when the handshake completes, so the outcast may briefly
    // see a connection before the guard closes it.
    let attempt = net[outcast].connect(&net[guard].addr().to_string()).await;
    println!("outcast's dial: {attempt:?}");
    {
        let net = &net;
        let guard_id = net[guard].id();
        eventually(Duration::from_secs(5), "the guard to drop the outcast", || async move {
            Ok((!net[outcast].peer_ids().await?.contains(&guard_id)).then_some(()))
        })
        .await?;
    }
    let err = net[guard]
        .connect(&net[outcast].addr().to_string())
        .await
        .expect_err("the guard must not dial a denied peer");
    assert!(format!("{err:#}").contains("denied"), "{err:#}");
    assert!(!net[guard].peer_ids().await?.contains(&net[outcast].id()));
    let denied = net[guard]
        .metric("servant_connections_denied_total{reason=\"peer_denied\"}")
        .await?;
    assert!(denied >= 1.0, "denials are counted: {denied}");
    println!("checked: a peer denied by config cannot connect, and the refusal is counted");

    // A runtime ban drops a live peer at once.
    let friend = net
        .spawn(
            "friend",
            &["--bootnode".into(), net[guard].addr().to_string()],
        )
        .await?;
    let friend_id = net[friend].id();
    {
        let net = &net;
        eventually(Duration::from_secs(10), "friend connected", || async move {
            Ok(net[guard]
                .peer_ids()
                .await?
                .contains(&friend_id)
                .then_some(()))
        })
        .await?;
    }
    // Through the CLI, as an operator would.
    let api = format!("127.0.0.1:{}", net[guard].api_port);
    let out = run_cli(
        &["ban", &friend_id.to_string(), "--api", &api, "--json"],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let outcome: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(outcome["changed"], true);
    assert!(
        outcome["closed_connections"].as_u64() >= Some(1),
        "{outcome}"
    );
    {
        let net = &net;
        eventually(
            Duration::from_secs(5),
            "banned friend dropped on both sides",
            || async move {
                let gone_here = !net[guard].peer_ids().await?.contains(&friend_id);
                let gone_there = !net[friend].peer_ids().await?.contains(&net[guard].id());
                Ok((gone_here && gone_there).then_some(()))
            },
        )
        .await?;
    }
    // It stays out: a new dial (and its own retries: the guard is its bootnode) is
    // refused by the guard once the handshake names it.
    let refused_before = denied_peers(&net, guard).await?;
    let _ = net[friend].connect(&net[guard].addr().to_string()).await;
    refused_since(&net, guard, refused_before).await?;
    assert!(!net[guard].peer_ids().await?.contains(&friend_id));
    println!("checked: a runtime ban drops the live peer and keeps it out");

    // The ban outlives a restart of the guard.
    let (status, _) = net[guard].terminate()?;
    assert!(status.success());
    net[guard].start().await?;
    let out = run_cli(&["bans", "--api", &api, "--json"], &[]);
    let bans: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let listed: Vec<(String, String)> = bans
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["target"].as_str().unwrap().to_string(),
                b["source"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        listed.contains(&(friend_id.to_string(), "runtime".into())),
        "{listed:?}"
    );
    assert!(
        listed.contains(&(outcast_id.clone(), "config".into())),
        "{listed:?}"
    );
    let _ = net[friend].connect(&net[guard].addr().to_string()).await;
    refused_since(&net, guard, 0.0).await?;
    assert!(!net[guard].peer_ids().await?.contains(&friend_id));
    println!("checked: runtime bans persist across a restart");

    // A config ban cannot be lifted at runtime; a runtime one can.
    let err = net[guard].unban(&outcast_id).await.expect_err("config ban");
    assert!(format!("{err:#}").contains("config"), "{err:#}");
    let outcome = net[guard].unban(&friend_id.to_string()).await?;
    assert!(outcome.changed);
    net[friend].connect(&net[guard].addr().to_string()).await?;
    guard_sees(&net, guard, friend_id).await?;
    println!("checked: unban lets the peer back; config bans stay");

    // An IP range: banning 127.0.0.0/8 drops every loopback peer and refuses new ones.
    let outcome = net[guard].ban("127.0.0.0/8").await?;
    assert!(outcome.closed_connections >= 1, "{outcome:?}");
    {
        let net = &net;
        // Both ends: a friend that has not yet seen the close would answer the next
        // connect from the connection it still holds.
        let guard_id = net[guard].id();
        eventually(
            Duration::from_secs(5),
            "loopback peers dropped",
            || async move {
                let guard_alone = net[guard].peer_ids().await?.is_empty();
                let friend_left = !net[friend].peer_ids().await?.contains(&guard_id);
                Ok((guard_alone && friend_left).then_some(()))
            },
        )
        .await?;
    }
    assert!(net[friend]
        .connect(&net[guard].addr().to_string())
        .await
        .is_err());
    let ip_denied = net[guard]
        .metric("servant_connections_denied_total{reason=\"ip_denied\"}")
        .await?;
    assert!(ip_denied >= 1.0, "{ip_denied}");
    net[guard].unban("127.0.0.0/8").await?;
    net[friend].connect(&net[guard].addr().to_string()).await?;
    guard_sees(&net, guard, friend_id).await?;
    println!("checked: a CIDR ban drops and refuses its range until lifted");
    net.pass();
    Ok(())
}

/// Inbound connections per remote IP: a guard allowing two per address takes two
/// peers from 127.0.0.1, refuses the third (counted as `ip_limit`), and a slot freed
/// on 127.0.0.1 can be taken again. (A node cannot choose its source address on
/// loopback, so other addresses are counted apart in `ip_limits`' unit tests and in
/// the connection flood of `attack_conn.rs`, which binds its dialers' addresses.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_connections_are_capped_per_ip() -> Result<()> {
    let mut net = Net::new();
    let guard = net
        .spawn(
            "guard",
            &[
                "--max-connections-per-ip".into(),
                "2".into(),
                // No outbound dials of its own: only inbound connections count.
                "--conn-low".into(),
                "1".into(),
            ],
        )
        .await?;
    let target = net[guard].addr().to_string();
    let mut same_ip = Vec::new();
    for name in ["p1", "p2", "p3"] {
        same_ip.push(net.spawn(name, &[]).await?);
    }
    let refused = "servant_connections_denied_total{reason=\"ip_limit\"}";
    for &p in &same_ip[..2] {
        net[p].connect(&target).await?;
        guard_sees(&net, guard, net[p].id()).await?;
    }
    let third = net[same_ip[2]].connect(&target).await;
    println!("third dial from 127.0.0.1: {third:?}");
    let net_ref = &net;
    eventually(
        Duration::from_secs(10),
        "the guard to refuse the third connection from 127.0.0.1",
        || async move { Ok((net_ref[guard].metric(refused).await? >= 1.0).then_some(())) },
    )
    .await?;
    let held = net[guard].peer_ids().await?;
    anyhow::ensure!(
        !held.contains(&net[same_ip[2]].id()),
        "the guard holds a third connection from 127.0.0.1"
    );
    println!("checked: two peers from 127.0.0.1 admitted, the third refused as ip_limit");
    let (code, body) = net[guard].readyz_body().await?;
    anyhow::ensure!(
        code == 200
            && body.contains("warning: connection limits refused")
            && body.contains("max_connections_per_ip"),
        "/readyz should stay 200 and say the per-IP cap refuses peers: {code} {body:?}"
    );
    println!(
        "checked: /readyz stays 200 and its body says so: {:?}",
        body.trim()
    );

    net[same_ip[0]].kill();
    let net_ref = &net;
    let p1 = net[same_ip[0]].id();
    eventually(
        Duration::from_secs(10),
        "the guard to notice the first peer left",
        || async move { Ok((!net_ref[guard].peer_ids().await?.contains(&p1)).then_some(())) },
    )
    .await?;
    net[same_ip[2]].connect(&target).await?;
    guard_sees(&net, guard, net[same_ip[2]].id()).await?;
    println!("checked: the freed slot on 127.0.0.1 is taken by the third peer");
    net.pass();
    Ok(())
}
