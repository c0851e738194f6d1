//! The connection graph: a planned random graph with bounded degrees, and the
//! graph a network actually ended up with.
//!
//! An edge is `(dialer, listener)` by node index. Both implementations are given the
//! same edges and dial them the same way round.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Result};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// One connection: the node that dials it and the node that accepts it.
pub type Edge = (usize, usize);

/// A connected random graph on `nodes` nodes where every node has between
/// `min_degree` and `max_degree` peers, the same for the same seed.
///
/// A ring keeps it connected; random chords then fill each node up to a degree
/// drawn from the range, and a last pass lifts any node still below the minimum.
pub fn plan(nodes: usize, min_degree: usize, max_degree: usize, seed: u64) -> Result<Vec<Edge>> {
    if nodes <= max_degree || min_degree < 2 || min_degree > max_degree {
        bail!("cannot plan {nodes} nodes with {min_degree}..={max_degree} peers each");
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let target: Vec<usize> = (0..nodes)
        .map(|_| rng.gen_range(min_degree..=max_degree))
        .collect();
    let mut adjacent: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); nodes];
    let add = |adjacent: &mut Vec<BTreeSet<usize>>, a: usize, b: usize| {
        adjacent[a].insert(b);
        adjacent[b].insert(a);
    };
    for a in 0..nodes {
        add(&mut adjacent, a, (a + 1) % nodes);
    }
    for limit in [&target, &vec![max_degree; nodes]] {
        loop {
            let open: Vec<usize> = (0..nodes)
                .filter(|&a| adjacent[a].len() < limit[a])
                .collect();
            let mut pairs: Vec<(usize, usize)> = open
                .iter()
                .flat_map(|&a| open.iter().map(move |&b| (a, b)))
                .filter(|&(a, b)| a < b && !adjacent[a].contains(&b))
                .collect();
            if pairs.is_empty() {
                break;
            }
            // Prefer the nodes furthest below their target, at random among equals.
            pairs.shuffle(&mut rng);
            let need = |a: usize| limit[a] - adjacent[a].len();
            pairs.sort_by_key(|&(a, b)| std::cmp::Reverse(need(a) + need(b)));
            let (a, b) = pairs[0];
            add(&mut adjacent, a, b);
        }
        if adjacent.iter().all(|s| s.len() >= min_degree) {
            break;
        }
    }
    if let Some(a) = (0..nodes).find(|&a| adjacent[a].len() < min_degree) {
        bail!(
            "planned node {a} has only {} peers (seed {seed}); try another seed",
            adjacent[a].len()
        );
    }
    let mut edges = Vec::new();
    for (a, peers) in adjacent.iter().enumerate() {
        for &b in peers.range(a + 1..) {
            edges.push(if rng.gen_bool(0.5) { (a, b) } else { (b, a) });
        }
    }
    Ok(edges)
}

/// Unordered pairs, for comparing graphs regardless of who dialed.
pub fn pairs(edges: &[Edge]) -> BTreeSet<(usize, usize)> {
    edges.iter().map(|&(a, b)| (a.min(b), a.max(b))).collect()
}

/// Builds the edge list from each node's view of its peers (`(peer, outbound)`),
/// one edge per connected pair, dialed by the side that reports it outbound.
pub fn from_views(views: &[Vec<(usize, bool)>]) -> Vec<Edge> {
    let mut dialers: BTreeMap<(usize, usize), BTreeSet<usize>> = BTreeMap::new();
    for (a, peers) in views.iter().enumerate() {
        for &(b, outbound) in peers {
            let set = dialers.entry((a.min(b), a.max(b))).or_default();
            if outbound {
                set.insert(a);
            }
        }
    }
    // Both sides dialed (two connections): the lower index is kept as the dialer.
    dialers
        .into_iter()
        .map(|((a, b), set)| match set.first() {
            Some(&d) if d == b => (b, a),
            _ => (a, b),
        })
        .collect()
}

/// Degree statistics of a graph.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Degrees {
    /// Fewest peers of any node.
    pub min: usize,
    /// Most peers of any node.
    pub max: usize,
    /// Mean peers per node.
    pub mean: f64,
}

/// Degrees of the graph `edges` on `nodes` nodes.
pub fn degrees(nodes: usize, edges: &[Edge]) -> Degrees {
    let mut degree = vec![0usize; nodes];
    for (a, b) in pairs(edges) {
        degree[a] += 1;
        degree[b] += 1;
    }
    Degrees {
        min: degree.iter().copied().min().unwrap_or(0),
        max: degree.iter().copied().max().unwrap_or(0),
        mean: degree.iter().sum::<usize>() as f64 / nodes.max(1) as f64,
    }
}

/// Whether every node can reach every other.
pub fn is_connected(nodes: usize, edges: &[Edge]) -> bool {
    let mut adjacent = vec![Vec::new(); nodes];
    for (a, b) in pairs(edges) {
        adjacent[a].push(b);
        adjacent[b].push(a);
    }
    let mut seen = vec![false; nodes];
    let mut stack = vec![0];
    while let Some(a) = stack.pop() {
        if std::mem::replace(&mut seen[a], true) {
            continue;
        }
        stack.extend(adjacent[a].iter().copied().filter(|&b| !seen[b]));
    }
    seen.iter().all(|s| *s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planned_graph_has_bounded_degrees_and_is_connected() {
        for seed in 0..20 {
            let edges = plan(50, 6, 8, seed).unwrap();
            let d = degrees(50, &edges);
            assert!(d.min >= 6 && d.max <= 8, "seed {seed}: {d:?}");
            assert!(is_connected(50, &edges));
            assert_eq!(pairs(&edges).len(), edges.len(), "no duplicate edges");
            assert_eq!(edges, plan(50, 6, 8, seed).unwrap(), "deterministic");
        }
    }

    #[test]
    fn views_give_back_the_edges() {
        let edges = plan(20, 3, 5, 7).unwrap();
        let mut views = vec![Vec::new(); 20];
        for &(a, b) in &edges {
            views[a].push((b, true));
            views[b].push((a, false));
        }
        let mut back = from_views(&views);
        back.sort();
        let mut want = edges.clone();
        want.sort();
        assert_eq!(back, want);
    }
}
