//! A node's HTTP API as the tests use it, wherever the node runs (a local process, a
//! container): its base URL and, off localhost, the bearer token `/v1/` requires.

use std::{collections::HashSet, path::Path, time::Duration};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use libp2p::PeerId;
use servant::{
    broadcast::Delivery,
    client::{BanOutcome, ConnectOutcome, PeerView, Status},
    fetch::Progress,
    store::ContentInfo,
};
use servant_protocol::search::Hit;
use tokio::sync::mpsc;

use crate::{json_lines, metric_value, Subscription, REQUEST_TIMEOUT};

/// One node's API.
#[derive(Clone)]
pub struct Api {
    /// A name for errors.
    pub name: String,
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Api {
    /// The API at `base` (`http://host:port`), with the bearer token `/v1/` needs off
    /// localhost.
    pub fn new(name: &str, base: &str, token: Option<String>, http: reqwest::Client) -> Api {
        Api {
            name: name.to_string(),
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        let request = self
            .request(reqwest::Method::GET, path)
            .timeout(REQUEST_TIMEOUT);
        self.json(request, &format!("GET {path}")).await
    }

    /// Sends `request` and decodes its JSON answer; a non-2xx status is an error that
    /// names `what` and carries the body.
    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<T> {
        let response = request.send().await?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            bail!("{} {what}: {status}: {text}", self.name);
        }
        serde_json::from_str(&text).with_context(|| format!("decode {text}"))
    }

    async fn post<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> Result<T> {
        let request = self
            .request(reqwest::Method::POST, path)
            .json(&body)
            .timeout(REQUEST_TIMEOUT);
        self.json(request, &format!("POST {path}")).await
    }

    /// `POST /v1/share`: imports and announces a file or directory.
    pub async fn share(&self, path: &Path) -> Result<ContentInfo> {
        let request = self
            .request(reqwest::Method::POST, "/v1/share")
            .json(&serde_json::json!({ "path": path }))
            .timeout(Duration::from_secs(600));
        self.json(request, &format!("share {}", path.display()))
            .await
    }

    /// `GET /v1/shares`.
    pub async fn shares(&self) -> Result<Vec<ContentInfo>> {
        self.get("/v1/shares").await
    }

    /// `POST /v1/fetch`, following its progress to the end. Returns every event; the
    /// last one is `finished` or `failed`.
    pub async fn fetch(&self, id: &str, out: &Path) -> Result<Vec<Progress>> {
        let mut events = Vec::new();
        let mut stream = self.fetch_stream(id, out).await?;
        while let Some(event) = stream.recv().await {
            events.push(event);
        }
        match events.last() {
            Some(Progress::Finished { .. } | Progress::Failed { .. }) => Ok(events),
            _ => bail!("{}: fetch stream ended early: {events:?}", self.name),
        }
    }

    /// `POST /v1/fetch`, with its progress events forwarded to a channel as they
    /// arrive (dropping the receiver cancels the fetch).
    pub async fn fetch_stream(&self, id: &str, out: &Path) -> Result<mpsc::Receiver<Progress>> {
        let response = self
            .request(reqwest::Method::POST, "/v1/fetch")
            .json(&serde_json::json!({ "id": id, "out": out, "overwrite": true }))
            .send()
            .await?;
        if !response.status().is_success() {
            let status = response.status();
            bail!("{} fetch: {status}: {}", self.name, response.text().await?);
        }
        Ok(json_lines(response))
    }

    /// `GET /v1/search`: every hit within `timeout`.
    pub async fn search(&self, term: &str, ttl: u8, timeout: Duration) -> Result<Vec<Hit>> {
        let response = self
            .request(reqwest::Method::GET, "/v1/search")
            .query(&[
                ("term", term.to_string()),
                ("ttl", ttl.to_string()),
                ("timeout_ms", timeout.as_millis().to_string()),
            ])
            .send()
            .await?;
        if !response.status().is_success() {
            let status = response.status();
            bail!("{} search: {status}: {}", self.name, response.text().await?);
        }
        let mut rx = json_lines(response);
        let mut hits = Vec::new();
        while let Some(hit) = rx.recv().await {
            hits.push(hit);
        }
        Ok(hits)
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> Result<Status> {
        self.get("/v1/status").await
    }

    /// Waits up to `timeout` until this node has at least `min` peers in its mesh for
    /// `topic`.
    pub async fn wait_mesh(&self, topic: &str, min: usize, timeout: Duration) -> Result<()> {
        let what = format!("{} to have {min} mesh peer(s) for {topic}", self.name);
        crate::eventually(timeout, &what, || async move {
            let status = self.status().await?;
            Ok(status
                .topics
                .iter()
                .any(|t| t.name == topic && t.mesh_peers >= min)
                .then_some(()))
        })
        .await
    }

    /// `GET /v1/reach`.
    pub async fn reach(&self) -> Result<servant::traversal::ReachView> {
        self.get("/v1/reach").await
    }

    /// `GET /v1/peers`.
    pub async fn peers(&self) -> Result<Vec<PeerView>> {
        self.get("/v1/peers").await
    }

    /// PeerIds of connected peers.
    pub async fn peer_ids(&self) -> Result<HashSet<PeerId>> {
        Ok(self
            .peers()
            .await?
            .iter()
            .filter_map(|p| p.peer_id.parse().ok())
            .collect())
    }

    /// `POST /v1/connect`.
    pub async fn connect(&self, target: &str) -> Result<ConnectOutcome> {
        self.post("/v1/connect", serde_json::json!({ "target": target }))
            .await
    }

    /// `POST /v1/ban`.
    pub async fn ban(&self, target: &str) -> Result<BanOutcome> {
        self.post("/v1/ban", serde_json::json!({ "target": target }))
            .await
    }

    /// `POST /v1/unban`.
    pub async fn unban(&self, target: &str) -> Result<BanOutcome> {
        self.post("/v1/unban", serde_json::json!({ "target": target }))
            .await
    }

    /// `POST /v1/publish`.
    pub async fn publish(&self, topic: &str, title: &str, body: &str) -> Result<Delivery> {
        self.post(
            "/v1/publish",
            serde_json::json!({ "topic": topic, "title": title, "body": body }),
        )
        .await
    }

    /// Whether `GET /livez` answers 200 within 2 s.
    pub async fn livez(&self) -> bool {
        let live = self
            .request(reqwest::Method::GET, "/livez")
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        matches!(live, Ok(r) if r.status().is_success())
    }

    /// `GET /readyz` status code.
    pub async fn readyz(&self) -> Result<u16> {
        Ok(self
            .request(reqwest::Method::GET, "/readyz")
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await?
            .status()
            .as_u16())
    }

    /// `GET /readyz`: its status code and body.
    pub async fn readyz_body(&self) -> Result<(u16, String)> {
        let response = self
            .request(reqwest::Method::GET, "/readyz")
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.text().await?))
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> Result<String> {
        Ok(self
            .request(reqwest::Method::GET, "/metrics")
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await?
            .text()
            .await?)
    }

    /// The gossipsub and connection series from `/metrics`, without histogram
    /// buckets, one per line: what to print when a broadcast went missing.
    pub async fn gossip_report(&self) -> String {
        let text = match self.metrics().await {
            Ok(text) => text,
            Err(e) => return format!("{}: no metrics: {e:#}", self.name),
        };
        text.lines()
            .filter(|l| {
                (l.starts_with("libp2p_gossipsub_") || l.starts_with("servant_connections"))
                    && !l.contains("_bucket{")
            })
            .map(|l| format!("{}: {l}\n", self.name))
            .collect()
    }

    /// The value of one series in `/metrics` (exact name with labels), 0 if absent.
    pub async fn metric(&self, series: &str) -> Result<f64> {
        let text = self.metrics().await?;
        Ok(metric_value(&text, series).unwrap_or(0.0))
    }

    /// Opens `GET /v1/subscribe?topic=` and forwards each delivery to a channel.
    pub async fn subscribe(&self, topic: &str) -> Result<Subscription> {
        let response = self
            .request(reqwest::Method::GET, "/v1/subscribe")
            .query(&[("topic", topic)])
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("{} subscribe: {}", self.name, response.status());
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut stream = response.bytes_stream();
            let mut buffer = Vec::new();
            while let Some(Ok(chunk)) = stream.next().await {
                buffer.extend_from_slice(&chunk);
                while let Some(pos) = buffer.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buffer.drain(..=pos).collect();
                    if let Ok(delivery) = serde_json::from_slice::<Delivery>(&line) {
                        if tx.send(delivery).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Subscription { rx, task })
    }
}
