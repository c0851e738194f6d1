//! Roles: super-peers relay for NATed peers and answer DHT queries; peers behind
//! NAT use relays and query the DHT as clients.
//!
//! Under `--role auto` the role follows the reachability verdict, both ways: public
//! makes a super-peer, private a peer; while the verdict is unknown the node answers
//! DHT queries but offers no relay, except the first node of a network (no
//! bootnodes), which starts as a super-peer so the network has one.

use serde::{Deserialize, Serialize};

use crate::reach::verdict::Reachability;

/// What the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RoleSetting {
    /// Follow the reachability verdict.
    #[default]
    Auto,
    /// Always a super-peer.
    Super,
    /// Always a peer.
    Peer,
}

/// What the node does now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Relay server and DHT server.
    Super,
    /// Relay client and DHT client.
    Peer,
    /// DHT server, no relay service: reachability not known yet.
    Undecided,
}

impl Role {
    /// The name used in logs, metrics and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Super => "super",
            Role::Peer => "peer",
            Role::Undecided => "undecided",
        }
    }

    /// Every role, for metric series that exist from the start.
    pub const ALL: [Role; 3] = [Role::Super, Role::Peer, Role::Undecided];
}

/// The role for a setting and a verdict.
pub fn decide(setting: RoleSetting, reach: Reachability, first_node: bool) -> Role {
    match setting {
        RoleSetting::Super => Role::Super,
        RoleSetting::Peer => Role::Peer,
        RoleSetting::Auto => match reach {
            Reachability::Public => Role::Super,
            Reachability::Private => Role::Peer,
            Reachability::Unknown if first_node => Role::Super,
            Reachability::Unknown => Role::Undecided,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_follows_the_verdict_both_ways() {
        use Reachability::*;
        assert_eq!(decide(RoleSetting::Auto, Public, false), Role::Super);
        assert_eq!(decide(RoleSetting::Auto, Private, false), Role::Peer);
        assert_eq!(decide(RoleSetting::Auto, Unknown, false), Role::Undecided);
        assert_eq!(decide(RoleSetting::Auto, Unknown, true), Role::Super);
        // Evidence wins over being first.
        assert_eq!(decide(RoleSetting::Auto, Private, true), Role::Peer);
    }

    #[test]
    fn forced_roles_ignore_the_verdict() {
        for reach in [
            Reachability::Public,
            Reachability::Private,
            Reachability::Unknown,
        ] {
            assert_eq!(decide(RoleSetting::Super, reach, false), Role::Super);
            assert_eq!(decide(RoleSetting::Peer, reach, true), Role::Peer);
        }
    }
}
