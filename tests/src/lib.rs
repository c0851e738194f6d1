//! Test harness: real `servant` processes on 127.0.0.1, driven through their HTTP API.
//!
//! A [`Net`] owns a temporary directory and the nodes started in it. Every node gets
//! its own data dir and ports, and logs to files there; when a test fails, the tail of
//! every node's log is printed and the directory is kept for inspection.

#![allow(clippy::missing_panics_doc)]

pub mod compose;
pub mod file_peer;
pub mod fuzz;
pub mod gossip_peer;
pub mod gossip_raw;
pub mod hostile;
pub mod kad_raw;
pub mod natlab;
pub mod pcap;
pub mod raw_peer;

mod api;
pub use api::Api;

use std::{
    collections::HashSet,
    fs::File,
    net::{TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use libp2p::{Multiaddr, PeerId};
use servant::broadcast::Delivery;
use tokio::sync::mpsc;

/// Path of the `servant` binary under test: `$SERVANT_BIN`, else the one cargo built
/// next to this test executable (`cargo build -p servant` must have run; the README's
/// test command does it).
pub fn servant_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("SERVANT_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/servant
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile dir");
    let bin = dir.join("servant");
    assert!(
        bin.exists(),
        "{} not found: run `cargo build -p servant` first (the README's test command does)",
        bin.display()
    );
    bin
}

/// Deadline for one non-streaming API request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

static USED_PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// The kernel's ephemeral port range: source ports of outgoing connections come from
/// it, so a port handed out from it can be taken by any connection before the node
/// binds it (seen: "cannot bind the API to 0.0.0.0:34921: Address already in use").
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// The range `free_port` draws from: `SERVANT_TEST_PORTS` (`LOW-HIGH`, high exclusive)
/// where it is set, so that test processes running at once (the CI soak beside the
/// other tests) draw from ranges of their own; otherwise the 12,000 ports below the
/// ephemeral range.
///
/// # Panics
/// When `SERVANT_TEST_PORTS` is set but is not `LOW-HIGH` with 1024 <= LOW < HIGH: a
/// misspelt range would otherwise let two test processes share ports without a word.
fn port_range() -> (u16, u16) {
    match std::env::var("SERVANT_TEST_PORTS") {
        Ok(given) => parse_port_range(&given).unwrap_or_else(|| {
            panic!("SERVANT_TEST_PORTS={given:?}: expected LOW-HIGH, 1024 <= LOW < HIGH")
        }),
        Err(_) => {
            let high = ephemeral_low().max(2048);
            (high.saturating_sub(12_000).max(1024), high)
        }
    }
}

/// `LOW-HIGH` with 1024 <= LOW < HIGH, as `SERVANT_TEST_PORTS` gives it.
fn parse_port_range(given: &str) -> Option<(u16, u16)> {
    let (low, high) = given.split_once('-')?;
    let (low, high) = (
        low.trim().parse::<u16>().ok()?,
        high.trim().parse::<u16>().ok()?,
    );
    (1024 <= low && low < high).then_some((low, high))
}

/// A port free for both TCP and UDP on 127.0.0.1 (and TCP on every address), below the
/// ephemeral range so no outgoing connection takes it meanwhile, and never handed out
/// twice per process; from `SERVANT_TEST_PORTS` where that is set.
///
/// # Panics
/// When ten draws per port of the range found none free: a range too narrow for the
/// tests fails them instead of hanging them.
pub fn free_port() -> u16 {
    let (low, high) = port_range();
    for _ in 0..10 * usize::from(high - low) {
        let port = rand::Rng::gen_range(&mut rand::thread_rng(), low..high);
        let free = TcpListener::bind(("0.0.0.0", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port)).is_ok()
            && UdpSocket::bind(("127.0.0.1", port)).is_ok();
        if !free {
            continue;
        }
        let mut used = USED_PORTS.lock().unwrap_or_else(|e| e.into_inner());
        if used.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
    panic!("no free port left in {low}-{high} (SERVANT_TEST_PORTS or the default range)")
}

/// Polls `check` every 200 ms until it returns `Some`, or fails after `timeout`
/// with `what` and the last value seen.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            return Err(match last_err {
                Some(e) => e.context(format!("timed out after {timeout:?} waiting for: {what}")),
                None => anyhow!("timed out after {timeout:?} waiting for: {what}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One `servant` process (or its data dir, while stopped).
pub struct TestNode {
    /// A name for logs.
    pub name: String,
    /// Its data dir.
    pub data_dir: PathBuf,
    /// TCP and UDP port of its listeners.
    pub p2p_port: u16,
    /// Port of its HTTP API.
    pub api_port: u16,
    /// Its PeerId, known once it has started once.
    pub peer_id: Option<PeerId>,
    /// Extra arguments for `servant run`.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// The address the API binds (127.0.0.1 unless a test needs another).
    pub api_host: String,
    /// The loopback address the p2p listeners bind (127.0.0.x, so tests can cut
    /// groups of nodes apart with iptables).
    pub p2p_host: String,
    /// Run the process as this user and group id (root only): iptables' owner match
    /// then tells this node's packets from others' on the shared loopback.
    pub uid: Option<u32>,
    child: Option<Child>,
    log_dir: PathBuf,
    starts: u32,
    api: Api,
}

impl std::ops::Deref for TestNode {
    type Target = Api;

    fn deref(&self) -> &Api {
        &self.api
    }
}

impl TestNode {
    /// The API's base URL.
    pub fn api_url(&self) -> String {
        format!("http://{}", local_api(self.api_port))
    }

    /// The node's TCP multiaddr with `/p2p/`, for `--bootnode`.
    pub fn addr(&self) -> Multiaddr {
        let peer = self.peer_id.expect("node has started");
        format!("/ip4/{}/tcp/{}/p2p/{peer}", self.p2p_host, self.p2p_port)
            .parse()
            .expect("multiaddr")
    }

    /// The PeerId (panics before the first start).
    pub fn id(&self) -> PeerId {
        self.peer_id.expect("node has started")
    }

    /// Whether its process is running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    fn stderr_path(&self, n: u32) -> PathBuf {
        self.log_dir.join(format!("{}.{n}.stderr", self.name))
    }

    fn stdout_path(&self, n: u32) -> PathBuf {
        self.log_dir.join(format!("{}.{n}.stdout", self.name))
    }

    /// The binary to run. A node under another uid may not reach the build directory
    /// (under /root, say), so it gets a link to the binary in the test's directory.
    fn bin(&self) -> Result<PathBuf> {
        let bin = servant_bin();
        if self.uid.is_none() {
            return Ok(bin);
        }
        let local = self.log_dir.join("servant");
        if !local.exists() && std::fs::hard_link(&bin, &local).is_err() {
            std::fs::copy(&bin, &local).context("copy the servant binary")?;
        }
        Ok(local)
    }

    /// The command line `servant run` gets.
    pub fn run_args(&self) -> Vec<String> {
        let mut args = vec![
            "run".to_string(),
            // No SSDP search leaves the machine from a test.
            "--no-upnp".into(),
            "--data-dir".into(),
            self.data_dir.display().to_string(),
            "--listen".into(),
            // A private network's node speaks TCP only (QUIC has no place for its key).
            if self.args.iter().any(|a| a == "--psk-file") {
                format!("/ip4/{h}/tcp/{p}", h = self.p2p_host, p = self.p2p_port)
            } else {
                format!(
                    "/ip4/{h}/tcp/{p},/ip4/{h}/udp/{p}/quic-v1",
                    h = self.p2p_host,
                    p = self.p2p_port
                )
            },
            "--api".into(),
            format!("{}:{}", self.api_host, self.api_port),
        ];
        // Every test node shares 127.0.0.1, which the per-IP cap would count as one
        // host: tests lift it to the total cap unless they test it.
        if !self.args.iter().any(|a| a == "--max-connections-per-ip") {
            let total = self
                .args
                .iter()
                .position(|a| a == "--max-connections")
                .and_then(|i| self.args.get(i + 1))
                .cloned()
                .unwrap_or_else(|| "256".into());
            args.extend(["--max-connections-per-ip".into(), total]);
        }
        args.extend(self.args.iter().cloned());
        args
    }

    /// Starts the process and waits until its API answers and it printed its PeerId.
    pub async fn start(&mut self) -> Result<()> {
        if self.is_running() {
            bail!("{} is already running", self.name);
        }
        self.starts += 1;
        let n = self.starts;
        let stdout = File::create(self.stdout_path(n))?;
        let stderr = File::create(self.stderr_path(n))?;
        let mut cmd = Command::new(self.bin()?);
        cmd.args(self.run_args())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .env("SERVANT_LOG_LEVEL", node_log_level())
            .env_remove("RUST_LOG");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(uid) = self.uid {
            use std::os::unix::process::CommandExt;
            std::fs::create_dir_all(&self.data_dir)?;
            std::os::unix::fs::chown(&self.data_dir, Some(uid), Some(uid))?;
            cmd.uid(uid).gid(uid);
        }
        self.child = Some(cmd.spawn().context("spawn servant")?);
        let stdout_path = self.stdout_path(n);
        let deadline = Instant::now() + Duration::from_secs(20);
        let peer_id = loop {
            // A process that exited will not start: fail at once with its stderr.
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                bail!(
                    "{} exited with {status} during start; stderr:\n{}",
                    self.name,
                    tail(&self.stderr_path(n), 30)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not start within 20 s; stderr:\n{}",
                    self.name,
                    tail(&self.stderr_path(n), 30)
                );
            }
            let text = std::fs::read_to_string(&stdout_path).unwrap_or_default();
            let id = text
                .lines()
                .find_map(|l| l.strip_prefix("PeerId: "))
                .map(|s| s.trim().to_string());
            if let Some(id) = id {
                if self.api.livez().await {
                    break id.parse::<PeerId>()?;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if let Some(old) = self.peer_id {
            if old != peer_id {
                bail!("{} changed PeerId from {old} to {peer_id}", self.name);
            }
        }
        self.peer_id = Some(peer_id);
        Ok(())
    }

    /// SIGKILL: no chance to save or say goodbye.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait; returns the exit status and how long the exit took.
    pub fn terminate(&mut self) -> Result<(ExitStatus, Duration)> {
        let mut child = self.child.take().ok_or_else(|| anyhow!("not running"))?;
        let started = Instant::now();
        // SAFETY: kill(2) on a child we own; at worst it fails with ESRCH.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = started + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok((status, started.elapsed()));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("{} did not exit within 15 s of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The current run's stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.stderr_path(self.starts)).unwrap_or_default()
    }
}

fn local_api(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// Finds `series` (name and labels exactly as printed) in exposition text.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        let value = rest.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// Deliveries of one subscription, in arrival order.
pub struct Subscription {
    rx: mpsc::UnboundedReceiver<Delivery>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscription {
    /// Waits for the next delivery.
    pub async fn next(&mut self, timeout: Duration) -> Option<Delivery> {
        tokio::time::timeout(timeout, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// Waits up to `timeout` for a delivery with envelope id `id`; returns it with
    /// everything that arrived before it.
    pub async fn wait_for(
        &mut self,
        id: &str,
        timeout: Duration,
    ) -> (Option<Delivery>, Vec<Delivery>) {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut before = Vec::new();
        while let Ok(Some(d)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            if d.envelope.id == id {
                return (Some(d), before);
            }
            before.push(d);
        }
        (None, before)
    }

    /// What has arrived and not been read yet, without waiting.
    pub fn drain_now(&mut self) -> Vec<Delivery> {
        let mut got = Vec::new();
        while let Ok(d) = self.rx.try_recv() {
            got.push(d);
        }
        got
    }

    /// Everything that arrives within `window`.
    pub async fn drain_for(&mut self, window: Duration) -> Vec<Delivery> {
        let deadline = tokio::time::Instant::now() + window;
        let mut got = Vec::new();
        while let Ok(Some(d)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            got.push(d);
        }
        got
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A set of nodes in one temporary directory.
pub struct Net {
    /// The nodes, in creation order.
    pub nodes: Vec<TestNode>,
    dir: Option<tempfile::TempDir>,
    http: reqwest::Client,
    passed: bool,
}

impl Default for Net {
    fn default() -> Self {
        Self::new()
    }
}

impl Net {
    /// An empty network.
    pub fn new() -> Net {
        let dir = tempfile::tempdir().expect("temp dir");
        // Nodes running under another uid create their data dirs in here.
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755));
        }
        Net {
            nodes: Vec::new(),
            dir: Some(dir),
            // No overall timeout: subscriptions stream for as long as a test runs.
            // Plain requests set their own (REQUEST_TIMEOUT).
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .build()
                .expect("http client"),
            passed: false,
        }
    }

    /// Marks the test as passed. A `Net` dropped without this (a panic, or an error
    /// returned with `?`) prints every node's log tail and keeps its files.
    pub fn pass(&mut self) {
        self.passed = true;
    }

    /// The temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("dir").path()
    }

    /// Adds a node (not started) and returns its index.
    pub fn add(&mut self, name: &str, args: &[String]) -> usize {
        let dir = self.dir().to_path_buf();
        let api_port = free_port();
        self.nodes.push(TestNode {
            name: name.to_string(),
            data_dir: dir.join(name),
            p2p_port: free_port(),
            api_port,
            peer_id: None,
            args: args.to_vec(),
            env: Vec::new(),
            api_host: "127.0.0.1".into(),
            p2p_host: "127.0.0.1".into(),
            uid: None,
            child: None,
            log_dir: dir,
            starts: 0,
            api: Api::new(
                name,
                &format!("http://{}", local_api(api_port)),
                None,
                self.http.clone(),
            ),
        });
        self.nodes.len() - 1
    }

    /// Adds and starts a node.
    pub async fn spawn(&mut self, name: &str, args: &[String]) -> Result<usize> {
        let i = self.add(name, args);
        self.nodes[i].start().await?;
        Ok(i)
    }
}

impl std::ops::Index<usize> for Net {
    type Output = TestNode;
    fn index(&self, i: usize) -> &TestNode {
        &self.nodes[i]
    }
}

impl std::ops::IndexMut<usize> for Net {
    fn index_mut(&mut self, i: usize) -> &mut TestNode {
        &mut self.nodes[i]
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        if !self.passed {
            for node in &self.nodes {
                for n in 1..=node.starts {
                    eprintln!(
                        "----- {} (run {n}) stderr, last lines -----\n{}",
                        node.name,
                        tail(&node.stderr_path(n), 40)
                    );
                }
            }
            if let Some(dir) = self.dir.take() {
                let kept = dir.keep();
                eprintln!("test files kept in {}", kept.display());
            }
        }
    }
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs `servant` with `args` to completion (for CLI and config tests). A command
/// still running after 20 s (a node that should have refused to start, say) is
/// killed and the test fails instead of hanging.
pub fn run_cli(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(servant_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("run servant");
    let pid = child.id();
    // Reading the pipes while waiting (wait_with_output) cannot take a timeout, so
    // it runs on a thread of its own and the test waits on the thread.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(output) => output.expect("collect servant's output"),
        Err(_) => {
            // SAFETY: kill(2) on our own child; at worst it already exited.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            panic!("`servant {}` still ran after 20 s", args.join(" "));
        }
    }
}

/// Decodes a streamed JSON-lines response into a channel, line by line as they
/// arrive; the channel closes when the stream ends or a line does not decode.
pub fn json_lines<T: serde::de::DeserializeOwned + Send + 'static>(
    response: reqwest::Response,
) -> mpsc::Receiver<T> {
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        let mut stream = response.bytes_stream();
        let mut buffer: Vec<u8> = Vec::new();
        while let Some(Ok(chunk)) = stream.next().await {
            buffer.extend_from_slice(&chunk);
            while let Some(pos) = buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=pos).collect();
                let Ok(item) = serde_json::from_slice(&line) else {
                    eprintln!("undecodable line: {}", String::from_utf8_lossy(&line));
                    return;
                };
                if tx.send(item).await.is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// Writes `len` pseudo-random bytes (from `seed`) to `path`, in pieces, and returns
/// their BLAKE3 hash.
pub fn random_file(path: &Path, len: u64, seed: u64) -> Result<blake3::Hash> {
    use rand::{RngCore, SeedableRng};
    use std::io::Write;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut file = std::io::BufWriter::new(File::create(path)?);
    let mut hasher = blake3::Hasher::new();
    let mut left = len;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        file.write_all(&buf[..n])?;
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    file.flush()?;
    Ok(hasher.finalize())
}

/// The BLAKE3 hash of a file's bytes.
pub fn hash_file(path: &Path) -> Result<blake3::Hash> {
    let mut hasher = blake3::Hasher::new();
    let mut file = File::open(path).with_context(|| format!("open {}", path.display()))?;
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hasher.finalize())
}

/// Whether this process runs as root (network namespaces, iptables).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether `program` runs (`program --version` exits 0).
pub fn has_program(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether this run must not skip anything (CI=true).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Skips (returns true) with a loud message when a prerequisite is missing, or fails
/// under CI, where a skip is a failure.
pub fn skip_unless(available: bool, what: &str) -> bool {
    if available {
        return false;
    }
    assert!(
        !in_ci(),
        "{what} is missing, and CI=true forbids skipping this test"
    );
    eprintln!("\n!!!!! SKIPPED: {what} is missing; this test did not run !!!!!\n");
    true
}

/// The log filter test nodes run with: `SERVANT_TEST_LOG_LEVEL` when set (to look inside
/// libp2p while chasing a failure), else the node's own debug lines.
fn node_log_level() -> String {
    std::env::var("SERVANT_TEST_LOG_LEVEL").unwrap_or_else(|_| "info,servant=debug".into())
}

#[cfg(test)]
mod tests {
    use super::parse_port_range;

    #[test]
    fn port_ranges_are_low_dash_high_above_the_privileged_ports() {
        assert_eq!(parse_port_range("19768-20768"), Some((19768, 20768)));
        assert_eq!(parse_port_range(" 2000 - 3000 "), Some((2000, 3000)));
        for bad in [
            "",
            "2000",
            "3000-2000",
            "2000-2000",
            "80-3000",
            "2000-70000",
            "a-b",
        ] {
            assert_eq!(parse_port_range(bad), None, "{bad:?}");
        }
    }
}
