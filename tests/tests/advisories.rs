//! The advisory gate (tests/advisories.sh) checked from the outside: it passes on our
//! Cargo.lock, and fails on a lockfile with a known-vulnerable crate or with a
//! libp2p-gossipsub below the floor kept for advisories newer than the database.
//! The gossipsub floor is also checked here directly, without cargo-audit, so it
//! holds on machines where the gate itself has to skip.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use servant_tests::skip_unless;

/// The fixes for GHSA-g3g5-x568-qvqx (0.50.0) and GHSA-vrx6-jcp8-vm7m (0.50.1).
const GOSSIPSUB_FLOOR: (u64, u64, u64) = (0, 50, 1);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the repository")
        .to_path_buf()
}

fn database() -> PathBuf {
    std::env::var_os("SERVANT_ADVISORY_DB")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared/advisory-db"))
}

/// Whether the gate can run here (it needs both); skips loudly (fails in CI) if not.
fn gate_unavailable() -> bool {
    let audit = Command::new("cargo")
        .args(["audit", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    skip_unless(audit, "cargo-audit (bash tests/setup/audit.sh)")
        || skip_unless(
            database().join("crates").is_dir(),
            "the offline advisory database (SERVANT_ADVISORY_DB or ../shared/advisory-db)",
        )
}

/// Runs the gate on a copy of the repository's policy with `lock` as Cargo.lock.
fn gate_on(lock: &str) -> Output {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(dir.path().join("tests")).expect("tests dir");
    for file in ["tests/advisories.sh", "tests/advisories.toml"] {
        std::fs::copy(repo().join(file), dir.path().join(file)).expect("copy the gate");
    }
    std::fs::write(dir.path().join("Cargo.lock"), lock).expect("write Cargo.lock");
    Command::new("bash")
        .arg(dir.path().join("tests/advisories.sh"))
        .env("SERVANT_ADVISORY_DB", database())
        .output()
        .expect("run bash")
}

fn real_lock() -> String {
    std::fs::read_to_string(repo().join("Cargo.lock")).expect("read Cargo.lock")
}

/// Versions of `name` in a Cargo.lock (a crate may be locked at several).
fn locked_versions(lock: &str, name: &str) -> Vec<String> {
    let mut versions = Vec::new();
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line.trim() == format!("name = \"{name}\"") {
            if let Some(version) = lines
                .next()
                .and_then(|l| l.trim().strip_prefix("version = \""))
                .and_then(|v| v.strip_suffix('"'))
            {
                versions.push(version.to_string());
            }
        }
    }
    versions
}

/// `lock` with every locked version of `name` replaced by `version`.
fn with_version(lock: &str, name: &str, version: &str) -> String {
    let mut out = String::with_capacity(lock.len());
    let mut after_name = false;
    for line in lock.lines() {
        if after_name && line.starts_with("version = ") {
            out.push_str(&format!("version = \"{version}\"\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
        after_name = line == format!("name = \"{name}\"");
    }
    out
}

fn parse_version(text: &str) -> (u64, u64, u64) {
    let core = text.split('-').next().unwrap_or(text);
    let mut parts = core.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

#[test]
fn gossipsub_is_at_least_0_50_1() {
    let versions = locked_versions(&real_lock(), "libp2p-gossipsub");
    assert!(
        !versions.is_empty(),
        "libp2p-gossipsub is not in Cargo.lock"
    );
    for version in versions {
        assert!(
            parse_version(&version) >= GOSSIPSUB_FLOOR,
            "libp2p-gossipsub {version} in Cargo.lock is older than 0.50.1, which fixes \
             GHSA-g3g5-x568-qvqx and GHSA-vrx6-jcp8-vm7m"
        );
    }
}

#[test]
fn gate_passes_on_our_lockfile() {
    if gate_unavailable() {
        return;
    }
    let out = gate_on(&real_lock());
    assert!(
        out.status.success(),
        "the gate fails on Cargo.lock:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn gate_fails_on_a_vulnerable_crate() {
    if gate_unavailable() {
        return;
    }
    // smallvec 0.6.9: RUSTSEC-2019-0009 and others, none of them ignored.
    let lock = real_lock()
        + "\n[[package]]\nname = \"smallvec\"\nversion = \"0.6.9\"\n\
           source = \"registry+https://github.com/rust-lang/crates.io-index\"\n";
    let out = gate_on(&lock);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the gate passed a vulnerable crate");
    assert!(stderr.contains("RUSTSEC-2019-0009"), "{stderr}");
    println!("checked: the gate refuses smallvec 0.6.9:\n{stderr}");
}

#[test]
fn gate_fails_below_the_gossipsub_floor() {
    if gate_unavailable() {
        return;
    }
    let lock = with_version(&real_lock(), "libp2p-gossipsub", "0.50.0");
    assert_eq!(locked_versions(&lock, "libp2p-gossipsub"), ["0.50.0"]);
    let out = gate_on(&lock);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the gate passed gossipsub 0.50.0");
    assert!(
        stderr.contains("libp2p-gossipsub 0.50.0 is below 0.50.1"),
        "{stderr}"
    );
}
