//! A cap on inbound connections per remote IP address.
//!
//! libp2p's `connection_limits` caps connections in total and per PeerId, but a
//! PeerId costs nothing to make: one host with a thousand fresh keys fills every
//! slot the total cap allows. Counting by source address makes such a host pay for
//! addresses instead. Only inbound connections count: the ones we dial are ours to
//! choose, and a relayed connection's address is the relay's, not the peer's, so it
//! is left to the relay's own per-IP limits.

use std::{
    collections::HashMap,
    fmt,
    net::IpAddr,
    task::{Context, Poll},
};

use libp2p::{
    core::{transport::PortUse, Endpoint},
    multiaddr::Protocol,
    swarm::{
        dummy, ConnectionClosed, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour,
        THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
    },
    Multiaddr, PeerId,
};

/// Why an inbound connection was refused: its address already holds the most
/// connections one address may.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpLimitExceeded {
    /// The remote address.
    pub ip: IpAddr,
    /// The cap it reached (`max_connections_per_ip`).
    pub limit: u32,
}

impl fmt::Display for IpLimitExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} already holds {} inbound connections (max_connections_per_ip)",
            self.ip, self.limit
        )
    }
}

impl std::error::Error for IpLimitExceeded {}

/// Counts established inbound connections per remote IP and refuses the one over
/// the cap, both before the handshake (cheap) and once established (exact).
pub struct Behaviour {
    limit: u32,
    by_ip: HashMap<IpAddr, u32>,
    /// The address each counted connection was charged to, so a close releases it.
    charged: HashMap<ConnectionId, IpAddr>,
}

impl Behaviour {
    /// A cap of `limit` inbound connections per remote IP.
    pub fn new(limit: u32) -> Self {
        Self {
            limit,
            by_ip: HashMap::new(),
            charged: HashMap::new(),
        }
    }

    /// Inbound connections counted against `ip` now.
    pub fn count(&self, ip: IpAddr) -> u32 {
        self.by_ip.get(&ip).copied().unwrap_or(0)
    }

    /// Addresses holding at least one inbound connection.
    pub fn addresses(&self) -> usize {
        self.by_ip.len()
    }

    /// Releases what a closed connection was charged to its address.
    fn release(&mut self, connection_id: ConnectionId) {
        let Some(ip) = self.charged.remove(&connection_id) else {
            return;
        };
        if let Some(n) = self.by_ip.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.by_ip.remove(&ip);
            }
        }
    }

    fn check(&self, ip: IpAddr) -> Result<(), ConnectionDenied> {
        if self.count(ip) >= self.limit {
            return Err(ConnectionDenied::new(IpLimitExceeded {
                ip,
                limit: self.limit,
            }));
        }
        Ok(())
    }
}

/// The remote IP of a direct connection; none for a relayed one (whose address is
/// the relay's) or an address without an IP.
fn remote_ip(addr: &Multiaddr) -> Option<IpAddr> {
    if crate::addr::is_relayed(addr) {
        return None;
    }
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = std::convert::Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        _local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        match remote_ip(remote_addr) {
            Some(ip) => self.check(ip),
            None => Ok(()),
        }
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        _peer: PeerId,
        _local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        if let Some(ip) = remote_ip(remote_addr) {
            // Several handshakes from one address may pass the pending check at once;
            // this is where the cap is exact.
            self.check(ip)?;
            *self.by_ip.entry(ip).or_insert(0) += 1;
            self.charged.insert(connection_id, ip);
        }
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        _peer: PeerId,
        _addr: &Multiaddr,
        _role_override: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if let FromSwarm::ConnectionClosed(ConnectionClosed { connection_id, .. }) = event {
            self.release(connection_id);
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _peer: PeerId,
        _connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(
        &mut self,
        _cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inbound(b: &mut Behaviour, id: usize, addr: &str) -> Result<(), ConnectionDenied> {
        let addr: Multiaddr = addr.parse().unwrap();
        let local: Multiaddr = "/ip4/10.0.0.1/tcp/4001".parse().unwrap();
        b.handle_pending_inbound_connection(ConnectionId::new_unchecked(id), &local, &addr)?;
        b.handle_established_inbound_connection(
            ConnectionId::new_unchecked(id),
            PeerId::random(),
            &local,
            &addr,
        )
        .map(|_| ())
    }

    fn close(b: &mut Behaviour, id: usize) {
        b.release(ConnectionId::new_unchecked(id));
    }

    #[test]
    fn caps_each_address_and_releases_on_close() {
        let mut b = Behaviour::new(2);
        inbound(&mut b, 1, "/ip4/192.0.2.1/tcp/1000").unwrap();
        inbound(&mut b, 2, "/ip4/192.0.2.1/tcp/1001").unwrap();
        let refused = inbound(&mut b, 3, "/ip4/192.0.2.1/tcp/1002").unwrap_err();
        let cause = refused.downcast_ref::<IpLimitExceeded>().copied();
        assert_eq!(
            cause,
            Some(IpLimitExceeded {
                ip: "192.0.2.1".parse().unwrap(),
                limit: 2
            })
        );
        // Another address is counted on its own.
        inbound(&mut b, 4, "/ip6/2001:db8::1/udp/1/quic-v1").unwrap();
        assert_eq!(b.addresses(), 2);
        close(&mut b, 1);
        inbound(&mut b, 5, "/ip4/192.0.2.1/tcp/1003").unwrap();
        close(&mut b, 2);
        close(&mut b, 5);
        close(&mut b, 4);
        assert_eq!(b.addresses(), 0);
    }

    #[test]
    fn relayed_connections_are_not_charged_to_the_relay() {
        let mut b = Behaviour::new(1);
        let relay = PeerId::random();
        for id in 0..5 {
            let addr = format!("/ip4/192.0.2.9/tcp/4001/p2p/{relay}/p2p-circuit");
            inbound(&mut b, id, &addr).unwrap();
        }
        assert_eq!(b.addresses(), 0);
    }
}
