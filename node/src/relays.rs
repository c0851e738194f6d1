//! Relay reservations for a NATed peer: choose super-peers, reserve, and replace a
//! relay that goes away (rust-libp2p has no AutoRelay; this is Servant's).
//!
//! A peer whose role is [`Role::Peer`](crate::role::Role) keeps reservations on up
//! to [`WANTED`] super-peers, chosen among connected peers that offer the relay hop
//! protocol, fastest first. A reservation is a listener on
//! `<relay>/p2p/<relay id>/p2p-circuit`: libp2p's relay client makes and renews it
//! and reports its `/p2p-circuit` address, which identify then announces. When the
//! relay's connection or the reservation goes, the listener closes and another
//! relay is chosen on the next tick.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use libp2p::{
    core::transport::ListenerId, multiaddr::Protocol, relay, swarm::Swarm, Multiaddr, PeerId,
    StreamProtocol,
};
use serde::Serialize;

use crate::behaviour::Behaviour;

/// Reservations a NATed peer holds.
pub const WANTED: usize = 2;
/// A relay that refused or failed is not asked again for this long.
const RETRY_AFTER: Duration = Duration::from_secs(30);
/// A reservation not accepted within this long is given up.
const RESERVE_TIMEOUT: Duration = Duration::from_secs(20);

/// A super-peer that could relay for us.
#[derive(Debug, Clone)]
struct Candidate {
    addrs: Vec<Multiaddr>,
    rtt: Option<Duration>,
}

/// A reservation held or under way.
#[derive(Debug, Clone)]
struct Reservation {
    listener: ListenerId,
    since: Instant,
    accepted: bool,
    renewals: u64,
    circuit_addrs: Vec<Multiaddr>,
}

/// A reservation, for the API and `servant doctor`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ReservationView {
    /// The relay's PeerId.
    pub relay: String,
    /// Whether the relay accepted it (false while the request is under way).
    pub accepted: bool,
    /// Our addresses through this relay.
    pub addrs: Vec<String>,
    /// Renewals so far.
    pub renewals: u64,
    /// Seconds since it was requested.
    pub age_secs: u64,
}

/// The reservations of this node.
#[derive(Debug, Default)]
pub struct Relays {
    active: bool,
    candidates: HashMap<PeerId, Candidate>,
    held: HashMap<PeerId, Reservation>,
    backoff: HashMap<PeerId, Instant>,
    /// Relays replaced because they went away, for metrics.
    pub replaced: u64,
}

impl Relays {
    /// Turns reservations on (role peer) or off (every reservation dropped).
    pub fn set_active(&mut self, swarm: &mut Swarm<Behaviour>, active: bool) {
        self.active = active;
        if !active {
            for (_, r) in self.held.drain() {
                swarm.remove_listener(r.listener);
            }
        } else {
            self.reserve(swarm, Instant::now());
        }
    }

    /// A peer identified itself: a relay candidate if it offers the hop protocol
    /// (super-peers enable it, others do not).
    pub fn identified(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        protocols: &[StreamProtocol],
        addrs: Vec<Multiaddr>,
        dialed: Option<Multiaddr>,
    ) {
        let offers = protocols.contains(&relay::HOP_PROTOCOL_NAME);
        let mut addrs: Vec<Multiaddr> = dialed
            .into_iter()
            .chain(addrs)
            .filter(|a| !a.iter().any(|p| p == Protocol::P2pCircuit))
            .map(crate::addr::without_p2p)
            .collect();
        // The reservation's address is what other peers dial to reach us, so it must be
        // one they can reach: the one we reached the relay on first, never a loopback
        // address while there is another (a relay listening on 0.0.0.0 lists 127.0.0.1).
        let mut seen = std::collections::HashSet::new();
        addrs.retain(|a| seen.insert(a.clone()));
        addrs.sort_by_key(|a| crate::addr::ip_of(a).is_some_and(|ip| ip.is_loopback()));
        if offers && !addrs.is_empty() {
            let rtt = self.candidates.get(&peer).and_then(|c| c.rtt);
            self.candidates.insert(peer, Candidate { addrs, rtt });
            self.reserve(swarm, Instant::now());
        } else {
            self.candidates.remove(&peer);
        }
    }

    /// A ping to `peer` came back.
    pub fn rtt(&mut self, peer: PeerId, rtt: Duration) {
        if let Some(c) = self.candidates.get_mut(&peer) {
            c.rtt = Some(rtt);
        }
    }

    /// The last connection to `peer` closed.
    pub fn disconnected(&mut self, peer: &PeerId) {
        self.candidates.remove(peer);
    }

    /// Periodic work: give up reservations that hang, make new ones.
    pub fn tick(&mut self, swarm: &mut Swarm<Behaviour>, now: Instant) {
        let hung: Vec<PeerId> = self
            .held
            .iter()
            .filter(|(_, r)| !r.accepted && now.duration_since(r.since) >= RESERVE_TIMEOUT)
            .map(|(p, _)| *p)
            .collect();
        for peer in hung {
            if let Some(r) = self.held.remove(&peer) {
                tracing::info!(relay = %peer, "relay reservation not answered; trying another");
                swarm.remove_listener(r.listener);
                self.backoff.insert(peer, now + RETRY_AFTER);
            }
        }
        self.backoff.retain(|_, until| *until > now);
        self.reserve(swarm, now);
    }

    fn reserve(&mut self, swarm: &mut Swarm<Behaviour>, now: Instant) {
        if !self.active {
            return;
        }
        while self.held.len() < WANTED {
            let mut choices: Vec<(&PeerId, &Candidate)> = self
                .candidates
                .iter()
                .filter(|(p, _)| !self.held.contains_key(p) && !self.backoff.contains_key(p))
                .collect();
            // Fastest first; unmeasured last; PeerId breaks ties so choices are stable.
            choices.sort_by_key(|(p, c)| (c.rtt.unwrap_or(Duration::MAX), **p));
            let Some((peer, candidate)) = choices.first().map(|(p, c)| (**p, (*c).clone())) else {
                return;
            };
            let Some(addr) = candidate.addrs.first() else {
                self.candidates.remove(&peer);
                continue;
            };
            let circuit = addr
                .clone()
                .with(Protocol::P2p(peer))
                .with(Protocol::P2pCircuit);
            match swarm.listen_on(circuit.clone()) {
                Ok(listener) => {
                    tracing::info!(relay = %peer, addr = %circuit, "requesting a relay reservation");
                    self.held.insert(
                        peer,
                        Reservation {
                            listener,
                            since: now,
                            accepted: false,
                            renewals: 0,
                            circuit_addrs: Vec::new(),
                        },
                    );
                }
                Err(e) => {
                    tracing::warn!(relay = %peer, error = %e, "cannot listen through relay");
                    self.backoff.insert(peer, now + RETRY_AFTER);
                }
            }
        }
    }

    /// The relay client's events.
    pub fn on_client_event(&mut self, event: &relay::client::Event) {
        if let relay::client::Event::ReservationReqAccepted {
            relay_peer_id,
            renewal,
            ..
        } = event
        {
            if let Some(r) = self.held.get_mut(relay_peer_id) {
                if *renewal {
                    r.renewals += 1;
                } else {
                    tracing::info!(relay = %relay_peer_id, "relay reservation accepted");
                }
                r.accepted = true;
            }
        }
    }

    /// A listener reported an address: ours through a relay, if it is a
    /// reservation's listener.
    pub fn on_new_listen_addr(&mut self, listener: ListenerId, addr: &Multiaddr) {
        if let Some(r) = self.held.values_mut().find(|r| r.listener == listener) {
            if !r.circuit_addrs.contains(addr) {
                r.circuit_addrs.push(addr.clone());
            }
        }
    }

    /// A listener closed: if it was a reservation, the relay is gone or refused us,
    /// and another is chosen.
    pub fn on_listener_closed(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        listener: ListenerId,
        reason: &str,
    ) -> bool {
        let Some(peer) = self
            .held
            .iter()
            .find(|(_, r)| r.listener == listener)
            .map(|(p, _)| *p)
        else {
            return false;
        };
        let now = Instant::now();
        if let Some(r) = self.held.remove(&peer) {
            if r.accepted {
                self.replaced += 1;
            }
            tracing::info!(relay = %peer, %reason, accepted = r.accepted, "relay reservation ended; choosing another relay");
        }
        self.backoff.insert(peer, now + RETRY_AFTER);
        self.reserve(swarm, now);
        true
    }

    /// Whether `peer` is one of our relays (a reservation held or under way).
    pub fn is_relay(&self, peer: &PeerId) -> bool {
        self.held.contains_key(peer)
    }

    /// Our relays (reservations held or under way).
    pub fn relays(&self) -> std::collections::HashSet<PeerId> {
        self.held.keys().copied().collect()
    }

    /// Accepted reservations.
    pub fn accepted(&self) -> usize {
        self.held.values().filter(|r| r.accepted).count()
    }

    /// Every reservation, for the API.
    pub fn views(&self) -> Vec<ReservationView> {
        let mut views: Vec<ReservationView> = self
            .held
            .iter()
            .map(|(peer, r)| ReservationView {
                relay: peer.to_string(),
                accepted: r.accepted,
                addrs: r.circuit_addrs.iter().map(|a| a.to_string()).collect(),
                renewals: r.renewals,
                age_secs: r.since.elapsed().as_secs(),
            })
            .collect();
        views.sort_by(|a, b| a.relay.cmp(&b.relay));
        views
    }
}
