//! Relay abuse: 300 identities from three source addresses ask a super-peer for
//! reservations, then open circuits through it and pump data. Reservations and
//! circuits stay within the relay's limits (libp2p-relay's defaults, the `signaling`
//! profile: 128 reservations, 4 per peer, 60 per minute per IP, 16 circuits of 2 min
//! and 128 KiB each) and a circuit is cut at its byte limit. Under the `data` profile,
//! whose circuits carry whole transfers, two peers pumping at once each get through no
//! more than `relay_rate_per_peer`.
//!
//! The abusers are real rust-libp2p peers with the relay client, each in a task of
//! its own, dialing from one of three source addresses (127.0.0.2-4) through
//! `hostile::BoundTcp`.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, ensure, Result};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{
    multiaddr::Protocol, noise, relay, swarm::NetworkBehaviour, swarm::SwarmEvent, yamux,
    Multiaddr, PeerId, StreamProtocol,
};
use servant_tests::{eventually, hostile, Net};
use tokio::sync::{mpsc, oneshot};

/// Identities asking for reservations.
const ABUSERS: usize = 300;
/// Source addresses they come from.
const SOURCES: [&str; 3] = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
/// The relay's limits under the default profile (libp2p-relay's defaults).
const MAX_RESERVATIONS: f64 = 128.0;
const MAX_RESERVATIONS_PER_IP_PER_MINUTE: f64 = 60.0;
const MAX_CIRCUITS: f64 = 16.0;
const CIRCUIT_BYTES: u64 = 128 * 1024;
/// Circuits asked for at once: well over the relay's 16.
const CIRCUITS_ASKED: usize = 40;
/// The protocol the abusers pump data on through their circuits.
const PUMP: StreamProtocol = StreamProtocol::new("/attack/pump/1.0.0");

#[derive(NetworkBehaviour)]
struct Abuser {
    relay: relay::client::Behaviour,
    stream: libp2p_stream::Behaviour,
}

/// What the test asks an abuser's task to do.
enum Command {
    /// Dial a peer through the relay and report when connected.
    Dial(Multiaddr, PeerId, oneshot::Sender<Result<()>>),
}

/// One abuser: its PeerId, whether its reservation was accepted, a handle to open
/// streams, and its command channel.
struct Handle {
    peer_id: PeerId,
    reserved: bool,
    control: libp2p_stream::Control,
    commands: mpsc::Sender<Command>,
    received: Arc<AtomicU64>,
}

/// Starts an abuser from `src` that connects to the relay and asks for a reservation;
/// returns once the relay answered (or 15 s passed).
async fn abuser(src: &str, relay_id: PeerId, relay_tcp: Multiaddr) -> Result<Handle> {
    let src_ip: std::net::IpAddr = src.parse()?;
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_other_transport(|key| {
            use libp2p::core::{upgrade::Version, Transport};
            Ok(hostile::BoundTcp { src: src_ip }
                .upgrade(Version::V1)
                .authenticate(noise::Config::new(key)?)
                .multiplex(yamux::Config::default()))
        })
        .map_err(|e| anyhow!("{e}"))?
        .with_relay_client(noise::Config::new, yamux::Config::default)?
        .with_behaviour(|_, relay| Abuser {
            relay,
            stream: libp2p_stream::Behaviour::new(),
        })
        .map_err(|e| anyhow!("{e}"))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build();
    let peer_id = *swarm.local_peer_id();
    let mut control = swarm.behaviour().stream.new_control();
    let received = Arc::new(AtomicU64::new(0));
    let mut incoming = control.accept(PUMP).map_err(|e| anyhow!("accept: {e}"))?;
    let counter = received.clone();
    tokio::spawn(async move {
        while let Some((_, mut stream)) = incoming.next().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
    let circuit = relay_tcp
        .clone()
        .with(Protocol::P2p(relay_id))
        .with(Protocol::P2pCircuit);
    swarm.dial(relay_tcp.with(Protocol::P2p(relay_id)))?;
    let connected = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == relay_id => {
                    return Ok(())
                }
                SwarmEvent::OutgoingConnectionError { error, .. } => {
                    return Err(anyhow!("dial the relay: {error}"))
                }
                _ => {}
            }
        }
    })
    .await;
    connected.map_err(|_| anyhow!("no connection to the relay within 10 s"))??;
    swarm.listen_on(circuit)?;
    let reserved = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(AbuserEvent::Relay(
                    relay::client::Event::ReservationReqAccepted { .. },
                )) => return true,
                // Refused (ResourceLimitExceeded), or the connection failed.
                SwarmEvent::ListenerClosed { .. }
                | SwarmEvent::ListenerError { .. }
                | SwarmEvent::OutgoingConnectionError { .. } => return false,
                _ => {}
            }
        }
    })
    .await
    .unwrap_or(false);
    let (commands, mut rx) = mpsc::channel::<Command>(4);
    tokio::spawn(async move {
        let mut waiting: Vec<(PeerId, oneshot::Sender<Result<()>>)> = Vec::new();
        loop {
            tokio::select! {
                event = swarm.select_next_some() => match event {
                    SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                        let (done, rest): (Vec<_>, Vec<_>) =
                            waiting.drain(..).partition(|(p, _)| *p == peer_id);
                        waiting = rest;
                        for (_, reply) in done {
                            let _ = reply.send(Ok(()));
                        }
                    }
                    SwarmEvent::OutgoingConnectionError { peer_id: Some(peer_id), error, .. } => {
                        let (done, rest): (Vec<_>, Vec<_>) =
                            waiting.drain(..).partition(|(p, _)| *p == peer_id);
                        waiting = rest;
                        for (_, reply) in done {
                            let _ = reply.send(Err(anyhow!("{error}")));
                        }
                    }
                    _ => {}
                },
                command = rx.recv() => match command {
                    Some(Command::Dial(addr, peer, reply)) => match swarm.dial(addr) {
                        Ok(()) => waiting.push((peer, reply)),
                        Err(e) => { let _ = reply.send(Err(anyhow!("{e}"))); }
                    },
                    None => return,
                },
            }
        }
    });
    Ok(Handle {
        peer_id,
        reserved,
        control,
        commands,
        received,
    })
}

/// Starts a super-peer relay with `args`; returns its index, PeerId and TCP address.
async fn start_relay(net: &mut Net, args: &[&str]) -> Result<(usize, PeerId, Multiaddr)> {
    let mut all = vec!["--role".to_string(), "super".into()];
    all.extend(args.iter().map(|a| a.to_string()));
    let r = net.add("relay", &all);
    // A relay hands out reservations only with an address to put in them: on
    // loopback nobody can confirm one, so it is announced.
    let relay_tcp: Multiaddr = format!("/ip4/127.0.0.1/tcp/{}", net[r].p2p_port).parse()?;
    net[r]
        .args
        .extend(["--announce".into(), relay_tcp.to_string()]);
    net[r].start().await?;
    Ok((r, net[r].id(), relay_tcp))
}

/// Has `from` dial `to` through the relay; the answer arrives on the returned channel.
async fn dial_through(
    from: &Handle,
    to: PeerId,
    relay_id: PeerId,
    relay_tcp: &Multiaddr,
) -> Result<oneshot::Receiver<Result<()>>> {
    let addr = relay_tcp
        .clone()
        .with(Protocol::P2p(relay_id))
        .with(Protocol::P2pCircuit)
        .with(Protocol::P2p(to));
    let (tx, rx) = oneshot::channel();
    from.commands
        .send(Command::Dial(addr, to, tx))
        .await
        .map_err(|_| anyhow!("abuser task gone"))?;
    Ok(rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_and_circuits_stay_within_the_relay_limits() -> Result<()> {
    hostile::raise_fd_limit();
    let mut net = Net::new();
    let (r, relay_id, relay_tcp) = start_relay(
        &mut net,
        &["--conn-high", "256", "--max-connections", "512"],
    )
    .await?;

    let started = Instant::now();
    let mut abusers = Vec::with_capacity(ABUSERS);
    let mut peak_reservations = 0.0f64;
    for i in 0..ABUSERS {
        let src = SOURCES[i % SOURCES.len()];
        abusers.push(abuser(src, relay_id, relay_tcp.clone()).await?);
        if i % 25 == 24 {
            let served = net[r].metric("servant_relay_reservations_served").await?;
            peak_reservations = peak_reservations.max(served);
        }
    }
    let accepted = abusers.iter().filter(|a| a.reserved).count();
    let served = net[r].metric("servant_relay_reservations_served").await?;
    peak_reservations = peak_reservations.max(served);
    let denied = net[r]
        .metric("servant_relay_denied_total{reason=\"reservation\"}")
        .await?;
    println!(
        "{ABUSERS} identities from {} addresses asked for reservations in {:.1} s: {accepted} \
         accepted, {denied} refused by the relay; reservations held peaked at {peak_reservations}",
        SOURCES.len(),
        started.elapsed().as_secs_f64()
    );
    ensure!(
        peak_reservations <= MAX_RESERVATIONS && accepted as f64 <= MAX_RESERVATIONS,
        "{accepted} reservations accepted, {peak_reservations} held (at most {MAX_RESERVATIONS})"
    );
    ensure!(
        accepted >= 2,
        "only {accepted} reservations: nothing to test circuits with"
    );
    for (k, src) in SOURCES.iter().enumerate() {
        let from_src = (0..abusers.len())
            .filter(|i| i % SOURCES.len() == k && abusers[*i].reserved)
            .count();
        ensure!(
            from_src as f64 <= MAX_RESERVATIONS_PER_IP_PER_MINUTE,
            "{from_src} reservations accepted from {src} within a minute (at most \
             {MAX_RESERVATIONS_PER_IP_PER_MINUTE})"
        );
        println!(
            "checked: {from_src} reservations accepted from {src} (at most \
             {MAX_RESERVATIONS_PER_IP_PER_MINUTE} a minute)"
        );
    }
    println!(
        "checked: at most {MAX_RESERVATIONS} reservations held ({peak_reservations}), \
         {accepted} of {ABUSERS} accepted"
    );

    // Circuits: reserved abusers dial each other through the relay, all at once.
    let reserved: Vec<usize> = (0..abusers.len())
        .filter(|i| abusers[*i].reserved)
        .collect();
    let pairs: Vec<(usize, usize)> = reserved
        .chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| (c[0], c[1]))
        .take(CIRCUITS_ASKED)
        .collect();
    let mut replies = Vec::new();
    for (from, to) in &pairs {
        let target = abusers[*to].peer_id;
        replies.push(dial_through(&abusers[*from], target, relay_id, &relay_tcp).await?);
    }
    let mut opened = Vec::new();
    for (reply, pair) in replies.into_iter().zip(pairs.iter()) {
        if let Ok(Ok(Ok(()))) = tokio::time::timeout(Duration::from_secs(15), reply).await {
            opened.push(*pair);
        }
    }
    let circuits = net[r].metric("servant_relay_circuits_served").await?;
    let circuits_denied = net[r]
        .metric("servant_relay_denied_total{reason=\"circuit\"}")
        .await?;
    println!(
        "{} circuits asked for at once: {} connected, the relay carries {circuits}, refused \
         {circuits_denied}",
        pairs.len(),
        opened.len()
    );
    ensure!(
        circuits <= MAX_CIRCUITS && opened.len() as f64 <= MAX_CIRCUITS,
        "{} circuits connected, {circuits} carried (at most {MAX_CIRCUITS})",
        opened.len()
    );
    println!(
        "checked: at most {MAX_CIRCUITS} circuits at once ({} connected)",
        opened.len()
    );

    // Pump 1 MiB through one circuit: the relay cuts it at its byte limit.
    let (from, to) = *opened
        .first()
        .ok_or_else(|| anyhow!("no circuit was connected"))?;
    let target = abusers[to].peer_id;
    let mut control = abusers[from].control.clone();
    let mut stream =
        tokio::time::timeout(Duration::from_secs(10), control.open_stream(target, PUMP))
            .await
            .map_err(|_| anyhow!("no pump stream within 10 s"))?
            .map_err(|e| anyhow!("open pump stream: {e}"))?;
    let chunk = vec![7u8; 16 * 1024];
    let mut written = 0u64;
    let pump_started = Instant::now();
    while written < 1024 * 1024 && pump_started.elapsed() < Duration::from_secs(20) {
        match tokio::time::timeout(Duration::from_secs(5), stream.write_all(&chunk)).await {
            Ok(Ok(())) => written += chunk.len() as u64,
            _ => break,
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.flush()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = abusers[to].received.load(Ordering::Relaxed);
    println!(
        "pumped through one circuit: {written} bytes written, {got} received at the other end"
    );
    ensure!(
        got <= CIRCUIT_BYTES + 16 * 1024,
        "{got} bytes crossed a circuit limited to {CIRCUIT_BYTES}"
    );
    ensure!(
        got > 0,
        "nothing crossed the circuit: the test pumped nothing"
    );
    println!("checked: the circuit was cut at its limit ({got} of at most {CIRCUIT_BYTES} bytes)");

    let r2 = &net;
    eventually(
        Duration::from_secs(10),
        "the relay to be live",
        || async move { Ok(r2[r].livez().await.then_some(())) },
    )
    .await?;
    println!("checked: the relay is live");
    Ok(())
}

/// The data relay's per-peer rate in the pumping test.
const DATA_RATE: u64 = 256 * 1024;
/// How long each circuit is pumped.
const PUMP_SECS: u64 = 6;

/// Pumps `chunk`s from `from` to `to` through their circuit for `secs`; returns the
/// bytes written.
async fn pump(control: &mut libp2p_stream::Control, to: PeerId, secs: u64) -> Result<u64> {
    let mut stream = tokio::time::timeout(Duration::from_secs(10), control.open_stream(to, PUMP))
        .await
        .map_err(|_| anyhow!("no pump stream within 10 s"))?
        .map_err(|e| anyhow!("open pump stream: {e}"))?;
    let chunk = vec![7u8; 16 * 1024];
    let mut written = 0u64;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(secs) {
        match tokio::time::timeout(Duration::from_secs(2), stream.write_all(&chunk)).await {
            Ok(Ok(())) => written += chunk.len() as u64,
            Ok(Err(_)) => break,
            Err(_) => {}
        }
    }
    Ok(written)
}

/// A data-profile relay (1 GiB circuits) lets whole transfers through, so what bounds a
/// peer pumping through it is `relay_rate_per_peer`: two sources pump through their
/// circuits at once, each as fast as it can, and each gets through no more than its
/// rate (plus the one-second burst) while the relay stays live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_relay_holds_each_pumping_peer_to_its_rate() -> Result<()> {
    hostile::raise_fd_limit();
    let mut net = Net::new();
    let rate = format!("{}KiB", DATA_RATE / 1024);
    let (r, relay_id, relay_tcp) = start_relay(
        &mut net,
        &["--relay-profile", "data", "--relay-rate-per-peer", &rate],
    )
    .await?;
    let mut peers = Vec::new();
    for i in 0..4 {
        let peer = abuser(SOURCES[i % SOURCES.len()], relay_id, relay_tcp.clone()).await?;
        ensure!(peer.reserved, "peer {i} got no reservation");
        peers.push(peer);
    }
    for (from, to) in [(0, 1), (2, 3)] {
        let rx = dial_through(&peers[from], peers[to].peer_id, relay_id, &relay_tcp).await?;
        tokio::time::timeout(Duration::from_secs(15), rx)
            .await
            .map_err(|_| anyhow!("no circuit within 15 s"))?
            .map_err(|_| anyhow!("peer task gone"))??;
    }
    let (mut c0, mut c2) = (peers[0].control.clone(), peers[2].control.clone());
    let (t1, t3) = (peers[1].peer_id, peers[3].peer_id);
    let started = Instant::now();
    let (w0, w2) = tokio::join!(pump(&mut c0, t1, PUMP_SECS), pump(&mut c2, t3, PUMP_SECS));
    let (w0, w2) = (w0?, w2?);
    let secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let elapsed = started.elapsed().as_secs_f64();
    // The most one peer may get through: its rate over the whole time, plus a burst.
    let allowed = (DATA_RATE as f64 * elapsed + DATA_RATE as f64) * 1.1;
    for (to, written) in [(1, w0), (3, w2)] {
        let got = peers[to].received.load(Ordering::Relaxed) as f64;
        println!(
            "measured: {written} bytes written, {got} received through one circuit in {secs:.1} \
             s ({:.0} KiB/s; the rate is {} KiB/s)",
            got / elapsed / 1024.0,
            DATA_RATE / 1024
        );
        ensure!(
            got <= allowed,
            "{got} bytes crossed in {elapsed:.1} s, more than {allowed:.0} at {DATA_RATE} B/s"
        );
        ensure!(
            got >= DATA_RATE as f64 * 2.0,
            "only {got} bytes crossed: the circuit barely carried anything"
        );
    }
    let waits = net[r].metric("servant_relay_throttle_waits_total").await?;
    ensure!(waits > 0.0, "the relay never held a read back");
    println!("checked: each pumping peer got through at most its rate plus a burst ({waits} reads held back)");
    let r2 = &net;
    eventually(
        Duration::from_secs(10),
        "the relay to be live",
        || async move { Ok(r2[r].livez().await.then_some(())) },
    )
    .await?;
    println!("checked: the relay is live");
    Ok(())
}
