//! Replays the fuzz corpora (fuzz/corpus/<target>/*) and the generated seeds through
//! the same per-input functions the libFuzzer targets run (servant_tests::fuzz), so
//! every input a fuzzer kept, and every crash it once found, is checked by an
//! ordinary `cargo test` on the stable toolchain.
//!
//! `SERVANT_WRITE_SEEDS=1 cargo test -p servant-tests --test fuzz_corpus committed_seeds`
//! (re)writes the generated seeds into the corpus directories; without it the test
//! checks that the committed ones are current.

use std::{
    panic::{catch_unwind, AssertUnwindSafe},
    path::{Path, PathBuf},
};

use servant_tests::fuzz::{seeds, Target, TARGETS};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// Runs `run` on `data`; a panic comes back as its message.
fn check(run: Target, data: &[u8]) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(|| run(data))).map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic without a message".into())
    })
}

#[test]
fn every_target_has_a_corpus() {
    for (target, _) in TARGETS {
        let dir = corpus_dir(target);
        let files = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .count();
        assert!(files > 0, "{} is empty", dir.display());
    }
}

#[test]
fn corpora_replay_without_panics() {
    let mut failures = Vec::new();
    let mut total = 0;
    for (target, run) in TARGETS {
        let dir = corpus_dir(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut count = 0;
        for entry in entries {
            let path = entry.expect("read the corpus directory").path();
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if let Err(message) = check(*run, &data) {
                failures.push(format!("{target} {}: {message}", path.display()));
            }
            count += 1;
        }
        println!("{target}: replayed {count} inputs");
        total += count;
    }
    assert!(
        failures.is_empty(),
        "{} of {total} corpus inputs fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn seeds_run_without_panics() {
    let seeds = seeds();
    for (target, _) in TARGETS {
        assert!(
            seeds.iter().any(|s| s.target == *target),
            "no seed for {target}"
        );
    }
    let mut failures = Vec::new();
    for seed in &seeds {
        let run = TARGETS
            .iter()
            .find(|(t, _)| *t == seed.target)
            .map(|(_, run)| *run)
            .unwrap_or_else(|| panic!("seed for unknown target {}", seed.target));
        if let Err(message) = check(run, &seed.data) {
            failures.push(format!("{} {}: {message}", seed.target, seed.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every generated seed is in the committed corpus as `fuzz/corpus/<target>/seed-<name>`,
/// byte for byte, so the fuzzers start from the current encodings. With
/// `SERVANT_WRITE_SEEDS=1` the test (re)writes them instead of checking.
#[test]
fn committed_seeds_match_the_generated_ones() {
    let write = std::env::var_os("SERVANT_WRITE_SEEDS").is_some_and(|v| v == "1");
    let mut stale = Vec::new();
    for seed in seeds() {
        let dir = corpus_dir(seed.target);
        let path = dir.join(format!("seed-{}", seed.name));
        if write {
            std::fs::create_dir_all(&dir).expect("create the corpus directory");
            std::fs::write(&path, &seed.data).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            println!("wrote {}", path.display());
        } else if std::fs::read(&path).ok().as_deref() != Some(&seed.data[..]) {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "seeds missing or stale in the corpus (rerun with SERVANT_WRITE_SEEDS=1): {stale:?}"
    );
}
