//! A per-peer budget for gossipsub control traffic.
//!
//! libp2p-gossipsub 0.50 handles every GRAFT, PRUNE, IHAVE, IWANT, IDONTWANT and
//! SUBSCRIBE it receives, and scores few of them: a peer can keep a node busy with
//! hundreds of thousands of them (what GHSA-g3g5-x568-qvqx and GHSA-vrx6-jcp8-vm7m
//! were about, whose memory side 0.50.1 fixed). This wraps gossipsub's behaviour and
//! charges each peer for the control actions and subscriptions in every RPC it sends,
//! from a token bucket of `gossip_control_burst` (20,000) refilled at
//! `gossip_control_rate` (2,000) a second. A peer that
//! overdraws it is disconnected, counted in
//! `servant_gossip_control_floods_total`, its RPC is not handed to gossipsub, and
//! its connections are refused for [`FLOOD_PENALTY`] after.
//!
//! Honest traffic stays far below: a peer sends a few control actions per topic per
//! heartbeat, plus one IDONTWANT per large message it receives (gossipsub 0.50 sends
//! them one per RPC), so only a network carrying more than 2,000 large broadcasts a
//! second, sustained, would reach it.

use std::{
    collections::{HashMap, HashSet},
    ops::{Deref, DerefMut},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use libp2p::{
    core::{transport::PortUse, Endpoint},
    swarm::{
        ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
        THandlerOutEvent, ToSwarm,
    },
    Multiaddr, PeerId,
};
use prometheus_client::metrics::counter::Counter;

use crate::{behaviour::Gossipsub, token_bucket::TokenBucket};

/// How long a peer disconnected for a control flood is refused afterwards. Without
/// it, a flooder that redials starts over with a full burst and costs the node a
/// burst's worth of handling every few milliseconds.
pub const FLOOD_PENALTY: Duration = Duration::from_secs(600);

/// Most flooders remembered at once; past it the one whose penalty ends first is
/// forgotten (a flooder with many identities meets the per-IP caps instead).
pub const MAX_PENALIZED: usize = 4096;

/// Why a connection was refused: the peer flooded gossipsub control messages and is
/// being disconnected, or was within the last [`FLOOD_PENALTY`].
#[derive(Debug)]
pub struct FloodingPeer;

impl std::fmt::Display for FloodingPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("peer flooded gossipsub control messages and is refused for a while")
    }
}

impl std::error::Error for FloodingPeer {}

/// What gossipsub's connection handler reports to its behaviour.
type HandlerEvent = THandlerOutEvent<Gossipsub>;

/// Gossipsub with a per-peer budget for control traffic; derefs to gossipsub.
pub struct Budgeted {
    inner: Gossipsub,
    buckets: HashMap<PeerId, TokenBucket>,
    /// Peers that overdrew their budget, to be disconnected.
    to_close: Vec<PeerId>,
    /// Peers being disconnected: what they still send is dropped, and counted once.
    closing: HashSet<PeerId>,
    /// Flooders already disconnected, with when their penalty ends.
    penalized: HashMap<PeerId, Instant>,
    floods: Counter,
    burst: f64,
    rate: f64,
}

impl Budgeted {
    /// Wraps `inner` with a budget of `burst` actions refilled at `rate` a second;
    /// `floods` counts the peers disconnected for overdrawing it.
    pub fn new(inner: Gossipsub, burst: u32, rate: u32, floods: Counter) -> Self {
        Budgeted {
            inner,
            buckets: HashMap::new(),
            to_close: Vec::new(),
            closing: HashSet::new(),
            penalized: HashMap::new(),
            floods,
            burst: f64::from(burst),
            rate: f64::from(rate),
        }
    }

    /// A peer being disconnected for a flood gets no new connection meanwhile (one
    /// that slipped in would live on with every RPC dropped), nor for
    /// [`FLOOD_PENALTY`] after.
    fn refuse_if_closing(&mut self, peer: PeerId) -> Result<(), ConnectionDenied> {
        if self.closing.contains(&peer) {
            return Err(ConnectionDenied::new(FloodingPeer));
        }
        if let Some(until) = self.penalized.get(&peer) {
            if Instant::now() < *until {
                return Err(ConnectionDenied::new(FloodingPeer));
            }
            self.penalized.remove(&peer);
        }
        Ok(())
    }

    /// Starts `peer`'s penalty at `now`, within [`MAX_PENALIZED`].
    fn penalize(&mut self, peer: PeerId, now: Instant) {
        if self.penalized.len() >= MAX_PENALIZED {
            self.penalized.retain(|_, until| *until > now);
        }
        if self.penalized.len() >= MAX_PENALIZED {
            let first = self
                .penalized
                .iter()
                .min_by_key(|(_, until)| **until)
                .map(|(p, _)| *p);
            if let Some(first) = first {
                self.penalized.remove(&first);
            }
        }
        self.penalized.insert(peer, now + FLOOD_PENALTY);
    }

    /// Charges `peer` for `cost` at `now`; false when its budget is overdrawn.
    fn charge(&mut self, peer: PeerId, cost: usize, now: Instant) -> bool {
        let (rate, burst) = (self.rate, self.burst);
        self.buckets
            .entry(peer)
            .or_insert_with(|| TokenBucket::full(rate, burst, now))
            .charge(cost as f64, now)
    }
}

impl Deref for Budgeted {
    type Target = Gossipsub;
    fn deref(&self) -> &Gossipsub {
        &self.inner
    }
}

impl DerefMut for Budgeted {
    fn deref_mut(&mut self) -> &mut Gossipsub {
        &mut self.inner
    }
}

impl NetworkBehaviour for Budgeted {
    type ConnectionHandler = THandler<Gossipsub>;
    type ToSwarm = <Gossipsub as NetworkBehaviour>::ToSwarm;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
            .handle_pending_inbound_connection(connection_id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.refuse_if_closing(peer)?;
        self.inner.handle_established_inbound_connection(
            connection_id,
            peer,
            local_addr,
            remote_addr,
        )
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner.handle_pending_outbound_connection(
            connection_id,
            maybe_peer,
            addresses,
            effective_role,
        )
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.refuse_if_closing(peer)?;
        self.inner.handle_established_outbound_connection(
            connection_id,
            peer,
            addr,
            role_override,
            port_use,
        )
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if let FromSwarm::ConnectionClosed(closed) = &event {
            if closed.remaining_established == 0 {
                self.buckets.remove(&closed.peer_id);
                if self.closing.remove(&closed.peer_id) {
                    self.penalize(closed.peer_id, Instant::now());
                }
            }
        }
        self.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        if let HandlerEvent::Message {
            rpc,
            invalid_messages,
        } = &event
        {
            if self.closing.contains(&peer) {
                return;
            }
            let cost = rpc.control_msgs.len() + rpc.subscriptions.len() + invalid_messages.len();
            if cost > 0 && !self.charge(peer, cost, Instant::now()) {
                tracing::warn!(%peer, "disconnecting a peer flooding gossipsub control messages");
                self.floods.inc();
                self.closing.insert(peer);
                self.to_close.push(peer);
                return;
            }
        }
        self.inner
            .on_connection_handler_event(peer, connection_id, event);
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        if let Some(peer_id) = self.to_close.pop() {
            return Poll::Ready(ToSwarm::CloseConnection {
                peer_id,
                connection: libp2p::swarm::CloseConnection::All,
            });
        }
        self.inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Servant's gossipsub with a budget of `burst` and `rate`.
    fn budgeted(burst: u32, rate: u32) -> Result<Budgeted, crate::behaviour::BehaviourError> {
        let key = libp2p::identity::Keypair::generate_ed25519();
        let mut registry = prometheus_client::registry::Registry::default();
        let inner = crate::behaviour::build_gossipsub(&key, &mut registry, true)?;
        Ok(Budgeted::new(inner, burst, rate, Counter::default()))
    }

    #[test]
    fn the_bucket_refills_at_its_rate_up_to_its_burst(
    ) -> Result<(), crate::behaviour::BehaviourError> {
        const BURST: usize = 20_000;
        const RATE: usize = 2_000;
        let mut b = budgeted(BURST as u32, RATE as u32)?;
        let peer = PeerId::random();
        let t = Instant::now();
        assert!(b.charge(peer, BURST, t));
        assert!(!b.charge(peer, 1, t), "the burst is spent");
        // One second refills RATE, which the overdraft above already owes one of.
        let later = t + std::time::Duration::from_secs(1);
        assert!(b.charge(peer, RATE - 1, later));
        assert!(!b.charge(peer, 1, later));
        // Idle long enough, the bucket is full again, not more.
        let much_later = later + std::time::Duration::from_secs(3600);
        assert!(b.charge(peer, BURST, much_later));
        assert!(!b.charge(peer, 1, much_later));
        Ok(())
    }

    #[test]
    fn a_flooder_is_refused_for_its_penalty_and_the_list_stays_capped(
    ) -> Result<(), crate::behaviour::BehaviourError> {
        let mut b = budgeted(10, 1)?;
        let flooder = PeerId::random();
        b.penalize(flooder, Instant::now());
        assert!(
            b.refuse_if_closing(flooder).is_err(),
            "refused within the penalty"
        );
        assert!(b.refuse_if_closing(PeerId::random()).is_ok());
        // A penalty that ended lets the peer back in and is forgotten.
        let long_ago = Instant::now() - FLOOD_PENALTY - Duration::from_secs(1);
        b.penalize(flooder, long_ago);
        assert!(b.refuse_if_closing(flooder).is_ok());
        assert!(!b.penalized.contains_key(&flooder));
        // Past the cap, the penalty that ends first makes room.
        let now = Instant::now();
        let first = PeerId::random();
        b.penalize(first, now - Duration::from_secs(10));
        for _ in 0..MAX_PENALIZED {
            b.penalize(PeerId::random(), now);
        }
        assert_eq!(b.penalized.len(), MAX_PENALIZED);
        assert!(!b.penalized.contains_key(&first));
        Ok(())
    }
}
