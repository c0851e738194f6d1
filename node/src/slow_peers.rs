//! Peers that stop reading what the node sends them.
//!
//! A peer that stops reading costs the node memory and time: gossipsub keeps a copy of
//! every message for it in its send queue (up to [`GOSSIP_QUEUE_LEN`]), and each file
//! response waits in its stream until read. A peer that stops reading its whole
//! connection stops answering pings too, and ping closes the connection within 20 s.
//! This module catches the one that keeps the connection alive but leaves gossipsub's
//! stream or its file responses unread:
//!
//! - gossipsub reports a peer as slow at each heartbeat in which messages for it were
//!   dropped (queue full, or a message waited past its deadline); a peer reported slow
//!   for [`GOSSIP_SLOW_FOR`] without a quiet gap of [`GOSSIP_QUIET`] is dropped;
//! - a file response has [`response_deadline`] to be read: 5 s plus its size at
//!   [`RESPONSE_MIN_RATE`], counted after the responses handed to the same peer before
//!   it (they share its link); a peer with a response pending past it is dropped.
//!   Responses whose deadline falls beyond the file request timeout (60 s) are cut by
//!   that timeout instead, without dropping the peer.
//!
//! Dropped means disconnected and counted (`servant_slow_peers_dropped_total{protocol}`),
//! not banned: a peer that was only briefly slow may connect again.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use libp2p::PeerId;

/// Messages gossipsub queues for one peer before it drops new ones (its default is
/// 5,000): each is a copy of up to 80 KiB, so this bounds what a peer that stops
/// reading can hold to 80 MiB for the seconds before it is dropped.
pub const GOSSIP_QUEUE_LEN: usize = 1_000;
/// How long a peer may keep being reported slow before it is dropped.
pub const GOSSIP_SLOW_FOR: Duration = Duration::from_secs(10);
/// A gap this long without a slow report ends a streak.
pub const GOSSIP_QUIET: Duration = Duration::from_secs(5);
/// Time a file response gets before its size counts.
pub const RESPONSE_BASE: Duration = Duration::from_secs(5);
/// The slowest a peer may read the responses handed to it (bytes per second, over all
/// of them): one 1 MiB chunk gets 21 s, sixteen handed at once 5 s + 256 s in all.
pub const RESPONSE_MIN_RATE: u64 = 64 * 1024;

/// When a file response of `bytes` handed to the stream at `now` must have been read,
/// given that the peer's earlier responses must be read by `previous`.
pub fn response_deadline(bytes: u64, now: Instant, previous: Option<Instant>) -> Instant {
    let start = previous.map_or(now + RESPONSE_BASE, |p| p.max(now + RESPONSE_BASE));
    start + Duration::from_secs_f64(bytes as f64 / RESPONSE_MIN_RATE as f64)
}

#[derive(Debug, Clone, Copy)]
struct Streak {
    first: Instant,
    last: Instant,
    failed: usize,
}

/// Gossipsub's slow-peer reports, kept per connected peer.
#[derive(Debug, Default)]
pub struct SlowGossip {
    streaks: HashMap<PeerId, Streak>,
}

impl SlowGossip {
    /// Gossipsub dropped `failed` messages for `peer` since its last heartbeat.
    pub fn report(&mut self, peer: PeerId, failed: usize, now: Instant) {
        let streak = self.streaks.entry(peer).or_insert(Streak {
            first: now,
            last: now,
            failed: 0,
        });
        if now.saturating_duration_since(streak.last) > GOSSIP_QUIET {
            *streak = Streak {
                first: now,
                last: now,
                failed: 0,
            };
        }
        streak.last = now;
        streak.failed = streak.failed.saturating_add(failed);
    }

    /// Peers slow for [`GOSSIP_SLOW_FOR`], with the messages dropped for each;
    /// forgotten here (they are about to be disconnected). Ended streaks are cleared.
    pub fn due(&mut self, now: Instant) -> Vec<(PeerId, usize)> {
        self.streaks
            .retain(|_, s| now.saturating_duration_since(s.last) <= GOSSIP_QUIET);
        let due: Vec<(PeerId, usize)> = self
            .streaks
            .iter()
            .filter(|(_, s)| s.last.saturating_duration_since(s.first) >= GOSSIP_SLOW_FOR)
            .map(|(peer, s)| (*peer, s.failed))
            .collect();
        for (peer, _) in &due {
            self.streaks.remove(peer);
        }
        due
    }

    /// The peer disconnected.
    pub fn forget(&mut self, peer: &PeerId) {
        self.streaks.remove(peer);
    }

    /// Peers in a streak now (bounded by the connected peers).
    pub fn len(&self) -> usize {
        self.streaks.len()
    }

    /// Whether no peer is in a streak.
    pub fn is_empty(&self) -> bool {
        self.streaks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_slow_for_ten_seconds_is_due_once() {
        let t = Instant::now();
        let peer = PeerId::random();
        let mut slow = SlowGossip::default();
        for s in 0..10 {
            slow.report(peer, 3, t + Duration::from_secs(s));
            assert!(slow.due(t + Duration::from_secs(s)).is_empty(), "at {s} s");
        }
        slow.report(peer, 3, t + Duration::from_secs(10));
        assert_eq!(slow.due(t + Duration::from_secs(10)), vec![(peer, 33)]);
        assert!(slow.is_empty());
    }

    #[test]
    fn a_quiet_gap_ends_the_streak() {
        let t = Instant::now();
        let peer = PeerId::random();
        let mut slow = SlowGossip::default();
        slow.report(peer, 1, t);
        slow.report(peer, 1, t + Duration::from_secs(4));
        // Quiet for 6 s: the burst is over.
        slow.report(peer, 1, t + Duration::from_secs(10));
        assert!(slow.due(t + Duration::from_secs(10)).is_empty());
        // And a streak nobody extends is cleared.
        assert!(slow.due(t + Duration::from_secs(16)).is_empty());
        assert!(slow.is_empty());
    }

    #[test]
    fn deadlines_grow_with_the_response_and_queue_behind_the_last() {
        let t = Instant::now();
        let mib = 1024 * 1024;
        assert_eq!(response_deadline(0, t, None), t + RESPONSE_BASE);
        let first = response_deadline(mib, t, None);
        assert_eq!(first, t + Duration::from_secs(21));
        // A second response handed at once is read after the first.
        assert_eq!(
            response_deadline(mib, t, Some(first)),
            t + Duration::from_secs(37)
        );
        // A deadline long past does not shorten a new one.
        let later = t + Duration::from_secs(100);
        assert_eq!(
            response_deadline(mib, later, Some(first)),
            later + Duration::from_secs(21)
        );
    }
}
