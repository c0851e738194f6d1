//! Hostile broadcasts from a bare libp2p peer: an old (replayed) message, a forged
//! origin, malformed bytes and a re-encoded duplicate are refused and counted, the
//! sender loses score, and honest messages still flow.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use servant_protocol::Envelope;
use servant_tests::{eventually, gossip_peer::GossipPeer, Net};

const TOPIC: &str = "replay";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_broadcasts_are_refused_and_penalized() -> Result<()> {
    let mut net = Net::new();
    let node = net.spawn("node", &[]).await?;
    let mut sub = net[node].subscribe(TOPIC).await?;
    let peer = GossipPeer::start(net[node].addr(), TOPIC).await?;
    let origin = peer.peer_id.to_string();
    let rejected = |reason: &str| {
        format!("servant_messages_rejected_total{{topic=\"{TOPIC}\",reason=\"{reason}\"}}")
    };

    // An honest message first: the path works.
    let honest = Envelope::new("hi", "honest", now_ms(), origin.clone())?;
    peer.publish(honest.encode()?).await?;
    let (got, _) = sub.wait_for(&honest.id, Duration::from_secs(10)).await;
    assert!(got.is_some(), "an honest message is delivered");

    // The honest message again, encoded differently: new bytes, so gossipsub's own
    // cache lets it through, but it is the same content id. Sent before the invalid
    // ones, which graylist the sender: after them the node ignores it altogether.
    let mut value = serde_json::to_value(&honest)?;
    value["title"] = serde_json::json!("hi");
    let reencoded = serde_json::to_vec_pretty(&value)?;
    peer.publish(reencoded).await?;

    // A message from twenty minutes ago (a replay, long after any duplicate cache
    // forgot it, and older than clock skew explains) is refused and penalized.
    let old = Envelope::new("hi", "replayed", now_ms() - 20 * 60 * 1000, origin.clone())?;
    peer.publish(old.encode()?).await?;
    // A message in another peer's name.
    let forged = Envelope::new("hi", "forged", now_ms(), net[node].id().to_string())?;
    peer.publish(forged.encode()?).await?;
    // Bytes that are not an envelope.
    peer.publish(b"{\"not\": \"an envelope\"}".to_vec()).await?;
    for reason in ["too_old", "origin_mismatch", "malformed", "duplicate"] {
        let series = rejected(reason);
        let net = &net;
        eventually(Duration::from_secs(10), &series, || {
            let series = series.clone();
            async move { Ok((net[node].metric(&series).await? >= 1.0).then_some(())) }
        })
        .await?;
        println!("checked: {reason} message refused and counted");
    }
    let late = sub.drain_for(Duration::from_millis(500)).await;
    assert!(
        late.is_empty(),
        "nothing hostile reached the subscriber: {late:?}"
    );

    // The sender of invalid messages lost gossipsub score at the node.
    let peer_id = peer.peer_id.to_string();
    let score = {
        let net = &net;
        eventually(
            Duration::from_secs(10),
            "negative score for the sender",
            || {
                let peer_id = peer_id.clone();
                async move {
                    let peers = net[node].peers().await?;
                    let score = peers
                        .iter()
                        .find(|p| p.peer_id == peer_id)
                        .and_then(|p| p.gossipsub_score);
                    Ok(score.filter(|s| *s < 0.0))
                }
            },
        )
        .await?
    };
    println!("checked: the sender's gossipsub score fell to {score:.1}");

    // The node keeps running and serving honest peers. (The offender itself is now
    // below the publish threshold: the node no longer sends it anything.)
    let mut honest_peer = GossipPeer::start(net[node].addr(), TOPIC).await?;
    let sent = {
        let net = &net;
        eventually(
            Duration::from_secs(10),
            "a publish to reach a subscriber",
            || async move { Ok(net[node].publish(TOPIC, "still", "alive").await.ok()) },
        )
        .await?
    };
    let got = tokio::time::timeout(Duration::from_secs(10), honest_peer.received.recv()).await?;
    let (_, data) = got.expect("peer receives");
    assert_eq!(Envelope::decode(&data)?.id, sent.envelope.id);
    println!("checked: the node keeps running and publishing to honest peers");
    net.pass();
    Ok(())
}
