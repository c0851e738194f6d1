//! Peers seen before, kept in the data dir so a restart can rejoin the network even
//! when every bootnode is down (the seeds' known-peer list, with a limit).
//!
//! The file is a cache: if it cannot be parsed it is moved aside with a warning and the
//! node starts from its bootnodes. Nothing verified is lost that way.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

use crate::datadir::write_atomic;

/// The layout of the file; another one is set aside like a corrupt file.
const FILE_VERSION: u32 = 1;
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
        let parsed = serde_json::from_slice::<KnownPeersFile>(&bytes).and_then(|file| {
            if file.version == FILE_VERSION {
                Ok(file)
            } else {
                Err(serde::de::Error::custom(format!(
                    "version {} (this build reads {FILE_VERSION})",
                    file.version
                )))
            }
        });
        match parsed {
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
        let now = crate::clock::unix_secs();
        let entry = self.peers.entry(peer).or_insert_with(|| KnownPeer {
            peer_id: peer,
            addrs: Vec::new(),
            last_seen: now,
        });
        entry.last_seen = now;
        for addr in addrs {
            let addr = crate::addr::without_p2p(addr);
            // Relayed addresses depend on a relay that may be gone by the next start.
            if crate::addr::is_dialable(&addr) && !crate::addr::is_relayed(&addr) {
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

    /// The file's bytes if the list changed since the last snapshot, for a
    /// [`Persister`] to write.
    pub fn snapshot(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        if !self.dirty {
            return Ok(None);
        }
        let file = KnownPeersFile {
            version: FILE_VERSION,
            peers: self.candidates(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
        self.dirty = false;
        Ok(Some(bytes))
    }

    /// Writes the list now if it changed (at shutdown, when nothing else waits).
    pub fn save(&mut self) -> std::io::Result<()> {
        match self.snapshot()? {
            Some(bytes) => write_atomic(&self.path, &bytes, 0o600),
            None => Ok(()),
        }
    }
}

/// Writes snapshots of the known-peer list on a task of its own, so the fsyncs of an
/// atomic write never stall the event loop. One write at a time; a snapshot that
/// arrives while one is written replaces any that waited, so the queue is one deep.
pub struct Persister {
    tx: Option<tokio::sync::watch::Sender<Option<std::sync::Arc<Vec<u8>>>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Persister {
    /// Starts the writer for `path` (needs a tokio runtime).
    pub fn spawn(path: PathBuf) -> Persister {
        let (tx, mut rx) = tokio::sync::watch::channel(None::<std::sync::Arc<Vec<u8>>>);
        let task = tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let Some(bytes) = rx.borrow_and_update().clone() else {
                    continue;
                };
                let path = path.clone();
                let written =
                    tokio::task::spawn_blocking(move || write_atomic(&path, &bytes, 0o600)).await;
                match written {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "cannot save known peers"),
                    Err(e) => tracing::warn!(error = %e, "known-peer writer failed"),
                }
            }
        });
        Persister {
            tx: Some(tx),
            task: Some(task),
        }
    }

    /// A persister that writes nothing (what remains after [`Persister::finish`]).
    pub fn inert() -> Persister {
        Persister {
            tx: None,
            task: None,
        }
    }

    /// Queues `bytes` to be written.
    pub fn save(&self, bytes: Vec<u8>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Some(std::sync::Arc::new(bytes)));
        }
    }

    /// Waits for the write in hand, if any, and stops the writer.
    pub async fn finish(mut self) {
        drop(self.tx.take());
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
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
