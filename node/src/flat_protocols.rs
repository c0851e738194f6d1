//! The node's inbound protocol names as one flat, cached list, so that the swarm's
//! check of them, made every time a connection's task runs, costs a fraction of what
//! the nested list costs.
//!
//! After every poll of a connection, libp2p-swarm (0.48) asks the connection's
//! handler for its protocols (`listen_protocol`) and compares every name with the
//! set it saw last (it hashes each into a map), to tell handlers when the set
//! changes. A derived behaviour's handler is a chain of pairwise selects, one level
//! per member: each name comes out of an iterator nested as deep as its behaviour's
//! place in the chain and is hashed through as many `Either` layers. For Servant's
//! sixteen behaviours and twelve protocols that check measured about 2.2 µs a poll
//! against 0.3 µs for the bare baseline's four behaviours and four protocols, on every
//! wake of every connection, and a hole punch wakes the connections of three nodes
//! a few hundred times in a few milliseconds. [`Flat`] wraps the whole behaviour: its
//! handler answers with the same protocols as a flat list of names it keeps, and
//! rebuilds the list only after something that can change it.
//!
//! A handler's protocols change only through the handler itself: a command from its
//! behaviour (Kademlia's mode, the relay's status, the streams accepted), a stream
//! event (gossipsub turning itself off), or one of its own polls that has something to
//! report. So the list is marked stale on each of those, and a poll that reports
//! nothing keeps it. Debug builds check the kept list against the handler's own on
//! every call, so a behaviour that breaks the rule fails the tests.

use std::{
    cell::RefCell,
    future::Ready,
    sync::Arc,
    task::{Context, Poll},
};

use futures::{future::Either, TryFutureExt};
use libp2p::{
    core::upgrade::{InboundUpgrade, UpgradeInfo},
    swarm::{
        handler::{
            ConnectionEvent, FullyNegotiatedInbound, InboundUpgradeSend, ListenUpgradeError,
            UpgradeInfoSend,
        },
        ConnectionHandler, ConnectionHandlerEvent, SubstreamProtocol,
    },
    Multiaddr, Stream,
};

use crate::wrapped::{Wrap, Wrapped};

/// A behaviour whose connection handlers list their inbound protocols flat; derefs
/// to the behaviour.
pub type Flat<B> = Wrapped<B, FlatList>;

/// The [`Wrap`] of [`Flat`]: every connection's handler, relayed or direct.
pub struct FlatList;

impl Wrap for FlatList {
    type Handler<H: ConnectionHandler> = FlatHandler<H>;

    fn wrap<H: ConnectionHandler>(handler: H, _: &Multiaddr) -> FlatHandler<H> {
        FlatHandler::new(handler)
    }
}

/// One inbound protocol's name, as the flat list hands it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Name(Arc<str>);

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// The names of a handler's inbound protocols, in its order.
type Names = Arc<[Name]>;

fn names_of<U: UpgradeInfoSend>(upgrade: &U) -> Names {
    upgrade
        .protocol_info()
        .map(|info| Name(Arc::from(info.as_ref())))
        .collect()
}

/// A handler whose inbound protocols are offered as a flat list it keeps.
pub struct FlatHandler<H> {
    inner: H,
    /// The names of `inner`'s inbound protocols as last read; `None` once something
    /// may have changed them. Filled by `listen_protocol`, which takes `&self`.
    names: RefCell<Option<Names>>,
}

impl<H> FlatHandler<H> {
    fn new(inner: H) -> Self {
        FlatHandler {
            inner,
            names: RefCell::new(None),
        }
    }

    fn stale(&mut self) {
        *self.names.get_mut() = None;
    }
}

impl<H: ConnectionHandler> ConnectionHandler for FlatHandler<H> {
    type FromBehaviour = H::FromBehaviour;
    type ToBehaviour = H::ToBehaviour;
    type InboundProtocol = FlatUpgrade<H::InboundProtocol>;
    type OutboundProtocol = H::OutboundProtocol;
    type InboundOpenInfo = H::InboundOpenInfo;
    type OutboundOpenInfo = H::OutboundOpenInfo;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, Self::InboundOpenInfo> {
        let protocol = self.inner.listen_protocol();
        let timeout = *protocol.timeout();
        let (upgrade, info) = protocol.into_upgrade();
        let kept = self.names.borrow().clone();
        let names = match kept {
            Some(names) => {
                debug_assert_eq!(
                    names,
                    names_of(&upgrade),
                    "a handler changed its inbound protocols without a call that marks \
                     the flat list stale"
                );
                names
            }
            None => {
                let names = names_of(&upgrade);
                *self.names.borrow_mut() = Some(names.clone());
                names
            }
        };
        SubstreamProtocol::new(
            FlatUpgrade {
                inner: upgrade,
                names,
            },
            info,
        )
        .with_timeout(timeout)
    }

    fn connection_keep_alive(&self) -> bool {
        self.inner.connection_keep_alive()
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<
        ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>,
    > {
        let event = self.inner.poll(cx);
        if event.is_ready() {
            self.stale();
        }
        event
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Option<Self::ToBehaviour>> {
        self.stale();
        self.inner.poll_close(cx)
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        self.stale();
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
        self.stale();
        let event = match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound { protocol, info }) => {
                ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound { protocol, info })
            }
            ConnectionEvent::ListenUpgradeError(ListenUpgradeError { info, error }) => {
                match error {
                    FlatError::Inner(error) => {
                        ConnectionEvent::ListenUpgradeError(ListenUpgradeError { info, error })
                    }
                    // Never seen unless a behaviour breaks the rule in the module docs.
                    FlatError::Unlisted(name) => {
                        tracing::debug!(
                            protocol = name.as_ref(),
                            "inbound stream for a protocol the handler no longer offers"
                        );
                        return;
                    }
                }
            }
            ConnectionEvent::FullyNegotiatedOutbound(e) => {
                ConnectionEvent::FullyNegotiatedOutbound(e)
            }
            ConnectionEvent::DialUpgradeError(e) => ConnectionEvent::DialUpgradeError(e),
            ConnectionEvent::AddressChange(e) => ConnectionEvent::AddressChange(e),
            ConnectionEvent::LocalProtocolsChange(e) => ConnectionEvent::LocalProtocolsChange(e),
            ConnectionEvent::RemoteProtocolsChange(e) => ConnectionEvent::RemoteProtocolsChange(e),
            // Every variant of libp2p-swarm 0.48 is handled above; a later one would
            // need its own arm here.
            _ => return,
        };
        self.inner.on_connection_event(event);
    }
}

/// The handler's inbound upgrade, offering the kept names; a negotiated stream goes
/// to the handler's own upgrade under the matching name.
pub struct FlatUpgrade<U> {
    inner: U,
    names: Names,
}

/// The kept names, one at a time.
pub struct NamesIter {
    names: Names,
    next: usize,
}

impl Iterator for NamesIter {
    type Item = Name;

    fn next(&mut self) -> Option<Name> {
        let name = self.names.get(self.next)?.clone();
        self.next += 1;
        Some(name)
    }
}

impl<U> UpgradeInfo for FlatUpgrade<U> {
    type Info = Name;
    type InfoIter = NamesIter;

    fn protocol_info(&self) -> NamesIter {
        NamesIter {
            names: self.names.clone(),
            next: 0,
        }
    }
}

/// Why a flat upgrade failed.
#[derive(Debug)]
pub enum FlatError<E> {
    /// The handler's own upgrade failed.
    Inner(E),
    /// The name was on the kept list but the handler no longer offers it.
    Unlisted(Name),
}

impl<E: std::fmt::Display> std::fmt::Display for FlatError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FlatError::Inner(e) => e.fmt(f),
            FlatError::Unlisted(name) => write!(f, "{} is no longer offered", name.as_ref()),
        }
    }
}

impl<E: std::error::Error> std::error::Error for FlatError<E> {}

type InnerFuture<U> = futures::future::MapErr<
    <U as InboundUpgradeSend>::Future,
    fn(<U as InboundUpgradeSend>::Error) -> FlatError<<U as InboundUpgradeSend>::Error>,
>;

impl<U: InboundUpgradeSend> InboundUpgrade<Stream> for FlatUpgrade<U> {
    type Output = U::Output;
    type Error = FlatError<U::Error>;
    type Future = Either<InnerFuture<U>, Ready<Result<U::Output, FlatError<U::Error>>>>;

    fn upgrade_inbound(self, stream: Stream, name: Name) -> Self::Future {
        // Once per inbound stream, not per poll: the nested list is fine here.
        let info = self
            .inner
            .protocol_info()
            .find(|info| info.as_ref() == name.as_ref());
        match info {
            Some(info) => Either::Left(
                self.inner
                    .upgrade_inbound(stream, info)
                    .map_err(FlatError::Inner as fn(_) -> _),
            ),
            None => Either::Right(std::future::ready(Err(FlatError::Unlisted(name)))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use either::Either;
    use libp2p::{
        core::upgrade::{DeniedUpgrade, ReadyUpgrade},
        StreamProtocol,
    };
    use std::convert::Infallible;

    const A: StreamProtocol = StreamProtocol::new("/servant/test/a");
    const B: StreamProtocol = StreamProtocol::new("/servant/test/b");

    /// Offers `A` or nothing, switched by a command from its behaviour.
    struct Switch(bool);

    impl ConnectionHandler for Switch {
        type FromBehaviour = bool;
        type ToBehaviour = Infallible;
        type InboundProtocol = Either<ReadyUpgrade<StreamProtocol>, DeniedUpgrade>;
        type OutboundProtocol = DeniedUpgrade;
        type InboundOpenInfo = ();
        type OutboundOpenInfo = Infallible;

        fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
            let upgrade = if self.0 {
                Either::Left(ReadyUpgrade::new(A))
            } else {
                Either::Right(DeniedUpgrade)
            };
            SubstreamProtocol::new(upgrade, ())
        }

        fn poll(
            &mut self,
            _: &mut Context<'_>,
        ) -> Poll<ConnectionHandlerEvent<DeniedUpgrade, Infallible, Infallible>> {
            Poll::Pending
        }

        fn on_behaviour_event(&mut self, on: bool) {
            self.0 = on;
        }

        fn on_connection_event(
            &mut self,
            _: ConnectionEvent<Self::InboundProtocol, DeniedUpgrade, (), Infallible>,
        ) {
        }
    }

    /// Always offers `B`.
    struct Fixed;

    impl ConnectionHandler for Fixed {
        type FromBehaviour = Infallible;
        type ToBehaviour = Infallible;
        type InboundProtocol = ReadyUpgrade<StreamProtocol>;
        type OutboundProtocol = DeniedUpgrade;
        type InboundOpenInfo = ();
        type OutboundOpenInfo = Infallible;

        fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
            SubstreamProtocol::new(ReadyUpgrade::new(B), ())
        }

        fn poll(
            &mut self,
            _: &mut Context<'_>,
        ) -> Poll<ConnectionHandlerEvent<DeniedUpgrade, Infallible, Infallible>> {
            Poll::Pending
        }

        fn on_behaviour_event(&mut self, never: Infallible) {
            match never {}
        }

        fn on_connection_event(
            &mut self,
            _: ConnectionEvent<Self::InboundProtocol, DeniedUpgrade, (), Infallible>,
        ) {
        }
    }

    fn offered<H: ConnectionHandler>(handler: &FlatHandler<H>) -> Vec<String> {
        UpgradeInfo::protocol_info(handler.listen_protocol().upgrade())
            .map(|name| name.as_ref().to_string())
            .collect()
    }

    #[test]
    fn the_flat_list_names_what_the_handlers_offer_and_follows_their_commands() {
        let mut handler = FlatHandler::new(Switch(true).select(Fixed));
        assert_eq!(offered(&handler), [A.to_string(), B.to_string()]);
        assert!(handler.names.borrow().is_some(), "the list is kept");

        // A poll with nothing to report keeps the list.
        let waker = futures::task::noop_waker();
        assert!(handler.poll(&mut Context::from_waker(&waker)).is_pending());
        assert!(handler.names.borrow().is_some());

        // A command may change the protocols: the list is read afresh.
        handler.on_behaviour_event(Either::Left(false));
        assert!(handler.names.borrow().is_none());
        assert_eq!(offered(&handler), [B.to_string()]);
        handler.on_behaviour_event(Either::Left(true));
        assert_eq!(offered(&handler), [A.to_string(), B.to_string()]);
    }
}
