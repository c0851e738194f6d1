//! File sharing end to end: real nodes share, find and fetch content over
//! `/servant/file/1.0.0`, verified chunk by chunk.

use std::{path::Path, time::Duration};

use anyhow::{bail, Context, Result};
use servant::fetch::Progress;
use servant_tests::{eventually, file_peer::LyingProvider, hash_file, random_file, Net};

/// Starts a provider and `n` more nodes joined through it.
async fn network(net: &mut Net, names: &[&str], extra: &[String]) -> Result<Vec<usize>> {
    let first = net.spawn(names[0], extra).await?;
    let boot = net[first].addr().to_string();
    let mut all = vec![first];
    for name in &names[1..] {
        let mut args = vec!["--bootnode".to_string(), boot.clone()];
        args.extend(extra.iter().cloned());
        all.push(net.spawn(name, &args).await?);
    }
    Ok(all)
}

fn finished(events: &[Progress]) -> Result<&Progress> {
    match events.last() {
        Some(done @ Progress::Finished { .. }) => Ok(done),
        other => bail!("fetch did not finish: {other:?}"),
    }
}

fn same_tree(a: &Path, b: &Path) -> Result<()> {
    let mut left: Vec<_> = walk(a)?;
    let mut right: Vec<_> = walk(b)?;
    left.sort_by(|a, b| a.0.cmp(&b.0));
    right.sort_by(|a, b| a.0.cmp(&b.0));
    let names = |v: &[(String, blake3::Hash)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&left), names(&right), "different file lists");
    assert_eq!(left, right, "different contents");
    Ok(())
}

fn walk(root: &Path) -> Result<Vec<(String, blake3::Hash)>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
                out.push((rel, hash_file(&path)?));
            }
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_provider_files_and_a_directory_arrive_byte_identical() -> Result<()> {
    let mut net = Net::new();
    let nodes = network(&mut net, &["provider", "fetcher"], &[]).await?;
    let (provider, fetcher) = (nodes[0], nodes[1]);
    let src = net.dir().join("src");
    std::fs::create_dir_all(src.join("tree/nested/deeper"))?;
    std::fs::write(src.join("empty.bin"), b"")?;
    std::fs::write(src.join("small.txt"), b"a small file for everyone\n")?;
    let big_len = 300 * 1024 * 1024 + 12_345;
    random_file(&src.join("big.bin"), big_len, 7)?;
    std::fs::write(src.join("tree/a.txt"), b"alpha")?;
    std::fs::write(src.join("tree/nested/empty"), b"")?;
    random_file(
        &src.join("tree/nested/deeper/b.bin"),
        3 * 1024 * 1024 + 1,
        8,
    )?;

    let out = net.dir().join("out");
    std::fs::create_dir_all(&out)?;
    for name in ["empty.bin", "small.txt", "big.bin", "tree"] {
        let info = net[provider].share(&src.join(name)).await?;
        let events = net[fetcher]
            .fetch(&info.id.to_hex(), &out.join(name))
            .await?;
        let done = finished(&events)?;
        if let Progress::Finished { size, .. } = done {
            assert_eq!(*size, info.size, "{name}: size");
        }
        if name == "tree" {
            same_tree(&src.join(name), &out.join(name))?;
        } else {
            assert_eq!(
                hash_file(&src.join(name))?,
                hash_file(&out.join(name))?,
                "{name} differs"
            );
        }
        println!(
            "checked: {name} ({} bytes) arrived byte-identical",
            info.size
        );
    }
    // A complete fetch makes the fetcher a provider too, and the provider's shares
    // are pinned while the fetcher's copies are not.
    let fetched = net[fetcher].shares().await?;
    assert_eq!(fetched.len(), 4);
    assert!(fetched.iter().all(|c| c.complete && !c.pinned));
    assert!(net[provider].shares().await?.iter().all(|c| c.pinned));
    let verified = net[fetcher]
        .metric("servant_file_chunks_verified_total")
        .await?;
    assert!(verified >= 300.0, "chunks verified: {verified}");
    println!("checked: fetched content is stored unpinned and counted in metrics");

    // A fetched single file is kept only at its output (the store links it; no
    // blocks), and the fetcher serves it from there once the sharer is gone.
    let big = fetched
        .iter()
        .find(|c| c.name == "big.bin")
        .context("big.bin not among the fetcher's contents")?;
    assert_eq!(big.path.as_deref(), Some(out.join("big.bin").as_path()));
    assert!(fetched.iter().any(|c| c.name == "tree" && c.path.is_none()));
    let blocks = net[fetcher].data_dir.join("store/blocks");
    let block_files: usize = std::fs::read_dir(&blocks)?
        .map(|d| Ok(std::fs::read_dir(d?.path())?.count()))
        .sum::<Result<usize>>()?;
    assert!(
        block_files < 8,
        "{block_files} blocks stored: only the directory's should be"
    );
    let boot = net[fetcher].addr().to_string();
    let second = net.spawn("second", &["--bootnode".into(), boot]).await?;
    net[provider].kill();
    let again = net.dir().join("again.bin");
    let events = net[second].fetch(&big.id.to_hex(), &again).await?;
    finished(&events)?;
    assert_eq!(hash_file(&again)?, hash_file(&src.join("big.bin"))?);
    println!(
        "checked: {block_files} blocks stored for 4 fetches; big.bin was kept only at its \
         output and served from there to another node"
    );
    net.pass();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_providers_share_the_load_and_a_liar_is_caught() -> Result<()> {
    let mut net = Net::new();
    let nodes = network(&mut net, &["p1", "p2", "p3", "fetcher"], &[]).await?;
    let fetcher = nodes[3];
    let src = net.dir().join("data.bin");
    let expected = random_file(&src, 48 * 1024 * 1024, 11)?;
    let mut id = String::new();
    for &p in &nodes[..3] {
        id = net[p].share(&src).await?.id.to_hex();
    }
    // The liar holds the true manifest (so it passes for a provider) and connects
    // to the fetcher, which counts it among the peers worth asking.
    let manifest = std::fs::read(net[nodes[0]].data_dir.join("store/manifests").join(&id))?;
    let liar = LyingProvider::start(net[fetcher].addr(), manifest).await?;
    {
        let net = &net;
        let liar_peer = liar.peer_id;
        eventually(
            Duration::from_secs(10),
            "the liar to connect",
            || async move {
                Ok(net[fetcher]
                    .peer_ids()
                    .await?
                    .contains(&liar_peer)
                    .then_some(()))
            },
        )
        .await?;
    }
    let liar_id = liar.peer_id.to_string();

    let out = net.dir().join("out.bin");
    let events = net[fetcher].fetch(&id, &out).await?;
    let Progress::Finished { providers, .. } = finished(&events)? else {
        unreachable!()
    };
    assert_eq!(hash_file(&out)?, expected, "output differs");
    let used: Vec<_> = providers.iter().filter(|p| p.peer != liar_id).collect();
    assert!(
        used.len() >= 2,
        "chunks came from {} honest provider(s): {providers:?}",
        used.len()
    );
    println!(
        "checked: chunks arrived from {} providers: {providers:?}",
        used.len()
    );
    let dropped = events.iter().any(|e| {
        matches!(e, Progress::ProviderDropped { peer, reason } if *peer == liar_id && reason == "corrupt_chunk")
    });
    assert!(dropped, "the liar was not dropped: {events:?}");
    let rejected = net[fetcher]
        .metric("servant_file_chunks_rejected_total")
        .await?;
    assert!(rejected >= 1.0, "no chunk rejected");
    assert!(liar.chunks_sent.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    let penalties = net[fetcher]
        .metric("servant_peer_penalties_total{reason=\"corrupt_chunk\"}")
        .await?;
    assert!(penalties >= 1.0, "the liar was not penalized");
    println!("checked: the liar's corrupt chunks were refused ({rejected}), it was dropped and penalized, and the output is intact");
    net.pass();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_provider_is_replaced_and_a_killed_fetcher_resumes() -> Result<()> {
    let mut net = Net::new();
    // Serving is slowed so the transfer is still under way when processes die.
    let slow = ["--serve-rate-per-peer".to_string(), "4MiB".to_string()];
    let nodes = network(&mut net, &["p1", "p2", "fetcher"], &slow).await?;
    let (p1, p2, fetcher) = (nodes[0], nodes[1], nodes[2]);
    let src = net.dir().join("data.bin");
    let expected = random_file(&src, 40 * 1024 * 1024, 21)?;
    let id = net[p1].share(&src).await?.id.to_hex();
    let out = net.dir().join("out.bin");

    // The only provider dies mid-transfer; meanwhile another node has come to share
    // the content, and the fetch finds it and finishes from it.
    let mut stream = net[fetcher].fetch_stream(&id, &out).await?;
    let mut killed = false;
    let mut last = None;
    while let Some(event) = stream.recv().await {
        if let Progress::Progress { done_bytes, .. } = &event {
            if !killed && *done_bytes > 8 * 1024 * 1024 {
                net[p2].share(&src).await?;
                net[p1].kill();
                killed = true;
            }
        }
        last = Some(event);
    }
    assert!(killed, "the fetch ended before a provider could be killed");
    let Some(Progress::Finished { providers, .. }) = &last else {
        bail!("{last:?}");
    };
    assert_eq!(hash_file(&out)?, expected);
    let from: Vec<&str> = providers.iter().map(|p| p.peer.as_str()).collect();
    let (p1_id, p2_id) = (net[p1].id().to_string(), net[p2].id().to_string());
    assert!(
        from.contains(&p1_id.as_str()) && from.contains(&p2_id.as_str()),
        "chunks should come from the killed provider and its replacement: {providers:?}"
    );
    println!(
        "checked: the only provider was killed mid-transfer and a new one was found to finish"
    );
    // The fetcher's later restart needs a live bootnode.
    net[p1].start().await?;

    // The fetcher itself dies mid-transfer (SIGKILL) and resumes after a restart.
    std::fs::remove_file(&out)?;
    let refetcher = net
        .spawn("refetcher", &{
            let mut a = vec!["--bootnode".to_string(), net[p1].addr().to_string()];
            a.extend(slow.iter().cloned());
            a
        })
        .await?;
    let mut stream = net[refetcher].fetch_stream(&id, &out).await?;
    while let Some(event) = stream.recv().await {
        if let Progress::Progress { done_bytes, .. } = event {
            if done_bytes > 12 * 1024 * 1024 {
                break;
            }
        }
    }
    net[refetcher].kill();
    drop(stream);
    net[refetcher].start().await?;
    {
        let net = &net;
        eventually(
            Duration::from_secs(30),
            "refetcher to reconnect",
            || async move {
                Ok(net[refetcher]
                    .peer_ids()
                    .await?
                    .contains(&net[p1].id())
                    .then_some(()))
            },
        )
        .await?;
    }
    let events = net[refetcher].fetch(&id, &out).await?;
    let Some(Progress::Started {
        have_chunks,
        chunks,
        ..
    }) = events.first()
    else {
        bail!("no start event: {events:?}");
    };
    assert!(
        *have_chunks >= 8,
        "resumed with only {have_chunks} of {chunks} chunks"
    );
    finished(&events)?;
    assert_eq!(hash_file(&out)?, expected);
    println!("checked: a fetcher killed with SIGKILL resumed from {have_chunks} of {chunks} verified chunks");
    net.pass();
    Ok(())
}
