//! Wall-clock time as the wire and the files count it: since the Unix epoch.
//!
//! Durations inside the node use `Instant`; these are only for timestamps that leave
//! the process (envelopes, files, the API). A clock set before 1970 reads as 0.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Seconds since the Unix epoch.
pub fn unix_secs() -> u64 {
    unix_ms() / 1000
}
