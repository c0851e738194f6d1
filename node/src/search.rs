//! Search with a time-to-live: who asked what, where hits go back, and how much each
//! peer may ask.
//!
//! The seeds' query floods outwards with a TTL and its hits retrace the query's path.
//! This module is the bookkeeping for that, with no I/O: [`Searches`] decides, and the
//! event loop sends what it decides (see `files`). Every table here is bounded: seen
//! queries expire after [`QUERY_LIFETIME`] and are capped at [`MAX_SEEN_QUERIES`];
//! per-peer rate state is dropped when the peer disconnects.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    time::{Duration, Instant},
};

use libp2p::PeerId;
use servant_protocol::search::{Hit, MAX_TTL};
use tokio::sync::mpsc;

/// How long a query's route back is remembered; hits arriving later are dropped.
pub const QUERY_LIFETIME: Duration = Duration::from_secs(60);
/// Most queries remembered at once; beyond it the oldest are forgotten.
pub const MAX_SEEN_QUERIES: usize = 10_000;
/// Hits one local search accepts; a search matching more is cut there.
pub const MAX_HITS_PER_SEARCH: usize = 1_000;
/// Buffer of hits between the event loop and a local searcher.
const HIT_BUFFER: usize = 256;

/// Where a query came from, so its hits can go back.
#[derive(Debug)]
enum Route {
    /// This node asked; hits go to the API caller.
    Local {
        hits: mpsc::Sender<Hit>,
        seen: HashSet<(String, String)>,
    },
    /// A peer sent it; hits go back to that peer.
    Peer(PeerId),
}

struct Seen {
    route: Route,
    expires: Instant,
}

/// A token bucket per peer: `per_minute` tokens, refilled continuously.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// What to do with an incoming query.
#[derive(Debug, PartialEq, Eq)]
pub enum QueryVerdict {
    /// New: answer it, and forward it with this TTL if it is above zero.
    Accept {
        /// TTL for the forwarded copies (0: do not forward).
        forward_ttl: u8,
    },
    /// Seen before: drop.
    Duplicate,
    /// The peer is over its rate: drop.
    RateLimited,
}

/// Where incoming hits should go.
#[derive(Debug)]
pub enum HitsVerdict {
    /// To the local searcher (already delivered by [`Searches::on_hits`]); the count
    /// of new hits.
    Delivered(usize),
    /// Back to this peer, along the query's path.
    Forward(PeerId),
    /// The query is unknown or expired.
    Unknown,
    /// The peer is over its rate: drop.
    RateLimited,
}

/// The search bookkeeping of one node.
pub struct Searches {
    seen: HashMap<String, Seen>,
    order: VecDeque<(Instant, String)>,
    buckets: HashMap<PeerId, Bucket>,
    /// Hits have their own, larger budget: a neighbour relaying the answers of many
    /// peers sends far more hit messages than queries.
    hit_buckets: HashMap<PeerId, Bucket>,
    per_minute: f64,
}

/// How many hit messages a peer may send per query message it may send.
const HITS_PER_QUERY: f64 = 10.0;

impl Searches {
    /// Bookkeeping that accepts `per_minute` messages from each peer.
    pub fn new(per_minute: u32) -> Self {
        Searches {
            seen: HashMap::new(),
            order: VecDeque::new(),
            buckets: HashMap::new(),
            hit_buckets: HashMap::new(),
            per_minute: f64::from(per_minute.max(1)),
        }
    }

    /// Starts a local search with this id; returns where its hits arrive.
    pub fn start_local(&mut self, id: String, now: Instant) -> mpsc::Receiver<Hit> {
        let (tx, rx) = mpsc::channel(HIT_BUFFER);
        self.remember(
            id,
            Route::Local {
                hits: tx,
                seen: HashSet::new(),
            },
            now,
        );
        rx
    }

    /// An incoming query from `from`.
    pub fn on_query(&mut self, from: PeerId, id: &str, ttl: u8, now: Instant) -> QueryVerdict {
        if !take_token(&mut self.buckets, self.per_minute, from, now) {
            return QueryVerdict::RateLimited;
        }
        if self.seen.contains_key(id) {
            return QueryVerdict::Duplicate;
        }
        self.remember(id.to_string(), Route::Peer(from), now);
        QueryVerdict::Accept {
            forward_ttl: ttl.min(MAX_TTL).saturating_sub(1),
        }
    }

    /// Incoming hits from `from` for query `id`. Hits for a local search are handed
    /// to its receiver here (each content and provider once).
    pub fn on_hits(&mut self, from: PeerId, id: &str, hits: Vec<Hit>, now: Instant) -> HitsVerdict {
        let budget = self.per_minute * HITS_PER_QUERY;
        if !take_token(&mut self.hit_buckets, budget, from, now) {
            return HitsVerdict::RateLimited;
        }
        let Some(entry) = self.seen.get_mut(id) else {
            return HitsVerdict::Unknown;
        };
        match &mut entry.route {
            Route::Peer(back) => HitsVerdict::Forward(*back),
            Route::Local { hits: tx, seen } => {
                let mut delivered = 0;
                for hit in hits {
                    if seen.len() >= MAX_HITS_PER_SEARCH {
                        break;
                    }
                    if !seen.insert((hit.id.to_hex(), hit.provider.clone())) {
                        continue;
                    }
                    // A searcher that stopped reading loses hits, not memory.
                    if tx.try_send(hit).is_ok() {
                        delivered += 1;
                    }
                }
                HitsVerdict::Delivered(delivered)
            }
        }
    }

    /// Forgets expired queries, finished local searches and disconnected peers'
    /// buckets.
    pub fn prune(&mut self, now: Instant, connected: impl Fn(&PeerId) -> bool) {
        while let Some((expires, _)) = self.order.front() {
            if *expires > now {
                break;
            }
            if let Some((_, id)) = self.order.pop_front() {
                if self.seen.get(&id).is_some_and(|s| s.expires <= now) {
                    self.seen.remove(&id);
                }
            }
        }
        self.seen.retain(|_, s| match &s.route {
            Route::Local { hits, .. } => !hits.is_closed(),
            Route::Peer(_) => true,
        });
        self.buckets.retain(|peer, _| connected(peer));
        self.hit_buckets.retain(|peer, _| connected(peer));
    }

    /// Queries remembered now.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no query is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    fn remember(&mut self, id: String, route: Route, now: Instant) {
        while self.seen.len() >= MAX_SEEN_QUERIES {
            match self.order.pop_front() {
                Some((_, old)) => {
                    self.seen.remove(&old);
                }
                None => break,
            }
        }
        let expires = now + QUERY_LIFETIME;
        self.order.push_back((expires, id.clone()));
        self.seen.insert(id, Seen { route, expires });
    }
}

/// Takes one token from `peer`'s bucket of `per_minute` tokens, refilled continuously.
fn take_token(
    buckets: &mut HashMap<PeerId, Bucket>,
    per_minute: f64,
    peer: PeerId,
    now: Instant,
) -> bool {
    let bucket = buckets.entry(peer).or_insert(Bucket {
        tokens: per_minute,
        updated: now,
    });
    let refill = now.duration_since(bucket.updated).as_secs_f64() * per_minute / 60.0;
    bucket.tokens = (bucket.tokens + refill).min(per_minute);
    bucket.updated = now;
    if bucket.tokens >= 1.0 {
        bucket.tokens -= 1.0;
        true
    } else {
        false
    }
}

/// A fresh random query id (16 bytes, hex).
pub fn new_query_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use servant_protocol::manifest::{Hash, Kind};

    fn hit(name: &str, provider: &str) -> Hit {
        Hit {
            id: Hash::of(name.as_bytes()),
            name: name.into(),
            size: 1,
            kind: Kind::File,
            provider: provider.into(),
            addrs: vec![],
        }
    }

    #[test]
    fn queries_are_accepted_once_and_ttl_counts_down() {
        let mut s = Searches::new(60);
        let now = Instant::now();
        let p = PeerId::random();
        assert_eq!(
            s.on_query(p, "q1", 3, now),
            QueryVerdict::Accept { forward_ttl: 2 }
        );
        assert_eq!(s.on_query(p, "q1", 3, now), QueryVerdict::Duplicate);
        assert_eq!(
            s.on_query(p, "q2", 1, now),
            QueryVerdict::Accept { forward_ttl: 0 }
        );
        assert_eq!(
            s.on_query(p, "q3", 200, now),
            QueryVerdict::Accept {
                forward_ttl: MAX_TTL - 1
            }
        );
    }

    #[test]
    fn hits_go_back_the_way_the_query_came() {
        let mut s = Searches::new(60);
        let now = Instant::now();
        let (asker, replier) = (PeerId::random(), PeerId::random());
        s.on_query(asker, "q", 3, now);
        assert!(matches!(
            s.on_hits(replier, "q", vec![hit("a", "x")], now),
            HitsVerdict::Forward(p) if p == asker
        ));
        assert!(matches!(
            s.on_hits(replier, "unknown", vec![], now),
            HitsVerdict::Unknown
        ));
    }

    #[test]
    fn local_hits_are_delivered_once() {
        let mut s = Searches::new(60);
        let now = Instant::now();
        let mut rx = s.start_local("me".into(), now);
        let p = PeerId::random();
        let hits = vec![hit("a", "x"), hit("a", "x"), hit("b", "x"), hit("a", "y")];
        assert!(matches!(
            s.on_hits(p, "me", hits, now),
            HitsVerdict::Delivered(3)
        ));
        let mut got = Vec::new();
        while let Ok(h) = rx.try_recv() {
            got.push(h.name);
        }
        assert_eq!(got, ["a", "b", "a"]);
        drop(rx);
        s.prune(now, |_| true);
        assert!(s.is_empty());
    }

    #[test]
    fn a_flooding_peer_is_rate_limited_and_refills() {
        let mut s = Searches::new(10);
        let now = Instant::now();
        let p = PeerId::random();
        let accepted = (0..100)
            .filter(|i| {
                matches!(
                    s.on_query(p, &format!("q{i}"), 2, now),
                    QueryVerdict::Accept { .. }
                )
            })
            .count();
        assert_eq!(accepted, 10);
        // Another peer is not affected.
        assert!(matches!(
            s.on_query(PeerId::random(), "other", 2, now),
            QueryVerdict::Accept { .. }
        ));
        // Six seconds later one more token has grown.
        let later = now + Duration::from_secs(6);
        assert!(matches!(
            s.on_query(p, "late", 2, later),
            QueryVerdict::Accept { .. }
        ));
        assert_eq!(s.on_query(p, "late2", 2, later), QueryVerdict::RateLimited);
    }

    #[test]
    fn queries_expire_and_are_capped() {
        let mut s = Searches::new(u32::MAX);
        let now = Instant::now();
        let p = PeerId::random();
        for i in 0..MAX_SEEN_QUERIES + 10 {
            s.on_query(p, &format!("q{i}"), 2, now);
        }
        assert_eq!(s.len(), MAX_SEEN_QUERIES);
        s.prune(now + QUERY_LIFETIME, |_| true);
        assert!(s.is_empty());
    }
}
