//! What the node needs to know about a multiaddr: whether it can be dialed, whether
//! it goes through a relay, which IP and which transport it uses.

use std::net::IpAddr;

use libp2p::{multiaddr::Protocol, Multiaddr};

/// Whether another node could dial this address: an IP that is not `0.0.0.0` or
/// `::`, or a DNS name.
pub fn is_dialable(addr: &Multiaddr) -> bool {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => !ip.is_unspecified(),
        Some(Protocol::Ip6(ip)) => !ip.is_unspecified(),
        Some(Protocol::Dns(_) | Protocol::Dns4(_) | Protocol::Dns6(_) | Protocol::Dnsaddr(_)) => {
            true
        }
        _ => false,
    }
}

/// Whether the address goes through a relay (`/p2p-circuit`).
pub fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// Whether the address is IPv6 link-local, which needs a zone to be dialed.
pub fn is_link_local(addr: &Multiaddr) -> bool {
    matches!(addr.iter().next(), Some(Protocol::Ip6(ip)) if ip.is_unicast_link_local())
}

/// The IP of the first hop (for a relayed address, the relay's). IPv4-mapped IPv6
/// addresses (`::ffff:10.0.0.1`) come back as IPv4, so a dual-stack listener cannot
/// be used to slip past an IPv4 rule.
pub fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(canonical_ip(IpAddr::V6(ip))),
        _ => None,
    })
}

/// IPv4-mapped IPv6 as IPv4; everything else unchanged.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// The address without a trailing `/p2p/<id>`, so addresses of one peer compare
/// equal whichever component stored them.
pub fn without_p2p(mut addr: Multiaddr) -> Multiaddr {
    if matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
        addr.pop();
    }
    addr
}

/// The transport as a metric label: `relay`, `quic`, `tcp` or `other`.
pub fn transport(addr: &Multiaddr) -> &'static str {
    if is_relayed(addr) {
        "relay"
    } else if addr.iter().any(|p| matches!(p, Protocol::QuicV1)) {
        "quic"
    } else if addr.iter().any(|p| matches!(p, Protocol::Tcp(_))) {
        "tcp"
    } else {
        "other"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[test]
    fn classifies_addresses() {
        assert!(is_dialable(&m("/ip4/192.0.2.1/tcp/1")));
        assert!(is_dialable(&m("/dns4/example.org/tcp/1")));
        assert!(!is_dialable(&m("/ip4/0.0.0.0/tcp/1")));
        assert!(!is_dialable(&m("/ip6/::/tcp/1")));
        assert!(is_link_local(&m("/ip6/fe80::1/tcp/1")));
        assert!(!is_link_local(&m("/ip6/2001:db8::1/tcp/1")));
        assert_eq!(transport(&m("/ip4/1.2.3.4/udp/1/quic-v1")), "quic");
        assert_eq!(transport(&m("/ip4/1.2.3.4/tcp/1")), "tcp");
        let relayed = m("/ip4/1.2.3.4/tcp/1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit");
        assert!(is_relayed(&relayed));
        assert_eq!(transport(&relayed), "relay");
        assert_eq!(
            ip_of(&m("/ip6/::ffff:10.0.0.1/tcp/1")),
            Some("10.0.0.1".parse().unwrap())
        );
    }
}
