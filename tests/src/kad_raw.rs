//! Kademlia messages written by hand, for a raw peer to flood a node's DHT with.
//!
//! libp2p-kad only sends ADD_PROVIDER for keys its own node provides, one query at a
//! time; a store-flood test needs 100,000 of them from a hundred identities, so they
//! are encoded here from libp2p-kad's `dht.proto` (fields below) and framed like every
//! libp2p protobuf protocol: an unsigned-varint length, then the message. The node
//! accepts any number of them on one inbound stream.

use libp2p::{Multiaddr, PeerId};

use crate::raw_peer::{length_prefixed, put_bytes_field, put_varint};

/// `Message.type` (1), `.key` (2), `.providerPeers` (9).
const MESSAGE_TYPE: u32 = 1;
const MESSAGE_KEY: u32 = 2;
const MESSAGE_PROVIDER_PEERS: u32 = 9;
/// `MessageType.ADD_PROVIDER`.
const ADD_PROVIDER: u64 = 2;
/// `Peer.id` (1), `.addrs` (2).
const PEER_ID: u32 = 1;
const PEER_ADDRS: u32 = 2;

/// A framed ADD_PROVIDER announcing `provider` (which must be the sender: the node
/// ignores records for anybody else) at `addrs` for `key`.
pub fn add_provider(key: &[u8], provider: &PeerId, addrs: &[Multiaddr]) -> Vec<u8> {
    let mut peer = Vec::new();
    put_bytes_field(&mut peer, PEER_ID, &provider.to_bytes());
    for addr in addrs {
        put_bytes_field(&mut peer, PEER_ADDRS, &addr.to_vec());
    }
    let mut message = Vec::new();
    put_varint(&mut message, u64::from(MESSAGE_TYPE) << 3);
    put_varint(&mut message, ADD_PROVIDER);
    put_bytes_field(&mut message, MESSAGE_KEY, key);
    put_bytes_field(&mut message, MESSAGE_PROVIDER_PEERS, &peer);
    length_prefixed(&message)
}
