//! Reachability, roles, relay reservations and hole punching between real processes
//! on loopback. On loopback every node can dial every other, so AutoNAT finds them
//! public and they become super-peers; a node forced to `--role peer` reserves on
//! relays as a NATed peer does, and a relayed connection to it is upgraded to a
//! direct one by DCUtR. The NAT lab (namespaces with NAT routers) covers the cases
//! loopback cannot: real NATs, failed dial-backs, impossible hole punches.

use std::{collections::HashSet, time::Duration};

use anyhow::{bail, Result};
use servant::traversal::ReachView;
use servant_tests::{eventually, Net};

async fn reach(net: &Net, i: usize) -> Result<ReachView> {
    let url = format!("{}/v1/reach", net[i].api_url());
    Ok(reqwest::get(url).await?.error_for_status()?.json().await?)
}

/// Accepted reservations of node `i`: the relay ids and our circuit addresses.
async fn reservations(net: &Net, i: usize) -> Result<(HashSet<String>, Vec<String>)> {
    let view = reach(net, i).await?;
    let accepted: Vec<_> = view.reservations.iter().filter(|r| r.accepted).collect();
    Ok((
        accepted.iter().map(|r| r.relay.clone()).collect(),
        accepted.iter().flat_map(|r| r.addrs.clone()).collect(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn super_peers_relay_for_a_peer_and_relayed_connections_go_direct() -> Result<()> {
    let mut net = Net::new();
    let boot = net.spawn("boot", &[]).await?;
    let join = vec![
        "--bootnode".to_string(),
        net[boot].addr().to_string(),
        "--reach-probe-interval".into(),
        "30s".into(),
    ];
    let mut supers = Vec::new();
    for name in ["s1", "s2", "s3"] {
        supers.push(net.spawn(name, &join).await?);
    }
    let public: Vec<usize> = {
        let net = &net;
        let supers = &supers;
        // Usually 10-20 s; a loaded machine (this one builds Docker images in other
        // tests) has seen a probe round restart and take most of a minute.
        eventually(
            Duration::from_secs(120),
            "super-peers to be public",
            || async move {
                let mut public = Vec::new();
                for &i in supers {
                    let view = reach(net, i).await?;
                    if view.reachability.as_str() == "public" && view.role.as_str() == "super" {
                        public.push(i);
                    }
                }
                Ok((public.len() == supers.len()).then_some(public))
            },
        )
        .await?
    };
    let view = reach(&net, public[0]).await?;
    let confirmed = view
        .candidates
        .iter()
        .find(|c| c.confirmed)
        .map(|c| c.reached_by.len())
        .unwrap_or(0);
    println!(
        "checked: s1, s2, s3 are public super-peers ({})",
        view.reason
    );
    assert!(confirmed >= 2 || view.confirmed_addrs.len() == 1);
    let status = net[public[0]].status().await?;
    assert_eq!(status.role, "super");
    assert_eq!(status.reachability, "public");
    assert!(!status.external_addrs.is_empty());
    let metrics = net[public[0]].metrics().await?;
    assert_eq!(
        servant_tests::metric_value(&metrics, "servant_reachability{state=\"public\"}"),
        Some(1.0)
    );
    assert_eq!(
        servant_tests::metric_value(&metrics, "servant_role{state=\"super\"}"),
        Some(1.0)
    );
    println!("checked: status, /v1/reach and metrics agree: public, super");

    // A peer (as if behind NAT) reserves on two super-peers.
    let mut peer_args = join.clone();
    // At its low watermark with the bootnode and its relays, it dials no one else,
    // so the only way to it is through a relay, as behind a NAT.
    peer_args.extend([
        "--role".to_string(),
        "peer".into(),
        "--conn-low".into(),
        "1".into(),
    ]);
    let p = net.spawn("p", &peer_args).await?;
    let (relays, circuit_addrs) = {
        let net = &net;
        eventually(
            Duration::from_secs(60),
            "two relay reservations",
            || async {
                let (relays, addrs) = reservations(net, p).await?;
                Ok((relays.len() == 2 && !addrs.is_empty()).then_some((relays, addrs)))
            },
        )
        .await?
    };
    let super_ids: HashSet<String> = std::iter::once(boot)
        .chain(supers.iter().copied())
        .map(|i| net[i].id().to_string())
        .collect();
    assert!(
        relays.is_subset(&super_ids),
        "{relays:?} are not super-peers"
    );
    assert_eq!(net[p].metric("servant_relay_reservations_held").await?, 2.0);
    println!("checked: the peer holds reservations on two super-peers: {circuit_addrs:?}");

    // Another node dials the peer through a relay; DCUtR upgrades the connection.
    // At a low watermark of one, q dials no one but the bootnode: nothing but the
    // relayed dial below connects it to p.
    let mut q_args = join.clone();
    q_args.extend(["--conn-low".to_string(), "1".into()]);
    let q = net.spawn("q", &q_args).await?;
    let target = circuit_addrs
        .iter()
        .find(|a| a.contains("/tcp/"))
        .cloned()
        .unwrap_or_else(|| circuit_addrs[0].clone());
    let p_peer = net[p].id().to_string();
    let q_peer = net[q].id().to_string();
    // An AutoNAT dial-back from p to q would be a direct connection that leaves DCUtR
    // nothing to do (and no room under max_connections_per_peer): wait until the two
    // hold no connection, so the relayed path is what gets exercised.
    {
        let net = &net;
        let (p_peer, q_peer) = (&p_peer, &q_peer);
        eventually(
            Duration::from_secs(60),
            "q and p not connected",
            || async move {
                let apart = !net[q].peers().await?.iter().any(|v| &v.peer_id == p_peer)
                    && !net[p].peers().await?.iter().any(|v| &v.peer_id == q_peer);
                Ok(apart.then_some(()))
            },
        )
        .await?;
    }
    // p's reservations may have moved while q settled (a relay closing a duplicate
    // connection takes the reservation on it along): dial through one it holds now.
    let target = {
        let net = &net;
        eventually(Duration::from_secs(60), "a current reservation", || async {
            let (_, addrs) = reservations(net, p).await?;
            Ok(addrs
                .iter()
                .find(|a| a.contains("/tcp/"))
                .or(addrs.first())
                .cloned())
        })
        .await
        .unwrap_or(target)
    };
    let outcome = net[q].connect(&target).await?;
    assert_eq!(outcome.peer_id, net[p].id().to_string());
    println!("checked: q reached p through {}", outcome.addr);
    let p_id = net[p].id().to_string();
    {
        let net = &net;
        let p_id = &p_id;
        eventually(
            Duration::from_secs(30),
            "a direct connection after DCUtR",
            || async move {
                let direct = net[q]
                    .peers()
                    .await?
                    .into_iter()
                    .filter(|v| &v.peer_id == p_id)
                    .any(|v| v.addrs.iter().any(|a| !a.contains("p2p-circuit")));
                let punched = net[q]
                    .metric("servant_holepunch_results_total{reason=\"direct\"}")
                    .await
                    .unwrap_or(0.0)
                    + net[p]
                        .metric("servant_holepunch_results_total{reason=\"direct\"}")
                        .await
                        .unwrap_or(0.0);
                Ok((direct && punched >= 1.0).then_some(()))
            },
        )
        .await?;
    }
    let punches = reach(&net, p).await?.holepunches;
    let punches_q = reach(&net, q).await?.holepunches;
    println!(
        "checked: DCUtR turned the relayed connection into a direct one ({:?})",
        punches
            .iter()
            .chain(&punches_q)
            .filter(|h| h.success)
            .map(|h| h.after_ms)
            .collect::<Vec<_>>()
    );

    // `servant doctor` explains it in words.
    let api = format!(
        "127.0.0.1:{}",
        net[p].api_url().rsplit(':').next().unwrap_or_default()
    );
    let out = servant_tests::run_cli(&["doctor", "--api", &api], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "doctor: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("acts as a peer"), "{text}");
    assert!(text.contains("Relay reservation held on"), "{text}");
    println!("checked: servant doctor names the role and the relays held");

    // The relay the peer holds a reservation on goes away: it reserves elsewhere.
    let Some(gone) = (0..4)
        .map(|k| if k == 0 { boot } else { supers[k - 1] })
        .find(|&i| relays.contains(&net[i].id().to_string()))
    else {
        bail!("no relay among the super-peers");
    };
    let gone_id = net[gone].id().to_string();
    net[gone].kill();
    {
        let net = &net;
        let gone_id = &gone_id;
        eventually(
            Duration::from_secs(60),
            "a replacement reservation",
            || async move {
                let (now, _) = reservations(net, p).await?;
                Ok((now.len() == 2 && !now.contains(gone_id)).then_some(now))
            },
        )
        .await?;
    }
    println!("checked: after its relay was killed the peer reserved on another super-peer");
    net.pass();
    Ok(())
}
