//! Peers seen before, kept in the data dir so a restart can rejoin the network even
//! when every bootnode is down (the seeds' known-peer list, with a limit).
//!
//! The file is a cache: if it cannot be parsed it is moved aside with a warning and the
//! node starts from its bootnodes. Nothing verified is lost that way.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use libp2p::{multiaddr::Protocol, Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

use crate::datadir::write_atomic;

/// Addresses kept per peer; a peer announcing more is cut to the most recent.
const MAX_ADDRS_PER_PEER: usize = 8;

/// One remembered peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownPeer {
    /// Its identity.
    pub peer_id: PeerId,
    /// Addresses it was reached at or announced, most recent first.
    pub addrs: Vec<Multiaddr>,
    /// When it was last connected, in seconds since the Unix epoch.
    pub last_seen: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct KnownPeersFile {
    version: u32,
    peers: Vec<KnownPeer>,
}

/// The known-peer list, bounded to `max` entries (the least recently seen go first).
#[derive(Debug)]
pub struct KnownPeers {
    path: PathBuf,
    max: usize,
    peers: HashMap<PeerId, KnownPeer>,
    dirty: bool,
}

impl KnownPeers {
    /// Loads the list at `path`; a missing file is an empty list, an unreadable one is
    /// moved aside (see the module docs).
    pub fn load(path: &Path, max: usize, local: PeerId) -> KnownPeers {
        let mut list = KnownPeers {
            path: path.to_path_buf(),
            max,
            peers: HashMap::new(),
            dirty: false,
        };
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return list,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read known peers; starting from the bootnodes");
                return list;
            }
        };
        match serde_json::from_slice::<KnownPeersFile>(&bytes) {
            Ok(file) => {
                for peer in file.peers.into_iter().filter(|p| p.peer_id != local) {
                    list.peers.insert(peer.peer_id, peer);
                }
                list.enforce_cap(None);
            }
            Err(e) => {
                let aside = path.with_extension("json.corrupt");
                let moved = std::fs::rename(path, &aside).is_ok();
                tracing::warn!(
                    path = %path.display(),
                    moved_to = %aside.display(),
                    moved,
                    error = %e,
                    "known peers file is corrupt; set aside, starting from the bootnodes"
                );
            }
        }
        list
    }

    /// Records that `peer` was reached at or announced `addrs` just now.
    pub fn record(&mut self, peer: PeerId, addrs: impl IntoIterator<Item = Multiaddr>) {
        let now = unix_now();
        let entry = self.peers.entry(peer).or_insert_with(|| KnownPeer {
            peer_id: peer,
            addrs: Vec::new(),
            last_seen: now,
        });
        entry.last_seen = now;
        for addr in addrs {
            let addr = without_p2p(addr);
            if is_worth_remembering(&addr) {
                entry.addrs.retain(|a| a != &addr);
                entry.addrs.insert(0, addr);
            }
        }
        entry.addrs.truncate(MAX_ADDRS_PER_PEER);
        self.dirty = true;
        self.enforce_cap(Some(peer));
    }

    /// Forgets a peer (banned, or its identity changed).
    pub fn remove(&mut self, peer: &PeerId) {
        if self.peers.remove(peer).is_some() {
            self.dirty = true;
        }
    }

    /// The remembered peers with at least one address, most recently seen first.
    pub fn candidates(&self) -> Vec<KnownPeer> {
        let mut peers: Vec<KnownPeer> = self
            .peers
            .values()
            .filter(|p| !p.addrs.is_empty())
            .cloned()
            .collect();
        peers.sort_by_key(|p| std::cmp::Reverse(p.last_seen));
        peers
    }

    /// Addresses known for one peer.
    pub fn addrs(&self, peer: &PeerId) -> Vec<Multiaddr> {
        self.peers
            .get(peer)
            .map(|p| p.addrs.clone())
            .unwrap_or_default()
    }

    /// How many peers are remembered.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Whether it changed since the last save.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Writes the list if it changed since the last save.
    pub fn save(&mut self) -> std::io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let file = KnownPeersFile {
            version: 1,
            peers: self.candidates(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
        write_atomic(&self.path, &bytes, 0o600)?;
        self.dirty = false;
        Ok(())
    }

    /// Drops the least recently seen peers beyond the cap, never `keep` (the peer
    /// being recorded, which is the most recent even when seconds tie).
    fn enforce_cap(&mut self, keep: Option<PeerId>) {
        while self.peers.len() > self.max {
            let oldest = self
                .peers
                .values()
                .filter(|p| Some(p.peer_id) != keep)
                .min_by_key(|p| p.last_seen)
                .map(|p| p.peer_id);
            match oldest {
                Some(peer) => {
                    self.peers.remove(&peer);
                }
                None => break,
            }
        }
    }
}

fn without_p2p(mut addr: Multiaddr) -> Multiaddr {
    if matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
        addr.pop();
    }
    addr
}

/// Unspecified addresses (`0.0.0.0`) cannot be dialed; relayed ones depend on a relay
/// that may be gone by the next start.
fn is_worth_remembering(addr: &Multiaddr) -> bool {
    let mut parts = addr.iter();
    let first_ok = match parts.next() {
        Some(Protocol::Ip4(ip)) => !ip.is_unspecified(),
        Some(Protocol::Ip6(ip)) => !ip.is_unspecified(),
        Some(Protocol::Dns(_) | Protocol::Dns4(_) | Protocol::Dns6(_) | Protocol::Dnsaddr(_)) => {
            true
        }
        _ => false,
    };
    first_ok && !addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_across_save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known-peers.json");
        let local = PeerId::random();
        let peer = PeerId::random();
        let mut list = KnownPeers::load(&path, 10, local);
        list.record(
            peer,
            [
                "/ip4/127.0.0.1/tcp/4001".parse().unwrap(),
                "/ip4/0.0.0.0/tcp/4001".parse().unwrap(),
                format!("/ip4/127.0.0.1/udp/4001/quic-v1/p2p/{peer}")
                    .parse()
                    .unwrap(),
            ],
        );
        list.record(local, ["/ip4/127.0.0.1/tcp/1".parse().unwrap()]);
        list.save().unwrap();
        let back = KnownPeers::load(&path, 10, local);
        assert_eq!(back.len(), 1, "own PeerId is not a candidate");
        assert_eq!(
            back.addrs(&peer)
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>(),
            vec!["/ip4/127.0.0.1/udp/4001/quic-v1", "/ip4/127.0.0.1/tcp/4001"]
        );
    }

    #[test]
    fn is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut list = KnownPeers::load(&dir.path().join("k"), 3, PeerId::random());
        for _ in 0..10 {
            list.record(PeerId::random(), ["/ip4/127.0.0.1/tcp/1".parse().unwrap()]);
        }
        assert_eq!(list.len(), 3);
        let peer = PeerId::random();
        let addrs: Vec<Multiaddr> = (1..100)
            .map(|p| format!("/ip4/127.0.0.1/tcp/{p}").parse().unwrap())
            .collect();
        list.record(peer, addrs);
        assert_eq!(list.addrs(&peer).len(), MAX_ADDRS_PER_PEER);
    }

    #[test]
    fn corrupt_file_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known-peers.json");
        std::fs::write(&path, "not json").unwrap();
        let list = KnownPeers::load(&path, 10, PeerId::random());
        assert!(list.is_empty());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("known-peers.json.corrupt")).unwrap(),
            "not json"
        );
    }
}
