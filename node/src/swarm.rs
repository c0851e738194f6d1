//! Builds the Swarm: TCP (noise, yamux), QUIC, DNS and relayed connections
//! (circuit relay v2), with bandwidth metrics, around the node's [`Behaviour`]. In a
//! private network every TCP connection first proves the pre-shared key (libp2p pnet).

use std::sync::Arc;

use either::Either;
use libp2p::{
    core::{
        muxing::StreamMuxerBox,
        transport::{upgrade, Boxed, OptionalTransport},
    },
    identity::Keypair,
    noise,
    pnet::{PnetConfig, PreSharedKey},
    quic, tcp, yamux, PeerId, Swarm, Transport,
};
use prometheus_client::registry::Registry;

use crate::{
    behaviour::{Behaviour, Protocols},
    config::Config,
    deny::DenyList,
    flat_protocols::Flat,
    relay_throttle::RelayThrottle,
    stream_count::{self, StreamGauge},
};

/// Why the swarm could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SwarmError {
    /// The TCP transport or its noise upgrade could not be set up.
    #[error("cannot set up the TCP transport: {0}")]
    Tcp(String),
    /// The system's DNS configuration could not be read.
    #[error("cannot set up DNS resolution (is /etc/resolv.conf readable?): {0}")]
    Dns(String),
    /// A protocol refused its configuration.
    #[error("{0}")]
    Setup(String),
}

/// How long a connection no protocol uses stays open. Established connections are
/// kept open by [`crate::keep_alive`] until the peer manager trims them, so this only
/// bounds connections that never completed their setup.
const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Builds the swarm; the caller starts its listeners.
pub fn build(
    key: Keypair,
    config: &Config,
    deny_list: DenyList,
    throttle: Option<Arc<RelayThrottle>>,
    streams: StreamGauge,
    registry: &mut Registry,
) -> Result<Swarm<Behaviour>, SwarmError> {
    let psk = match &config.psk_file {
        Some(path) => {
            Some(crate::config::read_psk(path).map_err(|e| SwarmError::Setup(e.to_string()))?)
        }
        None => None,
    };
    let builder = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(|key| {
            transport(key, psk, throttle, streams.clone())
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        })
        .map_err(|e| SwarmError::Tcp(e.to_string()))?
        .with_dns()
        .map_err(|e| SwarmError::Dns(e.to_string()))?
        .with_relay_client(noise::Config::new, {
            let streams = streams.clone();
            move || stream_count::CountedYamux::new(streams)
        })
        .map_err(|e| SwarmError::Tcp(e.to_string()))?
        .with_bandwidth_metrics(registry)
        .with_behaviour(|key, relay_client| {
            Protocols::new(key, config, deny_list, relay_client, registry)
                .map(Flat::new)
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        })
        .map_err(|e| SwarmError::Setup(e.to_string()))?;
    Ok(builder
        .with_swarm_config(|c| {
            // One round trip less on every stream this node opens (see `negotiation`).
            c.with_idle_connection_timeout(IDLE_TIMEOUT)
                .with_substream_upgrade_protocol_override(crate::negotiation::OUTBOUND)
        })
        .build())
}

/// TCP (noise, yamux) and QUIC; in a private network (`psk`), TCP behind the
/// pre-shared key's handshake and no QUIC, which has no place for it. With a relay
/// `throttle`, every connection's reads go through its peer's gate. Every stream is
/// counted in `streams`.
fn transport(
    key: &Keypair,
    psk: Option<PreSharedKey>,
    throttle: Option<Arc<RelayThrottle>>,
    streams: StreamGauge,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, noise::Error> {
    let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
    let tcp = match psk {
        Some(psk) => {
            Either::Left(tcp.and_then(move |socket, _| PnetConfig::new(psk).handshake(socket)))
        }
        None => Either::Right(tcp),
    };
    let tcp = tcp
        .upgrade(upgrade::Version::V1Lazy)
        .authenticate(noise::Config::new(key)?)
        .multiplex(yamux::Config::default())
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)));
    let quic = quic::tokio::Transport::new(quic::Config::new(key))
        .map(|(peer, conn), _| (peer, StreamMuxerBox::new(conn)));
    let quic = match psk {
        Some(_) => OptionalTransport::none(),
        None => OptionalTransport::some(quic),
    };
    Ok(quic
        .or_transport(tcp)
        .map(move |either, _| {
            let (peer, muxer) = either.into_inner();
            let gate = throttle.as_ref().map(|t| t.gate(peer));
            (peer, stream_count::wrap(muxer, streams.clone(), gate))
        })
        .boxed())
}
