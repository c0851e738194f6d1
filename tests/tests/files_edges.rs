//! File sharing at its edges: search reach and rate limits, the store quota, hostile
//! manifests, and a full disk.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{bail, Context, Result};
use servant::fetch::Progress;
use servant_protocol::manifest::{Entry, Hash, Kind, Manifest, MANIFEST_VERSION, MIN_CHUNK_SIZE};
use servant_tests::{
    eventually, file_peer::LyingProvider, hash_file, is_root, random_file, run_cli, skip_unless,
    Net,
};

/// Generates a key file and returns its PeerId.
fn key(dir: &Path, name: &str) -> Result<String> {
    let path = dir.join(format!("{name}.key"));
    let out = run_cli(
        &["key", "generate", "--out", path.to_str().context("path")?],
        &[],
    );
    if !out.status.success() {
        bail!("key generate: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_reaches_peers_within_its_ttl_and_floods_are_rate_limited() -> Result<()> {
    let mut net = Net::new();
    // A chain a - b - c - d, kept a chain by deny lists (else the DHT would connect
    // everyone to everyone).
    let names = ["a", "b", "c", "d"];
    let ids: Vec<String> = names
        .iter()
        .map(|n| key(net.dir(), n))
        .collect::<Result<_>>()?;
    let dir = net.dir().to_path_buf();
    let args = |i: usize, boot: Option<String>| -> Vec<String> {
        let mut a = vec![
            "--identity-file".to_string(),
            dir.join(format!("{}.key", names[i])).display().to_string(),
            "--search-rate-per-peer".into(),
            "10".into(),
        ];
        for (j, id) in ids.iter().enumerate() {
            if j + 1 < i || j > i + 1 {
                a.push("--deny-peer".into());
                a.push(id.clone());
            }
        }
        if let Some(boot) = boot {
            a.push("--bootnode".into());
            a.push(boot);
        }
        a
    };
    let mut nodes = Vec::new();
    let mut boot = None;
    for (i, name) in names.iter().enumerate() {
        let a = args(i, boot.clone());
        let n = net.spawn(name, &a).await?;
        boot = Some(net[n].addr().to_string());
        nodes.push(n);
    }
    let (a, b, c, d) = (nodes[0], nodes[1], nodes[2], nodes[3]);
    {
        let net = &net;
        eventually(
            Duration::from_secs(30),
            "the chain to form",
            || async move {
                let ok = net[b].peer_ids().await?.len() == 2
                    && net[c].peer_ids().await?.len() == 2
                    && net[a].peer_ids().await?.len() == 1
                    && net[d].peer_ids().await?.len() == 1;
                Ok(ok.then_some(()))
            },
        )
        .await?;
    }
    let src = net.dir().join("Needle-Report.txt");
    std::fs::write(&src, b"found me")?;
    let info = net[d].share(&src).await?;
    std::fs::write(net.dir().join("haystack.txt"), b"hay")?;
    net[c].share(&net.dir().join("haystack.txt")).await?;

    let window = Duration::from_secs(3);
    let hits = net[a].search("needle", 2, window).await?;
    assert!(
        hits.is_empty(),
        "ttl 2 reached d, three hops away: {hits:?}"
    );
    let hay = net[a].search("HAYSTACK", 2, window).await?;
    assert_eq!(hay.len(), 1, "ttl 2 should reach c: {hay:?}");
    println!("checked: a query with ttl 2 reaches c (two hops) and not d (three)");
    let hits = net[a].search("needle", 3, window).await?;
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!(hits[0].id, info.id);
    assert_eq!(hits[0].provider, net[d].id().to_string());
    println!("checked: with ttl 3 the hit comes back from d along the path d-c-b-a");

    // A flood of queries from a: b takes ten a minute from it and drops the rest.
    for _ in 0..30 {
        net[a].search("flood", 1, Duration::from_millis(10)).await?;
    }
    {
        let net = &net;
        eventually(
            Duration::from_secs(10),
            "b to rate-limit a",
            || async move {
                let limited = net[b].metric("servant_search_rate_limited_total").await?;
                Ok((limited >= 15.0).then_some(limited))
            },
        )
        .await?;
    }
    let forwarded = net[b].metric("servant_search_forwarded_total").await?;
    assert!(
        forwarded < 20.0,
        "b forwarded {forwarded} copies of a flood it should have cut"
    );
    println!("checked: b rate-limited a's flood of queries and forwarded only what it accepted");
    net.pass();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_evicts_fetched_content_and_never_shared() -> Result<()> {
    let mut net = Net::new();
    let p = net.spawn("provider", &[]).await?;
    let boot = net[p].addr().to_string();
    let f = net
        .spawn(
            "fetcher",
            &[
                "--bootnode".into(),
                boot,
                "--store-quota".into(),
                "12MiB".into(),
            ],
        )
        .await?;
    let dir = net.dir().to_path_buf();
    // The fetcher's own share is larger than its quota: pinned, it stays.
    random_file(&dir.join("mine.bin"), 24 * 1024 * 1024, 1)?;
    let mine = net[f].share(&dir.join("mine.bin")).await?;
    random_file(&dir.join("x.bin"), 8 * 1024 * 1024, 2)?;
    random_file(&dir.join("y.bin"), 8 * 1024 * 1024, 3)?;
    let x = net[p].share(&dir.join("x.bin")).await?;
    let y = net[p].share(&dir.join("y.bin")).await?;
    net[f].fetch(&x.id.to_hex(), &dir.join("x.out")).await?;
    let events = net[f].fetch(&y.id.to_hex(), &dir.join("y.out")).await?;
    assert!(
        matches!(events.last(), Some(Progress::Finished { .. })),
        "{events:?}"
    );
    let held: Vec<_> = net[f].shares().await?.into_iter().map(|c| c.id).collect();
    assert!(held.contains(&mine.id), "the pinned share was evicted");
    assert!(held.contains(&y.id), "the latest fetch was evicted");
    assert!(
        !held.contains(&x.id),
        "x should have been evicted: {held:?}"
    );
    assert!(net[f].metric("servant_store_evictions_total").await? >= 1.0);
    assert_eq!(
        hash_file(&dir.join("x.out"))?,
        hash_file(&dir.join("x.bin"))?
    );
    println!("checked: over its quota the store evicted the older fetch, kept the newer one and the pinned share");
    net.pass();
    Ok(())
}

fn manifest_for(name: &str, kind: Kind, files: &[(&str, &[u8])]) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut chunks = Vec::new();
    let entries = files
        .iter()
        .map(|(path, data)| {
            let hashes = data
                .chunks(MIN_CHUNK_SIZE as usize)
                .map(|c| {
                    chunks.push(c.to_vec());
                    Hash::of(c)
                })
                .collect();
            Entry {
                path: path.to_string(),
                size: data.len() as u64,
                chunks: hashes,
            }
        })
        .collect();
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        name: name.into(),
        kind,
        chunk_size: MIN_CHUNK_SIZE,
        entries,
    };
    (serde_json::to_vec(&manifest).unwrap_or_default(), chunks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_in_a_manifest_are_neutralized() -> Result<()> {
    let mut net = Net::new();
    let f = net.spawn("fetcher", &[]).await?;
    let out_dir = net.dir().join("downloads");
    std::fs::create_dir_all(&out_dir)?;

    // Paths that try to leave the output directory: the manifest is refused.
    let (escape, chunks) = manifest_for(
        "innocent",
        Kind::Dir,
        &[("ok.txt", b"fine"), ("sub/../../../escaped.txt", b"evil")],
    );
    let id = Manifest::id_of(&escape).to_hex();
    let peer = LyingProvider::serving(net[f].addr(), escape, Some(chunks)).await?;
    wait_connected(&net, f, peer.peer_id).await?;
    let events = net[f].fetch(&id, &out_dir.join("innocent")).await?;
    match events.last() {
        Some(Progress::Failed { error, .. }) => assert!(error.contains("not allowed"), "{error}"),
        other => bail!("a manifest with `..` was accepted: {other:?}"),
    }
    assert!(!net.dir().join("escaped.txt").exists() && !out_dir.join("escaped.txt").exists());
    println!(
        "checked: a manifest whose paths climb out with `..` is refused and nothing is written"
    );
    drop(peer);

    // Separators and control characters inside names become `_`, inside the output.
    let (odd, chunks) = manifest_for(
        "../../odd",
        Kind::Dir,
        &[("a\\..\\b.txt", b"one"), ("ctl\u{1}name.txt", b"two")],
    );
    let id = Manifest::id_of(&odd).to_hex();
    let peer = LyingProvider::serving(net[f].addr(), odd, Some(chunks)).await?;
    wait_connected(&net, f, peer.peer_id).await?;
    let out = out_dir.join("odd");
    let events = net[f].fetch(&id, &out).await?;
    assert!(
        matches!(events.last(), Some(Progress::Finished { .. })),
        "{events:?}"
    );
    assert_eq!(std::fs::read(out.join("a_.._b.txt"))?, b"one");
    assert_eq!(std::fs::read(out.join("ctl_name.txt"))?, b"two");
    let mut names: Vec<String> = std::fs::read_dir(&out_dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    names.sort();
    assert_eq!(names, ["odd"], "something was written beside the output");
    println!("checked: backslashes and control characters in remote names are neutralized inside the output directory");
    net.pass();
    Ok(())
}

async fn wait_connected(net: &Net, node: usize, peer: libp2p::PeerId) -> Result<()> {
    eventually(
        Duration::from_secs(10),
        "the test peer to connect",
        || async move { Ok(net[node].peer_ids().await?.contains(&peer).then_some(())) },
    )
    .await
}

/// Runs a command, failing with its output when it fails.
fn sh(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program).args(args).output()?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Unmounts the test's tmpfs however the test ends.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_gives_a_clear_error_and_a_later_resume_completes() -> Result<()> {
    if skip_unless(is_root(), "root (to mount a small tmpfs)") {
        return Ok(());
    }
    let mut net = Net::new();
    let p = net.spawn("provider", &[]).await?;
    let src = net.dir().join("data.bin");
    let expected = random_file(&src, 24 * 1024 * 1024, 5)?;
    let id = net[p].share(&src).await?.id.to_hex();

    // The fetcher's data dir and the output live on a 10 MiB tmpfs (a single file
    // fetched to a path is written only there: the store links it).
    let mount = net.dir().join("small");
    std::fs::create_dir_all(&mount)?;
    sh(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=10m",
            "tmpfs",
            mount.to_str().context("path")?,
        ],
    )?;
    let _guard = Mount(mount.clone());
    let f = net.add("fetcher", &["--bootnode".into(), net[p].addr().to_string()]);
    net[f].data_dir = mount.join("data");
    net[f].start().await?;
    let out = mount.join("out.bin");
    let events = net[f].fetch(&id, &out).await?;
    let Some(Progress::Failed {
        error, have_chunks, ..
    }) = events.last()
    else {
        bail!("the fetch did not fail on a full disk: {events:?}");
    };
    assert!(error.contains("disk full"), "unclear error: {error}");
    assert!(*have_chunks > 0, "no chunk kept");
    println!("checked: a full disk stops the fetch with: {error}");

    sh(
        "mount",
        &["-o", "remount,size=64m", mount.to_str().context("path")?],
    )?;
    let events = net[f].fetch(&id, &out).await?;
    let Some(Progress::Started { have_chunks, .. }) = events.first() else {
        bail!("{events:?}");
    };
    assert!(*have_chunks > 0, "the resume started from nothing");
    assert!(
        matches!(events.last(), Some(Progress::Finished { .. })),
        "{events:?}"
    );
    assert_eq!(hash_file(&out)?, expected);
    println!("checked: with room again the fetch resumed from {have_chunks} verified chunks and completed");
    net.pass();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_not_connected_is_found_through_the_dht() -> Result<()> {
    let mut net = Net::new();
    let boot = net.spawn("boot", &[]).await?;
    let boot_addr = net[boot].addr().to_string();
    let p = net
        .spawn("provider", &["--bootnode".into(), boot_addr.clone()])
        .await?;
    let src = net.dir().join("dht.bin");
    let expected = random_file(&src, 3 * 1024 * 1024, 9)?;
    // The fetcher keeps a single connection (to its bootnode), so the provider can
    // only be found through the provider record the bootnode holds.
    let f = net
        .spawn(
            "fetcher",
            &[
                "--bootnode".into(),
                boot_addr,
                "--conn-low".into(),
                "1".into(),
                "--conn-high".into(),
                "1".into(),
            ],
        )
        .await?;
    let provider = net[p].id();
    {
        let net = &net;
        eventually(
            Duration::from_secs(40),
            "the fetcher to hold only its bootnode",
            || async move {
                let peers = net[f].peer_ids().await?;
                Ok((peers.len() == 1 && !peers.contains(&provider)).then_some(()))
            },
        )
        .await?;
    }
    let id = net[p].share(&src).await?.id.to_hex();
    let out = net.dir().join("dht.out");
    let events = net[f].fetch(&id, &out).await?;
    let Some(Progress::Finished { providers, .. }) = events.last() else {
        bail!("{events:?}");
    };
    assert_eq!(providers.len(), 1);
    assert_eq!(providers[0].peer, provider.to_string());
    assert_eq!(hash_file(&out)?, expected);
    println!("checked: a provider the fetcher was not connected to was found through its DHT record and dialed");
    net.pass();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unshare_stops_announcing_and_serving() -> Result<()> {
    let mut net = Net::new();
    let p = net.spawn("provider", &[]).await?;
    let src = net.dir().join("gone.txt");
    std::fs::write(&src, b"soon gone")?;
    let info = net[p].share(&src).await?;
    assert_eq!(net[p].metric("servant_store_provided").await?, 1.0);
    let response = reqwest::Client::new()
        .post(format!("{}/v1/unshare", net[p].api_url()))
        .json(&serde_json::json!({ "id": info.id.to_hex() }))
        .send()
        .await?;
    assert!(response.status().is_success(), "{}", response.text().await?);
    assert_eq!(net[p].metric("servant_store_provided").await?, 0.0);
    assert!(net[p].shares().await?.is_empty());
    let blocks = net[p].data_dir.join("store/blocks");
    let left = std::fs::read_dir(&blocks)?
        .flatten()
        .map(|d| std::fs::read_dir(d.path()).map(|r| r.count()).unwrap_or(0))
        .sum::<usize>();
    assert_eq!(left, 0, "blocks left after unshare");
    println!("checked: unshare stops the provider announcement and deletes the content's blocks");
    net.pass();
    Ok(())
}

/// Sum of every `servant_dial_failures_total` series (all purposes) and the live task
/// count of a node.
async fn dial_failures_and_tasks(net: &Net, i: usize) -> Result<(f64, f64)> {
    let text = net[i].metrics().await?;
    let failures = text
        .lines()
        .filter(|l| l.starts_with("servant_dial_failures_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let tasks = servant_tests::metric_value(&text, "servant_tokio_alive_tasks").unwrap_or(0.0);
    Ok((failures, tasks))
}

/// A provider serving at 4 MiB/s (so a 40 MiB fetch lasts seconds), a fetcher
/// bootstrapped from it, and a 40 MiB random file `name` shared by the provider.
/// Returns the two nodes, the file and its content id.
async fn throttled_pair(
    net: &mut Net,
    name: &str,
    seed: u64,
) -> Result<(usize, usize, std::path::PathBuf, String)> {
    let p = net
        .spawn("provider", &["--serve-rate-per-peer".into(), "4MiB".into()])
        .await?;
    let f = net
        .spawn("fetcher", &["--bootnode".into(), net[p].addr().to_string()])
        .await?;
    let src = net.dir().join(name);
    random_file(&src, 40 * 1024 * 1024, seed)?;
    let id = net[p].share(&src).await?.id.to_hex();
    Ok((p, f, src, id))
}

/// `POST /v1/fetch` of `id` to `out` at node `i`, without following it.
async fn post_fetch(net: &Net, i: usize, id: &str, out: &Path) -> Result<reqwest::Response> {
    Ok(reqwest::Client::new()
        .post(format!("{}/v1/fetch", net[i].api_url()))
        .json(&serde_json::json!({ "id": id, "out": out }))
        .send()
        .await?)
}

/// The only provider dies mid-transfer and none takes its place: the fetch gives up
/// after its stall timeout with the verified part kept, and meanwhile it asks the dead
/// provider again at a bounded pace. (A retry loop once re-dialed a vanished provider
/// after every failure, a dial storm the soak found as hundreds of tasks.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_whose_provider_died_gives_up_without_a_dial_storm() -> Result<()> {
    let mut net = Net::new();
    let (p, f, _, id) = throttled_pair(&mut net, "dies.bin", 33).await?;
    let out = net.dir().join("dies.out");
    let mut stream = net[f].fetch_stream(&id, &out).await?;
    let mut killed_at = None;
    let mut before = (0.0, 0.0);
    let mut peak_tasks = 0.0f64;
    let mut last = None;
    let mut sample = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            event = stream.recv() => {
                let Some(event) = event else { break };
                if let Progress::Progress { done_bytes, .. } = &event {
                    if killed_at.is_none() && *done_bytes > 8 * 1024 * 1024 {
                        before = dial_failures_and_tasks(&net, f).await?;
                        net[p].kill();
                        killed_at = Some(std::time::Instant::now());
                    }
                }
                last = Some(event);
            }
            _ = sample.tick(), if killed_at.is_some() => {
                let (_, tasks) = dial_failures_and_tasks(&net, f).await?;
                peak_tasks = peak_tasks.max(tasks);
            }
        }
    }
    let Some(killed_at) = killed_at else {
        bail!("the fetch ended before the provider could be killed: {last:?}");
    };
    let gave_up_after = killed_at.elapsed();
    let Some(Progress::Failed {
        error, have_chunks, ..
    }) = &last
    else {
        bail!("the fetch did not fail: {last:?}");
    };
    let (after_failures, _) = dial_failures_and_tasks(&net, f).await?;
    let failed_dials = after_failures - before.0;
    println!(
        "checked: the fetch gave up {:.1} s after its only provider died, keeping {have_chunks} \
         verified chunks: {error}",
        gave_up_after.as_secs_f64()
    );
    assert!(
        error.contains("no provider left"),
        "the error should say no provider is left: {error}"
    );
    assert!(
        gave_up_after <= Duration::from_secs(45),
        "gave up only after {gave_up_after:?} (stall timeout 30 s)"
    );
    assert!(*have_chunks > 0, "the verified part was kept");
    // One failed dial a second at most while the fetch waited (failures within a
    // second count as one), with room for the DHT's own lookups.
    let bound = gave_up_after.as_secs_f64() + 20.0;
    println!(
        "checked: {failed_dials} failed dials and at most {peak_tasks} tasks (from {}) while it \
         waited (bound {bound:.0} dials)",
        before.1
    );
    assert!(
        failed_dials <= bound,
        "{failed_dials} failed dials in {gave_up_after:?}: a dial storm"
    );
    net.pass();
    Ok(())
}

/// One fetch per content at a time: a second fetch of the same ID while the first runs
/// is refused with a clear error (the API's 409, the CLI's message and exit status) and
/// disturbs nothing; once the first has finished, a fetch to another path succeeds
/// byte-identical with the provider gone (a local copy). A fetch whose client went
/// away while it looked for providers frees its content at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_fetch_of_the_same_content_is_refused_while_the_first_runs() -> Result<()> {
    let mut net = Net::new();
    // Throttled, so the first fetch is still running when the second is asked for.
    let (p, f, src, id) = throttled_pair(&mut net, "twice.bin", 34).await?;
    let first_out = net.dir().join("first.bin");
    let second_out = net.dir().join("second.bin");
    let mut first = net[f].fetch_stream(&id, &first_out).await?;
    // Wait until the first fetch has moved bytes, then ask again.
    loop {
        match first.recv().await {
            Some(Progress::Progress { done_bytes, .. }) if done_bytes > 0 => break,
            Some(Progress::Finished { .. }) => bail!("the first fetch ended too soon"),
            Some(Progress::Failed { error, .. }) => bail!("the first fetch failed: {error}"),
            Some(_) => {}
            None => bail!("the first fetch's stream ended"),
        }
    }
    let refused = post_fetch(&net, f, &id, &second_out).await?;
    let status = refused.status();
    let body = refused.text().await?;
    assert_eq!(status, reqwest::StatusCode::CONFLICT, "{body}");
    assert!(body.contains("already being fetched"), "{body}");
    let api = net[f].api_url().replace("http://", "");
    let second = second_out.to_str().context("path")?;
    let cli = run_cli(&["fetch", &id, "-o", second, "--api", &api], &[]);
    let stderr = String::from_utf8_lossy(&cli.stderr);
    assert_eq!(
        cli.status.code(),
        Some(1),
        "the CLI's second fetch: {stderr}"
    );
    assert!(stderr.contains("already being fetched"), "{stderr}");
    assert!(!second_out.exists(), "a refused fetch wrote its output");
    println!(
        "checked: a second fetch of a running one is refused: {}",
        stderr.trim()
    );
    // The first fetch is undisturbed.
    let mut last = None;
    while let Some(event) = first.recv().await {
        last = Some(event);
    }
    assert!(
        matches!(last, Some(Progress::Finished { .. })),
        "the first fetch did not finish: {last:?}"
    );
    assert_eq!(hash_file(&first_out)?, hash_file(&src)?);
    // Then the same content to another path, with the provider gone: a local copy.
    net[p].kill();
    let events = net[f].fetch(&id, &second_out).await?;
    assert!(
        matches!(events.last(), Some(Progress::Finished { .. })),
        "{events:?}"
    );
    assert_eq!(hash_file(&second_out)?, hash_file(&src)?);
    println!(
        "checked: after the first fetch finished, a fetch to another path succeeded \
         with the provider gone"
    );

    // A fetch nobody can serve looks for providers for 30 s, reporting nothing. Its
    // client goes away (the CLI killed, as by Ctrl-C): the content is free again at
    // once, not when the search would have given up.
    let nobody = Hash::of(b"content nobody provides").to_hex();
    let api = net[f].api_url().replace("http://", "");
    let out = net.dir().join("nobody.bin");
    let mut cli = Command::new(servant_tests::servant_bin())
        .args(["fetch", &nobody, "-o", out.to_str().context("path")?])
        .args(["--api", &api, "--json"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let refused = post_fetch(&net, f, &nobody, &out).await?;
    assert_eq!(
        refused.status(),
        reqwest::StatusCode::CONFLICT,
        "the first search should still be running"
    );
    drop(refused);
    cli.kill()?;
    cli.wait()?;
    let killed = std::time::Instant::now();
    eventually(
        Duration::from_secs(5),
        "the content of a fetch whose client went away to be free",
        || async {
            let response = post_fetch(&net, f, &nobody, &out).await?;
            Ok((response.status() != reqwest::StatusCode::CONFLICT).then_some(()))
        },
    )
    .await?;
    println!(
        "checked: the client of a fetch still looking for providers went away; the content \
         was free {} ms later",
        killed.elapsed().as_millis()
    );
    net.pass();
    Ok(())
}
