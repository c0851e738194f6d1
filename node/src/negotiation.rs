//! Lazy protocol negotiation on outbound streams, and how a peer's refusal shows.
//!
//! Servant's swarm proposes the protocol of every stream it opens lazily
//! (multistream-select's `V1Lazy`, the optimistic negotiation go-libp2p does by
//! default): the proposal leaves with the stream's first message instead of a round
//! trip ahead of it. A request-response exchange (search, every file chunk), a
//! Kademlia request, a relay reservation or circuit and DCUtR's CONNECT through the
//! relay each cost one round trip less. The listening side, and so every other
//! implementation, sees the same bytes as before.
//!
//! The price: a peer that does not speak the protocol no longer refuses it before
//! the stream opens. The stream opens, the first message goes out, and the refusal
//! comes back where the answer would, as an I/O error on the first read that carries
//! multistream-select's [`NegotiationError::Failed`]. [`refused`] finds it, so code
//! that treats "the peer does not speak this" apart from "the exchange failed" (ping,
//! the AutoNAT probe) keeps doing so. Where a stream offers several versions (gossipsub),
//! all but the last are still proposed one round trip at a time.
//!
//! The one pitfall multistream-select documents for lazy dialers is nested
//! negotiation, where a refused proposal's data could be read as a second proposal;
//! Servant negotiates nothing inside a negotiated stream.

use std::{error::Error, io};

use libp2p::core::upgrade::{NegotiationError, Version};

/// The multistream-select version Servant's swarm uses for the streams it opens.
pub const OUTBOUND: Version = Version::V1Lazy;

/// Whether `error`, or an error it wraps, is the remote refusing the protocol the
/// stream was opened for (it supports none of the ones proposed).
pub fn refused(error: &(dyn Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if matches!(
            e.downcast_ref::<NegotiationError>(),
            Some(NegotiationError::Failed)
        ) {
            return true;
        }
        // An io::Error hides a custom payload from `source()`: look inside it.
        if let Some(inner) = e.downcast_ref::<io::Error>().and_then(io::Error::get_ref) {
            if refused(inner) {
                return true;
            }
        }
        next = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;
    use libp2p::{
        ping,
        swarm::{dummy, NetworkBehaviour, SwarmEvent},
        Swarm,
    };

    use super::*;

    /// A swarm on TCP that opens its streams as Servant's does.
    fn swarm_of<B: NetworkBehaviour>(make: impl FnOnce() -> B) -> Swarm<B> {
        crate::test_swarm::tcp(make, OUTBOUND)
    }

    #[test]
    fn other_failures_are_not_refusals() {
        assert!(refused(&io::Error::other(NegotiationError::Failed)));
        assert!(!refused(&io::Error::other("connection reset")));
        assert!(!refused(&io::Error::from(io::ErrorKind::UnexpectedEof)));
        let timeout = ping::Failure::Timeout;
        assert!(!refused(&timeout));
    }

    /// A real peer without ping: the lazy proposal goes out with the first ping, the
    /// peer answers "na", and the failure ping reports is recognised as a refusal.
    #[tokio::test]
    async fn a_peer_without_the_protocol_shows_as_refused() {
        let mut server = swarm_of(|| dummy::Behaviour);
        let mut client = swarm_of(|| {
            ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_millis(50)))
        });
        let addr = crate::test_swarm::listen(&mut server).await;
        tokio::spawn(async move {
            loop {
                server.select_next_some().await;
            }
        });
        client.dial(addr).expect("dial");
        let failure = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let SwarmEvent::Behaviour(ping::Event { result: Err(e), .. }) =
                    client.select_next_some().await
                {
                    return e;
                }
            }
        })
        .await
        .expect("a ping failure within 20 s");
        // Under V1 ping would have said Unsupported before any stream opened.
        assert!(
            matches!(failure, ping::Failure::Other { .. }),
            "{failure:?}"
        );
        assert!(refused(&failure), "{failure:?}");
    }
}
