//! Builds the Swarm: TCP (noise, yamux), QUIC, DNS and relayed connections
//! (circuit relay v2), with bandwidth metrics, around the node's [`Behaviour`].

use libp2p::{identity::Keypair, noise, tcp, yamux, Swarm};
use prometheus_client::registry::Registry;

use crate::{behaviour::Behaviour, config::Config, deny::DenyList};

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
    registry: &mut Registry,
) -> Result<Swarm<Behaviour>, SwarmError> {
    let builder = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| SwarmError::Tcp(e.to_string()))?
        .with_quic()
        .with_dns()
        .map_err(|e| SwarmError::Dns(e.to_string()))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| SwarmError::Tcp(e.to_string()))?
        .with_bandwidth_metrics(registry)
        .with_behaviour(|key, relay_client| {
            Behaviour::new(key, config, deny_list, relay_client, registry)
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        })
        .map_err(|e| SwarmError::Setup(e.to_string()))?;
    Ok(builder
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_TIMEOUT))
        .build())
}
