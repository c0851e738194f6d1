//! A real Prometheus server (Debian's `prometheus`; `tests/setup/prometheus.sh`
//! installs it) scrapes two nodes' `/metrics` every second. Prometheus must accept
//! the OpenMetrics text without a single scrape error, and what it stores must equal
//! what the test did and what the nodes report through their API.
//!
//! The test starts its own Prometheus process: its own config, storage and log in the
//! test's temporary directory, on a free port of 127.0.0.1. It never touches a system
//! Prometheus or port 9090.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;
use servant_tests::{eventually, free_port, metric_value, skip_unless, tail, Net};

const TOPIC: &str = "prom-news";
/// Messages the publisher sends.
const N: usize = 7;

/// One Prometheus server process; killed when dropped (also when the test fails).
struct Prometheus {
    child: Option<Child>,
    port: u16,
    log: PathBuf,
    http: reqwest::Client,
    passed: bool,
}

impl Prometheus {
    /// Writes a config scraping `targets` (name, port on 127.0.0.1) every second and
    /// starts `prometheus` with storage and log under `dir`.
    fn start(dir: &Path, targets: &[(&str, u16)]) -> Result<Prometheus> {
        std::fs::create_dir_all(dir.join("data"))?;
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: servant\n    metrics_path: /metrics\n    static_configs:\n",
        );
        for (name, port) in targets {
            config.push_str(&format!(
                "      - targets: ['127.0.0.1:{port}']\n        labels: {{node: '{name}'}}\n"
            ));
        }
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config)?;
        let port = free_port();
        let log = dir.join("prometheus.log");
        let log_file = File::create(&log)?;
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            // Debug logs every failed scrape with its parse error.
            .arg("--log.level=debug")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("spawn prometheus")?;
        Ok(Prometheus {
            child: Some(child),
            port,
            log,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
            passed: false,
        })
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails with the log's tail if the process has exited.
    fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            bail!(
                "prometheus exited ({status}); log:\n{}",
                tail(&self.log, 30)
            );
        }
        Ok(())
    }

    /// Waits for `/-/ready`.
    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.check_running()?;
            let ready = self
                .http
                .get(format!("{}/-/ready", self.url()))
                .send()
                .await;
            if matches!(ready, Ok(ref r) if r.status().is_success()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "prometheus not ready after 20 s; log:\n{}",
                    tail(&self.log, 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// GET an `/api/v1/` path; returns `data` of a `"status": "success"` answer.
    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Result<Value> {
        let response = self
            .http
            .get(format!("{}/api/v1/{path}", self.url()))
            .query(query)
            .send()
            .await?;
        let status = response.status();
        let body: Value = response
            .json()
            .await
            .with_context(|| format!("decode /api/v1/{path} ({status})"))?;
        ensure!(
            body["status"] == "success",
            "/api/v1/{path} {query:?}: {status}: {body}"
        );
        Ok(body["data"].clone())
    }

    /// An instant query: every series' labels and value.
    async fn query(&self, promql: &str) -> Result<Vec<(Value, f64)>> {
        let data = self.api("query", &[("query", promql)]).await?;
        ensure!(
            data["resultType"] == "vector",
            "{promql}: not a vector: {data}"
        );
        data["result"]
            .as_array()
            .ok_or_else(|| anyhow!("{promql}: no result: {data}"))?
            .iter()
            .map(|r| {
                let value = r["value"][1]
                    .as_str()
                    .ok_or_else(|| anyhow!("{promql}: no value in {r}"))?
                    .parse::<f64>()?;
                Ok((r["metric"].clone(), value))
            })
            .collect()
    }

    /// The single value of `promql`, failing if it selects no series or several.
    async fn value(&self, promql: &str) -> Result<f64> {
        let result = self.query(promql).await?;
        match result.as_slice() {
            [(_, v)] => Ok(*v),
            _ => bail!("{promql}: expected one series, got {result:?}"),
        }
    }

    /// The server's own `/metrics` (classic text format).
    async fn own_metrics(&self) -> Result<String> {
        Ok(self
            .http
            .get(format!("{}/metrics", self.url()))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?)
    }

    fn pass(&mut self) {
        self.passed = true;
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if !self.passed {
            eprintln!(
                "----- prometheus log, last lines ({}) -----\n{}",
                self.log.display(),
                tail(&self.log, 40)
            );
        }
    }
}

fn prometheus_available() -> bool {
    Command::new("prometheus")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Sample names (`foo_total`, `foo_bucket`, ...) in exposition text.
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// What a family's `# TYPE`, `# UNIT` and `# HELP` lines say.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct FamilyMeta {
    kind: String,
    unit: String,
    help: String,
}

/// Families by name, from the descriptor lines of OpenMetrics text.
fn families(text: &str) -> BTreeMap<String, FamilyMeta> {
    let mut out: BTreeMap<String, FamilyMeta> = BTreeMap::new();
    for line in text.lines() {
        let mut parts = line.splitn(4, ' ');
        let (Some("#"), Some(keyword), Some(name)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let rest = parts.next().unwrap_or("").to_string();
        let entry = out.entry(name.to_string()).or_default();
        match keyword {
            "TYPE" => entry.kind = rest,
            "UNIT" => entry.unit = rest,
            "HELP" => entry.help = rest,
            _ => {}
        }
    }
    out
}

/// The Accept header Prometheus 2.42 sends with every scrape.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,\
    application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_two_nodes() -> Result<()> {
    if skip_unless(
        prometheus_available(),
        "prometheus (run tests/setup/prometheus.sh)",
    ) {
        return Ok(());
    }
    let started = Instant::now();
    let mut net = Net::new();
    let boot = net.spawn("boot", &[]).await?;
    let boot_addr = net[boot].addr().to_string();
    let node = net.spawn("node", &["--bootnode".into(), boot_addr]).await?;
    let (publisher, receiver) = (node, boot);

    // Both subscribe; wait until each has the other in its mesh.
    let _pub_sub = net[publisher].subscribe(TOPIC).await?;
    let mut recv_sub = net[receiver].subscribe(TOPIC).await?;
    for i in [publisher, receiver] {
        let net = &net;
        eventually(
            Duration::from_secs(20),
            &format!("{} to have a mesh peer on {TOPIC}", net[i].name),
            || async move {
                let status = net[i].status().await?;
                Ok(status
                    .topics
                    .iter()
                    .any(|t| t.name == TOPIC && t.mesh_peers >= 1)
                    .then_some(()))
            },
        )
        .await?;
    }

    // N messages; the receiver gets each from the network exactly once.
    let origin = net[publisher].id().to_string();
    let mut sent = BTreeSet::new();
    for n in 0..N {
        let delivery = net[publisher]
            .publish(TOPIC, "metrics", &format!("message {n}"))
            .await?;
        sent.insert(delivery.envelope.id);
    }
    let mut got = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < N && Instant::now() < deadline {
        if let Some(d) = recv_sub.next(Duration::from_millis(500)).await {
            if d.from.is_some() && d.envelope.origin == origin {
                assert!(got.insert(d.envelope.id), "a message arrived twice");
            }
        }
    }
    assert_eq!(got, sent, "the receiver got a different set of messages");
    println!("checked: {N} messages published by node, received by boot");

    // The nodes' own view, through their API, before Prometheus looks.
    let published_series = format!("servant_messages_published_total{{topic=\"{TOPIC}\"}}");
    let received_series = format!("servant_messages_received_total{{topic=\"{TOPIC}\"}}");
    assert_eq!(net[publisher].metric(&published_series).await?, N as f64);
    assert_eq!(net[receiver].metric(&received_series).await?, N as f64);
    for i in [publisher, receiver] {
        let net = &net;
        eventually(
            Duration::from_secs(20),
            &format!("{} to be bootstrapped with one peer", net[i].name),
            || async move {
                let s = net[i].status().await?;
                Ok(
                    (s.connected_peers == 1 && s.routing_table_size == 1 && s.bootstrapped)
                        .then_some(()),
                )
            },
        )
        .await?;
    }

    // Prometheus, scraping both nodes every second.
    let prom_started = Instant::now();
    let mut prom = Prometheus::start(
        &net.dir().join("prometheus"),
        &[("boot", net[boot].api_port), ("node", net[node].api_port)],
    )?;
    prom.wait_ready().await?;
    let instances: Vec<(usize, String)> = [boot, node]
        .into_iter()
        .map(|i| (i, format!("127.0.0.1:{}", net[i].api_port)))
        .collect();
    {
        let prom = &prom;
        eventually(
            Duration::from_secs(20),
            "prometheus to scrape both nodes three times",
            || async move {
                let counts = prom
                    .query("count_over_time(up{job=\"servant\"}[1m])")
                    .await?;
                Ok((counts.len() == 2 && counts.iter().all(|(_, c)| *c >= 3.0)).then_some(()))
            },
        )
        .await?;
    }
    println!(
        "checked: prometheus ready and scraped both nodes 3 times, {:.1} s after its start",
        prom_started.elapsed().as_secs_f64()
    );

    // Targets: all up, no error.
    let targets = prom.api("targets", &[("state", "active")]).await?;
    let active = targets["activeTargets"]
        .as_array()
        .ok_or_else(|| anyhow!("no activeTargets: {targets}"))?;
    assert_eq!(active.len(), 2, "active targets: {active:?}");
    for t in active {
        let instance = &t["labels"]["instance"];
        assert_eq!(t["health"], "up", "target {instance}: {t}");
        assert_eq!(t["lastError"], "", "target {instance}: {t}");
        assert_eq!(t["scrapePool"], "servant", "target {instance}: {t}");
    }
    println!("checked: /api/v1/targets: 2 active targets, health up, lastError empty");

    // up and scrape_samples_scraped per node.
    for (i, instance) in &instances {
        let up = prom
            .value(&format!("up{{instance=\"{instance}\"}}"))
            .await?;
        assert_eq!(up, 1.0, "up of {}", net[*i].name);
        let samples = prom
            .value(&format!(
                "scrape_samples_scraped{{instance=\"{instance}\"}}"
            ))
            .await?;
        assert!(samples > 0.0, "{} scraped {samples} samples", net[*i].name);
        let min_up = prom
            .value(&format!("min_over_time(up{{instance=\"{instance}\"}}[1m])"))
            .await?;
        assert_eq!(min_up, 1.0, "{} was down in some scrape", net[*i].name);
        println!(
            "checked: {}: up = 1 in every scrape, scrape_samples_scraped = {samples}",
            net[*i].name
        );
    }

    // Values equal what the test did and what the nodes say.
    let sel = |i: usize| format!("instance=\"127.0.0.1:{}\"", net[i].api_port);
    let published = prom
        .value(&format!(
            "servant_messages_published_total{{{},topic=\"{TOPIC}\"}}",
            sel(publisher)
        ))
        .await?;
    assert_eq!(published, N as f64, "published at the publisher");
    let received = prom
        .value(&format!(
            "servant_messages_received_total{{{},topic=\"{TOPIC}\"}}",
            sel(receiver)
        ))
        .await?;
    assert_eq!(received, N as f64, "received at the receiver");
    let latency_count = prom
        .value(&format!(
            "servant_message_latency_seconds_count{{{}}}",
            sel(receiver)
        ))
        .await?;
    assert_eq!(
        latency_count, N as f64,
        "latency observations at the receiver"
    );
    // Nothing the other way round, and nothing rejected anywhere.
    for (promql, what) in [
        (
            format!(
                "servant_messages_published_total{{{},topic=\"{TOPIC}\"}}",
                sel(receiver)
            ),
            "published at the receiver",
        ),
        (
            format!(
                "servant_messages_received_total{{{},topic=\"{TOPIC}\"}}",
                sel(publisher)
            ),
            "received at the publisher",
        ),
        (
            "sum(servant_messages_rejected_total)".to_string(),
            "rejected",
        ),
    ] {
        let total: f64 = prom.query(&promql).await?.iter().map(|(_, v)| v).sum();
        assert_eq!(total, 0.0, "{what}: {promql}");
    }
    println!(
        "checked: published_total = {N} at node, received_total = {N} and \
         message_latency_seconds_count = {N} at boot, nothing the other way, nothing rejected"
    );

    for (i, _) in &instances {
        let status = net[*i].status().await?;
        let name = &net[*i].name;
        let q = |family: &str| format!("{family}{{{}}}", sel(*i));
        let connected = prom.value(&q("servant_connected_peers")).await?;
        assert_eq!(
            connected, status.connected_peers as f64,
            "{name} connected_peers"
        );
        assert_eq!(connected, 1.0, "{name} connected_peers");
        let routing = prom.value(&q("servant_routing_table_peers")).await?;
        assert_eq!(
            routing, status.routing_table_size as f64,
            "{name} routing table"
        );
        let bootstrapped = prom.value(&q("servant_bootstrapped")).await?;
        assert_eq!(
            bootstrapped,
            f64::from(u8::from(status.bootstrapped)),
            "{name} bootstrapped"
        );
        let ready = prom.value(&q("servant_ready")).await?;
        assert_eq!(ready, f64::from(u8::from(status.ready)), "{name} ready");

        let build = prom.query(&q("servant_build_info")).await?;
        let [(labels, value)] = build.as_slice() else {
            bail!("{name}: servant_build_info: {build:?}");
        };
        assert_eq!(*value, 1.0, "{name} build_info");
        let version = status
            .agent
            .strip_prefix("servant/")
            .ok_or_else(|| anyhow!("agent {}", status.agent))?;
        assert_eq!(labels["version"], version, "{name} build_info version");

        let rss = prom.value(&q("process_resident_memory_bytes")).await?;
        let fds = prom.value(&q("process_open_fds")).await?;
        assert!(rss > 1e6, "{name} resident memory {rss}");
        assert!(fds > 0.0, "{name} open fds {fds}");
        // The split of resident memory and the allocator's own figures, which tell
        // a leak from memory the allocator keeps (README, Soak).
        let anon = prom.value(&q("servant_resident_anon_memory_bytes")).await?;
        assert!(
            anon > 0.0 && anon < rss,
            "{name} anonymous resident {anon} of {rss}"
        );
        let heap = prom.value(&q("servant_heap_in_use_bytes")).await?;
        let free = prom.value(&q("servant_heap_free_bytes")).await?;
        let mapped = prom.value(&q("servant_heap_mapped_bytes")).await?;
        assert!(heap > 0.0, "{name} heap in use {heap}");
        assert!(
            free >= 0.0 && mapped >= 0.0,
            "{name} heap free {free}, mapped {mapped}"
        );
        println!(
            "checked: {name}: connected_peers = {connected} (= /v1/status), \
             routing_table_peers = {routing}, bootstrapped = {bootstrapped}, ready = {ready}, \
             build_info{{version=\"{version}\"}} = 1, rss = {:.1} MB (anon {:.1} MB), open fds \
             = {fds}, heap in use {:.1} MB, free {:.1} MB, mapped {:.1} MB",
            rss / 1e6,
            anon / 1e6,
            heap / 1e6,
            free / 1e6,
            mapped / 1e6
        );
    }

    // What Prometheus is served: OpenMetrics, for the Accept header it sends.
    let http = reqwest::Client::new();
    for (i, _) in &instances {
        let response = http
            .get(format!("{}/metrics", net[*i].api_url()))
            .header("Accept", PROMETHEUS_ACCEPT)
            .timeout(Duration::from_secs(5))
            .send()
            .await?
            .error_for_status()?;
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert_eq!(
            content_type, "application/openmetrics-text; version=1.0.0; charset=utf-8",
            "{} /metrics content type",
            net[*i].name
        );
        let body = response.text().await?;
        assert!(
            body.ends_with("# EOF\n"),
            "{} /metrics lacks # EOF",
            net[*i].name
        );
    }
    println!("checked: both nodes answer Prometheus's Accept header with OpenMetrics 1.0.0 ending in # EOF");

    // Every sample name a node exposes arrived in Prometheus under the same name, and
    // every family's type, unit and help as the node wrote them (nothing lost, renamed
    // or retyped by the OpenMetrics parser).
    let fetched_at = unix_now();
    let mut exposed = BTreeSet::new();
    let mut exposed_families = BTreeMap::new();
    for (i, _) in &instances {
        let text = net[*i].metrics().await?;
        exposed.extend(sample_names(&text));
        exposed_families.extend(families(&text));
    }
    {
        let prom = &prom;
        eventually(
            Duration::from_secs(10),
            "a scrape of both nodes after reading their /metrics",
            || async move {
                let last = prom.query("timestamp(up{job=\"servant\"})").await?;
                Ok((last.len() == 2 && last.iter().all(|(_, t)| *t > fetched_at)).then_some(()))
            },
        )
        .await?;
    }
    let stored: BTreeSet<String> = prom
        .api("label/__name__/values", &[])
        .await?
        .as_array()
        .ok_or_else(|| anyhow!("no names"))?
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let missing: Vec<&String> = exposed.difference(&stored).collect();
    assert!(
        missing.is_empty(),
        "sample names exposed by the nodes but not stored by Prometheus: {missing:?}"
    );
    println!(
        "checked: all {} sample names the nodes expose are stored by Prometheus under the same names",
        exposed.len()
    );
    let metadata = prom.api("metadata", &[]).await?;
    let mut wrong = Vec::new();
    for (name, family) in &exposed_families {
        let stored: Vec<FamilyMeta> = metadata[name.as_str()]
            .as_array()
            .map(|entries| {
                entries
                    .iter()
                    .map(|m| FamilyMeta {
                        kind: m["type"].as_str().unwrap_or_default().to_string(),
                        unit: m["unit"].as_str().unwrap_or_default().to_string(),
                        help: m["help"].as_str().unwrap_or_default().to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        // Help text is compared only where OpenMetrics escaping cannot differ.
        let matches = |m: &FamilyMeta| {
            m.kind == family.kind
                && m.unit == family.unit
                && (family.help.contains('\\') || m.help == family.help)
        };
        if stored.is_empty() || !stored.iter().all(matches) {
            wrong.push(format!(
                "{name}: node says {family:?}, prometheus has {stored:?}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "families whose metadata Prometheus stored differently:\n{}",
        wrong.join("\n")
    );
    println!(
        "checked: all {} families' TYPE, UNIT and HELP are stored by Prometheus as the nodes wrote them",
        exposed_families.len()
    );

    // Prometheus's own error counters for scrapes and ingestion are all zero.
    let own = prom.own_metrics().await?;
    for required in [
        "prometheus_target_scrapes_exceeded_sample_limit_total",
        "prometheus_target_scrapes_sample_out_of_order_total",
        "prometheus_target_scrapes_sample_duplicate_timestamp_total",
        "prometheus_target_scrapes_sample_out_of_bounds_total",
    ] {
        ensure!(
            metric_value(&own, required).is_some(),
            "prometheus does not expose {required}"
        );
    }
    let mut counters = Vec::new();
    for line in own.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let error_counter = series.starts_with("prometheus_target_scrapes_")
            || series.starts_with("prometheus_target_scrape_pool_exceeded_")
            || series.starts_with("prometheus_target_scrape_pools_failed_total")
            || series.starts_with("prometheus_target_scrape_pool_reloads_failed_total")
            || series.starts_with("prometheus_tsdb_out_of_order_samples_total")
            || series.starts_with("prometheus_tsdb_out_of_bound_samples_total");
        if error_counter {
            let value: f64 = value.parse()?;
            assert_eq!(value, 0.0, "prometheus counts scrape errors: {line}");
            counters.push(series.to_string());
        }
    }
    println!(
        "checked: {} prometheus scrape/ingest error counters are 0 ({})",
        counters.len(),
        counters.join(", ")
    );

    // And its log has no parse or ingest complaint.
    prom.check_running()?;
    let log = prom.log();
    let complaints: Vec<&str> = log
        .lines()
        .filter(|l| {
            let lower = l.to_ascii_lowercase();
            l.contains("level=error")
                || (l.contains("level=warn") && l.contains("scrape"))
                || lower.contains("invalid")
                || lower.contains("append failed")
                || lower.contains("scrape failed")
                || lower.contains("error on ingesting")
                || lower.contains("out of order")
                || lower.contains("duplicate sample")
        })
        .collect();
    assert!(
        complaints.is_empty(),
        "prometheus log complains:\n{}",
        complaints.join("\n")
    );
    println!(
        "checked: prometheus log ({} lines, debug level) has no error, invalid, scrape or ingest complaint",
        log.lines().count()
    );

    println!("total time {:.1} s", started.elapsed().as_secs_f64());
    prom.pass();
    drop(prom);
    net.pass();
    Ok(())
}
