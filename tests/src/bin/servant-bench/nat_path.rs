//! Where a hole punch's time goes, from a trial's packet captures
//! (`servant-bench nat --capture`).
//!
//! The dialer measures two spans: relayed → dial (the rest of the circuit's
//! handshake, then DCUtR's CONNECT, CONNECT and SYNC through the relay) and dial →
//! direct (the direct connection's handshake). Over each this module walks the
//! critical path back from its end: whoever sent a packet acted on the last packet
//! that could have reached it before (for a peer, one that had crossed its router in
//! time), so the time between the two is that node's (less the routers' delay on the
//! way in and out, for a peer), and the walk goes on from that packet's sender. Every
//! step of time lands on the dialer, the listener, the relay, the routers or (the
//! direct span's start) the kernel's TCP connect. It is a heuristic
//! (a node may act on an earlier packet than the last), but one that needs no logging
//! in the nodes and treats both implementations alike.
//!
//! Times are the captures' own: a packet from a peer is seen after its router held it,
//! one to a peer before, so a peer's turn between the two holds twice `--delay-ms`.
//! The ends of the spans are placed the same way, as if they were packets out.

use std::{net::Ipv4Addr, path::Path};

use anyhow::Result;
use serde::{Deserialize, Serialize};
use servant_tests::pcap::{self, Frame};

/// The relay's address on the public segment, where `nat::build_lab` puts it.
pub const RELAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
/// The dialing peer's router.
pub const DIALER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 21);
/// The listening (reserving) peer's router.
pub const LISTENER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 22);

/// Milliseconds of one span of a trial, by who spent them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CriticalPath {
    /// The span, as the dialer measured it.
    pub window_ms: f64,
    /// The dialing peer, between a packet reaching it and its next one out.
    pub dialer_ms: f64,
    /// The listening peer, likewise.
    pub listener_ms: f64,
    /// The relay, between a packet in and the next one out.
    pub relay_ms: f64,
    /// The routers' delay (`--delay-ms`) on a peer's way in and out.
    pub routers_ms: f64,
    /// Before the dialer's first data on the direct connection: the kernels' TCP
    /// handshake through both routers (0 for QUIC, whose handshake is data).
    #[serde(default)]
    pub connect_ms: f64,
    /// Packets on the path.
    pub hops: usize,
}

/// One trial's two spans.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrialPath {
    /// Relayed → dial.
    pub to_dial: CriticalPath,
    /// Dial → direct.
    pub to_direct: CriticalPath,
}

/// The three captures of one trial, by the port of the public bridge they were
/// taken on.
struct Captures {
    relay: Vec<Frame>,
    dialer: Vec<Frame>,
    listener: Vec<Frame>,
}

impl Captures {
    fn port(&self, who: Ipv4Addr) -> &[Frame] {
        match who {
            DIALER => &self.dialer,
            LISTENER => &self.listener,
            _ => &self.relay,
        }
    }
}

/// The spans of the trial whose captures are `<stem>-relay.pcap`, `-ra.pcap` and
/// `-rb.pcap`, the dialer having measured `dial_ms` relayed → dial and `ms` relayed
/// → direct; `None` if its dial is not in the captures.
pub fn of_trial(stem: &Path, dial_ms: f64, ms: f64, delay_ms: f64) -> Result<Option<TrialPath>> {
    let read = |port: &str| pcap::read(Path::new(&format!("{}-{port}.pcap", stem.display())));
    let captures = Captures {
        relay: read("relay")?,
        dialer: read("ra")?,
        listener: read("rb")?,
    };
    Ok(spans(&captures, dial_ms, ms, delay_ms))
}

fn spans(c: &Captures, dial_ms: f64, ms: f64, delay_ms: f64) -> Option<TrialPath> {
    let dial = c
        .dialer
        .iter()
        .find(|f| *f.src.ip() == DIALER && *f.dst.ip() == LISTENER)?;
    let dial = at(dial);
    Some(TrialPath {
        to_dial: through_relay(c, dial - dial_ms, dial, delay_ms),
        to_direct: direct(c, dial, dial + (ms - dial_ms), delay_ms),
    })
}

fn at(frame: &Frame) -> f64 {
    frame.at.as_secs_f64() * 1000.0
}

/// The last frame of `frames` before `t` (ms) that `keep` keeps.
fn last_before(frames: &[Frame], t: f64, keep: impl Fn(&Frame) -> bool) -> Option<&Frame> {
    frames.iter().rev().find(|f| at(f) < t && keep(f))
}

/// A frame that carries data: pure TCP acknowledgements are the kernel's, not a
/// node's, and cause nothing.
fn carries_data(frame: &Frame) -> bool {
    frame.payload > 0
}

fn same_packet(a: &Frame, b: &Frame) -> bool {
    a.src == b.src && a.dst == b.dst && a.flags == b.flags && a.payload == b.payload
}

/// When `frame`, seen on one port, was seen on the port `from` (where it came from):
/// a moment earlier.
fn seen_on(c: &Captures, from: Ipv4Addr, frame: &Frame) -> f64 {
    last_before(c.port(from), at(frame) + 1e-6, |f| same_packet(f, frame)).map_or(at(frame), at)
}

/// The latest a packet can have been seen on a peer's port and still be what the peer
/// acted on at `t` (seen on the same port): it crossed the router in, and the answer
/// crossed it out. A packet later than that was in flight when the peer acted.
fn caused_by(t: f64, delay_ms: f64) -> f64 {
    t - 2.0 * delay_ms
}

/// Peer `who`'s turn from a packet that reached it to `t`: its router's delay in and
/// out, and its own time.
fn peer_turn(path: &mut CriticalPath, who: Ipv4Addr, gap: f64, delay_ms: f64) {
    let routers = gap.min(2.0 * delay_ms);
    path.routers_ms += routers;
    if who == DIALER {
        path.dialer_ms += gap - routers;
    } else {
        path.listener_ms += gap - routers;
    }
}

/// Walks a span back from the dialer at `end` to `start`: `step` charges the time of
/// whoever acted at `t` and says who acted before, and when (`None`: nobody).
fn walk(
    start: f64,
    end: f64,
    mut step: impl FnMut(&mut CriticalPath, Ipv4Addr, f64) -> Option<(Ipv4Addr, f64)>,
) -> CriticalPath {
    let mut path = CriticalPath {
        window_ms: end - start,
        ..CriticalPath::default()
    };
    let (mut who, mut t) = (DIALER, end);
    while t > start {
        path.hops += 1;
        match step(&mut path, who, t) {
            Some(before) => (who, t) = before,
            None => break,
        }
    }
    path
}

/// The span from `start` to `end` over the relay.
fn through_relay(c: &Captures, start: f64, end: f64, delay_ms: f64) -> CriticalPath {
    walk(start, end, |path, who, t| {
        if who == RELAY {
            let from_peer = |f: &Frame| {
                *f.dst.ip() == RELAY && [DIALER, LISTENER].contains(f.src.ip()) && carries_data(f)
            };
            let arrived = last_before(&c.relay, t, from_peer)?;
            path.relay_ms += t - at(arrived).max(start);
            let sender = *arrived.src.ip();
            Some((sender, seen_on(c, sender, arrived)))
        } else {
            let to_peer = |f: &Frame| *f.src.ip() == RELAY && *f.dst.ip() == who && carries_data(f);
            let arrived = last_before(c.port(who), caused_by(t, delay_ms), to_peer)?;
            peer_turn(path, who, t - at(arrived).max(start), delay_ms);
            Some((RELAY, seen_on(c, RELAY, arrived)))
        }
    })
}

/// The span from `start` (the dial) to `end` (direct) between the peers; what is left
/// before the first data is the connect.
fn direct(c: &Captures, start: f64, end: f64, delay_ms: f64) -> CriticalPath {
    walk(start, end, |path, who, t| {
        let other = if who == DIALER { LISTENER } else { DIALER };
        let from_other = |f: &Frame| *f.src.ip() == other && *f.dst.ip() == who && carries_data(f);
        let Some(arrived) = last_before(c.port(who), caused_by(t, delay_ms), from_other) else {
            path.connect_ms += t - start;
            return None;
        };
        peer_turn(path, who, t - at(arrived).max(start), delay_ms);
        Some((other, seen_on(c, other, arrived)))
    })
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddrV4, time::Duration};

    use super::*;

    fn frame(at_ms: f64, src: Ipv4Addr, dst: Ipv4Addr, payload: usize) -> Frame {
        Frame {
            at: Duration::from_secs_f64(at_ms / 1000.0),
            src: SocketAddrV4::new(src, 4001),
            dst: SocketAddrV4::new(dst, 4001),
            proto: "tcp",
            flags: if payload == 0 { "S" } else { "P." }.into(),
            payload,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    /// Listener → relay → dialer → dial → connect → data both ways → direct: every
    /// millisecond lands where it was spent.
    #[test]
    fn each_step_lands_on_who_spent_it() {
        let d = 1.0;
        // The listener's packet reaches the relay at 10.001, the relay forwards it at
        // 10.5 (seen on the dialer's port at 10.501), and the dialer dials at 13.501:
        // 3 ms, 2 of them its router's, in and out.
        let relay_in = frame(10.001, LISTENER, RELAY, 50);
        let relay_out = frame(10.5, RELAY, DIALER, 60);
        let dialer_in = frame(10.501, RELAY, DIALER, 60);
        let ack = frame(11.0, DIALER, RELAY, 0);
        let dial = frame(13.501, DIALER, LISTENER, 0);
        // Reached the dialer's port too late to be what it dialed on (it would have
        // needed its router's delay in and the dial's out).
        let in_flight = frame(12.0, RELAY, DIALER, 30);
        // The TCP handshake takes until 17.501, when the dialer sends its first data;
        // the listener answers 3.5 ms after it saw it (17.502 -> 21.002), and the
        // dialer calls it direct 2.5 ms after that reached it (21.003 -> 23.503).
        let first = frame(17.501, DIALER, LISTENER, 40);
        let first_there = frame(17.502, DIALER, LISTENER, 40);
        let answer = frame(21.002, LISTENER, DIALER, 80);
        let answer_here = frame(21.003, LISTENER, DIALER, 80);
        let c = Captures {
            relay: vec![relay_in, relay_out, ack.clone()],
            dialer: vec![dialer_in, ack, in_flight, dial, first, answer_here],
            listener: vec![first_there, answer],
        };
        let path = spans(&c, 3.5, 3.5 + 10.002, d).expect("the dial is there");
        let to_dial = path.to_dial;
        assert!(close(to_dial.routers_ms, 2.0), "{to_dial:?}");
        assert!(close(to_dial.dialer_ms, 1.0), "{to_dial:?}");
        assert!(close(to_dial.relay_ms, 0.499), "{to_dial:?}");
        assert_eq!(to_dial.listener_ms, 0.0);
        let direct = path.to_direct;
        assert!(close(direct.dialer_ms, 0.5), "{direct:?}");
        assert!(close(direct.listener_ms, 1.5), "{direct:?}");
        assert!(close(direct.routers_ms, 4.0), "{direct:?}");
        assert!(close(direct.connect_ms, 4.0), "{direct:?}");
        for p in [to_dial, direct] {
            let sum = p.dialer_ms + p.listener_ms + p.relay_ms + p.routers_ms + p.connect_ms;
            assert!(sum <= p.window_ms + 1e-6, "{p:?}");
        }
    }
}
