//! The baseline: bare rust-libp2p swarms with identify and gossipsub only, each
//! driven by a task of its own, with Servant's gossipsub parameters and transport
//! settings and nothing else of Servant.
//!
//! The one deliberate difference: no `validate_messages()`. Plain gossipsub forwards
//! a message as soon as it arrives; Servant holds it until its event loop has checked
//! the envelope. Messages are still signed and strictly validated by gossipsub.

use std::{collections::HashMap, future::Future, sync::Arc, time::Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures::{future::join_all, StreamExt};
use libp2p::{
    gossipsub, identify,
    identity::Keypair,
    noise,
    swarm::{ConnectionId, NetworkBehaviour, SwarmEvent},
    tcp, yamux, Multiaddr, PeerId, Swarm,
};
use prometheus_client::registry::Registry;
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

use crate::{
    driver::{BenchNet, Counters, NodeView},
    load::{Key, Recorders},
    params::Params,
    topology::Edge,
};

/// What this side runs, for the report.
pub const DESCRIPTION: &str = "bare libp2p Swarm x N in one process, one tokio task each: TCP \
    (nodelay, noise, yamux) on 127.0.0.1, identify and gossipsub only, with Servant's gossipsub \
    config (strict signing, BLAKE3 message ids, max transmit size, peer scoring with the same \
    parameters, the same metrics) except validate_messages; connections held open for the run \
    (as Servant holds them until it trims); the same edges and load, publishing the same \
    envelope bytes";

#[derive(NetworkBehaviour)]
struct Bare {
    identify: identify::Behaviour,
    gossipsub: gossipsub::Behaviour,
}

type Reply = oneshot::Sender<Result<(), String>>;

enum Cmd {
    Dial(PeerId, Multiaddr, Reply),
    Publish(Vec<u8>, Reply),
    View(oneshot::Sender<RawView>),
}

struct RawView {
    established: u64,
    topic_peers: usize,
    mesh_peers: usize,
    connections: usize,
    peers: Vec<(PeerId, bool)>,
}

struct BareNode {
    peer_id: PeerId,
    addr: Multiaddr,
    commands: mpsc::Sender<Cmd>,
    task: JoinHandle<()>,
}

/// The bare swarms and their metric registries.
pub struct BaselineNet {
    nodes: Vec<BareNode>,
    index: HashMap<PeerId, usize>,
    registries: Vec<Registry>,
}

/// Servant's gossipsub, parameters and scoring included, without its envelope check
/// before forwarding (`validate_messages`).
fn gossipsub(key: &Keypair, registry: &mut Registry) -> Result<gossipsub::Behaviour> {
    servant::behaviour::build_gossipsub(key, registry, false).map_err(|e| anyhow!("{e}"))
}

fn build(topic: &gossipsub::IdentTopic, registry: &mut Registry) -> Result<Swarm<Bare>> {
    let key = Keypair::generate_ed25519();
    let behaviour = Bare {
        // Servant's identify settings.
        identify: identify::Behaviour::new(
            identify::Config::new(
                servant::behaviour::PROTOCOL_VERSION.to_string(),
                key.public(),
            )
            .with_agent_version("bare-baseline".into())
            .with_push_listen_addr_updates(true)
            .with_cache_size(256),
        ),
        gossipsub: gossipsub(&key, registry)?,
    };
    // Servant keeps established connections open until it trims them; a bare swarm
    // has no such behaviour, so a long idle timeout keeps its connections for the run.
    let idle = std::time::Duration::from_secs(3600);
    let Ok(builder) = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_behaviour(|_| behaviour);
    let mut swarm = builder
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
        .build();
    let gossipsub = &mut swarm.behaviour_mut().gossipsub;
    gossipsub.subscribe(topic)?;
    gossipsub
        .set_topic_params(topic.clone(), servant::behaviour::topic_score_params())
        .map_err(|e| anyhow!("topic score params: {e}"))?;
    swarm.listen_on("/ip4/127.0.0.1/tcp/0".parse()?)?;
    Ok(swarm)
}

async fn listen_addr(swarm: &mut Swarm<Bare>) -> Result<Multiaddr> {
    let wait = async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::NewListenAddr { address, .. } => return Ok(address),
                SwarmEvent::ListenerError { error, .. } => bail!("listen: {error}"),
                _ => {}
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), wait)
        .await
        .context("no listen address within 5 s")?
}

/// One swarm's event loop: swarm events first, then commands, as Servant's does.
async fn drive(
    mut swarm: Swarm<Bare>,
    mut commands: mpsc::Receiver<Cmd>,
    topic: gossipsub::TopicHash,
    me: usize,
    recorders: Arc<Recorders>,
) {
    let mut dialing: HashMap<PeerId, Vec<Reply>> = HashMap::new();
    let mut connections: HashMap<PeerId, HashMap<ConnectionId, bool>> = HashMap::new();
    let mut established = 0;
    loop {
        tokio::select! {
            event = swarm.select_next_some() => match event {
                SwarmEvent::Behaviour(BareEvent::Gossipsub(gossipsub::Event::Message {
                    message_id, ..
                })) => {
                    let at = Instant::now();
                    if let Ok(key) = Key::try_from(message_id.0.as_slice()) {
                        recorders.record(me, key, at);
                    }
                }
                SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, .. } => {
                    established += 1;
                    connections
                        .entry(peer_id)
                        .or_default()
                        .insert(connection_id, endpoint.is_dialer());
                    for reply in dialing.remove(&peer_id).unwrap_or_default() {
                        let _ = reply.send(Ok(()));
                    }
                }
                SwarmEvent::ConnectionClosed { peer_id, connection_id, .. } => {
                    if let Some(conns) = connections.get_mut(&peer_id) {
                        conns.remove(&connection_id);
                        if conns.is_empty() {
                            connections.remove(&peer_id);
                        }
                    }
                }
                SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), error, .. } => {
                    for reply in dialing.remove(&peer).unwrap_or_default() {
                        let _ = reply.send(Err(error.to_string()));
                    }
                }
                _ => {}
            },
            command = commands.recv() => match command {
                None => break,
                Some(Cmd::Dial(peer, addr, reply)) => match swarm.dial(addr) {
                    Ok(()) => dialing.entry(peer).or_default().push(reply),
                    Err(e) => {
                        let _ = reply.send(Err(e.to_string()));
                    }
                },
                Some(Cmd::Publish(data, reply)) => {
                    let result = swarm
                        .behaviour_mut()
                        .gossipsub
                        .publish(topic.clone(), data)
                        .map(|_| ())
                        .map_err(|e| e.to_string());
                    let _ = reply.send(result);
                }
                Some(Cmd::View(reply)) => {
                    let gossipsub = &swarm.behaviour().gossipsub;
                    let _ = reply.send(RawView {
                        established,
                        topic_peers: gossipsub
                            .all_peers()
                            .filter(|(_, topics)| topics.contains(&&topic))
                            .count(),
                        mesh_peers: gossipsub.mesh_peers(&topic).count(),
                        connections: swarm.network_info().connection_counters().num_established()
                            as usize,
                        peers: connections
                            .iter()
                            .map(|(peer, conns)| (*peer, conns.values().any(|dialer| *dialer)))
                            .collect(),
                    });
                }
            },
        }
    }
}

async fn ask<T>(node: &BareNode, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T> {
    let (tx, rx) = oneshot::channel();
    node.commands
        .send(make(tx))
        .await
        .map_err(|_| anyhow!("swarm task of {} ended", node.peer_id))?;
    rx.await
        .map_err(|_| anyhow!("swarm task of {} dropped a reply", node.peer_id))
}

impl BenchNet for BaselineNet {
    async fn start(params: &Params, recorders: Arc<Recorders>) -> Result<Self> {
        let topic = gossipsub::IdentTopic::new(params.topic.as_str());
        let mut nodes = Vec::with_capacity(params.nodes);
        let mut registries = Vec::with_capacity(params.nodes);
        for i in 0..params.nodes {
            let mut registry = Registry::default();
            let mut swarm = build(&topic, &mut registry).with_context(|| format!("node {i}"))?;
            let peer_id = *swarm.local_peer_id();
            let addr = listen_addr(&mut swarm).await?;
            let (commands, rx) = mpsc::channel(servant::client::COMMAND_QUEUE);
            let task = tokio::spawn(drive(swarm, rx, topic.hash(), i, recorders.clone()));
            nodes.push(BareNode {
                peer_id,
                addr,
                commands,
                task,
            });
            registries.push(registry);
        }
        let index = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.peer_id, i))
            .collect();
        Ok(BaselineNet {
            nodes,
            index,
            registries,
        })
    }

    async fn connect(&self, edges: &[Edge]) -> Result<()> {
        let dials = edges.iter().map(|&(a, b)| {
            let target = &self.nodes[b];
            let addr = target
                .addr
                .clone()
                .with(libp2p::multiaddr::Protocol::P2p(target.peer_id));
            async move {
                let result = ask(&self.nodes[a], |reply| {
                    Cmd::Dial(target.peer_id, addr, reply)
                })
                .await;
                (a, b, result)
            }
        });
        let failed: Vec<String> = join_all(dials)
            .await
            .into_iter()
            .filter_map(|(a, b, r)| match r {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("{a}->{b}: {e}")),
                Err(e) => Some(format!("{a}->{b}: {e}")),
            })
            .collect();
        if !failed.is_empty() {
            bail!("{} dials failed, first: {}", failed.len(), failed[0]);
        }
        Ok(())
    }

    async fn views(&self) -> Result<Vec<NodeView>> {
        let raws = join_all(self.nodes.iter().map(|n| ask(n, Cmd::View))).await;
        raws.into_iter()
            .map(|raw| {
                let raw = raw?;
                Ok(NodeView {
                    topic_peers: raw.topic_peers,
                    mesh_peers: raw.mesh_peers,
                    connections: raw.connections,
                    peers: raw
                        .peers
                        .iter()
                        .filter_map(|(p, out)| Some((*self.index.get(p)?, *out)))
                        .collect(),
                })
            })
            .collect()
    }

    fn publish(
        &self,
        node: usize,
        body: String,
    ) -> impl Future<Output = Result<Key, String>> + Send + 'static {
        let node = &self.nodes[node];
        let commands = node.commands.clone();
        let origin = node.peer_id.to_string();
        async move {
            // The same bytes Servant sends: its envelope around the same body.
            let data =
                servant_protocol::Envelope::new("bench", body, servant::clock::unix_ms(), origin)
                    .and_then(|e| e.encode())
                    .map_err(|e| e.to_string())?;
            let key: Key = *blake3::hash(&data).as_bytes();
            let (reply, rx) = oneshot::channel();
            commands
                .send(Cmd::Publish(data, reply))
                .await
                .map_err(|_| "swarm task ended".to_string())?;
            rx.await
                .map_err(|_| "swarm task dropped the reply".to_string())??;
            Ok(key)
        }
    }

    async fn counters(&self) -> Result<Counters> {
        let mut total = Counters::default();
        for registry in &self.registries {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, registry)?;
            total.add_gossipsub(&text);
        }
        for raw in join_all(self.nodes.iter().map(|n| ask(n, Cmd::View))).await {
            total.connections_established += raw?.established as f64;
        }
        Ok(total)
    }

    async fn shutdown(self) {
        let tasks: Vec<JoinHandle<()>> = self
            .nodes
            .into_iter()
            .map(|n| {
                drop(n.commands);
                n.task
            })
            .collect();
        for task in tasks {
            task.abort();
        }
    }
}
