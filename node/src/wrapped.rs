//! A behaviour passed through unchanged but for its connection handlers, each of
//! which a [`Wrap`] puts inside a handler of its own.
//!
//! Servant changes how some handlers behave without changing what their behaviours
//! decide: [`crate::flat_protocols`] keeps the inbound protocol names as one flat
//! list, [`crate::relayed_hold`] holds outbound streams back on relayed connections.
//! Both need the same forwarding of every other `NetworkBehaviour` call, which lives
//! here once.

use std::{
    marker::PhantomData,
    ops::{Deref, DerefMut},
    task::{Context, Poll},
};

use libp2p::{
    core::{transport::PortUse, Endpoint},
    swarm::{
        ConnectionDenied, ConnectionHandler, ConnectionId, FromSwarm, NetworkBehaviour, THandler,
        THandlerInEvent, THandlerOutEvent, ToSwarm,
    },
    Multiaddr, PeerId,
};

/// How a [`Wrapped`] behaviour turns its inner behaviour's handler into its own. The
/// wrapping handler carries the same events both ways, so the behaviour's own
/// decisions and events pass through untouched.
pub trait Wrap: 'static {
    /// The handler that wraps `H`.
    type Handler<H: ConnectionHandler>: ConnectionHandler<
        FromBehaviour = H::FromBehaviour,
        ToBehaviour = H::ToBehaviour,
    >;

    /// Wraps the handler of a new connection; `addr` is the address it was accepted
    /// on (inbound) or dialed at (outbound), which for a relayed connection carries
    /// `/p2p-circuit` either way.
    fn wrap<H: ConnectionHandler>(handler: H, addr: &Multiaddr) -> Self::Handler<H>;
}

/// `B` with its connection handlers wrapped by `W`; derefs to `B`.
pub struct Wrapped<B, W> {
    inner: B,
    wrap: PhantomData<fn() -> W>,
}

impl<B, W> Wrapped<B, W> {
    /// Wraps `inner`.
    pub fn new(inner: B) -> Self {
        Wrapped {
            inner,
            wrap: PhantomData,
        }
    }
}

impl<B, W> Deref for Wrapped<B, W> {
    type Target = B;
    fn deref(&self) -> &B {
        &self.inner
    }
}

impl<B, W> DerefMut for Wrapped<B, W> {
    fn deref_mut(&mut self) -> &mut B {
        &mut self.inner
    }
}

impl<B: NetworkBehaviour, W: Wrap> NetworkBehaviour for Wrapped<B, W> {
    type ConnectionHandler = W::Handler<THandler<B>>;
    type ToSwarm = B::ToSwarm;

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
        let handler = self.inner.handle_established_inbound_connection(
            connection_id,
            peer,
            local_addr,
            remote_addr,
        )?;
        Ok(W::wrap(handler, local_addr))
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
        Ok(W::wrap(handler, addr))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        self.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.inner
            .on_connection_handler_event(peer_id, connection_id, event);
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.inner.poll(cx)
    }
}
