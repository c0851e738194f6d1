//! A bare rust-libp2p peer that speaks protocols by hand: TCP, noise, yamux and
//! identify, plus libp2p-stream for raw streams, and no protocol behaviour of its
//! own. Attack tests write whatever bytes they like on its streams, which libp2p's
//! own behaviours would never send (GRAFTs for unjoined topics, say). The wire
//! formats live with each protocol's encoder (`gossip_raw`); this module only
//! connects, opens streams and frames protobuf.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use futures::{AsyncReadExt, StreamExt};
use libp2p::{
    identify, identity::Keypair, multiaddr::Protocol, noise, swarm::NetworkBehaviour,
    swarm::SwarmEvent, tcp, yamux, Multiaddr, PeerId, Stream, StreamProtocol,
};

#[derive(NetworkBehaviour)]
struct Behaviour {
    identify: identify::Behaviour,
    stream: libp2p_stream::Behaviour,
}

/// A raw peer connected to one node.
pub struct RawPeer {
    /// Its PeerId (a fresh identity).
    pub peer_id: PeerId,
    /// The node it is connected to.
    pub node: PeerId,
    control: libp2p_stream::Control,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    held: std::sync::Arc<std::sync::Mutex<Vec<Stream>>>,
}

impl RawPeer {
    /// Dials `target` (which must end in `/p2p/<PeerId>`) with a fresh identity.
    ///
    /// Streams the node opens on `accept` are accepted and read to the end: a peer
    /// that refused, say, the node's own gossipsub stream would look to the node like
    /// one without gossipsub, and the node would never hand its RPCs to the code
    /// under test.
    pub async fn connect(target: Multiaddr, accept: &[StreamProtocol]) -> Result<RawPeer> {
        RawPeer::connect_holding(target, accept, &[]).await
    }

    /// Like [`RawPeer::connect`], but streams the node opens on `hold` are accepted
    /// and never read: a slow reader, whose unread bytes pile up at the node once the
    /// stream's window is full.
    pub async fn connect_holding(
        target: Multiaddr,
        accept: &[StreamProtocol],
        hold: &[StreamProtocol],
    ) -> Result<RawPeer> {
        RawPeer::connect_as(Keypair::generate_ed25519(), target, accept, hold).await
    }

    /// Like [`RawPeer::connect_holding`], with the identity `key`: a peer coming back.
    pub async fn connect_as(
        key: Keypair,
        target: Multiaddr,
        accept: &[StreamProtocol],
        hold: &[StreamProtocol],
    ) -> Result<RawPeer> {
        let node = match target.iter().last() {
            Some(Protocol::P2p(peer)) => peer,
            _ => bail!("{target} does not end in /p2p/<PeerId>"),
        };
        let peer_id = key.public().to_peer_id();
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )?
            .with_behaviour(|key| Behaviour {
                identify: identify::Behaviour::new(identify::Config::new(
                    servant::behaviour::PROTOCOL_VERSION.into(),
                    key.public(),
                )),
                stream: libp2p_stream::Behaviour::new(),
            })
            .map_err(|e| anyhow!("{e}"))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
            .build();
        let mut control = swarm.behaviour().stream.new_control();
        let mut tasks = Vec::new();
        for protocol in accept {
            let mut incoming = control
                .accept(protocol.clone())
                .map_err(|e| anyhow!("accept {protocol}: {e}"))?;
            tasks.push(tokio::spawn(async move {
                while let Some((_, mut stream)) = incoming.next().await {
                    tokio::spawn(async move {
                        let mut sink = vec![0u8; 64 * 1024];
                        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                    });
                }
            }));
        }
        let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        for protocol in hold {
            let mut incoming = control
                .accept(protocol.clone())
                .map_err(|e| anyhow!("accept {protocol}: {e}"))?;
            let held = held.clone();
            tasks.push(tokio::spawn(async move {
                while let Some((_, stream)) = incoming.next().await {
                    if let Ok(mut held) = held.lock() {
                        held.push(stream);
                    }
                }
            }));
        }
        swarm.dial(target.clone())?;
        let connected = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match swarm.select_next_some().await {
                    SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == node => {
                        return Ok(())
                    }
                    SwarmEvent::OutgoingConnectionError { error, .. } => {
                        return Err(anyhow!("dial {target}: {error}"))
                    }
                    _ => {}
                }
            }
        })
        .await;
        connected.map_err(|_| anyhow!("no connection to {node} within 10 s"))??;
        tasks.push(tokio::spawn(async move {
            loop {
                swarm.select_next_some().await;
            }
        }));
        Ok(RawPeer {
            peer_id,
            node,
            control,
            tasks,
            held,
        })
    }

    /// How many of the node's streams are held unread (see [`RawPeer::connect_holding`]).
    pub fn held(&self) -> usize {
        self.held.lock().map_or(0, |h| h.len())
    }

    /// Opens a stream to the node on `protocol`.
    pub async fn open(&mut self, protocol: StreamProtocol) -> Result<Stream> {
        tokio::time::timeout(
            Duration::from_secs(10),
            self.control.open_stream(self.node, protocol.clone()),
        )
        .await
        .map_err(|_| anyhow!("no {protocol} stream within 10 s"))?
        .map_err(|e| anyhow!("open {protocol}: {e}"))
    }
}

impl Drop for RawPeer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Appends `value` as a protobuf / unsigned-varint varint.
pub fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Appends a length-delimited protobuf field (wire type 2).
pub fn put_bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_varint(out, u64::from(field) << 3 | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// `body` with its unsigned-varint length in front: how libp2p's protobuf protocols
/// frame each message on a stream.
pub fn length_prefixed(body: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(body.len() + 10);
    put_varint(&mut frame, body.len() as u64);
    frame.extend_from_slice(body);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_match_protobuf() {
        let mut out = Vec::new();
        put_varint(&mut out, 300);
        assert_eq!(out, [0xac, 0x02]);
        let mut out = Vec::new();
        put_varint(&mut out, u64::MAX);
        assert_eq!(out.len(), 10);
        assert_eq!(length_prefixed(b"abc"), [3, b'a', b'b', b'c']);
    }
}
