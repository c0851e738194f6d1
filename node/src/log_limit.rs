//! A rate limit on log lines, per place in the code that logs.
//!
//! Many log lines are caused by what peers send: a refused connection, a malformed
//! message, an RPC gossipsub ignores (libp2p logs some of those at error level).
//! A peer repeating the cause a million times must not write a million lines, fill
//! the disk or drown the lines an operator needs. Each callsite gets a bucket of
//! [`BURST`] lines refilled at [`PER_SECOND`]; lines beyond it are dropped, counted
//! in `servant_log_lines_suppressed_total`, and summed up in one warning a minute.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::Instant,
};

use tracing::{callsite::Identifier, Event, Metadata};
use tracing_subscriber::layer::{Context, Filter};

use crate::token_bucket::TokenBucket;

/// Lines one callsite may write at once after a quiet spell.
pub const BURST: f64 = 50.0;
/// Lines per second one callsite may write for as long as it likes.
pub const PER_SECOND: f64 = 5.0;
/// Callsites tracked; beyond it (it cannot happen: callsites are static and few) a
/// new one is let through untracked rather than grow the map.
const MAX_CALLSITES: usize = 4096;

/// Lines dropped since the node started, for the metrics.
static SUPPRESSED: AtomicU64 = AtomicU64::new(0);

/// Lines the limiter dropped since the process started.
pub fn suppressed() -> u64 {
    SUPPRESSED.load(Ordering::Relaxed)
}

/// The per-callsite limiter, as a `tracing_subscriber` filter.
#[derive(Default)]
pub struct LogLimit {
    buckets: Buckets<Identifier>,
}

/// One token bucket per key: a callsite in the node, anything hashable in tests.
struct Buckets<K> {
    map: Mutex<HashMap<K, TokenBucket>>,
}

impl<K> Default for Buckets<K> {
    fn default() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: std::hash::Hash + Eq> Buckets<K> {
    /// Takes a token for one line from `key`; false when it has none left.
    fn admit(&self, key: K, now: Instant) -> bool {
        // A poisoned lock only means another thread panicked while logging: keep logging.
        let mut map = match self.map.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        if map.len() >= MAX_CALLSITES && !map.contains_key(&key) {
            return true;
        }
        let bucket = map
            .entry(key)
            .or_insert_with(|| TokenBucket::full(PER_SECOND, BURST, now));
        if bucket.take(1.0, now) {
            true
        } else {
            SUPPRESSED.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

impl<S> Filter<S> for LogLimit {
    fn enabled(&self, _meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        // Whether a level is on is the level filter's question; this one only counts
        // lines actually about to be written (`event_enabled`).
        true
    }

    fn event_enabled(&self, event: &Event<'_>, _cx: &Context<'_, S>) -> bool {
        self.buckets
            .admit(event.metadata().callsite(), Instant::now())
    }
}

/// Remembers how many suppressed lines were already reported, so the summary line
/// says how many were dropped since the last one.
#[derive(Default)]
pub struct SuppressedReport {
    reported: u64,
}

impl SuppressedReport {
    /// Lines dropped since the last call, if any.
    pub fn take(&mut self) -> Option<u64> {
        let now = suppressed();
        let new = now.saturating_sub(self.reported);
        self.reported = now;
        (new > 0).then_some(new)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_burst_then_the_rate_per_callsite() {
        let limit = Buckets::default();
        let start = Instant::now();
        let a = || "a";
        let admitted = (0..1000).filter(|_| limit.admit(a(), start)).count();
        assert_eq!(admitted, BURST as usize);
        // Another callsite has its own bucket.
        assert!(limit.admit("b", start));
        // Two seconds later, two seconds' worth of lines again.
        let later = start + Duration::from_secs(2);
        let admitted = (0..1000).filter(|_| limit.admit(a(), later)).count();
        assert_eq!(admitted, (2.0 * PER_SECOND) as usize);
        assert!(suppressed() >= 1000 - BURST as u64);
    }
}
