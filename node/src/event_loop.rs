//! The event loop: the one task that owns the Swarm.
//!
//! It races swarm events, commands from [`Client`](crate::client::Client)s, timers and
//! the shutdown signal. Each protocol's events go through a handler of their own, so
//! `on_swarm_event` reads like a table of contents. Nothing in here blocks: file writes
//! are small (known peers, bans) and happen on timers or on operator commands.

use std::{
    collections::HashMap,
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt;
use libp2p::metrics::Recorder;
use libp2p::{
    connection_limits,
    core::transport::ListenerId,
    core::ConnectedPoint,
    gossipsub, identify, kad,
    multiaddr::Protocol,
    ping,
    swarm::{
        dial_opts::{DialOpts, PeerCondition},
        ConnectionId, DialError, ListenError, SwarmEvent,
    },
    Multiaddr, PeerId, Swarm,
};
use rand::seq::SliceRandom;
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    behaviour::{Behaviour, BehaviourEvent, KAD_PROTOCOL},
    broadcast::Broadcast,
    client::{
        BanOutcome, BanView, BootnodeView, Command, CommandError, ConnectOutcome, ConnectTarget,
        PeerView, Status, TopicView,
    },
    config::Config,
    datadir::DataDir,
    deny::{self, BanTarget},
    files::{Files, Served},
    known_peers::{KnownPeers, Persister},
    metrics::{ConnectionLabel, DialLabel, Metrics, ReasonLabel, RejectLabel, TopicLabel},
    peer_manager::{Candidate, PeerManager, Source},
    reach::ProbeReport,
    store::Store,
    traversal::Traversal,
};

/// How often the watermarks are checked and gauges refreshed.
const TICK: Duration = Duration::from_secs(2);
/// How often dropped log lines are summed up in one warning.
const LOG_REPORT_INTERVAL: Duration = Duration::from_secs(60);
/// Known peers are written at most this often while they change (and at shutdown),
/// so a node killed without warning still finds its network at the next start.
const SAVE_INTERVAL: Duration = Duration::from_secs(10);
/// Most peers remembered as wanted (see `EventLoop::wanted`); bounded by the dial
/// budget in practice, capped in case dials keep being pre-empted.
const MAX_WANTED: usize = 256;
/// Addresses taken from one identify message; the rest are ignored.
const MAX_ADDRS_PER_PEER: usize = 8;
/// A second connection to a peer is judged a duplicate only once it has lived this
/// long: one the remote is about to refuse (it dialed another PeerId at this
/// address, say) must not cost us the working connection.
const DUPLICATE_GRACE: Duration = Duration::from_secs(2);
/// How long shutdown waits for connections to close before giving up on them.
const CLOSE_GRACE: Duration = Duration::from_millis(1500);

/// What `/livez` and `/readyz` read, published by the loop on every tick.
#[derive(Debug, Clone)]
pub struct Health {
    /// When the loop last ran its tick; a stale value means the loop is stuck.
    pub last_tick: Instant,
    /// Whether the node is ready to serve (see [`EventLoop::is_ready`]).
    pub ready: bool,
    /// Why not, when not ready.
    pub not_ready_reason: Option<String>,
    /// What an operator should know while the node serves: connection limits turning
    /// peers away, for one.
    pub warnings: Vec<String>,
}

struct ConnInfo {
    addr: Multiaddr,
    outbound: bool,
    /// Dialed on purpose (peer manager, bootnode, API), not by a DHT lookup.
    chosen: bool,
    since: Instant,
    /// When a ping last came back on this connection.
    alive: Option<Instant>,
    /// A ping went unanswered on it: the far end is gone (or restarted).
    dead: bool,
}

struct PeerState {
    connections: HashMap<ConnectionId, ConnInfo>,
    since_unix: u64,
    since: Instant,
    agent: Option<String>,
    protocol_version: Option<String>,
    rtt: Option<Duration>,
    /// Whether its identify lists ping (None until it arrives): a peer that does not
    /// speak ping is not closed for failed pings (see `on_ping`).
    pings: Option<bool>,
}

/// The loop's state; built by [`crate::node`], then driven by [`EventLoop::run`].
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    data_dir: DataDir,
    metrics: Metrics,
    libp2p_metrics: libp2p::metrics::Metrics,
    broadcast: Broadcast,
    peer_manager: PeerManager,
    known: KnownPeers,
    peers: HashMap<PeerId, PeerState>,
    pending_connects: HashMap<ConnectionId, oneshot::Sender<Result<ConnectOutcome, CommandError>>>,
    /// Peers the peer manager meant to dial while another dial to them was already
    /// under way; their next connection counts as ours.
    wanted: std::collections::HashSet<PeerId>,
    /// Peers that may have restarted behind a connection we held, and those being
    /// reset for it (see [`crate::restarts`]).
    restarts: crate::restarts::Restarts,
    dial_sources: HashMap<ConnectionId, (Option<PeerId>, Source)>,
    health: watch::Sender<Health>,
    started: Instant,
    /// Connections the limits refused lately, for `/readyz`.
    refusals: crate::refusals::Refusals,
    /// Log lines the rate limit dropped, summed up once a minute.
    log_report: (crate::log_limit::SuppressedReport, Instant),
    bootstrapped: bool,
    first_node: bool,
    last_save: Instant,
    persister: Persister,
    listeners: Vec<ListenerId>,
    local: PeerId,
    /// Bootnodes and known peers, for Kademlia once the listeners are up.
    seeds: Vec<(PeerId, Multiaddr)>,
    /// Whether this node is in a private network (a pre-shared key).
    private_network: bool,
    files: Files,
    served: mpsc::UnboundedReceiver<Served>,
    traversal: Traversal,
    probe_reports: mpsc::UnboundedReceiver<ProbeReport>,
    /// Peers gossipsub reports as not reading their messages.
    slow_gossip: crate::slow_peers::SlowGossip,
}

/// The parts [`EventLoop::new`] needs.
pub struct Parts {
    /// The built swarm, not yet listening.
    pub swarm: Swarm<Behaviour>,
    /// Where commands arrive.
    pub commands: mpsc::Receiver<Command>,
    /// The open data dir.
    pub data_dir: DataDir,
    /// Servant's metric families.
    pub metrics: Metrics,
    /// libp2p's metric recorders.
    pub libp2p_metrics: libp2p::metrics::Metrics,
    /// Where health snapshots go.
    pub health: watch::Sender<Health>,
    /// The content store.
    pub store: Arc<Store>,
}

/// Listening failed on every configured address.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on any configured address: {0}")]
pub struct ListenFailed(pub String);

impl EventLoop {
    /// Prepares the loop: joins configured topics, seeds the routing table with the
    /// bootnodes and known peers, and starts the listeners.
    pub fn new(parts: Parts, config: &Config) -> Result<EventLoop, ListenFailed> {
        let Parts {
            mut swarm,
            commands,
            data_dir,
            metrics,
            libp2p_metrics,
            health,
            store,
        } = parts;
        let local = *swarm.local_peer_id();
        let known = KnownPeers::load(
            &data_dir.known_peers_path(),
            config.known_peers_max as usize,
            local,
        );
        let mut broadcast = Broadcast::new(
            local,
            config.max_message_age.get(),
            config.max_clock_skew.get(),
        );
        for topic in &config.topics {
            // Validated with the config; a failure here is gossipsub's own.
            if let Err(e) = broadcast.join(&mut swarm.behaviour_mut().gossipsub, topic, true) {
                tracing::error!(topic, error = %e, "cannot join configured topic");
            }
        }
        // A fleet sharing one config lists every bootnode, this one included.
        let bootnodes: Vec<(PeerId, Multiaddr)> = config
            .bootnode_peers()
            .into_iter()
            .filter(|(peer, _)| *peer != local)
            .collect();
        let first_node = bootnodes.is_empty();
        // Handed to Kademlia only once the listeners are up (see `run`): a dial made
        // before a listener reported its address leaves from a fresh port, and a NAT
        // then shows peers an outside port that is not our listen port's mapping.
        let mut seeds = bootnodes.clone();
        for peer in known.candidates() {
            if !swarm.behaviour().deny.list().admits_peer(&peer.peer_id) {
                continue;
            }
            seeds.extend(peer.addrs.into_iter().map(|addr| (peer.peer_id, addr)));
        }
        for addr in &config.announce {
            swarm.add_external_address(addr.clone());
        }
        let mut errors = Vec::new();
        let mut listeners = Vec::new();
        for addr in &config.listen {
            match swarm.listen_on(addr.clone()) {
                Ok(id) => listeners.push(id),
                Err(e) => {
                    tracing::error!(%addr, error = %e, "cannot listen");
                    errors.push(format!("{addr}: {e}"));
                }
            }
        }
        if listeners.is_empty() {
            return Err(ListenFailed(errors.join("; ")));
        }
        metrics.known_peers.set(known.len() as i64);
        let (mut files, served) = Files::new(store, local, config, metrics.files.clone());
        files.provide_all(&mut swarm);
        let (traversal, probe_reports) =
            Traversal::new(&mut swarm, config, metrics.nat.clone(), first_node);
        Ok(EventLoop {
            files,
            served,
            traversal,
            probe_reports,
            peer_manager: PeerManager::new(
                config.conn_low as usize,
                config.conn_high as usize,
                bootnodes,
            ),
            first_node,
            // Due at once: the first peers learned are saved within a tick.
            last_save: Instant::now() - SAVE_INTERVAL,
            persister: Persister::spawn(data_dir.known_peers_path()),
            listeners,
            swarm,
            commands,
            data_dir,
            metrics,
            libp2p_metrics,
            broadcast,
            known,
            peers: HashMap::new(),
            pending_connects: HashMap::new(),
            wanted: std::collections::HashSet::new(),
            restarts: Default::default(),
            slow_gossip: Default::default(),
            dial_sources: HashMap::new(),
            health,
            started: Instant::now(),
            log_report: (Default::default(), Instant::now()),
            refusals: Default::default(),
            bootstrapped: false,
            local,
            seeds,
            private_network: config.psk_file.is_some(),
        })
    }

    /// Drives the swarm until every listener reported its addresses (or `timeout`),
    /// so the caller can print dialable addresses. Returns them with `/p2p/<id>`.
    pub async fn wait_for_listeners(&mut self, timeout: Duration) -> Vec<Multiaddr> {
        let deadline = tokio::time::Instant::now() + timeout;
        let expected = self.listeners.len();
        let mut reported = std::collections::HashSet::new();
        while reported.len() < expected {
            let event = tokio::select! {
                event = self.swarm.select_next_some() => event,
                _ = tokio::time::sleep_until(deadline) => break,
            };
            match &event {
                SwarmEvent::NewListenAddr { listener_id, .. }
                | SwarmEvent::ListenerClosed { listener_id, .. }
                | SwarmEvent::ListenerError { listener_id, .. } => {
                    reported.insert(*listener_id);
                }
                _ => {}
            }
            self.on_swarm_event(event);
        }
        // A listener on 0.0.0.0 reports one address per interface, a moment apart:
        // collect the stragglers too, so the banner lists them all.
        let settle = tokio::time::Instant::now() + Duration::from_millis(150);
        while let Ok(event) =
            tokio::time::timeout_at(settle.min(deadline), self.swarm.select_next_some()).await
        {
            self.on_swarm_event(event);
        }
        self.listen_addrs()
    }

    /// Listen addresses worth giving to other nodes, with `/p2p/<id>`: IPv4 before
    /// IPv6, TCP before QUIC, without IPv6 link-local ones (they need a zone to dial).
    fn listen_addrs(&self) -> Vec<Multiaddr> {
        let mut addrs: Vec<Multiaddr> = self
            .swarm
            .listeners()
            .filter(|a| !crate::addr::is_link_local(a))
            .map(|a| a.clone().with(Protocol::P2p(self.local)))
            .collect();
        addrs.sort_by_key(|a| {
            let ipv6 = matches!(a.iter().next(), Some(Protocol::Ip6(_)));
            let quic = a.iter().any(|p| matches!(p, Protocol::QuicV1));
            (ipv6, quic, a.to_string())
        });
        addrs
    }

    /// Runs until `shutdown` completes or every client is gone, then closes down
    /// gracefully: listeners removed, state saved, connections closed.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for (peer, addr) in std::mem::take(&mut self.seeds) {
            self.swarm.behaviour_mut().kad.add_address(&peer, addr);
        }
        if let Err(e) = self.swarm.behaviour_mut().kad.bootstrap() {
            tracing::debug!(error = %e, "no peer to bootstrap from yet");
        }
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => break,
                },
                Some(served) = self.served.recv() => self.files.on_served(&mut self.swarm, served),
                Some(report) = self.probe_reports.recv() => {
                    self.traversal.on_report(&mut self.swarm, report)
                }
                _ = tick.tick() => self.on_tick(),
                _ = &mut shutdown => break,
            }
        }
        self.close().await;
    }

    async fn close(mut self) {
        tracing::info!("shutting down");
        for id in std::mem::take(&mut self.listeners) {
            self.swarm.remove_listener(id);
        }
        self.save_bans();
        self.restarts.clear();
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for peer in peers {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        let deadline = tokio::time::Instant::now() + CLOSE_GRACE;
        while self.swarm.connected_peers().next().is_some() {
            tokio::select! {
                event = self.swarm.select_next_some() => {
                    if let SwarmEvent::ConnectionClosed { .. } = event {
                        self.on_swarm_event(event);
                    }
                }
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        // The last word on known peers is written here, after any write the writer
        // task still had in hand.
        let persister = std::mem::replace(&mut self.persister, Persister::inert());
        persister.finish().await;
        if let Err(e) = self.known.save() {
            tracing::warn!(error = %e, "cannot save known peers");
        }
        tracing::info!("stopped");
    }

    /// Writes the runtime bans before the operator's command returns: a ban must
    /// outlive a crash right after it. Bans are rare, so the write can wait here.
    fn save_bans(&self) {
        let path = self.data_dir.bans_path();
        if let Err(e) = self.swarm.behaviour().deny.list().save(&path) {
            tracing::error!(error = %e, path = %path.display(), "cannot save bans; they hold until the node stops");
        }
    }

    /// Hands the known peers to the writer task, off this loop (the write fsyncs).
    fn known_save(&mut self) {
        self.last_save = Instant::now();
        match self.known.snapshot() {
            Ok(Some(bytes)) => self.persister.save(bytes),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot encode known peers"),
        }
    }

    // ---------------------------------------------------------------- swarm events

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        self.libp2p_metrics.record(&event);
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Identify(e)) => self.on_identify(e),
            SwarmEvent::Behaviour(BehaviourEvent::Ping(e)) => self.on_ping(e),
            SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => self.on_kad(e),
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(e)) => self.on_gossipsub(e),
            SwarmEvent::Behaviour(BehaviourEvent::File(e)) => {
                self.files.on_file_event(&mut self.swarm, e)
            }
            SwarmEvent::Behaviour(BehaviourEvent::Search(e)) => {
                self.files.on_search_event(&mut self.swarm, e)
            }
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(e)) => self.traversal.on_autonat(e),
            SwarmEvent::Behaviour(BehaviourEvent::Relay(e)) => {
                self.libp2p_metrics.record(&e);
                self.traversal.on_relay(e)
            }
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(e)) => {
                self.traversal.on_relay_client(e)
            }
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(e)) => {
                self.libp2p_metrics.record(&e);
                self.traversal.on_dcutr(e)
            }
            SwarmEvent::Behaviour(BehaviourEvent::Upnp(e)) => self.traversal.on_upnp(e),
            SwarmEvent::Behaviour(BehaviourEvent::Stream(never)) => match never {},
            SwarmEvent::Behaviour(BehaviourEvent::Deny(never)) => match never {},
            SwarmEvent::Behaviour(BehaviourEvent::Limits(never)) => match never {},
            SwarmEvent::Behaviour(BehaviourEvent::KeepAlive(never)) => match never {},
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => self.on_established(peer_id, connection_id, endpoint, num_established.get()),
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                cause,
            } => self.on_closed(peer_id, connection_id, endpoint, num_established, cause),
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => self.on_dial_error(connection_id, peer_id, error),
            SwarmEvent::IncomingConnectionError {
                error,
                send_back_addr,
                ..
            } => self.on_incoming_error(error, send_back_addr),
            SwarmEvent::NewListenAddr {
                address,
                listener_id,
            } => {
                self.traversal.on_new_listen_addr(listener_id, &address);
                tracing::info!(address = %address.with(Protocol::P2p(self.local)), "listening");
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                tracing::info!(%address, "no longer listening");
            }
            SwarmEvent::ListenerError { error, .. } => {
                tracing::warn!(%error, "listener error");
            }
            SwarmEvent::ListenerClosed {
                addresses,
                reason,
                listener_id,
            } => {
                let why = match &reason {
                    Ok(()) => "closed".to_string(),
                    Err(e) => e.to_string(),
                };
                self.traversal
                    .on_listener_closed(&mut self.swarm, listener_id, &why);
                if !self.listeners.contains(&listener_id) {
                    tracing::debug!(?addresses, reason = %why, "relay listener closed");
                } else {
                    tracing::warn!(?addresses, reason = %why, "listener closed");
                }
            }
            SwarmEvent::NewExternalAddrCandidate { address } => {
                self.traversal.on_external_candidate(&address);
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                tracing::info!(%address, "external address confirmed");
            }
            SwarmEvent::Dialing {
                peer_id: Some(peer),
                connection_id,
            } => self.traversal.on_dialing(peer, connection_id),
            _ => {}
        }
    }

    fn on_established(
        &mut self,
        peer: PeerId,
        connection_id: ConnectionId,
        endpoint: ConnectedPoint,
        num_established: u32,
    ) {
        let now = Instant::now();
        let (addr, outbound) = endpoint_addr(&endpoint);
        let dialed_by_us = self.dial_sources.remove(&connection_id).is_some();
        // A peer we set out to dial may be reached first by someone else's dial (a
        // Kademlia query to the same peer): that connection is the one we wanted.
        let wanted = self.wanted.remove(&peer);
        if wanted && !dialed_by_us {
            self.swarm
                .behaviour_mut()
                .keep_alive
                .hold(peer, connection_id);
        }
        let chosen = dialed_by_us || wanted;
        // Remembered for the next start: peers this node reached at an address it
        // dialed itself. Anyone can connect to us and claim addresses; an inbound
        // peer is not taken at its word.
        if outbound {
            self.known.record(peer, [addr.clone()]);
        }
        self.metrics
            .connections
            .get_or_create(&connection_label(&addr, outbound))
            .inc();
        let state = self.peers.entry(peer).or_insert_with(|| PeerState {
            connections: HashMap::new(),
            since_unix: crate::clock::unix_secs(),
            since: now,
            agent: None,
            protocol_version: None,
            rtt: None,
            pings: None,
        });
        state.connections.insert(
            connection_id,
            ConnInfo {
                addr: addr.clone(),
                outbound,
                chosen,
                since: now,
                alive: None,
                dead: false,
            },
        );
        self.traversal.on_established(peer, &addr, num_established);
        // A peer being reset for a restart must be seen with no connection at all
        // before it is dialed again; one that arrives meanwhile goes too.
        if self.restarts.is_resetting(&peer) {
            self.swarm.close_connection(connection_id);
        }
        if num_established == 1 {
            self.restarts.on_connected(&peer);
            self.peer_manager.on_connected(peer, now);
            tracing::debug!(%peer, %addr, outbound, "connected");
            self.publish_health(None);
        }
        // A second connection is judged on a later tick (see `DUPLICATE_GRACE`).
        if let Some(reply) = self.pending_connects.remove(&connection_id) {
            self.peer_manager.protect(peer);
            let _ = reply.send(Ok(ConnectOutcome {
                peer_id: peer.to_string(),
                addr: addr.to_string(),
                already_connected: false,
            }));
        }
        self.metrics
            .connected_peers
            .set(self.peer_manager.connected_count() as i64);
    }

    fn on_closed(
        &mut self,
        peer: PeerId,
        connection_id: ConnectionId,
        endpoint: ConnectedPoint,
        num_established: u32,
        cause: Option<libp2p::swarm::ConnectionError>,
    ) {
        let (addr, outbound) = endpoint_addr(&endpoint);
        let addr = &addr;
        self.metrics
            .connections
            .get_or_create(&connection_label(addr, outbound))
            .dec();
        let closed = self
            .peers
            .get_mut(&peer)
            .and_then(|state| state.connections.remove(&connection_id));
        let chosen = closed.as_ref().is_some_and(|c| c.chosen);
        self.traversal.on_closed(peer, num_established);
        if let Some(closed) = closed.filter(|_| num_established > 0) {
            let died = if closed.dead {
                Some("a ping went unanswered")
            } else if cause.as_ref().is_some_and(crate::restarts::timed_out) {
                Some("its transport timed out")
            } else {
                None
            };
            self.suspect_restart(peer, &closed, died);
        }
        if num_established > 0 {
            // Whichever end closed it, the connections left may have protocol handlers
            // that only wake for queued work once they have a stream of their own
            // (gossipsub's): they are woken from now on (see `crate::duplicates`).
            let left: Vec<ConnectionId> = self
                .peers
                .get(&peer)
                .map(|s| s.connections.keys().copied().collect())
                .unwrap_or_default();
            for id in left {
                self.swarm.behaviour_mut().keep_alive.nudge(peer, id);
            }
        }
        if num_established == 0 {
            self.peers.remove(&peer);
            self.restarts.on_disconnected(&peer, Instant::now());
            self.slow_gossip.forget(&peer);
            self.peer_manager
                .on_disconnected(peer, Instant::now(), chosen);
            tracing::debug!(%peer, cause = ?cause, "disconnected");
            self.publish_health(None);
        }
        self.metrics
            .connected_peers
            .set(self.peer_manager.connected_count() as i64);
    }

    /// A direct connection to `peer` closed while others stay. If it `died` (how) and
    /// a newer direct one lives, the peer may have restarted (see [`crate::restarts`]):
    /// a ping answered on the newer one will tell.
    fn suspect_restart(&mut self, peer: PeerId, closed: &ConnInfo, died: Option<&'static str>) {
        let Some(died) = died else {
            return;
        };
        if crate::addr::is_relayed(&closed.addr) {
            return;
        }
        let Some(state) = self.peers.get(&peer) else {
            return;
        };
        let direct_left: Vec<&ConnInfo> = state
            .connections
            .values()
            .filter(|c| !crate::addr::is_relayed(&c.addr))
            .collect();
        let since: Vec<Instant> = direct_left.iter().map(|c| c.since).collect();
        if !crate::restarts::newer_one_lives(closed.since, &since) {
            return;
        }
        // Where we dialed it, those addresses work (a restarted node keeps its port);
        // otherwise the behaviours' address books (Kademlia, identify) supply some.
        let addrs: Vec<Multiaddr> = direct_left
            .iter()
            .copied()
            .chain(std::iter::once(closed))
            .filter(|c| c.outbound)
            .map(|c| c.addr.clone())
            .collect();
        tracing::debug!(%peer, old_connection = died, "an older connection died while a newer one lives: the peer may have restarted");
        self.restarts.on_death(peer, died, addrs, Instant::now());
    }

    /// A ping came back from `peer`: if that proves a suspected restart, every
    /// connection to it closes and it is dialed again once they have.
    fn reset_if_restarted(&mut self, peer: PeerId) {
        let Some(restarted) = self.restarts.on_pong(peer, Instant::now()) else {
            return;
        };
        tracing::info!(
            %peer,
            old_connection = restarted.why,
            "an older connection to the peer died while a newer one lives: it restarted; reconnecting so both ends start afresh"
        );
        self.metrics.peer_restarts.inc();
        if self.swarm.disconnect_peer_id(peer).is_ok() {
            self.restarts
                .resetting(peer, restarted.addrs, Instant::now());
        }
    }

    /// A peer can end up with several connections: two nodes dialing each other at
    /// once, an AutoNAT dial-back, a DHT lookup dialing a peer already connected. Each
    /// costs streams and buffers, so both ends keep one (see [`crate::duplicates`] for
    /// which). A relayed connection is closed once a direct one exists (hole punching
    /// worked, or the peer became reachable): it costs the relay a circuit, which the
    /// relay cuts at its limits anyway, and new streams would otherwise keep landing on
    /// it.
    fn close_duplicates(&mut self, peer: PeerId) {
        // A reservation, ours on a relay or a peer's on us, lives on one connection;
        // which one is not ours to guess, so those peers keep all of theirs.
        if self.traversal.is_relay(&peer) || self.traversal.reserved_here(&peer) {
            return;
        }
        let Some(state) = self.peers.get(&peer) else {
            return;
        };
        let (relayed, direct): (Vec<_>, Vec<_>) = state
            .connections
            .iter()
            .partition(|(_, c)| crate::addr::is_relayed(&c.addr));
        if direct.is_empty() {
            return;
        }
        // Direct connections are judged once each has answered a ping since the newest
        // appeared: an old connection to a peer that restarted (a QUIC one above all,
        // which no RST ends) looks older and better than the new one until ping finds
        // it dead, and must not win. Relayed ones go as soon as any direct one exists.
        let newest = direct.iter().map(|(_, c)| c.since).max();
        let direct_alive = direct
            .iter()
            .all(|(_, c)| c.alive.is_some_and(|t| Some(t) >= newest));
        let chosen: std::collections::HashSet<ConnectionId> = state
            .connections
            .iter()
            .filter(|(_, c)| c.chosen)
            .map(|(id, _)| *id)
            .collect();
        let relayed: Vec<ConnectionId> = relayed.into_iter().map(|(id, _)| *id).collect();
        let direct: Vec<crate::duplicates::Direct> = direct
            .into_iter()
            .map(|(id, c)| crate::duplicates::Direct {
                id: *id,
                outbound: c.outbound,
                since: c.since,
            })
            .collect();
        // Only the smaller PeerId closes direct duplicates: two ends timing the same
        // connections on their own clocks could each see a different one as first
        // (near the `SIMULTANEOUS` boundary) and close both. The larger end keeps
        // what it has; its extras are bounded by `max_connections_per_peer`.
        let we_decide = self.local < peer;
        let decision = if direct_alive && we_decide {
            crate::duplicates::decide(&direct, we_decide)
        } else {
            crate::duplicates::Decision {
                keep: direct.iter().map(|c| c.id).collect(),
                close: Vec::new(),
            }
        };
        let mut closed_a_chosen_one = false;
        for id in relayed {
            tracing::debug!(%peer, connection = ?id, "closing a relayed connection: a direct one exists");
            self.swarm.close_connection(id);
            closed_a_chosen_one |= chosen.contains(&id);
        }
        for id in &decision.close {
            tracing::debug!(%peer, connection = ?id, "closing a duplicate connection");
            self.swarm.close_connection(*id);
            closed_a_chosen_one |= chosen.contains(id);
        }
        for id in decision.keep {
            // The connection we chose is gone; the one kept inherits its standing, so
            // a DHT lookup's connection that happened to win is held open too.
            if closed_a_chosen_one {
                self.swarm.behaviour_mut().keep_alive.hold(peer, id);
                if let Some(c) = self
                    .peers
                    .get_mut(&peer)
                    .and_then(|s| s.connections.get_mut(&id))
                {
                    c.chosen = true;
                }
            }
        }
    }

    fn on_dial_error(
        &mut self,
        connection_id: ConnectionId,
        peer: Option<PeerId>,
        error: DialError,
    ) {
        let source = self.dial_sources.remove(&connection_id);
        tracing::debug!(?peer, connection = ?connection_id, error = ?error, "dial failed");
        if let Some(reply) = self.pending_connects.remove(&connection_id) {
            let err = match &error {
                DialError::Denied { cause } => CommandError::Denied(cause.to_string()),
                DialError::NoAddresses => {
                    CommandError::NoAddress(peer.map(|p| p.to_string()).unwrap_or_default())
                }
                other => CommandError::DialFailed(other.to_string()),
            };
            let _ = reply.send(Err(err));
        }
        if let DialError::Denied { cause } = &error {
            self.count_denied(cause);
        }
        // Dials of our own are labelled by purpose; the rest were made by a protocol
        // (a request to a peer not connected, a Kademlia query).
        let purpose = source.map_or("protocol", |(_, s)| s.label());
        self.metrics
            .dial_failures
            .get_or_create(&DialLabel { purpose })
            .inc();
        let Some(peer) = peer.or(source.and_then(|(p, _)| p)) else {
            return;
        };
        // A dial to a connected peer (a second address, say) failing is no news.
        if self.swarm.is_connected(&peer) {
            return;
        }
        // Kademlia keeps a peer's last address even when it fails, so a peer that
        // left stays in the routing table and every later query dials it again (over
        // QUIC, a 5 s handshake timeout each time; the soak found nodes dialing
        // departed peers for minutes after the churn ended). A peer that could not be
        // reached at any address it was dialed on, or where another peer now answers,
        // leaves the table; it comes back the next time it connects.
        if matches!(
            error,
            DialError::Transport(_) | DialError::WrongPeerId { .. }
        ) && self.swarm.behaviour_mut().kad.remove_peer(&peer).is_some()
        {
            tracing::debug!(%peer, "unreachable peer removed from the routing table");
        }
        // Someone else's dial to a peer we wanted failed: so did ours, in effect.
        let wanted = self.wanted.remove(&peer);
        // Other dials (Kademlia's queries) fail for their own reasons; the backoff
        // and the bootnode warnings are about ours.
        if source.is_none() && !wanted {
            return;
        }
        let retry = self.peer_manager.on_dial_failure(peer, Instant::now());
        if self.peer_manager.is_bootnode(&peer) {
            let hint = handshake_hint(&error.to_string(), self.private_network).unwrap_or("");
            tracing::warn!(%peer, error = %error, hint, retry_in = ?retry, "bootnode unreachable; retrying with backoff");
        } else {
            tracing::debug!(%peer, error = %error, retry_in = ?retry, "dial failed");
        }
    }

    fn on_incoming_error(&mut self, error: ListenError, from: Multiaddr) {
        match &error {
            ListenError::Denied { cause } => {
                self.count_denied(cause);
                tracing::debug!(%from, %cause, "refused inbound connection");
            }
            other => {
                let hint = handshake_hint(&other.to_string(), self.private_network).unwrap_or("");
                tracing::debug!(%from, error = %other, hint, "inbound connection failed");
            }
        }
    }

    fn count_denied(&mut self, cause: &libp2p::swarm::ConnectionDenied) {
        let reason = if let Some(denied) = cause.downcast_ref::<deny::Denied>() {
            denied.reason()
        } else if cause
            .downcast_ref::<connection_limits::Exceeded>()
            .is_some()
        {
            "limit"
        } else if cause
            .downcast_ref::<crate::ip_limits::IpLimitExceeded>()
            .is_some()
        {
            "ip_limit"
        } else if cause
            .downcast_ref::<crate::gossip_budget::FloodingPeer>()
            .is_some()
        {
            "gossip_flood"
        } else {
            "other"
        };
        if matches!(reason, "limit" | "ip_limit") {
            self.refusals.record(reason == "ip_limit", Instant::now());
            self.publish_health(None);
        }
        self.metrics
            .connections_denied
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    fn on_identify(&mut self, event: identify::Event) {
        let identify::Event::Received {
            connection_id,
            peer_id,
            info,
        } = event
        else {
            self.libp2p_metrics.record(&event);
            return;
        };
        // libp2p's identify metrics label a series by the protocol stack of every
        // listen address a peer announces: label values the network chooses, one set
        // per peer. The metrics see the event without its addresses, so the number of
        // series stays bounded whatever peers announce.
        let mut counted = info.clone();
        counted.listen_addrs.clear();
        self.libp2p_metrics.record(&identify::Event::Received {
            connection_id,
            peer_id,
            info: counted,
        });
        // An address we reached this peer on: the best one to reserve a relay slot on.
        let dialed = self.peers.get(&peer_id).and_then(|state| {
            state
                .connections
                .values()
                .find(|c| c.outbound && !crate::addr::is_relayed(&c.addr))
                .map(|c| c.addr.clone())
        });
        self.traversal
            .on_identify(&mut self.swarm, peer_id, &info, dialed);
        if let Some(state) = self.peers.get_mut(&peer_id) {
            state.agent = Some(info.agent_version.clone());
            state.protocol_version = Some(info.protocol_version.clone());
            state.pings = Some(info.protocols.contains(&ping::PROTOCOL_NAME));
        }
        // A peer chooses what it announces: keep a few dialable addresses, and let the
        // routing table hold what it announced last, not everything it ever did.
        let dialable: Vec<Multiaddr> = info
            .listen_addrs
            .into_iter()
            .filter(crate::addr::is_dialable)
            .take(MAX_ADDRS_PER_PEER)
            .collect();
        // Only peers that speak our DHT go into the routing table; others (a
        // py-libp2p peer on a topic, say) stay connected but are not handed out.
        // Kademlia may have put one there already: a stream opened lazily looks
        // accepted before the peer answers (see `negotiation`), and Kademlia takes the
        // first opened stream as proof, so identify's word overrules it.
        if !info.protocols.contains(&KAD_PROTOCOL) {
            self.swarm.behaviour_mut().kad.remove_peer(&peer_id);
            return;
        }
        if dialable.is_empty() {
            return;
        }
        // Kademlia stores addresses with `/p2p/<id>` appended; identify's come without.
        let announced: Vec<Multiaddr> = dialable
            .iter()
            .map(|a| crate::addr::without_p2p(a.clone()))
            .collect();
        let stale: Vec<Multiaddr> = self
            .routing_addrs(&peer_id)
            .into_iter()
            .filter(|a| !announced.contains(&crate::addr::without_p2p(a.clone())))
            .collect();
        let kad = &mut self.swarm.behaviour_mut().kad;
        for addr in &dialable {
            kad.add_address(&peer_id, addr.clone());
        }
        for addr in &stale {
            kad.remove_address(&peer_id, addr);
        }
        // Its announced addresses are remembered only if this node reached it by
        // dialing (see `on_established`): inbound strangers could otherwise crowd
        // honest peers out of the list with fresh identities.
        let dialed = self
            .peers
            .get(&peer_id)
            .is_some_and(|s| s.connections.values().any(|c| c.outbound));
        if dialed {
            self.known.record(peer_id, dialable);
        }
    }

    fn on_ping(&mut self, event: ping::Event) {
        self.libp2p_metrics.record(&event);
        match event.result {
            Ok(rtt) => {
                if let Some(state) = self.peers.get_mut(&event.peer) {
                    state.rtt = Some(rtt);
                    if let Some(c) = state.connections.get_mut(&event.connection) {
                        c.alive = Some(Instant::now());
                    }
                }
                self.reset_if_restarted(event.peer);
                self.traversal.on_rtt(event.peer, rtt);
            }
            // A peer without ping is not dead; it just cannot be measured. Streams are
            // negotiated lazily, so its refusal comes as a failed ping: an "na" we can
            // read, or (some implementations reset a refused stream, and QUIC drops
            // unread data on a reset) only the identify that did not list ping.
            Err(ping::Failure::Unsupported) => {}
            Err(e)
                if crate::negotiation::refused(&e)
                    || self
                        .peers
                        .get(&event.peer)
                        .is_some_and(|s| s.pings == Some(false)) => {}
            Err(e) => {
                tracing::debug!(peer = %event.peer, error = %e, "ping failed; closing the connection");
                self.metrics.ping_failures.inc();
                if let Some(c) = self
                    .peers
                    .get_mut(&event.peer)
                    .and_then(|s| s.connections.get_mut(&event.connection))
                {
                    c.dead = true;
                }
                self.swarm.close_connection(event.connection);
            }
        }
    }

    fn on_kad(&mut self, event: kad::Event) {
        self.libp2p_metrics.record(&event);
        let event = match event {
            // Record filtering is on: provider records pushed by peers are stored
            // here, into the capped part of the store; value records are dropped.
            kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::AddProvider {
                        record: Some(mut record),
                    },
            } => {
                use libp2p::kad::store::RecordStore;
                // The sender chose these addresses: keep a few plausible ones.
                record
                    .addresses
                    .retain(|a| crate::addr::is_dialable(a) && a.as_ref().len() <= 256);
                record.addresses.truncate(MAX_ADDRS_PER_PEER);
                if let Err(e) = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .store_mut()
                    .add_provider(record)
                {
                    self.metrics.kad_provider_records_refused.inc();
                    tracing::debug!(error = ?e, "provider record not stored");
                }
                return;
            }
            kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetProviders(result),
                step,
                ..
            } => {
                self.files
                    .on_providers(&mut self.swarm, id, result, step.last);
                return;
            }
            other => other,
        };
        if let kad::Event::OutboundQueryProgressed {
            result: kad::QueryResult::Bootstrap(result),
            step,
            ..
        } = event
        {
            match result {
                // A bootstrap "succeeds" even when nobody answered; it counts only
                // with a peer connected.
                Ok(ok) if step.last || ok.num_remaining == 0 => {
                    let reason = if self.peer_manager.connected_count() > 0 {
                        if !self.bootstrapped {
                            tracing::info!("bootstrapped into the DHT");
                            // Announcements made while alone reached nobody; now
                            // that the routing table has peers, make them again.
                            self.files.provide_all(&mut self.swarm);
                        }
                        self.bootstrapped = true;
                        self.metrics.bootstrapped.set(1);
                        "ok"
                    } else {
                        "no_peers"
                    };
                    self.metrics
                        .bootstrap_runs
                        .get_or_create(&ReasonLabel { reason })
                        .inc();
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "bootstrap did not complete");
                    self.metrics
                        .bootstrap_runs
                        .get_or_create(&ReasonLabel { reason: "timeout" })
                        .inc();
                }
            }
        }
    }

    fn on_gossipsub(&mut self, event: gossipsub::Event) {
        self.libp2p_metrics.record(&event);
        if let gossipsub::Event::SlowPeer {
            peer_id,
            failed_messages,
        } = &event
        {
            let failed = failed_messages
                .priority
                .saturating_add(failed_messages.non_priority);
            self.slow_gossip.report(*peer_id, failed, Instant::now());
            return;
        }
        let gossipsub::Event::Message {
            propagation_source,
            message_id,
            message,
        } = event
        else {
            return;
        };
        let label = self.broadcast.label(message.topic.as_str());
        let (acceptance, outcome) = match self.broadcast.validate(&message, propagation_source) {
            Ok(delivery) => {
                self.metrics
                    .messages_received
                    .get_or_create(&TopicLabel { topic: label })
                    .inc();
                let age = crate::clock::unix_ms().saturating_sub(delivery.envelope.time);
                self.metrics.message_latency.observe(age as f64 / 1000.0);
                (gossipsub::MessageAcceptance::Accept, None)
            }
            Err(rejection) => {
                self.metrics
                    .messages_rejected
                    .get_or_create(&RejectLabel {
                        topic: label,
                        reason: rejection.reason,
                    })
                    .inc();
                let acceptance = rejection.acceptance;
                (acceptance, Some(rejection))
            }
        };
        if let Some(rejection) = outcome {
            if rejection.reason != "duplicate" {
                tracing::debug!(
                    from = %propagation_source,
                    reason = rejection.reason,
                    detail = rejection.detail,
                    "refused broadcast"
                );
            }
        }
        self.swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(&message_id, &propagation_source, acceptance);
    }

    // ---------------------------------------------------------------- timers

    /// Disconnects peers that leave what we send them unread (see
    /// [`crate::slow_peers`]).
    fn drop_slow_readers(&mut self, now: Instant) {
        let gossip = self
            .slow_gossip
            .due(now)
            .into_iter()
            .map(|(peer, failed)| (peer, "gossipsub", failed));
        let file = self
            .files
            .overdue_readers(now)
            .into_iter()
            .map(|peer| (peer, "file", 0));
        let slow: Vec<(PeerId, &'static str, usize)> = gossip.chain(file).collect();
        let mut dropped = std::collections::HashSet::new();
        for (peer, protocol, failed) in slow {
            if protocol == "file" {
                self.files.forget_responses(&peer);
            }
            // Slow on both protocols in one tick: dropped, and counted, once.
            if !self.swarm.is_connected(&peer) || !dropped.insert(peer) {
                continue;
            }
            tracing::warn!(%peer, protocol, failed, "disconnecting a peer that does not read what it is sent");
            self.metrics
                .slow_peers_dropped
                .get_or_create(&crate::metrics::ProtocolLabel { protocol })
                .inc();
            self.restarts.forget(&peer);
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        self.restarts.expire(now);
        for (peer, addrs) in self.restarts.due(now) {
            if !self.swarm.is_connected(&peer) {
                self.dial(Candidate {
                    peer,
                    addrs,
                    source: Source::Known,
                });
            }
        }
        crate::chunk_pool::purge();
        if now.duration_since(self.log_report.1) >= LOG_REPORT_INTERVAL {
            self.log_report.1 = now;
            if let Some(dropped) = self.log_report.0.take() {
                tracing::warn!(
                    dropped,
                    "dropped log lines repeated faster than the log rate limit allows"
                );
            }
        }
        self.files.on_tick(&mut self.swarm);
        self.drop_slow_readers(now);
        self.traversal.tick(&mut self.swarm, now);
        // Our relays are protected like bootnodes: the reservation is our address.
        self.peer_manager.set_relays(self.traversal.relays());
        let duplicated: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, state)| {
                state.connections.len() > 1
                    && state
                        .connections
                        .values()
                        .all(|c| now.duration_since(c.since) >= DUPLICATE_GRACE)
            })
            .map(|(peer, _)| *peer)
            .collect();
        for peer in duplicated {
            self.close_duplicates(peer);
        }
        self.broadcast
            .leave_idle(&mut self.swarm.behaviour_mut().gossipsub, now);
        let candidates = self.candidates();
        let plan = {
            let gossipsub = &self.swarm.behaviour().gossipsub;
            let peers = &self.peers;
            let mesh: std::collections::HashSet<PeerId> =
                gossipsub.all_mesh_peers().copied().collect();
            self.peer_manager.plan(now, candidates, |peer| {
                usefulness(
                    peer,
                    &mesh,
                    gossipsub.peer_score(peer),
                    peers.get(peer),
                    now,
                )
            })
        };
        for candidate in plan.dial {
            self.dial(candidate);
        }
        for peer in plan.trim {
            tracing::debug!(%peer, "trimming connection above the high watermark");
            self.metrics.peers_trimmed.inc();
            self.restarts.forget(&peer);
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        if plan.discover {
            self.swarm
                .behaviour_mut()
                .kad
                .get_closest_peers(PeerId::random());
        }
        if self.known.is_dirty() && now.duration_since(self.last_save) >= SAVE_INTERVAL {
            self.known_save();
        }
        let routing_table_size = self.routing_table_size();
        self.metrics
            .routing_table_peers
            .set(routing_table_size as i64);
        self.metrics.known_peers.set(self.known.len() as i64);
        self.publish_health(Some(now));
    }

    /// Publishes readiness for `/readyz`; `tick` is set when the loop ticked (the
    /// liveness signal), otherwise the last tick time is kept. Called on every tick
    /// and whenever a connection opens or closes, so probes see a change at once.
    fn publish_health(&mut self, tick: Option<Instant>) {
        let (ready, reason) = self.readiness();
        self.metrics.ready.set(i64::from(ready));
        let last_tick = tick.unwrap_or_else(|| self.health.borrow().last_tick);
        let warnings = self.refusals.warning(Instant::now()).into_iter().collect();
        self.health.send_replace(Health {
            last_tick,
            ready,
            not_ready_reason: reason,
            warnings,
        });
    }

    /// Ready: at least one peer and a non-empty routing table, or a first node
    /// (no bootnodes), which is the network and has nobody to wait for.
    fn readiness(&mut self) -> (bool, Option<String>) {
        if self.first_node {
            return (true, None);
        }
        if self.peer_manager.connected_count() == 0 {
            return (false, Some("no connected peer".into()));
        }
        if self.routing_table_size() == 0 {
            return (false, Some("routing table is empty".into()));
        }
        (true, None)
    }

    fn routing_table_size(&mut self) -> usize {
        self.swarm
            .behaviour_mut()
            .kad
            .kbuckets()
            .map(|b| b.num_entries())
            .sum()
    }

    fn candidates(&mut self) -> Vec<Candidate> {
        let mut list = Vec::new();
        let local = self.local;
        for bucket in self.swarm.behaviour_mut().kad.kbuckets() {
            for entry in bucket.iter() {
                let peer = *entry.node.key.preimage();
                let addrs: Vec<Multiaddr> = entry.node.value.iter().cloned().collect();
                list.push(Candidate {
                    peer,
                    addrs,
                    source: Source::Discovered,
                });
            }
        }
        list.shuffle(&mut rand::thread_rng());
        for peer in self.known.candidates() {
            list.push(Candidate {
                peer: peer.peer_id,
                addrs: peer.addrs,
                source: Source::Known,
            });
        }
        let deny = self.swarm.behaviour().deny.list();
        list.retain(|c| c.peer != local && deny.admits_peer(&c.peer));
        list
    }

    fn dial(&mut self, candidate: Candidate) {
        let Candidate {
            peer,
            addrs,
            source,
        } = candidate;
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        match self.start_dial(opts, Some(peer), source) {
            Ok(_) => self.peer_manager.on_dialing(peer, Instant::now()),
            Err(DialError::DialPeerConditionFalse(_)) => {
                // Someone else is dialing it already; its connection will do.
                if self.wanted.len() < MAX_WANTED {
                    self.wanted.insert(peer);
                }
                self.peer_manager.on_dialing(peer, Instant::now());
            }
            Err(e) => {
                self.peer_manager.on_dial_failure(peer, Instant::now());
                tracing::debug!(%peer, error = %e, "dial not started");
            }
        }
    }

    /// Every deliberate dial goes through here: counted by purpose, its connection
    /// held open once established, its failures counted whether they come at once
    /// or later (see `on_dial_error`).
    fn start_dial(
        &mut self,
        opts: DialOpts,
        peer: Option<PeerId>,
        source: Source,
    ) -> Result<ConnectionId, DialError> {
        let connection_id = opts.connection_id();
        let label = DialLabel {
            purpose: source.label(),
        };
        self.swarm.behaviour_mut().keep_alive.manage(connection_id);
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.metrics.dials.get_or_create(&label).inc();
                self.dial_sources.insert(connection_id, (peer, source));
                Ok(connection_id)
            }
            Err(e) => {
                if !matches!(e, DialError::DialPeerConditionFalse(_)) {
                    self.metrics.dials.get_or_create(&label).inc();
                    self.metrics.dial_failures.get_or_create(&label).inc();
                }
                if let DialError::Denied { cause } = &e {
                    self.count_denied(cause);
                }
                Err(e)
            }
        }
    }

    // ---------------------------------------------------------------- commands

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::Peers(reply) => {
                let _ = reply.send(self.peer_views());
            }
            Command::Reach(reply) => {
                let _ = reply.send(self.traversal.view());
            }
            Command::Connect { target, reply } => self.connect(target, reply),
            Command::Ban { target, reply } => {
                let _ = reply.send(Ok(self.ban(target)));
            }
            Command::Unban { target, reply } => {
                let _ = reply.send(self.unban(target));
            }
            Command::Bans(reply) => {
                let views = self
                    .swarm
                    .behaviour()
                    .deny
                    .list()
                    .entries()
                    .into_iter()
                    .map(|(target, from_config)| BanView {
                        target: target.to_string(),
                        source: if from_config { "config" } else { "runtime" }.into(),
                    })
                    .collect();
                let _ = reply.send(views);
            }
            Command::Publish {
                topic,
                title,
                body,
                reply,
            } => {
                let label = self.broadcast.label(&topic);
                let result = self.broadcast.publish(
                    &mut self.swarm.behaviour_mut().gossipsub,
                    &topic,
                    title,
                    body,
                );
                if result.is_ok() {
                    self.metrics
                        .messages_published
                        .get_or_create(&TopicLabel { topic: label })
                        .inc();
                }
                let _ = reply.send(result.map_err(CommandError::from));
            }
            Command::Subscribe { topic, reply } => {
                let result = self
                    .broadcast
                    .join(&mut self.swarm.behaviour_mut().gossipsub, &topic, false)
                    .map_err(CommandError::from);
                let _ = reply.send(result);
            }
            Command::FileRequest {
                peer,
                request,
                reply,
            } => {
                // request-response picks any connection; if all are relayed, so is this.
                let relayed = self.peers.get(&peer).is_some_and(|state| {
                    !state.connections.is_empty()
                        && state
                            .connections
                            .values()
                            .all(|c| crate::addr::is_relayed(&c.addr))
                });
                self.files
                    .request(&mut self.swarm, peer, request, reply, relayed)
            }
            Command::FindProviders { id, reply } => {
                self.files.find_providers(&mut self.swarm, id, reply)
            }
            Command::Provide { id, reply } => {
                self.files.provide(&mut self.swarm, id);
                let _ = reply.send(());
            }
            Command::Unprovide { id, reply } => {
                self.files.unprovide(&mut self.swarm, id);
                let _ = reply.send(());
            }
            Command::Penalize { peer, reason } => {
                self.files.penalize(&mut self.swarm, peer, reason)
            }
            Command::Search { term, ttl, reply } => {
                let _ = reply.send(self.files.search(&mut self.swarm, term, ttl));
            }
        }
    }

    fn connect(
        &mut self,
        target: ConnectTarget,
        reply: oneshot::Sender<Result<ConnectOutcome, CommandError>>,
    ) {
        let (peer, opts) = match &target {
            ConnectTarget::Addr(addr) => match addr.iter().last() {
                Some(Protocol::P2p(peer)) => (
                    Some(peer),
                    DialOpts::peer_id(peer)
                        .addresses(vec![addr.clone()])
                        .condition(PeerCondition::Always)
                        .build(),
                ),
                _ => (
                    None,
                    DialOpts::unknown_peer_id().address(addr.clone()).build(),
                ),
            },
            ConnectTarget::Peer(peer) => {
                let mut addrs = self.known.addrs(peer);
                addrs.extend(self.routing_addrs(peer));
                (
                    Some(*peer),
                    DialOpts::peer_id(*peer)
                        .addresses(addrs)
                        .condition(PeerCondition::Always)
                        .build(),
                )
            }
        };
        if let Some(peer) = peer {
            if peer == self.local {
                let _ = reply.send(Err(CommandError::Invalid("that is this node".into())));
                return;
            }
            if self.swarm.is_connected(&peer) {
                self.peer_manager.protect(peer);
                let addr = self
                    .peers
                    .get(&peer)
                    .and_then(|s| s.connections.values().next())
                    .map(|c| c.addr.to_string())
                    .unwrap_or_default();
                let _ = reply.send(Ok(ConnectOutcome {
                    peer_id: peer.to_string(),
                    addr,
                    already_connected: true,
                }));
                return;
            }
        }
        match self.start_dial(opts, peer, Source::Api) {
            Ok(connection_id) => {
                self.pending_connects.insert(connection_id, reply);
            }
            Err(DialError::NoAddresses) => {
                let _ = reply.send(Err(CommandError::NoAddress(target.to_string())));
            }
            Err(DialError::Denied { cause }) => {
                let _ = reply.send(Err(CommandError::Denied(cause.to_string())));
            }
            Err(e) => {
                let _ = reply.send(Err(CommandError::DialFailed(e.to_string())));
            }
        }
    }

    fn routing_addrs(&mut self, peer: &PeerId) -> Vec<Multiaddr> {
        let mut addrs = Vec::new();
        for bucket in self.swarm.behaviour_mut().kad.kbuckets() {
            for entry in bucket.iter() {
                if entry.node.key.preimage() == peer {
                    addrs.extend(entry.node.value.iter().cloned());
                }
            }
        }
        addrs
    }

    fn ban(&mut self, target: BanTarget) -> BanOutcome {
        let behaviour = self.swarm.behaviour_mut();
        let result = behaviour.deny.ban(target);
        if let BanTarget::Peer(peer) = target {
            behaviour.gossipsub.blacklist_peer(&peer);
            behaviour.kad.remove_peer(&peer);
            self.known.remove(&peer);
            self.peer_manager.forget(&peer);
        }
        self.save_bans();
        tracing::info!(%target, closed = result.unwrap_or(0), "banned");
        BanOutcome {
            target: target.to_string(),
            changed: result.is_some(),
            closed_connections: result.unwrap_or(0),
        }
    }

    fn unban(&mut self, target: BanTarget) -> Result<BanOutcome, CommandError> {
        let behaviour = self.swarm.behaviour_mut();
        let changed = behaviour
            .deny
            .unban(&target)
            .map_err(|e| CommandError::Invalid(e.to_string()))?;
        if let BanTarget::Peer(peer) = target {
            behaviour.gossipsub.remove_blacklisted_peer(&peer);
        }
        self.save_bans();
        tracing::info!(%target, changed, "unbanned");
        Ok(BanOutcome {
            target: target.to_string(),
            changed,
            closed_connections: 0,
        })
    }

    fn status(&mut self) -> Status {
        let routing_table_size = self.routing_table_size();
        let (ready, _) = self.readiness();
        let gossipsub = &self.swarm.behaviour().gossipsub;
        let topics = self
            .broadcast
            .topics()
            .into_iter()
            .map(|name| {
                let hash = gossipsub::IdentTopic::new(name.as_str()).hash();
                let peers = gossipsub
                    .all_peers()
                    .filter(|(_, topics)| topics.contains(&&hash))
                    .count();
                let mesh_peers = gossipsub.mesh_peers(&hash).count();
                TopicView {
                    name,
                    peers,
                    mesh_peers,
                }
            })
            .collect();
        Status {
            peer_id: self.local.to_string(),
            agent: format!("servant/{}", crate::VERSION),
            listen_addrs: self.listen_addrs().iter().map(|a| a.to_string()).collect(),
            external_addrs: self
                .swarm
                .external_addresses()
                .map(|a| a.to_string())
                .collect(),
            role: self.traversal.role().as_str().into(),
            reachability: self.traversal.reachability().as_str().into(),
            connected_peers: self.peer_manager.connected_count(),
            connections: self.peers.values().map(|p| p.connections.len()).sum(),
            routing_table_size,
            known_peers: self.known.len(),
            topics,
            bootnodes: self
                .peer_manager
                .bootnodes()
                .into_iter()
                .map(|(addr, connected)| BootnodeView {
                    addr: addr.to_string(),
                    connected,
                })
                .collect(),
            bootstrapped: self.bootstrapped,
            ready,
            uptime_secs: self.started.elapsed().as_secs(),
        }
    }

    fn peer_views(&self) -> Vec<PeerView> {
        let gossipsub = &self.swarm.behaviour().gossipsub;
        let topics: HashMap<&PeerId, usize> = gossipsub
            .all_peers()
            .map(|(peer, topics)| (peer, topics.len()))
            .collect();
        let mut views: Vec<PeerView> = self
            .peers
            .iter()
            .map(|(peer, state)| {
                let inbound = state.connections.values().any(|c| !c.outbound);
                let outbound = state.connections.values().any(|c| c.outbound);
                let direction = match (inbound, outbound) {
                    (true, true) => "both",
                    (false, true) => "outbound",
                    _ => "inbound",
                };
                PeerView {
                    peer_id: peer.to_string(),
                    addrs: state
                        .connections
                        .values()
                        .map(|c| c.addr.to_string())
                        .collect(),
                    direction: direction.into(),
                    agent: state.agent.clone(),
                    protocol_version: state.protocol_version.clone(),
                    rtt_ms: state.rtt.map(|d| d.as_secs_f64() * 1000.0),
                    connected_since: state.since_unix,
                    protected: self.peer_manager.is_protected(peer),
                    gossipsub_score: gossipsub.peer_score(peer),
                    gossip_topics: topics.get(peer).copied().unwrap_or(0),
                }
            })
            .collect();
        views.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        views
    }
}

/// How much a connection is worth keeping; the lowest are trimmed first.
fn usefulness(
    peer: &PeerId,
    mesh: &std::collections::HashSet<PeerId>,
    gossip_score: Option<f64>,
    state: Option<&PeerState>,
    now: Instant,
) -> f64 {
    let mut score = 0.0;
    if mesh.contains(peer) {
        score += 100.0;
    }
    score += gossip_score.unwrap_or(0.0).clamp(-100.0, 100.0);
    if let Some(state) = state {
        // Peers we chose are worth more than peers that chose us (an attacker can
        // fill our inbound slots, not our outbound ones) or that a DHT lookup met.
        if state.connections.values().any(|c| c.chosen) {
            score += 10.0;
        }
        score += (now.duration_since(state.since).as_secs_f64() / 60.0).min(30.0);
    }
    score
}

/// What a failed handshake most likely means for a private network, which libp2p's
/// errors cannot say: a node without the pre-shared key reads the other side's
/// encrypted bytes as garbage, and each side sees only "handshake failed".
fn handshake_hint(error: &str, private_network: bool) -> Option<&'static str> {
    if !error.contains("Handshake failed") && !error.contains("Failed to negotiate") {
        return None;
    }
    Some(if private_network {
        "this node is in a private network (psk_file): a peer without the same pre-shared key cannot complete the handshake"
    } else {
        "a private network's nodes (pre-shared key) break off the handshake of nodes without their key: if this network is private, set psk_file"
    })
}

/// The address a connection is known by, and whether we dialed it. A relayed
/// inbound connection's send-back address is only the remote's `/p2p/` id; its
/// local address, the circuit it arrived through, says what it is.
fn endpoint_addr(endpoint: &ConnectedPoint) -> (Multiaddr, bool) {
    match endpoint {
        ConnectedPoint::Dialer { address, .. } => (address.clone(), true),
        ConnectedPoint::Listener { local_addr, .. } if crate::addr::is_relayed(local_addr) => {
            (local_addr.clone(), false)
        }
        ConnectedPoint::Listener { send_back_addr, .. } => (send_back_addr.clone(), false),
    }
}

fn connection_label(addr: &Multiaddr, outbound: bool) -> ConnectionLabel {
    ConnectionLabel {
        direction: if outbound { "outbound" } else { "inbound" },
        transport: crate::addr::transport(addr),
    }
}
