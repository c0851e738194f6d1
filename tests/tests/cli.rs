//! The command line as an operator meets it: configuration errors (exit 2, naming the
//! key and the value, nothing started), precedence of flag > env > file > default,
//! identity keys, the data dir's format and lock, and the API's token off localhost.

use std::{os::unix::fs::PermissionsExt, time::Duration};

use anyhow::Result;
use servant_tests::{run_cli, Net};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts exit status 2 and that stderr names every one of `words`.
fn assert_config_error(out: &std::process::Output, words: &[&str]) {
    let text = stderr(out);
    assert_eq!(out.status.code(), Some(2), "exit status; stderr: {text}");
    for word in words {
        assert!(text.contains(word), "stderr should name {word:?}: {text}");
    }
}

#[test]
fn bad_config_exits_2_naming_key_and_value_and_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_arg = data.to_str().unwrap();

    // A flag.
    let out = run_cli(&["run", "--data-dir", data_arg, "--conn-low", "abc"], &[]);
    assert_config_error(&out, &["--conn-low", "abc"]);
    // An environment variable is named as such.
    let out = run_cli(
        &["run", "--data-dir", data_arg],
        &[("SERVANT_CONN_HIGH", "lots")],
    );
    assert_config_error(&out, &["SERVANT_CONN_HIGH", "lots"]);
    let out = run_cli(
        &["run", "--data-dir", data_arg],
        &[("SERVANT_MAX_MESSAGE_AGE", "soon")],
    );
    assert_config_error(&out, &["SERVANT_MAX_MESSAGE_AGE", "soon"]);
    // A file: unknown key, mistyped value.
    let file = dir.path().join("servant.toml");
    std::fs::write(&file, "conn_lwo = 3\n").unwrap();
    let out = run_cli(
        &[
            "run",
            "--data-dir",
            data_arg,
            "--config",
            file.to_str().unwrap(),
        ],
        &[],
    );
    assert_config_error(&out, &["conn_lwo"]);
    std::fs::write(&file, "max_message_age = \"soon\"\n").unwrap();
    let out = run_cli(
        &[
            "run",
            "--data-dir",
            data_arg,
            "--config",
            file.to_str().unwrap(),
        ],
        &[],
    );
    assert_config_error(&out, &["max_message_age", "soon"]);
    std::fs::write(&file, "api = \"localhost-ish\"\n").unwrap();
    let out = run_cli(
        &[
            "run",
            "--data-dir",
            data_arg,
            "--config",
            file.to_str().unwrap(),
        ],
        &[],
    );
    assert_config_error(&out, &["api", "localhost-ish"]);
    // Values that contradict each other.
    let out = run_cli(
        &[
            "run",
            "--data-dir",
            data_arg,
            "--conn-low",
            "40",
            "--conn-high",
            "10",
        ],
        &[],
    );
    assert_config_error(&out, &["conn_low", "40", "conn_high"]);
    let out = run_cli(
        &[
            "run",
            "--data-dir",
            data_arg,
            "--max-connections",
            "100",
            "--conn-high",
            "50",
            "--max-connections-per-ip",
            "101",
        ],
        &[],
    );
    assert_config_error(&out, &["max_connections_per_ip", "101", "max_connections"]);
    let out = run_cli(
        &[
            "run",
            "--data-dir",
            data_arg,
            "--max-connections-per-peer",
            "1",
            "--serve-concurrency-per-peer",
            "500",
        ],
        &[],
    );
    assert_config_error(&out, &["serve_concurrency_per_peer", "500", "160"]);
    // A bootnode without its PeerId.
    let out = run_cli(
        &[
            "run",
            "--data-dir",
            data_arg,
            "--bootnode",
            "/ip4/127.0.0.1/tcp/4001",
        ],
        &[],
    );
    assert_config_error(&out, &["bootnodes", "/ip4/127.0.0.1/tcp/4001", "/p2p/"]);
    // A missing config file.
    let out = run_cli(&["run", "--config", "/nonexistent/servant.toml"], &[]);
    assert_config_error(&out, &["/nonexistent/servant.toml"]);

    assert!(!data.exists(), "a bad config must not create the data dir");
    println!(
        "checked: bad flags, env values, file keys and contradictions exit 2 naming key and value"
    );
}

#[test]
fn precedence_is_flag_env_file_default() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("servant.toml");
    std::fs::write(
        &file,
        "conn_low = 3\nconn_high = 20\ntopics = [\"from-file\"]\nmax_message_age = \"2m\"\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let key = |text: &str, key: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key} = ")))
            .unwrap_or_default()
            .to_string()
    };

    let out = run_cli(&["run", "--config", f, "--print-config"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(key(&text, "conn_low"), "3", "file over default");
    assert_eq!(key(&text, "max_clock_skew"), "\"30s\"", "default");
    assert_eq!(key(&text, "max_message_age"), "\"2m\"");

    let out = run_cli(
        &["run", "--config", f, "--print-config"],
        &[("SERVANT_CONN_LOW", "4"), ("SERVANT_TOPICS", "a,b")],
    );
    let text = stdout(&out);
    assert_eq!(key(&text, "conn_low"), "4", "env over file");
    assert_eq!(key(&text, "topics"), "[\"a\", \"b\"]");

    let out = run_cli(
        &["run", "--config", f, "--print-config", "--conn-low", "5"],
        &[("SERVANT_CONN_LOW", "4")],
    );
    assert_eq!(key(&stdout(&out), "conn_low"), "5", "flag over env");

    // The printed config is itself a valid config file.
    let printed = dir.path().join("printed.toml");
    std::fs::write(&printed, stdout(&out)).unwrap();
    let again = run_cli(
        &[
            "run",
            "--config",
            printed.to_str().unwrap(),
            "--print-config",
        ],
        &[],
    );
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(stdout(&again), stdout(&out));
    println!("checked: flag > env > file > default, and --print-config reads back");
}

#[test]
fn identity_keys() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("node.key");
    let k = key.to_str().unwrap();
    let out = run_cli(&["key", "generate", "--out", k], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let peer_id = stdout(&out).trim().to_string();
    assert!(peer_id.starts_with("12D3KooW"), "{peer_id}");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let out = run_cli(&["id", "--identity-file", k], &[]);
    assert_eq!(stdout(&out).trim(), peer_id);
    let out = run_cli(&["id", "--identity-file", k, "--json"], &[]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["peer_id"], peer_id.as_str());

    let before = std::fs::read(&key).unwrap();
    let out = run_cli(&["key", "generate", "--out", k], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("already exists"));
    assert_eq!(std::fs::read(&key).unwrap(), before, "never overwritten");

    let data = dir.path().join("fresh");
    let out = run_cli(&["id", "--data-dir", data.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no identity yet"), "{}", stderr(&out));
    println!("checked: key generate (0600, no overwrite) and id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_key_and_data_dir_problems_stop_startup() -> Result<()> {
    let mut net = Net::new();
    let a = net.spawn("a", &[]).await?;
    let id = net[a].id();
    let data_dir = net[a].data_dir.clone();

    // A second process on the same data dir is refused while the first runs.
    let out = run_cli(
        &[
            "run",
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--api",
            "127.0.0.1:0",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("in use by another servant process"),
        "{}",
        stderr(&out)
    );

    // Restart after SIGKILL keeps the PeerId (the harness checks it).
    net[a].kill();
    net[a].start().await?;
    assert_eq!(net[a].id(), id);
    net[a].kill();

    // A corrupt key stops startup with a clear error and stays untouched.
    let key = data_dir.join("identity.key");
    std::fs::write(&key, b"garbage")?;
    let err = net[a].start().await.expect_err("must not start");
    let text = format!("{err:#}");
    assert!(
        text.contains("corrupt") && text.contains("identity.key"),
        "{text}"
    );
    assert_eq!(std::fs::read(&key)?, b"garbage");

    // An unreadable key too.
    std::fs::remove_file(&key)?;
    std::fs::create_dir(&key)?;
    let err = net[a].start().await.expect_err("must not start");
    assert!(
        format!("{err:#}").contains("cannot read identity key"),
        "{err:#}"
    );
    std::fs::remove_dir(&key)?;

    // A data dir written by a future format is refused.
    std::fs::write(data_dir.join("FORMAT"), "servant-data-format 2\n")?;
    let err = net[a].start().await.expect_err("must not start");
    assert!(format!("{err:#}").contains("format"), "{err:#}");
    println!("checked: lock, corrupt and unreadable key, and data-dir format stop startup with clear errors");
    net.pass();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_off_localhost_needs_a_token_but_probes_stay_open() -> Result<()> {
    let mut net = Net::new();
    let a = net.add("a", &[]);
    let port = net[a].api_port;
    net[a].api_host = "0.0.0.0".into();
    net[a].start().await?;
    let http = reqwest::Client::new();
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    for open in ["/metrics", "/livez", "/readyz"] {
        let status = http.get(url(open)).send().await?.status();
        assert_eq!(status, 200, "{open} stays open");
    }
    let status = http.get(url("/v1/status")).send().await?.status();
    assert_eq!(status, 401, "/v1/ needs the token");
    let wrong = http
        .get(url("/v1/status"))
        .bearer_auth("nope")
        .send()
        .await?
        .status();
    assert_eq!(wrong, 401);
    let token_file = net[a].data_dir.join("api.token");
    let mode = std::fs::metadata(&token_file)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let token = std::fs::read_to_string(&token_file)?.trim().to_string();
    let ok = http
        .get(url("/v1/status"))
        .bearer_auth(&token)
        .send()
        .await?
        .status();
    assert_eq!(ok, 200);

    // The CLI finds the token in the data dir, or takes it from the environment.
    let api = format!("127.0.0.1:{port}");
    let data = net[a].data_dir.to_str().unwrap().to_string();
    let out = run_cli(
        &["status", "--api", &api, "--json"],
        &[("SERVANT_DATA_DIR", &data)],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run_cli(&["peers", "--api", &api], &[("SERVANT_API_TOKEN", &token)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run_cli(
        &["status", "--api", &api],
        &[("SERVANT_API_TOKEN", "wrong")],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("401"), "{}", stderr(&out));
    println!(
        "checked: off localhost /v1/ needs the bearer token; /metrics, /livez, /readyz stay open"
    );

    // A client with no node behind its address says so.
    let out = run_cli(&["status", "--api", "127.0.0.1:9"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("cannot reach"), "{}", stderr(&out));
    tokio::time::sleep(Duration::from_millis(10)).await;
    net.pass();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() -> Result<()> {
    let mut net = Net::new();
    let a = net.add("a", &["--log-format".into(), "json".into()]);
    net[a].start().await?;
    let (status, _) = net[a].terminate()?;
    assert!(status.success());
    let log = net[a].log();
    let mut lines = 0;
    for line in log.lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            value.get("level").is_some() && value.get("timestamp").is_some(),
            "{line}"
        );
        lines += 1;
    }
    assert!(lines >= 3, "{log}");
    assert!(log.contains("\"message\":\"stopped\""), "{log}");
    println!("checked: --log-format json writes {lines} JSON lines, through to the clean stop");
    net.pass();
    Ok(())
}
