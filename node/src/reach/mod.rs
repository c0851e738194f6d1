//! Reachability: whether other peers can dial this node, learned from AutoNAT v2
//! dial-backs and kept as Servant's own verdict (see [`verdict`]).
//!
//! Every node serves dial-backs ([`server`], throttled) and probes its own
//! candidate addresses ([`probe`]) with the peers that serve them, a few probes at
//! a time. Probing starts again periodically and whenever a new candidate
//! appears, so a port forward added or removed on a router is noticed.

pub mod probe;
pub mod server;
pub mod verdict;
pub mod wire;

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use libp2p::{Multiaddr, PeerId, StreamProtocol};
use tokio::sync::mpsc;

use self::{
    probe::{DialBacks, ProbeOutcome},
    verdict::{Change, Verdict},
};

/// Probes under way at once.
const MAX_PROBES_IN_FLIGHT: usize = 2;
/// A server is asked only once its connection to us has been the only one for this
/// long: simultaneous dials leave two connections for a moment (see the event
/// loop's duplicate handling), and a dial-back on top of two would hit the
/// per-peer connection limit and be reported as a failed dial.
const SETTLE: Duration = Duration::from_secs(3);

/// A finished probe, sent back to the event loop.
#[derive(Debug)]
pub struct ProbeReport {
    /// The address tested.
    pub addr: Multiaddr,
    /// The server asked.
    pub server: PeerId,
    /// What it found.
    pub outcome: ProbeOutcome,
}

/// The node's reachability prober.
pub struct Reach {
    verdict: Verdict,
    control: crate::streams::Control,
    dial_backs: DialBacks,
    reports: mpsc::UnboundedSender<ProbeReport>,
    in_flight: usize,
    interval: Duration,
    last_round: Instant,
    servers: HashSet<PeerId>,
    /// Servers with more than one connection to us now. A dial-back is one more
    /// connection, and the per-peer connection limit (ours or the server's) would
    /// refuse it: the server would report a failed dial, a false "unreachable".
    crowded: HashSet<PeerId>,
    /// Servers with a probe of ours under way: each dial-back is one more connection,
    /// so a server gets one probe at a time.
    probing: HashSet<PeerId>,
    /// Since when each peer has had a single connection.
    settled_since: std::collections::HashMap<PeerId, Instant>,
    /// Outcomes, for metrics: (`reached` | `unreachable` | `no_verdict`).
    pub outcomes: Vec<&'static str>,
}

impl Reach {
    /// Starts answering dial-backs; probe reports arrive on the returned receiver.
    pub fn new(
        control: crate::streams::Control,
        interval: Duration,
    ) -> (Self, mpsc::UnboundedReceiver<ProbeReport>) {
        let (reports, rx) = mpsc::unbounded_channel();
        let dial_backs = DialBacks::default();
        tokio::spawn(probe::serve_dial_backs(control.clone(), dial_backs.clone()));
        (
            Reach {
                verdict: Verdict::default(),
                control,
                dial_backs,
                reports,
                in_flight: 0,
                interval,
                last_round: Instant::now(),
                servers: HashSet::new(),
                crowded: HashSet::new(),
                probing: HashSet::new(),
                settled_since: std::collections::HashMap::new(),
                outcomes: Vec::new(),
            },
            rx,
        )
    }

    /// The verdict and its evidence.
    pub fn verdict(&self) -> &Verdict {
        &self.verdict
    }

    /// A peer identified itself; it serves dial-backs if it lists the protocol.
    pub fn identified(&mut self, peer: PeerId, protocols: &[StreamProtocol]) {
        if protocols.contains(&wire::DIAL_REQUEST_PROTOCOL) {
            if self.servers.insert(peer) {
                self.drive();
            }
        } else {
            self.servers.remove(&peer);
        }
    }

    /// How many connections we have to `peer` now.
    pub fn connections(&mut self, peer: PeerId, count: u32) {
        if count == 0 {
            self.servers.remove(&peer);
            self.crowded.remove(&peer);
            self.settled_since.remove(&peer);
        } else if count > 1 {
            self.crowded.insert(peer);
            self.settled_since.remove(&peer);
        } else {
            self.crowded.remove(&peer);
            self.settled_since.entry(peer).or_insert_with(Instant::now);
        }
    }

    /// An address worth testing. A new one starts probing at once.
    pub fn candidate(&mut self, addr: Multiaddr) {
        if self.verdict.candidate(addr) {
            self.drive();
        }
    }

    /// Periodic work: a new round when one is due, and probes to start.
    pub fn tick(&mut self, now: Instant) {
        if now.duration_since(self.last_round) >= self.interval {
            self.last_round = now;
            self.verdict.new_round();
        }
        self.drive();
    }

    /// Starts probes while there is room, an untested address and a server for it.
    fn drive(&mut self) {
        let now = Instant::now();
        let mut servers: Vec<PeerId> = self
            .servers
            .iter()
            .filter(|p| {
                !self.crowded.contains(p)
                    && !self.probing.contains(p)
                    && self
                        .settled_since
                        .get(p)
                        .is_some_and(|t| now.duration_since(*t) >= SETTLE)
            })
            .copied()
            .collect();
        servers.sort_unstable();
        while self.in_flight < MAX_PROBES_IN_FLIGHT {
            let Some((addr, server)) = self.verdict.next_probe(&servers) else {
                return;
            };
            servers.retain(|s| *s != server);
            self.probing.insert(server);
            self.in_flight += 1;
            let (control, dial_backs) = (self.control.clone(), self.dial_backs.clone());
            let reports = self.reports.clone();
            let nonce = rand::random::<u64>();
            tracing::debug!(%addr, %server, "probing reachability");
            tokio::spawn(async move {
                let outcome = probe::probe(control, dial_backs, server, addr.clone(), nonce).await;
                let _ = reports.send(ProbeReport {
                    addr,
                    server,
                    outcome,
                });
            });
        }
    }

    /// A probe ended; returns the change of verdict, if any.
    pub fn on_report(&mut self, report: ProbeReport) -> Option<Change> {
        self.in_flight = self.in_flight.saturating_sub(1);
        let ProbeReport {
            addr,
            server,
            outcome,
        } = report;
        self.probing.remove(&server);
        let change = match outcome {
            ProbeOutcome::Verdict(result) => {
                self.outcomes.push(match result {
                    verdict::ProbeResult::Reached => "reached",
                    verdict::ProbeResult::Unreachable(_) => "unreachable",
                });
                tracing::debug!(%addr, %server, ?result, "reachability probe");
                self.verdict.record(&addr, server, result)
            }
            ProbeOutcome::NoVerdict(why) => {
                self.outcomes.push("no_verdict");
                tracing::debug!(%addr, %server, %why, "reachability probe gave no verdict");
                self.verdict.abandoned(&addr, server);
                None
            }
        };
        self.drive();
        change
    }
}
