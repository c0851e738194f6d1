//! A bootnode and ten nodes as real processes on 127.0.0.1 that know only the
//! bootnode: discovery, exactly-once broadcast, losing the bootnode, a SIGKILLed
//! node that restarts with every bootnode down, and a graceful leave.

use std::{collections::HashSet, time::Duration};

use anyhow::Result;
use servant_tests::{eventually, Net};

const TOPIC: &str = "news";
const NODES: usize = 10;

/// Subscribes every running node to TOPIC and waits until each sees subscribed peers.
async fn subscribe_all(
    net: &Net,
    indexes: &[usize],
) -> Result<Vec<(usize, servant_tests::Subscription)>> {
    let mut subs = Vec::new();
    for &i in indexes {
        subs.push((i, net[i].subscribe(TOPIC).await?));
    }
    for &i in indexes {
        eventually(
            Duration::from_secs(30),
            &format!("{} to see topic peers", net[i].name),
            || async move {
                let status = net[i].status().await?;
                let ok = status
                    .topics
                    .iter()
                    .any(|t| t.name == TOPIC && t.mesh_peers >= 1);
                Ok(ok.then_some(()))
            },
        )
        .await?;
    }
    Ok(subs)
}

/// Publishes from `from` and checks every other subscriber got it exactly once.
async fn publish_and_check(
    net: &Net,
    from: usize,
    subs: &mut [(usize, servant_tests::Subscription)],
    body: &str,
) -> Result<()> {
    let sent = net[from].publish(TOPIC, "test", body).await?;
    let id = sent.envelope.id.clone();
    for (i, sub) in subs.iter_mut() {
        let (delivery, _) = sub.wait_for(&id, Duration::from_secs(10)).await;
        let delivery = delivery.unwrap_or_else(|| {
            panic!(
                "{} never received {body:?} from {}",
                net[*i].name, net[from].name
            )
        });
        assert_eq!(delivery.envelope.body, body);
        assert_eq!(delivery.envelope.origin, net[from].id().to_string());
    }
    // Give duplicates time to arrive, then count them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (i, sub) in subs.iter_mut() {
        let extra = sub
            .drain_now()
            .iter()
            .filter(|d| d.envelope.id == id)
            .count();
        assert_eq!(
            extra, 0,
            "{} received {body:?} more than once",
            net[*i].name
        );
    }
    println!(
        "checked: {body:?} from {} reached {} nodes exactly once",
        net[from].name,
        subs.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootnode_and_ten_nodes() -> Result<()> {
    let mut net = Net::new();
    let boot = net.spawn("boot", &[]).await?;
    let boot_addr = net[boot].addr().to_string();
    let mut nodes = Vec::new();
    for n in 0..NODES {
        let i = net.add(
            &format!("node{n}"),
            &["--bootnode".into(), boot_addr.clone()],
        );
        nodes.push(i);
    }
    for &i in &nodes {
        net[i].start().await?;
    }
    let all: Vec<usize> = std::iter::once(boot).chain(nodes.iter().copied()).collect();
    let ids: HashSet<_> = all.iter().map(|&i| net[i].id()).collect();

    // Everyone discovers everyone through the DHT, starting from the bootnode only.
    let expected = all.len() - 1;
    for &i in &all {
        let net = &net;
        eventually(
            Duration::from_secs(60),
            &format!("{} to know all {expected} others", net[i].name),
            || async move {
                let status = net[i].status().await?;
                Ok((status.routing_table_size >= expected && status.ready).then_some(()))
            },
        )
        .await?;
    }
    println!(
        "checked: all {} nodes have every other node in their routing table",
        all.len()
    );
    for &i in &nodes {
        let peers = net[i].peer_ids().await?;
        assert!(peers.is_subset(&ids));
        assert!(
            peers.len() >= 2,
            "{} holds {} connections; discovery should add more than the bootnode",
            net[i].name,
            peers.len()
        );
    }

    // Two nodes that dialed each other at once keep one connection between them.
    for &i in &all {
        let net = &net;
        eventually(
            Duration::from_secs(15),
            &format!("{} to keep one connection per peer", net[i].name),
            || async move {
                let peers = net[i].peers().await?;
                Ok(peers.iter().all(|p| p.addrs.len() == 1).then_some(()))
            },
        )
        .await?;
    }
    println!("checked: every node keeps a single connection to each of its peers");

    // A broadcast reaches every node exactly once.
    let mut subs = subscribe_all(&net, &all).await?;
    publish_and_check(&net, nodes[3], &mut subs, "first").await?;

    // The mesh does not depend on the bootnode.
    net[boot].kill();
    subs.retain(|(i, _)| *i != boot);
    publish_and_check(&net, nodes[5], &mut subs, "after the bootnode died").await?;

    // A node killed with SIGKILL keeps its PeerId and rejoins with every bootnode down,
    // through the peers it remembered.
    let victim = nodes[7];
    let id_before = net[victim].id();
    net[victim].kill();
    subs.retain(|(i, _)| *i != victim);
    net[victim].start().await?; // the harness fails if the PeerId changed
    assert_eq!(net[victim].id(), id_before);
    {
        let net = &net;
        eventually(
            Duration::from_secs(45),
            "restarted node to rejoin",
            || async move {
                let status = net[victim].status().await?;
                Ok((status.connected_peers >= 2).then_some(()))
            },
        )
        .await?;
    }
    // Its own doing: with every bootnode down it dialed peers it remembered (they
    // seed its routing table), and holds connections it chose.
    let outbound = net[victim]
        .peers()
        .await?
        .iter()
        .filter(|p| p.direction != "inbound")
        .count();
    assert!(outbound >= 1, "the restarted node dialed nobody itself");
    {
        let net = &net;
        eventually(
            Duration::from_secs(10),
            "the dead bootnode to be logged",
            || async move {
                Ok(net[victim]
                    .log()
                    .contains("bootnode unreachable")
                    .then_some(()))
            },
        )
        .await?;
    }
    println!(
        "checked: SIGKILLed node restarted with the same PeerId and rejoined without the bootnode"
    );
    let sub = net[victim].subscribe(TOPIC).await?;
    subs.push((victim, sub));
    {
        let net = &net;
        eventually(
            Duration::from_secs(30),
            "restarted node to join the mesh",
            || async move {
                let status = net[victim].status().await?;
                Ok(status
                    .topics
                    .iter()
                    .any(|t| t.name == TOPIC && t.mesh_peers >= 1)
                    .then_some(()))
            },
        )
        .await?;
    }
    publish_and_check(&net, nodes[1], &mut subs, "after the restart").await?;

    // A graceful leave: exit 0 within 5 s, and the others stop listing it.
    let leaver = nodes[2];
    let leaver_id = net[leaver].id();
    let (status, took) = net[leaver].terminate()?;
    assert!(status.success(), "SIGTERM exit status {status:?}");
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    println!("checked: SIGTERM exits 0 in {took:?}");
    for &i in nodes.iter().filter(|&&i| i != leaver && i != victim) {
        let net = &net;
        eventually(
            Duration::from_secs(5),
            "the leaver to disappear",
            || async move { Ok((!net[i].peer_ids().await?.contains(&leaver_id)).then_some(())) },
        )
        .await?;
    }
    println!("checked: the node that left disappeared from every peer list");
    net.pass();
    Ok(())
}
