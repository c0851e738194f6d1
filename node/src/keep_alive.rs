//! Keeps the connections this node chose open until it decides to close them.
//!
//! libp2p closes a connection once no protocol has work on it, and gossipsub only keeps
//! connections to its mesh peers busy: a node with no topics would lose every peer after
//! the idle timeout, fall below its low watermark and dial them all again, a minute
//! later and forever. So the connections the node means to keep are held open here, and
//! the [`peer_manager`](crate::peer_manager) closes the surplus (above the high
//! watermark), as a connection manager should; peers that vanish are caught by ping.
//!
//! Which connections are meant: those the node dialed on purpose (the peer manager, a
//! bootnode, `servant connect`; see [`Behaviour::manage`]) and every inbound one (the
//! dialer decided it wanted it, and it closes the connection when it stops wanting it).
//! A connection Kademlia opened for a lookup is not held: it closes once idle, unless
//! gossipsub takes the peer into a mesh. Without this distinction every node's first
//! lookups would leave it connected to most of the network.

use std::{
    collections::{HashSet, VecDeque},
    convert::Infallible,
    task::{Context, Poll, Waker},
};

use libp2p::{
    core::{transport::PortUse, upgrade::DeniedUpgrade, Endpoint},
    swarm::{
        handler::{ConnectionEvent, FullyNegotiatedInbound, FullyNegotiatedOutbound},
        ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
        NetworkBehaviour, NotifyHandler, SubstreamProtocol, THandler, THandlerInEvent,
        THandlerOutEvent, ToSwarm,
    },
    Multiaddr, PeerId,
};

/// The behaviour: one [`Handler`] per connection, nothing else.
#[derive(Debug, Default)]
pub struct Behaviour {
    /// Outbound connections dialed on purpose and not yet established. Bounded by
    /// the dials in flight: entries leave on establishment or on failure.
    managed: HashSet<ConnectionId>,
    /// Established connections to start holding open, bounded by the node's own
    /// decisions (one per duplicate closed).
    to_hold: VecDeque<(PeerId, ConnectionId)>,
    waker: Option<Waker>,
}

impl Behaviour {
    /// Marks the dial with this id as deliberate: its connection is held open.
    pub fn manage(&mut self, connection_id: ConnectionId) {
        self.managed.insert(connection_id);
    }

    /// Starts holding an established connection open (one that replaces a held
    /// connection the node closed as a duplicate).
    pub fn hold(&mut self, peer: PeerId, connection_id: ConnectionId) {
        self.to_hold.push_back((peer, connection_id));
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(Handler { keep_alive: true })
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(Handler {
            keep_alive: self.managed.remove(&connection_id),
        })
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if let FromSwarm::DialFailure(failure) = event {
            self.managed.remove(&failure.connection_id);
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        libp2p::core::util::unreachable(event)
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        if let Some((peer_id, id)) = self.to_hold.pop_front() {
            return Poll::Ready(ToSwarm::NotifyHandler {
                peer_id,
                handler: NotifyHandler::One(id),
                event: Hold,
            });
        }
        self.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// Tells a [`Handler`] to hold its connection open from now on.
#[derive(Debug)]
pub struct Hold;

/// A handler that speaks no protocol and asks for its connection to stay open, or
/// leaves that to the other protocols.
#[derive(Debug)]
pub struct Handler {
    keep_alive: bool,
}

impl ConnectionHandler for Handler {
    type FromBehaviour = Hold;
    type ToBehaviour = Infallible;
    type InboundProtocol = DeniedUpgrade;
    type OutboundProtocol = DeniedUpgrade;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = ();

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
        SubstreamProtocol::new(DeniedUpgrade, ())
    }

    fn connection_keep_alive(&self) -> bool {
        self.keep_alive
    }

    fn on_behaviour_event(&mut self, _: Self::FromBehaviour) {
        self.keep_alive = true;
    }

    fn poll(
        &mut self,
        _: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, (), Self::ToBehaviour>> {
        Poll::Pending
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol>,
    ) {
        // DeniedUpgrade never negotiates, so these carry uninhabited values.
        match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
                protocol, ..
            }) => libp2p::core::util::unreachable(protocol),
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound {
                protocol, ..
            }) => libp2p::core::util::unreachable(protocol),
            _ => {}
        }
    }
}
