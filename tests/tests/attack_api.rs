//! Abuse of a node's HTTP API and of its metrics, each checked against a figure:
//!
//! - a 100 MB request body, announced in Content-Length or streamed in chunks, is
//!   refused with 413 quickly, long before the body could have been read
//!   (`api::MAX_BODY_BYTES`, 256 KiB);
//! - 1,000 concurrent slow clients on the API (900 that send their headers a line at a
//!   time and never finish, 100 searches held open for a minute) leave the p2p side
//!   alone: a broadcast crosses between two nodes both ways, pings keep the connection
//!   (no ping failure, an RTT measured), and the node stays live;
//! - peers whose identify and gossipsub carry values of their own choosing (agents,
//!   protocols, listen addresses of distinct protocol stacks, topics) do not grow the
//!   number of series in `/metrics` beyond a fixed bound: no label takes a value the
//!   network chooses.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context, Result};
use servant_tests::{eventually, hostile, Net};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// The body size of the oversized requests.
const BIG_BODY: u64 = 100_000_000;
/// The 413 must come within this.
const QUICK: Duration = Duration::from_secs(2);

/// Reads an HTTP response's status code from `stream`.
async fn status_code(stream: &mut tokio::net::tcp::OwnedReadHalf) -> Result<u16> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = stream.read(&mut buf).await.context("read the response")?;
        ensure!(n > 0, "the connection closed before a status line");
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("no status code in {line:?}"))
}

/// Sends a POST to `/v1/publish` whose body is `BIG_BODY` bytes, announced with
/// Content-Length or (`chunked`) streamed; returns the status, how long it took to
/// arrive, and how many body bytes had been written by then.
async fn big_post(api: SocketAddr, chunked: bool) -> Result<(u16, Duration, u64)> {
    let stream = TcpStream::connect(api).await?;
    let (mut rx, mut tx) = stream.into_split();
    let framing = if chunked {
        "Transfer-Encoding: chunked".to_string()
    } else {
        format!("Content-Length: {BIG_BODY}")
    };
    let head = format!(
        "POST /v1/publish HTTP/1.1\r\nHost: {api}\r\nContent-Type: application/json\r\n{framing}\r\n\r\n"
    );
    let started = Instant::now();
    tx.write_all(head.as_bytes()).await?;
    let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let written = written.clone();
        tokio::spawn(async move {
            let piece = vec![b' '; 64 * 1024];
            let mut sent = 0;
            while sent < BIG_BODY {
                let framed: Vec<u8> = if chunked {
                    let mut f = format!("{:x}\r\n", piece.len()).into_bytes();
                    f.extend_from_slice(&piece);
                    f.extend_from_slice(b"\r\n");
                    f
                } else {
                    piece.clone()
                };
                if tx.write_all(&framed).await.is_err() {
                    return;
                }
                sent += piece.len() as u64;
                written.store(sent, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    let status = tokio::time::timeout(Duration::from_secs(30), status_code(&mut rx))
        .await
        .map_err(|_| anyhow!("no response within 30 s"))??;
    let took = started.elapsed();
    writer.abort();
    Ok((
        status,
        took,
        written.load(std::sync::atomic::Ordering::Relaxed),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_413_quickly() -> Result<()> {
    let mut net = Net::new();
    let a = net.spawn("a", &[]).await?;
    let api = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), net[a].api_port);
    for chunked in [false, true] {
        let how = if chunked {
            "streamed in chunks"
        } else {
            "announced in Content-Length"
        };
        let (status, took, written) = big_post(api, chunked).await?;
        println!(
            "checked: a {} MB body {how}: {status} after {:.3} s, {:.1} MB of it written by then \
             (at most {QUICK:?})",
            BIG_BODY / 1_000_000,
            took.as_secs_f64(),
            written as f64 / 1e6
        );
        ensure!(status == 413, "a {how} 100 MB body got {status}, not 413");
        ensure!(took <= QUICK, "the 413 took {took:?}");
    }
    ensure!(net[a].livez().await, "the node stopped answering /livez");
    println!("checked: the node is live");
    net.pass();
    Ok(())
}

/// Slow clients at once.
const SLOW_CLIENTS: usize = 1_000;
/// Of them, searches held open (the rest trickle headers).
const HELD_SEARCHES: usize = 100;
/// How long the slow clients stay: over one ping interval (10 s).
const SLOW_FOR: Duration = Duration::from_secs(14);
/// The topic of the honest broadcasts.
const TOPIC: &str = "api-abuse";

/// A client that sends a request line and then one header line every 2 s, never
/// the blank line that ends the headers.
async fn trickling_client(api: SocketAddr) -> Result<TcpStream> {
    let mut s = TcpStream::connect(api).await?;
    s.write_all(format!("GET /v1/status HTTP/1.1\r\nHost: {api}\r\n").as_bytes())
        .await?;
    Ok(s)
}

/// A search held open for a minute (the longest `timeout_ms` the API allows).
async fn held_search(api: SocketAddr, i: usize) -> Result<TcpStream> {
    let mut s = TcpStream::connect(api).await?;
    s.write_all(
        format!(
            "GET /v1/search?term=held{i}&ttl=1&timeout_ms=60000 HTTP/1.1\r\nHost: {api}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    Ok(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_api_clients_leave_the_p2p_side_alone() -> Result<()> {
    hostile::raise_fd_limit();
    let mut net = Net::new();
    let a = net.spawn("a", &[]).await?;
    let boot = net[a].addr().to_string();
    let b = net.spawn("b", &["--bootnode".into(), boot]).await?;
    let mut sub_a = net[a].subscribe(TOPIC).await?;
    let mut sub_b = net[b].subscribe(TOPIC).await?;
    for i in [a, b] {
        net[i].wait_mesh(TOPIC, 1, Duration::from_secs(20)).await?;
    }
    let pings_failed_before = net[b].metric("servant_ping_failures_total").await?;
    let proc = hostile::Proc::of_data_dir(&net[a].data_dir)?;
    let fds_before = proc.open_fds()?;
    let api = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), net[a].api_port);

    let started = Instant::now();
    let mut clients = Vec::with_capacity(SLOW_CLIENTS);
    for i in 0..SLOW_CLIENTS {
        let client = if i < HELD_SEARCHES {
            held_search(api, i).await
        } else {
            trickling_client(api).await
        };
        clients.push(client.with_context(|| format!("slow client {i}"))?);
    }
    let opened_in = started.elapsed();
    let closed_by_node = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let closed = closed_by_node.clone();
    let trickle = tokio::spawn(async move {
        let mut n = 0u64;
        let mut open: Vec<Option<TcpStream>> = clients.into_iter().map(Some).collect();
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            n += 1;
            for slot in open.iter_mut().skip(HELD_SEARCHES) {
                let Some(c) = slot else { continue };
                // A write to a socket the node closed fails (reset) on the second try.
                if c.write_all(format!("X-Slow-{n}: 1\r\n").as_bytes())
                    .await
                    .is_err()
                {
                    *slot = None;
                    closed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fds_during = proc.open_fds()?;
    println!(
        "{SLOW_CLIENTS} slow clients ({HELD_SEARCHES} held searches, the rest trickling headers) \
         opened in {:.2} s; node a's descriptors {fds_before} before, {fds_during} during",
        opened_in.as_secs_f64()
    );
    // The API serves at most MAX_CONNECTIONS at once; the rest wait in the kernel's
    // accept queue and cost the node no descriptor.
    let cap = servant::http_server::MAX_CONNECTIONS;
    ensure!(
        fds_during <= fds_before + cap + 16,
        "{fds_during} descriptors during the abuse: the API holds more than its {cap} connections"
    );
    println!(
        "checked: node a's descriptors stay within {cap} API connections ({fds_during}, from \
         {fds_before})"
    );

    // The API itself, for the record: a normal request among the slow ones.
    let t = Instant::now();
    let live = net[a].livez().await;
    println!(
        "during: /livez on the attacked API answered {live} in {:.3} s",
        t.elapsed().as_secs_f64()
    );

    for (from, to) in [(b, a), (a, b)] {
        let body = format!("from {} during the API abuse", net[from].name);
        let t = Instant::now();
        let sent = net[from].publish(TOPIC, "honest", &body).await?;
        println!(
            "published from {} in {:.3} s",
            net[from].name,
            t.elapsed().as_secs_f64(),
        );
        let sub = if to == a { &mut sub_a } else { &mut sub_b };
        let (got, _) = sub
            .wait_for(&sent.envelope.id, Duration::from_secs(30))
            .await;
        if got.is_none() {
            for i in [a, b] {
                print!("{}", net[i].gossip_report().await);
            }
            bail!("{} never received {body:?}", net[to].name);
        }
        println!(
            "checked: a broadcast from {} reached {} during the abuse ({:.3} s)",
            net[from].name,
            net[to].name,
            t.elapsed().as_secs_f64()
        );
    }
    // Stay past a ping interval, then: still connected, no ping failed, an RTT known.
    let left = SLOW_FOR.saturating_sub(started.elapsed());
    tokio::time::sleep(left).await;
    let peers = net[b].peers().await?;
    let a_id = net[a].id().to_string();
    let view = peers
        .iter()
        .find(|p| p.peer_id == a_id)
        .ok_or_else(|| anyhow!("b lost its connection to a during the abuse"))?;
    let pings_failed = net[b].metric("servant_ping_failures_total").await? - pings_failed_before;
    println!(
        "checked: after {:.1} s of abuse b is still connected to a, ping RTT {:?} ms, {pings_failed} \
         ping failures",
        started.elapsed().as_secs_f64(),
        view.rtt_ms
    );
    ensure!(view.rtt_ms.is_some(), "b has no ping RTT for a");
    ensure!(pings_failed == 0.0, "{pings_failed} pings failed");
    trickle.abort();
    // Clients that never finish their headers are cut at the header deadline, so the
    // slots come back; once the slow clients are gone the API answers at once.
    let closed = closed_by_node.load(std::sync::atomic::Ordering::Relaxed);
    ensure!(
        closed > 0,
        "no trickling client was cut off within {:.1} s (header deadline {:?})",
        started.elapsed().as_secs_f64(),
        servant::http_server::HEADER_READ_TIMEOUT
    );
    println!(
        "checked: {closed} trickling clients cut off by the header deadline ({:?}) within \
         {:.1} s",
        servant::http_server::HEADER_READ_TIMEOUT,
        started.elapsed().as_secs_f64()
    );
    ensure!(net[a].livez().await, "a stopped answering /livez");
    println!("checked: a is live");
    net.pass();
    Ok(())
}

/// Hostile peers in the metrics test.
const LABEL_PEERS: usize = 16;
/// Made-up protocols each one lists in identify.
const LABEL_PROTOCOLS: usize = 20;
/// Listen addresses (each of its own protocol stack) each one advertises.
const LABEL_ADDRS: usize = 40;
/// Random topics each one joins and publishes to.
const LABEL_TOPICS: usize = 20;
/// Most series `/metrics` may hold with them connected. A node with one honest peer
/// has about 305 (measured); bounded labels leave room for some more (a new direction
/// or transport, an "unrecognized" protocol), while a label taking the peers' values
/// grows with LABEL_PEERS x (LABEL_PROTOCOLS + LABEL_ADDRS + LABEL_TOPICS), up to 1,280.
const MAX_SERIES: usize = 450;

/// Series in an exposition: every line that is not a comment.
fn series(text: &str) -> usize {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_series_stay_bounded() -> Result<()> {
    let mut net = Net::new();
    let a = net.spawn("a", &[]).await?;
    let boot = net[a].addr().to_string();
    let b = net.spawn("b", &["--bootnode".into(), boot]).await?;
    let _sub = net[a].subscribe(TOPIC).await?;
    net[b].publish(TOPIC, "honest", "before").await.ok();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = series(&net[a].metrics().await?);

    let mut peers = Vec::new();
    for i in 0..LABEL_PEERS {
        peers.push(
            hostile::labelled_peer(
                net[a].addr(),
                LABEL_PROTOCOLS,
                LABEL_ADDRS,
                i * LABEL_ADDRS,
                LABEL_TOPICS,
            )
            .await
            .with_context(|| format!("hostile peer {i}"))?,
        );
    }
    // Identify and the gossipsub subscriptions take a moment; the count is taken while
    // the peers are still connected.
    let net_ref = &net;
    let connected = eventually(
        Duration::from_secs(15),
        "the hostile peers",
        || async move {
            let n = net_ref[a].status().await?.connected_peers;
            Ok((n > LABEL_PEERS).then_some(n))
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let text = net[a].metrics().await?;
    let after = series(&text);
    // The families that grew, for the report.
    let mut grown: std::collections::BTreeMap<String, usize> = Default::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let family = line.split(['{', ' ']).next().unwrap_or_default();
        *grown.entry(family.to_string()).or_default() += 1;
    }
    let mut biggest: Vec<_> = grown.into_iter().collect();
    biggest.sort_by_key(|f| std::cmp::Reverse(f.1));
    println!(
        "{LABEL_PEERS} hostile peers ({connected} peers connected), each with {LABEL_PROTOCOLS} \
         protocols, {LABEL_ADDRS} listen-address stacks and {LABEL_TOPICS} topics of its own; \
         largest families: {:?}",
        &biggest[..biggest.len().min(5)]
    );
    for p in peers {
        p.abort();
    }
    println!(
        "checked: /metrics held {before} series before and {after} during (at most {MAX_SERIES})"
    );
    ensure!(
        after <= MAX_SERIES,
        "/metrics grew to {after} series: a label takes values the network chooses"
    );
    net.pass();
    Ok(())
}
