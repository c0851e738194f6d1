//! Resident memory per idle connection, measured on a full mesh.
//!
//! In the sparse load topology a Servant node's first Kademlia lookups reach most of
//! a 50-node network before the watermarks trim it back, and the heap that those
//! connections used stays resident (fragmented) afterwards: the sparse figure mixes
//! that start-up residue with what a connection costs. Here every node is connected
//! to every other up front, so the lookups find no one new and the resident growth
//! divided by the connection endpoints is the cost of an idle connection. Servant's
//! watermarks are set to the mesh size, so it neither trims nor dials beyond it.

use std::{sync::Arc, time::Duration};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::{
    driver::{settle, BenchNet, Settling},
    load::Recorders,
    params::Params,
    process,
    topology::Edge,
};

/// What one implementation measured on the full mesh.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FullMeshMemory {
    /// Whether the mesh formed and the connections held still before the reading.
    pub settling: Settling,
    /// Connection endpoints at the reading (2 per connection).
    pub endpoints: usize,
    /// Every node started and subscribed, nothing connected.
    pub rss_before_connect: u64,
    /// Fully connected and idle.
    pub rss_connected_idle: u64,
    /// `(rss_connected_idle - rss_before_connect) / endpoints`.
    pub per_idle_connection: f64,
}

/// Every pair of nodes, the smaller index dialing.
pub fn full_mesh(nodes: usize) -> Vec<Edge> {
    (0..nodes)
        .flat_map(|a| (a + 1..nodes).map(move |b| (a, b)))
        .collect()
}

/// The parameters for the full-mesh run: Servant's band is the mesh itself.
pub fn params(load: &Params) -> Params {
    let everyone = (load.nodes - 1) as u32;
    Params {
        conn_low: everyone,
        conn_high: everyone,
        ..load.clone()
    }
}

/// Starts `N`'s nodes, connects every pair, waits for quiet, reads resident memory.
pub async fn run<N: BenchNet>(name: &str, params: &Params) -> Result<FullMeshMemory> {
    let recorders = Arc::new(Recorders::new(params.nodes));
    let net = N::start(params, recorders).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before_connect = process::rss()?.now;
    let edges = full_mesh(params.nodes);
    net.connect(&edges).await?;
    let settling = settle(
        &net,
        name,
        Duration::from_secs(params.settle_timeout_secs),
        params.nodes - 1,
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(params.idle_secs)).await;
    let rss_connected_idle = process::rss()?.now;
    let endpoints: usize = net.views().await?.iter().map(|v| v.connections).sum();
    net.shutdown().await;
    let grown = rss_connected_idle.saturating_sub(rss_before_connect) as f64;
    let per_idle_connection = if endpoints == 0 {
        0.0
    } else {
        grown / endpoints as f64
    };
    eprintln!(
        "[{name}] full mesh: {endpoints} endpoints, RSS {:.1} MB -> {:.1} MB, {:.1} KB per endpoint",
        rss_before_connect as f64 / 1e6,
        rss_connected_idle as f64 / 1e6,
        per_idle_connection / 1000.0
    );
    Ok(FullMeshMemory {
        settling,
        endpoints,
        rss_before_connect,
        rss_connected_idle,
        per_idle_connection,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_mesh_has_every_pair_once() {
        let edges = full_mesh(5);
        assert_eq!(edges.len(), 10);
        assert!(edges.iter().all(|(a, b)| a < b));
    }
}
