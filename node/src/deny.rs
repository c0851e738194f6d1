//! Deny lists: PeerIds and IP ranges that may not connect (the seeds' ban list).
//!
//! One behaviour enforces both kinds at every point where the swarm lets a behaviour
//! refuse a connection: an inbound connection is refused on its remote IP before the
//! handshake costs any CPU, and on its PeerId once the handshake has proved it; an
//! outbound dial to a denied PeerId is never started. A ban at runtime closes the live
//! connections it matches. Bans made at runtime are saved in the data dir, so they
//! outlive a restart; bans from the config are not saved (the config is their home).

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    convert::Infallible,
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    str::FromStr,
    task::{Context, Poll, Waker},
};

use ipnet::IpNet;
use libp2p::{
    core::{transport::PortUse, ConnectedPoint, Endpoint},
    swarm::{
        behaviour::ConnectionEstablished, dummy, CloseConnection, ConnectionClosed,
        ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
        THandlerOutEvent, ToSwarm,
    },
    Multiaddr, PeerId,
};
use serde::{Deserialize, Serialize};

use crate::datadir::write_atomic;

/// What a ban names: one peer, or a range of IP addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BanTarget {
    /// A PeerId.
    Peer(PeerId),
    /// An IP range; a single address is a /32 or /128.
    Cidr(IpNet),
}

impl FromStr for BanTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Ok(peer) = s.parse::<PeerId>() {
            return Ok(BanTarget::Peer(peer));
        }
        crate::config::parse_cidr(s)
            .map(BanTarget::Cidr)
            .map_err(|_| format!("`{s}` is neither a PeerId nor an IP range (CIDR)"))
    }
}

impl fmt::Display for BanTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BanTarget::Peer(p) => write!(f, "{p}"),
            BanTarget::Cidr(n) => write!(f, "{n}"),
        }
    }
}

/// Why a connection was refused; the swarm hands this back in its error events.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// The PeerId is on the deny list.
    #[error("peer {0} is denied")]
    Peer(PeerId),
    /// The remote IP is in a denied range.
    #[error("address {0} is in a denied range")]
    Ip(IpAddr),
    /// An allow list is in force and the PeerId is not on it.
    #[error("peer {0} is not on the allow list (allow_peers)")]
    NotAllowed(PeerId),
}

impl Denied {
    /// A fixed metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Denied::Peer(_) => "peer_denied",
            Denied::Ip(_) => "ip_denied",
            Denied::NotAllowed(_) => "not_allowed",
        }
    }
}

/// The set of bans in force: the config's, plus runtime ones.
#[derive(Debug, Default, Clone)]
pub struct DenyList {
    config: BTreeSet<BanTarget>,
    runtime: BTreeSet<BanTarget>,
    /// When not empty, the only peers let in (a closed network's members).
    allow: BTreeSet<PeerId>,
}

/// How runtime bans are kept on disk.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BansFile {
    bans: Vec<BanTarget>,
}

/// Runtime bans could not be loaded. Not replaced: a ban list that silently emptied
/// would let banned peers back in.
#[derive(Debug, thiserror::Error)]
#[error("ban list {path}: {reason}; fix or remove the file")]
pub struct BansFileError {
    path: PathBuf,
    reason: String,
}

impl DenyList {
    /// The config's bans and the runtime bans saved at `bans_path`.
    pub fn load(
        peers: &[PeerId],
        cidrs: &[IpNet],
        bans_path: &Path,
    ) -> Result<DenyList, BansFileError> {
        let mut list = DenyList {
            config: peers
                .iter()
                .map(|p| BanTarget::Peer(*p))
                .chain(cidrs.iter().map(|c| BanTarget::Cidr(c.trunc())))
                .collect(),
            runtime: BTreeSet::new(),
            allow: BTreeSet::new(),
        };
        let err = |reason: String| BansFileError {
            path: bans_path.to_path_buf(),
            reason,
        };
        match std::fs::read(bans_path) {
            Ok(bytes) => {
                let file: BansFile =
                    serde_json::from_slice(&bytes).map_err(|e| err(e.to_string()))?;
                list.runtime = file.bans.into_iter().collect();
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e.to_string())),
        }
        Ok(list)
    }

    /// Lets in only these peers (none: everyone not denied).
    pub fn with_allow_list(mut self, peers: &[PeerId]) -> Self {
        self.allow = peers.iter().copied().collect();
        self
    }

    /// Saves the runtime bans.
    pub fn save(&self, bans_path: &Path) -> std::io::Result<()> {
        let file = BansFile {
            bans: self.runtime.iter().copied().collect(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
        write_atomic(bans_path, &bytes, 0o600)
    }

    /// Every ban in force, with whether it came from the config.
    pub fn entries(&self) -> Vec<(BanTarget, bool)> {
        self.config
            .iter()
            .map(|t| (*t, true))
            .chain(
                self.runtime
                    .iter()
                    .filter(|t| !self.config.contains(t))
                    .map(|t| (*t, false)),
            )
            .collect()
    }

    /// Whether the peer is denied.
    pub fn denies_peer(&self, peer: &PeerId) -> bool {
        let target = BanTarget::Peer(*peer);
        self.config.contains(&target) || self.runtime.contains(&target)
    }

    /// Whether the peer may connect: not denied, and on the allow list if there is one.
    pub fn admits_peer(&self, peer: &PeerId) -> bool {
        !self.denies_peer(peer) && (self.allow.is_empty() || self.allow.contains(peer))
    }

    /// Whether the address is in a denied range.
    pub fn denies_ip(&self, ip: IpAddr) -> bool {
        let ip = crate::addr::canonical_ip(ip);
        self.config
            .iter()
            .chain(self.runtime.iter())
            .any(|t| matches!(t, BanTarget::Cidr(net) if net.contains(&ip)))
    }

    fn check(&self, peer: Option<&PeerId>, addr: Option<&Multiaddr>) -> Result<(), Denied> {
        if let Some(peer) = peer {
            if self.denies_peer(peer) {
                return Err(Denied::Peer(*peer));
            }
            if !self.allow.is_empty() && !self.allow.contains(peer) {
                return Err(Denied::NotAllowed(*peer));
            }
        }
        if let Some(ip) = addr.and_then(crate::addr::ip_of) {
            if self.denies_ip(ip) {
                return Err(Denied::Ip(ip));
            }
        }
        Ok(())
    }
}

/// The behaviour that enforces a [`DenyList`].
pub struct Behaviour {
    list: DenyList,
    /// Live connections with their remote address, so a new ban finds what to close.
    connections: HashMap<ConnectionId, (PeerId, Multiaddr)>,
    to_close: VecDeque<(PeerId, ConnectionId)>,
    waker: Option<Waker>,
}

impl Behaviour {
    /// Enforces `list`.
    pub fn new(list: DenyList) -> Self {
        Behaviour {
            list,
            connections: HashMap::new(),
            to_close: VecDeque::new(),
            waker: None,
        }
    }

    /// The bans in force.
    pub fn list(&self) -> &DenyList {
        &self.list
    }

    /// Adds a runtime ban and closes the connections it matches. Returns how many
    /// connections will be closed, or `None` if the ban was already in force.
    pub fn ban(&mut self, target: BanTarget) -> Option<usize> {
        if self.list.config.contains(&target) || !self.list.runtime.insert(target) {
            return None;
        }
        let matching: Vec<(PeerId, ConnectionId)> = self
            .connections
            .iter()
            .filter(|(_, (peer, addr))| self.list.check(Some(peer), Some(addr)).is_err())
            .map(|(id, (peer, _))| (*peer, *id))
            .collect();
        let n = matching.len();
        for (_, id) in &matching {
            // Closing is now in hand; a second ban must not close it again.
            self.connections.remove(id);
        }
        self.to_close.extend(matching);
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
        Some(n)
    }

    /// Removes a runtime ban. Bans from the config stay (they are changed there);
    /// the error says so.
    pub fn unban(&mut self, target: &BanTarget) -> Result<bool, &'static str> {
        if self.list.config.contains(target) {
            return Err(
                "this ban comes from the config (deny_peers / deny_cidrs); remove it there",
            );
        }
        Ok(self.list.runtime.remove(target))
    }

    fn deny(
        &self,
        peer: Option<&PeerId>,
        addr: Option<&Multiaddr>,
    ) -> Result<(), ConnectionDenied> {
        self.list.check(peer, addr).map_err(ConnectionDenied::new)
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.deny(None, Some(remote_addr))
    }

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.deny(Some(&peer), Some(remote_addr))?;
        Ok(dummy::ConnectionHandler)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        _: ConnectionId,
        maybe_peer: Option<PeerId>,
        _: &[Multiaddr],
        _: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.deny(maybe_peer.as_ref(), None)?;
        Ok(Vec::new())
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.deny(Some(&peer), Some(addr))?;
        Ok(dummy::ConnectionHandler)
    }

    // Connections are tracked from the swarm's events, not from the `handle_*`
    // callbacks: a behaviour after this one may still refuse a connection this one
    // accepted, and such a connection is never reported closed.
    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            }) => {
                let addr = match endpoint {
                    ConnectedPoint::Dialer { address, .. } => address.clone(),
                    ConnectedPoint::Listener { send_back_addr, .. } => send_back_addr.clone(),
                };
                self.connections.insert(connection_id, (peer_id, addr));
            }
            FromSwarm::ConnectionClosed(ConnectionClosed { connection_id, .. }) => {
                self.connections.remove(&connection_id);
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        libp2p::core::util::unreachable(event)
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        if let Some((peer_id, id)) = self.to_close.pop_front() {
            return Poll::Ready(ToSwarm::CloseConnection {
                peer_id,
                connection: CloseConnection::One(id),
            });
        }
        self.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerId {
        PeerId::random()
    }

    #[test]
    fn parses_targets() {
        let p = peer();
        assert_eq!(p.to_string().parse::<BanTarget>(), Ok(BanTarget::Peer(p)));
        assert_eq!(
            "10.0.0.0/8".parse::<BanTarget>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert!("nonsense".parse::<BanTarget>().is_err());
    }

    #[test]
    fn matches_peers_and_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let banned = peer();
        let list = DenyList::load(
            &[banned],
            &["10.0.0.0/8".parse().unwrap()],
            &dir.path().join("bans.json"),
        )
        .unwrap();
        assert!(list.denies_peer(&banned));
        assert!(!list.denies_peer(&peer()));
        assert!(list.denies_ip("10.1.2.3".parse().unwrap()));
        assert!(
            list.denies_ip("::ffff:10.1.2.3".parse().unwrap()),
            "v4-mapped"
        );
        assert!(!list.denies_ip("192.0.2.1".parse().unwrap()));
        let addr: Multiaddr = "/ip4/10.9.9.9/tcp/1".parse().unwrap();
        assert_eq!(
            list.check(None, Some(&addr)),
            Err(Denied::Ip("10.9.9.9".parse().unwrap()))
        );
    }

    #[test]
    fn runtime_bans_persist_and_config_bans_stay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bans.json");
        let from_config = peer();
        let mut behaviour = Behaviour::new(DenyList::load(&[from_config], &[], &path).unwrap());
        let runtime = peer();
        assert_eq!(behaviour.ban(BanTarget::Peer(runtime)), Some(0));
        assert_eq!(
            behaviour.ban(BanTarget::Peer(runtime)),
            None,
            "already banned"
        );
        behaviour.list().save(&path).unwrap();
        assert!(behaviour.unban(&BanTarget::Peer(from_config)).is_err());

        let reloaded = DenyList::load(&[], &[], &path).unwrap();
        assert!(reloaded.denies_peer(&runtime));
        assert!(
            !reloaded.denies_peer(&from_config),
            "config bans are not saved"
        );
    }

    #[test]
    fn corrupt_ban_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bans.json");
        std::fs::write(&path, "{").unwrap();
        assert!(DenyList::load(&[], &[], &path).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{");
    }

    #[test]
    fn ban_closes_matching_connections() {
        let dir = tempfile::tempdir().unwrap();
        let mut behaviour =
            Behaviour::new(DenyList::load(&[], &[], &dir.path().join("b")).unwrap());
        let a = peer();
        let b = peer();
        let addr_a: Multiaddr = "/ip4/10.0.0.1/tcp/1".parse().unwrap();
        let addr_b: Multiaddr = "/ip4/192.0.2.1/tcp/1".parse().unwrap();
        let local: Multiaddr = "/ip4/127.0.0.1/tcp/2".parse().unwrap();
        let ca = ConnectionId::new_unchecked(1);
        let cb = ConnectionId::new_unchecked(2);
        for (peer, id, addr) in [(a, ca, &addr_a), (b, cb, &addr_b)] {
            behaviour
                .handle_established_inbound_connection(id, peer, &local, addr)
                .unwrap();
            let endpoint = ConnectedPoint::Listener {
                local_addr: local.clone(),
                send_back_addr: addr.clone(),
            };
            behaviour.on_swarm_event(FromSwarm::ConnectionEstablished(ConnectionEstablished {
                peer_id: peer,
                connection_id: id,
                endpoint: &endpoint,
                failed_addresses: &[],
                other_established: 0,
            }));
        }
        assert_eq!(behaviour.ban("10.0.0.0/24".parse().unwrap()), Some(1));
        assert_eq!(behaviour.to_close.pop_front(), Some((a, ca)));
        assert_eq!(behaviour.ban(BanTarget::Peer(b)), Some(1));
        assert_eq!(behaviour.to_close.pop_front(), Some((b, cb)));
        // A connection refused after this behaviour accepted it leaves no trace.
        let refused = ConnectionId::new_unchecked(9);
        behaviour
            .handle_established_inbound_connection(refused, PeerId::random(), &local, &addr_b)
            .unwrap();
        assert_eq!(
            behaviour.connections.len(),
            0,
            "only reported connections are tracked"
        );
        // New connections from either are refused.
        assert!(behaviour
            .handle_pending_inbound_connection(ConnectionId::new_unchecked(3), &local, &addr_a)
            .is_err());
        assert!(behaviour
            .handle_pending_outbound_connection(
                ConnectionId::new_unchecked(4),
                Some(b),
                &[],
                Endpoint::Dialer
            )
            .is_err());
    }
}
