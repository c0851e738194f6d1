//! The baseline of `nat`: plain rust-libp2p, nothing of Servant. A relay server, and
//! peers with the relay client, identify, ping and DCUtR, built the way rust-libp2p's
//! own relay-server and dcutr examples build them.
//!
//! One binary, three modes (this program re-executed in a lab namespace):
//! `relay` serves circuits; `listen` reserves on the relay and writes its circuit
//! address to a file; `dial` dials that address and writes the hole punch's outcome
//! (and the time from the relayed connection to the direct one) to a file.

use std::{
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use libp2p::{
    dcutr, identify, identity,
    multiaddr::Protocol,
    noise, ping, relay,
    swarm::{ConnectionId, NetworkBehaviour, SwarmEvent},
    tcp, yamux, Multiaddr, PeerId, Swarm,
};
use serde::{Deserialize, Serialize};

/// What the dialer reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    /// A direct connection replaced the relayed one.
    pub success: bool,
    /// Milliseconds from the relayed connection to the hole punch's outcome.
    pub ms: Option<f64>,
    /// Milliseconds from the relayed connection to the direct dial: the DCUtR
    /// exchange over the relay; the rest of `ms` is the direct handshake.
    #[serde(default)]
    pub dial_ms: Option<f64>,
    /// Which of the reporting peer's direct dials since the relayed connection made
    /// the direct connection (1 to 3: DCUtR's rounds, one dial from either side
    /// each); for a failure, how many dials it made.
    #[serde(default)]
    pub attempt: Option<u32>,
    /// Why it failed.
    pub error: Option<String>,
    /// When the reporting peer saw the outcome, in microseconds since the Unix epoch:
    /// with `ms` it places that peer's relayed connection on the wall clock, so both
    /// peers' reports of a trial can be put on one time line.
    #[serde(default)]
    pub at_us: Option<u64>,
}

impl Outcome {
    /// A trial that ended without a direct connection, with nothing measured.
    pub fn failed(error: String) -> Self {
        Outcome {
            success: false,
            ms: None,
            dial_ms: None,
            attempt: None,
            error: Some(error),
            at_us: None,
        }
    }
}

#[derive(NetworkBehaviour)]
struct Peer {
    relay_client: relay::client::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    dcutr: dcutr::Behaviour,
}

#[derive(NetworkBehaviour)]
struct Relay {
    relay: relay::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

fn identify_config(key: &identity::Keypair) -> identify::Config {
    identify::Config::new("/bench-nat/1.0.0".into(), key.public())
}

fn peer_swarm() -> Result<Swarm<Peer>> {
    Ok(libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_quic()
        .with_relay_client(noise::Config::new, yamux::Config::default)?
        .with_behaviour(|key, relay_client| Peer {
            relay_client,
            identify: identify::Behaviour::new(identify_config(key)),
            ping: ping::Behaviour::default(),
            dcutr: dcutr::Behaviour::new(key.public().to_peer_id()),
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build())
}

/// The relay: listens on `listen` (announced as its external address, as a public
/// relay is configured) and serves until killed.
pub async fn relay(listen: Multiaddr, id_file: &Path) -> Result<()> {
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_quic()
        .with_behaviour(|key| Relay {
            relay: relay::Behaviour::new(key.public().to_peer_id(), relay::Config::default()),
            identify: identify::Behaviour::new(identify_config(key)),
            ping: ping::Behaviour::default(),
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    swarm.listen_on(listen.clone())?;
    swarm.add_external_address(listen);
    std::fs::write(id_file, swarm.local_peer_id().to_string())?;
    loop {
        swarm.select_next_some().await;
    }
}

/// Waits for identify with the relay, so our observed address is known (DCUtR sends
/// it to the other side), as rust-libp2p's dcutr example does before reserving.
async fn wait_identify(swarm: &mut Swarm<Peer>) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let event = tokio::time::timeout_at(deadline, swarm.select_next_some())
            .await
            .context("no identify from the relay")?;
        if let SwarmEvent::Behaviour(PeerEvent::Identify(identify::Event::Received { .. })) = event
        {
            return Ok(());
        }
    }
}

/// What one peer sees of a hole punch: its relayed connection to the other peer, its
/// own direct dials of it, and DCUtR's outcome. Each peer measures from its own
/// relayed connection; `Outcome::at_us` puts both on the wall clock.
#[derive(Default)]
struct Watch {
    /// The other peer, once a relayed connection to it is up (known ahead at the dialer).
    peer: Option<PeerId>,
    relayed_at: Option<Instant>,
    dial_ms: Option<f64>,
    /// Our dials of the other peer once the relayed connection is up: DCUtR's, one a
    /// round.
    dials: Vec<ConnectionId>,
    /// When the relayed connection came up, in microseconds since the Unix epoch.
    relayed_unix_us: Option<u64>,
}

impl Watch {
    fn elapsed_ms(&self) -> Option<f64> {
        self.relayed_at.map(|t| t.elapsed().as_secs_f64() * 1000.0)
    }

    /// The outcome, when `event` decides it.
    fn on_event(&mut self, event: &SwarmEvent<PeerEvent>) -> Option<Outcome> {
        match event {
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } if endpoint.is_relayed() && self.peer.is_none_or(|p| p == *peer_id) => {
                self.peer = Some(*peer_id);
                self.relayed_at.get_or_insert_with(Instant::now);
                self.relayed_unix_us.get_or_insert_with(unix_us);
            }
            SwarmEvent::Dialing {
                peer_id: Some(peer),
                connection_id,
            } if self.peer == Some(*peer) && self.relayed_at.is_some() => {
                if self.dial_ms.is_none() {
                    self.dial_ms = self.elapsed_ms();
                }
                self.dials.push(*connection_id);
            }
            SwarmEvent::Behaviour(PeerEvent::Dcutr(e)) if Some(e.remote_peer_id) == self.peer => {
                return Some(match &e.result {
                    Ok(direct) => Outcome {
                        success: true,
                        ms: self.elapsed_ms(),
                        dial_ms: self.dial_ms,
                        attempt: self
                            .dials
                            .iter()
                            .position(|c| c == direct)
                            .and_then(|i| u32::try_from(i + 1).ok()),
                        error: None,
                        at_us: Some(unix_us()),
                    },
                    Err(err) => self.failure(err.to_string()),
                });
            }
            _ => {}
        }
        None
    }

    /// A failure with what was measured so far.
    fn failure(&self, error: String) -> Outcome {
        Outcome {
            ms: self.elapsed_ms(),
            dial_ms: self.dial_ms,
            attempt: u32::try_from(self.dials.len()).ok(),
            at_us: Some(unix_us()),
            ..Outcome::failed(error)
        }
    }
}

/// Microseconds since the Unix epoch.
fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Listens on `listen` and through the relay at `relay`; writes the circuit address
/// to `addr_file` once the relay accepted the reservation, and its side of the hole
/// punch to `outcome_file` once DCUtR decides it; runs until killed.
pub async fn listen(
    listen: Multiaddr,
    relay: Multiaddr,
    addr_file: &Path,
    outcome_file: Option<&Path>,
) -> Result<()> {
    let mut swarm = peer_swarm()?;
    swarm.listen_on(listen)?;
    swarm.dial(relay.clone())?;
    wait_identify(&mut swarm).await?;
    swarm.listen_on(relay.with(Protocol::P2pCircuit))?;
    let local = *swarm.local_peer_id();
    let mut watch = Watch::default();
    let mut reported = false;
    loop {
        let event = swarm.select_next_some().await;
        if let SwarmEvent::NewListenAddr { address, .. } = &event {
            if address.iter().any(|p| p == Protocol::P2pCircuit) {
                let full = address.clone().with_p2p(local).unwrap_or_else(|a| a);
                std::fs::write(addr_file, full.to_string())?;
            }
        }
        if let (Some(outcome), Some(path), false) = (watch.on_event(&event), outcome_file, reported)
        {
            std::fs::write(path, serde_json::to_vec(&outcome)?)?;
            reported = true;
        }
    }
}

/// Where the dialer notes when its relayed connection came up, ahead of its report:
/// DCUtR may report nothing on its side (the listener's dial won), and the bench need
/// not wait out [`crate::nat::OUTCOME_WAIT`] to learn where the trial started.
pub fn relayed_file(out: &Path) -> std::path::PathBuf {
    out.with_extension("relayed")
}

/// A report of nothing but the relayed connection's time, from [`relayed_file`]: no
/// outcome, so no success, but a place on the trial's time line.
pub fn relayed_only(at_us: u64) -> Outcome {
    Outcome {
        ms: Some(0.0),
        at_us: Some(at_us),
        ..Outcome::failed("the dialer had not reported".into())
    }
}

/// Dials `target` (a circuit address) and reports the hole punch to `out`.
pub async fn dial(
    listen: Multiaddr,
    relay: Multiaddr,
    target: Multiaddr,
    out: &Path,
) -> Result<()> {
    let mut swarm = peer_swarm()?;
    swarm.listen_on(listen)?;
    swarm.dial(relay)?;
    wait_identify(&mut swarm).await?;
    // The last /p2p is the target's (the first is the relay's).
    let mut watch = Watch {
        peer: target
            .iter()
            .filter_map(|p| match p {
                Protocol::P2p(peer) => Some(peer),
                _ => None,
            })
            .last(),
        ..Watch::default()
    };
    swarm.dial(target)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(crate::nat::OUTCOME_WAIT);
    let outcome = loop {
        let Ok(event) = tokio::time::timeout_at(deadline, swarm.select_next_some()).await else {
            break watch.failure(format!("no outcome within {} s", crate::nat::OUTCOME_WAIT));
        };
        let before = watch.relayed_unix_us;
        let outcome = watch.on_event(&event);
        if let (None, Some(at)) = (before, watch.relayed_unix_us) {
            std::fs::write(relayed_file(out), at.to_string())?;
        }
        if let Some(outcome) = outcome {
            break outcome;
        }
        if let SwarmEvent::OutgoingConnectionError { error, .. } = &event {
            if watch.relayed_at.is_none() {
                bail!("dial failed: {error}");
            }
        }
    };
    std::fs::write(out, serde_json::to_vec(&outcome)?)?;
    Ok(())
}
