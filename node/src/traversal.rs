//! NAT traversal in one place: the reachability verdict, the role it implies,
//! relay reservations for NATed peers, and hole-punch bookkeeping.
//!
//! The event loop hands every related event here, as it does file events to
//! `files`. This module decides; libp2p's relay, relay client and DCUtR behaviours
//! do the protocol work.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use libp2p::{
    core::transport::ListenerId,
    dcutr, identify, kad,
    multiaddr::Protocol,
    relay,
    swarm::{ConnectionId, Swarm},
    Multiaddr, PeerId,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::{
    behaviour::Behaviour,
    config::Config,
    metrics::{NatMetrics, ReasonLabel},
    reach::{self, verdict::Reachability, ProbeReport, Reach},
    relays::{Relays, ReservationView},
    role::{self, Role, RoleSetting},
};

/// Hole-punch outcomes kept for `servant doctor`.
const RECENT_HOLEPUNCHES: usize = 16;
/// Peers whose observation of our address is kept for `servant doctor`.
const MAX_OBSERVERS: usize = 32;
/// Direct dials remembered per relayed peer: DCUtR makes at most three per relayed
/// connection; the rest of the node rarely dials a peer it is already connected to.
const MAX_PUNCH_DIALS: usize = 8;

/// One address's evidence, for the API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CandidateView {
    /// The address.
    pub addr: String,
    /// Peers whose dial-back reached it this round.
    pub reached_by: Vec<String>,
    /// Peers that could not reach it this round, with their error.
    pub failed_from: Vec<(String, String)>,
    /// Confirmed reachable (this round or an earlier one).
    pub confirmed: bool,
}

/// A hole punch, for `servant doctor`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HolePunchView {
    /// The remote peer.
    pub peer: String,
    /// Whether a direct connection resulted.
    pub success: bool,
    /// The error when it failed.
    pub error: Option<String>,
    /// Milliseconds from the relayed connection to the outcome, when known.
    pub after_ms: Option<u64>,
    /// The same in microseconds: hole punches on a LAN take a few milliseconds, which
    /// whole milliseconds would round away.
    #[serde(default)]
    pub after_us: Option<u64>,
    /// Microseconds from the relayed connection to this node's direct dial: the
    /// DCUtR exchange over the relay; the rest, to `after_us`, is the direct
    /// connection's own handshake.
    #[serde(default)]
    pub dial_after_us: Option<u64>,
    /// Which of this node's direct dials of the peer since the relayed connection
    /// opened made the direct connection (DCUtR tries up to three rounds, each with
    /// one dial from either side); for a failure, how many dials this node made. DCUtR
    /// reports a success only on the side whose own dial made the connection; None when
    /// this node did not see that dial start.
    #[serde(default)]
    pub attempt: Option<u32>,
    /// Unix time of the outcome, in seconds.
    pub at: u64,
    /// The same in microseconds: with `after_us` it places the relayed connection on
    /// the wall clock, so both peers' reports of one hole punch can be put on one time
    /// line (the first direct connection either side saw).
    #[serde(default)]
    pub at_us: u64,
}

/// Reachability, role and relays, for `servant status`, `/v1/reach` and `doctor`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReachView {
    /// `public`, `private` or `unknown`.
    pub reachability: Reachability,
    /// Why.
    pub reason: String,
    /// `super`, `peer` or `undecided`.
    pub role: Role,
    /// What the operator asked for.
    pub role_setting: RoleSetting,
    /// Addresses confirmed reachable.
    pub confirmed_addrs: Vec<String>,
    /// Candidate addresses and the current round's evidence.
    pub candidates: Vec<CandidateView>,
    /// Relay reservations held (peers only).
    pub reservations: Vec<ReservationView>,
    /// Reservations this node's relay holds for others (super-peers).
    pub reservations_served: u64,
    /// Recent hole punches, newest last.
    pub holepunches: Vec<HolePunchView>,
    /// Probe rounds started.
    pub rounds: u64,
    /// What peers observed as our address (observer, address), most recent each:
    /// the same outside port for every observer means a cone NAT, different ports
    /// a symmetric one.
    #[serde(default)]
    pub observed: Vec<(String, String)>,
    /// UPnP: `off`, `searching`, `no gateway`, `gateway not public` or `mapped`.
    #[serde(default)]
    pub upnp: String,
    /// Ports the gateway forwards to us (local listen address, external address).
    #[serde(default)]
    pub upnp_mappings: Vec<(String, String)>,
}

/// A peer's direct dials while a relayed connection to it is open.
struct PunchDials {
    /// When the first started.
    first: Instant,
    /// Each dial's connection, in order.
    connections: Vec<ConnectionId>,
}

impl PunchDials {
    /// The round a hole punch's `result` came from, as this node counted it.
    fn attempt<E>(&self, result: &Result<ConnectionId, E>) -> Option<u32> {
        let n = match result {
            Ok(direct) => self.connections.iter().position(|c| c == direct)? + 1,
            Err(_) => self.connections.len(),
        };
        u32::try_from(n).ok()
    }
}

/// The NAT-traversal state of the node.
pub struct Traversal {
    reach: Reach,
    relays: Relays,
    setting: RoleSetting,
    first_node: bool,
    role: Option<Role>,
    metrics: NatMetrics,
    /// External addresses this module added, so it removes only its own.
    added_external: HashSet<Multiaddr>,
    /// Listen addresses announced on no evidence, while the node is a super-peer by
    /// decree (a first node, or `--role super`): a relay with no address to hand out
    /// refuses every reservation.
    assumed_external: HashSet<Multiaddr>,
    /// When each peer's relayed connection opened, to time the move to direct.
    relayed_since: HashMap<PeerId, Instant>,
    /// This node's dials of peers it has a relayed connection to: the hole punch's
    /// direct dials, to split its time between the relay and the handshake and to
    /// tell which round succeeded.
    punch_dials: HashMap<PeerId, PunchDials>,
    holepunches: VecDeque<HolePunchView>,
    /// Peers holding a reservation on our relay (at most the relay's 128).
    reserved_here: HashSet<PeerId>,
    /// Circuits this node's relay carries, per (source, destination): libp2p-relay can
    /// report one circuit closed twice, so a bare counter could drift below the truth.
    circuits_here: HashMap<(PeerId, PeerId), u32>,
    /// Each observer's last observation of our address, oldest first.
    observed: VecDeque<(PeerId, Multiaddr)>,
    /// What UPnP is doing (see [`ReachView::upnp`]).
    upnp: &'static str,
    /// Ports the gateway forwards to us: (local listen address, external address).
    upnp_mappings: Vec<(Multiaddr, Multiaddr)>,
}

impl Traversal {
    /// Starts probing; probe reports arrive on the returned receiver and go to
    /// [`Traversal::on_report`].
    pub fn new(
        swarm: &mut Swarm<Behaviour>,
        config: &Config,
        metrics: NatMetrics,
        first_node: bool,
    ) -> (Self, mpsc::UnboundedReceiver<ProbeReport>) {
        let control = swarm.behaviour().stream.new_control();
        let (reach, reports) = Reach::new(control, config.reach_probe_interval.get());
        let mut traversal = Traversal {
            reach,
            relays: Relays::default(),
            setting: config.role,
            first_node,
            role: None,
            metrics,
            added_external: HashSet::new(),
            assumed_external: HashSet::new(),
            relayed_since: HashMap::new(),
            punch_dials: HashMap::new(),
            holepunches: VecDeque::new(),
            reserved_here: HashSet::new(),
            circuits_here: HashMap::new(),
            observed: VecDeque::new(),
            upnp: if config.upnp { "searching" } else { "off" },
            upnp_mappings: Vec::new(),
        };
        for addr in &config.announce {
            traversal.reach.candidate(addr.clone());
        }
        traversal.apply_role(swarm);
        (traversal, reports)
    }

    /// The current role.
    pub fn role(&self) -> Role {
        self.role.unwrap_or(Role::Undecided)
    }

    /// Whether `peer` relays for us: its connections are left alone, since the
    /// reservation lives on one of them and we cannot tell which.
    pub fn is_relay(&self, peer: &PeerId) -> bool {
        self.relays.is_relay(peer)
    }

    /// Whether `peer` holds a reservation on our relay: the reservation lives on one
    /// of its connections, so closing that one would cost the peer its address.
    pub fn reserved_here(&self, peer: &PeerId) -> bool {
        self.reserved_here.contains(peer)
    }

    /// Our relays now, for the peer manager to protect.
    pub fn relays(&self) -> HashSet<PeerId> {
        self.relays.relays()
    }

    /// The current verdict.
    pub fn reachability(&self) -> Reachability {
        self.reach.verdict().status()
    }

    /// A peer identified itself.
    pub fn on_identify(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        info: &identify::Info,
        dialed: Option<Multiaddr>,
    ) {
        self.reach.identified(peer, &info.protocols);
        if !crate::addr::is_relayed(&info.observed_addr) {
            self.observed.retain(|(p, _)| *p != peer);
            if self.observed.len() >= MAX_OBSERVERS {
                self.observed.pop_front();
            }
            self.observed.push_back((peer, info.observed_addr.clone()));
        }
        self.relays.identified(
            swarm,
            peer,
            &info.protocols,
            info.listen_addrs.clone(),
            dialed,
        );
    }

    /// The swarm has a new guess at our public address: what a peer observed us
    /// dialing from, with the port translated to our listen port when the
    /// connection did not reuse it (identify does the translation).
    pub fn on_external_candidate(&mut self, addr: &Multiaddr) {
        if worth_probing(addr) {
            self.reach.candidate(addr.clone());
        }
    }

    /// What the UPnP port mapper did. A new mapping is already a candidate (see
    /// [`crate::upnp`]); this keeps what `doctor` and the metrics show.
    pub fn on_upnp(&mut self, event: crate::upnp::Event) {
        use crate::upnp::Event;
        match event {
            Event::NewExternalAddr {
                local_addr,
                external_addr,
            } => {
                tracing::info!(%local_addr, %external_addr, "UPnP: the gateway forwards a port to us; confirming it by dial-backs");
                self.upnp_mappings.retain(|(l, _)| *l != local_addr);
                self.upnp_mappings.push((local_addr, external_addr));
                self.upnp = "mapped";
            }
            Event::ExpiredExternalAddr {
                local_addr,
                external_addr,
            } => {
                tracing::warn!(%local_addr, %external_addr, "UPnP: the gateway stopped forwarding a port");
                self.upnp_mappings.retain(|(l, _)| *l != local_addr);
                if self.upnp_mappings.is_empty() {
                    self.upnp = "expired";
                }
            }
            Event::GatewayNotFound => {
                tracing::debug!("UPnP: no gateway answered on the local network");
                self.upnp = "no gateway";
            }
            Event::NonRoutableGateway => {
                tracing::info!("UPnP: the gateway's own address is not public (a NAT behind a NAT); not mapping");
                self.upnp = "gateway not public";
            }
        }
        self.metrics
            .upnp_mappings
            .set(i64::try_from(self.upnp_mappings.len()).unwrap_or(i64::MAX));
    }

    /// A listener reported an address.
    pub fn on_new_listen_addr(&mut self, listener: ListenerId, addr: &Multiaddr) {
        self.relays.on_new_listen_addr(listener, addr);
        if worth_probing(addr) {
            self.reach.candidate(addr.clone());
        }
    }

    /// A listener closed.
    pub fn on_listener_closed(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        listener: ListenerId,
        reason: &str,
    ) {
        if self.relays.on_listener_closed(swarm, listener, reason) {
            self.metrics
                .reservations_replaced
                .inner()
                .store(self.relays.replaced, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// A connection opened; the peer has `count` connections now.
    pub fn on_established(&mut self, peer: PeerId, addr: &Multiaddr, count: u32) {
        self.reach.connections(peer, count);
        if crate::addr::is_relayed(addr) {
            self.relayed_since.entry(peer).or_insert_with(Instant::now);
        }
    }

    /// A connection closed; `remaining` connections to the peer are left.
    pub fn on_closed(&mut self, peer: PeerId, remaining: u32) {
        self.reach.connections(peer, remaining);
        if remaining == 0 {
            self.relays.disconnected(&peer);
            self.relayed_since.remove(&peer);
            self.punch_dials.remove(&peer);
        }
    }

    /// This node started dialing `peer` on `connection`.
    pub fn on_dialing(&mut self, peer: PeerId, connection: ConnectionId) {
        if self.relayed_since.contains_key(&peer) {
            let dials = self.punch_dials.entry(peer).or_insert_with(|| PunchDials {
                first: Instant::now(),
                connections: Vec::new(),
            });
            if dials.connections.len() < MAX_PUNCH_DIALS {
                dials.connections.push(connection);
            }
        }
    }

    /// A ping answered.
    pub fn on_rtt(&mut self, peer: PeerId, rtt: Duration) {
        self.relays.rtt(peer, rtt);
    }

    /// Our AutoNAT server's events.
    pub fn on_autonat(&mut self, event: reach::server::Event) {
        let reason = match event {
            reach::server::Event::Served(e) if e.result.is_ok() => "ok",
            reach::server::Event::Served(_) => "error",
            reach::server::Event::Throttled { .. } => "throttled",
        };
        self.metrics
            .dial_backs_served
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Our relay server's events.
    pub fn on_relay(&mut self, event: relay::Event) {
        match event {
            relay::Event::ReservationReqAccepted {
                renewed: false,
                src_peer_id,
                ..
            } => {
                tracing::debug!(peer = %src_peer_id, "relay reservation served");
                self.reserved_here.insert(src_peer_id);
            }
            relay::Event::ReservationClosed { src_peer_id }
            | relay::Event::ReservationTimedOut { src_peer_id } => {
                self.reserved_here.remove(&src_peer_id);
            }
            relay::Event::ReservationReqDenied { .. } => {
                self.metrics
                    .relay_denied
                    .get_or_create(&ReasonLabel {
                        reason: "reservation",
                    })
                    .inc();
            }
            relay::Event::CircuitReqDenied { .. } => {
                self.metrics
                    .relay_denied
                    .get_or_create(&ReasonLabel { reason: "circuit" })
                    .inc();
            }
            relay::Event::CircuitReqAccepted {
                src_peer_id,
                dst_peer_id,
            } => {
                *self
                    .circuits_here
                    .entry((src_peer_id, dst_peer_id))
                    .or_default() += 1;
            }
            relay::Event::CircuitClosed {
                src_peer_id,
                dst_peer_id,
                ..
            } => {
                let pair = (src_peer_id, dst_peer_id);
                if let Some(n) = self.circuits_here.get_mut(&pair) {
                    *n -= 1;
                    if *n == 0 {
                        self.circuits_here.remove(&pair);
                    }
                }
            }
            _ => {}
        }
        self.metrics
            .reservations_served
            .set(self.reserved_here.len() as i64);
        self.metrics
            .circuits_served
            .set(self.circuits_here.values().map(|n| i64::from(*n)).sum());
    }

    /// Our relay client's events.
    pub fn on_relay_client(&mut self, event: relay::client::Event) {
        self.relays.on_client_event(&event);
        self.metrics
            .reservations_held
            .set(self.relays.accepted() as i64);
    }

    /// A hole punch ended.
    pub fn on_dcutr(&mut self, event: dcutr::Event) {
        let peer = event.remote_peer_id;
        self.metrics.holepunch_attempts.inc();
        let since = self.relayed_since.get(&peer).copied();
        let after = since.map(|t| t.elapsed());
        let dials = self.punch_dials.remove(&peer);
        let dial_after = dials
            .as_ref()
            .zip(since)
            .map(|(dials, since)| dials.first.saturating_duration_since(since));
        let attempt = dials.and_then(|dials| dials.attempt(&event.result));
        let (success, error) = match &event.result {
            Ok(_) => (true, None),
            Err(e) => (false, Some(e.to_string())),
        };
        if success {
            if let Some(after) = after {
                self.metrics.time_to_direct.observe(after.as_secs_f64());
            }
            tracing::info!(%peer, after_ms = after.map(|a| a.as_millis() as u64), "hole punch succeeded: direct connection");
        } else {
            tracing::info!(%peer, error = error.as_deref().unwrap_or(""), "hole punch failed");
        }
        self.metrics
            .holepunch_results
            .get_or_create(&ReasonLabel {
                reason: if success { "direct" } else { "failed" },
            })
            .inc();
        if self.holepunches.len() >= RECENT_HOLEPUNCHES {
            self.holepunches.pop_front();
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.holepunches.push_back(HolePunchView {
            peer: peer.to_string(),
            success,
            error,
            after_ms: after.map(|a| a.as_millis() as u64),
            after_us: after.map(|a| a.as_micros() as u64),
            dial_after_us: dial_after.map(|a| a.as_micros() as u64),
            attempt,
            at: now.as_secs(),
            at_us: now.as_micros() as u64,
        });
    }

    /// A probe ended.
    pub fn on_report(&mut self, swarm: &mut Swarm<Behaviour>, report: ProbeReport) {
        let change = self.reach.on_report(report);
        for outcome in self.reach.outcomes.drain(..) {
            self.metrics
                .probes
                .get_or_create(&ReasonLabel { reason: outcome })
                .inc();
        }
        self.sync_external(swarm);
        if let Some(change) = change {
            tracing::info!(
                from = change.from.as_str(),
                to = change.to.as_str(),
                reason = %change.reason,
                "reachability changed"
            );
            self.apply_role(swarm);
        }
    }

    /// Periodic work.
    pub fn tick(&mut self, swarm: &mut Swarm<Behaviour>, now: Instant) {
        self.reach.tick(now);
        self.relays.tick(swarm, now);
        self.metrics
            .reservations_held
            .set(self.relays.accepted() as i64);
    }

    /// Announces confirmed addresses and withdraws refuted ones.
    fn sync_external(&mut self, swarm: &mut Swarm<Behaviour>) {
        let confirmed: HashSet<Multiaddr> = self.reach.verdict().confirmed().cloned().collect();
        for addr in &confirmed {
            if self.added_external.insert(addr.clone()) {
                tracing::info!(%addr, "address confirmed reachable; announcing it");
                swarm.add_external_address(addr.clone());
            }
        }
        let gone: Vec<Multiaddr> = self
            .added_external
            .iter()
            .filter(|a| !confirmed.contains(*a))
            .cloned()
            .collect();
        for addr in gone {
            tracing::info!(%addr, "address no longer reachable; withdrawing it");
            swarm.remove_external_address(&addr);
            self.added_external.remove(&addr);
        }
    }

    /// Puts the role the setting and the verdict call for into effect.
    fn apply_role(&mut self, swarm: &mut Swarm<Behaviour>) {
        let verdict = self.reach.verdict().status();
        let role = role::decide(self.setting, verdict, self.first_node);
        self.metrics.set_state(verdict.as_str(), role.as_str());
        if self.role == Some(role) {
            return;
        }
        let from = self.role.map_or("none", Role::as_str);
        tracing::info!(
            from,
            to = role.as_str(),
            reachability = verdict.as_str(),
            "role changed"
        );
        self.role = Some(role);
        let behaviour = swarm.behaviour_mut();
        behaviour.kad.set_mode(Some(match role {
            Role::Peer => kad::Mode::Client,
            Role::Super | Role::Undecided => kad::Mode::Server,
        }));
        behaviour.relay.set_status(Some(match role {
            Role::Super => relay::Status::Enable,
            Role::Peer | Role::Undecided => relay::Status::Disable,
        }));
        self.relays.set_active(swarm, role == Role::Peer);
        if role == Role::Super && self.added_external.is_empty() {
            let mut listening: Vec<Multiaddr> = swarm
                .listeners()
                .filter(|a| worth_probing(a) && !crate::addr::is_link_local(a))
                .cloned()
                .collect();
            // Loopback is announced only by a node that has nothing else (a test on one
            // machine): to anyone else it names their own host.
            let is_loopback =
                |a: &Multiaddr| crate::addr::ip_of(a).is_some_and(|ip| ip.is_loopback());
            if listening.iter().any(|a| !is_loopback(a)) {
                listening.retain(|a| !is_loopback(a));
            }
            for addr in listening {
                if self.assumed_external.insert(addr.clone()) {
                    swarm.add_external_address(addr);
                }
            }
        } else if role != Role::Super {
            for addr in self.assumed_external.drain() {
                if !self.added_external.contains(&addr) {
                    swarm.remove_external_address(&addr);
                }
            }
        }
    }

    /// Everything, for the API.
    pub fn view(&self) -> ReachView {
        let verdict = self.reach.verdict();
        ReachView {
            reachability: verdict.status(),
            reason: verdict.reason().to_string(),
            role: self.role(),
            role_setting: self.setting,
            confirmed_addrs: verdict.confirmed().map(|a| a.to_string()).collect(),
            candidates: verdict
                .evidence()
                .map(|(addr, e)| CandidateView {
                    addr: addr.to_string(),
                    reached_by: e.reached_by.iter().cloned().collect(),
                    failed_from: e
                        .failed_from
                        .iter()
                        .map(|(p, err)| (p.clone(), err.clone()))
                        .collect(),
                    confirmed: e.confirmed,
                })
                .collect(),
            reservations: self.relays.views(),
            reservations_served: self.reserved_here.len() as u64,
            holepunches: self.holepunches.iter().cloned().collect(),
            rounds: verdict.round(),
            observed: self
                .observed
                .iter()
                .map(|(p, a)| (p.to_string(), a.to_string()))
                .collect(),
            upnp: self.upnp.to_string(),
            upnp_mappings: self
                .upnp_mappings
                .iter()
                .map(|(l, e)| (l.to_string(), e.to_string()))
                .collect(),
        }
    }
}

/// Whether an address is worth asking others to dial: not a relayed one, not an
/// unspecified one.
fn worth_probing(addr: &Multiaddr) -> bool {
    !crate::addr::is_relayed(addr)
        && crate::addr::is_dialable(addr)
        && !addr.iter().any(|p| {
            matches!(
                p,
                Protocol::Dns(_) | Protocol::Dns4(_) | Protocol::Dns6(_) | Protocol::Dnsaddr(_)
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attempt_is_the_dial_that_made_the_connection_or_the_dials_made() {
        let ids = [
            ConnectionId::new_unchecked(11),
            ConnectionId::new_unchecked(12),
            ConnectionId::new_unchecked(13),
        ];
        let dials = PunchDials {
            first: Instant::now(),
            connections: ids[..2].to_vec(),
        };
        assert_eq!(dials.attempt::<()>(&Ok(ids[0])), Some(1));
        assert_eq!(dials.attempt::<()>(&Ok(ids[1])), Some(2));
        // The other side's dial made it: not one of ours.
        assert_eq!(dials.attempt::<()>(&Ok(ids[2])), None);
        assert_eq!(dials.attempt(&Err(())), Some(2));
    }
}
