//! Interop with another libp2p implementation: a py-libp2p peer
//! (tests/py/interop_peer.py, in the venv tests/setup/python.sh makes) joins a
//! Servant node through its bootnode multiaddr over TCP with noise and yamux,
//! identifies and pings it, and exchanges a signed broadcast envelope with it on a
//! gossipsub topic in both directions.

use std::{
    fs::File,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use servant_tests::{eventually, skip_unless, tail, Net};
use tokio::sync::mpsc;

const TOPIC: &str = "interop-py";
const PY_TITLE: &str = "py-libp2p";
const PY_BODY: &str = "hello from py-libp2p";
const NODE_TITLE: &str = "servant";
const NODE_BODY: &str = "hello from servant";
/// The Python peer's own deadline; the test's waits all end well before it.
const PY_TIMEOUT_SECS: u32 = 45;
const STEP_TIMEOUT: Duration = Duration::from_secs(15);

fn py_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("py")
}

fn venv_python() -> PathBuf {
    py_dir().join(".venv/bin/python")
}

/// The Python peer's process and its stdout events (one JSON object a line).
struct PyPeer {
    child: Child,
    events: mpsc::UnboundedReceiver<Value>,
    /// Every event read so far, for failure messages.
    seen: Vec<Value>,
    stderr: PathBuf,
}

impl PyPeer {
    fn spawn(args: &[String], stderr: PathBuf) -> Result<PyPeer> {
        let mut child = Command::new(venv_python())
            .arg(py_dir().join("interop_peer.py"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr)?)
            .env("PYTHONUNBUFFERED", "1")
            .spawn()
            .context("spawn the py-libp2p peer")?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, events) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "event": "unparsed", "line": line }));
                if tx.send(value).is_err() {
                    return;
                }
            }
        });
        Ok(PyPeer {
            child,
            events,
            seen: Vec::new(),
            stderr,
        })
    }

    /// Waits for an event named `name` that satisfies `accept`. Fails, showing
    /// everything the peer said, on timeout or once the peer has finished.
    async fn wait(
        &mut self,
        name: &str,
        timeout: Duration,
        accept: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let event = match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) => event,
                Ok(None) => bail!(
                    "the py-libp2p peer exited before its `{name}` event\n{}",
                    self.report()
                ),
                Err(_) => bail!(
                    "no `{name}` event from the py-libp2p peer within {timeout:?}\n{}",
                    self.report()
                ),
            };
            self.seen.push(event.clone());
            let kind = event["event"].as_str().unwrap_or_default();
            if kind == "error" {
                println!("py-libp2p peer reported: {event}");
            }
            if kind == name && accept(&event) {
                return Ok(event);
            }
            if kind == "done" {
                bail!(
                    "the py-libp2p peer finished before its `{name}` event\n{}",
                    self.report()
                );
            }
        }
    }

    /// Waits for the process to exit on its own.
    async fn exit_status(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("the py-libp2p peer did not exit within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn report(&self) -> String {
        let events: Vec<String> = self.seen.iter().map(Value::to_string).collect();
        format!(
            "events so far:\n  {}\npy-libp2p stderr ({}), last lines:\n{}",
            events.join("\n  "),
            self.stderr.display(),
            tail(&self.stderr, 30)
        )
    }
}

impl Drop for PyPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn str_field<'a>(event: &'a Value, field: &str) -> Result<&'a str> {
    event[field]
        .as_str()
        .ok_or_else(|| anyhow!("event has no string `{field}`: {event}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_libp2p_peer_identifies_pings_and_exchanges_broadcasts() -> Result<()> {
    if skip_unless(
        venv_python().exists(),
        "py-libp2p venv (run tests/setup/python.sh)",
    ) {
        return Ok(());
    }
    let started = Instant::now();
    let mut net = Net::new();
    let node = net.spawn("servant", &[]).await?;
    let node_id = net[node].id().to_string();
    // Subscribe first: the peer then learns the node's subscription as it connects.
    let mut subscription = net[node].subscribe(TOPIC).await?;

    let mut py = PyPeer::spawn(
        &[
            "--bootnode".into(),
            net[node].addr().to_string(),
            "--topic".into(),
            TOPIC.into(),
            "--title".into(),
            PY_TITLE.into(),
            "--body".into(),
            PY_BODY.into(),
            "--expect-body".into(),
            NODE_BODY.into(),
            "--timeout".into(),
            PY_TIMEOUT_SECS.to_string(),
        ],
        net.dir().join("py-peer.stderr"),
    )?;

    let hello = py.wait("started", STEP_TIMEOUT, |_| true).await?;
    let py_id = str_field(&hello, "peer_id")?.to_string();
    let py_agent = str_field(&hello, "agent_version")?.to_string();
    println!(
        "py-libp2p peer {py_id} ({py_agent}, gossipsub {}) started after {:?}",
        hello["gossipsub_protocols"],
        started.elapsed()
    );

    // Connection: TCP with noise and yamux, the only upgrades the node offers on TCP.
    let connected = py.wait("connected", STEP_TIMEOUT, |_| true).await?;
    assert_eq!(connected["peer_id"], node_id.as_str(), "{connected}");
    assert_eq!(connected["muxer"], "Yamux", "{connected}");
    println!(
        "checked: py-libp2p dialed the bootnode multiaddr in {} ms (security {}, muxer {})",
        connected["ms"], connected["security"], connected["muxer"]
    );

    // Identify, as the Python side sees the node.
    let identify = py.wait("identify", STEP_TIMEOUT, |_| true).await?;
    assert_eq!(identify["protocol_version"], "/servant/1.0.0", "{identify}");
    let node_agent = str_field(&identify, "agent_version")?;
    assert!(node_agent.starts_with("servant/"), "{identify}");
    let protocols: Vec<&str> = identify["protocols"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert!(protocols.contains(&"/ipfs/ping/1.0.0"), "{identify}");
    assert!(
        protocols.iter().any(|p| p.starts_with("/meshsub/")),
        "{identify}"
    );
    println!(
        "checked: py-libp2p identified the node: protocol_version {}, agent {node_agent}, protocols {protocols:?}",
        identify["protocol_version"]
    );

    // Ping, from the Python side.
    let ping = py.wait("ping", STEP_TIMEOUT, |_| true).await?;
    let rtt = ping["rtt_ms"]
        .as_f64()
        .ok_or_else(|| anyhow!("no rtt_ms: {ping}"))?;
    assert!(rtt > 0.0 && rtt < 1_000.0, "{ping}");
    println!(
        "checked: py-libp2p pinged the node: rtt {rtt} ms (all {}, py-libp2p's own whole-ms figures {})",
        ping["rtts_ms"], ping["library_rtt_ms"]
    );

    // The node's view: identify from the Python peer, and the node's own pings.
    let view = eventually(
        STEP_TIMEOUT,
        "the node to list the py-libp2p peer with its identify info and a ping rtt",
        || {
            let node = &net[node];
            let py_id = py_id.clone();
            async move {
                let peers = node.peers().await?;
                Ok(peers.into_iter().find(|p| {
                    p.peer_id == py_id
                        && p.agent.is_some()
                        && p.protocol_version.is_some()
                        && p.rtt_ms.is_some()
                }))
            }
        },
    )
    .await;
    let view = match view {
        Ok(v) => v,
        Err(e) => {
            println!("node peers: {:?}", net[node].peers().await);
            return Err(e);
        }
    };
    let agent = view.agent.as_deref().unwrap_or_default();
    assert!(agent.starts_with("py-libp2p/"), "{view:?}");
    assert_eq!(agent, py_agent, "{view:?}");
    let version = view.protocol_version.as_deref().unwrap_or_default();
    assert!(!version.is_empty(), "{view:?}");
    println!(
        "checked: the node lists {py_id}: agent {agent}, protocol_version {version}, rtt {:?} ms, direction {}",
        view.rtt_ms, view.direction
    );

    // Python -> node: a signed envelope published by the py peer reaches the
    // node's subscriber, with the py peer as signed author and origin.
    let mesh = py.wait("mesh", STEP_TIMEOUT, |_| true).await?;
    println!(
        "py-libp2p joined the mesh of {TOPIC:?} with the node over {} after {} ms",
        mesh["protocol"], mesh["ms"]
    );
    let published = py.wait("published", STEP_TIMEOUT, |_| true).await?;
    let py_envelope = &published["envelope"];
    let py_envelope_id = str_field(py_envelope, "id")?.to_string();
    let (delivery, other) = subscription.wait_for(&py_envelope_id, STEP_TIMEOUT).await;
    let Some(delivery) = delivery else {
        let rejected = net[node].metrics().await.unwrap_or_default();
        let rejected: Vec<&str> = rejected
            .lines()
            .filter(|l| l.starts_with("servant_messages_"))
            .collect();
        bail!(
            "the node's subscriber never got the py-libp2p broadcast {py_envelope}; \
             got {other:?}; node metrics: {rejected:?}\n{}",
            py.report()
        );
    };
    assert_eq!(delivery.topic, TOPIC);
    assert_eq!(delivery.envelope.title, PY_TITLE);
    assert_eq!(delivery.envelope.body, PY_BODY);
    assert_eq!(delivery.envelope.origin, py_id);
    assert_eq!(delivery.from.as_deref(), Some(py_id.as_str()));
    assert_eq!(
        serde_json::to_value(&delivery.envelope)?,
        *py_envelope,
        "the envelope arrived unchanged"
    );
    let received = net[node]
        .metric(&format!(
            "servant_messages_received_total{{topic=\"{TOPIC}\"}}"
        ))
        .await?;
    assert_eq!(received, 1.0, "one broadcast received from py-libp2p");
    let metrics = net[node].metrics().await?;
    let rejections: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("servant_messages_rejected_total{"))
        .collect();
    assert!(rejections.is_empty(), "node rejected: {rejections:?}");
    println!(
        "checked: the py-libp2p broadcast {} reached the node's subscriber in {} ms, signed by and from {py_id}, no rejections",
        &py_envelope_id[..12],
        delivery.received_at.saturating_sub(delivery.envelope.time)
    );

    // Node -> Python: publish at the node (retried until the node sees the py
    // peer's subscription), and the py peer receives it, signed and with a valid id.
    let sent = eventually(
        STEP_TIMEOUT,
        "the node to publish to the py-libp2p peer",
        || async { Ok(Some(net[node].publish(TOPIC, NODE_TITLE, NODE_BODY).await?)) },
    )
    .await?;
    let sent_id = sent.envelope.id.clone();
    let message = py
        .wait("message", STEP_TIMEOUT, |m| {
            m["envelope"]["id"].as_str() == Some(sent_id.as_str())
        })
        .await?;
    assert_eq!(message["from"], node_id.as_str(), "{message}");
    assert_eq!(message["own"], false, "{message}");
    assert_eq!(message["signed"], true, "{message}");
    assert_eq!(message["id_ok"], true, "{message}");
    assert_eq!(message["origin_matches_from"], true, "{message}");
    assert_eq!(message["envelope"]["body"], NODE_BODY, "{message}");
    assert_eq!(
        message["envelope"],
        serde_json::to_value(&sent.envelope)?,
        "{message}"
    );
    println!(
        "checked: the node's broadcast {} reached py-libp2p ({} ms after its time), signed by {node_id}, id recomputed in Python",
        &sent_id[..12],
        message["age_ms"]
    );

    let done = py.wait("done", STEP_TIMEOUT, |_| true).await?;
    assert_eq!(done["ok"], true, "{}", py.report());
    let status = py.exit_status(Duration::from_secs(10)).await?;
    assert!(status.success(), "py-libp2p peer exited with {status}");
    println!(
        "checked: the py-libp2p peer finished cleanly ({}, {} s in Python); test took {:?}",
        done["reason"],
        done["seconds"],
        started.elapsed()
    );

    drop(subscription);
    net.pass();
    Ok(())
}
