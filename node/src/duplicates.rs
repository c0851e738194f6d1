//! Which of several direct connections to one peer to keep.
//!
//! Both ends must keep the same connection, or each closes the one the other kept and
//! the peer is lost. Both ends also want to keep the *older* one: protocols that hold
//! one long-lived stream per peer open it on the first connection, and gossipsub in
//! particular shares one send queue among a peer's connections but only a connection
//! that already has its outbound stream is woken when a message is queued. Closing
//! the old connection leaves the new one's gossipsub handler asleep until some other
//! traffic wakes it, and messages queued meanwhile expire unsent (libp2p-gossipsub
//! 0.50, `publish_queue_duration`).
//!
//! Age only counts among connections known to work: the event loop judges a peer's
//! direct connections once each has answered a ping since the newest appeared (relayed
//! ones are closed as soon as a direct one exists, without waiting: DCUtR keeps
//! punching while a relayed connection stays, and each punch adds a newer one). Otherwise an
//! old connection to a peer that restarted, dead but not yet found so (a QUIC one
//! above all: nothing like a TCP reset ends it), would win over the live new one.
//!
//! So the oldest connection is kept when it clearly came first: an AutoNAT dial-back
//! or a DHT lookup's dial arrives seconds after the connection the peers talk over,
//! and both ends see that order. Connections established within [`SIMULTANEOUS`] of
//! the oldest (two nodes dialing each other at once) may be seen in a different order
//! at each end, so among those the rule is one both ends compute alike: keep the
//! connection dialed by the smaller PeerId. Whenever a peer loses a connection and
//! keeps another, whichever end closed it, the event loop nudges the ones left (see
//! [`crate::keep_alive`]) so their handlers look at their queues.

use std::time::{Duration, Instant};

use libp2p::swarm::ConnectionId;

/// Connections established this close to the oldest count as opened at once, their
/// order not trusted to agree at both ends.
pub const SIMULTANEOUS: Duration = Duration::from_secs(1);

/// One direct connection to the peer, as this end sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Direct {
    /// The connection.
    pub id: ConnectionId,
    /// Whether this end dialed it.
    pub outbound: bool,
    /// When it was established here.
    pub since: Instant,
}

/// What to do with a peer's direct connections.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Connections to keep (this end closes none of them).
    pub keep: Vec<ConnectionId>,
    /// Connections this end closes.
    pub close: Vec<ConnectionId>,
}

/// Decides which of `direct` to keep. `we_are_smaller`: our PeerId sorts below the
/// peer's. Connections the peer is to choose among (it dialed them, and its PeerId is
/// the smaller) are all kept here: the peer closes the surplus itself.
pub fn decide(direct: &[Direct], we_are_smaller: bool) -> Decision {
    let mut sorted = direct.to_vec();
    sorted.sort_by_key(|c| (c.since, c.id));
    let Some(oldest) = sorted.first().copied() else {
        return Decision::default();
    };
    let simultaneous: Vec<Direct> = sorted
        .iter()
        .copied()
        .filter(|c| c.since.saturating_duration_since(oldest.since) <= SIMULTANEOUS)
        .collect();
    let keep: Vec<Direct> = if simultaneous.len() == 1 {
        vec![oldest]
    } else {
        let dialed_by_smaller: Vec<Direct> = simultaneous
            .iter()
            .copied()
            .filter(|c| c.outbound == we_are_smaller)
            .collect();
        let mut keep = if dialed_by_smaller.is_empty() {
            simultaneous
        } else {
            dialed_by_smaller
        };
        // We dialed them all, so we choose: the oldest. When the peer did, it chooses.
        if keep.iter().all(|c| c.outbound) {
            keep.truncate(1);
        }
        keep
    };
    let keep_ids: Vec<ConnectionId> = keep.iter().map(|c| c.id).collect();
    let close: Vec<Direct> = sorted
        .iter()
        .copied()
        .filter(|c| !keep_ids.contains(&c.id))
        .collect();
    Decision {
        keep: keep_ids,
        close: close.iter().map(|c| c.id).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(id: usize, outbound: bool, at: Instant, after_ms: u64) -> Direct {
        Direct {
            id: ConnectionId::new_unchecked(id),
            outbound,
            since: at + Duration::from_millis(after_ms),
        }
    }

    fn ids(v: &[usize]) -> Vec<ConnectionId> {
        v.iter().map(|i| ConnectionId::new_unchecked(*i)).collect()
    }

    #[test]
    fn a_later_connection_is_closed_at_both_ends() {
        let t = Instant::now();
        // a's view: b dialed it first (inbound, id 1); a dialed back later (id 7).
        let at_a = [conn(1, false, t, 0), conn(7, true, t, 5_000)];
        // b's view of the same two: its own dial first, a's dial-back later.
        let at_b = [conn(3, true, t, 2), conn(9, false, t, 5_001)];
        for smaller in [true, false] {
            let a = decide(&at_a, smaller);
            assert_eq!((a.keep, a.close), (ids(&[1]), ids(&[7])));
            let b = decide(&at_b, !smaller);
            assert_eq!((b.keep, b.close), (ids(&[3]), ids(&[9])));
        }
    }

    #[test]
    fn simultaneous_dials_keep_the_smaller_peers_dial_at_both_ends() {
        let t = Instant::now();
        // a < b. a dialed id 1, b dialed id 2; a saw b's first, b saw a's first.
        let at_a = [conn(1, true, t, 40), conn(2, false, t, 0)];
        let at_b = [conn(5, false, t, 0), conn(6, true, t, 30)];
        let a = decide(&at_a, true);
        assert_eq!((a.keep, a.close), (ids(&[1]), ids(&[2])));
        let b = decide(&at_b, false);
        assert_eq!((b.keep, b.close), (ids(&[5]), ids(&[6])));
    }

    #[test]
    fn the_dialer_chooses_among_its_own_dials() {
        let t = Instant::now();
        // We are smaller and dialed both at once: we keep the older.
        let ours = [conn(4, true, t, 300), conn(2, true, t, 0)];
        let d = decide(&ours, true);
        assert_eq!((d.keep, d.close), (ids(&[2]), ids(&[4])));
        // The peer is smaller and dialed both: it chooses, we close nothing.
        let theirs = [conn(4, false, t, 300), conn(2, false, t, 0)];
        let d = decide(&theirs, false);
        assert_eq!(d.close, ids(&[]));
        assert_eq!(d.keep.len(), 2);
    }

    #[test]
    fn one_or_no_connection_closes_nothing() {
        let t = Instant::now();
        assert_eq!(decide(&[], true), Decision::default());
        let d = decide(&[conn(1, false, t, 0)], false);
        assert_eq!((d.keep, d.close), (ids(&[1]), ids(&[])));
    }
}
