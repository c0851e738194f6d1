//! The baseline of `files`: the same bytes over one bare rust-libp2p stream.
//!
//! Two processes, this binary re-executed: `stream-server` listens and answers every
//! stream on [`PROTOCOL`] with as many bytes as the stream asked for; `stream-client`
//! dials it, opens one stream, asks for N bytes and reads them all. Their swarms use
//! Servant's transport settings (`node/src/swarm.rs`: TCP with nodelay, noise, yamux
//! with its defaults, QUIC) and nothing else: no bandwidth counters, no other
//! protocols, no disk.

use std::{
    path::Path,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{
    multiaddr::Protocol, noise, swarm::SwarmEvent, tcp, yamux, Multiaddr, StreamProtocol, Swarm,
};
use serde::{Deserialize, Serialize};

use crate::{files_netns, process};

/// The bulk protocol: the client writes the number of bytes it wants (8 bytes, big
/// endian), the server writes them and closes.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/servant-bench/bulk/1.0.0");

/// What the baseline runs, for the report.
pub const DESCRIPTION: &str = "two processes (this binary re-executed), each a bare libp2p Swarm \
    with only libp2p-stream's behaviour and Servant's transport (TCP with nodelay, noise, yamux \
    defaults; QUIC): the client dials, opens one stream and asks for N bytes; the server writes \
    them from a 1 MiB buffer; time from opening the stream to the last byte read";

/// Most bytes one request may ask for, so a stray connection cannot make the server
/// write forever.
const MAX_REQUEST: u64 = 1 << 40;
/// Size of the buffers written and read.
const BUFFER: usize = 1 << 20;

fn build() -> Result<Swarm<libp2p_stream::Behaviour>> {
    let Ok(builder) = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_quic()
        .with_behaviour(|_| libp2p_stream::Behaviour::new());
    // The client opens its stream right after connecting; the timeout only has to
    // outlast the transfer's start.
    Ok(builder
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build())
}

/// The `stream-server` child: listens on `listen`, prints `LISTEN <addr>/p2p/<id>`,
/// and serves until its standard input closes (the parent went away).
pub async fn server(listen: Multiaddr) -> Result<()> {
    let mut swarm = build()?;
    let mut incoming = swarm
        .behaviour()
        .new_control()
        .accept(PROTOCOL)
        .map_err(|e| anyhow::anyhow!("accept {PROTOCOL}: {e:?}"))?;
    swarm.listen_on(listen)?;
    let addr = loop {
        match tokio::time::timeout(Duration::from_secs(5), swarm.select_next_some()).await {
            Ok(SwarmEvent::NewListenAddr { address, .. }) => break address,
            Ok(SwarmEvent::ListenerError { error, .. }) => bail!("listen: {error}"),
            Ok(_) => {}
            Err(_) => bail!("no listen address within 5 s"),
        }
    };
    let me = *swarm.local_peer_id();
    println!("LISTEN {}", addr.with(Protocol::P2p(me)));
    tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    tokio::spawn(async move {
        while let Some((peer, stream)) = incoming.next().await {
            tokio::spawn(async move {
                if let Err(e) = serve_one(stream).await {
                    eprintln!("[stream-server] stream from {peer}: {e:#}");
                }
            });
        }
    });
    // Standard input closes when the parent ends, whichever way it ends.
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    while tokio::io::AsyncReadExt::read(&mut stdin, &mut sink).await? > 0 {}
    Ok(())
}

async fn serve_one(mut stream: libp2p::Stream) -> Result<()> {
    let mut ask = [0u8; 8];
    stream.read_exact(&mut ask).await.context("read request")?;
    let mut left = u64::from_be_bytes(ask);
    if left > MAX_REQUEST {
        bail!("asked for {left} bytes, more than {MAX_REQUEST}");
    }
    let buffer = pattern(BUFFER);
    while left > 0 {
        let n = left.min(BUFFER as u64) as usize;
        stream.write_all(&buffer[..n]).await.context("write")?;
        left -= n as u64;
    }
    stream.close().await.context("close")?;
    Ok(())
}

/// Bytes that are not all zero (nothing on the way compresses, but a reader of a
/// capture should not mistake them for padding).
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(31) >> 3) as u8).collect()
}

/// What one client run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientResult {
    /// Bytes read.
    pub bytes: u64,
    /// From asking for a stream to reading the last byte.
    pub secs: f64,
    /// The client process's CPU seconds in that time.
    pub cpu_secs: f64,
    /// Dialing until connected (not in `secs`).
    pub connect_secs: f64,
}

/// The `stream-client` child: dials `addr`, reads `bytes` bytes over one stream.
pub async fn client(addr: Multiaddr, bytes: u64) -> Result<ClientResult> {
    let Some(Protocol::P2p(peer)) = addr.iter().last() else {
        bail!("{addr} does not end in /p2p/<peer id>");
    };
    let mut swarm = build()?;
    let mut control = swarm.behaviour().new_control();
    let connecting = Instant::now();
    swarm.dial(addr.clone())?;
    let connected = async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == peer => {
                    return Ok(());
                }
                SwarmEvent::OutgoingConnectionError { error, .. } => bail!("dial {addr}: {error}"),
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), connected)
        .await
        .context("not connected within 20 s")??;
    let connect_secs = connecting.elapsed().as_secs_f64();
    let driver = tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });

    let cpu0 = process::cpu_seconds()?;
    let started = Instant::now();
    let mut stream = control
        .open_stream(peer, PROTOCOL)
        .await
        .map_err(|e| anyhow::anyhow!("open stream: {e}"))?;
    stream.write_all(&bytes.to_be_bytes()).await?;
    stream.flush().await?;
    let mut buffer = vec![0u8; BUFFER];
    let mut read = 0u64;
    loop {
        let n = stream.read(&mut buffer).await.context("read")?;
        if n == 0 {
            break;
        }
        read += n as u64;
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu_secs = process::cpu_seconds()? - cpu0;
    driver.abort();
    if read != bytes {
        bail!("read {read} bytes of {bytes}");
    }
    Ok(ClientResult {
        bytes: read,
        secs,
        cpu_secs,
        connect_secs,
    })
}

/// A running `stream-server` child, seen from the parent.
pub struct Server {
    child: Child,
    /// Its process id (the server itself, also when started through `ip netns exec`,
    /// which execs in place).
    pub pid: u32,
    /// Where to dial it, with `/p2p/`.
    pub addr: Multiaddr,
}

impl Server {
    /// Starts the server in `netns` (or here) listening on `listen`.
    pub fn start(netns: Option<&str>, listen: &Multiaddr) -> Result<Server> {
        let exe = std::env::current_exe().context("path of this executable")?;
        let mut child = files_netns::command(netns, &exe)
            .arg("stream-server")
            .arg("--listen")
            .arg(listen.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("start the stream server")?;
        let pid = child.id();
        let stdout = child.stdout.take().context("stream server's stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        // A thread, so a server that never prints cannot block the parent.
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut lines = std::io::BufReader::new(stdout).lines();
            let first = lines.next();
            let _ = tx.send(first);
            // Keep reading so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let mut server = Server {
            child,
            pid,
            addr: Multiaddr::empty(),
        };
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Some(Ok(line))) => line,
            Ok(_) => bail!("the stream server exited before listening"),
            Err(_) => bail!("the stream server did not listen within 20 s"),
        };
        let addr = line
            .strip_prefix("LISTEN ")
            .with_context(|| format!("unexpected line from the stream server: {line}"))?;
        server.addr = addr
            .parse()
            .with_context(|| format!("stream server address {addr}"))?;
        Ok(server)
    }

    /// Runs one `stream-client` child in `netns` against this server; returns what
    /// it measured and the server's CPU seconds meanwhile.
    pub fn fetch(
        &self,
        netns: Option<&str>,
        bytes: u64,
        result: &Path,
    ) -> Result<(ClientResult, f64)> {
        let exe = std::env::current_exe().context("path of this executable")?;
        let _ = std::fs::remove_file(result);
        let cpu0 = process::pid_cpu_seconds(self.pid)?;
        let status = files_netns::command(netns, &exe)
            .arg("stream-client")
            .arg("--addr")
            .arg(self.addr.to_string())
            .arg("--bytes")
            .arg(bytes.to_string())
            .arg("--result")
            .arg(result)
            .status()
            .context("run the stream client")?;
        let server_cpu = process::pid_cpu_seconds(self.pid)? - cpu0;
        if !status.success() {
            bail!("the stream client failed: {status}");
        }
        Ok((crate::read_json(result)?, server_cpu))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Closing its standard input ends it; kill it if that did not.
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
