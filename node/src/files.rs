//! The event loop's side of file sharing and search: serving manifests and chunks,
//! carrying fetch requests and provider lookups for [`fetch`](crate::fetch) tasks,
//! flooding queries and passing hits back, and penalizing peers that lie.
//!
//! Nothing here touches the disk on the event loop: chunk reads run on the blocking
//! pool and come back as [`Served`] messages, which the loop hands to
//! [`Files::on_served`].

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use libp2p::{
    kad::{self, GetProvidersOk, QueryId, RecordKey},
    request_response::{self, InboundRequestId, OutboundRequestId, ResponseChannel},
    swarm::dial_opts::{DialOpts, PeerCondition},
    Multiaddr, PeerId, Swarm,
};
use servant_protocol::{
    file::{Request, Response},
    manifest::ContentId,
    search::{self, Ack, Hit, Message, MAX_HITS_PER_MESSAGE},
};
use tokio::sync::{mpsc, oneshot};

use crate::{
    behaviour::Behaviour,
    client::{CommandError, Providers},
    config::Config,
    metrics::{FileMetrics, ReasonLabel},
    search::{new_query_id, HitsVerdict, QueryVerdict, Searches},
    store::Store,
};

/// A provider lookup answers once it has providers and has run this long, without
/// waiting for the whole DHT query.
const LOOKUP_EARLY_ANSWER: Duration = Duration::from_secs(3);
/// A provider lookup answers with whatever it has after this long.
const LOOKUP_DEADLINE: Duration = Duration::from_secs(20);
/// Gossipsub application score per penalty point (gossipsub weighs it by 10, so one
/// corrupt chunk takes a peer below the graylist threshold of -80).
const PENALTY_SCORE: f64 = -10.0;
/// Penalty points decay by half over this period.
const PENALTY_HALF_LIFE: Duration = Duration::from_secs(600);
/// Most addresses of this node given in a search hit.
const HIT_ADDRS: usize = 4;
/// Most file requests of ours in flight to one peer, across all fetches; beyond it a
/// fetch is told "busy" at once. Kept below the request-response stream cap per
/// connection (see `behaviour`), which would otherwise fail the requests outright.
pub const MAX_OUTBOUND_PER_PEER: u32 = 64;

/// A response read off the event loop, ready to send (or to delay, when the peer is
/// over its serving rate).
pub struct Served {
    peer: PeerId,
    request_id: InboundRequestId,
    channel: ResponseChannel<Response>,
    response: Response,
    outcome: &'static str,
    /// Already waited for the rate limit.
    paced: bool,
}

struct Lookup {
    id: ContentId,
    recorded: HashSet<PeerId>,
    started: Instant,
    reply: oneshot::Sender<Providers>,
}

#[derive(Default)]
struct PeerServe {
    in_flight: u32,
    /// Virtual time at which the peer's rate allows the next byte.
    next_free: Option<Instant>,
    /// When the peer must have read everything handed to it so far: responses share
    /// the peer's link, so each one's deadline follows the one before (see
    /// [`crate::slow_peers::response_deadline`]).
    read_by: Option<Instant>,
}

struct Penalty {
    points: f64,
    updated: Instant,
}

/// An outbound request: the peer, who waits for the answer, and whether it went over a
/// relayed connection.
type PendingRequest = (PeerId, oneshot::Sender<Result<Response, String>>, bool);

/// File sharing and search state owned by the event loop.
pub struct Files {
    store: Arc<Store>,
    local: PeerId,
    metrics: FileMetrics,
    serve_concurrency: u32,
    serve_rate: u64,
    served_tx: mpsc::UnboundedSender<Served>,
    serving: HashMap<PeerId, PeerServe>,
    /// Responses handed to the swarm and not yet written, with the time each must be
    /// read by: they still count against the peer's concurrency until sent (or failed).
    responding: HashMap<InboundRequestId, (PeerId, Instant)>,
    /// Our requests in flight: the peer, who waits for the answer, and whether the
    /// request went over a relayed connection (a failure then names the relay).
    pending: HashMap<OutboundRequestId, PendingRequest>,
    outbound: HashMap<PeerId, u32>,
    lookups: HashMap<QueryId, Lookup>,
    searches: Searches,
    penalties: HashMap<PeerId, Penalty>,
}

impl Files {
    /// The service and the receiver of served responses, which the event loop polls.
    /// The channel is unbounded but never holds more than the serving limits allow
    /// (concurrency per peer times connected peers).
    pub fn new(
        store: Arc<Store>,
        local: PeerId,
        config: &Config,
        metrics: FileMetrics,
    ) -> (Files, mpsc::UnboundedReceiver<Served>) {
        let (served_tx, served_rx) = mpsc::unbounded_channel();
        let files = Files {
            store,
            local,
            metrics,
            serve_concurrency: config.serve_concurrency_per_peer,
            serve_rate: config.serve_rate_per_peer.get(),
            served_tx,
            serving: HashMap::new(),
            responding: HashMap::new(),
            pending: HashMap::new(),
            outbound: HashMap::new(),
            lookups: HashMap::new(),
            searches: Searches::new(config.search_rate_per_peer),
            penalties: HashMap::new(),
        };
        (files, served_rx)
    }

    /// Announces everything the store can serve: at start, and again once the node
    /// has joined the DHT (Kademlia re-announces it periodically afterwards).
    pub fn provide_all(&mut self, swarm: &mut Swarm<Behaviour>) {
        for id in self.store.complete_ids() {
            self.provide(swarm, id);
        }
        self.refresh_gauges(swarm);
    }

    /// Starts announcing `id`.
    pub fn provide(&mut self, swarm: &mut Swarm<Behaviour>, id: ContentId) {
        if let Err(e) = swarm.behaviour_mut().kad.start_providing(key(&id)) {
            tracing::warn!(content = %id, error = ?e, "cannot announce content");
        }
        self.refresh_gauges(swarm);
    }

    /// Stops announcing `id`.
    pub fn unprovide(&mut self, swarm: &mut Swarm<Behaviour>, id: ContentId) {
        swarm.behaviour_mut().kad.stop_providing(&key(&id));
        self.refresh_gauges(swarm);
    }

    /// Updates the store gauges.
    pub fn refresh_gauges(&self, swarm: &mut Swarm<Behaviour>) {
        let provided = swarm.behaviour_mut().kad.store_mut().own_len();
        self.metrics.provided.set(provided as i64);
        self.metrics.store_bytes.set(self.store.used_bytes() as i64);
        self.metrics.store_contents.set(self.store.len() as i64);
    }

    // ------------------------------------------------------------------ serving

    /// A file-protocol event.
    pub fn on_file_event(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        event: request_response::Event<Request, Response>,
    ) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request_id,
                    request,
                    channel,
                } => self.on_request(swarm, peer, request_id, request, channel),
                request_response::Message::Response {
                    request_id,
                    response,
                } => self.answered(request_id, Ok(response)),
            },
            request_response::Event::OutboundFailure {
                request_id, error, ..
            } => self.answered(request_id, Err(error.to_string())),
            request_response::Event::InboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                self.sent(request_id);
                self.on_inbound_failure(swarm, peer, "file", &error);
            }
            request_response::Event::ResponseSent { request_id, .. } => self.sent(request_id),
        }
    }

    /// Peers with a response of ours unread past its deadline (see
    /// [`crate::slow_peers`]), each once.
    pub fn overdue_readers(&self, now: Instant) -> Vec<PeerId> {
        let mut peers: Vec<PeerId> = self
            .responding
            .values()
            .filter(|(_, deadline)| *deadline < now)
            .map(|(peer, _)| *peer)
            .collect();
        peers.sort();
        peers.dedup();
        peers
    }

    /// Forgets the responses pending to `peer`, which is being disconnected for not
    /// reading them.
    pub fn forget_responses(&mut self, peer: &PeerId) {
        let before = self.responding.len();
        self.responding.retain(|_, (p, _)| p != peer);
        let forgotten = (before - self.responding.len()) as u32;
        if let Some(state) = self.serving.get_mut(peer) {
            state.in_flight = state.in_flight.saturating_sub(forgotten);
            state.read_by = None;
        }
    }

    /// A response of ours is written (or failed): the peer may have another.
    fn sent(&mut self, request_id: InboundRequestId) {
        if let Some((peer, _)) = self.responding.remove(&request_id) {
            if let Some(state) = self.serving.get_mut(&peer) {
                state.in_flight = state.in_flight.saturating_sub(1);
            }
        }
    }

    fn answered(&mut self, request_id: OutboundRequestId, answer: Result<Response, String>) {
        if let Some((peer, reply, relayed)) = self.pending.remove(&request_id) {
            if let Some(n) = self.outbound.get_mut(&peer) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.outbound.remove(&peer);
                }
            }
            // A relay on the signaling profile cuts a circuit after 2 minutes or 128 KiB:
            // the one cause of such a failure the user can act on.
            let answer = answer.map_err(|e| {
                if relayed {
                    format!("{e} (over a relayed connection: the relay may have cut the circuit at its limits; relays running --relay-profile data carry transfers)")
                } else {
                    e
                }
            });
            let _ = reply.send(answer);
        }
    }

    /// An inbound request that failed. Frames our codecs refused (a length over the
    /// limit, an unknown kind, bad JSON) are hostile or broken: counted and penalized.
    fn on_inbound_failure(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        protocol: &'static str,
        error: &request_response::InboundFailure,
    ) {
        match error {
            request_response::InboundFailure::Io(e)
                if e.kind() == std::io::ErrorKind::InvalidData =>
            {
                tracing::debug!(%peer, protocol, error = %e, "malformed request refused");
                self.metrics
                    .malformed_frames
                    .get_or_create(&ReasonLabel { reason: protocol })
                    .inc();
                self.penalize(swarm, peer, "malformed_frame");
            }
            other => tracing::debug!(%peer, protocol, error = %other, "inbound request failed"),
        }
    }

    fn on_request(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        request_id: InboundRequestId,
        request: Request,
        channel: ResponseChannel<Response>,
    ) {
        let state = self.serving.entry(peer).or_default();
        if state.in_flight >= self.serve_concurrency {
            self.metrics
                .requests_served
                .get_or_create(&ReasonLabel { reason: "busy" })
                .inc();
            let _ = swarm
                .behaviour_mut()
                .file
                .send_response(channel, Response::Busy);
            return;
        }
        state.in_flight += 1;
        let store = self.store.clone();
        let tx = self.served_tx.clone();
        tokio::spawn(async move {
            let answer = tokio::task::spawn_blocking(move || answer(&store, request)).await;
            let (response, outcome) = answer.unwrap_or((Response::NotFound, "not_found"));
            let _ = tx.send(Served {
                peer,
                request_id,
                channel,
                response,
                outcome,
                paced: false,
            });
        });
    }

    /// A response read by a serving task: sent now, or after the peer's rate allows.
    pub fn on_served(&mut self, swarm: &mut Swarm<Behaviour>, mut served: Served) {
        let bytes = served.response.data().len() as u64;
        if self.serve_rate > 0 && !served.paced && bytes > 0 {
            let now = Instant::now();
            let state = self.serving.entry(served.peer).or_default();
            let start = state.next_free.map_or(now, |t| t.max(now));
            state.next_free =
                Some(start + Duration::from_secs_f64(bytes as f64 / self.serve_rate as f64));
            if start > now {
                served.paced = true;
                let tx = self.served_tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep_until(start.into()).await;
                    let _ = tx.send(served);
                });
                return;
            }
        }
        self.metrics
            .requests_served
            .get_or_create(&ReasonLabel {
                reason: served.outcome,
            })
            .inc();
        self.metrics.bytes_served.inc_by(bytes);
        let sent = swarm
            .behaviour_mut()
            .file
            .send_response(served.channel, served.response);
        if sent.is_ok() {
            let state = self.serving.entry(served.peer).or_default();
            let deadline =
                crate::slow_peers::response_deadline(bytes, Instant::now(), state.read_by);
            state.read_by = Some(deadline);
            self.responding
                .insert(served.request_id, (served.peer, deadline));
        } else if let Some(state) = self.serving.get_mut(&served.peer) {
            // The stream is gone (the peer left, or its request timed out).
            state.in_flight = state.in_flight.saturating_sub(1);
        }
    }

    // ----------------------------------------------------------------- fetching

    /// Sends a fetch task's request.
    pub fn request(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        request: Request,
        reply: oneshot::Sender<Result<Response, String>>,
        relayed: bool,
    ) {
        if peer == self.local {
            let _ = reply.send(Err("that is this node".into()));
            return;
        }
        let outstanding = self.outbound.entry(peer).or_default();
        if *outstanding >= MAX_OUTBOUND_PER_PEER {
            let _ = reply.send(Ok(Response::Busy));
            return;
        }
        *outstanding += 1;
        let id = swarm.behaviour_mut().file.send_request(&peer, request);
        self.pending.insert(id, (peer, reply, relayed));
    }

    /// Starts a provider lookup.
    pub fn find_providers(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        id: ContentId,
        reply: oneshot::Sender<Providers>,
    ) {
        let query = swarm.behaviour_mut().kad.get_providers(key(&id));
        self.lookups.insert(
            query,
            Lookup {
                id,
                recorded: HashSet::new(),
                started: Instant::now(),
                reply,
            },
        );
    }

    /// Progress of a Kademlia provider lookup.
    pub fn on_providers(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        query: QueryId,
        result: Result<GetProvidersOk, kad::GetProvidersError>,
        last: bool,
    ) {
        let Some(lookup) = self.lookups.get_mut(&query) else {
            return;
        };
        if let Ok(GetProvidersOk::FoundProviders { providers, .. }) = result {
            for peer in providers {
                if peer == self.local || !lookup.recorded.insert(peer) {
                    continue;
                }
                // Dial while the query still holds the provider's addresses: once it
                // ends, Kademlia forgets addresses of peers outside its routing table.
                if !swarm.is_connected(&peer) {
                    let opts = DialOpts::peer_id(peer)
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .build();
                    let _ = swarm.dial(opts);
                }
            }
        }
        if last {
            self.answer_lookup(swarm, query);
        }
    }

    fn answer_lookup(&mut self, swarm: &Swarm<Behaviour>, query: QueryId) {
        let Some(lookup) = self.lookups.remove(&query) else {
            return;
        };
        let connected = swarm
            .connected_peers()
            .filter(|p| !lookup.recorded.contains(p))
            .copied()
            .collect();
        tracing::debug!(content = %lookup.id, providers = lookup.recorded.len(), "provider lookup answered");
        let _ = lookup.reply.send(Providers {
            recorded: lookup.recorded.into_iter().collect(),
            connected,
        });
    }

    /// Penalizes a misbehaving peer: counted, and its gossipsub score lowered (which
    /// also makes it the first to be trimmed).
    pub fn penalize(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerId, reason: &'static str) {
        self.metrics
            .peer_penalties
            .get_or_create(&ReasonLabel { reason })
            .inc();
        let now = Instant::now();
        let penalty = self.penalties.entry(peer).or_insert(Penalty {
            points: 0.0,
            updated: now,
        });
        penalty.points += 1.0;
        tracing::warn!(%peer, reason, points = penalty.points, "peer penalized");
        swarm
            .behaviour_mut()
            .gossipsub
            .set_application_score(&peer, penalty.points * PENALTY_SCORE);
    }

    // ------------------------------------------------------------------ search

    /// Starts a local search: the query goes to every connected peer.
    pub fn search(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        term: String,
        ttl: u8,
    ) -> Result<mpsc::Receiver<Hit>, CommandError> {
        let id = new_query_id();
        let query = Message::Query {
            id: id.clone(),
            term,
            ttl: ttl.clamp(1, search::MAX_TTL),
        };
        query
            .validate()
            .map_err(|e| CommandError::Invalid(e.to_string()))?;
        let rx = self.searches.start_local(id, Instant::now());
        let peers: Vec<PeerId> = swarm.connected_peers().copied().collect();
        for peer in peers {
            swarm
                .behaviour_mut()
                .search
                .send_request(&peer, query.clone());
        }
        Ok(rx)
    }

    /// A search-protocol event.
    pub fn on_search_event(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        event: request_response::Event<Message, Ack>,
    ) {
        match event {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                let ack = self.on_search_message(swarm, peer, request);
                let _ = swarm.behaviour_mut().search.send_response(channel, ack);
            }
            request_response::Event::Message { .. }
            | request_response::Event::ResponseSent { .. } => {}
            request_response::Event::OutboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "search message not delivered");
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                self.on_inbound_failure(swarm, peer, "search", &error);
            }
        }
    }

    fn on_search_message(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        from: PeerId,
        message: Message,
    ) -> Ack {
        let now = Instant::now();
        match message {
            Message::Query { id, term, ttl } => match self.searches.on_query(from, &id, ttl, now) {
                QueryVerdict::RateLimited => {
                    self.metrics.search_rate_limited.inc();
                    Ack::RateLimited
                }
                QueryVerdict::Duplicate => Ack::Duplicate,
                QueryVerdict::Accept { forward_ttl } => {
                    let hits = self.local_hits(swarm, &term);
                    if !hits.is_empty() {
                        self.metrics.search_answered.inc();
                        for chunk in hits.chunks(MAX_HITS_PER_MESSAGE) {
                            let message = Message::Hits {
                                id: id.clone(),
                                hits: chunk.to_vec(),
                            };
                            swarm.behaviour_mut().search.send_request(&from, message);
                        }
                    }
                    if forward_ttl > 0 {
                        let forward = Message::Query {
                            id,
                            term,
                            ttl: forward_ttl,
                        };
                        let peers: Vec<PeerId> = swarm
                            .connected_peers()
                            .filter(|p| **p != from)
                            .copied()
                            .collect();
                        for peer in peers {
                            self.metrics.search_forwarded.inc();
                            swarm
                                .behaviour_mut()
                                .search
                                .send_request(&peer, forward.clone());
                        }
                    }
                    Ack::Ok
                }
            },
            Message::Hits { id, hits } => {
                let count = hits.len() as u64;
                match self.searches.on_hits(from, &id, hits.clone(), now) {
                    HitsVerdict::RateLimited => {
                        self.metrics.search_rate_limited.inc();
                        Ack::RateLimited
                    }
                    HitsVerdict::Unknown => Ack::UnknownQuery,
                    HitsVerdict::Delivered(n) => {
                        self.metrics
                            .search_hits
                            .get_or_create(&ReasonLabel {
                                reason: "delivered",
                            })
                            .inc_by(n as u64);
                        Ack::Ok
                    }
                    HitsVerdict::Forward(back) => {
                        if swarm.is_connected(&back) {
                            self.metrics
                                .search_hits
                                .get_or_create(&ReasonLabel {
                                    reason: "forwarded",
                                })
                                .inc_by(count);
                            swarm
                                .behaviour_mut()
                                .search
                                .send_request(&back, Message::Hits { id, hits });
                        }
                        Ack::Ok
                    }
                }
            }
        }
    }

    /// Hits from this node's complete contents.
    fn local_hits(&self, swarm: &Swarm<Behaviour>, term: &str) -> Vec<Hit> {
        let addrs: Vec<String> = own_addrs(swarm)
            .into_iter()
            .take(HIT_ADDRS)
            .map(|a| a.to_string())
            .collect();
        self.store
            .catalog()
            .into_iter()
            .filter(|(id, name, ..)| search::matches(term, name, id))
            .map(|(id, name, size, kind)| Hit {
                id,
                name: name.chars().take(search::MAX_HIT_NAME_BYTES / 4).collect(),
                size,
                kind,
                provider: self.local.to_string(),
                addrs: addrs.clone(),
            })
            .collect()
    }

    // -------------------------------------------------------------------- ticks

    /// Periodic upkeep: late lookups answered, penalties decayed, state of
    /// disconnected peers dropped.
    pub fn on_tick(&mut self, swarm: &mut Swarm<Behaviour>) {
        let now = Instant::now();
        let due: Vec<QueryId> = self
            .lookups
            .iter()
            .filter(|(_, l)| {
                let age = now.duration_since(l.started);
                age >= LOOKUP_DEADLINE
                    || (age >= LOOKUP_EARLY_ANSWER && !l.recorded.is_empty())
                    || l.reply.is_closed()
            })
            .map(|(q, _)| *q)
            .collect();
        for query in due {
            if let Some(mut q) = swarm.behaviour_mut().kad.query_mut(&query) {
                q.finish();
            }
            self.answer_lookup(swarm, query);
        }
        let mut cleared = Vec::new();
        for (peer, penalty) in &mut self.penalties {
            let elapsed = now.duration_since(penalty.updated).as_secs_f64();
            penalty.points *= 0.5f64.powf(elapsed / PENALTY_HALF_LIFE.as_secs_f64());
            penalty.updated = now;
            if penalty.points < 0.05 {
                cleared.push(*peer);
            }
        }
        for peer in cleared {
            self.penalties.remove(&peer);
            swarm
                .behaviour_mut()
                .gossipsub
                .set_application_score(&peer, 0.0);
        }
        for (peer, penalty) in &self.penalties {
            swarm
                .behaviour_mut()
                .gossipsub
                .set_application_score(peer, penalty.points * PENALTY_SCORE);
        }
        self.searches.prune(now, |p| swarm.is_connected(p));
        self.serving.retain(|p, s| {
            s.in_flight > 0 || s.next_free.is_some_and(|t| t > now) || swarm.is_connected(p)
        });
        self.refresh_gauges(swarm);
    }
}

/// Reads the answer to a file request from the store (on the blocking pool).
fn answer(store: &Store, request: Request) -> (Response, &'static str) {
    match request {
        Request::Manifest(id) => match store.info(id) {
            Some(info) if info.complete => match store.manifest_bytes(id) {
                Ok(Some(bytes)) => (Response::Manifest(bytes), "manifest"),
                Ok(None) => (Response::NotFound, "not_found"),
                Err(e) => {
                    tracing::warn!(content = %id, error = %e, "cannot read manifest");
                    (Response::NotFound, "not_found")
                }
            },
            _ => (Response::NotFound, "not_found"),
        },
        Request::Chunk { id, index } => {
            // Not `info`: it counts the chunks held, a walk of the whole manifest,
            // and this runs for every chunk served.
            let Some(chunks) = store.chunk_count(id) else {
                return (Response::NotFound, "not_found");
            };
            if index >= chunks {
                return (Response::BadRequest, "bad_request");
            }
            match store.read_chunk(id, index) {
                Ok(Some(data)) => (Response::Chunk(data), "chunk"),
                Ok(None) => (Response::NotFound, "not_found"),
                Err(e) => {
                    tracing::warn!(content = %id, index, error = %e, "cannot read chunk");
                    (Response::NotFound, "not_found")
                }
            }
        }
    }
}

/// The Kademlia key of a content id.
pub fn key(id: &ContentId) -> RecordKey {
    RecordKey::new(&id.0)
}

/// This node's addresses worth giving out: confirmed external ones, then listen ones
/// that are dialable.
fn own_addrs(swarm: &Swarm<Behaviour>) -> Vec<Multiaddr> {
    swarm
        .external_addresses()
        .chain(swarm.listeners())
        .filter(|a| crate::addr::is_dialable(a) && !crate::addr::is_link_local(a))
        .cloned()
        .collect()
}
