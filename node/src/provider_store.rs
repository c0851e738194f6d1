//! Kademlia's record store, with this node's own provider records kept apart and
//! other peers' provider records kept compactly and dropped when they expire.
//!
//! libp2p's `MemoryStore` counts the provider records of remote peers and the node's
//! own against one cap on keys and keeps at most 20 providers per key, first come
//! first kept: a peer flooding ADD_PROVIDER could push out, or keep out, the records
//! that announce what this node shares. Here the node's own records live in a map of
//! their own, bounded by what the node shares, and remote records in a capped map.
//!
//! That map is Servant's rather than `MemoryStore`'s for two more reasons, both
//! found in long soaks. `MemoryStore` reserves room for 20 providers inline with
//! every key, whether it holds one or twenty (about 6,000 bytes a key: most of a
//! soak node's steady rise in live heap, one fresh shared file every 20 s); a `Vec`
//! holds what is there. And `MemoryStore` drops an expired record only when a lookup of its
//! key arrives, so keys nobody asks for again keep their slots after their records
//! expire, and once the cap is reached by such keys every new key is refused: a
//! long-running node would stop storing records for new content. Here expired
//! records are never handed out, those of a key are dropped when a record for it
//! arrives, and all of them are swept when a record arrives a minute or more after
//! the last sweep (or, while the key cap refuses new keys, 5 s after it): a node that
//! receives no records keeps what it has, and the cap bounds that. Value records
//! (PUT_VALUE) still go to a `MemoryStore`.

use std::{
    borrow::Cow,
    collections::HashMap,
    time::{Duration, Instant},
};

use libp2p::{
    kad::{
        store::{self, MemoryStore, MemoryStoreConfig, RecordStore},
        ProviderRecord, Record, RecordKey,
    },
    PeerId,
};

/// Most keys with remote provider records stored; a key beyond it is refused.
/// Each node holds the records of keys close to it, 20 copies of each across the
/// network: 4,096 a node serves a network of N nodes sharing about 200 x N contents.
/// Measured with glibc's figures: with one provider a key, about 590 bytes a key of
/// map and list around the records, against about 6,000 in libp2p's `MemoryStore`
/// (2.3 MiB for 4,096 keys, not 23.5); with every key full (20 providers of one
/// address each, the records' own bytes included) 22.7 MiB against 34.1.
/// `tests/tests/attack_dht.rs` floods a node until every key is taken.
pub const MAX_REMOTE_PROVIDER_KEYS: usize = 4 * 1024;
/// Most remote providers kept per key.
pub const MAX_PROVIDERS_PER_KEY: usize = 20;
/// How often expired remote records are swept out in one pass.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// How often a full store may sweep early to make room for a new key: each sweep
/// visits every record, and a flood at the cap must not make every refusal one.
const FULL_SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The store: own provider records unbounded by remote traffic, the rest capped.
pub struct ProviderStore {
    local: PeerId,
    own: HashMap<RecordKey, ProviderRecord>,
    /// Other peers' provider records by key, at most [`MAX_PROVIDERS_PER_KEY`] each.
    providers: HashMap<RecordKey, Vec<ProviderRecord>>,
    /// When expired remote records were last swept out.
    swept: Instant,
    /// Value records only.
    values: MemoryStore,
}

impl ProviderStore {
    /// A store for the node with this PeerId.
    pub fn new(local: PeerId) -> Self {
        let config = MemoryStoreConfig {
            max_provided_keys: 0,
            ..MemoryStoreConfig::default()
        };
        ProviderStore {
            local,
            own: HashMap::new(),
            providers: HashMap::new(),
            swept: Instant::now(),
            values: MemoryStore::with_config(local, config),
        }
    }

    /// Keys this node provides itself.
    pub fn own_len(&self) -> usize {
        self.own.len()
    }

    /// Keys with remote provider records held (expired ones included until swept).
    pub fn remote_len(&self) -> usize {
        self.providers.len()
    }

    /// Drops every expired remote record, and the keys left with none.
    pub fn sweep(&mut self, now: Instant) {
        self.providers.retain(|_, list| {
            list.retain(|p| !p.is_expired(now));
            !list.is_empty()
        });
        self.swept = now;
    }

    fn add_remote(&mut self, record: ProviderRecord, now: Instant) -> store::Result<()> {
        if now.duration_since(self.swept) >= SWEEP_INTERVAL {
            self.sweep(now);
        }
        if !self.providers.contains_key(&record.key)
            && self.providers.len() >= MAX_REMOTE_PROVIDER_KEYS
        {
            if now.duration_since(self.swept) < FULL_SWEEP_INTERVAL {
                return Err(store::Error::MaxProvidedKeys);
            }
            self.sweep(now);
            if self.providers.len() >= MAX_REMOTE_PROVIDER_KEYS {
                return Err(store::Error::MaxProvidedKeys);
            }
        }
        let list = self.providers.entry(record.key.clone()).or_default();
        list.retain(|p| !p.is_expired(now));
        if let Some(known) = list.iter_mut().find(|p| p.provider == record.provider) {
            *known = record;
        } else if list.len() < MAX_PROVIDERS_PER_KEY {
            // First come, first kept (as libp2p's store does): a flood of fresh
            // identities cannot push out providers that keep refreshing. One slot at
            // a time, so a full list is 20 records, not a doubled capacity of 32.
            list.reserve_exact(1);
            list.push(record);
        }
        Ok(())
    }
}

impl RecordStore for ProviderStore {
    type RecordsIter<'a> = <MemoryStore as RecordStore>::RecordsIter<'a>;
    type ProvidedIter<'a> = std::iter::Map<
        std::collections::hash_map::Values<'a, RecordKey, ProviderRecord>,
        fn(&'a ProviderRecord) -> Cow<'a, ProviderRecord>,
    >;

    fn get(&self, k: &RecordKey) -> Option<Cow<'_, Record>> {
        self.values.get(k)
    }

    fn put(&mut self, r: Record) -> store::Result<()> {
        self.values.put(r)
    }

    fn remove(&mut self, k: &RecordKey) {
        self.values.remove(k)
    }

    fn records(&self) -> Self::RecordsIter<'_> {
        self.values.records()
    }

    fn add_provider(&mut self, record: ProviderRecord) -> store::Result<()> {
        if record.provider == self.local {
            self.own.insert(record.key.clone(), record);
            return Ok(());
        }
        self.add_remote(record, Instant::now())
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        let now = Instant::now();
        let own = self.own.get(key).cloned();
        let remote = self.providers.get(key).into_iter().flatten();
        own.into_iter()
            .chain(remote.filter(|p| !p.is_expired(now)).cloned())
            .collect()
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        self.own.values().map(Cow::Borrowed)
    }

    fn remove_provider(&mut self, k: &RecordKey, p: &PeerId) {
        if *p == self.local {
            self.own.remove(k);
            return;
        }
        if let Some(list) = self.providers.get_mut(k) {
            list.retain(|r| r.provider != *p);
            if list.is_empty() {
                self.providers.remove(k);
            }
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

    fn expiring(key: &RecordKey, expires: Instant) -> ProviderRecord {
        let mut record = ProviderRecord::new(key.clone(), PeerId::random(), vec![]);
        record.expires = Some(expires);
        record
    }

    #[test]
    fn expired_records_are_hidden_and_make_room_for_new_providers() {
        let mut store = ProviderStore::new(PeerId::random());
        let now = Instant::now();
        let key = RecordKey::new(&b"k");
        for _ in 0..MAX_PROVIDERS_PER_KEY {
            store
                .add_remote(expiring(&key, now + Duration::from_secs(1)), now)
                .unwrap();
        }
        let later = now + Duration::from_secs(2);
        let fresh = expiring(&key, later + Duration::from_secs(3600));
        let fresh_provider = fresh.provider;
        store.add_remote(fresh, later).unwrap();
        let list = &store.providers[&key];
        assert_eq!(list.len(), 1, "the expired twenty made way");
        assert_eq!(list[0].provider, fresh_provider);
    }

    #[test]
    fn keys_whose_records_expired_do_not_keep_new_keys_out() {
        let mut store = ProviderStore::new(PeerId::random());
        let now = Instant::now();
        for i in 0..MAX_REMOTE_PROVIDER_KEYS {
            let key = RecordKey::new(&format!("old{i}"));
            store
                .add_remote(expiring(&key, now + Duration::from_secs(10)), now)
                .unwrap();
        }
        let new = RecordKey::new(&b"new");
        let full = store.add_remote(expiring(&new, now + Duration::from_secs(3600)), now);
        assert!(
            matches!(full, Err(store::Error::MaxProvidedKeys)),
            "full while all are live"
        );
        // Once they expire, the next new key finds the store swept.
        let later = now + Duration::from_secs(11);
        store
            .add_remote(expiring(&new, later + Duration::from_secs(3600)), later)
            .unwrap();
        assert_eq!(store.remote_len(), 1);
        assert_eq!(store.providers(&new).len(), 1);
    }

    #[test]
    fn a_remote_record_is_refreshed_in_place_and_swept_on_schedule() {
        let mut store = ProviderStore::new(PeerId::random());
        let now = Instant::now();
        let key = RecordKey::new(&b"k");
        let first = expiring(&key, now + Duration::from_secs(5));
        let mut again = first.clone();
        again.expires = Some(now + Duration::from_secs(600));
        store.add_remote(first, now).unwrap();
        store.add_remote(again, now).unwrap();
        assert_eq!(store.providers[&key].len(), 1, "one provider, refreshed");
        let gone = RecordKey::new(&b"gone");
        store
            .add_remote(expiring(&gone, now + Duration::from_secs(5)), now)
            .unwrap();
        // Any add a minute on sweeps every expired record, not only its own key's.
        let later = now + SWEEP_INTERVAL;
        let other = RecordKey::new(&b"other");
        store
            .add_remote(expiring(&other, later + Duration::from_secs(600)), later)
            .unwrap();
        assert!(!store.providers.contains_key(&gone));
        assert_eq!(store.remote_len(), 2);
    }
}
