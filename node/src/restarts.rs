//! Noticing a peer that restarted behind a connection we still hold, and starting
//! afresh with it.
//!
//! A process killed without warning leaves its QUIC connections open at the far end
//! until they time out (no reset reaches us: the restarted process no longer knows
//! their connection IDs), and comes back over a new one. Protocols that greet a peer
//! only on its first connection saw the new one as a second: libp2p-gossipsub 0.50
//! sends its subscriptions when a peer's first connection is established and forgets
//! the peer only when the last one closes, so the restarted node never learned our
//! topics, could not join our mesh, and our mesh still held its past self.
//!
//! The sign is an older direct connection that *died* (its transport timed out, or a
//! ping went unanswered) while a direct connection more than [`SIMULTANEOUS`] newer
//! lives. That alone would also fit a peer that simply vanished, its connections
//! timing out one after the other, so the newer connection must then prove the peer
//! alive: only a ping answered on it after the death makes the peer a restart. Then
//! every connection to the peer closes, any that arrives meanwhile too, and
//! [`REDIAL_PAUSE`] after the last is gone the peer is dialed again, so both ends
//! start their protocols afresh. A peer is reset at most once per [`RESET_EVERY`]: a path that keeps
//! failing (one flow dropped by a firewall) must not cost its working connection
//! every few seconds. This is a plain state machine; the event loop does the I/O.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use libp2p::{Multiaddr, PeerId};

use crate::duplicates::SIMULTANEOUS;

/// How long a death waits for the newer connection to answer a ping: two ping
/// periods and some slack.
pub const PROOF_WAIT: Duration = Duration::from_secs(25);
/// How long the connections of a peer being reset may take to close before the reset
/// is given up (the redial then does not happen).
pub const CLOSE_WAIT: Duration = Duration::from_secs(10);
/// How long after a reset's last connection closed the peer is dialed again, unless
/// it connected by itself meanwhile. The restarted peer greeted us on the connection
/// the reset closed (its first since it started); if our redial reaches it before it
/// has processed that close, it takes ours for a second connection and greets nobody:
/// its subscriptions never reach us and every GRAFT it sends is dropped
/// (libp2p-gossipsub 0.50 takes a GRAFT only from a peer known to subscribe). Waiting
/// lets its end catch up, or its own redial come first.
pub const REDIAL_PAUSE: Duration = Duration::from_secs(2);
/// A peer is reset at most this often.
pub const RESET_EVERY: Duration = Duration::from_secs(300);
/// Most peers tracked in each state; beyond it new deaths are not judged (they are
/// rare: a restart behind a QUIC connection).
pub const MAX_TRACKED: usize = 1024;

/// Whether the death of a direct connection established at `closed_since` points to
/// a restart: a direct connection left (`direct_left`, when each was established) is
/// more than [`SIMULTANEOUS`] newer. Between two connections opened at once the
/// older may be the one both ends drop as a duplicate, and that is no restart.
pub fn newer_one_lives(closed_since: Instant, direct_left: &[Instant]) -> bool {
    direct_left
        .iter()
        .any(|since| since.saturating_duration_since(closed_since) > SIMULTANEOUS)
}

/// Whether a connection ended because its transport timed out (QUIC's idle timeout,
/// the kernel giving up on TCP retransmissions), as opposed to being closed by either
/// end. A peer closing a connection it no longer wants shows as an I/O error too, so
/// only a timeout anywhere in the chain of causes counts as the far end having gone.
pub fn timed_out(cause: &libp2p::swarm::ConnectionError) -> bool {
    let libp2p::swarm::ConnectionError::IO(e) = cause else {
        return false;
    };
    crate::error_chain::causes(e).iter().any(|err| {
        let io_timeout = err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut);
        // quinn's idle timeout reaches us boxed in libp2p-quic's own error type,
        // which keeps no io::ErrorKind: its text is all that says what happened.
        io_timeout || err.to_string() == "timed out"
    })
}

struct Suspect {
    died: Instant,
    why: &'static str,
    addrs: Vec<Multiaddr>,
}

/// A restart proved: the peer is to be reset.
#[derive(Debug, PartialEq, Eq)]
pub struct Restarted {
    /// How the old connection died, for the log.
    pub why: &'static str,
    /// Where to dial the peer again (empty: the behaviours' address books).
    pub addrs: Vec<Multiaddr>,
}

/// Peers suspected of, or being reset for, a restart.
#[derive(Default)]
pub struct Restarts {
    suspects: HashMap<PeerId, Suspect>,
    /// Being disconnected: when, and where to dial them once they are.
    resetting: HashMap<PeerId, (Instant, Vec<Multiaddr>)>,
    /// Disconnected: when to dial them again, and where.
    redial: HashMap<PeerId, (Instant, Vec<Multiaddr>)>,
    last_reset: HashMap<PeerId, Instant>,
}

impl Restarts {
    /// An older direct connection to `peer` died (`why`) while a newer one lives
    /// (see [`newer_one_lives`]). `addrs`: where we had dialed the peer, for the redial.
    pub fn on_death(
        &mut self,
        peer: PeerId,
        why: &'static str,
        addrs: Vec<Multiaddr>,
        now: Instant,
    ) {
        let recently = self
            .last_reset
            .get(&peer)
            .is_some_and(|t| now.duration_since(*t) < RESET_EVERY);
        if recently || self.resetting.contains_key(&peer) || self.suspects.len() >= MAX_TRACKED {
            return;
        }
        self.suspects.insert(
            peer,
            Suspect {
                died: now,
                why,
                addrs,
            },
        );
    }

    /// A ping to `peer` came back on a direct connection. `Some` when that proves a
    /// suspected restart: the event loop then disconnects the peer and calls
    /// [`Restarts::resetting`].
    pub fn on_pong(&mut self, peer: PeerId, now: Instant) -> Option<Restarted> {
        let suspect = self.suspects.get(&peer)?;
        if now <= suspect.died {
            return None;
        }
        let suspect = self.suspects.remove(&peer)?;
        if self.last_reset.len() >= MAX_TRACKED {
            return None;
        }
        self.last_reset.insert(peer, now);
        Some(Restarted {
            why: suspect.why,
            addrs: suspect.addrs,
        })
    }

    /// The event loop asked the swarm to close every connection to `peer`.
    pub fn resetting(&mut self, peer: PeerId, addrs: Vec<Multiaddr>, now: Instant) {
        self.resetting.insert(peer, (now, addrs));
    }

    /// Whether a connection to `peer` that was just established should close too: the
    /// peer is being reset, and protocols must see its connections all gone first.
    pub fn is_resetting(&self, peer: &PeerId) -> bool {
        self.resetting.contains_key(peer)
    }

    /// The last connection to `peer` closed. If it was being reset, it is to be
    /// dialed again [`REDIAL_PAUSE`] from `now` (see [`Restarts::due`]).
    pub fn on_disconnected(&mut self, peer: &PeerId, now: Instant) {
        self.suspects.remove(peer);
        if let Some((_, addrs)) = self.resetting.remove(peer) {
            self.redial.insert(*peer, (now + REDIAL_PAUSE, addrs));
        }
    }

    /// A connection to `peer` was established. One awaited after a reset ends it: the
    /// peer found its way back by itself, and both ends see the connection as its first.
    pub fn on_connected(&mut self, peer: &PeerId) {
        self.redial.remove(peer);
    }

    /// Peers whose pause after a reset is over, with the addresses to dial them at
    /// (empty: let the behaviours' address books supply them). Each is returned once.
    pub fn due(&mut self, now: Instant) -> Vec<(PeerId, Vec<Multiaddr>)> {
        let mut due = Vec::new();
        self.redial.retain(|peer, (at, addrs)| {
            let keep = *at > now;
            if !keep {
                due.push((*peer, std::mem::take(addrs)));
            }
            keep
        });
        due
    }

    /// `peer` is being disconnected on purpose (trimmed, too slow, banned): no redial.
    pub fn forget(&mut self, peer: &PeerId) {
        self.suspects.remove(peer);
        self.resetting.remove(peer);
        self.redial.remove(peer);
    }

    /// Forgets everything: the node is shutting down.
    pub fn clear(&mut self) {
        self.suspects.clear();
        self.resetting.clear();
        self.redial.clear();
    }

    /// Drops suspicions never proved, resets whose connections never all closed, and
    /// resets old enough to allow another.
    pub fn expire(&mut self, now: Instant) {
        self.suspects
            .retain(|_, s| now.duration_since(s.died) < PROOF_WAIT);
        self.resetting
            .retain(|_, (since, _)| now.duration_since(*since) < CLOSE_WAIT);
        self.last_reset
            .retain(|_, t| now.duration_since(*t) < RESET_EVERY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_connection_outlived_by_a_newer_one_points_to_a_restart() {
        let t = Instant::now();
        let later = t + Duration::from_secs(3);
        assert!(newer_one_lives(t, &[later]));
        // Two connections opened at once: the older may be dropped as a duplicate.
        assert!(!newer_one_lives(t, &[t + SIMULTANEOUS / 2]));
        // The newer one died: the peer still talks over its first connection.
        assert!(!newer_one_lives(later, &[t]));
        // Nothing direct left: the peer is simply gone, or reached through a relay.
        assert!(!newer_one_lives(t, &[]));
    }

    #[test]
    fn only_a_timeout_says_the_far_end_went() {
        use libp2p::swarm::ConnectionError;
        use std::io;
        #[derive(Debug)]
        struct Quic;
        impl std::fmt::Display for Quic {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("timed out")
            }
        }
        impl std::error::Error for Quic {}
        // yamux's error: its own text, the kernel's timeout as its source.
        #[derive(Debug)]
        struct Yamux(io::Error);
        impl std::fmt::Display for Yamux {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("i/o error")
            }
        }
        impl std::error::Error for Yamux {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let io_error = |e: io::Error| ConnectionError::IO(e);
        assert!(timed_out(&io_error(io::Error::from(
            io::ErrorKind::TimedOut
        ))));
        assert!(timed_out(&io_error(io::Error::other(Quic))));
        let kernel = io::Error::new(
            io::ErrorKind::TimedOut,
            "connection timed out (os error 110)",
        );
        assert!(timed_out(&io_error(io::Error::other(Yamux(kernel)))));
        assert!(!timed_out(&io_error(io::Error::other("connection closed"))));
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert!(!timed_out(&io_error(io::Error::other(Yamux(reset)))));
        assert!(!timed_out(&ConnectionError::KeepAliveTimeout));
    }

    #[test]
    fn a_restart_needs_a_ping_after_the_death_and_happens_once() {
        let (t, peer) = (Instant::now(), PeerId::random());
        let mut r = Restarts::default();
        // No suspicion, no reset.
        assert_eq!(r.on_pong(peer, t), None);
        r.on_death(peer, "its transport timed out", vec![], t);
        // A pong timed at the death proves nothing.
        assert_eq!(r.on_pong(peer, t), None);
        let proved = r.on_pong(peer, t + Duration::from_secs(4));
        assert_eq!(proved.map(|p| p.why), Some("its transport timed out"));
        let closed = t + Duration::from_secs(4);
        r.resetting(peer, vec![], closed);
        assert!(r.is_resetting(&peer));
        r.on_disconnected(&peer, closed);
        assert!(!r.is_resetting(&peer));
        // Dialed again once the pause is over, and only once.
        assert!(r.due(closed + REDIAL_PAUSE / 2).is_empty());
        assert_eq!(r.due(closed + REDIAL_PAUSE), vec![(peer, vec![])]);
        assert!(r.due(closed + REDIAL_PAUSE * 2).is_empty());
        // Another death soon after is not judged again.
        r.on_death(
            peer,
            "a ping went unanswered",
            vec![],
            t + Duration::from_secs(20),
        );
        assert_eq!(r.on_pong(peer, t + Duration::from_secs(25)), None);
        // Long after, it is.
        let later = t + RESET_EVERY + Duration::from_secs(10);
        r.expire(later);
        r.on_death(peer, "a ping went unanswered", vec![], later);
        assert!(r.on_pong(peer, later + Duration::from_secs(1)).is_some());
    }

    #[test]
    fn a_peer_that_vanished_is_never_reset() {
        let (t, peer) = (Instant::now(), PeerId::random());
        let mut r = Restarts::default();
        r.on_death(peer, "its transport timed out", vec![], t);
        // No pong comes; its other connection dies too.
        r.expire(t + PROOF_WAIT);
        assert_eq!(
            r.on_pong(peer, t + PROOF_WAIT + Duration::from_secs(1)),
            None
        );
        r.on_death(peer, "its transport timed out", vec![], t);
        r.on_disconnected(&peer, t);
        assert!(r.due(t + REDIAL_PAUSE).is_empty());
    }

    #[test]
    fn a_peer_that_comes_back_by_itself_during_the_pause_is_not_dialed() {
        let (t, peer) = (Instant::now(), PeerId::random());
        let addr = Multiaddr::empty()
            .with(libp2p::multiaddr::Protocol::Ip4(
                std::net::Ipv4Addr::LOCALHOST,
            ))
            .with(libp2p::multiaddr::Protocol::Udp(4001))
            .with(libp2p::multiaddr::Protocol::QuicV1);
        let mut r = Restarts::default();
        r.resetting(peer, vec![addr], t);
        r.on_disconnected(&peer, t);
        r.on_connected(&peer);
        assert!(r.due(t + REDIAL_PAUSE).is_empty());
    }

    #[test]
    fn a_reset_that_never_completes_is_dropped_and_a_deliberate_disconnect_forgets() {
        let (t, peer) = (Instant::now(), PeerId::random());
        let mut r = Restarts::default();
        r.resetting(peer, vec![], t);
        r.expire(t + CLOSE_WAIT);
        r.on_disconnected(&peer, t + CLOSE_WAIT);
        assert!(r.due(t + CLOSE_WAIT + REDIAL_PAUSE).is_empty());
        r.resetting(peer, vec![], t);
        r.forget(&peer);
        r.on_disconnected(&peer, t);
        assert!(r.due(t + REDIAL_PAUSE).is_empty());
        // Forgotten during the pause: no redial either.
        r.resetting(peer, vec![], t);
        r.on_disconnected(&peer, t);
        r.forget(&peer);
        assert!(r.due(t + REDIAL_PAUSE).is_empty());
    }
}
