//! The typed way into a running node: [`Client`] sends a [`Command`] to the event
//! loop (the only owner of the Swarm) and awaits its reply on a oneshot channel.
//!
//! The views returned here are also the JSON bodies of the HTTP API, so the CLI, the
//! API and tests share one definition of each.

use std::{fmt, str::FromStr, sync::Arc};

use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot};

use servant_protocol::{file, manifest::ContentId, search::Hit};

use crate::{
    broadcast::{BroadcastError, Delivery},
    deny::BanTarget,
};

/// Commands queued for the event loop at most; senders wait beyond that, so a flood
/// of API calls slows callers down instead of growing memory.
pub const COMMAND_QUEUE: usize = 256;

/// A request to the event loop, with the channel its answer goes back on.
#[derive(Debug)]
pub enum Command {
    /// The node's status.
    Status(oneshot::Sender<Status>),
    /// Connected peers.
    Peers(oneshot::Sender<Vec<PeerView>>),
    /// Reachability, role, relay reservations and hole punches.
    Reach(oneshot::Sender<crate::traversal::ReachView>),
    /// Dial a peer and protect the connection from trimming.
    Connect {
        /// Whom to dial.
        target: ConnectTarget,
        /// Answered once connected or failed.
        reply: oneshot::Sender<Result<ConnectOutcome, CommandError>>,
    },
    /// Add a runtime ban.
    Ban {
        /// What to ban.
        target: BanTarget,
        /// Answered at once.
        reply: oneshot::Sender<Result<BanOutcome, CommandError>>,
    },
    /// Remove a runtime ban.
    Unban {
        /// What to unban.
        target: BanTarget,
        /// Answered at once.
        reply: oneshot::Sender<Result<BanOutcome, CommandError>>,
    },
    /// Bans in force.
    Bans(oneshot::Sender<Vec<BanView>>),
    /// Publish a broadcast.
    Publish {
        /// The topic.
        topic: String,
        /// The message's title.
        title: String,
        /// The message's body.
        body: String,
        /// The published message, or why not.
        reply: oneshot::Sender<Result<Delivery, CommandError>>,
    },
    /// Join a topic and receive its messages.
    Subscribe {
        /// The topic.
        topic: String,
        /// A receiver of deliveries; the topic is left when every receiver is gone.
        reply: oneshot::Sender<Result<broadcast::Receiver<Arc<Delivery>>, CommandError>>,
    },
    /// Send a file-protocol request to a peer, dialing it if needed.
    FileRequest {
        /// The provider.
        peer: PeerId,
        /// What to ask.
        request: file::Request,
        /// Its answer, or why there is none.
        reply: oneshot::Sender<Result<file::Response, String>>,
    },
    /// Look up who provides a content id: Kademlia provider records, then connected
    /// peers as candidates.
    FindProviders {
        /// The content.
        id: ContentId,
        /// Answered when the lookup ends or has run long enough.
        reply: oneshot::Sender<Providers>,
    },
    /// Announce this node as a provider of `id` (after a share or a complete fetch).
    Provide {
        /// The content.
        id: ContentId,
        /// Answered once the announcement is recorded, so a caller that saw the
        /// reply sees the node providing.
        reply: oneshot::Sender<()>,
    },
    /// Stop announcing `id` (unshare or eviction).
    Unprovide {
        /// The content.
        id: ContentId,
        /// Answered once the record is withdrawn.
        reply: oneshot::Sender<()>,
    },
    /// A peer misbehaved (a corrupt chunk, a manifest that does not hash to its id).
    Penalize {
        /// The peer.
        peer: PeerId,
        /// A fixed reason, also the metric label.
        reason: &'static str,
    },
    /// Start a search; hits arrive on the returned receiver until it is dropped.
    Search {
        /// What to look for.
        term: String,
        /// How many hops the query may travel.
        ttl: u8,
        /// The hits as they arrive.
        reply: oneshot::Sender<Result<mpsc::Receiver<Hit>, CommandError>>,
    },
}

/// Who may have a content: peers with a provider record, and other connected peers
/// worth asking.
#[derive(Debug, Clone, Default)]
pub struct Providers {
    /// Peers that announced the content in the DHT.
    pub recorded: Vec<PeerId>,
    /// Connected peers not in `recorded`.
    pub connected: Vec<PeerId>,
}

/// Why a command failed. The HTTP API maps each variant to a status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[non_exhaustive]
pub enum CommandError {
    /// The node is shutting down or gone.
    #[error("the node is not running")]
    NodeStopped,
    /// The request itself is invalid.
    #[error("{0}")]
    Invalid(String),
    /// A dial by PeerId found no address for the peer.
    #[error("no known address for peer {0}; give a full multiaddr instead")]
    NoAddress(String),
    /// The dial failed.
    #[error("dial failed: {0}")]
    DialFailed(String),
    /// The target is on the deny list.
    #[error("{0} is denied; unban it first")]
    Denied(String),
    /// A broadcast could not be sent or joined.
    #[error("{0}")]
    Broadcast(String),
    /// No peer subscribes to the topic yet.
    #[error("{0}")]
    NoPeers(String),
}

impl From<BroadcastError> for CommandError {
    fn from(e: BroadcastError) -> Self {
        match e {
            BroadcastError::NoPeers(_) => CommandError::NoPeers(e.to_string()),
            BroadcastError::Topic(_)
            | BroadcastError::Envelope(_)
            | BroadcastError::TooManyTopics
            | BroadcastError::Duplicate => CommandError::Invalid(e.to_string()),
            other => CommandError::Broadcast(other.to_string()),
        }
    }
}

/// Whom `servant connect` dials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectTarget {
    /// A multiaddr, with or without `/p2p/<PeerId>`.
    Addr(Multiaddr),
    /// A PeerId; its addresses come from the routing table and known peers.
    Peer(PeerId),
}

impl FromStr for ConnectTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.starts_with('/') {
            s.parse()
                .map(ConnectTarget::Addr)
                .map_err(|e| format!("`{s}` is not a multiaddr: {e}"))
        } else {
            s.parse()
                .map(ConnectTarget::Peer)
                .map_err(|e| format!("`{s}` is neither a multiaddr nor a PeerId: {e}"))
        }
    }
}

impl fmt::Display for ConnectTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectTarget::Addr(a) => write!(f, "{a}"),
            ConnectTarget::Peer(p) => write!(f, "{p}"),
        }
    }
}

/// The node's status (`servant status`, `GET /v1/status`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// This node's PeerId.
    pub peer_id: String,
    /// `servant/<version>`.
    pub agent: String,
    /// Addresses it listens on, each ending in `/p2p/<PeerId>`: give one to another
    /// node as `--bootnode`.
    pub listen_addrs: Vec<String>,
    /// Addresses announced as reachable from outside.
    pub external_addrs: Vec<String>,
    /// `super-peer`, `peer`, or `undecided` until reachability is known.
    pub role: String,
    /// `public`, `private` or `unknown`.
    pub reachability: String,
    /// Peers with an established connection.
    pub connected_peers: usize,
    /// Established connections.
    pub connections: usize,
    /// Peers in the Kademlia routing table.
    pub routing_table_size: usize,
    /// Peers remembered for the next start.
    pub known_peers: usize,
    /// Joined topics.
    pub topics: Vec<TopicView>,
    /// Configured bootnodes and whether each is connected.
    pub bootnodes: Vec<BootnodeView>,
    /// Whether a Kademlia bootstrap has succeeded.
    pub bootstrapped: bool,
    /// What `/readyz` says.
    pub ready: bool,
    /// Seconds since start.
    pub uptime_secs: u64,
}

/// A joined topic.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopicView {
    /// Its name.
    pub name: String,
    /// Connected peers subscribed to it.
    pub peers: usize,
    /// Of those, the ones in this node's gossipsub mesh.
    pub mesh_peers: usize,
}

/// A configured bootnode.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BootnodeView {
    /// Its multiaddr.
    pub addr: String,
    /// Whether it is connected now.
    pub connected: bool,
}

/// A connected peer (`servant peers`, `GET /v1/peers`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerView {
    /// Its PeerId.
    pub peer_id: String,
    /// The remote address of each connection.
    pub addrs: Vec<String>,
    /// `inbound`, `outbound` or `both`.
    pub direction: String,
    /// Its identify agent string, once known.
    pub agent: Option<String>,
    /// Its identify protocol version, once known.
    pub protocol_version: Option<String>,
    /// Last ping round-trip time in milliseconds.
    pub rtt_ms: Option<f64>,
    /// When its first current connection was established (Unix seconds).
    pub connected_since: u64,
    /// Bootnode or connected on purpose: never trimmed.
    pub protected: bool,
    /// Its gossipsub score as this node sees it.
    pub gossipsub_score: Option<f64>,
    /// Topics gossipsub remembers it subscribing to (capped per peer, see
    /// `subscription_cap`).
    #[serde(default)]
    pub gossip_topics: usize,
}

/// The outcome of `servant connect`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectOutcome {
    /// The peer now connected.
    pub peer_id: String,
    /// The address the connection uses.
    pub addr: String,
    /// True if it was connected already.
    pub already_connected: bool,
}

/// The outcome of a ban or unban.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BanOutcome {
    /// What was banned or unbanned.
    pub target: String,
    /// Whether the list changed (false: it was already so).
    pub changed: bool,
    /// Connections closed by the ban.
    pub closed_connections: usize,
}

/// A ban in force.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BanView {
    /// The PeerId or CIDR.
    pub target: String,
    /// `config` or `runtime`.
    pub source: String,
}

/// A cloneable handle on the event loop.
#[derive(Debug, Clone)]
pub struct Client {
    tx: mpsc::Sender<Command>,
}

impl Client {
    /// A client sending on `tx`.
    pub fn new(tx: mpsc::Sender<Command>) -> Self {
        Client { tx }
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, CommandError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| CommandError::NodeStopped)?;
        rx.await.map_err(|_| CommandError::NodeStopped)
    }

    /// The node's status.
    pub async fn status(&self) -> Result<Status, CommandError> {
        self.ask(Command::Status).await
    }

    /// Reachability, role, relays and hole punches.
    pub async fn reach(&self) -> Result<crate::traversal::ReachView, CommandError> {
        self.ask(Command::Reach).await
    }

    /// Connected peers.
    pub async fn peers(&self) -> Result<Vec<PeerView>, CommandError> {
        self.ask(Command::Peers).await
    }

    /// Dials `target`; returns once connected or failed.
    pub async fn connect(&self, target: ConnectTarget) -> Result<ConnectOutcome, CommandError> {
        self.ask(|reply| Command::Connect { target, reply }).await?
    }

    /// Bans `target` at runtime, closing matching connections.
    pub async fn ban(&self, target: BanTarget) -> Result<BanOutcome, CommandError> {
        self.ask(|reply| Command::Ban { target, reply }).await?
    }

    /// Lifts a runtime ban.
    pub async fn unban(&self, target: BanTarget) -> Result<BanOutcome, CommandError> {
        self.ask(|reply| Command::Unban { target, reply }).await?
    }

    /// The bans in force.
    pub async fn bans(&self) -> Result<Vec<BanView>, CommandError> {
        self.ask(Command::Bans).await
    }

    /// Publishes a broadcast on `topic`.
    pub async fn publish(
        &self,
        topic: String,
        title: String,
        body: String,
    ) -> Result<Delivery, CommandError> {
        self.ask(|reply| Command::Publish {
            topic,
            title,
            body,
            reply,
        })
        .await?
    }

    /// Joins `topic` and returns its deliveries.
    pub async fn subscribe(
        &self,
        topic: String,
    ) -> Result<broadcast::Receiver<Arc<Delivery>>, CommandError> {
        self.ask(|reply| Command::Subscribe { topic, reply })
            .await?
    }

    /// Sends a file request to `peer` and waits for the answer.
    pub async fn file_request(
        &self,
        peer: PeerId,
        request: file::Request,
    ) -> Result<file::Response, String> {
        match self
            .ask(|reply| Command::FileRequest {
                peer,
                request,
                reply,
            })
            .await
        {
            Ok(answer) => answer,
            Err(e) => Err(e.to_string()),
        }
    }

    /// Finds providers of `id`.
    pub async fn find_providers(&self, id: ContentId) -> Result<Providers, CommandError> {
        self.ask(|reply| Command::FindProviders { id, reply }).await
    }

    /// Announces this node as a provider of `id`.
    pub async fn provide(&self, id: ContentId) -> Result<(), CommandError> {
        self.ask(|reply| Command::Provide { id, reply }).await
    }

    /// Stops announcing `id`.
    pub async fn unprovide(&self, id: ContentId) -> Result<(), CommandError> {
        self.ask(|reply| Command::Unprovide { id, reply }).await
    }

    /// Reports a misbehaving peer.
    pub async fn penalize(&self, peer: PeerId, reason: &'static str) {
        let _ = self.tx.send(Command::Penalize { peer, reason }).await;
    }

    /// Starts a search.
    pub async fn search(&self, term: String, ttl: u8) -> Result<mpsc::Receiver<Hit>, CommandError> {
        self.ask(|reply| Command::Search { term, ttl, reply })
            .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_targets_parse() {
        let p = PeerId::random();
        assert_eq!(
            p.to_string().parse::<ConnectTarget>(),
            Ok(ConnectTarget::Peer(p))
        );
        assert!(matches!(
            format!("/ip4/127.0.0.1/tcp/1/p2p/{p}").parse::<ConnectTarget>(),
            Ok(ConnectTarget::Addr(_))
        ));
        assert!("/ip4/nope".parse::<ConnectTarget>().is_err());
        assert!("nope".parse::<ConnectTarget>().is_err());
    }
}
