//! libp2p's AutoNAT v2 server behind a budget, serving on every connection.
//!
//! Every node serves dial-backs, so that even a new network can confirm its first
//! nodes. libp2p's server dials whatever it is asked to, as often as it is asked;
//! this wrapper lets through at most [`PER_PEER_PER_MINUTE`] dial-backs per client
//! and [`TOTAL_PER_MINUTE`] in all. A request over budget is dropped before its dial:
//! the client is told "internal error", which a client takes as no verdict rather
//! than as "unreachable".
//!
//! libp2p's server answers dial requests only on connections it accepted; this one
//! answers on connections it dialed too (see `handle_established_outbound_connection`),
//! since which of two peers' connections survives is not the client's choice.

use std::{
    collections::HashMap,
    task::{Context, Poll},
    time::Instant,
};

use either::Either;
use libp2p::{
    autonat::v2::server,
    core::{transport::PortUse, Endpoint},
    swarm::{
        ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
        THandlerOutEvent, ToSwarm,
    },
    Multiaddr, PeerId,
};

/// Dial-backs served to one client per minute.
pub const PER_PEER_PER_MINUTE: u32 = 6;
/// Dial-backs served in all per minute.
pub const TOTAL_PER_MINUTE: u32 = 60;
/// Clients whose budget is remembered; the oldest are forgotten beyond this.
const MAX_TRACKED_CLIENTS: usize = 4_096;

/// A token bucket refilled continuously at `per_minute`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(per_minute: u32, now: Instant) -> Self {
        Bucket {
            tokens: f64::from(per_minute),
            at: now,
        }
    }

    fn take(&mut self, per_minute: u32, now: Instant) -> bool {
        let cap = f64::from(per_minute);
        let refill = now.duration_since(self.at).as_secs_f64() * cap / 60.0;
        self.tokens = (self.tokens + refill).min(cap);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What the throttled server reports.
#[derive(Debug)]
pub enum Event {
    /// A dial-back was attempted for a client (the inner server's report).
    Served(server::Event),
    /// A request was dropped over budget.
    Throttled {
        /// The client.
        peer: PeerId,
    },
}

/// libp2p's AutoNAT v2 server with per-client and global budgets.
pub struct Behaviour {
    inner: server::Behaviour,
    total: Bucket,
    clients: HashMap<PeerId, Bucket>,
    /// When buckets full again were last forgotten.
    swept: Instant,
    throttled: Vec<PeerId>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            inner: server::Behaviour::default(),
            total: Bucket::full(TOTAL_PER_MINUTE, Instant::now()),
            clients: HashMap::new(),
            swept: Instant::now(),
            throttled: Vec::new(),
        }
    }
}

impl Behaviour {
    fn admit(&mut self, peer: PeerId) -> bool {
        self.admit_at(peer, Instant::now())
    }

    fn admit_at(&mut self, peer: PeerId, now: Instant) -> bool {
        let full = self.clients.len() >= MAX_TRACKED_CLIENTS && !self.clients.contains_key(&peer);
        if full || now.duration_since(self.swept).as_secs() >= 60 {
            // Buckets older than a minute are full again: forgetting them is free,
            // and done every minute the map holds only the last minute's clients,
            // not every identity that ever asked.
            self.clients
                .retain(|_, b| now.duration_since(b.at).as_secs() < 60);
            self.swept = now;
            if self.clients.len() >= MAX_TRACKED_CLIENTS {
                return false;
            }
        }
        let client = self
            .clients
            .entry(peer)
            .or_insert_with(|| Bucket::full(PER_PEER_PER_MINUTE, now));
        // Check the client's budget first so one greedy client cannot drain the
        // global one.
        client.take(PER_PEER_PER_MINUTE, now) && self.total.take(TOTAL_PER_MINUTE, now)
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = <server::Behaviour as NetworkBehaviour>::ConnectionHandler;
    type ToSwarm = Event;

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
        let handler = self.inner.handle_established_outbound_connection(
            connection_id,
            peer,
            addr,
            role_override,
            port_use,
        )?;
        match handler {
            // A connection we dialed for no dial-back: libp2p's server would give it
            // a handler that refuses dial requests, so a peer we dialed (and whose
            // own dial to us was closed as a duplicate) could never ask us. Serve
            // requests on it as on an accepted one, with the address we dialed as
            // the one we observe.
            Either::Left(Either::Right(_idle)) => {
                self.inner
                    .handle_established_inbound_connection(connection_id, peer, addr, addr)
            }
            dial_back => Ok(dial_back),
        }
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        self.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        // A dial-back command from a client's request: the one event that costs us
        // a dial. Dropping it fails the request with "internal error".
        if let Either::Right(Either::Left(command)) = event {
            if !self.admit(peer) {
                drop(command);
                self.throttled.push(peer);
                return;
            }
            self.inner.on_connection_handler_event(
                peer,
                connection_id,
                Either::Right(Either::Left(command)),
            );
            return;
        }
        self.inner
            .on_connection_handler_event(peer, connection_id, event);
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<Event, THandlerInEvent<Self>>> {
        if let Some(peer) = self.throttled.pop() {
            return Poll::Ready(ToSwarm::GenerateEvent(Event::Throttled { peer }));
        }
        self.inner.poll(cx).map(|e| e.map_out(Event::Served))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_bucket_refills_over_a_minute() {
        let t0 = Instant::now();
        let mut b = Bucket::full(6, t0);
        assert!((0..6).all(|_| b.take(6, t0)));
        assert!(!b.take(6, t0));
        assert!(b.take(6, t0 + Duration::from_secs(10)));
        assert!(!b.take(6, t0 + Duration::from_secs(10)));
    }

    #[test]
    fn one_client_is_capped_and_others_still_served() {
        let mut s = Behaviour::default();
        let greedy = PeerId::random();
        let served = (0..20).filter(|_| s.admit(greedy)).count();
        assert_eq!(served, PER_PEER_PER_MINUTE as usize);
        assert!(s.admit(PeerId::random()));
    }

    #[test]
    fn clients_of_more_than_a_minute_ago_are_forgotten() {
        let mut s = Behaviour::default();
        let t0 = Instant::now();
        for _ in 0..50 {
            s.admit_at(PeerId::random(), t0);
        }
        assert_eq!(s.clients.len(), 50);
        s.admit_at(PeerId::random(), t0 + Duration::from_secs(61));
        assert_eq!(s.clients.len(), 1, "only the last minute's client is kept");
    }
}
