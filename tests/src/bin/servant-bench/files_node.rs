//! Real `servant` processes for `files`, driven as a user drives them: over the HTTP
//! API on loopback, or with the `servant` command line inside a network namespace
//! (whose loopback this process cannot reach).

use std::{
    fs::File,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use libp2p::{multiaddr::Protocol, Multiaddr, PeerId};
use serde::{Deserialize, Serialize};
use servant::{
    client::PeerView,
    fetch::{Progress, ProviderShare},
    store::ContentInfo,
};
use tokio::io::AsyncBufReadExt;

use crate::{files_netns, process};

/// Deadline of one API request other than a fetch.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// Most time a node gets to print its PeerId.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How to start one node.
pub struct Spec {
    /// A name for logs.
    pub name: String,
    /// The namespace to run in, or none for this one.
    pub netns: Option<String>,
    /// Its data dir (removed first).
    pub data_dir: PathBuf,
    /// Its p2p listen addresses.
    pub listen: Vec<Multiaddr>,
    /// Its API address (inside its namespace).
    pub api: SocketAddr,
    /// A bootnode, with `/p2p/`.
    pub bootnode: Option<Multiaddr>,
    /// More `servant run` arguments (`--extra-servant-arg`).
    pub extra: Vec<String>,
}

/// One running `servant run`.
pub struct ServantProcess {
    /// Its name in logs.
    pub name: String,
    /// Its process id.
    pub pid: u32,
    /// Its PeerId.
    pub peer_id: PeerId,
    /// Its listen addresses, each with `/p2p/`.
    pub addrs: Vec<Multiaddr>,
    netns: Option<String>,
    api: SocketAddr,
    bin: PathBuf,
    stderr: PathBuf,
    child: Option<Child>,
    http: reqwest::Client,
}

/// One fetch, timed by the caller.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FetchTrace {
    /// From sending the request to the `finished` event.
    pub wall_secs: f64,
    /// From sending the request to the `started` event (provider lookup and
    /// manifest).
    pub started_after_secs: f64,
    /// The node's own `elapsed_ms` (it includes the lookup and any export copy).
    pub node_elapsed_ms: u64,
    /// Bytes of the content.
    pub size: u64,
    /// Chunks of the content.
    pub chunks: u64,
    /// Providers the fetch started with.
    pub providers_at_start: usize,
    /// Chunks per provider.
    pub shares: Vec<ProviderShare>,
    /// Chunks that were already there.
    pub resumed_chunks: u64,
    /// `provider_dropped` events.
    pub dropped: Vec<String>,
}

impl ServantProcess {
    /// Starts the node and waits until it printed its PeerId (its API is up by then).
    pub async fn start(bin: &Path, spec: Spec, log_dir: &Path) -> Result<ServantProcess> {
        let _ = std::fs::remove_dir_all(&spec.data_dir);
        std::fs::create_dir_all(log_dir)?;
        let stdout_path = log_dir.join(format!("{}.stdout", spec.name));
        let stderr_path = log_dir.join(format!("{}.stderr", spec.name));
        let listen: Vec<String> = spec.listen.iter().map(|a| a.to_string()).collect();
        let mut cmd = files_netns::command(spec.netns.as_deref(), bin);
        cmd.arg("run")
            .arg("--no-upnp")
            .arg("--data-dir")
            .arg(&spec.data_dir)
            .arg("--listen")
            .arg(listen.join(","))
            .arg("--api")
            .arg(spec.api.to_string());
        if let Some(boot) = &spec.bootnode {
            cmd.arg("--bootnode").arg(boot.to_string());
        }
        cmd.args(&spec.extra)
            .stdin(Stdio::null())
            .stdout(File::create(&stdout_path)?)
            .stderr(File::create(&stderr_path)?);
        crate::process::clear_servant_env(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let mut node = ServantProcess {
            name: spec.name,
            pid: child.id(),
            peer_id: PeerId::random(),
            addrs: Vec::new(),
            netns: spec.netns,
            api: spec.api,
            bin: bin.to_path_buf(),
            stderr: stderr_path,
            child: Some(child),
            http: reqwest::Client::new(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        node.peer_id = loop {
            let exited = node
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                bail!(
                    "{} exited with {status} during start; stderr:\n{}",
                    node.name,
                    node.log_tail(30)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not start within {START_TIMEOUT:?}; stderr:\n{}",
                    node.name,
                    node.log_tail(30)
                );
            }
            let text = std::fs::read_to_string(&stdout_path).unwrap_or_default();
            if let Some(id) = text.lines().find_map(|l| l.strip_prefix("PeerId: ")) {
                break id
                    .trim()
                    .parse()
                    .with_context(|| format!("{}: PeerId {id}", node.name))?;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        node.addrs = spec
            .listen
            .into_iter()
            .map(|a| a.with(Protocol::P2p(node.peer_id)))
            .collect();
        Ok(node)
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Its CPU seconds so far.
    pub fn cpu_seconds(&self) -> Result<f64> {
        process::pid_cpu_seconds(self.pid)
    }

    /// Its first listen address using `transport` (`tcp` or `quic-v1`).
    pub fn addr(&self, quic: bool) -> Result<Multiaddr> {
        self.addrs
            .iter()
            .find(|a| a.iter().any(|p| matches!(p, Protocol::QuicV1)) == quic)
            .cloned()
            .with_context(|| format!("{} has no such listen address", self.name))
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    /// `servant <args> --api <api> --json` in the node's namespace; its stdout.
    async fn cli(&self, args: &[&str]) -> Result<String> {
        let ns = self.netns.as_deref();
        let output = tokio::process::Command::from(files_netns::command(ns, &self.bin))
            .args(args)
            .arg("--api")
            .arg(self.api.to_string())
            .arg("--json")
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("{}: servant {}", self.name, args.join(" ")))?;
        if !output.status.success() {
            bail!(
                "{}: `servant {}` failed: {}",
                self.name,
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    async fn http_json<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<T> {
        let response = request
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .with_context(|| format!("{}: {what}", self.name))?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            bail!("{}: {what}: {status}: {text}", self.name);
        }
        serde_json::from_str(&text).with_context(|| format!("{}: {what}: {text}", self.name))
    }

    /// Shares `path` (an absolute path) and returns what the store says of it.
    pub async fn share(&self, path: &Path) -> Result<ContentInfo> {
        if self.netns.is_some() {
            let path = path.to_str().context("a non-UTF-8 path")?;
            let text = self.cli(&["share", path]).await?;
            return serde_json::from_str(&text).with_context(|| format!("share answered {text}"));
        }
        let body = serde_json::json!({ "path": path });
        self.http_json(self.http.post(self.url("/v1/share")).json(&body), "share")
            .await
    }

    /// Its connected peers.
    pub async fn peers(&self) -> Result<Vec<PeerView>> {
        if self.netns.is_some() {
            let text = self.cli(&["peers"]).await?;
            return serde_json::from_str(&text).with_context(|| format!("peers answered {text}"));
        }
        self.http_json(self.http.get(self.url("/v1/peers")), "peers")
            .await
    }

    /// Dials `addr` and keeps the connection.
    pub async fn connect(&self, addr: &Multiaddr) -> Result<()> {
        if self.netns.is_some() {
            self.cli(&["connect", &addr.to_string()]).await?;
            return Ok(());
        }
        let body = serde_json::json!({ "target": addr.to_string() });
        let _: serde_json::Value = self
            .http_json(
                self.http.post(self.url("/v1/connect")).json(&body),
                "connect",
            )
            .await?;
        Ok(())
    }

    /// Removes content from the store (so the next fetch starts from nothing).
    pub async fn unshare(&self, id: &str) -> Result<()> {
        if self.netns.is_some() {
            self.cli(&["unshare", id]).await?;
            return Ok(());
        }
        let body = serde_json::json!({ "id": id });
        let _: serde_json::Value = self
            .http_json(
                self.http.post(self.url("/v1/unshare")).json(&body),
                "unshare",
            )
            .await?;
        Ok(())
    }

    /// `GET /metrics` (loopback nodes only).
    pub async fn metrics(&self) -> Result<String> {
        if self.netns.is_some() {
            bail!("{}: metrics are read on loopback nodes only", self.name);
        }
        let response = self
            .http
            .get(self.url("/metrics"))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await?;
        Ok(response.error_for_status()?.text().await?)
    }

    /// Waits until every one of `peers` is connected, for at most `timeout`; returns
    /// those that are not.
    pub async fn wait_for_peers(&self, peers: &[PeerId], timeout: Duration) -> Result<Vec<PeerId>> {
        let deadline = Instant::now() + timeout;
        loop {
            let connected: Vec<String> =
                self.peers().await?.into_iter().map(|p| p.peer_id).collect();
            let missing: Vec<PeerId> = peers
                .iter()
                .filter(|p| !connected.contains(&p.to_string()))
                .copied()
                .collect();
            if missing.is_empty() || Instant::now() >= deadline {
                return Ok(missing);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Fetches `id` to `out` (replacing it), or into the store only (loopback nodes
    /// only: the command line always writes a file), and times it from the request
    /// to the `finished` event.
    pub async fn fetch(&self, id: &str, out: Option<&Path>) -> Result<FetchTrace> {
        let mut trace = Trace::default();
        let sent = Instant::now();
        if self.netns.is_some() {
            let out = out
                .context("`servant fetch` always writes a file: give an output path")?
                .to_str()
                .context("a non-UTF-8 path")?;
            let ns = self.netns.as_deref();
            let mut child = tokio::process::Command::from(files_netns::command(ns, &self.bin))
                .args(["fetch", id, "--out", out, "--force", "--json", "--api"])
                .arg(self.api.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("{}: servant fetch", self.name))?;
            let stdout = child.stdout.take().context("servant fetch's stdout")?;
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Some(line) = lines.next_line().await? {
                trace.line(line.as_bytes(), sent)?;
            }
            // A failed fetch exits non-zero after printing its `failed` event.
            let _ = child.wait().await;
        } else {
            let body = match out {
                Some(out) => serde_json::json!({ "id": id, "out": out, "overwrite": true }),
                None => serde_json::json!({ "id": id }),
            };
            let response = self
                .http
                .post(self.url("/v1/fetch"))
                .json(&body)
                .send()
                .await
                .with_context(|| format!("{}: fetch", self.name))?;
            let status = response.status();
            if !status.is_success() {
                let text = response.text().await.unwrap_or_default();
                bail!("{}: fetch: {status}: {text}", self.name);
            }
            let mut stream = response.bytes_stream();
            let mut buffer: Vec<u8> = Vec::new();
            while let Some(chunk) = stream.next().await {
                buffer.extend_from_slice(&chunk?);
                while let Some(pos) = buffer.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buffer.drain(..=pos).collect();
                    trace.line(&line, sent)?;
                }
            }
        }
        trace
            .done
            .ok_or_else(|| anyhow!("{}: the fetch ended without a `finished` event", self.name))
    }

    /// SIGTERM, then SIGKILL after 10 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill(2) on our own child's pid; at worst it fails with ESRCH.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("[files] {} did not stop within 10 s; killing it", self.name);
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for ServantProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Folds a fetch's JSON lines into a [`FetchTrace`].
#[derive(Default)]
struct Trace {
    started: Option<(f64, u64, u64, usize)>,
    dropped: Vec<String>,
    done: Option<FetchTrace>,
}

impl Trace {
    fn line(&mut self, line: &[u8], sent: Instant) -> Result<()> {
        let line = line.trim_ascii();
        if line.is_empty() {
            return Ok(());
        }
        let at = sent.elapsed().as_secs_f64();
        let event: Progress = serde_json::from_slice(line).with_context(|| {
            format!(
                "unexpected line from the fetch: {}",
                String::from_utf8_lossy(line)
            )
        })?;
        match event {
            Progress::Started {
                size,
                chunks,
                providers,
                ..
            } => self.started = Some((at, size, chunks, providers)),
            Progress::ProviderDropped { peer, reason } => {
                self.dropped.push(format!("{peer}: {reason}"));
            }
            Progress::Finished {
                size,
                providers,
                resumed_chunks,
                elapsed_ms,
                ..
            } => {
                let (started_after_secs, _, chunks, providers_at_start) =
                    self.started.unwrap_or((at, size, 0, 0));
                self.done = Some(FetchTrace {
                    wall_secs: at,
                    started_after_secs,
                    node_elapsed_ms: elapsed_ms,
                    size,
                    chunks,
                    providers_at_start,
                    shares: providers,
                    resumed_chunks,
                    dropped: std::mem::take(&mut self.dropped),
                });
            }
            Progress::Failed {
                error,
                have_chunks,
                chunks,
            } => bail!("the fetch failed ({have_chunks}/{chunks} chunks): {error}"),
            Progress::Progress { .. } => {}
        }
        Ok(())
    }
}
