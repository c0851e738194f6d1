//! A hostile gossipsub peer that writes raw RPCs: a bare rust-libp2p peer (TCP,
//! noise, yamux, identify and libp2p-stream, no gossipsub behaviour) that opens a
//! `/meshsub/1.1.0` stream to a node and sends whatever control messages the test
//! builds with [`rpc`]. libp2p's own gossipsub never sends GRAFTs for topics it did
//! not join or PRUNEs with absurd backoffs, so attack tests need their own encoder.
//!
//! The wire format is gossipsub's: each RPC is an unsigned-varint length and a
//! protobuf `RPC` message (libp2p-gossipsub's `rpc.proto`). The few fields used here
//! are encoded by hand, which keeps the test independent of the encoder under test.

use anyhow::{Context, Result};
use futures::AsyncWriteExt;
use libp2p::{Multiaddr, PeerId, Stream, StreamProtocol};

use crate::raw_peer::{length_prefixed, RawPeer};

/// Gossipsub v1.1, the oldest version with PRUNE backoffs; every libp2p node speaks it.
pub const MESHSUB_1_1: StreamProtocol = StreamProtocol::new("/meshsub/1.1.0");

/// libp2p-gossipsub's default cap on the control part of one RPC (its
/// `max_control_message_size`): an RPC over it is refused whole, so a flood has to
/// be cut into RPCs under it to reach the code that handles each control message.
pub const MAX_CONTROL_BYTES: usize = 16 * 1024;

/// A connected raw peer with one open gossipsub stream to the node.
pub struct RawGossipPeer {
    /// Its PeerId.
    pub peer_id: PeerId,
    stream: Stream,
    // Holds the connection open for as long as the stream is used.
    peer: RawPeer,
}

impl RawGossipPeer {
    /// Dials `target` (which must end in `/p2p/<PeerId>`) and opens a `/meshsub/1.1.0`
    /// stream to it, accepting (and draining) the node's own gossipsub stream.
    pub async fn connect(target: Multiaddr) -> Result<RawGossipPeer> {
        Self::connect_as(libp2p::identity::Keypair::generate_ed25519(), target).await
    }

    /// Like [`RawGossipPeer::connect`], with the identity `key`.
    pub async fn connect_as(
        key: libp2p::identity::Keypair,
        target: Multiaddr,
    ) -> Result<RawGossipPeer> {
        let mut peer = RawPeer::connect_as(key, target, &[MESHSUB_1_1], &[]).await?;
        let stream = peer.open(MESHSUB_1_1).await?;
        Ok(RawGossipPeer {
            peer_id: peer.peer_id,
            stream,
            peer,
        })
    }

    /// Like [`RawGossipPeer::connect`], but the node's own gossipsub stream is
    /// accepted and never read: a subscriber that stops reading.
    pub async fn connect_unread(target: Multiaddr) -> Result<RawGossipPeer> {
        let mut peer = RawPeer::connect_holding(target, &[], &[MESHSUB_1_1]).await?;
        let stream = peer.open(MESHSUB_1_1).await?;
        Ok(RawGossipPeer {
            peer_id: peer.peer_id,
            stream,
            peer,
        })
    }

    /// How many of the node's streams it holds unread.
    pub fn held(&self) -> usize {
        self.peer.held()
    }

    /// Writes one RPC (the protobuf bytes; the length prefix is added here).
    pub async fn send(&mut self, rpc: &[u8]) -> Result<()> {
        self.stream
            .write_all(&length_prefixed(rpc))
            .await
            .context("write an RPC")?;
        Ok(())
    }

    /// Writes every RPC, then flushes.
    pub async fn send_all(&mut self, rpcs: &[Vec<u8>]) -> Result<()> {
        for rpc in rpcs {
            self.send(rpc).await?;
        }
        self.stream.flush().await.context("flush")?;
        Ok(())
    }
}

/// Hand-written encoders for the parts of gossipsub's `RPC` message the attack tests
/// send. Field numbers are those of libp2p-gossipsub's `rpc.proto`.
pub mod rpc {
    use super::MAX_CONTROL_BYTES;
    use crate::raw_peer::{put_bytes_field, put_varint};

    /// `RPC.subscriptions` (1), `RPC.control` (3).
    const RPC_SUBSCRIPTIONS: u32 = 1;
    const RPC_CONTROL: u32 = 3;
    /// `ControlMessage.graft` (3) and `.prune` (4).
    const CONTROL_GRAFT: u32 = 3;
    const CONTROL_PRUNE: u32 = 4;

    /// An RPC that subscribes to `topic` (`SubOpts { subscribe: true, topic_id }`).
    pub fn subscribe(topic: &str) -> Vec<u8> {
        let mut opts = Vec::new();
        // Field 1 (subscribe), varint true.
        put_varint(&mut opts, 1 << 3);
        put_varint(&mut opts, 1);
        put_bytes_field(&mut opts, 2, topic.as_bytes());
        let mut out = Vec::new();
        put_bytes_field(&mut out, RPC_SUBSCRIPTIONS, &opts);
        out
    }

    /// One GRAFT entry of a `ControlMessage`: `graft { topic_id }`.
    pub fn graft(topic: &str) -> Vec<u8> {
        let mut graft = Vec::new();
        put_bytes_field(&mut graft, 1, topic.as_bytes());
        let mut out = Vec::new();
        put_bytes_field(&mut out, CONTROL_GRAFT, &graft);
        out
    }

    /// One PRUNE entry of a `ControlMessage`: `prune { topic_id, backoff }` (seconds).
    pub fn prune(topic: &str, backoff_secs: u64) -> Vec<u8> {
        let mut prune = Vec::new();
        put_bytes_field(&mut prune, 1, topic.as_bytes());
        // Field 3 (backoff), varint.
        put_varint(&mut prune, 3 << 3);
        put_varint(&mut prune, backoff_secs);
        let mut out = Vec::new();
        put_bytes_field(&mut out, CONTROL_PRUNE, &prune);
        out
    }

    /// Packs control entries ([`graft`], [`prune`]) into as few RPCs as fit under
    /// [`MAX_CONTROL_BYTES`] of control each (with room for the control field's own
    /// tag and length).
    pub fn pack(entries: impl IntoIterator<Item = Vec<u8>>) -> Vec<Vec<u8>> {
        let budget = MAX_CONTROL_BYTES - 8;
        let mut rpcs = Vec::new();
        let mut control = Vec::new();
        let mut flush = |control: &mut Vec<u8>| {
            if !control.is_empty() {
                let mut rpc = Vec::with_capacity(control.len() + 8);
                put_bytes_field(&mut rpc, RPC_CONTROL, control);
                rpcs.push(rpc);
                control.clear();
            }
        };
        for entry in entries {
            if control.len() + entry.len() > budget {
                flush(&mut control);
            }
            control.extend_from_slice(&entry);
        }
        flush(&mut control);
        rpcs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_rpcs_stay_under_the_control_cap() {
        let topic = "t".repeat(128);
        let rpcs = rpc::pack((0..1000).map(|_| rpc::graft(&topic)));
        assert!(rpcs.len() > 1);
        for rpc in &rpcs {
            assert!(rpc.len() <= MAX_CONTROL_BYTES, "{}", rpc.len());
        }
        // A GRAFT: RPC { control(3) { graft(3) { topic_id(1): "a" } } }.
        assert_eq!(
            rpc::pack([rpc::graft("a")]),
            vec![vec![0x1a, 0x05, 0x1a, 0x03, 0x0a, 0x01, b'a']]
        );
    }
}
