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
//!
//! The handler also wakes a connection on a timer when told to ([`Behaviour::nudge`]):
//! a connection left after another to the same peer closed can have protocol handlers
//! that only wake for work once they have a stream (gossipsub's), and the timer makes
//! them look at their queues. It costs a poll of the connection's handlers five times
//! a second, on those connections only. See [`crate::duplicates`].

use std::{
    collections::{HashSet, VecDeque},
    convert::Infallible,
    task::{Context, Poll, Waker},
    time::Duration,
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
    /// Commands for established connections, bounded by the node's own decisions
    /// (one per connection kept after a duplicate or a sibling connection closed).
    to_send: VecDeque<(PeerId, ConnectionId, Command)>,
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
        self.send(peer, connection_id, Command::Hold);
    }

    /// Wakes an established connection every [`NUDGE_INTERVAL`] from now on.
    pub fn nudge(&mut self, peer: PeerId, connection_id: ConnectionId) {
        self.send(peer, connection_id, Command::Nudge);
    }

    fn send(&mut self, peer: PeerId, connection_id: ConnectionId, command: Command) {
        self.to_send.push_back((peer, connection_id, command));
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
        Ok(Handler {
            keep_alive: true,
            nudge: None,
        })
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
            nudge: None,
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
        if let Some((peer_id, id, event)) = self.to_send.pop_front() {
            return Poll::Ready(ToSwarm::NotifyHandler {
                peer_id,
                handler: NotifyHandler::One(id),
                event,
            });
        }
        self.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// How often a nudged connection is woken: well inside gossipsub's shortest queue
/// deadline (forwarded messages, 1 s by default).
pub const NUDGE_INTERVAL: Duration = Duration::from_millis(200);

/// What the behaviour tells a [`Handler`].
#[derive(Debug)]
pub enum Command {
    /// Hold the connection open from now on.
    Hold,
    /// Wake the connection every [`NUDGE_INTERVAL`] from now on.
    Nudge,
}

/// A handler that speaks no protocol and asks for its connection to stay open, or
/// leaves that to the other protocols.
#[derive(Debug)]
pub struct Handler {
    keep_alive: bool,
    nudge: Option<tokio::time::Interval>,
}

impl ConnectionHandler for Handler {
    type FromBehaviour = Command;
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

    fn on_behaviour_event(&mut self, command: Self::FromBehaviour) {
        match command {
            Command::Hold => self.keep_alive = true,
            Command::Nudge => {
                let mut interval = tokio::time::interval(NUDGE_INTERVAL);
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                self.nudge = Some(interval);
            }
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, (), Self::ToBehaviour>> {
        // Each tick wakes the connection's task, which polls every protocol's handler
        // on it; this one has nothing to report.
        if let Some(interval) = self.nudge.as_mut() {
            while interval.poll_tick(cx).is_ready() {}
        }
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
