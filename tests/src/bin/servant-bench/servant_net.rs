//! Servant's side: real [`servant::Node`]s in this process, each with its own data
//! dir, HTTP API and every behaviour on, driven through their [`servant::Client`]s
//! as an application would.

use std::{collections::HashMap, future::Future, sync::Arc, time::Instant};

use anyhow::{bail, Context, Result};
use futures::future::join_all;
use servant::{
    client::{ConnectTarget, PeerView, Status},
    Config, Node,
};
use tokio::{sync::broadcast::error::RecvError, task::JoinHandle};

use crate::{
    driver::{BenchNet, Counters, NodeView},
    load::{Key, Recorders},
    openmetrics,
    params::Params,
    topology::Edge,
};

/// What this side runs, for the report.
pub const DESCRIPTION: &str = "servant::Node x N in one process: TCP (noise, yamux) on 127.0.0.1 \
    (QUIC and DNS transports built in but not listened on), identify, ping, kad, deny list, \
    connection limits, gossipsub with validate_messages (the envelope check in the event loop \
    decides forwarding), peer manager, HTTP API and metrics; no bootnodes, connected with \
    client.connect along the given edges; deliveries read from client.subscribe";

/// Servant nodes and their temporary data dirs.
pub struct ServantNet {
    nodes: Vec<Node>,
    index: HashMap<String, usize>,
    topic: String,
    receivers: Vec<JoinHandle<()>>,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

fn key_of(id: &str) -> Result<Key, String> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(id, &mut key).map_err(|e| format!("envelope id {id}: {e}"))?;
    Ok(key)
}

impl BenchNet for ServantNet {
    async fn start(params: &Params, recorders: Arc<Recorders>) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut nodes = Vec::with_capacity(params.nodes);
        let mut receivers = Vec::with_capacity(params.nodes);
        for i in 0..params.nodes {
            let config = Config {
                data_dir: dir.path().join(format!("node{i}")),
                listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
                api: "127.0.0.1:0".parse()?,
                conn_low: params.conn_low,
                conn_high: params.conn_high,
                log_level: "off".into(),
                ..Config::default()
            };
            config.validate()?;
            let node = Node::start(config)
                .await
                .with_context(|| format!("start servant node {i}"))?;
            let mut rx = node
                .client()
                .subscribe(params.topic.clone())
                .await
                .map_err(|e| anyhow::anyhow!("subscribe node {i}: {e}"))?;
            let recorders = recorders.clone();
            receivers.push(tokio::spawn(async move {
                loop {
                    match rx.recv().await {
                        Ok(delivery) => {
                            let at = Instant::now();
                            // The publisher's own copy has no forwarder.
                            if delivery.from.is_none() {
                                continue;
                            }
                            if let Ok(key) = key_of(&delivery.envelope.id) {
                                recorders.record(i, key, at);
                            }
                        }
                        Err(RecvError::Lagged(n)) => recorders.add_lagged(n),
                        Err(RecvError::Closed) => break,
                    }
                }
            }));
            nodes.push(node);
        }
        let index = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.peer_id().to_string(), i))
            .collect();
        Ok(ServantNet {
            nodes,
            index,
            topic: params.topic.clone(),
            receivers,
            http: reqwest::Client::new(),
            _dir: dir,
        })
    }

    async fn connect(&self, edges: &[Edge]) -> Result<()> {
        let mut dials = Vec::with_capacity(edges.len());
        for &(a, b) in edges {
            let target = self.nodes[b]
                .listen_addrs()
                .first()
                .cloned()
                .with_context(|| format!("node {b} has no listen address"))?;
            let client = self.nodes[a].client();
            dials.push(async move { (a, b, client.connect(ConnectTarget::Addr(target)).await) });
        }
        let failed: Vec<String> = join_all(dials)
            .await
            .into_iter()
            .filter_map(|(a, b, r)| r.err().map(|e| format!("{a}->{b}: {e}")))
            .collect();
        if !failed.is_empty() {
            bail!("{} dials failed, first: {}", failed.len(), failed[0]);
        }
        Ok(())
    }

    async fn views(&self) -> Result<Vec<NodeView>> {
        let asks = self.nodes.iter().map(|n| {
            let client = n.client();
            async move { (client.status().await, client.peers().await) }
        });
        let mut views = Vec::with_capacity(self.nodes.len());
        for (i, (status, peers)) in join_all(asks).await.into_iter().enumerate() {
            let status: Status = status.map_err(|e| anyhow::anyhow!("node {i} status: {e}"))?;
            let peers: Vec<PeerView> = peers.map_err(|e| anyhow::anyhow!("node {i} peers: {e}"))?;
            let topic = status.topics.iter().find(|t| t.name == self.topic);
            views.push(NodeView {
                topic_peers: topic.map_or(0, |t| t.peers),
                mesh_peers: topic.map_or(0, |t| t.mesh_peers),
                connections: status.connections,
                peers: peers
                    .iter()
                    .filter_map(|p| {
                        let j = *self.index.get(&p.peer_id)?;
                        Some((j, p.direction != "inbound"))
                    })
                    .collect(),
            });
        }
        Ok(views)
    }

    fn publish(
        &self,
        node: usize,
        body: String,
    ) -> impl Future<Output = Result<Key, String>> + Send + 'static {
        let client = self.nodes[node].client();
        let topic = self.topic.clone();
        async move {
            let delivery = client
                .publish(topic, "bench".into(), body)
                .await
                .map_err(|e| e.to_string())?;
            key_of(&delivery.envelope.id)
        }
    }

    async fn counters(&self) -> Result<Counters> {
        let scrapes = self.nodes.iter().enumerate().map(|(i, n)| {
            let http = self.http.clone();
            let addr = n.api_addr();
            async move {
                let addr = addr.with_context(|| format!("node {i} has no API address"))?;
                let text = http
                    .get(format!("http://{addr}/metrics"))
                    .send()
                    .await?
                    .error_for_status()?
                    .text()
                    .await?;
                anyhow::Ok(text)
            }
        });
        let mut total = Counters::default();
        for text in join_all(scrapes).await {
            let text = text?;
            total.add_gossipsub(&text);
            total.connections_established +=
                openmetrics::sum(&text, "libp2p_swarm_connections_established_total");
            let mut other = |key: String, value: f64| {
                *total.other.entry(key).or_insert(0.0) += value;
            };
            for (purpose, n) in openmetrics::by_label(&text, "servant_dials_total", "purpose") {
                other(format!("servant_dials_{purpose}"), n);
            }
            for name in [
                "servant_peers_trimmed_total",
                "servant_dial_failures_total",
                "servant_ping_failures_total",
                "libp2p_kad_query_result_num_requests_count",
                "libp2p_kad_inbound_requests_total",
            ] {
                other(name.to_string(), openmetrics::sum(&text, name));
            }
            for (reason, n) in
                openmetrics::by_label(&text, "servant_messages_rejected_total", "reason")
            {
                other(format!("servant_messages_rejected_{reason}"), n);
            }
        }
        Ok(total)
    }

    async fn shutdown(self) {
        for r in &self.receivers {
            r.abort();
        }
        join_all(self.nodes.into_iter().map(Node::shutdown)).await;
    }
}
