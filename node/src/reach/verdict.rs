//! Servant's reachability verdict, kept on top of AutoNAT v2 dial-backs.
//!
//! One dial-back proves little: the server may sit on the same LAN, or lie. So an
//! address counts as public once dial-backs from two distinct servers succeeded,
//! and the node as private once three dial-backs failed and none succeeded. Until
//! either happens the verdict is unknown. Each round of probes starts from scratch
//! (periodically, and when the candidate addresses change) but the verdict of the
//! last round stands until the new round reaches one of its own, so a node does
//! not flap back to unknown every ten minutes.

use std::collections::{BTreeMap, BTreeSet};

use libp2p::{Multiaddr, PeerId};
use serde::Serialize;

/// Distinct servers whose dial-back must succeed before an address is public.
pub const CONFIRMATIONS: usize = 2;
/// Failed dial-backs, with no success, before the node is private.
pub const REFUTATIONS: usize = 3;
/// Probes of one address per round, whatever they say: an address that some
/// servers reach and others do not is not tested forever.
pub const MAX_PROBES_PER_ADDR: usize = 6;
/// Candidate addresses kept per round (observed addresses with changing ports,
/// behind a symmetric NAT, would otherwise pile up).
pub const MAX_CANDIDATES: usize = 8;

/// Whether other peers can dial this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reachability {
    /// Not enough evidence yet.
    Unknown,
    /// Dial-backs from at least two distinct peers reached one of our addresses.
    Public,
    /// Dial-backs failed at least three times and never succeeded.
    Private,
}

impl Reachability {
    /// The name used in logs, metrics and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Reachability::Unknown => "unknown",
            Reachability::Public => "public",
            Reachability::Private => "private",
        }
    }
}

/// What one probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeResult {
    /// The server dialed the address and delivered our nonce.
    Reached,
    /// The server could not dial the address.
    Unreachable(String),
}

/// The evidence about one candidate address in the current round.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AddrEvidence {
    /// Servers whose dial-back reached us.
    pub reached_by: BTreeSet<String>,
    /// Servers that could not reach us, with their error.
    pub failed_from: BTreeMap<String, String>,
    /// A probe is under way (with this server).
    pub probing: Option<String>,
    /// Whether this address is confirmed (from this round or an earlier one).
    pub confirmed: bool,
    /// Servers that gave no verdict this round (refused, failed, went away).
    #[serde(skip)]
    skipped: BTreeSet<String>,
    #[serde(skip)]
    seen: u64,
}

impl AddrEvidence {
    fn probes(&self) -> usize {
        self.reached_by.len() + self.failed_from.len()
    }

    /// Whether this round is done with the address.
    fn settled(&self) -> bool {
        self.reached_by.len() >= CONFIRMATIONS
            || (self.reached_by.is_empty() && self.failed_from.len() >= REFUTATIONS)
            || self.probes() >= MAX_PROBES_PER_ADDR
    }
}

/// A change of verdict, for the log line, the metric and the role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The verdict before.
    pub from: Reachability,
    /// The verdict now.
    pub to: Reachability,
    /// Why, in words.
    pub reason: String,
}

/// The verdict and the evidence behind it.
#[derive(Debug, Clone)]
pub struct Verdict {
    status: Reachability,
    reason: String,
    addrs: BTreeMap<Multiaddr, AddrEvidence>,
    /// Addresses confirmed public (kept across rounds until refuted).
    confirmed: BTreeSet<Multiaddr>,
    round: u64,
    clock: u64,
}

impl Default for Verdict {
    fn default() -> Self {
        Verdict {
            status: Reachability::Unknown,
            reason: "no dial-back yet".into(),
            addrs: BTreeMap::new(),
            confirmed: BTreeSet::new(),
            round: 0,
            clock: 0,
        }
    }
}

impl Verdict {
    /// The current verdict.
    pub fn status(&self) -> Reachability {
        self.status
    }

    /// Why the verdict is what it is.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// Addresses confirmed reachable.
    pub fn confirmed(&self) -> impl Iterator<Item = &Multiaddr> {
        self.confirmed.iter()
    }

    /// The evidence of the current round, per address.
    pub fn evidence(&self) -> impl Iterator<Item = (&Multiaddr, &AddrEvidence)> {
        self.addrs.iter()
    }

    /// How many rounds have started.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// Sets the verdict by decree (a forced role, or a first node with no bootnodes):
    /// probes keep running and replace it with evidence.
    pub fn assume(&mut self, status: Reachability, reason: &str) -> Option<Change> {
        self.set(status, reason.to_string())
    }

    /// An address worth testing: observed by a peer, listened on, mapped by UPnP or
    /// announced. Returns whether it is new to this round.
    pub fn candidate(&mut self, addr: Multiaddr) -> bool {
        self.clock += 1;
        let clock = self.clock;
        if let Some(e) = self.addrs.get_mut(&addr) {
            e.seen = clock;
            return false;
        }
        if self.addrs.len() >= MAX_CANDIDATES {
            // Forget the stalest unsettled, unconfirmed candidate to make room.
            let stale = self
                .addrs
                .iter()
                .filter(|(a, e)| !self.confirmed.contains(*a) && e.probing.is_none())
                .min_by_key(|(_, e)| e.seen)
                .map(|(a, _)| a.clone());
            match stale {
                Some(a) => {
                    self.addrs.remove(&a);
                }
                None => return false,
            }
        }
        let confirmed = self.confirmed.contains(&addr);
        self.addrs.insert(
            addr,
            AddrEvidence {
                seen: clock,
                confirmed,
                ..AddrEvidence::default()
            },
        );
        true
    }

    /// Starts a new round: every address is tested again, from no evidence. The
    /// verdict stands until the round decides.
    pub fn new_round(&mut self) {
        self.round += 1;
        for e in self.addrs.values_mut() {
            e.reached_by.clear();
            e.failed_from.clear();
            e.skipped.clear();
        }
    }

    /// The next probe to make: an unsettled address not under probe, and a server
    /// from `servers` that has not answered for it this round.
    pub fn next_probe(&mut self, servers: &[PeerId]) -> Option<(Multiaddr, PeerId)> {
        let mut order: Vec<(&Multiaddr, &AddrEvidence)> = self
            .addrs
            .iter()
            .filter(|(_, e)| e.probing.is_none() && !e.settled())
            .collect();
        // Most recently seen first: the freshest observation is the likeliest.
        order.sort_by_key(|(_, e)| std::cmp::Reverse(e.seen));
        let (addr, server) = order.into_iter().find_map(|(addr, e)| {
            servers
                .iter()
                .find(|s| {
                    let s = s.to_string();
                    !e.reached_by.contains(&s)
                        && !e.failed_from.contains_key(&s)
                        && !e.skipped.contains(&s)
                })
                .map(|s| (addr.clone(), *s))
        })?;
        if let Some(e) = self.addrs.get_mut(&addr) {
            e.probing = Some(server.to_string());
        }
        Some((addr, server))
    }

    /// A probe that ended without a verdict (the server refused, failed or went
    /// away): the address is tried with another server; this one is not asked
    /// about it again this round.
    pub fn abandoned(&mut self, addr: &Multiaddr, server: PeerId) {
        if let Some(e) = self.addrs.get_mut(addr) {
            e.probing = None;
            e.skipped.insert(server.to_string());
        }
    }

    /// Records a probe's result; returns the change of verdict, if any.
    pub fn record(
        &mut self,
        addr: &Multiaddr,
        server: PeerId,
        result: ProbeResult,
    ) -> Option<Change> {
        let e = self.addrs.get_mut(addr)?;
        e.probing = None;
        let server = server.to_string();
        match result {
            ProbeResult::Reached => {
                e.reached_by.insert(server);
                if e.reached_by.len() >= CONFIRMATIONS {
                    e.confirmed = true;
                    self.confirmed.insert(addr.clone());
                }
            }
            ProbeResult::Unreachable(error) => {
                e.failed_from.insert(server, error);
                if e.reached_by.is_empty() && e.failed_from.len() >= REFUTATIONS {
                    e.confirmed = false;
                    self.confirmed.remove(addr);
                }
            }
        }
        self.decide()
    }

    /// Whether an address was refuted in this round (for the caller to stop
    /// announcing it).
    pub fn refuted(&self, addr: &Multiaddr) -> bool {
        self.addrs
            .get(addr)
            .is_some_and(|e| e.reached_by.is_empty() && e.failed_from.len() >= REFUTATIONS)
    }

    fn decide(&mut self) -> Option<Change> {
        if let Some((addr, e)) = self
            .addrs
            .iter()
            .find(|(_, e)| e.reached_by.len() >= CONFIRMATIONS)
        {
            let reason = format!(
                "{addr} reached by dial-backs from {} peers",
                e.reached_by.len()
            );
            return self.set(Reachability::Public, reason);
        }
        // Private is judged on this round's evidence alone: an address confirmed in an
        // earlier round that no server could even answer for this time (a TCP dial
        // into a NAT that drops it outlasts the server's patience) must not keep the
        // node public after its port forward is gone.
        let any_reached = self.addrs.values().any(|e| !e.reached_by.is_empty());
        let failures: usize = self.addrs.values().map(|e| e.failed_from.len()).sum();
        if !any_reached && failures >= REFUTATIONS {
            self.confirmed.clear();
            for e in self.addrs.values_mut() {
                e.confirmed = false;
            }
            let reason = format!("{failures} dial-backs failed and none reached us");
            return self.set(Reachability::Private, reason);
        }
        None
    }

    fn set(&mut self, to: Reachability, reason: String) -> Option<Change> {
        let from = self.status;
        self.reason = reason.clone();
        if from == to {
            return None;
        }
        self.status = to;
        Some(Change { from, to, reason })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> Multiaddr {
        format!("/ip4/198.18.0.7/tcp/{port}").parse().unwrap()
    }

    fn probe_all(v: &mut Verdict, servers: &[PeerId], reached: bool) -> Vec<Change> {
        let mut changes = Vec::new();
        while let Some((a, s)) = v.next_probe(servers) {
            let result = if reached {
                ProbeResult::Reached
            } else {
                ProbeResult::Unreachable("dial error".into())
            };
            changes.extend(v.record(&a, s, result));
        }
        changes
    }

    #[test]
    fn one_dial_back_is_not_enough_two_distinct_servers_are() {
        let mut v = Verdict::default();
        let s1 = PeerId::random();
        v.candidate(addr(4001));
        let (a, s) = v.next_probe(&[s1]).unwrap();
        assert_eq!(v.record(&a, s, ProbeResult::Reached), None);
        // The same server again is not asked: it has already answered.
        assert_eq!(v.next_probe(&[s1]), None);
        assert_eq!(v.status(), Reachability::Unknown);
        let s2 = PeerId::random();
        let (a, s) = v.next_probe(&[s1, s2]).unwrap();
        assert_eq!(s, s2);
        let change = v.record(&a, s, ProbeResult::Reached).unwrap();
        assert_eq!(change.to, Reachability::Public);
        assert_eq!(v.confirmed().count(), 1);
    }

    #[test]
    fn three_failures_and_no_success_make_the_node_private() {
        let mut v = Verdict::default();
        let servers: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
        v.candidate(addr(4001));
        let changes = probe_all(&mut v, &servers[..2], false);
        assert!(changes.is_empty());
        assert_eq!(v.status(), Reachability::Unknown);
        let changes = probe_all(&mut v, &servers, false);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].to, Reachability::Private);
        assert!(v.refuted(&addr(4001)));
    }

    #[test]
    fn a_single_success_blocks_the_private_verdict() {
        let mut v = Verdict::default();
        let servers: Vec<PeerId> = (0..6).map(|_| PeerId::random()).collect();
        v.candidate(addr(4001));
        let (a, s) = v.next_probe(&servers).unwrap();
        v.record(&a, s, ProbeResult::Reached);
        probe_all(&mut v, &servers[1..], false);
        assert_eq!(v.status(), Reachability::Unknown);
    }

    #[test]
    fn the_verdict_stands_through_a_new_round_until_evidence_changes_it() {
        let mut v = Verdict::default();
        let servers: Vec<PeerId> = (0..3).map(|_| PeerId::random()).collect();
        v.candidate(addr(4001));
        probe_all(&mut v, &servers, true);
        assert_eq!(v.status(), Reachability::Public);
        v.new_round();
        assert_eq!(v.status(), Reachability::Public);
        // The port forward went away: every server now fails.
        let changes = probe_all(&mut v, &servers, false);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].to, Reachability::Private);
        assert_eq!(v.confirmed().count(), 0);
        // ... and came back.
        v.new_round();
        let changes = probe_all(&mut v, &servers, true);
        assert_eq!(changes[0].to, Reachability::Public);
    }

    #[test]
    fn candidates_are_capped_and_stale_ones_make_room() {
        let mut v = Verdict::default();
        for port in 0..(MAX_CANDIDATES as u16 + 5) {
            v.candidate(addr(5000 + port));
        }
        assert_eq!(v.evidence().count(), MAX_CANDIDATES);
        assert!(v
            .evidence()
            .any(|(a, _)| *a == addr(5000 + MAX_CANDIDATES as u16 + 4)));
        assert!(!v.evidence().any(|(a, _)| *a == addr(5000)));
    }

    #[test]
    fn an_abandoned_probe_frees_the_address_for_another_server() {
        let mut v = Verdict::default();
        let servers: Vec<PeerId> = (0..2).map(|_| PeerId::random()).collect();
        v.candidate(addr(4001));
        let (a, first) = v.next_probe(&servers).unwrap();
        assert_eq!(
            v.next_probe(&servers),
            None,
            "one probe per address at a time"
        );
        v.abandoned(&a, first);
        let (_, second) = v.next_probe(&servers).unwrap();
        assert_ne!(first, second);
    }
}
