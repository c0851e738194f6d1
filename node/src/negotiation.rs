//! Lazy protocol negotiation on outbound streams, and how a peer's refusal shows.
//!
//! Servant's swarm proposes the protocol of every stream it opens lazily
//! (multistream-select's `V1Lazy`): the proposal leaves with the stream's first
//! message instead of a round trip ahead of it. A request-response exchange (search,
//! every file chunk), a Kademlia request, a relay reservation or circuit and DCUtR's
//! CONNECT through the relay each cost one round trip less. go-libp2p does the same for
//! protocols identify has told it the peer speaks; Servant does it for every stream
//! and deals with refusals where they land. A listener that accepts sees the same bytes
//! as under eager negotiation.
//!
//! The price: a peer that does not speak the protocol no longer refuses it before
//! the stream opens. The stream opens, the first message goes out (the peer reads it
//! as a second proposal and fails the negotiation), and the refusal comes back where
//! the answer would, as an I/O error on the first read that carries
//! multistream-select's [`NegotiationError::Failed`]; [`refused`] finds it. Some
//! implementations reset a refused stream instead, and on QUIC a reset can overtake
//! the refusal, so callers that must not misread a refusal also check what the
//! peer's identify lists (ping in the event loop, AutoNAT servers chosen by it). A stream that
//! only writes (a Kademlia ADD_PROVIDER, an identify push) never learns of a refusal; a
//! refused stream must be dropped, not used again (multistream-select panics on
//! further I/O). Where a stream offers several versions (gossipsub), all but the last
//! are still proposed one round trip at a time, and Kademlia's routing table, which
//! takes a stream opened as proof of support, is corrected by identify (`on_identify`).
//!
//! The pitfall multistream-select documents for lazy dialers is a nested negotiation
//! whose inner proposal follows an unconfirmed outer one. Servant's one nesting, a
//! relayed connection's noise and yamux inside a relay HOP or STOP stream, waits for
//! the relay's status reply before the inner negotiation starts.

use std::error::Error;

use libp2p::core::upgrade::{NegotiationError, Version};

/// The multistream-select version Servant's swarm uses for the streams it opens.
pub const OUTBOUND: Version = Version::V1Lazy;

/// Whether `error`, or an error it wraps, is the remote refusing the protocol the
/// stream was opened for (it supports none of the ones proposed). Errors that keep
/// their cause out of `source()` must be unwrapped first: for a request-response
/// `OutboundFailure::Io(e)`, pass `e`.
pub fn refused(error: &(dyn Error + 'static)) -> bool {
    crate::error_chain::causes(error).iter().any(|e| {
        matches!(
            e.downcast_ref::<NegotiationError>(),
            Some(NegotiationError::Failed)
        )
    })
}

#[cfg(test)]
mod tests {
    use std::{io, time::Duration};

    use anyhow::Context;
    use futures::StreamExt;
    use libp2p::{
        ping,
        swarm::{dummy, SwarmEvent},
    };

    use super::*;
    use crate::test_swarm;

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
    async fn a_peer_without_the_protocol_shows_as_refused() -> anyhow::Result<()> {
        // Both as Servant's swarm opens streams: lazily.
        let mut server = test_swarm::tcp(|| dummy::Behaviour, OUTBOUND)?;
        let mut client = test_swarm::tcp(
            || ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_millis(50))),
            OUTBOUND,
        )?;
        let addr = test_swarm::listen(&mut server).await?;
        tokio::spawn(async move {
            loop {
                server.select_next_some().await;
            }
        });
        client.dial(addr)?;
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
        .context("no ping failure within 20 s")?;
        // Under V1 ping would have said Unsupported before any stream opened.
        assert!(
            matches!(failure, ping::Failure::Other { .. }),
            "{failure:?}"
        );
        assert!(refused(&failure), "{failure:?}");
        Ok(())
    }
}
