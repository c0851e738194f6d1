//! A token bucket: the one rate limiter behind log lines per callsite, gossipsub
//! control actions per peer and relayed bytes per peer.
//!
//! Tokens refill continuously at `rate` a second up to `burst`. [`TokenBucket::take`]
//! refuses what the bucket cannot pay (a log line is dropped); [`TokenBucket::charge`]
//! always pays and lets the balance go negative, so a cost larger than the burst is
//! still accounted for and the debt delays what comes next (a flood of control
//! actions, bytes read by several streams at once).

use std::time::{Duration, Instant};

/// Tokens refilled at a steady rate up to a ceiling.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    updated: Instant,
    rate: f64,
    burst: f64,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens refilled at `rate` a second from `now`.
    pub fn full(rate: f64, burst: f64, now: Instant) -> Self {
        TokenBucket {
            tokens: burst,
            updated: now,
            rate,
            burst,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.updated = now;
    }

    /// The tokens there are at `now` (negative while in debt).
    pub fn available(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens
    }

    /// Takes `cost` tokens if the bucket holds them; otherwise takes nothing.
    pub fn take(&mut self, cost: f64, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }

    /// Takes `cost` tokens even into debt; false when the balance is now negative.
    pub fn charge(&mut self, cost: f64, now: Instant) -> bool {
        self.refill(now);
        self.tokens -= cost;
        self.tokens >= 0.0
    }

    /// Gives back `cost` tokens taken earlier and not used, up to the burst.
    pub fn refund(&mut self, cost: f64) {
        self.tokens = (self.tokens + cost).min(self.burst);
    }

    /// How long from `now` until the bucket holds `want` tokens (zero if it does;
    /// `want` above the burst is waited for as the burst).
    pub fn wait_for(&mut self, want: f64, now: Instant) -> Duration {
        self.refill(now);
        let missing = want.min(self.burst) - self.tokens;
        if missing <= 0.0 || self.rate <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(missing / self.rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_refills_at_its_rate_up_to_its_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(10.0, 20.0, t0);
        assert!(b.take(20.0, t0));
        assert!(!b.take(1.0, t0));
        assert!(b.take(5.0, t0 + Duration::from_millis(500)));
        assert!(!b.take(1.0, t0 + Duration::from_millis(500)));
        assert_eq!(b.available(t0 + Duration::from_secs(100)), 20.0);
    }

    #[test]
    fn a_charge_goes_into_debt_and_the_debt_is_waited_out() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(100.0, 100.0, t0);
        assert!(!b.charge(300.0, t0));
        assert_eq!(b.available(t0), -200.0);
        // 200 of debt plus 50 wanted, at 100 a second.
        assert_eq!(b.wait_for(50.0, t0), Duration::from_millis(2500));
        // More than the burst is waited for as the burst.
        assert_eq!(b.wait_for(1e9, t0), Duration::from_secs(3));
        assert_eq!(
            b.wait_for(50.0, t0 + Duration::from_secs(3)),
            Duration::ZERO
        );
    }
}
