//! The load and what it did: the message schedule, the record of every send and
//! every delivery, and the delivery and latency figures computed from them.
//!
//! Publisher and receivers live in one process, so one monotonic clock
//! ([`Instant`]) times every message from the moment the harness asks a node to
//! publish it until each other node hands it to the application.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::Instant,
};

use serde::{Deserialize, Serialize};

/// A message's identity as both sides see it: the 32 bytes of a BLAKE3 hash.
pub type Key = [u8; 32];

/// Digits of the sequence number that starts every body, so each body is unique.
pub const SEQ_DIGITS: usize = 10;

/// The body of message `seq`: its sequence number, then filler up to `size` bytes.
pub fn body(seq: u64, size: usize) -> String {
    let mut body = format!("{seq:0width$}", width = SEQ_DIGITS);
    body.extend(std::iter::repeat_n('x', size.saturating_sub(body.len())));
    body
}

/// The publishing nodes, spread evenly over the indices (0, 10, 20, ... for 5 of 50).
pub fn publisher_nodes(nodes: usize, publishers: usize) -> Vec<usize> {
    (0..publishers).map(|k| k * nodes / publishers).collect()
}

/// Every node's deliveries, appended by the node's receiving task.
pub struct Recorders {
    nodes: Vec<Mutex<Vec<(Key, Instant)>>>,
    lagged: AtomicU64,
}

impl Recorders {
    /// Empty records for `nodes` nodes.
    pub fn new(nodes: usize) -> Recorders {
        Recorders {
            nodes: (0..nodes).map(|_| Mutex::new(Vec::new())).collect(),
            lagged: AtomicU64::new(0),
        }
    }

    /// Node `node` delivered `key` at `at`.
    pub fn record(&self, node: usize, key: Key, at: Instant) {
        if let Some(list) = self.nodes.get(node) {
            list.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((key, at));
        }
    }

    /// A receiver fell behind and lost `n` deliveries.
    pub fn add_lagged(&self, n: u64) {
        self.lagged.fetch_add(n, Ordering::Relaxed);
    }

    /// Deliveries lost by slow receivers.
    pub fn lagged(&self) -> u64 {
        self.lagged.load(Ordering::Relaxed)
    }

    /// Deliveries recorded so far, all nodes together.
    pub fn total(&self) -> usize {
        self.nodes
            .iter()
            .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    /// A copy of every node's deliveries.
    pub fn snapshot(&self) -> Vec<Vec<(Key, Instant)>> {
        self.nodes
            .iter()
            .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }
}

/// One publication: who, when it was asked for, and the key or why it failed.
#[derive(Debug, Clone)]
pub struct Sent {
    /// The publishing node.
    pub node: usize,
    /// When the harness asked the node to publish.
    pub at: Instant,
    /// The message's key, or the node's error.
    pub key: Result<Key, String>,
}

/// Order statistics of a sample, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Percentiles {
    /// Sample size.
    pub count: usize,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest value.
    pub max: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `values`.
    pub fn of(mut values: Vec<f64>) -> Percentiles {
        if values.is_empty() {
            return Percentiles::default();
        }
        values.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let n = values.len();
            let i = ((p / 100.0) * n as f64).ceil() as usize;
            values[i.clamp(1, n) - 1]
        };
        Percentiles {
            count: values.len(),
            mean: values.iter().sum::<f64>() / values.len() as f64,
            p50: rank(50.0),
            p90: rank(90.0),
            p99: rank(99.0),
            max: rank(100.0),
        }
    }
}

/// What the load achieved.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeliveryStats {
    /// Publications attempted.
    pub published: u64,
    /// Publications the node refused.
    pub publish_errors: u64,
    /// The first refusal's message, if any.
    pub first_publish_error: Option<String>,
    /// Attempts times (nodes - 1): every other node should deliver every message.
    pub expected: u64,
    /// Distinct (message, node) deliveries, the publisher excluded.
    pub deliveries: u64,
    /// `deliveries / expected`.
    pub delivery_ratio: f64,
    /// Messages every other node delivered.
    pub complete_messages: u64,
    /// Deliveries of keys nobody published in this run (should be 0).
    pub unknown_deliveries: u64,
    /// Deliveries a slow local receiver lost (Servant's subscriber buffer).
    pub lagged: u64,
    /// Per complete message: from the publish request until the last other node
    /// delivered it.
    pub to_last_node_ms: Percentiles,
    /// Per delivery: from the publish request until that node delivered it.
    pub per_delivery_ms: Percentiles,
}

/// Matches deliveries to publications.
pub fn analyse(
    nodes: usize,
    sent: &[Sent],
    got: &[Vec<(Key, Instant)>],
    lagged: u64,
) -> DeliveryStats {
    let others = nodes.saturating_sub(1) as u64;
    let mut by_key: HashMap<Key, (usize, Instant)> = HashMap::new();
    let mut publish_errors = 0;
    let mut first_publish_error = None;
    for s in sent {
        match &s.key {
            Ok(key) => {
                by_key.insert(*key, (s.node, s.at));
            }
            Err(e) => {
                publish_errors += 1;
                first_publish_error.get_or_insert_with(|| e.clone());
            }
        }
    }
    // Per message: nodes that delivered it and the latest delivery.
    let mut reach: HashMap<Key, (u64, Instant)> = HashMap::new();
    let mut per_delivery = Vec::new();
    let mut deliveries = 0;
    let mut unknown = 0;
    for (node, list) in got.iter().enumerate() {
        let mut seen = std::collections::HashSet::new();
        for (key, at) in list {
            let Some((publisher, sent_at)) = by_key.get(key) else {
                unknown += 1;
                continue;
            };
            if *publisher == node || !seen.insert(*key) {
                continue;
            }
            deliveries += 1;
            per_delivery.push(at.saturating_duration_since(*sent_at).as_secs_f64() * 1e3);
            let entry = reach.entry(*key).or_insert((0, *at));
            entry.0 += 1;
            entry.1 = entry.1.max(*at);
        }
    }
    let mut to_last = Vec::new();
    for (key, (count, last)) in &reach {
        if *count == others {
            if let Some((_, sent_at)) = by_key.get(key) {
                to_last.push(last.saturating_duration_since(*sent_at).as_secs_f64() * 1e3);
            }
        }
    }
    let published = sent.len() as u64;
    let expected = published * others;
    DeliveryStats {
        published,
        publish_errors,
        first_publish_error,
        expected,
        deliveries,
        delivery_ratio: if expected == 0 {
            0.0
        } else {
            deliveries as f64 / expected as f64
        },
        complete_messages: to_last.len() as u64,
        unknown_deliveries: unknown,
        lagged,
        to_last_node_ms: Percentiles::of(to_last),
        per_delivery_ms: Percentiles::of(per_delivery),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bodies_are_unique_and_sized() {
        assert_eq!(body(7, 1024).len(), 1024);
        assert!(body(7, 1024).starts_with("0000000007x"));
        assert_ne!(body(1, 64), body(2, 64));
        assert_eq!(publisher_nodes(50, 5), vec![0, 10, 20, 30, 40]);
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let p = Percentiles::of((1..=100).map(f64::from).collect());
        assert_eq!((p.p50, p.p99, p.max, p.count), (50.0, 99.0, 100.0, 100));
        assert_eq!(Percentiles::of(vec![3.0]).p99, 3.0);
    }

    #[test]
    fn analysis_counts_each_node_once_and_skips_the_publisher() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let sent = vec![
            Sent {
                node: 0,
                at: t0,
                key: Ok([1; 32]),
            },
            Sent {
                node: 1,
                at: t0,
                key: Err("no peers".into()),
            },
        ];
        let got = vec![
            vec![([1; 32], ms(1))],                   // the publisher itself
            vec![([1; 32], ms(4)), ([1; 32], ms(9))], // a duplicate
            vec![([1; 32], ms(6)), ([9; 32], ms(6))], // an unknown key
        ];
        let stats = analyse(3, &sent, &got, 0);
        assert_eq!(stats.expected, 4);
        assert_eq!(stats.deliveries, 2);
        assert_eq!(stats.complete_messages, 1);
        assert_eq!(stats.unknown_deliveries, 1);
        assert_eq!(stats.publish_errors, 1);
        assert!((stats.to_last_node_ms.max - 6.0).abs() < 1e-9);
    }
}
