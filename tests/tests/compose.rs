//! The compose lab (`deploy/compose/`) on this machine's Docker engine: a bootnode,
//! three super-peers, two LANs of peers behind NAT routers, and Prometheus. One lab is
//! brought up and every scenario runs against it in turn, printing what it checked;
//! when one fails, every container's log is kept.
//!
//! Needs root and Docker with docker-compose; skips loudly without them, and fails
//! under CI=true.

use std::{
    collections::{HashMap, HashSet},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use servant_tests::{
    compose::{self, ComposeLab, NODES},
    eventually, has_program, is_root, skip_unless, Api,
};

const TOPIC: &str = "lab";
const LAN_PEERS: [&str; 4] = ["peer-a1", "peer-a2", "peer-b1", "peer-b2"];

fn docker_works() -> bool {
    Command::new("docker")
        .arg("info")
        .output()
        .is_ok_and(|o| o.status.success())
        && has_program("docker-compose")
}

/// Publishes from `from` and checks that every node in `to` delivers it.
/// How long after a SIGKILL every connection to the dead process is gone at its
/// peers: a ping interval plus a ping timeout (10 s each), and some slack.
const DEAD_CONNECTIONS_GONE: Duration = Duration::from_secs(25);

async fn broadcast_reaches(lab: &ComposeLab, from: &str, to: &[&str], label: &str) -> Result<()> {
    let mut subscriptions = Vec::new();
    for name in to {
        subscriptions.push((*name, lab.api(name).subscribe(TOPIC).await?));
    }
    // The subscriptions are open before the message exists.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let body = format!("{label} from {from} at {:?}", Instant::now());
    let sent = lab.api(from).publish(TOPIC, label, &body).await?;
    for (name, mut subscription) in subscriptions {
        if *name == *from {
            continue;
        }
        let (got, _) = subscription
            .wait_for(&sent.envelope.id, Duration::from_secs(30))
            .await;
        got.with_context(|| format!("{name} did not deliver {label:?} from {from}"))?;
    }
    println!(
        "checked: a broadcast from {from} ({label}) reached {}",
        to.join(", ")
    );
    Ok(())
}

async fn all_ready(lab: &ComposeLab, nodes: &[&str], timeout: Duration) -> Result<()> {
    for name in nodes {
        let api = lab.api(name);
        eventually(timeout, &format!("{name} ready"), || {
            let api = api.clone();
            async move { Ok((api.readyz().await? == 200).then_some(())) }
        })
        .await?;
    }
    Ok(())
}

/// Every LAN peer is private and holds at least `min` accepted relay reservations.
async fn reservations(lab: &ComposeLab, peer: &str) -> Result<Vec<String>> {
    let reach = lab.api(peer).reach().await?;
    Ok(reach
        .reservations
        .iter()
        .filter(|r| r.accepted)
        .map(|r| r.relay.clone())
        .collect())
}

async fn ids(lab: &ComposeLab) -> Result<HashMap<String, String>> {
    let mut ids = HashMap::new();
    for (name, _) in NODES {
        ids.insert(lab.api(name).status().await?.peer_id, name.to_string());
    }
    Ok(ids)
}

async fn scenario_forms(lab: &ComposeLab) -> Result<()> {
    let names: Vec<&str> = NODES.iter().map(|(n, _)| *n).collect();
    all_ready(lab, &names, Duration::from_secs(120)).await?;
    println!(
        "checked: all {} nodes report ready (/readyz 200)",
        names.len()
    );
    for peer in LAN_PEERS {
        let api = lab.api(peer);
        let reach = eventually(
            Duration::from_secs(120),
            &format!("{peer} private with a reservation"),
            || {
                let api = api.clone();
                async move {
                    let reach = api.reach().await?;
                    let held = reach.reservations.iter().filter(|r| r.accepted).count();
                    Ok((reach.reachability.as_str() == "private" && held >= 1).then_some(reach))
                }
            },
        )
        .await?;
        println!(
            "checked: {peer} is {} ({}) with {} relay reservation(s)",
            reach.reachability.as_str(),
            reach.reason,
            reach.reservations.len()
        );
    }
    for name in ["bootnode", "super1", "super2", "super3"] {
        let status = lab.api(name).status().await?;
        if status.role != "super" {
            bail!("{name} is {} rather than a super-peer", status.role);
        }
    }
    println!("checked: the bootnode and super1-3 are super-peers");
    Ok(())
}

async fn scenario_file(lab: &ComposeLab) -> Result<()> {
    lab.exec(
        "peer-a1",
        &[
            "sh",
            "-c",
            "head -c 3145728 /dev/urandom > /data/lab-file.bin",
        ],
    )?;
    let info = lab
        .api("peer-a1")
        .share(std::path::Path::new("/data/lab-file.bin"))
        .await?;
    let events = lab
        .api("peer-b1")
        .fetch(&info.id.to_hex(), std::path::Path::new("/data/fetched.bin"))
        .await?;
    let last = events.last().context("no fetch events")?;
    if !matches!(last, servant::fetch::Progress::Finished { .. }) {
        bail!("fetch from peer-b1 ended with {last:?}");
    }
    let sum = |service: &str, path: &str| -> Result<String> {
        let out = lab.exec(service, &["sha256sum", path])?;
        Ok(out
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string())
    };
    let (a, b) = (
        sum("peer-a1", "/data/lab-file.bin")?,
        sum("peer-b1", "/data/fetched.bin")?,
    );
    if a != b {
        bail!("fetched file differs: {a} vs {b}");
    }
    println!("checked: a 3 MiB file shared by peer-a1 (LAN a) was fetched by peer-b1 (LAN b), byte-identical ({a})");
    Ok(())
}

async fn scenario_prometheus(lab: &ComposeLab) -> Result<()> {
    let targets = eventually(Duration::from_secs(60), "every target up", || async {
        let data = lab.prometheus("/api/v1/targets").await?;
        let active = data["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let up = active
            .iter()
            .filter(|t| t["health"] == "up" && t["lastError"].as_str().unwrap_or("").is_empty())
            .count();
        Ok((active.len() == NODES.len() && up == NODES.len()).then_some(active))
    })
    .await?;
    println!(
        "checked: Prometheus has {} targets, every one up with no scrape error",
        targets.len()
    );
    for (name, _) in NODES {
        let api = lab.api(name);
        let instance = format!("{name}:5100");
        eventually(
            Duration::from_secs(60),
            &format!("{name}'s peer count in Prometheus"),
            || {
                let api = api.clone();
                let instance = instance.clone();
                async move {
                    let query = format!(
                        "/api/v1/query?query=servant_connected_peers{{instance=%22{instance}%22}}"
                    );
                    let data = lab.prometheus(&query).await?;
                    let scraped: f64 = data["result"][0]["value"][1]
                        .as_str()
                        .and_then(|v| v.parse().ok())
                        .context("no sample")?;
                    let reported = api.status().await?.connected_peers as f64;
                    Ok((scraped == reported).then_some(()))
                }
            },
        )
        .await?;
    }
    println!("checked: every node's servant_connected_peers in Prometheus matches its /v1/status");
    Ok(())
}

async fn scenario_super_peer_lost(lab: &ComposeLab) -> Result<()> {
    let ids = ids(lab).await?;
    let held = reservations(lab, "peer-a1").await?;
    let relay = held
        .iter()
        .find_map(|id| ids.get(id).filter(|n| n.starts_with("super")))
        .or_else(|| held.iter().find_map(|id| ids.get(id)))
        .context("peer-a1 holds no reservation on a lab node")?
        .clone();
    let relay_id = ids
        .iter()
        .find(|(_, n)| **n == relay)
        .map(|(id, _)| id.clone())
        .unwrap_or_default();
    let holders: Vec<&str> = {
        let mut v = Vec::new();
        for peer in LAN_PEERS {
            if reservations(lab, peer).await?.contains(&relay_id) {
                v.push(peer);
            }
        }
        v
    };
    lab.compose(&["stop", &relay])?;
    println!(
        "stopped {relay}, which {} held reservations on",
        holders.join(", ")
    );
    for peer in &holders {
        let api = lab.api(peer);
        let relay_id = relay_id.clone();
        let now = eventually(
            Duration::from_secs(90),
            &format!("{peer} re-reserves"),
            || {
                let api = api.clone();
                let relay_id = relay_id.clone();
                async move {
                    let reach = api.reach().await?;
                    let accepted: Vec<String> = reach
                        .reservations
                        .iter()
                        .filter(|r| r.accepted)
                        .map(|r| r.relay.clone())
                        .collect();
                    Ok((!accepted.contains(&relay_id) && accepted.len() >= 2).then_some(accepted))
                }
            },
        )
        .await?;
        let names: Vec<&str> = now
            .iter()
            .filter_map(|id| ids.get(id).map(String::as_str))
            .collect();
        println!(
            "checked: {peer} now holds reservations on {}",
            names.join(", ")
        );
    }
    let running: Vec<&str> = NODES
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| *n != relay)
        .collect();
    broadcast_reaches(lab, "peer-b2", &running, "after losing a super-peer").await?;
    lab.compose(&["start", &relay])?;
    all_ready(lab, &[relay.as_str()], Duration::from_secs(60)).await?;
    Ok(())
}

async fn peers_of(api: &Api) -> Result<HashSet<String>> {
    Ok(api.peers().await?.into_iter().map(|p| p.peer_id).collect())
}

async fn scenario_partition(lab: &ComposeLab) -> Result<()> {
    let ids = ids(lab).await?;
    let lan_b: HashSet<String> = ids
        .iter()
        .filter(|(_, n)| n.starts_with("peer-b"))
        .map(|(id, _)| id.clone())
        .collect();
    let wan = lab.network("wan");
    let router = lab.container("router-b");
    compose::run(Command::new("docker").args(["network", "disconnect", &wan, &router]))?;
    println!("partitioned: router-b (LAN b) disconnected from the wan");
    for peer in ["peer-b1", "peer-b2"] {
        let api = lab.api(peer);
        let lan_b = lan_b.clone();
        eventually(
            Duration::from_secs(90),
            &format!("{peer} loses the far side"),
            || {
                let api = api.clone();
                let lan_b = lan_b.clone();
                async move { Ok(peers_of(&api).await?.is_subset(&lan_b).then_some(())) }
            },
        )
        .await?;
    }
    println!("checked: LAN b's peers see only each other during the partition");
    compose::run(Command::new("docker").args([
        "network",
        "connect",
        "--ip",
        "172.29.0.22",
        &wan,
        &router,
    ]))?;
    println!("healed: router-b reconnected");
    for peer in ["peer-b1", "peer-b2"] {
        let api = lab.api(peer);
        let lan_b = lan_b.clone();
        eventually(
            Duration::from_secs(120),
            &format!("{peer} rejoins the far side"),
            || {
                let api = api.clone();
                let lan_b = lan_b.clone();
                async move {
                    let peers = peers_of(&api).await?;
                    Ok((!peers.is_subset(&lan_b)).then_some(()))
                }
            },
        )
        .await?;
    }
    println!("checked: the halves merged again by themselves");
    let all: Vec<&str> = NODES.iter().map(|(n, _)| *n).collect();
    broadcast_reaches(lab, "peer-b1", &all, "after the heal").await?;
    broadcast_reaches(lab, "bootnode", &all, "after the heal").await?;
    Ok(())
}

async fn scenario_restarts(lab: &ComposeLab) -> Result<()> {
    let all: Vec<&str> = NODES.iter().map(|(n, _)| *n).collect();
    for name in &all {
        let before = lab.api(name).status().await?.peer_id;
        lab.compose(&["restart", name])?;
        all_ready(lab, &[name], Duration::from_secs(90)).await?;
        let after = lab.api(name).status().await?.peer_id;
        if before != after {
            bail!("{name} came back as {after}, was {before}");
        }
        // As an operator's rolling restart does, the next node goes only once this
        // one has rejoined: restarting every super-peer within seconds can leave a
        // NATed peer without any connection for a moment (each of its relays and its
        // bootnode went away in turn), which is not what this checks. Every node
        // must be connected again within 30 s.
        let rejoined = Instant::now();
        eventually(
            Duration::from_secs(30),
            &format!("every node connected again after {name} restarted"),
            || async {
                for node in &all {
                    if lab.api(node).status().await?.connected_peers == 0 {
                        return Ok(None);
                    }
                }
                Ok(Some(()))
            },
        )
        .await?;
        println!(
            "checked: {name} restarted with its PeerId; every node connected {:.1} s after it was ready",
            rejoined.elapsed().as_secs_f64()
        );
    }
    broadcast_reaches(lab, "peer-a2", &all, "after the rolling restart").await?;

    let victim = "super2";
    let before = lab.api(victim).status().await?.peer_id;
    let pid = lab.pid(victim)?;
    let killed = Instant::now();
    compose::run(Command::new("kill").args(["-KILL", &pid.to_string()]))?;
    println!("killed {victim} (pid {pid}) with SIGKILL");
    let api = lab.api(victim);
    eventually(Duration::from_secs(90), &format!("{victim} back"), || {
        let api = api.clone();
        async move { Ok((lab.pid(victim)? != pid && api.readyz().await? == 200).then_some(())) }
    })
    .await?;
    let after = api.status().await?.peer_id;
    if before != after {
        bail!("{victim} came back as {after}, was {before}");
    }
    // The killed process sent no goodbye: its QUIC connections stay open at the other
    // end until ping finds them dead (a ping every 10 s, 10 s to answer) or QUIC's
    // idle timeout does, and gossipsub may write a broadcast down one of them
    // meanwhile. The promise starts once they are gone: 25 s after the kill.
    let settle = DEAD_CONNECTIONS_GONE.saturating_sub(killed.elapsed());
    tokio::time::sleep(settle).await;
    println!(
        "waited {:.1} s more for the killed {victim}'s connections to be found dead",
        settle.as_secs_f64()
    );
    broadcast_reaches(lab, "peer-b1", &all, "after the SIGKILL").await?;
    println!("checked: {victim} came back after SIGKILL with its PeerId and rejoined");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compose_lab() -> Result<()> {
    if skip_unless(is_root(), "root (the lab's routers and the tests' SIGKILL)")
        || skip_unless(
            docker_works(),
            "a running Docker engine with docker-compose",
        )
    {
        return Ok(());
    }
    let started = Instant::now();
    compose::build_images()?;
    println!("images built in {:.0?}", started.elapsed());
    let mut lab = ComposeLab::up("servant-ci")?;
    let all: Vec<&str> = NODES.iter().map(|(n, _)| *n).collect();

    scenario_forms(&lab).await?;
    broadcast_reaches(&lab, "peer-a1", &all, "from a NATed peer").await?;
    scenario_file(&lab).await?;
    scenario_prometheus(&lab).await?;
    scenario_super_peer_lost(&lab).await?;
    scenario_partition(&lab).await?;
    scenario_restarts(&lab).await?;

    lab.pass();
    println!("compose lab passed in {:.0?}", started.elapsed());
    Ok(())
}

/// Every servant service's environment in the compose file, as `docker-compose config`
/// resolves it, is a valid config: a misspelt key or value fails here, not in a
/// deployment.
#[test]
fn compose_configs_are_valid() -> Result<()> {
    if skip_unless(has_program("docker-compose"), "docker-compose") {
        return Ok(());
    }
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/compose/docker-compose.yml");
    let yaml = compose::run(
        Command::new("docker-compose")
            .arg("-f")
            .arg(&file)
            .arg("config")
            .env("SERVANT_API_TOKEN", "0123456789abcdef")
            .env(
                "BOOTNODE_ID",
                "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN",
            )
            .env(
                "SUPER1_ID",
                "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN",
            ),
    )?;
    // docker-compose 1.x prints YAML only; its own Python has the YAML parser.
    let python3 = if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let mut python = Command::new(python3)
        .args([
            "-c",
            "import sys, json, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(python.stdin.as_mut().context("stdin")?, yaml.as_bytes())?;
    let out = python.wait_with_output()?;
    let config: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "docker-compose config as JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    let services = config["services"].as_object().context("no services")?;
    let mut checked = 0;
    for (name, service) in services {
        let Some(env) = service["environment"].as_object() else {
            continue;
        };
        if !env.keys().any(|k| k.starts_with("SERVANT_")) {
            continue;
        }
        let vars: Vec<(String, String)> = env
            .iter()
            .filter(|(k, _)| k.starts_with("SERVANT_"))
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string()),
                )
            })
            .collect();
        let env_refs: Vec<(&str, &str)> =
            vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let out = servant_tests::run_cli(&["run", "--print-config"], &env_refs);
        if !out.status.success() {
            bail!(
                "{name}'s environment is not a valid config: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        checked += 1;
        println!("checked: compose service {name}'s SERVANT_* environment is a valid config");
    }
    if checked < NODES.len() {
        bail!("only {checked} servant services found in the compose file");
    }
    Ok(())
}
