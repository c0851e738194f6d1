//! What `deploy/` ships, checked with the tools that will run it:
//!
//! - every config (the example, the systemd unit's file and command line, each
//!   Kubernetes pod's file, environment and flags) is accepted by
//!   `servant run --print-config`, so a misspelt key fails here rather than in a
//!   deployment;
//! - the systemd unit passes `systemd-analyze verify`, and `systemd-analyze security
//!   --offline=yes` rates its exposure at most [`MAX_EXPOSURE`]; a node under strace
//!   makes only system calls the unit's `SystemCallFilter=` allows, opens only sockets
//!   of the families its `RestrictAddressFamilies=` allows, and writes only inside its
//!   data dir (the unit's only writable path);
//! - the Kubernetes manifests, with the Secrets and bootnodes `make-secrets.sh`
//!   generates, validate against the Kubernetes schemas (kubernetes-validate);
//! - the alert rules pass `promtool check rules` and `promtool test rules`;
//! - the Grafana dashboard is a dashboard model whose queries parse, and every metric
//!   the dashboard and the alert rules name is exported by live nodes (or, for the
//!   few families that appear only after an event a loopback network cannot make
//!   happen quickly, by the node's own registry once that event is recorded).
//!
//! Tools come from `tests/setup/deploy.sh`. A test whose tool is missing is skipped
//! loudly, except under CI=true, where that is a failure.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;
use servant_tests::{
    eventually, free_port, gossip_peer::GossipPeer, has_program, run_cli, servant_bin, skip_unless,
    Net,
};

/// The highest `systemd-analyze security` exposure the unit may have (0 is fully
/// locked down, 10 fully exposed; up to 2.0 systemd rates "OK").
const MAX_EXPOSURE: f64 = 2.0;

/// The unit's command, as installed.
const UNIT_BINARY: &str = "/usr/local/bin/servant";
/// Where the unit reads its config (ConfigurationDirectory=servant).
const UNIT_CONFIG_DIR: &str = "/etc/servant/";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("repository root")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs a command to completion, with its program's name in any error.
fn run(cmd: &mut Command) -> Result<Output> {
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {what}"))
}

fn print_config(args: &[&str], env: &[(&str, &str)], what: &str) -> String {
    let mut full = args.to_vec();
    full.push("--print-config");
    let out = run_cli(&full, env);
    assert!(
        out.status.success(),
        "{what}: `servant {}` refused it:\n{}",
        full.join(" "),
        text(&out.stderr)
    );
    text(&out.stdout)
}

// ------------------------------------------------------------------- configs

/// The `Key=value` settings of a unit file, in order (continuation lines and
/// comments are not used by ours).
fn unit_settings(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn unit_values<'a>(settings: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    settings
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

#[test]
fn shipped_configs_are_valid() {
    let root = root();
    for config in ["deploy/servant.example.toml", "deploy/systemd/servant.toml"] {
        let path = root.join(config);
        let path = path.to_str().expect("utf-8 path");
        print_config(&["run", "--config", path], &[], config);
        println!("checked: {config} is a valid config");
    }

    // The unit's own command line and environment, its config file read from where
    // the unit installs it (ConfigurationDirectory=servant is /etc/servant).
    let unit = read(&root.join("deploy/systemd/servant.service"));
    let settings = unit_settings(&unit);
    let exec = unit_values(&settings, "ExecStart");
    assert_eq!(exec.len(), 1, "one ExecStart= in the unit: {exec:?}");
    let mut words = exec[0].split_whitespace();
    assert_eq!(
        words.next(),
        Some(UNIT_BINARY),
        "the unit runs {UNIT_BINARY}"
    );
    let shipped_dir = root.join("deploy/systemd");
    let args: Vec<String> = words
        .map(|w| match w.strip_prefix(UNIT_CONFIG_DIR) {
            Some(file) => shipped_dir.join(file).display().to_string(),
            None => w.to_string(),
        })
        .collect();
    let env: Vec<(String, String)> = unit_values(&settings, "Environment")
        .iter()
        .flat_map(|v| v.split_whitespace())
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let effective = print_config(&args, &env, "the systemd unit's ExecStart");
    // The unit lets the service write to its StateDirectory only: that must be the
    // data dir, or the node could not save its identity.
    let state = unit_values(&settings, "StateDirectory");
    assert!(
        state.len() == 1 && state[0].split_whitespace().next() == Some("servant"),
        "StateDirectory=servant ...: {state:?}"
    );
    assert!(
        effective.contains("data_dir = \"/var/lib/servant\""),
        "the unit's config must keep its data in the StateDirectory /var/lib/servant:\n{effective}"
    );
    println!("checked: the systemd unit's command line and config are valid; data_dir is its StateDirectory");
}

// ------------------------------------------------------------------- systemd

/// The unit with its ExecStart pointing at the binary under test, since `verify`
/// insists that the command exists.
fn unit_for_test(dir: &Path) -> PathBuf {
    let unit = read(&root().join("deploy/systemd/servant.service"));
    assert_eq!(
        unit.matches(&format!("ExecStart={UNIT_BINARY} ")).count(),
        1,
        "the unit's ExecStart runs {UNIT_BINARY}"
    );
    let bin = servant_bin();
    let unit = unit.replace(
        &format!("ExecStart={UNIT_BINARY} "),
        &format!("ExecStart={} ", bin.display()),
    );
    let path = dir.join("servant.service");
    std::fs::write(&path, unit).expect("write the unit");
    path
}

/// Lines of `systemd-analyze verify` about our unit (it also loads the host's
/// targets, whose complaints are not ours).
fn verify_complaints(unit: &Path) -> Result<(bool, Vec<String>)> {
    let out = run(Command::new("systemd-analyze").arg("verify").arg(unit))?;
    let ours: Vec<String> = text(&out.stderr)
        .lines()
        .chain(text(&out.stdout).lines())
        .filter(|l| l.contains("servant.service") || l.contains(&unit.display().to_string()))
        .map(str::to_string)
        .collect();
    Ok((out.status.success(), ours))
}

#[test]
fn systemd_unit_verifies_and_stays_under_the_exposure_threshold() -> Result<()> {
    if skip_unless(
        has_program("systemd-analyze"),
        "systemd-analyze (Debian's systemd package; tests/setup/deploy.sh installs it)",
    ) {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let unit = unit_for_test(dir.path());

    let (ok, complaints) = verify_complaints(&unit)?;
    ensure!(
        ok && complaints.is_empty(),
        "systemd-analyze verify: {complaints:#?}"
    );
    // The check itself: a misspelt setting must be reported, or the pass above
    // would mean nothing.
    let bad_dir = tempfile::tempdir()?;
    let bad = bad_dir.path().join("servant.service");
    std::fs::write(
        &bad,
        read(&unit).replace("ProtectSystem=strict", "ProtectSytem=strict"),
    )?;
    let (_, bad_complaints) = verify_complaints(&bad)?;
    ensure!(
        bad_complaints.iter().any(|l| l.contains("ProtectSytem")),
        "systemd-analyze verify did not notice a misspelt key: {bad_complaints:?}"
    );
    println!("checked: systemd-analyze verify accepts the unit (and reports a misspelt key)");

    let threshold = format!("--threshold={}", (MAX_EXPOSURE * 10.0).round() as u32);
    let out = run(Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager", &threshold])
        .arg(&unit))?;
    let report = text(&out.stdout);
    let overall = report
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for servant.service:"))
        .map(|(_, rest)| rest.trim().to_string())
        .ok_or_else(|| {
            anyhow!(
                "no overall exposure level in:\n{report}{}",
                text(&out.stderr)
            )
        })?;
    let exposure: f64 = overall
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("unreadable exposure level: {overall}"))?;
    ensure!(
        out.status.success() && exposure <= MAX_EXPOSURE,
        "exposure {overall} is above the threshold {MAX_EXPOSURE}:\n{report}"
    );
    let rating = overall.split_whitespace().nth(1).unwrap_or_default();
    println!(
        "checked: systemd-analyze security --offline=yes: exposure {exposure:.1} {rating} (threshold {MAX_EXPOSURE:.1})"
    );

    let settings = unit_settings(&read(&unit));
    for (key, want) in [
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("Restart", "on-failure"),
        ("KillSignal", "SIGTERM"),
        ("CapabilityBoundingSet", ""),
    ] {
        ensure!(
            unit_values(&settings, key) == [want],
            "the unit must set {key}={want}"
        );
    }
    ensure!(
        !unit_values(&settings, "TimeoutStopSec").is_empty()
            && !unit_values(&settings, "RestartSec").is_empty(),
        "the unit bounds its stop time and spaces its restarts"
    );
    println!(
        "checked: own user, no new privileges, read-only system, restart on failure, SIGTERM stop"
    );
    Ok(())
}

/// Every system call a group (`@system-service`) or name stands for, from the
/// tables of the installed systemd.
fn syscall_groups() -> Result<HashMap<String, Vec<String>>> {
    let out = run(Command::new("systemd-analyze").args(["syscall-filter", "--no-pager"]))?;
    ensure!(
        out.status.success(),
        "systemd-analyze syscall-filter failed"
    );
    let mut groups: HashMap<String, Vec<String>> = HashMap::new();
    let mut current: Option<String> = None;
    for line in text(&out.stdout).lines() {
        if line.starts_with('@') {
            current = Some(line.trim().to_string());
            groups.entry(line.trim().to_string()).or_default();
        } else if line.starts_with(char::is_whitespace) {
            let item = line.trim();
            if item.is_empty() || item.starts_with('#') {
                continue;
            }
            if let Some(group) = &current {
                groups
                    .entry(group.clone())
                    .or_default()
                    .push(item.to_string());
            }
        } else {
            current = None;
        }
    }
    ensure!(
        groups.contains_key("@system-service"),
        "no @system-service in systemd-analyze syscall-filter"
    );
    Ok(groups)
}

fn expand(item: &str, groups: &HashMap<String, Vec<String>>, out: &mut BTreeSet<String>) {
    match groups.get(item) {
        Some(members) if item.starts_with('@') => {
            for member in members {
                expand(member, groups, out);
            }
        }
        _ => {
            out.insert(item.to_string());
        }
    }
}

/// The system calls the unit's `SystemCallFilter=` lines allow: the first line's
/// list, plus later plain lines, minus `~` lines (systemd's order of application).
fn allowed_syscalls(settings: &[(String, String)]) -> Result<BTreeSet<String>> {
    let groups = syscall_groups()?;
    let mut allowed = BTreeSet::new();
    let filters = unit_values(settings, "SystemCallFilter");
    ensure!(
        filters.first().is_some_and(|f| !f.starts_with('~')),
        "the unit's first SystemCallFilter= must be an allow list"
    );
    for filter in filters {
        let (deny, list) = match filter.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, filter),
        };
        let mut set = BTreeSet::new();
        for item in list.split_whitespace() {
            expand(item, &groups, &mut set);
        }
        if deny {
            allowed.retain(|s| !set.contains(s));
        } else {
            allowed.extend(set);
        }
    }
    Ok(allowed)
}

/// Runs a `servant` client command; its stdout, or an error with its stderr.
fn cli(args: &[&str]) -> Result<String> {
    // run_cli blocks until the command ends; other tasks keep a worker thread.
    let out = tokio::task::block_in_place(|| run_cli(args, &[]));
    ensure!(
        out.status.success(),
        "`servant {}`: {}",
        args.join(" "),
        text(&out.stderr)
    );
    Ok(text(&out.stdout))
}

/// A `servant run` under strace; killed (with strace) when dropped.
struct Traced {
    strace: Child,
    trace: PathBuf,
    stderr: PathBuf,
}

impl Traced {
    /// The traced node's pid: the first process in the trace.
    fn node_pid(&self) -> Result<i32> {
        let trace = std::fs::read_to_string(&self.trace)?;
        trace
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow!("no pid in {}", self.trace.display()))
    }

    /// SIGTERM to the node, then waits for it (and strace) to exit.
    fn stop(&mut self) -> Result<()> {
        let pid = self.node_pid()?;
        // SAFETY: kill(2) on the node this test started; at worst ESRCH.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.strace.try_wait()? {
                ensure!(status.success(), "the traced node exited with {status}");
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the traced node did not exit within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        if let Ok(None) = self.strace.try_wait() {
            // strace started the node itself, so the node dies with it.
            let _ = self.strace.kill();
            let _ = self.strace.wait();
            eprintln!(
                "----- traced node stderr -----\n{}",
                servant_tests::tail(&self.stderr, 40)
            );
        }
    }
}

/// Names of the system calls in an strace log (`-f` prefixes each line with a pid).
fn traced_syscalls(trace: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in trace.lines() {
        let rest = line
            .split_once(char::is_whitespace)
            .map(|(_, r)| r.trim_start())
            .unwrap_or(line);
        let name = if let Some(resumed) = rest.strip_prefix("<... ") {
            resumed.split_whitespace().next()
        } else {
            rest.split_once('(').map(|(n, _)| n)
        };
        if let Some(name) = name {
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                names.insert(name.to_string());
            }
        }
    }
    names
}

/// Paths the traced process created, wrote, renamed or removed.
fn written_paths(trace: &str) -> Vec<(String, String)> {
    const WRITES: &[&str] = &[
        "mkdir",
        "mkdirat",
        "rename",
        "renameat",
        "renameat2",
        "unlink",
        "unlinkat",
        "rmdir",
        "link",
        "linkat",
        "symlink",
        "symlinkat",
        "truncate",
        "chmod",
        "fchmodat",
        "creat",
    ];
    let mut paths = Vec::new();
    for line in trace.lines() {
        let rest = line
            .split_once(char::is_whitespace)
            .map(|(_, r)| r.trim_start())
            .unwrap_or(line);
        let Some((name, args)) = rest.split_once('(') else {
            continue;
        };
        let writes = WRITES.contains(&name)
            || (matches!(name, "open" | "openat" | "openat2")
                && ["O_WRONLY", "O_RDWR", "O_CREAT"]
                    .iter()
                    .any(|f| args.contains(f)));
        if !writes {
            continue;
        }
        // With -y, a directory fd prints as `3</its/path>`; the path arguments are
        // the quoted strings.
        let mut dir: Option<String> = None;
        let mut rest = args;
        loop {
            let fd_path = rest.find('<').zip(rest.find('"'));
            match fd_path {
                Some((lt, quote)) if lt < quote => {
                    let after = &rest[lt + 1..];
                    let Some(end) = after.find('>') else { break };
                    dir = Some(after[..end].to_string());
                    rest = &after[end + 1..];
                }
                _ => {
                    let Some(start) = rest.find('"') else { break };
                    let after = &rest[start + 1..];
                    let Some(end) = after.find('"') else { break };
                    let path = &after[..end];
                    let full = match (&dir, path.starts_with('/')) {
                        (Some(d), false) => format!("{d}/{path}"),
                        _ => path.to_string(),
                    };
                    paths.push((name.to_string(), full));
                    rest = &after[end + 1..];
                    dir = None;
                }
            }
        }
    }
    paths
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_unit_allows_what_a_node_does() -> Result<()> {
    if skip_unless(
        has_program("strace") && has_program("systemd-analyze"),
        "strace and systemd-analyze (tests/setup/deploy.sh installs them)",
    ) {
        return Ok(());
    }
    let settings = unit_settings(&read(&root().join("deploy/systemd/servant.service")));
    let allowed = allowed_syscalls(&settings)?;
    // The expansion itself: the basics are in, what the unit denies is out.
    for call in ["epoll_wait", "sendto", "openat", "clone3"] {
        ensure!(allowed.contains(call), "{call} should be allowed");
    }
    for call in ["setrlimit", "reboot", "mount", "init_module"] {
        ensure!(!allowed.contains(call), "{call} should be refused");
    }

    let mut net = Net::new();
    let dir = net.dir().join("traced");
    // The unit's StateDirectory exists before the node starts; so does this one.
    let data_dir = dir.join("data");
    std::fs::create_dir_all(&data_dir)?;
    let (p2p, api_port) = (free_port(), free_port());
    let trace = dir.join("strace.log");
    let stdout = dir.join("stdout");
    let stderr = dir.join("stderr");
    let strace = Command::new("strace")
        .args(["-f", "-qq", "-y", "-s", "4096", "-o"])
        .arg(&trace)
        .arg("--")
        .arg(servant_bin())
        // The unit's command line and config, with a data dir and ports of its own.
        .args(["run", "--config"])
        .arg(root().join("deploy/systemd/servant.toml"))
        .args([
            "--data-dir",
            data_dir.to_str().expect("utf-8"),
            "--listen",
            // All interfaces, as the unit's config: the node then follows
            // interface changes over netlink.
            &format!("/ip4/0.0.0.0/tcp/{p2p},/ip4/0.0.0.0/udp/{p2p}/quic-v1"),
            "--api",
            &format!("127.0.0.1:{api_port}"),
            "--topic",
            "unit",
        ])
        .current_dir(&data_dir)
        .env("SERVANT_LOG_LEVEL", "info")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(File::create(&stdout)?)
        .stderr(File::create(&stderr)?)
        .spawn()
        .context("spawn strace")?;
    let mut traced = Traced {
        strace,
        trace: trace.clone(),
        stderr,
    };
    // The traced node is driven with the CLI, as an operator drives a service.
    let api = format!("127.0.0.1:{api_port}");
    let api = api.as_str();
    let stdout_ref = &stdout;
    let peer_id = eventually(
        Duration::from_secs(60),
        "the traced node to start",
        || async move {
            let out = std::fs::read_to_string(stdout_ref).unwrap_or_default();
            let id = out.lines().find_map(|l| l.strip_prefix("PeerId: "));
            Ok(match id {
                Some(id) if cli(&["health", "--api", api]).is_ok() => Some(id.trim().to_string()),
                _ => None,
            })
        },
    )
    .await?;

    // An ordinary node joins it; the traced node then serves, fetches, searches
    // and gossips, as a node of the network does.
    let other = net
        .spawn(
            "other",
            &[
                "--bootnode".into(),
                format!("/ip4/127.0.0.1/tcp/{p2p}/p2p/{peer_id}"),
                "--topic".into(),
                "unit".into(),
            ],
        )
        .await?;
    eventually(
        Duration::from_secs(30),
        "the nodes to connect",
        || async move {
            let peers: Vec<Value> =
                serde_json::from_str(&cli(&["peers", "--api", api, "--json"])?)?;
            Ok((!peers.is_empty()).then_some(()))
        },
    )
    .await?;
    let shared = net.dir().join("shared-by-traced.bin");
    servant_tests::random_file(&shared, 3 << 20, 1)?;
    let info: Value = serde_json::from_str(&cli(&[
        "share",
        "--api",
        api,
        "--json",
        shared.to_str().expect("utf-8"),
    ])?)?;
    let id = info["id"]
        .as_str()
        .ok_or_else(|| anyhow!("share printed no id: {info}"))?;
    let events = net[other]
        .fetch(id, &net.dir().join("fetched-by-other.bin"))
        .await?;
    ensure!(
        matches!(
            events.last(),
            Some(servant::fetch::Progress::Finished { .. })
        ),
        "the other node fetched from the traced one: {events:?}"
    );
    let theirs = net.dir().join("shared-by-other.bin");
    servant_tests::random_file(&theirs, 2 << 20, 2)?;
    let their_info = net[other].share(&theirs).await?;
    // Under the unit the node can write only below its StateDirectory, whose
    // files/ is where the unit's users fetch to.
    let downloads = data_dir.join("files");
    std::fs::create_dir_all(&downloads)?;
    cli(&[
        "fetch",
        "--api",
        api,
        &their_info.id.to_hex(),
        "--out",
        downloads
            .join("fetched-by-traced.bin")
            .to_str()
            .expect("utf-8"),
    ])?;
    cli(&[
        "publish",
        "--api",
        api,
        "--topic",
        "unit",
        "from the traced node",
    ])?;
    net[other]
        .publish("unit", "hello", "to the traced node")
        .await?;
    let found = cli(&[
        "search",
        "--api",
        api,
        "--ttl",
        "2",
        "--timeout",
        "2s",
        "shared-by-other",
    ])?;
    ensure!(
        found.contains("shared-by-other"),
        "the traced node's search found nothing: {found}"
    );
    net[other]
        .search("shared-by-traced", 2, Duration::from_secs(2))
        .await?;
    traced.stop()?;

    let log = std::fs::read_to_string(&trace)?;
    let used = traced_syscalls(&log);
    ensure!(
        used.contains("epoll_wait") && used.contains("sendto"),
        "the trace looks empty: {used:?}"
    );
    let denied: Vec<&String> = used.difference(&allowed).collect();
    ensure!(
        denied.is_empty(),
        "the unit's SystemCallFilter would refuse {denied:?} (the node made {} kinds of call)",
        used.len()
    );
    println!(
        "checked: all {} kinds of system call the node made are allowed by the unit's SystemCallFilter",
        used.len()
    );

    // Address families of every socket, against RestrictAddressFamilies=.
    let families_allowed: BTreeSet<&str> = unit_values(&settings, "RestrictAddressFamilies")
        .iter()
        .flat_map(|v| v.split_whitespace())
        .collect();
    let families_used: BTreeSet<String> = log
        .lines()
        .filter_map(|l| {
            let (_, rest) = l
                .split_once(" socket(")
                .or_else(|| l.split_once(" socketpair("))?;
            Some(rest.split([',', ' ']).next()?.to_string())
        })
        .collect();
    ensure!(
        families_used.contains("AF_NETLINK") && families_used.contains("AF_INET"),
        "the trace shows no netlink or IPv4 socket: {families_used:?}"
    );
    let refused: Vec<&String> = families_used
        .iter()
        .filter(|f| !families_allowed.contains(f.as_str()))
        .collect();
    ensure!(
        refused.is_empty(),
        "the unit's RestrictAddressFamilies would refuse {refused:?}"
    );
    println!("checked: the node's sockets ({families_used:?}) are all of families the unit allows");

    let data_prefix = format!("{}/", data_dir.display());
    let writes = written_paths(&log);
    ensure!(!writes.is_empty(), "no writes found in the trace");
    let outside: Vec<&(String, String)> = writes
        .iter()
        .filter(|(_, path)| {
            !path.starts_with(&data_prefix) && **path != data_dir.display().to_string()
        })
        .collect();
    ensure!(
        outside.is_empty(),
        "the node wrote outside its data dir (ProtectSystem=strict would refuse): {outside:?}"
    );
    println!(
        "checked: the node's {} writes all stay inside its data dir (the unit's StateDirectory)",
        writes.len()
    );
    net.pass();
    Ok(())
}

// ---------------------------------------------------------------- Kubernetes

fn venv_bin(name: &str) -> PathBuf {
    root().join("tests/py/.venv/bin").join(name)
}

/// Every YAML document in `files`, as JSON, each with the file it came from.
fn load_yaml(files: &[PathBuf]) -> Result<Vec<(PathBuf, Value)>> {
    const SCRIPT: &str = "import json, sys, yaml\n\
        docs = []\n\
        for path in sys.argv[1:]:\n\
        \x20   with open(path) as f:\n\
        \x20       docs += [[path, d] for d in yaml.safe_load_all(f) if d is not None]\n\
        json.dump(docs, sys.stdout)\n";
    let out = run(Command::new(venv_bin("python"))
        .arg("-c")
        .arg(SCRIPT)
        .args(files))?;
    ensure!(out.status.success(), "YAML to JSON: {}", text(&out.stderr));
    let docs: Vec<(PathBuf, Value)> = serde_json::from_slice(&out.stdout)?;
    Ok(docs)
}

fn base64_decode(input: &str) -> Result<Vec<u8>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in input
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
    {
        let v = ALPHABET
            .iter()
            .position(|a| *a == c)
            .ok_or_else(|| anyhow!("not base64: {c:?}"))? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

fn find<'a>(docs: &'a [(PathBuf, Value)], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter()
        .map(|(_, d)| d)
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

/// Expands Kubernetes' `$(VAR)` references from the variables defined so far;
/// unknown ones stay as written, `$$` is a literal `$`.
fn expand_k8s(value: &str, defined: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(var) = after
            .strip_prefix('(')
            .and_then(|a| a.split_once(')'))
            .filter(|(name, _)| defined.contains_key(*name))
        {
            out.push_str(&defined[var.0]);
            rest = var.1;
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// One pod's `servant` container as it would start: its args and environment, with
/// the ConfigMaps it mounts written under `scratch` and their paths rewritten.
struct PodConfig {
    pod: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
}

fn pod_config(
    docs: &[(PathBuf, Value)],
    workload: &Value,
    pod: &str,
    namespace: &str,
    scratch: &Path,
) -> Result<PodConfig> {
    let spec = &workload["spec"]["template"]["spec"];
    let container = spec["containers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "servant"))
        .ok_or_else(|| anyhow!("{pod}: no container named servant"))?;
    let mut env = BTreeMap::new();
    for from in container["envFrom"].as_array().into_iter().flatten() {
        let name = from["configMapRef"]["name"]
            .as_str()
            .ok_or_else(|| anyhow!("{pod}: envFrom other than a ConfigMap"))?;
        let map = find(docs, "ConfigMap", name)
            .ok_or_else(|| anyhow!("{pod}: ConfigMap {name} not found"))?;
        for (k, v) in map["data"].as_object().into_iter().flatten() {
            env.insert(k.clone(), v.as_str().unwrap_or_default().to_string());
        }
    }
    for var in container["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().unwrap_or_default().to_string();
        let value = if let Some(v) = var["value"].as_str() {
            expand_k8s(v, &env)
        } else if let Some(field) = var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            match field {
                "metadata.name" => pod.to_string(),
                "metadata.namespace" => namespace.to_string(),
                other => bail!("{pod}: fieldRef {other} is not emulated here"),
            }
        } else if var["valueFrom"]["secretKeyRef"].is_object() {
            let r = &var["valueFrom"]["secretKeyRef"];
            let secret = find(docs, "Secret", r["name"].as_str().unwrap_or_default())
                .ok_or_else(|| anyhow!("{pod}: Secret {} not found", r["name"]))?;
            let encoded = secret["data"][r["key"].as_str().unwrap_or_default()]
                .as_str()
                .ok_or_else(|| anyhow!("{pod}: Secret key {} not found", r["key"]))?;
            String::from_utf8(base64_decode(encoded)?)?
        } else if var["valueFrom"]["configMapKeyRef"].is_object() {
            let r = &var["valueFrom"]["configMapKeyRef"];
            let map = find(docs, "ConfigMap", r["name"].as_str().unwrap_or_default())
                .ok_or_else(|| anyhow!("{pod}: ConfigMap {} not found", r["name"]))?;
            map["data"][r["key"].as_str().unwrap_or_default()]
                .as_str()
                .ok_or_else(|| anyhow!("{pod}: ConfigMap key {} not found", r["key"]))?
                .to_string()
        } else {
            bail!("{pod}: env {name} has a source this test does not emulate");
        };
        env.insert(name, value);
    }

    // ConfigMap volumes become files; paths into them are rewritten.
    let mut rewrites = Vec::new();
    for mount in container["volumeMounts"].as_array().into_iter().flatten() {
        let volume = spec["volumes"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == mount["name"]));
        let claimed = workload["spec"]["volumeClaimTemplates"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["metadata"]["name"] == mount["name"]));
        let Some(volume) = volume else {
            ensure!(claimed, "{pod}: volume {} not declared", mount["name"]);
            continue;
        };
        let Some(map_name) = volume["configMap"]["name"].as_str() else {
            continue;
        };
        let map = find(docs, "ConfigMap", map_name)
            .ok_or_else(|| anyhow!("{pod}: ConfigMap {map_name} not found"))?;
        let mount_path = mount["mountPath"].as_str().unwrap_or_default();
        let local = scratch.join(pod).join(mount_path.trim_start_matches('/'));
        std::fs::create_dir_all(&local)?;
        for (key, content) in map["data"].as_object().into_iter().flatten() {
            std::fs::write(local.join(key), content.as_str().unwrap_or_default())?;
        }
        rewrites.push((mount_path.to_string(), local.display().to_string()));
    }
    let rewrite = |s: &str| {
        rewrites
            .iter()
            .find_map(|(from, to)| {
                s.strip_prefix(from.as_str())
                    .map(|rest| format!("{to}{rest}"))
            })
            .unwrap_or_else(|| s.to_string())
    };
    let args = container["args"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| rewrite(&expand_k8s(a.as_str().unwrap_or_default(), &env)))
        .collect();
    let env = env.into_iter().map(|(k, v)| (k, rewrite(&v))).collect();
    Ok(PodConfig {
        pod: pod.to_string(),
        args,
        env,
    })
}

/// Checks the probes and scrape annotations of a workload's pods.
fn check_pod_template(workload: &Value, what: &str) -> Result<()> {
    let template = &workload["spec"]["template"];
    let annotations = &template["metadata"]["annotations"];
    ensure!(
        annotations["prometheus.io/scrape"] == "true"
            && annotations["prometheus.io/port"] == "5100"
            && annotations["prometheus.io/path"] == "/metrics",
        "{what}: Prometheus scrape annotations"
    );
    let container = template["spec"]["containers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "servant"))
        .ok_or_else(|| anyhow!("{what}: no servant container"))?;
    let api_port = container["ports"]
        .as_array()
        .and_then(|ports| ports.iter().find(|p| p["name"] == "api"))
        .map(|p| p["containerPort"].clone());
    ensure!(
        api_port == Some(Value::from(5100)),
        "{what}: a port named api on 5100"
    );
    for (probe, path) in [("livenessProbe", "/livez"), ("readinessProbe", "/readyz")] {
        let get = &container[probe]["httpGet"];
        ensure!(
            get["path"] == path && get["port"] == "api",
            "{what}: {probe} must GET {path} on the api port, not {get}"
        );
    }
    Ok(())
}

#[test]
fn kubernetes_manifests_validate_and_their_configs_load() -> Result<()> {
    if skip_unless(
        venv_bin("kubernetes-validate").exists(),
        "kubernetes-validate in tests/py/.venv (tests/setup/deploy.sh installs it)",
    ) {
        return Ok(());
    }
    let root = root();
    let k8s = root.join("deploy/kubernetes");
    let scratch = tempfile::tempdir()?;
    let generated = scratch.path().join("generated");
    const NAMESPACE: &str = "servant";

    // The keys and bootnode list, as an operator makes them.
    let out = run(Command::new("bash")
        .arg(k8s.join("make-secrets.sh"))
        .args(["--namespace", NAMESPACE, "--out"])
        .arg(&generated)
        .env("SERVANT_BIN", servant_bin()))?;
    ensure!(
        out.status.success(),
        "make-secrets.sh: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let printed: Vec<String> = text(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("/dns4/"))
        .map(str::to_string)
        .collect();
    println!(
        "make-secrets.sh printed the bootnodes:\n  {}",
        printed.join("\n  ")
    );
    // Run twice, it must refuse: new keys would mean new PeerIds.
    let again = run(Command::new("bash")
        .arg(k8s.join("make-secrets.sh"))
        .arg("--out")
        .arg(&generated)
        .env("SERVANT_BIN", servant_bin()))?;
    ensure!(
        !again.status.success(),
        "make-secrets.sh overwrote its own output"
    );

    let mut files: Vec<PathBuf> = Vec::new();
    for dir in [&k8s, &generated] {
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect();
        found.sort();
        files.extend(found);
    }
    let docs = load_yaml(&files)?;

    // Against the schemas of the Kubernetes release kubernetes-validate bundles;
    // --strict also refuses fields the schemas do not know (a misspelt key).
    let out = run(Command::new(venv_bin("kubernetes-validate"))
        .arg("--strict")
        .args(&files))?;
    let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
    let passed = report
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count();
    ensure!(
        out.status.success()
            && passed == docs.len()
            && report.lines().all(|l| l.starts_with("INFO")),
        "kubernetes-validate --strict: {passed} of {} resources passed:\n{report}",
        docs.len()
    );
    println!("checked: kubernetes-validate --strict: all {passed} resources match the schemas");
    // The validator itself: a misspelt field must fail it.
    let bad = scratch.path().join("misspelt.yaml");
    std::fs::write(
        &bad,
        read(&k8s.join("servant-peer.yaml")).replace("readinessProbe:", "readinesProbe:"),
    )?;
    let out = run(Command::new(venv_bin("kubernetes-validate"))
        .arg("--strict")
        .arg(&bad))?;
    ensure!(
        !out.status.success(),
        "kubernetes-validate accepted a misspelt field"
    );

    // Stable identities: one key per StatefulSet pod, and the bootnodes name them.
    let sts = find(&docs, "StatefulSet", "servant-super")
        .ok_or_else(|| anyhow!("no StatefulSet servant-super"))?;
    let replicas = sts["spec"]["replicas"]
        .as_u64()
        .ok_or_else(|| anyhow!("StatefulSet replicas"))?;
    ensure!(
        sts["spec"]["podManagementPolicy"] == "Parallel",
        "super-peers are each other's bootnodes: ordered start-up would wait forever"
    );
    let headless = find(
        &docs,
        "Service",
        sts["spec"]["serviceName"].as_str().unwrap_or_default(),
    )
    .ok_or_else(|| anyhow!("the StatefulSet's serviceName has no Service"))?;
    ensure!(
        headless["spec"]["clusterIP"] == "None",
        "the governing Service is headless"
    );
    let secret = find(&docs, "Secret", "servant-super-identity")
        .ok_or_else(|| anyhow!("make-secrets.sh wrote no servant-super-identity Secret"))?;
    let bootnodes = find(&docs, "ConfigMap", "servant-bootnodes")
        .and_then(|m| m["data"]["SERVANT_BOOTNODES"].as_str())
        .ok_or_else(|| anyhow!("make-secrets.sh wrote no SERVANT_BOOTNODES"))?;
    let keys = scratch.path().join("keys");
    std::fs::create_dir_all(&keys)?;
    for i in 0..replicas {
        let pod = format!("servant-super-{i}");
        let encoded = secret["data"][format!("{pod}.key")]
            .as_str()
            .ok_or_else(|| anyhow!("no key for {pod} in the Secret"))?;
        let key = keys.join(format!("{pod}.key"));
        std::fs::write(&key, base64_decode(encoded)?)?;
        let out = run_cli(
            &["id", "--identity-file", key.to_str().expect("utf-8")],
            &[],
        );
        ensure!(out.status.success(), "servant id: {}", text(&out.stderr));
        let peer_id = text(&out.stdout).trim().to_string();
        let addr = format!("/dns4/{pod}.{NAMESPACE}.svc.cluster.local/tcp/4001/p2p/{peer_id}");
        ensure!(
            bootnodes.split(',').any(|b| b == addr) && printed.contains(&addr),
            "{addr} (from {pod}'s key) is not among the bootnodes: {bootnodes}"
        );
        // A Service for this pod alone, so its /p2p/ address reaches it.
        let service = find(&docs, "Service", &pod)
            .ok_or_else(|| anyhow!("no Service {pod} for the pod of the same name"))?;
        ensure!(
            service["spec"]["selector"]
                == serde_json::json!({ "statefulset.kubernetes.io/pod-name": pod }),
            "Service {pod} must select exactly pod {pod}"
        );
        ensure!(
            service["spec"]["publishNotReadyAddresses"] == true,
            "Service {pod}: a super-peer is not ready before the others reach it"
        );
    }
    ensure!(
        bootnodes.split(',').count() == replicas as usize,
        "one bootnode per super-peer: {bootnodes}"
    );
    println!(
        "checked: {replicas} super-peer keys, their PeerIds in the bootnodes, a Service per pod"
    );

    // Each pod's own configuration, as the node would load it.
    let deployment = find(&docs, "Deployment", "servant-peer")
        .ok_or_else(|| anyhow!("no Deployment servant-peer"))?;
    check_pod_template(sts, "StatefulSet servant-super")?;
    check_pod_template(deployment, "Deployment servant-peer")?;
    let mut pods = Vec::new();
    for i in 0..replicas {
        let pod = format!("servant-super-{i}");
        pods.push(pod_config(&docs, sts, &pod, NAMESPACE, scratch.path())?);
    }
    pods.push(pod_config(
        &docs,
        deployment,
        "servant-peer-5d8f7c9b4-x2x7q",
        NAMESPACE,
        scratch.path(),
    )?);
    for pod in &pods {
        let args: Vec<&str> = pod.args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = pod
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let effective = print_config(&args, &env, &pod.pod);
        for want in ["api = \"0.0.0.0:5100\"", "data_dir = \"/data\""] {
            ensure!(
                effective.contains(want),
                "{}: expected {want} in\n{effective}",
                pod.pod
            );
        }
        ensure!(
            bootnodes
                .split(',')
                .all(|b| effective.contains(&format!("\"{b}\""))),
            "{}: the bootnodes are not in its config:\n{effective}",
            pod.pod
        );
        if pod.pod.starts_with("servant-super-") {
            let own = format!(
                "\"/dns4/{}.{NAMESPACE}.svc.cluster.local/tcp/4001\"",
                pod.pod
            );
            for want in [
                "role = \"super\"",
                "identity_file = \"/run/servant/identity.key\"",
                own.as_str(),
            ] {
                ensure!(
                    effective.contains(want),
                    "{}: expected {want} in\n{effective}",
                    pod.pod
                );
            }
        }
        println!(
            "checked: pod {}'s config ({} SERVANT_* variables, flags {:?}) is valid",
            pod.pod,
            pod.env.keys().filter(|k| k.starts_with("SERVANT_")).count(),
            pod.args
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- Prometheus

/// The `expr:` of every rule in a Prometheus rule file, inline or as a `|` block.
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut exprs = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let indent = line.len() - line.trim_start().len();
        if let Some(rest) = line.trim_start().strip_prefix("expr:") {
            let rest = rest.trim();
            if rest.starts_with('|') || rest.starts_with('>') {
                let mut block = Vec::new();
                while i + 1 < lines.len() {
                    let next = lines[i + 1];
                    let next_indent = next.len() - next.trim_start().len();
                    if !next.trim().is_empty() && next_indent <= indent {
                        break;
                    }
                    block.push(next.trim());
                    i += 1;
                }
                exprs.push(block.join(" ").trim().to_string());
            } else {
                exprs.push(rest.trim_matches(|c| c == '\'' || c == '"').to_string());
            }
        }
        i += 1;
    }
    exprs
}

/// Alert names in a rule file.
fn alert_names(yaml: &str) -> Vec<String> {
    yaml.lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(|n| n.trim().to_string())
        .collect()
}

#[test]
fn alert_rules_pass_promtool() -> Result<()> {
    if skip_unless(
        has_program("promtool"),
        "promtool (Debian's prometheus package; tests/setup/prometheus.sh installs it)",
    ) {
        return Ok(());
    }
    let dir = root().join("deploy/prometheus");
    for args in [
        vec!["check", "rules", "alerts.yml"],
        vec!["test", "rules", "alerts_test.yml"],
        vec!["check", "config", "prometheus.yml"],
    ] {
        let out = run(Command::new("promtool").args(&args).current_dir(&dir))?;
        ensure!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            text(&out.stdout),
            text(&out.stderr)
        );
        println!("checked: promtool {} passes", args.join(" "));
    }

    // Every alert has a unit test in which it fires.
    let rules = read(&dir.join("alerts.yml"));
    let tests = read(&dir.join("alerts_test.yml"));
    let test_lines: Vec<&str> = tests.lines().map(str::trim).collect();
    let mut fired = BTreeSet::new();
    for (i, line) in test_lines.iter().enumerate() {
        if let Some(name) = line.strip_prefix("alertname:") {
            let expects = test_lines.get(i + 1).copied().unwrap_or_default();
            if expects == "exp_alerts:" {
                fired.insert(name.trim().to_string());
            }
        }
    }
    let names = alert_names(&rules);
    ensure!(
        rule_exprs(&rules).len() == names.len(),
        "one expr per alert"
    );
    let untested: Vec<&String> = names.iter().filter(|n| !fired.contains(*n)).collect();
    ensure!(
        untested.is_empty(),
        "alerts never seen firing in alerts_test.yml: {untested:?}"
    );
    println!(
        "checked: each of the {} alerts fires in a unit test",
        names.len()
    );
    Ok(())
}

// ------------------------------------------------------------------- Grafana

fn dashboard() -> Value {
    let path = root().join("deploy/grafana/servant-dashboard.json");
    serde_json::from_str(&read(&path)).expect("the dashboard is valid JSON")
}

/// Every panel, rows' nested panels included.
fn all_panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        out.push(panel);
        for inner in panel["panels"].as_array().into_iter().flatten() {
            out.push(inner);
        }
    }
    out
}

/// The PromQL of every panel target and query variable.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    let mut queries: Vec<String> = all_panels(dashboard)
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if var["type"] == "query" {
            let query = var["query"]["query"]
                .as_str()
                .or_else(|| var["query"].as_str());
            queries.extend(query.map(str::to_string));
        }
    }
    queries
}

/// Grafana's variables, replaced by values Prometheus accepts.
fn without_grafana_variables(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
        .replace("$job", "servant")
        .replace("$instance", ".+")
}

/// Removes `open`...`close` spans (not nested), keeping the delimiters.
fn blank_spans(s: &str, open: char, close: char) -> String {
    let mut out = String::new();
    let mut inside = false;
    for c in s.chars() {
        if c == open && !inside {
            inside = true;
            out.push(c);
        } else if c == close && inside {
            inside = false;
            out.push(c);
        } else if !inside {
            out.push(c);
        }
    }
    out
}

/// The metric names a PromQL expression (or a Grafana `label_values(...)` query)
/// selects: identifiers that are not functions, keywords or label names.
fn metric_names(expr: &str) -> BTreeSet<String> {
    // Operators, modifiers and aggregations, which may stand before a space rather
    // than a `(` (`sum by (le) (...)`).
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "group",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
    ];
    const GROUPING: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    // label_values(metric{...}, label): only the first argument names a metric.
    let expr = match expr.trim().strip_prefix("label_values(") {
        Some(args) => args.split(',').next().unwrap_or_default().to_string(),
        None => expr.to_string(),
    };
    // Strings (label values), label matchers and ranges name no metric.
    let mut unquoted = String::new();
    let mut in_string = false;
    let mut escaped = false;
    for c in expr.chars() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else {
            unquoted.push(c);
        }
    }
    let cleaned = blank_spans(&blank_spans(&unquoted, '{', '}'), '[', ']');
    // Tokens, each with whether a `(` follows it.
    let chars: Vec<char> = cleaned.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let mut skip_group_parens = false;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let token: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let call = j < chars.len() && chars[j] == '(';
            if GROUPING.contains(&token.as_str()) && call {
                skip_group_parens = true;
                continue;
            }
            let preceded_by_digit = start > 0 && chars[start - 1].is_ascii_digit();
            if !call && !preceded_by_digit && !KEYWORDS.contains(&token.as_str()) {
                names.insert(token);
            }
        } else if c == '(' && skip_group_parens {
            // A grouping clause lists label names: skip to its `)`.
            while i < chars.len() && chars[i] != ')' {
                i += 1;
            }
            skip_group_parens = false;
            i += 1;
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn metric_names_are_read_from_promql() {
    let names = metric_names(
        "histogram_quantile(0.9, sum by (le, instance) (rate(a_bucket{job=\"x\", le!=\"1\"}[5m]))) \
         / on (instance) group_left(version) b_info and c == bool 1e3 offset 5m",
    );
    assert_eq!(
        names,
        ["a_bucket", "b_info", "c"]
            .into_iter()
            .map(String::from)
            .collect::<BTreeSet<_>>()
    );
    assert_eq!(
        metric_names("label_values(servant_build_info{job=\"$job\"}, instance)"),
        BTreeSet::from(["servant_build_info".to_string()])
    );
    assert_eq!(
        metric_names("sum(rate(x_total[$__rate_interval])) by (reason)"),
        BTreeSet::from(["x_total".to_string()])
    );
}

#[test]
fn dashboard_is_a_grafana_dashboard_model() -> Result<()> {
    let dashboard = dashboard();
    for key in ["uid", "title"] {
        ensure!(
            dashboard[key].as_str().is_some_and(|s| !s.is_empty()),
            "the dashboard needs a {key}"
        );
    }
    ensure!(
        dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 30),
        "schemaVersion (a Grafana 8+ model)"
    );
    let vars = dashboard["templating"]["list"]
        .as_array()
        .ok_or_else(|| anyhow!("no templating.list"))?;
    let datasource = vars
        .iter()
        .find(|v| v["type"] == "datasource" && v["query"] == "prometheus")
        .ok_or_else(|| anyhow!("no Prometheus datasource variable"))?;
    let ds_name = datasource["name"].as_str().unwrap_or_default();
    let ds_refs = [format!("${{{ds_name}}}"), format!("${ds_name}")];

    let panels = all_panels(&dashboard);
    let mut ids = BTreeSet::new();
    let mut targets = 0;
    for panel in &panels {
        let title = panel["title"].as_str().unwrap_or_default();
        ensure!(
            ids.insert(
                panel["id"]
                    .as_u64()
                    .ok_or_else(|| anyhow!("{title}: no id"))?
            ),
            "{title}: duplicate panel id"
        );
        let pos = &panel["gridPos"];
        let (x, w) = (pos["x"].as_u64(), pos["w"].as_u64());
        ensure!(
            matches!((x, w), (Some(x), Some(w)) if w > 0 && x + w <= 24)
                && pos["h"].as_u64().is_some_and(|h| h > 0)
                && pos["y"].is_u64(),
            "{title}: gridPos {pos}"
        );
        if panel["type"] == "row" {
            continue;
        }
        ensure!(!title.is_empty(), "a panel without a title");
        let uses_variable = |ds: &Value| {
            ds["type"] == "prometheus"
                && ds["uid"]
                    .as_str()
                    .is_some_and(|u| ds_refs.iter().any(|r| r == u))
        };
        ensure!(
            uses_variable(&panel["datasource"]),
            "{title}: the panel's datasource must be the ${ds_name} variable"
        );
        let list = panel["targets"]
            .as_array()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| anyhow!("{title}: no targets"))?;
        for target in list {
            ensure!(
                target["refId"].as_str().is_some_and(|r| !r.is_empty())
                    && target["expr"]
                        .as_str()
                        .is_some_and(|e| !e.trim().is_empty()),
                "{title}: a target needs a refId and an expr: {target}"
            );
            targets += 1;
        }
    }

    // The queries parse: promtool reads each as a recording rule.
    if !skip_unless(
        has_program("promtool"),
        "promtool, to parse the dashboard's queries",
    ) {
        let dir = tempfile::tempdir()?;
        let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
        for (i, query) in dashboard_queries(&dashboard).iter().enumerate() {
            let query = without_grafana_variables(query);
            // label_values() is Grafana's, not PromQL: its metric selector parses.
            let query = match query.strip_prefix("label_values(") {
                Some(args) => args.split(',').next().unwrap_or_default().to_string(),
                None => query,
            };
            rules.push_str(&format!(
                "      - record: dashboard:query_{i}\n        expr: {}\n",
                serde_json::to_string(&query)?
            ));
        }
        let file = dir.path().join("dashboard-rules.yml");
        std::fs::write(&file, rules)?;
        let out = run(Command::new("promtool").args(["check", "rules"]).arg(&file))?;
        ensure!(
            out.status.success(),
            "a dashboard query does not parse:\n{}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        println!("checked: promtool parses every dashboard query");
    }
    println!(
        "checked: the dashboard is a Grafana model: uid {}, {} panels, {targets} queries, datasource variable ${ds_name}",
        dashboard["uid"],
        panels.len()
    );
    Ok(())
}

/// Families in exposition text, by name, with their type, from `# TYPE` lines:
/// prometheus-client prints them only for families that have samples.
fn families(exposition: &str) -> BTreeMap<String, String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            Some((parts.next()?.to_string(), parts.next()?.to_string()))
        })
        .collect()
}

/// Whether a series name in a query is one the families produce: a gauge as is,
/// a counter with `_total`, a histogram or summary with `_bucket`, `_sum`, `_count`.
fn exported(name: &str, families: &BTreeMap<String, String>) -> Option<String> {
    let candidates: [(&str, &[&str]); 4] = [
        ("", &["gauge", "unknown", "stateset"]),
        ("_total", &["counter"]),
        ("_bucket", &["histogram"]),
        ("_info", &["info"]),
    ];
    for (suffix, types) in candidates {
        if let Some(family) = name.strip_suffix(suffix) {
            if let Some(t) = families.get(family) {
                if types.contains(&t.as_str()) {
                    return Some(format!("{family} ({t})"));
                }
            }
        }
    }
    for suffix in ["_sum", "_count"] {
        if let Some(family) = name.strip_suffix(suffix) {
            if let Some(t) = families.get(family) {
                if t == "histogram" || t == "summary" {
                    return Some(format!("{family} ({t})"));
                }
            }
        }
    }
    None
}

/// Series Prometheus makes itself for every target.
const SCRAPE_SERIES: &[&str] = &["up"];

/// Labelled families a node exports only once an event has given them a sample,
/// where the event is not one this test makes happen on loopback in reasonable time.
/// They are checked against the node's own registry instead, with that event
/// recorded (see [`registry_after_events`]).
const EVENT_ONLY: &[(&str, &str)] = &[
    (
        "servant_holepunch_results_total",
        "after a hole punch, which needs a relayed connection (tests/tests/traversal.rs reads it live)",
    ),
    (
        "servant_reach_probes_total",
        "after the first reachability probe has ended",
    ),
];

/// The families of the node's metrics registry once the [`EVENT_ONLY`] events have
/// happened, as `/metrics` would export them.
fn registry_after_events() -> BTreeMap<String, String> {
    use servant::metrics::{Metrics, ReasonLabel};
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::register(&mut registry);
    metrics
        .nat
        .holepunch_results
        .get_or_create(&ReasonLabel { reason: "direct" })
        .inc();
    metrics
        .nat
        .probes
        .get_or_create(&ReasonLabel { reason: "reached" })
        .inc();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode the registry");
    families(&text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_name_only_metrics_live_nodes_export() -> Result<()> {
    const TOPIC: &str = "dash";
    let dashboard = dashboard();
    let mut wanted: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for query in dashboard_queries(&dashboard) {
        for name in metric_names(&query) {
            wanted.entry(name).or_default().insert("dashboard");
        }
    }
    let rules = read(&root().join("deploy/prometheus/alerts.yml"));
    for expr in rule_exprs(&rules) {
        for name in metric_names(&expr) {
            wanted.entry(name).or_default().insert("alerts");
        }
    }
    ensure!(wanted.len() > 20, "too few metric names found: {wanted:?}");

    // A network that does what the panels show: broadcasts (one of them
    // malformed), a shared file fetched, a search and a failed dial.
    let mut net = Net::new();
    let topic = vec!["--topic".to_string(), TOPIC.into()];
    let boot = net.spawn("boot", &topic).await?;
    let mut join = vec!["--bootnode".to_string(), net[boot].addr().to_string()];
    join.extend(topic.iter().cloned());
    let a = net.spawn("a", &join).await?;
    let b = net.spawn("b", &join).await?;
    {
        let net = &net;
        eventually(
            Duration::from_secs(30),
            "every node to be ready",
            || async move {
                for i in [boot, a, b] {
                    if net[i].readyz().await? != 200 {
                        return Ok(None);
                    }
                }
                Ok(Some(()))
            },
        )
        .await?;
        // Gossipsub needs its mesh before a broadcast goes anywhere: publish until
        // one arrives.
        let series = format!("servant_messages_received_total{{topic=\"{TOPIC}\"}}");
        eventually(
            Duration::from_secs(30),
            "boot to receive b's broadcast",
            || {
                let series = series.clone();
                async move {
                    net[b].publish(TOPIC, "dashboard", "hello").await.ok();
                    Ok((net[boot].metric(&series).await? >= 1.0).then_some(()))
                }
            },
        )
        .await?;
    }
    let hostile = GossipPeer::start(net[boot].addr(), TOPIC).await?;
    let hostile = &hostile;
    {
        let net = &net;
        let series =
            format!("servant_messages_rejected_total{{topic=\"{TOPIC}\",reason=\"malformed\"}}");
        eventually(
            Duration::from_secs(30),
            "boot to reject a malformed broadcast",
            || {
                let series = series.clone();
                async move {
                    hostile.publish(b"not an envelope".to_vec()).await.ok();
                    Ok((net[boot].metric(&series).await? >= 1.0).then_some(()))
                }
            },
        )
        .await?;
    }

    let file = net.dir().join("dashboard-file.bin");
    servant_tests::random_file(&file, 3 << 20, 7)?;
    let info = net[a].share(&file).await?;
    let events = net[b]
        .fetch(&info.id.to_hex(), &net.dir().join("fetched.bin"))
        .await?;
    ensure!(
        matches!(
            events.last(),
            Some(servant::fetch::Progress::Finished { .. })
        ),
        "b fetched a's file: {events:?}"
    );
    let hits = net[boot]
        .search("dashboard-file", 3, Duration::from_secs(3))
        .await?;
    ensure!(!hits.is_empty(), "boot's search found a's file");
    let nobody = libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id();
    let dead = format!("/ip4/127.0.0.1/tcp/{}/p2p/{nobody}", free_port());
    ensure!(
        net[b].connect(&dead).await.is_err(),
        "a dial to a closed port failed"
    );
    println!("live: broadcasts delivered and one rejected, a file shared and fetched, a search answered, a dial failed");

    let mut live: BTreeMap<String, String> = BTreeMap::new();
    for node in &net.nodes {
        live.extend(families(&node.metrics().await?));
    }
    let after_events = registry_after_events();
    let mut missing = Vec::new();
    let (mut from_live, mut from_registry) = (0, 0);
    for (name, users) in &wanted {
        let event_only = EVENT_ONLY.iter().find(|(n, _)| n == name);
        match (exported(name, &live), event_only) {
            (Some(family), _) => {
                println!("  {name:<50} {family}");
                from_live += 1;
            }
            (None, _) if SCRAPE_SERIES.contains(&name.as_str()) => {
                println!("  {name:<50} (Prometheus' own, per target)");
            }
            (None, Some((_, when))) if exported(name, &after_events).is_some() => {
                println!("  {name:<50} (registered by the node; exported {when})");
                from_registry += 1;
            }
            (None, _) => missing.push(format!("{name} (used by {users:?})")),
        }
    }
    ensure!(
        missing.is_empty(),
        "metrics named in deploy/ that no live node exports (a counter needs _total, a histogram \
         _bucket/_sum/_count):\n  {}",
        missing.join("\n  ")
    );
    println!(
        "checked: all {} metric names of the dashboard and the alert rules exist: {from_live} in live \
         nodes' /metrics, {from_registry} in the node's registry after their event, the rest are \
         Prometheus' own",
        wanted.len());
    net.pass();
    Ok(())
}
