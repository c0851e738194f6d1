//! Keeps the node joined: the connection count between a low and a high watermark,
//! bootnodes retried with backoff, failed peers backed off, and the least useful
//! connections trimmed first.
//!
//! This is a plain state machine with no I/O: the event loop tells it what happened
//! and executes the [`Plan`] it returns on every tick. That keeps the policy testable
//! with fabricated peers and a fabricated clock.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use libp2p::{Multiaddr, PeerId};

/// First retry delay after a failed dial; doubles per failure.
pub const BACKOFF_BASE: Duration = Duration::from_secs(2);
/// Longest delay between retries of one peer; bounds how long a healed partition or
/// a returning peer waits to be redialed.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// After a connection closes, the peer is not redialed for this long, so a peer that
/// trimmed us is not hammered with reconnects.
pub const RECONNECT_COOLDOWN: Duration = Duration::from_secs(5);
/// A connection that lasted less than this counts as a failure for the backoff: a
/// peer that keeps closing us (a busy bootnode trimming above its high watermark)
/// is redialed less and less often instead of every few seconds.
pub const STABLE_CONNECTION: Duration = Duration::from_secs(60);
/// Most dials in flight at once for filling the low watermark.
pub const MAX_CONCURRENT_DIALS: usize = 8;
/// A connection younger than this is not trimmed: a DHT query or a handshake in
/// progress deserves to finish, and a node must not close what it just opened.
pub const TRIM_GRACE: Duration = Duration::from_secs(10);
/// Most peers whose backoff is remembered; beyond it the entries that expire first go
/// (the map would otherwise grow with every PeerId that ever connected).
pub const MAX_BACKOFF_ENTRIES: usize = 4096;
/// A failure count is forgotten once the peer has not been tried for this long after
/// its wait ended: the peer is no longer a candidate (a departed identity, usually),
/// and a count kept for it would only wait for the cap.
pub const BACKOFF_FORGET: Duration = Duration::from_secs(600);
/// Most peers `servant connect` protects, connected or not; past it, every protected
/// peer not connected at that moment is forgotten at once (it is protected again by
/// its next `servant connect`).
pub const MAX_EXPLICIT: usize = 1024;
/// A random walk on the DHT runs at most this often while below the low watermark.
pub const DISCOVERY_INTERVAL: Duration = Duration::from_secs(30);

/// Where a dial candidate came from; also the metric label of the dial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// A configured bootnode.
    Bootnode,
    /// The Kademlia routing table.
    Discovered,
    /// The known-peer list from the data dir.
    Known,
    /// `servant connect`.
    Api,
}

impl Source {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Source::Bootnode => "bootnode",
            Source::Discovered => "discovered",
            Source::Known => "known",
            Source::Api => "api",
        }
    }
}

/// A peer that could be dialed.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Its identity.
    pub peer: PeerId,
    /// Where to reach it.
    pub addrs: Vec<Multiaddr>,
    /// Where we heard of it.
    pub source: Source,
}

/// What the event loop should do now.
#[derive(Debug, Default)]
pub struct Plan {
    /// Peers to dial.
    pub dial: Vec<Candidate>,
    /// Peers to disconnect, least useful first.
    pub trim: Vec<PeerId>,
    /// Whether to start a DHT random walk to find more peers.
    pub discover: bool,
}

#[derive(Debug)]
struct Backoff {
    until: Instant,
    failures: u32,
}

/// The watermark policy and its bookkeeping.
#[derive(Debug)]
pub struct PeerManager {
    low: usize,
    high: usize,
    /// Bootnodes by PeerId; one may be given with several addresses (TCP and QUIC).
    bootnodes: HashMap<PeerId, Vec<Multiaddr>>,
    bootnodes_reached: HashSet<PeerId>,
    /// Peers connected on purpose (`servant connect`): never trimmed.
    explicit: HashSet<PeerId>,
    /// Relays this node holds reservations on: its address lives on them.
    relays: HashSet<PeerId>,
    connected: HashMap<PeerId, Instant>,
    dialing: HashMap<PeerId, Instant>,
    backoff: HashMap<PeerId, Backoff>,
    last_discovery: Option<Instant>,
}

impl PeerManager {
    /// A manager keeping between `low` and `high` peers, protecting `bootnodes`.
    pub fn new(low: usize, high: usize, bootnodes: Vec<(PeerId, Multiaddr)>) -> Self {
        let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
        for (peer, addr) in bootnodes {
            let addrs = by_peer.entry(peer).or_default();
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
        PeerManager {
            low,
            high,
            bootnodes: by_peer,
            bootnodes_reached: HashSet::new(),
            explicit: HashSet::new(),
            relays: HashSet::new(),
            connected: HashMap::new(),
            dialing: HashMap::new(),
            backoff: HashMap::new(),
            last_discovery: None,
        }
    }

    /// Whether `peer` is never trimmed.
    pub fn is_protected(&self, peer: &PeerId) -> bool {
        self.bootnodes.contains_key(peer)
            || self.explicit.contains(peer)
            || self.relays.contains(peer)
    }

    /// The relays this node holds reservations on now; they are protected.
    pub fn set_relays(&mut self, relays: HashSet<PeerId>) {
        self.relays = relays;
    }

    /// Whether `peer` is a configured bootnode.
    pub fn is_bootnode(&self, peer: &PeerId) -> bool {
        self.bootnodes.contains_key(peer)
    }

    /// The configured bootnodes with whether each is connected now.
    pub fn bootnodes(&self) -> Vec<(Multiaddr, bool)> {
        let mut list: Vec<(Multiaddr, bool)> = self
            .bootnodes
            .iter()
            .flat_map(|(peer, addrs)| {
                let connected = self.connected.contains_key(peer);
                addrs.iter().map(move |addr| (addr.clone(), connected))
            })
            .collect();
        list.sort_by_key(|(a, _)| a.to_string());
        list
    }

    /// Marks `peer` as connected on purpose.
    pub fn protect(&mut self, peer: PeerId) {
        self.explicit.insert(peer);
        if self.explicit.len() > MAX_EXPLICIT {
            // An operator's `connect` protects for as long as the peer stays; the
            // peers that left are the ones to forget when the set is full.
            let connected = &self.connected;
            self.explicit
                .retain(|p| *p == peer || connected.contains_key(p));
        }
    }

    /// Forgets a peer entirely (it was banned).
    pub fn forget(&mut self, peer: &PeerId) {
        self.explicit.remove(peer);
        self.dialing.remove(peer);
        self.backoff.remove(peer);
    }

    /// Connected peer count.
    pub fn connected_count(&self) -> usize {
        self.connected.len()
    }

    /// A dial to `peer` was started.
    pub fn on_dialing(&mut self, peer: PeerId, now: Instant) {
        self.dialing.insert(peer, now);
    }

    /// The first connection to `peer` was established.
    pub fn on_connected(&mut self, peer: PeerId, now: Instant) {
        self.connected.entry(peer).or_insert(now);
        self.dialing.remove(&peer);
        // The failure count stays until the connection proves stable (see
        // `on_disconnected`); only the wait is over.
        if let Some(backoff) = self.backoff.get_mut(&peer) {
            backoff.until = now;
        }
        if self.bootnodes.contains_key(&peer) {
            self.bootnodes_reached.insert(peer);
        }
    }

    /// The last connection to `peer` closed. `chosen`: it was one this node dialed on
    /// purpose, so a short life means the peer keeps closing us.
    pub fn on_disconnected(&mut self, peer: PeerId, now: Instant, chosen: bool) {
        let lived = self
            .connected
            .remove(&peer)
            .map_or(Duration::ZERO, |since| now.duration_since(since));
        let previous = self.backoff.get(&peer).map_or(0, |b| b.failures);
        let (failures, delay) = if lived >= STABLE_CONNECTION || !chosen {
            (0, RECONNECT_COOLDOWN)
        } else {
            let failures = previous + 1;
            (failures, backoff_delay(failures).max(RECONNECT_COOLDOWN))
        };
        self.backoff.insert(
            peer,
            Backoff {
                until: now + delay,
                failures,
            },
        );
    }

    /// A dial to `peer` failed; returns the delay before it is tried again.
    pub fn on_dial_failure(&mut self, peer: PeerId, now: Instant) -> Duration {
        self.dialing.remove(&peer);
        let failures = self.backoff.get(&peer).map_or(0, |b| b.failures) + 1;
        let delay = backoff_delay(failures);
        self.backoff.insert(
            peer,
            Backoff {
                until: now + delay,
                failures,
            },
        );
        delay
    }

    fn dialable(&self, peer: &PeerId, now: Instant) -> bool {
        !self.connected.contains_key(peer)
            && !self.dialing.contains_key(peer)
            && self.backoff.get(peer).is_none_or(|b| b.until <= now)
    }

    /// Decides what to do now. `candidates` are peers from the routing table and the
    /// known-peer list (the event loop drops denied ones); `usefulness` ranks
    /// connected peers for trimming, higher is kept longer.
    pub fn plan(
        &mut self,
        now: Instant,
        candidates: Vec<Candidate>,
        usefulness: impl Fn(&PeerId) -> f64,
    ) -> Plan {
        let mut plan = Plan::default();
        // Dials that never resolved (lost events) must not block the slots forever.
        self.dialing
            .retain(|_, started| now.duration_since(*started) < Duration::from_secs(60));
        self.prune_backoff(now);

        let below_low = self.connected.len() < self.low;
        // Bootnodes: until each was reached once, and afterwards whenever the node is
        // short of peers. Retried with backoff; never counted against the dial budget.
        let bootnodes: Vec<Candidate> = self
            .bootnodes
            .iter()
            .filter(|(peer, _)| below_low || !self.bootnodes_reached.contains(peer))
            .filter(|(peer, _)| self.dialable(peer, now))
            .map(|(peer, addrs)| Candidate {
                peer: *peer,
                addrs: addrs.clone(),
                source: Source::Bootnode,
            })
            .collect();
        for candidate in bootnodes {
            self.dialing.insert(candidate.peer, now);
            plan.dial.push(candidate);
        }

        if below_low {
            let budget = self
                .low
                .saturating_sub(self.connected.len() + self.dialing.len())
                .min(MAX_CONCURRENT_DIALS.saturating_sub(self.dialing.len()));
            let mut picked = 0;
            let wanted = budget;
            for candidate in candidates {
                if picked >= budget {
                    break;
                }
                if candidate.addrs.is_empty() || !self.dialable(&candidate.peer, now) {
                    continue;
                }
                self.dialing.insert(candidate.peer, now);
                plan.dial.push(candidate);
                picked += 1;
            }
            // A random walk only when the routing table and known peers could not
            // fill the dial budget: it costs a burst of connections across the DHT.
            let due = self
                .last_discovery
                .is_none_or(|t| now.duration_since(t) >= DISCOVERY_INTERVAL);
            let short = picked < wanted || self.connected.len() + self.dialing.len() == 0;
            if due && short {
                self.last_discovery = Some(now);
                plan.discover = true;
            }
        }

        if self.connected.len() > self.high {
            // Trim to the middle of the band so the next few arrivals do not trigger
            // another trim at once.
            let target = self.low + (self.high - self.low) / 2;
            let excess = self.connected.len() - target;
            let mut ranked: Vec<(PeerId, f64)> = self
                .connected
                .iter()
                .filter(|(p, since)| {
                    !self.is_protected(p) && now.duration_since(**since) >= TRIM_GRACE
                })
                .map(|(p, _)| (*p, usefulness(p)))
                .collect();
            ranked.sort_by(|a, b| a.1.total_cmp(&b.1));
            plan.trim = ranked.into_iter().take(excess).map(|(p, _)| p).collect();
        }
        plan
    }
}

impl PeerManager {
    /// Forgets backoffs that are over and count no failure, failure counts of peers
    /// not tried for [`BACKOFF_FORGET`] after their wait, and caps the rest.
    fn prune_backoff(&mut self, now: Instant) {
        self.backoff.retain(|_, b| {
            b.until > now || (b.failures > 0 && now.duration_since(b.until) < BACKOFF_FORGET)
        });
        if self.backoff.len() > MAX_BACKOFF_ENTRIES {
            let mut by_end: Vec<(Instant, PeerId)> =
                self.backoff.iter().map(|(p, b)| (b.until, *p)).collect();
            by_end.sort();
            let excess = self.backoff.len() - MAX_BACKOFF_ENTRIES;
            for (_, peer) in by_end.into_iter().take(excess) {
                self.backoff.remove(&peer);
            }
        }
    }
}

/// The retry delay after `failures` consecutive failures.
pub fn backoff_delay(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(1 << exp).min(BACKOFF_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> Multiaddr {
        "/ip4/127.0.0.1/tcp/1".parse().unwrap()
    }

    fn candidate(peer: PeerId) -> Candidate {
        Candidate {
            peer,
            addrs: vec![addr()],
            source: Source::Discovered,
        }
    }

    #[test]
    fn fills_up_to_the_low_watermark() {
        let now = Instant::now();
        let mut pm = PeerManager::new(3, 6, vec![]);
        let peers: Vec<PeerId> = (0..10).map(|_| PeerId::random()).collect();
        let plan = pm.plan(now, peers.iter().map(|p| candidate(*p)).collect(), |_| 0.0);
        assert_eq!(plan.dial.len(), 3);
        assert!(!plan.discover, "enough candidates: no random walk");
        // In-flight dials are not repeated.
        let plan = pm.plan(now, peers.iter().map(|p| candidate(*p)).collect(), |_| 0.0);
        assert!(plan.dial.is_empty());
    }

    #[test]
    fn random_walk_only_when_short_of_candidates() {
        let now = Instant::now();
        let mut pm = PeerManager::new(3, 6, vec![]);
        let plan = pm.plan(now, vec![candidate(PeerId::random())], |_| 0.0);
        assert_eq!(plan.dial.len(), 1);
        assert!(plan.discover);
        let plan = pm.plan(now, vec![], |_| 0.0);
        assert!(!plan.discover, "rate-limited");
        let plan = pm.plan(now + DISCOVERY_INTERVAL, vec![], |_| 0.0);
        assert!(plan.discover);
    }

    #[test]
    fn backs_off_failed_peers() {
        let now = Instant::now();
        let mut pm = PeerManager::new(1, 2, vec![]);
        let p = PeerId::random();
        assert_eq!(pm.plan(now, vec![candidate(p)], |_| 0.0).dial.len(), 1);
        assert_eq!(pm.on_dial_failure(p, now), BACKOFF_BASE);
        assert!(pm.plan(now, vec![candidate(p)], |_| 0.0).dial.is_empty());
        let later = now + BACKOFF_BASE;
        assert_eq!(pm.plan(later, vec![candidate(p)], |_| 0.0).dial.len(), 1);
        assert_eq!(pm.on_dial_failure(p, later), BACKOFF_BASE * 2);
        assert_eq!(backoff_delay(100), BACKOFF_MAX);
    }

    #[test]
    fn retries_bootnodes_until_reached() {
        let now = Instant::now();
        let boot = PeerId::random();
        let mut pm = PeerManager::new(1, 4, vec![(boot, addr())]);
        let plan = pm.plan(now, vec![], |_| 0.0);
        assert_eq!(plan.dial[0].source, Source::Bootnode);
        pm.on_dial_failure(boot, now);
        assert!(pm.plan(now, vec![], |_| 0.0).dial.is_empty());
        let plan = pm.plan(now + BACKOFF_MAX, vec![], |_| 0.0);
        assert_eq!(plan.dial.len(), 1, "retried after backoff");
        pm.on_connected(boot, now);
        // Connected and above the low watermark: nothing to do.
        assert!(pm.plan(now + BACKOFF_MAX, vec![], |_| 0.0).dial.is_empty());
    }

    #[test]
    fn trims_least_useful_and_never_protected() {
        let now = Instant::now();
        let boot = PeerId::random();
        let mut pm = PeerManager::new(2, 4, vec![(boot, addr())]);
        pm.on_connected(boot, now);
        let explicit = PeerId::random();
        pm.protect(explicit);
        pm.on_connected(explicit, now);
        let others: Vec<PeerId> = (0..6).map(|_| PeerId::random()).collect();
        for p in &others {
            pm.on_connected(*p, now);
        }
        // 8 connected, high 4, trim to 3, but not before the grace period.
        let useful = others[0];
        let plan = pm.plan(now, vec![], |p| if *p == useful { 100.0 } else { 0.0 });
        assert!(plan.trim.is_empty(), "young connections are not trimmed");
        let later = now + TRIM_GRACE;
        let plan = pm.plan(later, vec![], |p| if *p == useful { 100.0 } else { 0.0 });
        assert_eq!(plan.trim.len(), 5);
        assert!(!plan.trim.contains(&boot));
        assert!(!plan.trim.contains(&explicit));
        assert!(!plan.trim.contains(&useful));
    }

    #[test]
    fn short_lived_connections_back_off() {
        let now = Instant::now();
        let mut pm = PeerManager::new(1, 2, vec![]);
        let p = PeerId::random();
        let mut t = now;
        let mut waits = Vec::new();
        for _ in 0..6 {
            pm.on_connected(p, t);
            pm.on_disconnected(p, t + Duration::from_secs(1), true);
            let until = pm.backoff[&p].until;
            waits.push(until.duration_since(t + Duration::from_secs(1)));
            t = until;
        }
        assert!(waits.windows(2).all(|w| w[0] <= w[1]), "{waits:?}");
        assert_eq!(*waits.last().unwrap(), BACKOFF_MAX);
        // A stable connection resets the count.
        pm.on_connected(p, t);
        pm.on_disconnected(p, t + STABLE_CONNECTION, true);
        assert_eq!(pm.backoff[&p].failures, 0);
    }

    #[test]
    fn backoff_state_is_bounded() {
        let now = Instant::now();
        let mut pm = PeerManager::new(1, 2, vec![]);
        for _ in 0..(MAX_BACKOFF_ENTRIES + 100) {
            let p = PeerId::random();
            pm.on_connected(p, now);
            pm.on_disconnected(p, now, false);
        }
        pm.plan(now, vec![], |_| 0.0);
        assert!(pm.backoff.len() <= MAX_BACKOFF_ENTRIES);
        pm.plan(now + RECONNECT_COOLDOWN, vec![], |_| 0.0);
        assert!(pm.backoff.is_empty(), "expired cooldowns are forgotten");
    }

    #[test]
    fn failure_counts_of_peers_no_longer_tried_are_forgotten() {
        let now = Instant::now();
        let mut pm = PeerManager::new(1, 2, vec![]);
        let gone = PeerId::random();
        let delay = pm.on_dial_failure(gone, now);
        pm.plan(now + delay, vec![], |_| 0.0);
        assert_eq!(
            pm.backoff[&gone].failures, 1,
            "kept while it may be retried"
        );
        pm.plan(now + delay + BACKOFF_FORGET, vec![], |_| 0.0);
        assert!(
            pm.backoff.is_empty(),
            "forgotten once nobody tried it for a while"
        );
    }

    #[test]
    fn protection_of_departed_peers_is_bounded() {
        let now = Instant::now();
        let mut pm = PeerManager::new(1, 2, vec![]);
        let staying = PeerId::random();
        pm.protect(staying);
        pm.on_connected(staying, now);
        for _ in 0..(2 * MAX_EXPLICIT) {
            let p = PeerId::random();
            pm.protect(p);
            pm.on_connected(p, now);
            pm.on_disconnected(p, now, true);
        }
        assert!(pm.explicit.len() <= MAX_EXPLICIT);
        assert!(
            pm.is_protected(&staying),
            "a connected peer keeps its protection"
        );
    }

    #[test]
    fn a_bootnode_may_have_several_addresses() {
        let now = Instant::now();
        let boot = PeerId::random();
        let quic: Multiaddr = "/ip4/127.0.0.1/udp/1/quic-v1".parse().unwrap();
        let mut pm = PeerManager::new(1, 2, vec![(boot, addr()), (boot, quic)]);
        let plan = pm.plan(now, vec![], |_| 0.0);
        assert_eq!(plan.dial.len(), 1);
        assert_eq!(plan.dial[0].addrs.len(), 2);
        assert_eq!(pm.bootnodes().len(), 2);
    }

    #[test]
    fn cooldown_after_disconnect() {
        let now = Instant::now();
        let mut pm = PeerManager::new(1, 2, vec![]);
        let p = PeerId::random();
        pm.on_connected(p, now);
        pm.on_disconnected(p, now, false);
        assert!(pm.plan(now, vec![candidate(p)], |_| 0.0).dial.is_empty());
        assert_eq!(
            pm.plan(now + RECONNECT_COOLDOWN, vec![candidate(p)], |_| 0.0)
                .dial
                .len(),
            1
        );
    }
}
