//! `servant doctor`: this node's connectivity explained in plain words, with what to
//! do about it.
//!
//! Everything here is a pure function of what the node reports through its API
//! (`/v1/status` and `/v1/reach`), so the diagnosis can be tested with fabricated
//! reports and a remote node can be diagnosed from anywhere its API is reachable.

use std::collections::{BTreeMap, BTreeSet};

use libp2p::{multiaddr::Protocol, Multiaddr};

use crate::{client::Status, reach::verdict::Reachability, role::Role, traversal::ReachView};

/// How the NAT in front of this node maps ports, as far as observations tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Peers see us at our own listen address: no NAT, or a port-preserving one.
    Direct,
    /// Different peers see the same outside address and port: endpoint-independent
    /// mapping (a cone NAT); hole punching can work.
    Consistent,
    /// Different peers see different outside ports: endpoint-dependent mapping (a
    /// symmetric NAT); hole punching will not work.
    Symmetric,
    /// Too few observations to tell.
    Unknown,
}

/// Outside (IP, port) pairs each observer saw, per transport.
type Observations = BTreeMap<&'static str, BTreeMap<String, BTreeSet<(String, u16)>>>;

/// The transport, IP and port of an address, or `None` for relayed or DNS ones.
fn endpoint(addr: &Multiaddr) -> Option<(&'static str, String, u16)> {
    let mut ip = None;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(a.to_string()),
            Protocol::Ip6(a) => ip = Some(a.to_string()),
            Protocol::Tcp(port) => return ip.map(|ip| ("tcp", ip, port)),
            Protocol::Udp(port) => return ip.map(|ip| ("udp", ip, port)),
            Protocol::P2pCircuit => return None,
            _ => {}
        }
    }
    None
}

/// Infers the NAT's mapping from what peers observed, per transport.
pub fn mapping(
    listen: &[String],
    observed: &[(String, String)],
) -> BTreeMap<&'static str, Mapping> {
    let listening: BTreeSet<(&'static str, String, u16)> = listen
        .iter()
        .filter_map(|a| a.parse::<Multiaddr>().ok())
        .filter_map(|a| endpoint(&a))
        .collect();
    let mut seen: Observations = BTreeMap::new();
    for (observer, addr) in observed {
        let Some((transport, ip, port)) = addr.parse::<Multiaddr>().ok().and_then(|a| endpoint(&a))
        else {
            continue;
        };
        seen.entry(transport)
            .or_default()
            .entry(observer.clone())
            .or_default()
            .insert((ip, port));
    }
    let mut result = BTreeMap::new();
    for transport in ["tcp", "udp"] {
        let Some(by_observer) = seen.get(transport) else {
            result.insert(transport, Mapping::Unknown);
            continue;
        };
        let all: BTreeSet<&(String, u16)> = by_observer.values().flatten().collect();
        let is_ours =
            |(ip, port): &(String, u16)| listening.contains(&(transport, ip.clone(), *port));
        // Peers on our own network see our listen address: no evidence about the NAT.
        let outside: BTreeMap<&String, BTreeSet<&(String, u16)>> = by_observer
            .iter()
            .map(|(o, seen)| {
                (
                    o,
                    seen.iter().filter(|e| !is_ours(e)).collect::<BTreeSet<_>>(),
                )
            })
            .filter(|(_, seen)| !seen.is_empty())
            .collect();
        let mut observers_per_endpoint: BTreeMap<&(String, u16), usize> = BTreeMap::new();
        for endpoint in outside.values().flatten() {
            *observers_per_endpoint.entry(endpoint).or_default() += 1;
        }
        let verdict = if all.iter().all(|e| is_ours(e)) {
            Mapping::Direct
        } else if observers_per_endpoint.values().any(|n| *n >= 2) {
            // One outside port seen by two peers: the mapping does not depend on the
            // destination. A stray other port (a flow that did not leave from the
            // listen port) does not undo that.
            Mapping::Consistent
        } else if outside.len() < 2 {
            Mapping::Unknown
        } else {
            Mapping::Symmetric
        };
        result.insert(transport, verdict);
    }
    result
}

/// The diagnosis: findings first, then advice. Each line is a sentence.
pub fn diagnose(status: &Status, reach: &ReachView) -> Vec<String> {
    let mut out = Vec::new();
    out.push(format!(
        "This node is {} and acts as {} (role setting: {:?}).",
        match reach.reachability {
            Reachability::Public => "reachable from the outside (public)",
            Reachability::Private => "not reachable from the outside (private)",
            Reachability::Unknown => "of unknown reachability so far",
        },
        match reach.role {
            Role::Super => "a super-peer: it relays for NATed peers and answers DHT queries",
            Role::Peer => "a peer: it is reached through relays and queries the DHT as a client",
            Role::Undecided =>
                "an undecided node: it answers DHT queries but relays for no one yet",
        },
        reach.role_setting
    ));
    out.push(format!("Why: {}.", reach.reason));
    for a in &status.listen_addrs {
        out.push(format!("Listening on {a}."));
    }
    for c in &reach.candidates {
        let verdict = if c.confirmed {
            "confirmed reachable"
        } else if c.reached_by.is_empty() && c.failed_from.len() >= 3 {
            "not reachable"
        } else {
            "not decided"
        };
        out.push(format!(
            "Address {}: {verdict} ({} peers reached it, {} could not).",
            c.addr,
            c.reached_by.len(),
            c.failed_from.len()
        ));
    }
    for a in &status.external_addrs {
        out.push(format!("Announced to other peers: {a}."));
    }
    let mappings = mapping(&status.listen_addrs, &reach.observed);
    let mut symmetric = false;
    for (transport, m) in &mappings {
        let name = if *transport == "tcp" {
            "TCP"
        } else {
            "UDP (QUIC)"
        };
        let text = match m {
            Mapping::Direct => format!("{name}: peers see this node at its own listen address (no NAT in the way)."),
            Mapping::Consistent => format!("{name}: peers see the same outside address and port: the NAT maps ports independently of the destination, so hole punching can work."),
            Mapping::Symmetric => {
                symmetric = true;
                format!("{name}: different peers see different outside ports: this is a symmetric NAT (endpoint-dependent mapping), so hole punching will not work.")
            }
            Mapping::Unknown => format!("{name}: too few observations to tell how the NAT maps ports."),
        };
        out.push(text);
    }
    match reach.upnp.as_str() {
        "mapped" => {
            for (local, external) in &reach.upnp_mappings {
                let verdict = if reach.confirmed_addrs.contains(external) {
                    "confirmed reachable"
                } else {
                    "not confirmed by dial-backs yet"
                };
                out.push(format!(
                    "UPnP: the router forwards {external} to {local} ({verdict})."
                ));
            }
        }
        "gateway not public" => out.push("UPnP: the router answered, but its own address is not public (a NAT behind another NAT, as with carrier-grade NAT): a mapping on it would not help.".into()),
        "no gateway" => out.push("UPnP: no router on the local network answered (UPnP off on the router, or none there).".into()),
        "expired" => out.push("UPnP: the router stopped forwarding our ports.".into()),
        "off" => out.push("UPnP: off (--no-upnp).".into()),
        _ => {}
    }
    let accepted: Vec<_> = reach.reservations.iter().filter(|r| r.accepted).collect();
    if reach.role == Role::Peer {
        if accepted.is_empty() {
            out.push("No relay reservation is held: peers that cannot dial this node cannot reach it at all.".into());
        } else {
            for r in &accepted {
                out.push(format!(
                    "Relay reservation held on {} ({} renewals).",
                    r.relay, r.renewals
                ));
            }
        }
    }
    if reach.reservations_served > 0 {
        out.push(format!(
            "Relaying for {} NATed peers.",
            reach.reservations_served
        ));
    }
    let (ok, failed): (Vec<_>, Vec<_>) = reach.holepunches.iter().partition(|h| h.success);
    if !reach.holepunches.is_empty() {
        // A retry costs a round trip over the relay and a dial timeout: worth saying.
        let retried = ok
            .iter()
            .filter(|h| h.attempt.is_some_and(|a| a > 1))
            .count();
        let retried = if retried > 0 {
            format!(" ({retried} of them on a retry)")
        } else {
            String::new()
        };
        out.push(format!(
            "Recent hole punches: {} succeeded{retried}, {} failed.",
            ok.len(),
            failed.len()
        ));
        for h in failed.iter().rev().take(3) {
            out.push(format!(
                "  with {}: {}",
                h.peer,
                h.error.as_deref().unwrap_or("failed")
            ));
        }
    }
    // Advice.
    if reach.reachability == Reachability::Private {
        out.push("To do: open or forward port 4001 (TCP and UDP) to this host on your router, or enable UPnP on it; if the node has a public address the peers cannot observe, set --announce.".into());
        if symmetric {
            out.push("To do: behind a symmetric NAT, direct connections need a port forward; until then transfers go through relays: ask super-peer operators to run --relay-profile data.".into());
        }
        if accepted.is_empty() {
            out.push("To do: no relay is reachable: check that the bootnodes are reachable and that some super-peer is public.".into());
        }
    }
    if reach.reachability == Reachability::Unknown && status.connected_peers < 2 {
        out.push("To do: reachability needs dial-backs from at least two peers; connect to more peers (--bootnode).".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{relays::ReservationView, role::RoleSetting, traversal::CandidateView};

    fn status(listen: &[&str]) -> Status {
        serde_json::from_value(serde_json::json!({
            "peer_id": "12D3KooWtest", "agent": "servant/0", "listen_addrs": listen,
            "external_addrs": [], "role": "peer", "reachability": "private",
            "connected_peers": 3, "connections": 3, "routing_table_size": 3,
            "known_peers": 0, "topics": [], "bootnodes": [], "bootstrapped": true,
            "ready": true, "uptime_secs": 10
        }))
        .unwrap()
    }

    fn reach(observed: &[(&str, &str)], reservations: Vec<ReservationView>) -> ReachView {
        ReachView {
            reachability: Reachability::Private,
            reason: "3 dial-backs failed and none reached us".into(),
            role: Role::Peer,
            role_setting: RoleSetting::Auto,
            confirmed_addrs: vec![],
            candidates: vec![CandidateView {
                addr: "/ip4/198.18.0.21/tcp/4001".into(),
                reached_by: vec![],
                failed_from: vec![("a".into(), "dial".into()); 3],
                confirmed: false,
            }],
            reservations,
            reservations_served: 0,
            holepunches: vec![],
            rounds: 0,
            observed: observed
                .iter()
                .map(|(o, a)| (o.to_string(), a.to_string()))
                .collect(),
            upnp: "off".into(),
            upnp_mappings: vec![],
        }
    }

    #[test]
    fn a_symmetric_nat_is_named_and_a_missing_reservation_is_said() {
        let listen = ["/ip4/10.1.0.2/tcp/4001"];
        let r = reach(
            &[
                ("p1", "/ip4/198.18.0.21/tcp/40001"),
                ("p2", "/ip4/198.18.0.21/tcp/40002"),
            ],
            vec![],
        );
        let text = diagnose(&status(&listen), &r).join("\n");
        assert!(text.contains("symmetric NAT"), "{text}");
        assert!(text.contains("No relay reservation is held"), "{text}");
        assert!(text.contains("forward port 4001"), "{text}");
    }

    #[test]
    fn a_cone_nat_is_told_apart_from_no_nat() {
        let listen = ["/ip4/10.1.0.2/tcp/4001"];
        let cone = [
            ("p1", "/ip4/198.18.0.21/tcp/4001"),
            ("p2", "/ip4/198.18.0.21/tcp/4001"),
        ];
        assert_eq!(
            mapping(
                &listen.map(String::from),
                &cone.map(|(a, b)| (a.into(), b.into()))
            )["tcp"],
            Mapping::Consistent
        );
        let direct = [
            ("p1", "/ip4/10.1.0.2/tcp/4001"),
            ("p2", "/ip4/10.1.0.2/tcp/4001"),
        ];
        assert_eq!(
            mapping(
                &listen.map(String::from),
                &direct.map(|(a, b)| (a.into(), b.into()))
            )["tcp"],
            Mapping::Direct
        );
        let one = [("p1", "/ip4/198.18.0.21/tcp/5555")];
        assert_eq!(
            mapping(
                &listen.map(String::from),
                &one.map(|(a, b)| (a.into(), b.into()))
            )["tcp"],
            Mapping::Unknown
        );
    }

    #[test]
    fn held_reservations_are_listed() {
        let r = reach(
            &[],
            vec![ReservationView {
                relay: "12D3KooWrelay".into(),
                accepted: true,
                addrs: vec![],
                renewals: 2,
                age_secs: 100,
            }],
        );
        let text = diagnose(&status(&["/ip4/10.1.0.2/tcp/4001"]), &r).join("\n");
        assert!(
            text.contains("Relay reservation held on 12D3KooWrelay"),
            "{text}"
        );
        assert!(!text.contains("No relay reservation"), "{text}");
    }
}
