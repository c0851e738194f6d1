//! `nat`: hole punching measured in the NAT lab, Servant against a bare rust-libp2p
//! baseline in the same run.
//!
//! Every trial is a fresh lab (new namespaces, so clean connection tracking): one
//! public relay and two peers behind routers of the pairing's NAT types, all on one
//! transport (TCP or QUIC). The second peer reserves on the relay, the first dials
//! it through the relay, and DCUtR tries to make the connection direct. Each trial
//! records success and the time from the relayed connection to the direct one, as
//! each implementation measures it itself. Servant's nodes are forced to their
//! roles (`--role super` / `--role peer`) so the trial measures hole punching, not
//! reachability probing.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use servant_tests::natlab::{Lab, Nat};

use crate::{
    nat_node::Outcome,
    nat_path::{self, CriticalPath, TrialPath},
    report,
    stats::{self, Difference},
};

/// The benchmark's parameters.
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
pub struct NatParams {
    /// Trials per pairing, transport and implementation.
    #[arg(long, default_value_t = 30)]
    pub trials: usize,
    /// Only these transports (tcp, quic).
    #[arg(long, value_delimiter = ',', default_value = "tcp,quic")]
    pub transports: Vec<String>,
    /// Only these pairings (e.g. `full-cone/address-restricted`) [default: all].
    #[arg(long, value_delimiter = ',')]
    #[serde(default)]
    pub pairings: Vec<String>,
    /// Also run Servant's peers over a bare relay and bare peers over Servant's relay,
    /// to tell whether a gap lies at the relay or at the peers.
    #[arg(long)]
    #[serde(default)]
    pub mixed: bool,
    /// Milliseconds each NAT router holds every packet it forwards, either way
    /// (`lab.sh delay`): peer to relay then takes 2 x this per round trip, peer to
    /// peer 4 x. 0 (the default) leaves the lab at loopback speed, where CPU time
    /// decides.
    #[arg(long, default_value_t = 0.0)]
    #[serde(default)]
    pub delay_ms: f64,
    /// Also run the baseline a second time, as a cell of its own ("baseline, again"),
    /// and compare it with the first like Servant: what two runs of the same code
    /// differ by in this lab and run, so the noise the target must tell apart is
    /// measured, not assumed.
    #[arg(long)]
    #[serde(default)]
    pub calibrate: bool,
    /// How much slower than the baseline's median, in percent of it, still counts as
    /// "no worse": Servant passes when the upper end of the 95% interval of the
    /// medians' difference is within it.
    #[arg(long, default_value_t = 5.0)]
    #[serde(default = "default_margin_pct")]
    pub margin_pct: f64,
    /// Also run another build of `servant` (this path) as an implementation of its
    /// own ("servant, other build"), taking its turns with the others and compared
    /// with the baseline like Servant: a change measured against the build before
    /// it in one run.
    #[arg(long)]
    #[serde(default)]
    pub other_servant: Option<PathBuf>,
    /// Capture every trial's packets on the public segment into this directory
    /// (tcpdump, one pcap per port of the public bridge: `<trial>-relay.pcap`,
    /// `-ra.pcap`, `-rb.pcap`, beside `<trial>.json` with the trial's outcome). The
    /// captures start, and are waited for, before the relay does, so a DCUtR exchange
    /// can be timed hop by hop from packet timestamps with no logging in the nodes.
    #[arg(long)]
    #[serde(default)]
    pub capture: Option<PathBuf>,
}

fn default_margin_pct() -> f64 {
    5.0
}

/// One cell: a pairing, a transport, an implementation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cell {
    /// `port-restricted/port-restricted` or `symmetric/port-restricted`.
    pub pairing: String,
    /// `tcp` or `quic`.
    pub transport: String,
    /// `servant`, `baseline`, or (with `--mixed`) `servant peers, bare relay` and
    /// `bare peers, servant relay`.
    pub implementation: String,
    /// Trials run.
    pub trials: usize,
    /// Trials that ended with a direct connection.
    pub successes: usize,
    /// Trials that could not even set up the relayed connection.
    pub setup_failures: usize,
    /// Median milliseconds from relayed to direct, over successes.
    pub median_ms: Option<f64>,
    /// Median milliseconds from relayed to the direct dial (the DCUtR exchange), over
    /// successes where the dialer saw its dial.
    #[serde(default)]
    pub median_dial_ms: Option<f64>,
    /// Successes by the attempt that succeeded: the first entry counts attempt 1,
    /// the second attempt 2, the third attempt 3; successes whose reporting peer did
    /// not make the winning dial are in none.
    #[serde(default)]
    pub successes_by_attempt: Vec<usize>,
    /// Every trial's outcome.
    pub outcomes: Vec<Outcome>,
    /// With `--capture`: each successful trial's relayed → dial and dial → direct by
    /// who spent them, from its packets (`nat_path`).
    #[serde(default)]
    pub paths: Vec<TrialPath>,
}

/// One implementation's time to a direct connection against the baseline's, in one
/// pairing and transport.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    /// The pairing.
    pub pairing: String,
    /// The transport.
    pub transport: String,
    /// The implementation compared (`servant`, or `baseline, again`).
    pub implementation: String,
    /// Its median minus the baseline's, relayed to direct, over successes, with the
    /// 95% bootstrap interval, in ms.
    pub difference_ms: Difference,
    /// The most it may be slower and still count as no worse: `margin_pct` of the
    /// baseline's median, in ms.
    pub margin_ms: f64,
    /// The interval's upper end is within the margin.
    pub no_worse: bool,
}

/// The report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NatReport {
    /// The parameters.
    pub params: NatParams,
    /// Every cell.
    pub cells: Vec<Cell>,
    /// Servant (and, with `--calibrate`, the baseline's second run) against the
    /// baseline, cell by cell.
    #[serde(default)]
    pub comparisons: Vec<Comparison>,
    /// Whether every target was met.
    pub all_targets_met: bool,
}

/// Seconds a trial waits for the hole punch's outcome; successes take milliseconds,
/// and a pairing where it is impossible need not be watched for longer.
pub const OUTCOME_WAIT: u64 = 15;
/// The API port of every Servant node in a trial (each has its own namespace).
const API_PORT: u16 = 5100;

const PAIRINGS: [(&str, Nat, Nat, bool); 4] = [
    (
        "port-restricted/port-restricted",
        Nat::PortRestricted,
        Nat::PortRestricted,
        true,
    ),
    (
        "symmetric/port-restricted",
        Nat::Symmetric,
        Nat::PortRestricted,
        false,
    ),
    // Filtering that lets the other side in: possible. The first peer dials, the
    // second reserves; with a symmetric NAT the symmetric side's dial is what gets
    // through the full cone.
    (
        "full-cone/address-restricted",
        Nat::FullCone,
        Nat::AddressRestricted,
        true,
    ),
    ("symmetric/full-cone", Nat::Symmetric, Nat::FullCone, true),
];

/// The pairings `params` selects, or every one.
fn selected(
    params: &NatParams,
) -> impl Iterator<Item = &'static (&'static str, Nat, Nat, bool)> + '_ {
    PAIRINGS.iter().filter(|(name, ..)| {
        params.pairings.is_empty() || params.pairings.iter().any(|p| p == name)
    })
}

fn listen(transport: &str) -> String {
    match transport {
        "quic" => "/ip4/0.0.0.0/udp/4001/quic-v1".into(),
        _ => "/ip4/0.0.0.0/tcp/4001".into(),
    }
}

fn relay_addr(transport: &str) -> String {
    listen(transport).replace("0.0.0.0", &nat_path::RELAY.to_string())
}

/// Waits for a file to appear with content.
async fn read_when_ready(path: &Path, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if !text.trim().is_empty() {
                return Ok(text.trim().to_string());
            }
        }
        if Instant::now() >= deadline {
            bail!("{} never appeared", path.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn build_lab(dir: &Path, a: Nat, b: Nat, delay_ms: f64) -> Result<(Lab, String, String, String)> {
    let mut lab = Lab::new(dir)?;
    let relay = lab.host("relay", &nat_path::RELAY.to_string())?;
    let pa = lab.natted_peer("ra", "pa", &nat_path::DIALER.to_string(), 1, a)?;
    let pb = lab.natted_peer("rb", "pb", &nat_path::LISTENER.to_string(), 2, b)?;
    if delay_ms > 0.0 {
        lab.delay("ra", delay_ms)?;
        lab.delay("rb", delay_ms)?;
    }
    Ok((lab, relay, pa, pb))
}

/// Who runs a trial's relay, and who its two peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mix {
    servant_relay: bool,
    servant_peers: bool,
    /// Servant's nodes run `--other-servant`, not the build beside this binary.
    other_build: bool,
}

impl Mix {
    /// The implementations the bench compares, and (with `--mixed`) the two halves of
    /// each combined with the other's, which say whether a gap lies at the relay or at
    /// the peers.
    const ALL: [(&'static str, Mix); 4] = [
        (
            "servant",
            Mix {
                servant_relay: true,
                servant_peers: true,
                other_build: false,
            },
        ),
        (
            "baseline",
            Mix {
                servant_relay: false,
                servant_peers: false,
                other_build: false,
            },
        ),
        (
            "servant peers, bare relay",
            Mix {
                servant_relay: false,
                servant_peers: true,
                other_build: false,
            },
        ),
        (
            "bare peers, servant relay",
            Mix {
                servant_relay: true,
                servant_peers: false,
                other_build: false,
            },
        ),
    ];
}

/// Starts the relay on `relay` and returns its full address (with `/p2p`).
async fn start_relay(
    lab: &mut Lab,
    dir: &Path,
    relay: &str,
    transport: &str,
    servant: Option<&Path>,
    wait_for_api: bool,
) -> Result<String> {
    let Some(bin) = servant else {
        let id_file = dir.join("relay.id");
        let _ = std::fs::remove_file(&id_file);
        lab.spawn(
            relay,
            "relay",
            &std::env::current_exe()?,
            &[
                "nat-node".into(),
                "relay".into(),
                "--listen".into(),
                relay_addr(transport),
                "--file".into(),
                id_file.display().to_string(),
            ],
        )?;
        let relay_id = read_when_ready(&id_file, Duration::from_secs(10)).await?;
        return Ok(format!("{}/p2p/{relay_id}", relay_addr(transport)));
    };
    let key = dir.join("relay.key");
    let _ = std::fs::remove_file(&key);
    let generated = std::process::Command::new(bin)
        .args(["key", "generate", "--out"])
        .arg(&key)
        .output()?;
    let relay_id = String::from_utf8(generated.stdout)?.trim().to_string();
    lab.spawn(
        relay,
        "relay",
        bin,
        &servant_args(
            dir,
            "relay",
            transport,
            &[
                "--role",
                "super",
                "--identity-file",
                &key.display().to_string(),
                "--announce",
                &relay_addr(transport),
            ],
        ),
    )?;
    // A bare peer dials its relay once: the relay must be listening first (its API
    // answers once the node runs). Servant's peers retry their bootnode, and start
    // at once as they always did.
    let deadline = Instant::now() + Duration::from_secs(10);
    while wait_for_api && api(relay, "GET", "/v1/status", None).await.is_err() {
        if Instant::now() >= deadline {
            bail!("the relay did not start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(format!("{}/p2p/{relay_id}", relay_addr(transport)))
}

/// `servant run` for the node `name` of a trial.
fn servant_args(dir: &Path, name: &str, transport: &str, extra: &[&str]) -> Vec<String> {
    let _ = std::fs::remove_dir_all(dir.join(name));
    let mut v: Vec<String> = [
        "run",
        // The lab's routers run no UPnP; a search would only add noise.
        "--no-upnp",
        "--data-dir",
        &dir.join(name).display().to_string(),
        "--listen",
        &listen(transport),
        "--api",
        &format!("127.0.0.1:{API_PORT}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// What every trial of a run shares.
struct Setup<'a> {
    delay_ms: f64,
    bins: &'a Bins,
    /// Where this trial's captures go: the path of its files without their endings.
    capture: Option<&'a Path>,
}

/// One trial of `mix` on a fresh lab.
async fn trial(
    dir: &Path,
    transport: &str,
    (a, b): (Nat, Nat),
    mix: Mix,
    setup: &Setup<'_>,
) -> Result<Outcome> {
    let bin = setup.bins.of(mix);
    let (mut lab, relay, pa, pb) = build_lab(dir, a, b, setup.delay_ms)?;
    if let Some(capture) = setup.capture {
        let stem = capture.display();
        for member in ["relay", "ra", "rb"] {
            lab.capture(member, Path::new(&format!("{stem}-{member}.pcap")))?;
        }
    }
    let relay_full = start_relay(
        &mut lab,
        dir,
        &relay,
        transport,
        mix.servant_relay.then_some(bin),
        !mix.servant_peers,
    )
    .await?;
    if mix.servant_peers {
        servant_peers(&mut lab, dir, transport, &pa, &pb, &relay_full, bin).await
    } else {
        bare_peers(&mut lab, dir, transport, &pa, &pb, &relay_full).await
    }
}

async fn bare_peers(
    lab: &mut Lab,
    dir: &Path,
    transport: &str,
    pa: &str,
    pb: &str,
    relay_full: &str,
) -> Result<Outcome> {
    let me = std::env::current_exe()?;
    let addr_file = dir.join("pb.addr");
    let out = dir.join("outcome.json");
    let out_b = dir.join("outcome-pb.json");
    let relayed_a = crate::nat_node::relayed_file(&out);
    for f in [&addr_file, &out, &out_b, &relayed_a] {
        let _ = std::fs::remove_file(f);
    }
    let s = |p: &Path| p.display().to_string();
    lab.spawn(
        pb,
        "pb",
        &me,
        &[
            "nat-node".into(),
            "listen".into(),
            "--listen".into(),
            listen(transport),
            "--relay".into(),
            relay_full.into(),
            "--file".into(),
            s(&addr_file),
            "--outcome".into(),
            s(&out_b),
        ],
    )?;
    let target = read_when_ready(&addr_file, Duration::from_secs(15)).await?;
    lab.spawn(
        pa,
        "pa",
        &me,
        &[
            "nat-node".into(),
            "dial".into(),
            "--listen".into(),
            listen(transport),
            "--relay".into(),
            relay_full.into(),
            "--target".into(),
            target,
            "--file".into(),
            s(&out),
        ],
    )?;
    // Whichever peer reports first ends the wait, as with Servant's peers: DCUtR
    // reports only on the side whose dial decided it, so waiting for the dialer's
    // report cost a trial the dialer's whole wait whenever the listener's dial won.
    let read = |p: &Path| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|t| serde_json::from_str::<Outcome>(&t).ok())
    };
    let deadline = Instant::now() + Duration::from_secs(45);
    while read(&out).is_none() && read(&out_b).is_none() {
        if Instant::now() >= deadline {
            bail!("neither bare peer reported within 45 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The other's report, if it comes at about the same time.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let dialer_relayed = std::fs::read_to_string(&relayed_a)
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .map(crate::nat_node::relayed_only);
    let mut reports = [read(&out), read(&out_b), dialer_relayed]
        .into_iter()
        .flatten();
    let first = reports.next().context("a bare peer's report vanished")?;
    Ok(merge(first, reports.collect()))
}

/// One trial's outcome from both peers' reports, `first` the dialer's. Each peer
/// measures from its own relayed connection and sees only its own dials succeed (DCUtR
/// reports a success on the side whose dial made the connection, and nothing on the
/// side that accepted it), so the dialer's report alone can miss a direct connection
/// the other side made in time. On one wall clock (`at_us`): from the first relayed
/// connection either saw to the first direct one either saw, the dial from the first
/// either made, and the attempt of the side that went direct first.
fn merge(first: Outcome, others: Vec<Outcome>) -> Outcome {
    let all: Vec<&Outcome> = std::iter::once(&first).chain(&others).collect();
    let us = |ms: f64| ms * 1000.0;
    // Where a report lacks the clock (an older build's), the dialer's stands.
    let relayed = |o: &Outcome| Some(o.at_us? as f64 - us(o.ms?));
    let Some(relayed_at) = all.iter().filter_map(|o| relayed(o)).reduce(f64::min) else {
        return first;
    };
    let Some(winner) = all
        .iter()
        .filter(|o| o.success && o.at_us.is_some())
        .min_by_key(|o| o.at_us)
    else {
        return if first.success {
            first
        } else {
            all.into_iter()
                .find(|o| o.success)
                .cloned()
                .unwrap_or(first)
        };
    };
    let dial_at = all
        .iter()
        .filter_map(|o| Some(relayed(o)? + us(o.dial_ms?)))
        .reduce(f64::min);
    Outcome {
        success: true,
        ms: winner.at_us.map(|at| (at as f64 - relayed_at) / 1000.0),
        dial_ms: dial_at.map(|at| (at - relayed_at) / 1000.0),
        attempt: winner.attempt,
        error: None,
        at_us: winner.at_us,
    }
}

/// Asks the API of the Servant node in namespace `ns` over a socket made inside it,
/// not through a `servant` CLI process: a process starting and exiting beside a hole
/// punch takes CPU from it on two cores, and the bare implementation's nodes dial and
/// report with nothing launched.
async fn api(ns: &str, method: &str, path: &str, body: Option<String>) -> Result<String> {
    let (ns, method, path) = (ns.to_string(), method.to_string(), path.to_string());
    tokio::task::spawn_blocking(move || {
        servant_tests::natlab::http(&ns, API_PORT, &method, &path, body.as_deref())
    })
    .await?
}

/// `GET /v1/reach` of the node in `ns`: its reservations and hole punches.
async fn reach(ns: &str) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(
        &api(ns, "GET", "/v1/reach", None).await?,
    )?)
}

/// The `servant` builds a run starts.
struct Bins {
    /// Beside this binary.
    servant: PathBuf,
    /// `--other-servant`.
    other: Option<PathBuf>,
}

impl Bins {
    /// The build `mix`'s Servant nodes run (the other build is only in the run's
    /// implementations when `--other-servant` gave one).
    fn of(&self, mix: Mix) -> &Path {
        match (&self.other, mix.other_build) {
            (Some(other), true) => other,
            _ => &self.servant,
        }
    }
}

/// The servant binary beside this one (`cargo build --release -p servant`).
fn servant_bin() -> Result<PathBuf> {
    let bin = std::env::current_exe()?.with_file_name("servant");
    if !bin.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release -p servant`",
            bin.display()
        );
    }
    Ok(bin)
}

async fn servant_peers(
    lab: &mut Lab,
    dir: &Path,
    transport: &str,
    pa: &str,
    pb: &str,
    boot: &str,
    bin: &Path,
) -> Result<Outcome> {
    let peer = |name: &str| {
        servant_args(
            dir,
            name,
            transport,
            &["--role", "peer", "--bootnode", boot, "--conn-low", "1"],
        )
    };
    lab.spawn(pb, "pb", bin, &peer("pb"))?;
    lab.spawn(pa, "pa", bin, &peer("pa"))?;
    // pb's circuit address, once its reservation is accepted.
    let deadline = Instant::now() + Duration::from_secs(20);
    let target = loop {
        if let Ok(view) = reach(pb).await {
            let addr = view["reservations"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|r| r["accepted"] == true)
                .flat_map(|r| r["addrs"].as_array().cloned().unwrap_or_default())
                .filter_map(|a| a.as_str().map(String::from))
                .next();
            if let Some(addr) = addr {
                break addr;
            }
        }
        if Instant::now() >= deadline {
            bail!("pb got no reservation");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // pa must know its observed address (identify with the relay) before dialing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let body = serde_json::json!({ "target": target }).to_string();
    api(pa, "POST", "/v1/connect", Some(body)).await?;
    // The first look comes a second later: the nodes time the punch themselves.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // DCUtR reports on whichever side's dial decided it: both are asked.
    let deadline = Instant::now() + Duration::from_secs(OUTCOME_WAIT);
    loop {
        let mut punches = Vec::new();
        for ns in [pa, pb] {
            let view = reach(ns).await?;
            punches.extend(view["holepunches"].as_array().cloned().unwrap_or_default());
        }
        // Each side reports its own: put on one time line as the bare peers' are.
        let mut outcomes = punches.iter().map(|h| Outcome {
            success: h["success"] == true,
            ms: h["after_us"]
                .as_f64()
                .map(|us| us / 1000.0)
                .or_else(|| h["after_ms"].as_f64()),
            dial_ms: h["dial_after_us"].as_f64().map(|us| us / 1000.0),
            attempt: h["attempt"].as_u64().and_then(|a| u32::try_from(a).ok()),
            error: h["error"].as_str().map(String::from),
            at_us: h["at_us"].as_u64().filter(|&at| at > 0),
        });
        if let Some(first) = outcomes.next() {
            return Ok(merge(first, outcomes.collect()));
        }
        if Instant::now() >= deadline {
            return Ok(Outcome::failed(format!(
                "no outcome within {OUTCOME_WAIT} s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Successes counted by the attempt that succeeded (see [`Cell::successes_by_attempt`]).
fn by_attempt(outcomes: &[Outcome]) -> Vec<usize> {
    let mut counts = vec![0; 3];
    for o in outcomes.iter().filter(|o| o.success) {
        if let Some(n) = o
            .attempt
            .and_then(|a| counts.get_mut((a as usize).checked_sub(1)?))
        {
            *n += 1;
        }
    }
    counts
}

/// A cell's successes by attempt, for the table: `28 / 2 / 0`, and how many the
/// reporting peer's own dials did not make.
fn attempts_text(c: &Cell) -> String {
    let counted: usize = c.successes_by_attempt.iter().sum();
    let mut text = c
        .successes_by_attempt
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(" / ");
    if c.successes > counted {
        text.push_str(&format!(" (+{} other side)", c.successes - counted));
    }
    text
}

/// `value` of the successful trials that have it.
fn success_values(outcomes: &[Outcome], value: impl Fn(&Outcome) -> Option<f64>) -> Vec<f64> {
    outcomes
        .iter()
        .filter(|o| o.success)
        .filter_map(value)
        .collect()
}

/// The median of `value` over the successful trials that have it.
fn success_median(outcomes: &[Outcome], value: impl Fn(&Outcome) -> Option<f64>) -> Option<f64> {
    stats::median(success_values(outcomes, value))
}

/// The implementations a run compares, in the order of their first turn.
fn implementations(params: &NatParams) -> Vec<(&'static str, Mix)> {
    let mut v = vec![Mix::ALL[0], Mix::ALL[1]];
    if params.calibrate {
        v.push((CALIBRATION, Mix::ALL[1].1));
    }
    if params.mixed {
        v.extend_from_slice(&Mix::ALL[2..]);
    }
    if params.other_servant.is_some() {
        v.push((
            OTHER_BUILD,
            Mix {
                other_build: true,
                ..Mix::ALL[0].1
            },
        ));
    }
    v
}

/// The name of `--other-servant`'s implementation.
const OTHER_BUILD: &str = "servant, other build";

/// The name of the baseline's second run (`--calibrate`).
const CALIBRATION: &str = "baseline, again";

/// Which implementation takes turn `k` of trial `n`, for `m` implementations: a
/// Williams design. Trial orders are shifts of one sequence (0, 1, m-1, 2, m-2, ...)
/// and, for an odd `m`, their mirror images too, so that over every `m` (even) or `2m`
/// (odd) trials each implementation runs first equally often and each runs right after
/// each other one equally often: whatever one trial leaves behind (a lab being torn
/// down, a larger process exiting) falls on every implementation alike.
fn turn(n: usize, k: usize, m: usize) -> usize {
    let mut sequence = Vec::with_capacity(m);
    let (mut low, mut high) = (0, m.saturating_sub(1));
    while sequence.len() < m {
        if sequence.len().is_multiple_of(2) {
            sequence.push(low);
            low += 1;
        } else {
            sequence.push(high);
            high -= 1;
        }
    }
    let rows = if m.is_multiple_of(2) { m } else { 2 * m };
    let row = n % rows;
    let at = if row >= m { m - 1 - k } else { k };
    (sequence[at] + row % m) % m
}

/// Cell `a`'s time to a direct connection against the baseline cell `b`'s, judged
/// with a margin of `margin_pct` of the baseline's median; `None` without successes
/// on both sides.
fn compare(a: &Cell, b: &Cell, margin_pct: f64) -> Option<Comparison> {
    let ms = |c: &Cell| success_values(&c.outcomes, |o| o.ms);
    let difference_ms = stats::median_difference(&ms(a), &ms(b))?;
    let margin_ms = b.median_ms? * margin_pct / 100.0;
    Some(Comparison {
        pairing: a.pairing.clone(),
        transport: a.transport.clone(),
        implementation: a.implementation.clone(),
        difference_ms,
        margin_ms,
        no_worse: difference_ms.high <= margin_ms,
    })
}

/// With `--capture`: writes the trial's outcome beside its pcaps (`<stem>.json`) and,
/// for a direct trial, splits its spans by who spent them. A capture that cannot be
/// read is reported and left out of the medians, not fatal to the run.
fn captured_path(stem: &Path, outcome: &Outcome, delay_ms: f64) -> Result<Option<TrialPath>> {
    let file = stem.with_extension("json");
    std::fs::write(&file, serde_json::to_vec_pretty(outcome)?)
        .with_context(|| format!("write {}", file.display()))?;
    let (true, Some(dial_ms), Some(ms)) = (outcome.success, outcome.dial_ms, outcome.ms) else {
        return Ok(None);
    };
    match nat_path::of_trial(stem, dial_ms, ms, delay_ms) {
        Ok(None) => eprintln!("[nat] {}: no direct dial in the capture", stem.display()),
        Ok(path) => return Ok(path),
        Err(e) => eprintln!("[nat] {}: {e:#}", stem.display()),
    }
    Ok(None)
}

/// With `--capture`: both spans' medians by who spent them on the critical path,
/// Servant against the baseline.
fn path_rows(cell: &str, s: &Cell, b: &Cell) -> Vec<[String; 6]> {
    type Span = fn(&TrialPath) -> &CriticalPath;
    type Part = fn(&CriticalPath) -> f64;
    let spans: [(&str, Span); 2] = [
        ("relayed→dial", |t| &t.to_dial),
        ("dial→direct", |t| &t.to_direct),
    ];
    let parts: [(&str, Part); 6] = [
        ("dialing peer", |p| p.dialer_ms),
        ("listening peer", |p| p.listener_ms),
        ("relay", |p| p.relay_ms),
        ("routers' delay", |p| p.routers_ms),
        ("TCP connect", |p| p.connect_ms),
        ("not on the path", |p| {
            p.window_ms - p.dialer_ms - p.listener_ms - p.relay_ms - p.routers_ms - p.connect_ms
        }),
    ];
    let median = |c: &Cell, span: Span, part: Part| -> Option<f64> {
        stats::median(c.paths.iter().map(|t| part(span(t))).collect())
    };
    let mut rows = Vec::new();
    for (span_name, span) in spans {
        for (name, part) in parts {
            let (Some(sv), Some(bv)) = (median(s, span, part), median(b, span, part)) else {
                continue;
            };
            if sv.abs() < 1e-9 && bv.abs() < 1e-9 {
                continue;
            }
            rows.push(report::cells(
                &format!("{cell}: {span_name}, on the path: {name}"),
                "ms",
                sv,
                bv,
                (bv > 0.0).then(|| sv / bv),
                "",
                None,
            ));
        }
    }
    rows
}

/// The table's line for a comparison: the medians' difference, its interval and
/// the margin it must stay within.
fn difference_row(pairing: &str, transport: &str, c: &Comparison, target: &str) -> [String; 6] {
    let d = c.difference_ms;
    let what = if c.implementation == "servant" {
        String::new()
    } else {
        format!(" ({} - baseline)", c.implementation)
    };
    [
        format!("{pairing} {transport}: difference{what}, 95% interval (ms)"),
        format!("{:+.2} [{:+.2}, {:+.2}]", d.median_diff, d.low, d.high),
        "-".into(),
        "-".into(),
        format!("{target} (upper end ≤ {:+.2})", c.margin_ms),
        if c.no_worse { "PASS" } else { "FAIL" }.into(),
    ]
}

/// Runs every cell and writes the report.
pub async fn run(params: &NatParams, out: &Path) -> Result<NatReport> {
    if let Err(e) = servant_tests::natlab::available() {
        bail!("the NAT lab cannot run here: {e}");
    }
    if !(0.0..=10_000.0).contains(&params.delay_ms) {
        bail!(
            "--delay-ms {}: want 0 to 10000 milliseconds",
            params.delay_ms
        );
    }
    // Made absolute: a bare name would be looked up in PATH when the trials start it.
    let other = match &params.other_servant {
        Some(path) => Some(
            std::fs::canonicalize(path)
                .map_err(|e| anyhow::anyhow!("--other-servant {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let bins = Bins {
        servant: servant_bin()?,
        other,
    };
    // Made absolute, as tcpdump writes from the lab's namespace.
    let capture_root = match &params.capture {
        Some(root) => std::fs::create_dir_all(root)
            .and_then(|()| std::fs::canonicalize(root))
            .map(Some)
            .with_context(|| format!("--capture {}", root.display()))?,
        None => None,
    };
    let work = tempfile::tempdir()?;
    // SERVANT_BENCH_KEEP=1 keeps every trial's logs (and says where).
    let keep = std::env::var_os("SERVANT_BENCH_KEEP").is_some();
    let runs = implementations(params);
    let mut cells = Vec::new();
    for (pairing, a, b, _) in selected(params) {
        let (pairing, a, b) = (*pairing, *a, *b);
        for transport in &params.transports {
            // Trials take turns, one of each implementation after another (in the
            // order `turn` gives), rather than one implementation's thirty after the
            // other's: the machine's load drifts over minutes, and blocks would put
            // the drift into the comparison.
            let mut outcomes = vec![Vec::new(); runs.len()];
            let mut paths = vec![Vec::new(); runs.len()];
            let mut setup_failures = vec![0; runs.len()];
            for n in 0..params.trials {
                for k in 0..runs.len() {
                    let i = turn(n, k, runs.len());
                    let (implementation, mix) = runs[i];
                    let dir = work.path().join(format!(
                        "{}-{transport}-{}-{n}",
                        pairing.replace('/', "-"),
                        implementation.replace([' ', ','], "")
                    ));
                    std::fs::create_dir_all(&dir)?;
                    let capture = match &capture_root {
                        Some(root) => {
                            let name = dir.file_name().unwrap_or_default().to_string_lossy();
                            Some(root.join(name.as_ref()))
                        }
                        None => None,
                    };
                    let setup = Setup {
                        delay_ms: params.delay_ms,
                        bins: &bins,
                        capture: capture.as_deref(),
                    };
                    let outcome = trial(&dir, transport, (a, b), mix, &setup).await;
                    let outcome = outcome.unwrap_or_else(|e| {
                        setup_failures[i] += 1;
                        Outcome::failed(format!("setup: {e:#}"))
                    });
                    eprintln!(
                        "[nat] {pairing} {transport} {implementation} {}/{}: {}",
                        n + 1,
                        params.trials,
                        if outcome.success {
                            format!(
                                "direct after {:.2} ms (dialed after {:.2} ms, attempt {})",
                                outcome.ms.unwrap_or(f64::NAN),
                                outcome.dial_ms.unwrap_or(f64::NAN),
                                outcome.attempt.map_or("?".into(), |a| a.to_string())
                            )
                        } else {
                            outcome.error.clone().unwrap_or_default()
                        }
                    );
                    if let Some(capture) = &capture {
                        paths[i].extend(captured_path(capture, &outcome, params.delay_ms)?);
                    }
                    outcomes[i].push(outcome);
                    if !keep {
                        let _ = std::fs::remove_dir_all(&dir);
                    }
                }
            }
            for ((((implementation, _), outcomes), setup_failures), paths) in
                runs.iter().zip(outcomes).zip(setup_failures).zip(paths)
            {
                cells.push(Cell {
                    pairing: pairing.into(),
                    transport: transport.clone(),
                    implementation: (*implementation).into(),
                    trials: params.trials,
                    successes: outcomes.iter().filter(|o| o.success).count(),
                    setup_failures,
                    median_ms: success_median(&outcomes, |o| o.ms),
                    median_dial_ms: success_median(&outcomes, |o| o.dial_ms),
                    successes_by_attempt: by_attempt(&outcomes),
                    outcomes,
                    paths,
                });
            }
        }
    }
    if keep {
        eprintln!("[nat] trial logs kept in {}", work.keep().display());
    }
    let mut lines =
        vec![["cell", "Servant", "baseline", "ratio", "target", "result"].map(String::from)];
    let mut all_met = true;
    let mut comparisons = Vec::new();
    for (pairing, _, _, possible) in selected(params) {
        let (pairing, possible) = (*pairing, *possible);
        for transport in &params.transports {
            let find = |imp: &str| {
                cells.iter().find(|c| {
                    c.pairing == pairing && &c.transport == transport && c.implementation == imp
                })
            };
            let (Some(s), Some(b)) = (find("servant"), find("baseline")) else {
                continue;
            };
            let rate = |c: &Cell| 100.0 * c.successes as f64 / c.trials.max(1) as f64;
            let (target, pass) = if possible {
                ("≥ 95%", rate(s) >= 95.0)
            } else {
                ("0% (impossible)", s.successes == 0)
            };
            all_met &= pass;
            lines.push(report::cells(
                &format!("{pairing} {transport}: direct"),
                "%",
                rate(s),
                rate(b),
                None,
                target,
                Some(pass),
            ));
            lines.push([
                format!("{pairing} {transport}: direct at attempt 1 / 2 / 3"),
                attempts_text(s),
                attempts_text(b),
                "-".into(),
                "-".into(),
                String::new(),
            ]);
            let target = format!("≤ baseline + {}%", params.margin_pct);
            if let (Some(sm), Some(bm), Some(c)) =
                (s.median_ms, b.median_ms, compare(s, b, params.margin_pct))
            {
                all_met &= c.no_worse;
                lines.push(report::cells(
                    &format!("{pairing} {transport}: median relayed→direct"),
                    "ms",
                    sm,
                    bm,
                    Some(sm / bm),
                    &target,
                    Some(c.no_worse),
                ));
                lines.push(difference_row(pairing, transport, &c, &target));
                comparisons.push(c);
            }
            // Judged as Servant is, but not targets: the baseline against itself (what
            // the verdict above would say of two runs of the same code), and the other
            // build.
            for (name, label) in [(CALIBRATION, "calibration"), (OTHER_BUILD, "other build")] {
                if let Some(c) = find(name).and_then(|a| compare(a, b, params.margin_pct)) {
                    let mut row = difference_row(pairing, transport, &c, label);
                    row[5] = if c.no_worse { "(pass)" } else { "(fail)" }.into();
                    lines.push(row);
                    comparisons.push(c);
                }
            }
            // Where the time goes: the DCUtR exchange over the relay, then the
            // direct connection's handshake.
            if let (Some(sd), Some(bd), Some(sm), Some(bm)) =
                (s.median_dial_ms, b.median_dial_ms, s.median_ms, b.median_ms)
            {
                lines.push(report::cells(
                    &format!("{pairing} {transport}: of which relayed→dial"),
                    "ms",
                    sd,
                    bd,
                    Some(sd / bd),
                    "",
                    None,
                ));
                lines.push(report::cells(
                    &format!("{pairing} {transport}: of which dial→direct (medians' difference)"),
                    "ms",
                    sm - sd,
                    bm - bd,
                    Some((sm - sd) / (bm - bd)),
                    "",
                    None,
                ));
            }
            lines.extend(path_rows(&format!("{pairing} {transport}"), s, b));
        }
    }
    let mut table = format!(
        "nat: {} trials per cell, fresh namespaces each; Servant forced to its roles; baseline: bare rust-libp2p relay, relay client, identify, ping and dcutr; {}\n\n",
        params.trials,
        if params.delay_ms > 0.0 {
            format!("each router holds every packet {} ms", params.delay_ms)
        } else {
            "no added latency".to_string()
        }
    );
    report::write_table(&mut table, &lines);
    if params.mixed {
        // Every cell on its own, the mixed ones included.
        let mut rows = vec![[
            "pairing",
            "transport",
            "relay / peers",
            "direct",
            "median ms",
            "of which relayed→dial",
        ]
        .map(String::from)];
        let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
        for c in &cells {
            rows.push([
                c.pairing.clone(),
                c.transport.clone(),
                c.implementation.clone(),
                format!("{}/{}", c.successes, c.trials),
                ms(c.median_ms),
                ms(c.median_dial_ms),
            ]);
        }
        table.push('\n');
        report::write_table(&mut table, &rows);
    }
    table.push_str(if all_met {
        "\nALL TARGETS MET\n"
    } else {
        "\nTARGETS MISSED\n"
    });
    let report = NatReport {
        params: params.clone(),
        cells,
        comparisons,
        all_targets_met: all_met,
    };
    crate::publish(out, &report, &table)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_are_balanced_for_first_place_and_for_who_follows_whom() {
        for m in 1..=5usize {
            let rows = if m.is_multiple_of(2) { m } else { 2 * m };
            let mut first = vec![0; m];
            let mut follows = vec![vec![0; m]; m];
            for n in 0..rows {
                let order: Vec<usize> = (0..m).map(|k| turn(n, k, m)).collect();
                let mut sorted = order.clone();
                sorted.sort_unstable();
                assert_eq!(
                    sorted,
                    (0..m).collect::<Vec<_>>(),
                    "trial {n} runs each once"
                );
                first[order[0]] += 1;
                for pair in order.windows(2) {
                    follows[pair[0]][pair[1]] += 1;
                }
            }
            assert!(first.iter().all(|&f| f == first[0]), "m = {m}: {first:?}");
            let counts: Vec<usize> = (0..m)
                .flat_map(|a| (0..m).filter(move |&b| b != a).map(move |b| (a, b)))
                .map(|(a, b)| follows[a][b])
                .collect();
            assert!(
                counts.iter().all(|&c| c == counts[0]),
                "m = {m}: {follows:?}"
            );
        }
    }

    #[test]
    fn no_worse_means_the_interval_stays_within_the_margin() {
        let cell = |implementation: &str, ms: &[f64]| Cell {
            pairing: "port-restricted/port-restricted".into(),
            transport: "tcp".into(),
            implementation: implementation.into(),
            trials: ms.len(),
            successes: ms.len(),
            setup_failures: 0,
            median_ms: stats::median(ms.to_vec()),
            median_dial_ms: None,
            successes_by_attempt: vec![ms.len(), 0, 0],
            outcomes: ms
                .iter()
                .map(|&ms| Outcome {
                    success: true,
                    ms: Some(ms),
                    dial_ms: None,
                    attempt: Some(1),
                    error: None,
                    at_us: None,
                })
                .collect(),
            paths: Vec::new(),
        };
        let base: Vec<f64> = (0..30).map(|i| 100.0 + (i * 7 % 11) as f64).collect();
        let b = cell("baseline", &base);
        // The same times: the interval straddles 0, well within 5 ms.
        let same = compare(&cell("servant", &base), &b, 5.0).expect("successes");
        assert!(same.no_worse, "{same:?}");
        assert!((same.margin_ms - 5.25).abs() < 1e-9, "5% of the median 105");
        // 20 ms slower: outside the margin.
        let slower: Vec<f64> = base.iter().map(|x| x + 20.0).collect();
        let c = compare(&cell("servant", &slower), &b, 5.0).expect("successes");
        assert!(!c.no_worse, "{c:?}");
        // Faster by any amount is no worse.
        let faster: Vec<f64> = base.iter().map(|x| x - 20.0).collect();
        assert!(
            compare(&cell("servant", &faster), &b, 5.0)
                .expect("successes")
                .no_worse
        );
    }

    #[test]
    fn calibration_and_mixed_cells_join_the_turns() {
        let mut params = NatParams {
            trials: 1,
            transports: vec!["tcp".into()],
            pairings: vec![],
            mixed: false,
            delay_ms: 0.0,
            calibrate: false,
            margin_pct: 5.0,
            other_servant: None,
            capture: None,
        };
        let names = |p: &NatParams| {
            implementations(p)
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&params), ["servant", "baseline"]);
        params.calibrate = true;
        params.mixed = true;
        assert_eq!(
            names(&params),
            [
                "servant",
                "baseline",
                CALIBRATION,
                "servant peers, bare relay",
                "bare peers, servant relay"
            ]
        );
        params.other_servant = Some(PathBuf::from("/elsewhere/servant"));
        let all = implementations(&params);
        assert_eq!(all.last().map(|(n, _)| *n), Some(OTHER_BUILD));
        assert!(all
            .iter()
            .all(|(n, mix)| mix.other_build == (*n == OTHER_BUILD)));
    }

    #[test]
    fn successes_are_counted_by_the_attempt_that_succeeded() {
        let outcome = |success, attempt| Outcome {
            success,
            ms: Some(1.0),
            dial_ms: None,
            attempt,
            error: None,
            at_us: None,
        };
        let outcomes = [
            outcome(true, Some(1)),
            outcome(true, Some(2)),
            outcome(true, Some(2)),
            outcome(true, None),
            // Out of DCUtR's range, and a failure's dial count: in no column.
            outcome(true, Some(0)),
            outcome(false, Some(3)),
        ];
        assert_eq!(by_attempt(&outcomes), vec![1, 2, 0]);
    }

    #[test]
    fn both_peers_reports_go_on_one_time_line() {
        // The dialer's relayed connection at 1,000 µs, its own dial direct only at
        // 1,025,000 µs (a lost first packet); the listener's relayed connection at
        // 3,000 µs and its dial direct at 27,000 µs.
        let dialer = Outcome {
            success: true,
            ms: Some(1024.0),
            dial_ms: Some(17.0),
            attempt: Some(1),
            error: None,
            at_us: Some(1_025_000),
        };
        let listener = Outcome {
            success: true,
            ms: Some(24.0),
            dial_ms: Some(16.0),
            attempt: Some(1),
            error: None,
            at_us: Some(27_000),
        };
        let m = merge(dialer.clone(), vec![listener.clone()]);
        assert!(m.success);
        assert_eq!(m.ms, Some(26.0));
        assert_eq!(m.dial_ms, Some(17.0));
        assert_eq!(m.at_us, Some(27_000));
        // The dialer gave up but the listener went direct: a success.
        let gave_up = Outcome {
            success: false,
            ms: Some(15_000.0),
            attempt: Some(1),
            error: Some("no outcome within 15 s".into()),
            at_us: Some(15_001_000),
            ..dialer.clone()
        };
        let m = merge(gave_up.clone(), vec![listener.clone()]);
        assert!(m.success);
        assert_eq!(m.ms, Some(26.0));
        // The listener reported first and the dialer only noted its relayed
        // connection: the trial still starts at the dialer's.
        let m = merge(listener.clone(), vec![crate::nat_node::relayed_only(1_000)]);
        assert!(m.success);
        assert_eq!(m.ms, Some(26.0));
        assert_eq!(m.dial_ms, Some(18.0));
        // Alone, or without clocks (an older build), the dialer's report stands.
        assert!(!merge(gave_up, vec![]).success);
        let old = Outcome {
            at_us: None,
            ..dialer
        };
        assert_eq!(merge(old, vec![]).ms, Some(1024.0));
    }
}
