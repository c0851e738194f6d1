//! Where a hole punch's time goes, from a trial's packet captures
//! (`servant-bench nat --capture`).
//!
//! The dialer measures "relayed → dial": from its relayed connection to its direct
//! dial, the rest of the circuit's handshake and DCUtR's CONNECT, CONNECT and SYNC
//! through the relay. Over that window this module walks the critical path back from
//! the dialer's first packet to the other peer: whoever sent a packet acted on the
//! last packet it received before it, so the time between them is that node's (less
//! the routers' delay on the way in and out, for a peer), and the walk goes on from
//! that packet's sender. Each step of time lands on the dialer, the listener, the
//! relay or the routers. It is a heuristic (a node may act on an earlier packet than
//! the last), but one that needs no logging in the nodes and treats both
//! implementations alike.

use std::{net::Ipv4Addr, path::Path};

use anyhow::Result;
use serde::{Deserialize, Serialize};
use servant_tests::pcap::{self, Frame};

/// The lab's addresses on the public segment (`nat::build_lab`).
pub const RELAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
/// The dialing peer's router.
pub const DIALER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 21);
/// The listening (reserving) peer's router.
pub const LISTENER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 22);

/// Milliseconds of one trial's relayed → dial window, by who spent them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CriticalPath {
    /// The window: the dialer's own relayed → dial.
    pub window_ms: f64,
    /// The dialing peer, between a packet reaching it and its next one out.
    pub dialer_ms: f64,
    /// The listening peer, likewise.
    pub listener_ms: f64,
    /// The relay, between a packet in and the next one out.
    pub relay_ms: f64,
    /// The routers' delay (`--delay-ms`) on a peer's way in and out.
    pub routers_ms: f64,
    /// Packets on the path.
    pub hops: usize,
}

/// The three captures of one trial, by the port of the public bridge they were
/// taken on.
struct Captures {
    relay: Vec<Frame>,
    dialer: Vec<Frame>,
    listener: Vec<Frame>,
}

/// The critical path of the trial whose captures are `<stem>-relay.pcap`,
/// `-ra.pcap` and `-rb.pcap`, over the last `dial_ms` before the dialer's first
/// packet to the other peer; `None` if that packet is not there.
pub fn of_trial(stem: &Path, dial_ms: f64, delay_ms: f64) -> Result<Option<CriticalPath>> {
    let read = |port: &str| pcap::read(Path::new(&format!("{}-{port}.pcap", stem.display())));
    let captures = Captures {
        relay: read("relay")?,
        dialer: read("ra")?,
        listener: read("rb")?,
    };
    Ok(walk(&captures, dial_ms, delay_ms))
}

fn ms(frame: &Frame) -> f64 {
    frame.at.as_secs_f64() * 1000.0
}

/// The last frame of `frames` before `t` (ms) that `keep` keeps.
fn last_before(frames: &[Frame], t: f64, keep: impl Fn(&Frame) -> bool) -> Option<&Frame> {
    frames.iter().rev().find(|f| ms(f) < t && keep(f))
}

/// A frame that carries data: pure TCP acknowledgements are the kernel's, not a
/// node's, and cause nothing.
fn carries_data(frame: &Frame) -> bool {
    frame.payload > 0
}

fn walk(c: &Captures, dial_ms: f64, delay_ms: f64) -> Option<CriticalPath> {
    let dial = c
        .dialer
        .iter()
        .find(|f| *f.src.ip() == DIALER && *f.dst.ip() == LISTENER)?;
    // Captured after the dialer's router held it.
    let end = ms(dial) - delay_ms;
    let start = end - dial_ms;
    let mut path = CriticalPath {
        window_ms: dial_ms,
        ..CriticalPath::default()
    };
    // Who acted at `t`: a peer (its router's address) or the relay.
    let (mut who, mut t) = (DIALER, end);
    while t > start {
        path.hops += 1;
        if who == RELAY {
            let from_peer = |f: &Frame| {
                *f.dst.ip() == RELAY && [DIALER, LISTENER].contains(f.src.ip()) && carries_data(f)
            };
            let Some(arrived) = last_before(&c.relay, t, from_peer) else {
                break;
            };
            path.relay_ms += t - ms(arrived).max(start);
            who = *arrived.src.ip();
            // The same packet on the sender's port, a moment earlier.
            let port = if who == DIALER {
                &c.dialer
            } else {
                &c.listener
            };
            let sent = last_before(port, ms(arrived) + 1e-6, |f| same_packet(f, arrived));
            t = sent.map_or(ms(arrived), ms);
        } else {
            let port = if who == DIALER {
                &c.dialer
            } else {
                &c.listener
            };
            let to_peer = |f: &Frame| *f.src.ip() == RELAY && *f.dst.ip() == who && carries_data(f);
            let Some(arrived) = last_before(port, t, to_peer) else {
                break;
            };
            let gap = t - ms(arrived).max(start);
            let routers = gap.min(2.0 * delay_ms);
            path.routers_ms += routers;
            if who == DIALER {
                path.dialer_ms += gap - routers;
            } else {
                path.listener_ms += gap - routers;
            }
            let sent = last_before(&c.relay, ms(arrived) + 1e-6, |f| same_packet(f, arrived));
            t = sent.map_or(ms(arrived), ms);
            who = RELAY;
        }
    }
    Some(path)
}

fn same_packet(a: &Frame, b: &Frame) -> bool {
    a.src == b.src && a.dst == b.dst && a.flags == b.flags && a.payload == b.payload
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
            flags: "P.".into(),
            payload,
        }
    }

    /// Listener → relay → dialer → (dial): every millisecond lands where it was spent.
    #[test]
    fn each_step_lands_on_who_spent_it() {
        let d = 1.0;
        // The listener sends at 10.0 (seen on its port and then the relay's), the
        // relay forwards at 10.5, the dialer gets it at 10.501 and dials 3 ms later
        // (seen at 14.501, its router having held the dial for the last 1 ms): 2 ms
        // of the 3 are its router's, in and out, and 1 ms its own.
        let listener_out = frame(10.0, LISTENER, RELAY, 50);
        let relay_in = frame(10.001, LISTENER, RELAY, 50);
        let relay_out = frame(10.5, RELAY, DIALER, 60);
        let dialer_in = frame(10.501, RELAY, DIALER, 60);
        let ack = frame(11.0, DIALER, RELAY, 0);
        let dial = frame(14.501, DIALER, LISTENER, 0);
        let c = Captures {
            relay: vec![relay_in, relay_out.clone(), ack.clone()],
            dialer: vec![dialer_in, ack, dial],
            listener: vec![listener_out, relay_out],
        };
        // The window reaches back from the dial (13.501) to the relay's arrival.
        let path = walk(&c, 3.5, d).expect("the dial is there");
        assert!((path.routers_ms - 2.0).abs() < 1e-6, "{path:?}");
        assert!((path.dialer_ms - 1.0).abs() < 1e-6, "{path:?}");
        assert!((path.relay_ms - 0.499).abs() < 1e-6, "{path:?}");
        assert_eq!(path.listener_ms, 0.0);
        let sum = path.dialer_ms + path.listener_ms + path.relay_ms + path.routers_ms;
        assert!(sum <= path.window_ms + 1e-6, "{path:?}");
    }
}
