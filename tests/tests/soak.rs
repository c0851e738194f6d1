//! The CI soak: `servant-bench soak` at 10x churn, ten measured minutes after a
//! fifteen-minute warm-up, with `--check`.
//!
//! Real `servant` processes (the debug build `cargo test` makes) leave and come back
//! every 3 s while broadcasts, shares and fetches go on; the nodes that stay must
//! show no memory, descriptor or task growth and no panic (see the bench's `soak`
//! module for the criteria and how each is measured). Every criterion but memory
//! counts the warm-up's samples too.
//!
//! About 27 minutes in all, so `tests/run-all.sh` starts it in the background as soon
//! as the build is done and the other tests run beside it.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use servant_tests::servant_bin;

/// Load and churn before the measured minutes. A node's resident memory rises for its
/// first ten minutes or so while its windowed caches fill and its heap finds the most
/// connections it will hold at once; from a cold start five minutes are all warm-up
/// (about 2 MiB per 10 minutes), and after ten the slope was still near the target on
/// one node in eight (README, Soak).
const WARMUP: &str = "15m";

/// The measured load. Resident memory still rises in one step of 0.2-0.3 MB when a node
/// meets a new high of connections, rarer as a run goes on but not gone after the
/// warm-up: over five measured minutes (a 4-minute slope window) such a step near the
/// window's middle alone makes about 1.1 MiB per 10 minutes; over ten, about 0.55.
const MEASURED: &str = "10m";

/// Criteria the node misses today, measured and printed but not asserted; every
/// other criterion is. Empty: add one only with the README saying why, and delete it
/// once it passes (the test says when it does).
const KNOWN_FAILING: &[&str] = &[];

#[test]
fn ci_soak_after_warm_up() -> Result<()> {
    // Under cargo's target directory, so a failed run's report and table stay there
    // to read (the table says where the nodes' logs were kept).
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("soak.json");
    let started = Instant::now();
    // The bench prints its progress on stderr and the table on stdout; both pass
    // through to the test's output.
    let status = Command::new(env!("CARGO_BIN_EXE_servant-bench"))
        .args(["soak", "--warmup", WARMUP, "--duration", MEASURED])
        .args(["--churn-multiplier", "10"])
        .arg("--servant-bin")
        .arg(servant_bin())
        .arg("--out")
        .arg(&out)
        .args(KNOWN_FAILING.iter().flat_map(|k| ["--known-failing", k]))
        .arg("--check")
        .status()
        .context("run servant-bench soak")?;
    let took = started.elapsed();
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&out).with_context(|| format!("read {}", out.display()))?,
    )?;
    let criteria = report["criteria"]
        .as_array()
        .context("no criteria in the report")?;
    for c in criteria {
        println!(
            "checked: {} = {} ({}; worst node {}): {}",
            c["name"].as_str().unwrap_or("?"),
            c["measured"],
            c["target"].as_str().unwrap_or("?"),
            c["node"].as_str().unwrap_or("?"),
            if c["pass"] == true { "pass" } else { "FAIL" }
        );
    }
    println!("report: {}", out.display());
    println!(
        "checked: the soak ran {:.0} s of load and churn, {} churn starts, {} broadcasts; the \
         whole test took {:.0} s",
        report["load_secs"].as_f64().unwrap_or(0.0),
        report["churn"]["started"],
        report["load"]["broadcasts_ok"],
        took.as_secs_f64()
    );
    // Eight criteria: memory slope and growth, descriptors under load and after,
    // tasks after, panics, deaths, streams after. Fewer would mean one went unchecked.
    assert_eq!(criteria.len(), 8, "criteria: {criteria:?}");
    assert!(
        report["load_secs"].as_f64().unwrap_or(0.0) >= Duration::from_secs(590).as_secs_f64(),
        "the load ran {} s, not {MEASURED}",
        report["load_secs"]
    );
    let mut failed = Vec::new();
    for c in criteria {
        let name = c["name"].as_str().unwrap_or("?");
        let pass = c["pass"] == true;
        let known = KNOWN_FAILING.iter().any(|k| name.starts_with(k));
        match (pass, known) {
            (false, false) => failed.push(name.to_string()),
            (true, true) => println!("note: '{name}' passes now: remove it from KNOWN_FAILING"),
            (false, true) => println!("known failing, not asserted: '{name}' (README, Soak)"),
            (true, false) => {}
        }
    }
    assert!(
        failed.is_empty(),
        "the soak failed {failed:?} ({status}); see the table above"
    );
    // The bench's own `--check` must agree: only known-failing criteria missed.
    assert!(status.success(), "servant-bench soak --check: {status}");
    Ok(())
}
