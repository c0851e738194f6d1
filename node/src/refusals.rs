//! Connections the node's limits refused in the last minute, for `/readyz`.
//!
//! A node at its connection caps still serves the peers it has, so it stays ready;
//! but an operator (or an orchestrator's probe log) should see that peers are being
//! turned away, and by which cap, without scraping metrics. Counts are kept per
//! second for one minute: a flood of refusals costs a fixed 60 entries.

use std::{collections::VecDeque, time::Instant};

/// The window the counts cover, in seconds.
pub const WINDOW_SECS: u64 = 60;

/// Per-second counts of refusals by cap.
#[derive(Debug)]
pub struct Refusals {
    start: Instant,
    /// (second since `start`, refused by a total/per-peer/pending cap, by the per-IP cap)
    seconds: VecDeque<(u64, u64, u64)>,
}

impl Default for Refusals {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            seconds: VecDeque::new(),
        }
    }
}

impl Refusals {
    /// Records one refusal; `per_ip` tells the per-IP cap from the others.
    pub fn record(&mut self, per_ip: bool, now: Instant) {
        let second = now.saturating_duration_since(self.start).as_secs();
        self.expire(second);
        match self.seconds.back_mut() {
            Some(last) if last.0 == second => {}
            _ => self.seconds.push_back((second, 0, 0)),
        }
        if let Some(last) = self.seconds.back_mut() {
            if per_ip {
                last.2 += 1;
            } else {
                last.1 += 1;
            }
        }
    }

    fn expire(&mut self, second: u64) {
        while let Some(first) = self.seconds.front() {
            if first.0 + WINDOW_SECS <= second {
                self.seconds.pop_front();
            } else {
                break;
            }
        }
    }

    /// A warning for `/readyz` when any connection was refused by a cap in the
    /// window; none otherwise.
    pub fn warning(&mut self, now: Instant) -> Option<String> {
        let second = now.saturating_duration_since(self.start).as_secs();
        self.expire(second);
        let (caps, per_ip) = self
            .seconds
            .iter()
            .fold((0, 0), |(a, b), s| (a + s.1, b + s.2));
        if caps + per_ip == 0 {
            return None;
        }
        let mut parts = Vec::new();
        if caps > 0 {
            parts.push(format!(
                "{caps} by max_connections, max_connections_per_peer or max_pending_connections"
            ));
        }
        if per_ip > 0 {
            parts.push(format!("{per_ip} by max_connections_per_ip"));
        }
        Some(format!(
            "connection limits refused {} connections in the last minute ({})",
            caps + per_ip,
            parts.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn counts_the_last_minute_by_cap() {
        let mut r = Refusals::default();
        let t0 = r.start;
        assert_eq!(r.warning(t0), None);
        for _ in 0..1000 {
            r.record(false, t0 + Duration::from_millis(500));
        }
        r.record(true, t0 + Duration::from_secs(30));
        let w = r.warning(t0 + Duration::from_secs(31)).unwrap();
        assert!(w.contains("refused 1001"), "{w}");
        assert!(w.contains("1 by max_connections_per_ip"), "{w}");
        assert_eq!(r.seconds.len(), 2);
        // A minute after the flood only the later refusal is left, then none.
        let w = r.warning(t0 + Duration::from_secs(60)).unwrap();
        assert!(w.contains("refused 1 "), "{w}");
        assert_eq!(r.warning(t0 + Duration::from_secs(91)), None);
    }
}
