//! UPnP port mapping that proposes rather than asserts.
//!
//! libp2p's UPnP behaviour asks the gateway (a home router running an IGD) to forward
//! each listen port, and declares the mapped address confirmed outright. A router that
//! says yes is not proof of reachability (a second NAT upstream, a firewall, a router
//! that lies), and Servant's role follows its own verdict, so this wrapper turns that
//! confirmation into a candidate: the reachability prober then confirms the mapped
//! address by dial-backs like any other, and only then may the node become a super-peer.
//! A mapping that expires is still withdrawn at once.

use std::task::{Context, Poll};

use libp2p::{
    core::{transport::PortUse, Endpoint},
    swarm::{
        dummy, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler,
        THandlerInEvent, THandlerOutEvent, ToSwarm,
    },
    upnp, Multiaddr, PeerId,
};

pub use upnp::Event;

/// Port mapping through the local gateway, with mapped addresses as candidates.
pub struct Behaviour {
    inner: upnp::tokio::Behaviour,
}

impl Behaviour {
    /// Starts looking for a gateway on the local network (SSDP).
    pub fn new() -> Self {
        Behaviour {
            inner: upnp::tokio::Behaviour::default(),
        }
    }
}

impl Default for Behaviour {
    fn default() -> Self {
        Self::new()
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Event;

    fn handle_established_inbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        _peer: PeerId,
        _local_addr: &Multiaddr,
        _remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        _peer: PeerId,
        _addr: &Multiaddr,
        _role_override: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        self.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        _peer: PeerId,
        _connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<Event, THandlerInEvent<Self>>> {
        match self.inner.poll(cx) {
            Poll::Ready(ToSwarm::ExternalAddrConfirmed(addr)) => {
                Poll::Ready(ToSwarm::NewExternalAddrCandidate(addr))
            }
            other => other,
        }
    }
}
