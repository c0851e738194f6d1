//! The node's configuration: defaults, a TOML file, `SERVANT_*` environment
//! variables and command-line flags, merged in that order of precedence
//! (flag > env > file > default), then validated as a whole.
//!
//! Every key exists in three spellings: `snake_case` in the file, `--kebab-case` as a
//! flag and `SERVANT_UPPER_CASE` in the environment. [`RunArgs`] is the single list of
//! overridable keys; the merge is generic (both layers become TOML tables), so a key
//! cannot be forgotten in one of the layers.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use ipnet::IpNet;
use libp2p::{multiaddr::Protocol, Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

/// Default TCP and UDP port for the p2p listeners.
pub const DEFAULT_P2P_PORT: u16 = 4001;
/// Default address of the HTTP API and metrics.
pub const DEFAULT_API_ADDR: &str = "127.0.0.1:5100";

/// The effective configuration of a node. `Default` gives a standalone first node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the identity, known peers and stored content live.
    pub data_dir: PathBuf,
    /// The identity key file; defaults to `<data_dir>/identity.key`. Set it to mount a
    /// key generated ahead (for example from a Kubernetes Secret).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_file: Option<PathBuf>,
    /// Multiaddrs to listen on. The default is TCP and QUIC on port 4001, IPv4 and,
    /// where the host has it, IPv6.
    pub listen: Vec<Multiaddr>,
    /// Addresses to announce to other peers besides the ones they observe, for nodes
    /// behind a port forward or a load balancer that knows its public address.
    pub announce: Vec<Multiaddr>,
    /// Well-known nodes to join through; each ends in `/p2p/<PeerId>`. Empty means this
    /// is the first node of a new network.
    pub bootnodes: Vec<Multiaddr>,
    /// Address of the HTTP API, `/metrics`, `/livez` and `/readyz`.
    pub api: SocketAddr,
    /// A file holding the bearer token that `/v1/` requires when the API is bound off
    /// localhost. Without one, a token is generated in `<data_dir>/api.token`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_token_file: Option<PathBuf>,
    /// Below this many connected peers the node dials more.
    pub conn_low: u32,
    /// Above this many connected peers the node trims the least useful ones.
    pub conn_high: u32,
    /// Hard cap on established connections; dials and accepts beyond it are refused.
    pub max_connections: u32,
    /// Hard cap on established connections to one peer.
    pub max_connections_per_peer: u32,
    /// Hard cap on connections still in their handshake, each direction.
    pub max_pending_connections: u32,
    /// Hard cap on inbound connections from one IP address (relayed ones excluded).
    pub max_connections_per_ip: u32,
    /// PeerIds that may not connect (the seeds' ban list). Runtime bans are kept in the
    /// data dir and added to these.
    pub deny_peers: Vec<PeerId>,
    /// IP ranges that may not connect, as CIDRs (`10.0.0.0/8`, `2001:db8::/32`) or
    /// single addresses.
    pub deny_cidrs: Vec<IpNet>,
    /// A private network's pre-shared key (the `/key/swarm/psk/1.0.0/` file format):
    /// only nodes holding the same key complete a handshake. QUIC cannot carry it, so
    /// a node with a key speaks TCP only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub psk_file: Option<PathBuf>,
    /// If not empty, the only PeerIds that may connect, either way.
    pub allow_peers: Vec<PeerId>,
    /// Topics the node joins at start, so it relays them even with no local subscriber.
    pub topics: Vec<String>,
    /// Broadcasts older than this are rejected; it is what makes late replays harmless.
    pub max_message_age: HumanDuration,
    /// How far in the future a broadcast's time may be, for clocks that disagree.
    pub max_clock_skew: HumanDuration,
    /// How often Kademlia re-runs its bootstrap to keep the routing table fresh.
    pub bootstrap_interval: HumanDuration,
    /// How many peers to remember in the data dir for the next start.
    pub known_peers_max: u32,
    /// Most bytes of fetched content the store keeps; shared content is pinned and not
    /// counted against eviction (it is never evicted).
    pub store_quota: ByteSize,
    /// Chunk size of new shares.
    pub chunk_size: ByteSize,
    /// Chunk and manifest requests served to one peer at once; more get "busy".
    pub serve_concurrency_per_peer: u32,
    /// Bytes per second served to one peer; 0 means no limit.
    pub serve_rate_per_peer: ByteSize,
    /// Most chunk requests in flight to one provider during a fetch.
    pub fetch_window_per_provider: u32,
    /// Search queries accepted from one peer per minute; more are dropped.
    pub search_rate_per_peer: u32,
    /// Gossipsub control actions and subscriptions one peer may send at once; a peer
    /// that overdraws its budget is disconnected (see `gossip_budget`).
    pub gossip_control_burst: u32,
    /// Gossipsub control actions and subscriptions one peer may send per second,
    /// sustained.
    pub gossip_control_rate: u32,
    /// How often this node re-announces itself as provider of what it has.
    pub reprovide_interval: HumanDuration,
    /// `auto` follows reachability (public: super-peer, private: peer); `super` and
    /// `peer` force a role.
    pub role: crate::role::RoleSetting,
    /// What a super-peer's relay allows: `signaling` (libp2p's defaults, 2 minutes and
    /// 128 KiB per circuit: enough to hole-punch) or `data` (longer, larger circuits,
    /// for peers that cannot hole-punch).
    pub relay_profile: RelayProfile,
    /// Bytes per second a data-profile relay reads from one peer's circuits (all of
    /// them together); 0 means no limit. The signaling profile's 128 KiB circuits need
    /// none, so it is not applied there.
    pub relay_rate_per_peer: ByteSize,
    /// How often reachability is probed again from scratch.
    pub reach_probe_interval: HumanDuration,
    /// How often freed heap memory is handed back to the system (`malloc_trim`); 0
    /// turns it off. See `allocator` for why it is off by default.
    pub heap_trim_interval: HumanDuration,
    /// Ask the local gateway (a home router) to forward the p2p ports by UPnP. A mapped
    /// address is confirmed by dial-backs like any other before it counts.
    pub upnp: bool,
    /// Log filter: a level (`info`) or tracing directives (`info,libp2p_gossipsub=debug`).
    /// `RUST_LOG`, when set, is used if neither the flag nor `SERVANT_LOG_LEVEL` is.
    pub log_level: String,
    /// `text` for people, `json` for log collectors.
    pub log_format: LogFormat,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: default_data_dir(),
            identity_file: None,
            listen: default_listen(DEFAULT_P2P_PORT, host_has_ipv6()),
            announce: Vec::new(),
            bootnodes: Vec::new(),
            api: SocketAddr::from(([127, 0, 0, 1], 5100)),
            api_token_file: None,
            conn_low: 8,
            conn_high: 32,
            max_connections: 256,
            max_connections_per_peer: 3,
            max_pending_connections: 64,
            max_connections_per_ip: 16,
            deny_peers: Vec::new(),
            psk_file: None,
            allow_peers: Vec::new(),
            deny_cidrs: Vec::new(),
            topics: Vec::new(),
            max_message_age: HumanDuration(Duration::from_secs(300)),
            max_clock_skew: HumanDuration(Duration::from_secs(30)),
            bootstrap_interval: HumanDuration(Duration::from_secs(300)),
            known_peers_max: 256,
            store_quota: ByteSize(10 * 1024 * 1024 * 1024),
            chunk_size: ByteSize(u64::from(servant_protocol::manifest::DEFAULT_CHUNK_SIZE)),
            serve_concurrency_per_peer: 16,
            serve_rate_per_peer: ByteSize(0),
            fetch_window_per_provider: 16,
            search_rate_per_peer: 60,
            gossip_control_burst: 20_000,
            gossip_control_rate: 2_000,
            reprovide_interval: HumanDuration(Duration::from_secs(3600)),
            role: crate::role::RoleSetting::Auto,
            relay_profile: RelayProfile::Signaling,
            relay_rate_per_peer: ByteSize(DATA_RELAY_RATE_PER_PEER),
            reach_probe_interval: HumanDuration(Duration::from_secs(600)),
            heap_trim_interval: HumanDuration(Duration::ZERO),
            upnp: true,
            log_level: "info".to_string(),
            log_format: LogFormat::Text,
        }
    }
}

/// What a super-peer's relay lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RelayProfile {
    /// Enough to coordinate a hole punch: libp2p's defaults.
    Signaling,
    /// Whole transfers for peers that cannot hole-punch (symmetric NATs).
    Data,
}

/// Circuits a data-profile relay carries at once.
pub const DATA_RELAY_MAX_CIRCUITS: usize = 64;
/// How long a data-profile circuit may last.
pub const DATA_RELAY_CIRCUIT_DURATION: Duration = Duration::from_secs(3600);
/// Bytes a data-profile circuit may carry (each direction).
pub const DATA_RELAY_CIRCUIT_BYTES: u64 = 1 << 30;
/// The slowest per-peer relay rate accepted: a 1 MiB chunk at 32 KiB/s takes 32 s,
/// inside the 60 s a file request may take.
pub const MIN_RELAY_RATE_PER_PEER: u64 = 32 * 1024;
/// Bytes per second a data-profile relay reads from one peer's circuits, so no one
/// peer can take a volunteer relay's whole uplink (each circuit is read from at both
/// ends, each end at its own peer's rate).
pub const DATA_RELAY_RATE_PER_PEER: u64 = 1 << 20;

impl RelayProfile {
    /// The relay server's limits for this profile.
    pub fn relay_config(self) -> libp2p::relay::Config {
        let signaling = libp2p::relay::Config::default();
        match self {
            RelayProfile::Signaling => signaling,
            RelayProfile::Data => libp2p::relay::Config {
                max_circuits: DATA_RELAY_MAX_CIRCUITS,
                max_circuit_duration: DATA_RELAY_CIRCUIT_DURATION,
                max_circuit_bytes: DATA_RELAY_CIRCUIT_BYTES,
                ..signaling
            },
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A duration written the human way (`90s`, `5m`, `1h 30m`) in files, flags and env.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// The wrapped duration.
    pub fn get(self) -> Duration {
        self.0
    }
}

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s)
            .map(HumanDuration)
            .map_err(|e| format!("{e} (write a duration such as 30s, 5m or 1h)"))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A size in bytes, written plainly (`1048576`) or with a unit (`512KiB`, `10 GiB`,
/// `1MB`); binary units are powers of 1024, decimal ones powers of 1000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The size in bytes.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let hint = "write a size such as 1048576, 512KiB, 64MiB or 10GiB";
        let number: u64 = number.parse().map_err(|_| format!("not a size ({hint})"))?;
        let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" => 1 << 10,
            "m" | "mib" => 1 << 20,
            "g" | "gib" => 1 << 30,
            "t" | "tib" => 1 << 40,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "tb" => 1_000_000_000_000,
            other => return Err(format!("unknown unit `{other}` ({hint})")),
        };
        number
            .checked_mul(factor)
            .map(ByteSize)
            .ok_or_else(|| "too large".to_string())
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [
            (1u64 << 40, "TiB"),
            (1 << 30, "GiB"),
            (1 << 20, "MiB"),
            (1 << 10, "KiB"),
        ];
        for (factor, unit) in units {
            if self.0 >= factor && self.0.is_multiple_of(factor) {
                return write!(f, "{}{unit}", self.0 / factor);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// An invalid configuration. Every variant names what is wrong so an operator can fix
/// it without reading code; the binary exits with status 2 on any of them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A key holds a value that cannot be used.
    #[error("invalid value for `{key}`: `{value}`: {reason}")]
    Invalid {
        /// The key as the user wrote it (file key, flag or env variable).
        key: String,
        /// The refused value.
        value: String,
        /// Why it was refused.
        reason: String,
    },
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML, or has an unknown key or a mistyped value.
    #[error("config file {path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// The parser's message, which quotes the line, the key and the value.
        message: String,
    },
}

impl ConfigError {
    fn invalid(key: &str, value: impl fmt::Display, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.to_string(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// The overridable keys as flags of `servant run`, each also read from its
/// `SERVANT_*` environment variable. Field names are the file's keys.
#[derive(Debug, Default, Clone, clap::Args, Serialize)]
pub struct RunArgs {
    /// Data directory (identity, known peers, content store).
    #[arg(long, env = "SERVANT_DATA_DIR", value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Identity key file [default: <data-dir>/identity.key].
    #[arg(long, env = "SERVANT_IDENTITY_FILE", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_file: Option<PathBuf>,
    /// Listen multiaddr; repeat or separate with commas.
    #[arg(long, env = "SERVANT_LISTEN", value_name = "MULTIADDR", value_delimiter = ',', value_parser = parse_multiaddr)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub listen: Vec<Multiaddr>,
    /// Address to announce besides observed ones; repeat or separate with commas.
    #[arg(long, env = "SERVANT_ANNOUNCE", value_name = "MULTIADDR", value_delimiter = ',', value_parser = parse_multiaddr)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub announce: Vec<Multiaddr>,
    /// Bootnode multiaddr ending in /p2p/<PeerId>; repeat or separate with commas.
    #[arg(long = "bootnode", env = "SERVANT_BOOTNODES", value_name = "MULTIADDR", value_delimiter = ',', value_parser = parse_multiaddr)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub bootnodes: Vec<Multiaddr>,
    /// HTTP API and metrics address [default: 127.0.0.1:5100].
    #[arg(long, env = "SERVANT_API", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api: Option<SocketAddr>,
    /// File holding the API bearer token.
    #[arg(long, env = "SERVANT_API_TOKEN_FILE", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_token_file: Option<PathBuf>,
    /// Low watermark of connected peers [default: 8].
    #[arg(long, env = "SERVANT_CONN_LOW", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conn_low: Option<u32>,
    /// High watermark of connected peers [default: 32].
    #[arg(long, env = "SERVANT_CONN_HIGH", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conn_high: Option<u32>,
    /// Maximum established connections [default: 256].
    #[arg(long, env = "SERVANT_MAX_CONNECTIONS", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Maximum established connections per peer [default: 3].
    #[arg(long, env = "SERVANT_MAX_CONNECTIONS_PER_PEER", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections_per_peer: Option<u32>,
    /// Maximum connections in handshake, each direction [default: 64].
    #[arg(long, env = "SERVANT_MAX_PENDING_CONNECTIONS", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_pending_connections: Option<u32>,
    /// Maximum inbound connections from one IP address [default: 16].
    #[arg(long, env = "SERVANT_MAX_CONNECTIONS_PER_IP", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections_per_ip: Option<u32>,
    /// PeerId to refuse; repeat or separate with commas.
    #[arg(long = "deny-peer", env = "SERVANT_DENY_PEERS", value_name = "PEERID", value_delimiter = ',', value_parser = parse_peer_id)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny_peers: Vec<PeerId>,
    /// IP range (CIDR) or address to refuse; repeat or separate with commas.
    #[arg(long = "deny-cidr", env = "SERVANT_DENY_CIDRS", value_name = "CIDR", value_delimiter = ',', value_parser = parse_cidr)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny_cidrs: Vec<IpNet>,
    /// Private network: the pre-shared key file (TCP only; QUIC cannot carry it).
    #[arg(long, env = "SERVANT_PSK_FILE", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub psk_file: Option<PathBuf>,
    /// PeerId allowed to connect (then no other is); repeat or separate with commas.
    #[arg(long = "allow-peer", env = "SERVANT_ALLOW_PEERS", value_name = "PEERID", value_delimiter = ',', value_parser = parse_peer_id)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow_peers: Vec<PeerId>,
    /// Topic to join at start; repeat or separate with commas.
    #[arg(
        long = "topic",
        env = "SERVANT_TOPICS",
        value_name = "TOPIC",
        value_delimiter = ','
    )]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub topics: Vec<String>,
    /// Maximum broadcast age [default: 5m].
    #[arg(long, env = "SERVANT_MAX_MESSAGE_AGE", value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_message_age: Option<HumanDuration>,
    /// Tolerated clock skew for broadcast times [default: 30s].
    #[arg(long, env = "SERVANT_MAX_CLOCK_SKEW", value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_clock_skew: Option<HumanDuration>,
    /// Kademlia bootstrap period [default: 5m].
    #[arg(long, env = "SERVANT_BOOTSTRAP_INTERVAL", value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bootstrap_interval: Option<HumanDuration>,
    /// Peers remembered for the next start [default: 256].
    #[arg(long, env = "SERVANT_KNOWN_PEERS_MAX", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub known_peers_max: Option<u32>,
    /// Store quota for fetched content [default: 10GiB].
    #[arg(long, env = "SERVANT_STORE_QUOTA", value_name = "SIZE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_quota: Option<ByteSize>,
    /// Chunk size of new shares [default: 1MiB].
    #[arg(long, env = "SERVANT_CHUNK_SIZE", value_name = "SIZE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<ByteSize>,
    /// File requests served to one peer at once [default: 16].
    #[arg(long, env = "SERVANT_SERVE_CONCURRENCY_PER_PEER", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serve_concurrency_per_peer: Option<u32>,
    /// Bytes per second served to one peer, 0 for no limit [default: 0].
    #[arg(long, env = "SERVANT_SERVE_RATE_PER_PEER", value_name = "SIZE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serve_rate_per_peer: Option<ByteSize>,
    /// Chunk requests in flight per provider during a fetch [default: 16].
    #[arg(long, env = "SERVANT_FETCH_WINDOW_PER_PROVIDER", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fetch_window_per_provider: Option<u32>,
    /// Search queries accepted per peer per minute [default: 60].
    #[arg(long, env = "SERVANT_SEARCH_RATE_PER_PEER", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search_rate_per_peer: Option<u32>,
    /// Gossipsub control actions one peer may send at once [default: 20000].
    #[arg(long, env = "SERVANT_GOSSIP_CONTROL_BURST", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gossip_control_burst: Option<u32>,
    /// Gossipsub control actions one peer may send per second [default: 2000].
    #[arg(long, env = "SERVANT_GOSSIP_CONTROL_RATE", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gossip_control_rate: Option<u32>,
    /// Provider re-announcement period [default: 1h].
    #[arg(long, env = "SERVANT_REPROVIDE_INTERVAL", value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reprovide_interval: Option<HumanDuration>,
    /// Role: auto (follow reachability), super or peer [default: auto].
    #[arg(long, env = "SERVANT_ROLE", value_name = "ROLE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<crate::role::RoleSetting>,
    /// Relay limits a super-peer offers: signaling or data [default: signaling].
    #[arg(long, env = "SERVANT_RELAY_PROFILE", value_name = "PROFILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_profile: Option<RelayProfile>,
    /// Bytes per second a data-profile relay reads from one peer's circuits, 0 for no
    /// limit [default: 1MiB].
    #[arg(long, env = "SERVANT_RELAY_RATE_PER_PEER", value_name = "SIZE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_rate_per_peer: Option<ByteSize>,
    /// Period of reachability re-probes [default: 10m].
    #[arg(long, env = "SERVANT_REACH_PROBE_INTERVAL", value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reach_probe_interval: Option<HumanDuration>,
    /// Period of handing freed heap memory back to the system, 0 for never
    /// [default: 0s].
    #[arg(long, env = "SERVANT_HEAP_TRIM_INTERVAL", value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heap_trim_interval: Option<HumanDuration>,
    /// UPnP port mapping on the local gateway: true or false [default: true].
    #[arg(long, env = "SERVANT_UPNP", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upnp: Option<bool>,
    /// Turn UPnP port mapping off (the same as `--upnp false`).
    #[arg(long = "no-upnp", conflicts_with = "upnp")]
    #[serde(skip)]
    pub no_upnp: bool,
    /// Log filter (level or tracing directives) [default: info].
    #[arg(long, env = "SERVANT_LOG_LEVEL", value_name = "FILTER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    /// Log format [default: text].
    #[arg(long, env = "SERVANT_LOG_FORMAT", value_name = "FORMAT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
}

fn parse_multiaddr(s: &str) -> Result<Multiaddr, String> {
    s.trim()
        .parse::<Multiaddr>()
        .map_err(|e| format!("not a multiaddr ({e}); write e.g. /ip4/203.0.113.7/tcp/4001"))
}

fn parse_peer_id(s: &str) -> Result<PeerId, String> {
    s.trim()
        .parse::<PeerId>()
        .map_err(|e| format!("not a PeerId ({e})"))
}

/// Parses a CIDR range, or a single address as a one-address range.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| "not an IP range; write e.g. 10.0.0.0/8, 2001:db8::/32 or 192.0.2.7".into())
}

impl Config {
    /// Builds the effective config: defaults, then the file (if any), then the flags
    /// and environment variables in `args` (clap has already applied flag > env), then
    /// `RUST_LOG` as a fallback log filter, then validation.
    pub fn load(file: Option<&Path>, args: &RunArgs) -> Result<Config, ConfigError> {
        let mut table = match file {
            Some(path) => read_file_table(path)?,
            None => toml::Table::new(),
        };
        let overlay = toml::Table::try_from(args).map_err(|e| ConfigError::Invalid {
            key: "flags".into(),
            value: String::new(),
            reason: e.to_string(),
        })?;
        let rust_log = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
        if args.log_level.is_none() {
            if let Some(filter) = rust_log {
                table.insert("log_level".into(), toml::Value::String(filter));
            }
        }
        for (key, value) in overlay {
            table.insert(key, value);
        }
        if args.no_upnp {
            table.insert("upnp".into(), toml::Value::Boolean(false));
        }
        // The default listeners include QUIC, which a private network cannot use: a
        // node given a key and no listen addresses listens on TCP only.
        if table.contains_key("psk_file") && !table.contains_key("listen") {
            let tcp_only: Vec<toml::Value> = default_listen(DEFAULT_P2P_PORT, host_has_ipv6())
                .into_iter()
                .filter(|a| !is_quic(a))
                .map(|a| toml::Value::String(a.to_string()))
                .collect();
            table.insert("listen".into(), toml::Value::Array(tcp_only));
        }
        // Flags and env were typed by clap already, so an error here is a mistake in
        // the file that `read_file_table` could not see on its own.
        let config =
            Config::deserialize(toml::Value::Table(table)).map_err(|e| ConfigError::File {
                path: file.map(Path::to_path_buf).unwrap_or_default(),
                message: e.to_string(),
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that are well-typed but unusable, and combinations that
    /// contradict each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid("data_dir", "", "must not be empty"));
        }
        if self.listen.is_empty() {
            return Err(ConfigError::invalid(
                "listen",
                "[]",
                "at least one listen address is needed",
            ));
        }
        for addr in &self.listen {
            check_listen_addr(addr)?;
        }
        for addr in &self.bootnodes {
            check_bootnode(addr)?;
        }
        if let Some(path) = &self.psk_file {
            read_psk(path)?;
            let quic = [
                ("listen", &self.listen),
                ("bootnodes", &self.bootnodes),
                ("announce", &self.announce),
            ];
            for (key, addrs) in quic {
                if let Some(addr) = addrs.iter().find(|a| is_quic(a)) {
                    return Err(ConfigError::invalid(
                        key,
                        addr,
                        "QUIC cannot carry a private network's pre-shared key (psk_file): use a TCP address",
                    ));
                }
            }
        }
        for addr in &self.announce {
            if addr.iter().any(|p| matches!(p, Protocol::P2p(_))) {
                return Err(ConfigError::invalid(
                    "announce",
                    addr,
                    "leave out /p2p/<PeerId>: the node adds its own",
                ));
            }
        }
        let counts = [
            ("conn_low", self.conn_low),
            ("conn_high", self.conn_high),
            ("max_connections", self.max_connections),
            ("max_connections_per_peer", self.max_connections_per_peer),
            ("max_pending_connections", self.max_pending_connections),
            ("max_connections_per_ip", self.max_connections_per_ip),
            (
                "serve_concurrency_per_peer",
                self.serve_concurrency_per_peer,
            ),
            ("fetch_window_per_provider", self.fetch_window_per_provider),
            ("search_rate_per_peer", self.search_rate_per_peer),
            ("gossip_control_burst", self.gossip_control_burst),
            ("gossip_control_rate", self.gossip_control_rate),
        ];
        for (key, value) in counts {
            if value == 0 {
                return Err(ConfigError::invalid(key, value, "must be at least 1"));
            }
        }
        // A 1 MiB chunk through a slower relay outlasts the 60 s request deadline.
        let relay_rate = self.relay_rate_per_peer.get();
        if relay_rate != 0 && relay_rate < MIN_RELAY_RATE_PER_PEER {
            return Err(ConfigError::invalid(
                "relay_rate_per_peer",
                self.relay_rate_per_peer,
                "must be 0 (no limit) or at least 32KiB: a chunk through a slower relay misses \
                 its 60 s request deadline",
            ));
        }
        // Below these an honest peer's subscriptions and heartbeat traffic alone
        // would overdraw the budget and get it disconnected over and over.
        if self.gossip_control_burst < 1_000 {
            return Err(ConfigError::invalid(
                "gossip_control_burst",
                self.gossip_control_burst,
                "must be at least 1000: an honest peer joining many topics sends hundreds at once",
            ));
        }
        if self.gossip_control_rate < 10 {
            return Err(ConfigError::invalid(
                "gossip_control_rate",
                self.gossip_control_rate,
                "must be at least 10 per second: heartbeats alone send several",
            ));
        }
        if self.conn_low > self.conn_high {
            return Err(ConfigError::invalid(
                "conn_low",
                self.conn_low,
                format!(
                    "must not exceed conn_high ({}): the node would dial peers it then trims",
                    self.conn_high
                ),
            ));
        }
        if self.conn_high > self.max_connections {
            return Err(ConfigError::invalid(
                "conn_high",
                self.conn_high,
                format!(
                    "must not exceed max_connections ({}): the watermark could never be reached",
                    self.max_connections
                ),
            ));
        }
        // Caps that a larger cap makes unreachable contradict each other: the operator
        // meant one of them, and the node cannot tell which.
        let under_total = [
            ("max_connections_per_peer", self.max_connections_per_peer),
            ("max_connections_per_ip", self.max_connections_per_ip),
        ];
        for (key, value) in under_total {
            if value > self.max_connections {
                return Err(ConfigError::invalid(
                    key,
                    value,
                    format!(
                        "must not exceed max_connections ({}): the cap could never be reached",
                        self.max_connections
                    ),
                ));
            }
        }
        let streams = u64::from(self.max_connections_per_peer)
            * crate::behaviour::FILE_STREAMS_PER_CONNECTION as u64;
        if u64::from(self.serve_concurrency_per_peer) > streams {
            return Err(ConfigError::invalid(
                "serve_concurrency_per_peer",
                self.serve_concurrency_per_peer,
                format!(
                    "must not exceed {streams}: a peer gets at most {} file streams on each of \
                     its max_connections_per_peer ({}) connections",
                    crate::behaviour::FILE_STREAMS_PER_CONNECTION,
                    self.max_connections_per_peer
                ),
            ));
        }
        if self.store_quota.get() < self.chunk_size.get() {
            return Err(ConfigError::invalid(
                "store_quota",
                self.store_quota,
                format!(
                    "must be at least chunk_size ({}): the store could not keep one fetched chunk",
                    self.chunk_size
                ),
            ));
        }
        for topic in &self.topics {
            servant_protocol::validate_topic(topic)
                .map_err(|e| ConfigError::invalid("topics", topic, e.to_string()))?;
        }
        let durations = [
            ("max_message_age", self.max_message_age, 1),
            ("bootstrap_interval", self.bootstrap_interval, 1),
            ("reprovide_interval", self.reprovide_interval, 60),
            ("reach_probe_interval", self.reach_probe_interval, 1),
        ];
        let trim = self.heap_trim_interval.get();
        if !trim.is_zero() && trim < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "heap_trim_interval",
                self.heap_trim_interval,
                "must be 0s (off) or at least 1s",
            ));
        }
        for (key, value, min_secs) in durations {
            if value.get() < Duration::from_secs(min_secs) {
                return Err(ConfigError::invalid(
                    key,
                    value,
                    format!("must be at least {min_secs}s"),
                ));
            }
        }
        if self.max_clock_skew.get() > self.max_message_age.get() {
            return Err(ConfigError::invalid(
                "max_clock_skew",
                self.max_clock_skew,
                format!("must not exceed max_message_age ({})", self.max_message_age),
            ));
        }
        use servant_protocol::manifest::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
        if !(u64::from(MIN_CHUNK_SIZE)..=u64::from(MAX_CHUNK_SIZE)).contains(&self.chunk_size.get())
        {
            return Err(ConfigError::invalid(
                "chunk_size",
                self.chunk_size,
                format!(
                    "must be between {} and {}",
                    ByteSize(MIN_CHUNK_SIZE.into()),
                    ByteSize(MAX_CHUNK_SIZE.into())
                ),
            ));
        }
        let max_window = crate::files::MAX_OUTBOUND_PER_PEER;
        if self.fetch_window_per_provider > max_window {
            return Err(ConfigError::invalid(
                "fetch_window_per_provider",
                self.fetch_window_per_provider,
                format!("must be at most {max_window} (requests in flight to one peer)"),
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            return Err(ConfigError::invalid(
                "log_level",
                &self.log_level,
                e.to_string(),
            ));
        }
        Ok(())
    }

    /// The identity key file in effect.
    pub fn identity_path(&self) -> PathBuf {
        self.identity_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("identity.key"))
    }

    /// The effective config as TOML, for `servant run --print-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    /// PeerIds of the bootnodes; these connections are protected from trimming.
    pub fn bootnode_peers(&self) -> Vec<(PeerId, Multiaddr)> {
        self.bootnodes
            .iter()
            .filter_map(|addr| match addr.iter().last() {
                Some(Protocol::P2p(peer)) => Some((peer, addr.clone())),
                _ => None,
            })
            .collect()
    }
}

fn read_file_table(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let file_error = |e: toml::de::Error| ConfigError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    // Parsing into `Config` first gives errors that quote the line, the key and the
    // value; the table is what gets merged with the flags.
    toml::from_str::<Config>(&text).map_err(file_error)?;
    text.parse::<toml::Table>().map_err(file_error)
}

fn check_listen_addr(addr: &Multiaddr) -> Result<(), ConfigError> {
    let parts: Vec<Protocol> = addr.iter().collect();
    let ok = matches!(
        parts.as_slice(),
        [Protocol::Ip4(_) | Protocol::Ip6(_), Protocol::Tcp(_)]
            | [
                Protocol::Ip4(_) | Protocol::Ip6(_),
                Protocol::Udp(_),
                Protocol::QuicV1
            ]
    );
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            "listen",
            addr,
            "listen on /ip4|ip6/<addr>/tcp/<port> or /ip4|ip6/<addr>/udp/<port>/quic-v1",
        ))
    }
}

fn is_quic(addr: &Multiaddr) -> bool {
    addr.iter()
        .any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic))
}

/// Reads a private network's pre-shared key file.
pub fn read_psk(path: &Path) -> Result<libp2p::pnet::PreSharedKey, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::invalid("psk_file", path.display(), format!("cannot read it: {e}"))
    })?;
    text.parse().map_err(|e| {
        ConfigError::invalid(
            "psk_file",
            path.display(),
            format!(
                "not a pre-shared key file (/key/swarm/psk/1.0.0/, /base16/, 64 hex digits): {e}"
            ),
        )
    })
}

fn check_bootnode(addr: &Multiaddr) -> Result<(), ConfigError> {
    if !crate::addr::is_dialable(addr) {
        return Err(ConfigError::invalid(
            "bootnodes",
            addr,
            "must start with /ip4, /ip6 (not 0.0.0.0 or ::), /dns, /dns4, /dns6 or /dnsaddr",
        ));
    }
    if !matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
        return Err(ConfigError::invalid(
            "bootnodes",
            addr,
            "must end in /p2p/<PeerId> (the bootnode prints its full address at start)",
        ));
    }
    Ok(())
}

/// The data dir used when none is configured: `$XDG_DATA_HOME/servant`, else
/// `~/.local/share/servant`, else `./servant-data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("servant");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home).join(".local/share/servant");
    }
    PathBuf::from("servant-data")
}

/// TCP and QUIC listen addresses on all interfaces, IPv6 included if asked.
pub fn default_listen(port: u16, ipv6: bool) -> Vec<Multiaddr> {
    let mut addrs = vec![
        format!("/ip4/0.0.0.0/tcp/{port}"),
        format!("/ip4/0.0.0.0/udp/{port}/quic-v1"),
    ];
    if ipv6 {
        addrs.push(format!("/ip6/::/tcp/{port}"));
        addrs.push(format!("/ip6/::/udp/{port}/quic-v1"));
    }
    addrs.iter().filter_map(|a| a.parse().ok()).collect()
}

/// Whether this host can bind an IPv6 socket at all (containers often cannot).
fn host_has_ipv6() -> bool {
    std::net::UdpSocket::bind("[::1]:0").is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: RunArgs,
    }

    #[test]
    fn defaults_are_valid_and_make_a_first_node() {
        let config = Config::default();
        config.validate().unwrap();
        assert!(config.bootnodes.is_empty());
        assert_eq!(config.api.to_string(), DEFAULT_API_ADDR);
        assert!(config
            .listen
            .iter()
            .any(|a| a.to_string() == "/ip4/0.0.0.0/tcp/4001"));
        assert!(config
            .listen
            .iter()
            .any(|a| a.to_string() == "/ip4/0.0.0.0/udp/4001/quic-v1"));
    }

    /// Every file key has a flag and every flag a file key, with the same name.
    #[test]
    fn flags_and_file_keys_are_the_same_set() {
        let full = toml::Table::try_from(Config {
            identity_file: Some("x".into()),
            api_token_file: Some("y".into()),
            psk_file: Some("z".into()),
            ..Config::default()
        })
        .unwrap();
        let mut file_keys: Vec<String> = full.keys().cloned().collect();
        file_keys.sort();
        let mut flag_keys: Vec<String> = Cli::command()
            .get_arguments()
            .map(|a| a.get_id().to_string())
            // `--no-upnp` is a shorthand for `--upnp false`, not a key of its own.
            .filter(|id| id != "help" && id != "no_upnp")
            .collect();
        flag_keys.sort();
        assert_eq!(file_keys, flag_keys);
        for arg in Cli::command().get_arguments() {
            if arg.get_id() == "help" || arg.get_id() == "no_upnp" {
                continue;
            }
            let env = arg.get_env().unwrap().to_str().unwrap().to_string();
            let expected = format!("SERVANT_{}", arg.get_id().as_str().to_uppercase());
            assert_eq!(env, expected, "env name of {}", arg.get_id());
        }
    }

    #[test]
    fn printed_config_reads_back() {
        let config = Config::default();
        let text = config.to_toml();
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(back, config);
    }

    #[test]
    fn flags_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("servant.toml");
        std::fs::write(
            &path,
            "conn_low = 3\nconn_high = 5\nmax_message_age = \"2m\"\n",
        )
        .unwrap();
        let args = RunArgs {
            conn_high: Some(9),
            ..RunArgs::default()
        };
        let config = Config::load(Some(&path), &args).unwrap();
        assert_eq!(config.conn_low, 3);
        assert_eq!(config.conn_high, 9);
        assert_eq!(config.max_message_age.get(), Duration::from_secs(120));
    }

    #[test]
    fn unknown_file_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("servant.toml");
        std::fs::write(&path, "conn_lwo = 3\n").unwrap();
        let err = Config::load(Some(&path), &RunArgs::default()).unwrap_err();
        assert!(err.to_string().contains("conn_lwo"), "{err}");
    }

    #[test]
    fn mistyped_file_value_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("servant.toml");
        std::fs::write(&path, "max_message_age = \"soon\"\n").unwrap();
        let err = Config::load(Some(&path), &RunArgs::default()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("max_message_age") && text.contains("soon"),
            "{text}"
        );
    }

    #[test]
    fn contradictions_are_refused() {
        let config = Config {
            conn_low: 10,
            conn_high: 5,
            ..Config::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("conn_low") && err.contains("10"), "{err}");

        let config = Config {
            conn_high: 500,
            ..Config::default()
        };
        assert!(config.validate().is_err());

        let config = Config {
            relay_rate_per_peer: ByteSize(1000),
            ..Config::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("relay_rate_per_peer") && err.contains("1000"),
            "{err}"
        );
        let config = Config {
            relay_rate_per_peer: ByteSize(0),
            ..Config::default()
        };
        assert!(config.validate().is_ok());
    }

    #[test]
    fn heap_trim_is_off_or_at_least_a_second() {
        for (value, ok) in [(0, true), (500, false), (1000, true), (300_000, true)] {
            let config = Config {
                heap_trim_interval: HumanDuration(Duration::from_millis(value)),
                ..Config::default()
            };
            match config.validate() {
                Ok(()) => assert!(ok, "{value} ms accepted"),
                Err(e) => {
                    let err = e.to_string();
                    assert!(
                        !ok && err.contains("heap_trim_interval"),
                        "{value} ms: {err}"
                    );
                }
            }
        }
    }

    #[test]
    fn bootnodes_need_a_peer_id() {
        let mut config = Config {
            bootnodes: vec!["/ip4/127.0.0.1/tcp/4001".parse().unwrap()],
            ..Config::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("bootnodes") && err.contains("/p2p/"), "{err}");
        config.bootnodes = vec![
            "/dnsaddr/boot.example/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
                .parse()
                .unwrap(),
            "/dns4/boot.example/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
                .parse()
                .unwrap(),
            "/ip6/::1/udp/4001/quic-v1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
                .parse()
                .unwrap(),
        ];
        config.validate().unwrap();
        assert_eq!(config.bootnode_peers().len(), 3);
    }

    #[test]
    fn cidrs_and_single_addresses_parse() {
        assert_eq!(parse_cidr("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_cidr("192.0.2.7").unwrap().to_string(), "192.0.2.7/32");
        assert_eq!(
            parse_cidr("2001:db8::1").unwrap().to_string(),
            "2001:db8::1/128"
        );
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("example.com").is_err());
    }

    #[test]
    fn bad_topic_and_log_filter_are_refused() {
        let config = Config {
            topics: vec!["has space".into()],
            ..Config::default()
        };
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("topics"));
        let config = Config {
            log_level: "info,[[[".into(),
            ..Config::default()
        };
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("log_level"));
    }

    #[test]
    fn byte_sizes_parse_and_print() {
        assert_eq!("1048576".parse::<ByteSize>().unwrap(), ByteSize(1 << 20));
        assert_eq!("512KiB".parse::<ByteSize>().unwrap(), ByteSize(512 << 10));
        assert_eq!("10 GiB".parse::<ByteSize>().unwrap(), ByteSize(10 << 30));
        assert_eq!("3MB".parse::<ByteSize>().unwrap(), ByteSize(3_000_000));
        assert!("ten".parse::<ByteSize>().is_err());
        assert!("5 parsecs".parse::<ByteSize>().is_err());
        assert!("99999999999TiB".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(10 << 30).to_string(), "10GiB");
        assert_eq!(ByteSize(1000).to_string(), "1000");
        let config: Config = toml::from_str("store_quota = 4096\nchunk_size = \"64KiB\"").unwrap();
        assert_eq!(config.store_quota, ByteSize(4096));
        assert_eq!(config.chunk_size, ByteSize(64 << 10));
        let bad: Config = toml::from_str("chunk_size = \"1KiB\"").unwrap();
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("chunk_size") && err.contains("1KiB"), "{err}");
    }
}
