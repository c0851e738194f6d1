//! A bare rust-libp2p gossipsub peer living in the test process: it speaks the same
//! protocols as a Servant node but publishes whatever bytes the test hands it, so
//! tests can send what an honest node never would (stale, forged, malformed).

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{anyhow, Result};
use futures::StreamExt;
use libp2p::{
    gossipsub, identify, identity::Keypair, noise, swarm::NetworkBehaviour, swarm::SwarmEvent, tcp,
    yamux, Multiaddr, PeerId,
};
use tokio::sync::{mpsc, oneshot};

#[derive(NetworkBehaviour)]
struct Behaviour {
    identify: identify::Behaviour,
    gossipsub: gossipsub::Behaviour,
}

enum Cmd {
    Publish(Vec<u8>, oneshot::Sender<Result<(), String>>),
    Connected(oneshot::Sender<Vec<PeerId>>),
}

/// A running test peer.
pub struct GossipPeer {
    /// Its PeerId.
    pub peer_id: PeerId,
    /// Messages it received on the topic: (source, data).
    pub received: mpsc::UnboundedReceiver<(Option<PeerId>, Vec<u8>)>,
    cmd: mpsc::Sender<Cmd>,
    task: tokio::task::JoinHandle<()>,
}

impl GossipPeer {
    /// Starts a peer subscribed to `topic` and dials `target`; it forwards what it
    /// receives as any gossipsub peer does.
    pub async fn start(target: Multiaddr, topic: &str) -> Result<GossipPeer> {
        Self::start_with(&[target], topic, None).await
    }

    /// Starts a peer subscribed to `topic` that dials every one of `targets`. With
    /// `forward`, it validates each message itself and passes it on only while the
    /// flag is set: cleared, it stays in the mesh and forwards nothing (a dropper).
    pub async fn start_with(
        targets: &[Multiaddr],
        topic: &str,
        forward: Option<Arc<AtomicBool>>,
    ) -> Result<GossipPeer> {
        let key = Keypair::generate_ed25519();
        let peer_id = key.public().to_peer_id();
        let topic = gossipsub::IdentTopic::new(topic);
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_tcp(
                tcp::Config::default(),
                noise::Config::new,
                yamux::Config::default,
            )?
            .with_behaviour(|key| {
                let mut builder = gossipsub::ConfigBuilder::default();
                builder
                    .message_id_fn(servant::behaviour::message_id)
                    .max_transmit_size(servant::behaviour::GOSSIPSUB_MAX_TRANSMIT);
                if forward.is_some() {
                    builder.validate_messages();
                }
                let config = builder.build().map_err(|e| anyhow!("{e}"))?;
                let gossipsub = gossipsub::Behaviour::new(
                    gossipsub::MessageAuthenticity::Signed(key.clone()),
                    config,
                )
                .map_err(|e| anyhow!("{e}"))?;
                Ok(Behaviour {
                    identify: identify::Behaviour::new(identify::Config::new(
                        servant::behaviour::PROTOCOL_VERSION.into(),
                        key.public(),
                    )),
                    gossipsub,
                })
            })
            .map_err(|e| anyhow!("{e}"))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build();
        swarm.behaviour_mut().gossipsub.subscribe(&topic)?;
        swarm.listen_on("/ip4/127.0.0.1/tcp/0".parse()?)?;
        for target in targets {
            swarm.dial(target.clone())?;
        }
        let (cmd_tx, mut cmd_rx) = mpsc::channel::<Cmd>(16);
        let (recv_tx, recv_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    event = swarm.select_next_some() => {
                        if let SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(
                            gossipsub::Event::Message { message, message_id, propagation_source },
                        )) = event
                        {
                            if let Some(forward) = &forward {
                                // Ignore, not Reject: a dropper hides, it does not
                                // accuse the honest peer that sent the message.
                                let verdict = if forward.load(Ordering::Relaxed) {
                                    gossipsub::MessageAcceptance::Accept
                                } else {
                                    gossipsub::MessageAcceptance::Ignore
                                };
                                swarm.behaviour_mut().gossipsub.report_message_validation_result(
                                    &message_id,
                                    &propagation_source,
                                    verdict,
                                );
                            }
                            let _ = recv_tx.send((message.source, message.data));
                        }
                    }
                    cmd = cmd_rx.recv() => match cmd {
                        Some(Cmd::Publish(bytes, reply)) => {
                            let result = swarm
                                .behaviour_mut()
                                .gossipsub
                                .publish(topic.clone(), bytes)
                                .map(|_| ())
                                .map_err(|e| e.to_string());
                            let _ = reply.send(result);
                        }
                        Some(Cmd::Connected(reply)) => {
                            let _ = reply.send(swarm.connected_peers().copied().collect());
                        }
                        None => break,
                    }
                }
            }
        });
        Ok(GossipPeer {
            peer_id,
            received: recv_rx,
            cmd: cmd_tx,
            task,
        })
    }

    /// Publishes `bytes` on the topic, retrying until a peer subscribes (10 s).
    pub async fn publish(&self, bytes: Vec<u8>) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (tx, rx) = oneshot::channel();
            self.cmd
                .send(Cmd::Publish(bytes.clone(), tx))
                .await
                .map_err(|_| anyhow!("peer stopped"))?;
            match rx.await? {
                Ok(()) => return Ok(()),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(anyhow!("publish failed: {e}")),
            }
        }
    }

    /// PeerIds it is connected to.
    pub async fn connected(&self) -> Result<Vec<PeerId>> {
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(Cmd::Connected(tx))
            .await
            .map_err(|_| anyhow!("peer stopped"))?;
        Ok(rx.await?)
    }
}

impl Drop for GossipPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
