//! Holding Servant's own protocols back on a fresh relayed connection, so DCUtR has
//! the connection and the relay to itself while it tries to go direct.
//!
//! A relayed connection is meant to be replaced: DCUtR starts on it at once, and the
//! node closes it as soon as the direct one is up. Without a hold, gossipsub, ping,
//! identify, Kademlia and the file protocols all open their streams on it in the same
//! milliseconds as DCUtR's CONNECT and SYNC, so every message of the hole punch waits
//! behind theirs at both peers and at the relay, and the relay's circuit (128 KiB under
//! the signaling profile) is spent on traffic that moves to the direct connection
//! anyway. [`Held`] wraps a behaviour so that, on a relayed connection, its handler's
//! outbound stream requests wait [`HOLD`] (inbound streams are never held: the other
//! end decides those). Where DCUtR cannot succeed (a symmetric NAT) the protocols start
//! on the relayed connection [`HOLD`] later than they would have.

use std::{
    collections::VecDeque,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use libp2p::{
    multiaddr::Protocol,
    swarm::{
        handler::ConnectionEvent, ConnectionHandler, ConnectionHandlerEvent, SubstreamProtocol,
    },
    Multiaddr,
};

use crate::wrapped::{Wrap, Wrapped};

/// How long outbound streams wait on a new relayed connection: a hole punch in the lab
/// takes about 5 ms; across the internet its first attempt is a few round trips.
pub const HOLD: Duration = Duration::from_millis(500);

/// Requests held per connection before the hold ends early: a handler asking for more
/// than this in half a second is busy enough that holding it longer would hurt.
const MAX_HELD: usize = 64;

fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}

/// A behaviour whose outbound streams wait [`HOLD`] on relayed connections; derefs to
/// the behaviour.
pub type Held<B> = Wrapped<B, HoldOnRelayed>;

/// The [`Wrap`] of [`Held`]: holds on relayed connections, passes direct ones through.
pub struct HoldOnRelayed;

impl Wrap for HoldOnRelayed {
    type Handler<H: ConnectionHandler> = HoldHandler<H>;

    fn wrap<H: ConnectionHandler>(handler: H, addr: &Multiaddr) -> HoldHandler<H> {
        HoldHandler::new(handler, is_relayed(addr))
    }
}

/// A handler whose outbound stream requests wait until its hold ends.
pub struct HoldHandler<H: ConnectionHandler> {
    inner: H,
    /// Running while the hold lasts; `None` once it ended (or on a direct connection).
    until: Option<Pin<Box<tokio::time::Sleep>>>,
    held: VecDeque<SubstreamProtocol<H::OutboundProtocol, H::OutboundOpenInfo>>,
}

impl<H: ConnectionHandler> HoldHandler<H> {
    fn new(inner: H, relayed: bool) -> Self {
        HoldHandler {
            inner,
            until: relayed.then(|| Box::pin(tokio::time::sleep(HOLD))),
            held: VecDeque::new(),
        }
    }
}

impl<H: ConnectionHandler> ConnectionHandler for HoldHandler<H> {
    type FromBehaviour = H::FromBehaviour;
    type ToBehaviour = H::ToBehaviour;
    type InboundProtocol = H::InboundProtocol;
    type OutboundProtocol = H::OutboundProtocol;
    type InboundOpenInfo = H::InboundOpenInfo;
    type OutboundOpenInfo = H::OutboundOpenInfo;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, Self::InboundOpenInfo> {
        self.inner.listen_protocol()
    }

    fn connection_keep_alive(&self) -> bool {
        // Held requests are work the handler still means to do.
        self.inner.connection_keep_alive() || !self.held.is_empty()
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<
        ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>,
    > {
        if let Some(until) = self.until.as_mut() {
            if until.as_mut().poll(cx).is_ready() {
                self.until = None;
            }
        }
        if self.until.is_none() {
            if let Some(protocol) = self.held.pop_front() {
                return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest { protocol });
            }
        }
        loop {
            match self.inner.poll(cx) {
                Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest { protocol })
                    if self.until.is_some() =>
                {
                    self.held.push_back(protocol);
                    if self.held.len() >= MAX_HELD {
                        // Released in order, from the top of the next polls.
                        self.until = None;
                        if let Some(protocol) = self.held.pop_front() {
                            return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                                protocol,
                            });
                        }
                    }
                }
                other => return other,
            }
        }
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Option<Self::ToBehaviour>> {
        self.inner.poll_close(cx)
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        self.inner.on_behaviour_event(event);
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<
            Self::InboundProtocol,
            Self::OutboundProtocol,
            Self::InboundOpenInfo,
            Self::OutboundOpenInfo,
        >,
    ) {
        self.inner.on_connection_event(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::{
        core::upgrade::{DeniedUpgrade, ReadyUpgrade},
        StreamProtocol,
    };

    /// Asks for `n` outbound streams at once, then nothing.
    struct Asks(usize);

    impl ConnectionHandler for Asks {
        type FromBehaviour = ();
        type ToBehaviour = ();
        type InboundProtocol = DeniedUpgrade;
        type OutboundProtocol = ReadyUpgrade<StreamProtocol>;
        type InboundOpenInfo = ();
        type OutboundOpenInfo = usize;

        fn listen_protocol(&self) -> SubstreamProtocol<DeniedUpgrade, ()> {
            SubstreamProtocol::new(DeniedUpgrade, ())
        }

        fn poll(
            &mut self,
            _: &mut Context<'_>,
        ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, usize, ()>> {
            if self.0 == 0 {
                return Poll::Pending;
            }
            self.0 -= 1;
            let protocol = ReadyUpgrade::new(StreamProtocol::new("/test/1"));
            Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                protocol: SubstreamProtocol::new(protocol, self.0),
            })
        }

        fn on_behaviour_event(&mut self, _: ()) {}

        fn on_connection_event(
            &mut self,
            _: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol, (), usize>,
        ) {
        }
    }

    /// The open-info numbers of the requests `handler` releases now, in order.
    fn released(handler: &mut HoldHandler<Asks>) -> Vec<usize> {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut out = Vec::new();
        while let Poll::Ready(event) = handler.poll(&mut cx) {
            if let ConnectionHandlerEvent::OutboundSubstreamRequest { protocol } = event {
                out.push(*protocol.info());
            }
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn a_relayed_connection_holds_outbound_streams_then_releases_them_in_order() {
        let mut handler = HoldHandler::new(Asks(3), true);
        assert!(released(&mut handler).is_empty());
        assert!(
            handler.connection_keep_alive(),
            "held work keeps the connection"
        );
        tokio::time::advance(HOLD - Duration::from_millis(1)).await;
        assert!(released(&mut handler).is_empty());
        tokio::time::advance(Duration::from_millis(2)).await;
        assert_eq!(released(&mut handler), vec![2, 1, 0]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_direct_connection_holds_nothing_and_a_flood_of_requests_ends_the_hold() {
        let mut direct = HoldHandler::new(Asks(2), false);
        assert_eq!(released(&mut direct), vec![1, 0]);
        let mut busy = HoldHandler::new(Asks(MAX_HELD + 5), true);
        let out = released(&mut busy);
        assert_eq!(out.len(), MAX_HELD + 5);
        assert!(out.windows(2).all(|w| w[0] > w[1]), "out of order: {out:?}");
    }
}
