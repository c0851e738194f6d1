//! Kademlia's record store, with this node's own provider records kept apart.
//!
//! libp2p's `MemoryStore` counts the provider records of remote peers and the node's
//! own against one cap on keys and keeps at most 20 providers per key, first come
//! first kept: a peer flooding ADD_PROVIDER could push out, or keep out, the records
//! that announce what this node shares. Here the node's own records live in a map of
//! their own, bounded by what the node shares, and only remote records go to the
//! capped `MemoryStore`.

use std::{borrow::Cow, collections::HashMap};

use libp2p::{
    kad::{
        store::{self, MemoryStore, MemoryStoreConfig, RecordStore},
        ProviderRecord, Record, RecordKey,
    },
    PeerId,
};

/// Most keys with remote provider records stored; a key beyond it is refused.
/// libp2p's `MemoryStore` keeps room for 20 providers inline with every key, whether
/// it holds one or twenty: about 4.5 KiB a key measured under
/// `tests/tests/attack_dht.rs` (+84 MiB at 16,384 keys, +29 MiB at 4,096 with a
/// hundred flooding connections open), so some 18 MiB when full. Each node holds the
/// records of keys close to it, 20 copies of each across the network: 4,096 a node
/// serves a network of N nodes sharing about 200 x N contents.
pub const MAX_REMOTE_PROVIDER_KEYS: usize = 4 * 1024;
/// Most remote providers kept per key.
pub const MAX_PROVIDERS_PER_KEY: usize = 20;

/// The store: own provider records unbounded by remote traffic, the rest capped.
pub struct ProviderStore {
    local: PeerId,
    own: HashMap<RecordKey, ProviderRecord>,
    remote: MemoryStore,
}

impl ProviderStore {
    /// A store for the node with this PeerId.
    pub fn new(local: PeerId) -> Self {
        let config = MemoryStoreConfig {
            max_provided_keys: MAX_REMOTE_PROVIDER_KEYS,
            max_providers_per_key: MAX_PROVIDERS_PER_KEY,
            ..MemoryStoreConfig::default()
        };
        ProviderStore {
            local,
            own: HashMap::new(),
            remote: MemoryStore::with_config(local, config),
        }
    }

    /// Keys this node provides itself.
    pub fn own_len(&self) -> usize {
        self.own.len()
    }
}

impl RecordStore for ProviderStore {
    type RecordsIter<'a> = <MemoryStore as RecordStore>::RecordsIter<'a>;
    type ProvidedIter<'a> = std::iter::Map<
        std::collections::hash_map::Values<'a, RecordKey, ProviderRecord>,
        fn(&'a ProviderRecord) -> Cow<'a, ProviderRecord>,
    >;

    fn get(&self, k: &RecordKey) -> Option<Cow<'_, Record>> {
        self.remote.get(k)
    }

    fn put(&mut self, r: Record) -> store::Result<()> {
        self.remote.put(r)
    }

    fn remove(&mut self, k: &RecordKey) {
        self.remote.remove(k)
    }

    fn records(&self) -> Self::RecordsIter<'_> {
        self.remote.records()
    }

    fn add_provider(&mut self, record: ProviderRecord) -> store::Result<()> {
        if record.provider == self.local {
            self.own.insert(record.key.clone(), record);
            return Ok(());
        }
        self.remote.add_provider(record)
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        let mut providers = self.remote.providers(key);
        if let Some(own) = self.own.get(key) {
            providers.insert(0, own.clone());
        }
        providers
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        self.own.values().map(Cow::Borrowed)
    }

    fn remove_provider(&mut self, k: &RecordKey, p: &PeerId) {
        if *p == self.local {
            self.own.remove(k);
        } else {
            self.remote.remove_provider(k, p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_records_survive_a_remote_flood() {
        let local = PeerId::random();
        let mut store = ProviderStore::new(local);
        let mine = RecordKey::new(&b"mine");
        // Fill every remote slot, on our key and on the key cap.
        for _ in 0..MAX_PROVIDERS_PER_KEY + 5 {
            store
                .add_provider(ProviderRecord::new(mine.clone(), PeerId::random(), vec![]))
                .unwrap();
        }
        for i in 0..MAX_REMOTE_PROVIDER_KEYS + 10 {
            let key = RecordKey::new(&format!("k{i}"));
            let _ = store.add_provider(ProviderRecord::new(key, PeerId::random(), vec![]));
        }
        store
            .add_provider(ProviderRecord::new(mine.clone(), local, vec![]))
            .unwrap();
        let other = RecordKey::new(&b"also-mine");
        store
            .add_provider(ProviderRecord::new(other.clone(), local, vec![]))
            .unwrap();
        let providers = store.providers(&mine);
        assert_eq!(providers[0].provider, local);
        assert_eq!(providers.len(), MAX_PROVIDERS_PER_KEY + 1);
        assert_eq!(store.providers(&other)[0].provider, local);
        assert_eq!(store.provided().count(), 2);
        store.remove_provider(&mine, &local);
        assert_eq!(store.provided().count(), 1);
        assert!(store.providers(&mine).iter().all(|p| p.provider != local));
    }
}
