//! The node's composed libp2p behaviour: one field per protocol.
//!
//! Order matters: the swarm asks each behaviour in field order whether to accept a
//! connection, so the deny list and the limits come first and refuse a connection
//! before any protocol sets up state for it; gossipsub, which refuses peers cut off
//! for flooding, comes right after them. The swarm also polls the members in field
//! order and hands over the first one's event before asking the next, so the relay and
//! DCUtR come next: a circuit being set up or a hole punch's dial does not wait behind
//! the events that Kademlia and identify make of the same new connection.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use libp2p::{
    connection_limits::{self, ConnectionLimits},
    dcutr, gossipsub, identify,
    identity::Keypair,
    kad, ping, relay, request_response,
    swarm::{behaviour::toggle::Toggle, NetworkBehaviour},
    StreamProtocol,
};

use prometheus_client::registry::Registry;

use crate::{
    codecs::{FileCodec, SearchCodec, FILE_PROTOCOL, SEARCH_PROTOCOL},
    config::Config,
    deny,
    flat_protocols::Flat,
    keep_alive,
    provider_store::ProviderStore,
    reach,
    relayed_hold::Held,
    subscription_cap::SubscriptionCap,
};

/// Identify's protocol version: peers on another version are other networks.
pub const PROTOCOL_VERSION: &str = "/servant/1.0.0";
/// Servant's private Kademlia DHT (not the IPFS one).
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/servant/kad/1.0.0");
/// Gossipsub's transmit limit: a little above the envelope limit, so oversize
/// envelopes reach our validation (and are counted and penalized there) while
/// anything far larger is cut by gossipsub itself.
pub const GOSSIPSUB_MAX_TRANSMIT: usize = servant_protocol::limits::MAX_ENVELOPE_BYTES + 16 * 1024;
/// Ping period and timeout; a failed ping closes the connection, so a peer that
/// vanished without closing leaves every view within about twice this.
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
/// How long a file request may take, answer included: a 4 MiB chunk over a slow
/// link, queued behind others of the same fetch.
pub const FILE_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// File-protocol streams per connection, both directions: room for our own requests
/// (at most `files::MAX_OUTBOUND_PER_PEER`) and the peer's, whose excess we answer
/// "busy" at once.
pub const FILE_STREAMS_PER_CONNECTION: usize = 160;
/// How long a search message may wait for its acknowledgement.
pub const SEARCH_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long Kademlia keeps a remote provider record without a re-announcement.
pub const PROVIDER_RECORD_TTL: Duration = Duration::from_secs(6 * 3600);

/// Everything the node speaks, as the swarm runs it: [`Protocols`] with their
/// inbound protocol names offered as one flat list (see [`crate::flat_protocols`]).
pub type Behaviour = Flat<Protocols>;

/// What [`Behaviour`] reports: one variant per member of [`Protocols`].
pub type BehaviourEvent = ProtocolsEvent;

/// Everything the node speaks. Servant's own protocols are [`Held`] on relayed
/// connections for a moment, so DCUtR goes first.
#[derive(NetworkBehaviour)]
pub struct Protocols {
    /// Refuses denied PeerIds and IP ranges; closes live connections on a new ban.
    pub deny: deny::Behaviour,
    /// Hard caps on established and pending connections.
    pub limits: connection_limits::Behaviour,
    /// Hard cap on inbound connections per remote IP address.
    pub ip_limits: crate::ip_limits::Behaviour,
    /// Keeps connections open until the peer manager trims them.
    pub keep_alive: keep_alive::Behaviour,
    /// Broadcast: signed messages, content-hash ids, validation by the node, scoring,
    /// and a per-peer budget for control traffic. It refuses peers cut off for
    /// flooding, so it comes before every member that keeps state about a connection
    /// once accepted (DCUtR would count a refused direct connection as a success).
    /// No member after it may refuse an established connection.
    pub gossipsub: Held<crate::gossip_budget::Budgeted>,
    /// Circuit relay v2 server; it offers the hop protocol only on super-peers.
    pub relay: relay::Behaviour,
    /// Circuit relay v2 client: reservations on super-peers, relayed dials.
    pub relay_client: relay::client::Behaviour,
    /// Upgrades relayed connections to direct ones by hole punching.
    pub dcutr: dcutr::Behaviour,
    /// Exchanges listen addresses, protocols and versions; feeds Kademlia.
    pub identify: Held<identify::Behaviour>,
    /// Liveness and round-trip time.
    pub ping: Held<ping::Behaviour>,
    /// Peer discovery on Servant's private DHT.
    pub kad: Held<kad::Behaviour<ProviderStore>>,
    /// Manifests and chunks, `/servant/file/1.0.0`.
    pub file: Held<request_response::Behaviour<FileCodec>>,
    /// Queries with a time-to-live and their hits, `/servant/search/1.0.0`.
    pub search: Held<request_response::Behaviour<SearchCodec>>,
    /// Raw streams: Servant's AutoNAT v2 client and its dial-back answers.
    pub stream: crate::streams::Behaviour,
    /// AutoNAT v2 server, throttled: dials peers back so they learn their reachability.
    pub autonat: reach::server::Behaviour,
    /// Port mapping on the local gateway by UPnP, unless turned off (`--no-upnp`).
    pub upnp: Toggle<crate::upnp::Behaviour>,
}

/// Why the behaviour could not be built (a parameter gossipsub refused).
#[derive(Debug, thiserror::Error)]
#[error("cannot configure {protocol}: {reason}")]
pub struct BehaviourError {
    protocol: &'static str,
    reason: String,
}

impl Protocols {
    /// Builds every protocol from the node's config.
    pub fn new(
        key: &Keypair,
        config: &Config,
        deny_list: deny::DenyList,
        relay_client: relay::client::Behaviour,
        registry: &mut Registry,
    ) -> Result<Self, BehaviourError> {
        let peer_id = key.public().to_peer_id();
        let limits = ConnectionLimits::default()
            .with_max_established(Some(config.max_connections))
            .with_max_established_per_peer(Some(config.max_connections_per_peer))
            .with_max_pending_incoming(Some(config.max_pending_connections))
            .with_max_pending_outgoing(Some(config.max_pending_connections));

        let identify = identify::Behaviour::new(
            identify::Config::new(PROTOCOL_VERSION.to_string(), key.public())
                .with_agent_version(format!("servant/{}", crate::VERSION))
                .with_push_listen_addr_updates(true)
                .with_cache_size(256),
        );

        let ping = ping::Behaviour::new(
            ping::Config::new()
                .with_interval(PING_INTERVAL)
                .with_timeout(PING_INTERVAL),
        );

        let mut kad_config = kad::Config::new(KAD_PROTOCOL);
        kad_config
            .set_periodic_bootstrap_interval(Some(config.bootstrap_interval.get()))
            .set_query_timeout(Duration::from_secs(30))
            // The DHT is for finding peers and providers: the event loop stores the
            // provider records remote peers push (into the capped part of the store)
            // and drops value records, which Servant has no use for.
            .set_record_filtering(kad::StoreInserts::FilterBoth)
            .set_provider_publication_interval(Some(config.reprovide_interval.get()))
            .set_provider_record_ttl(Some(
                PROVIDER_RECORD_TTL.max(config.reprovide_interval.get() * 2),
            ));
        let mut kad = kad::Behaviour::with_config(peer_id, ProviderStore::new(peer_id), kad_config);
        // Every node answers DHT queries until its role says otherwise (see `role`).
        kad.set_mode(Some(kad::Mode::Server));
        let mut relay = relay::Behaviour::new(peer_id, config.relay_profile.relay_config());
        // Offered only once the node is a super-peer (see `role`).
        relay.set_status(Some(relay::Status::Disable));

        let floods = prometheus_client::metrics::counter::Counter::default();
        registry.sub_registry_with_prefix("servant").register(
            "gossip_control_floods",
            "Peers disconnected for sending more gossipsub control messages than their budget",
            floods.clone(),
        );
        let gossipsub = crate::gossip_budget::Budgeted::new(
            build_gossipsub(key, registry, true)?,
            config.gossip_control_burst,
            config.gossip_control_rate,
            floods,
        );

        Ok(Protocols {
            deny: deny::Behaviour::new(deny_list),
            limits: connection_limits::Behaviour::new(limits),
            ip_limits: crate::ip_limits::Behaviour::new(config.max_connections_per_ip),
            keep_alive: keep_alive::Behaviour::default(),
            identify: Held::new(identify),
            ping: Held::new(ping),
            kad: Held::new(kad),
            gossipsub: Held::new(gossipsub),
            file: Held::new(request_response::Behaviour::with_codec(
                FileCodec,
                [(FILE_PROTOCOL, request_response::ProtocolSupport::Full)],
                request_response::Config::default()
                    .with_request_timeout(FILE_REQUEST_TIMEOUT)
                    .with_max_concurrent_streams(FILE_STREAMS_PER_CONNECTION),
            )),
            search: Held::new(request_response::Behaviour::with_codec(
                SearchCodec,
                [(SEARCH_PROTOCOL, request_response::ProtocolSupport::Full)],
                request_response::Config::default().with_request_timeout(SEARCH_REQUEST_TIMEOUT),
            )),
            stream: crate::streams::Behaviour::new(),
            autonat: reach::server::Behaviour::default(),
            relay,
            relay_client,
            dcutr: dcutr::Behaviour::new(peer_id),
            upnp: Toggle::from(config.upnp.then(crate::upnp::Behaviour::new)),
        })
    }
}

/// Gossipsub's message id: the BLAKE3 hash of the message bytes, so the same
/// content is one message however many peers forward it.
pub fn message_id(message: &gossipsub::Message) -> gossipsub::MessageId {
    gossipsub::MessageId::from(blake3::hash(&message.data).as_bytes().to_vec())
}

/// Gossipsub's parameters; `validate` is Servant's own check before forwarding
/// (see `broadcast`).
fn gossipsub_config(validate: bool) -> Result<gossipsub::Config, BehaviourError> {
    let mut builder = gossipsub::ConfigBuilder::default();
    builder
        .validation_mode(gossipsub::ValidationMode::Strict)
        .message_id_fn(message_id)
        .max_transmit_size(GOSSIPSUB_MAX_TRANSMIT)
        .connection_handler_queue_len(crate::slow_peers::GOSSIP_QUEUE_LEN);
    if validate {
        builder.validate_messages();
    }
    builder.build().map_err(|e| BehaviourError {
        protocol: "gossipsub",
        reason: e.to_string(),
    })
}

/// Gossipsub with each remote peer's remembered topics capped.
pub type Gossipsub = gossipsub::Behaviour<gossipsub::IdentityTransform, SubscriptionCap>;

/// Gossipsub as Servant runs it: signed, strict, scored, with its metrics in
/// `registry`. `validate` holds each message for the node's envelope check before
/// forwarding; benchmarks turn it off for a bare baseline that is otherwise identical.
pub fn build_gossipsub(
    key: &Keypair,
    registry: &mut Registry,
    validate: bool,
) -> Result<Gossipsub, BehaviourError> {
    let err = |reason: String| BehaviourError {
        protocol: "gossipsub",
        reason,
    };
    let config = gossipsub_config(validate)?;
    let behaviour = gossipsub::Behaviour::new_with_subscription_filter(
        gossipsub::MessageAuthenticity::Signed(key.clone()),
        config,
        crate::subscription_cap::subscription_cap(),
    )
    .map_err(|e| err(e.to_string()))?;
    // Gossipsub's own families (mesh sizes, duplicates, scores) under
    // libp2p_gossipsub_*, labelled only by topics this node joins.
    let thresholds = gossipsub::PeerScoreThresholds::default();
    let mut metrics_config = gossipsub::MetricsConfig {
        max_topics: crate::broadcast::MAX_TOPICS,
        max_never_subscribed_topics: 0,
        ..gossipsub::MetricsConfig::default()
    };
    metrics_config.buckets_using_scoring_thresholds(&thresholds);
    let mut behaviour = behaviour.with_metrics(
        registry.sub_registry_with_prefix("libp2p_gossipsub"),
        metrics_config,
    );
    behaviour
        .with_peer_score(
            peer_score_params(),
            gossipsub::PeerScoreThresholds::default(),
        )
        .map_err(err)?;
    Ok(behaviour)
}

/// Peer scoring beyond the per-topic part: libp2p's defaults, with loopback exempt
/// from the IP-colocation penalty (many nodes on one host are local processes, as in
/// tests and benchmarks, not sybils from one address).
fn peer_score_params() -> gossipsub::PeerScoreParams {
    let mut params = gossipsub::PeerScoreParams::default();
    params.ip_colocation_factor_whitelist.extend([
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ]);
    params
}

/// Score parameters for a topic this node joins. Mesh-delivery penalties are off:
/// on a quiet topic an honest peer delivers nothing and would be punished for it.
/// Invalid messages cost -10 times their count squared (decaying with a half-life of
/// about six minutes), so three within a few minutes graylist a peer.
pub fn topic_score_params() -> gossipsub::TopicScoreParams {
    gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.01,
        time_in_mesh_quantum: Duration::from_secs(1),
        time_in_mesh_cap: 3600.0,
        first_message_deliveries_weight: 1.0,
        first_message_deliveries_decay: 0.5,
        first_message_deliveries_cap: 50.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -10.0,
        // Counters decay once a second (gossipsub's decay interval): 0.998 is a
        // half-life of about six minutes, so a steady trickle of invalid messages
        // adds up instead of fading between messages.
        invalid_message_deliveries_decay: 0.998,
        ..gossipsub::TopicScoreParams::default()
    }
}
