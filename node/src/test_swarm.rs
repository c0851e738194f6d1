//! Swarms for unit tests: real TCP on loopback, noise and yamux.

use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use libp2p::{
    core::upgrade::Version,
    swarm::{NetworkBehaviour, SwarmEvent},
    Multiaddr, Swarm,
};

/// A swarm on TCP running the behaviour `make` builds, opening its streams with
/// multistream-select `version` (Servant's is [`crate::negotiation::OUTBOUND`]).
pub fn tcp<B: NetworkBehaviour>(
    make: impl FnOnce() -> B,
    version: Version,
) -> anyhow::Result<Swarm<B>> {
    Ok(libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            Default::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .context("tcp transport")?
        .with_behaviour(|_| make())
        .context("behaviour")?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(Duration::from_secs(60))
                .with_substream_upgrade_protocol_override(version)
        })
        .build())
}

/// Starts `swarm` listening on a loopback TCP port and returns the address.
pub async fn listen<B: NetworkBehaviour>(swarm: &mut Swarm<B>) -> anyhow::Result<Multiaddr> {
    swarm
        .listen_on("/ip4/127.0.0.1/tcp/0".parse()?)
        .context("listen on loopback")?;
    loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            return Ok(address);
        }
    }
}
