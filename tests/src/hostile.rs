//! Hostile peers for the attack tests (tests/tests/attack_*.rs), and the probes
//! that watch a node's process while they run.
//!
//! The peers are hand-built rather than libp2p swarms: a flood of thousands of
//! connections is cheap as tasks in one process, and a libp2p swarm would refuse to
//! misbehave the way an attacker does (trickle bytes, open streams past yamux's
//! limits, never negotiate). What they do use is libp2p's own noise handshake, so
//! the node sees a real, authenticated peer with a fresh identity; the rest
//! (multistream-select, the yamux frames) is written by hand here.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{anyhow, ensure, Context as _, Result};
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::{core::upgrade::OutboundConnectionUpgrade, identity::Keypair, noise, PeerId};

/// A TCP stream as libp2p's transports see it (futures' I/O traits).
pub type Tcp = libp2p::tcp::tokio::TcpStream;

/// A connection after the noise handshake: encrypted, authenticated, nothing else.
pub type Secured = noise::Output<Tcp>;

/// Raises this process's soft limit on open files to its hard limit, so a test can
/// hold thousands of sockets (nodes it spawns inherit the raised limit). Returns the
/// limit now in force.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

/// A running process observed through `/proc`.
#[derive(Debug, Clone, Copy)]
pub struct Proc {
    /// Its process id.
    pub pid: u32,
}

impl Proc {
    /// The `servant` process whose command line names `data_dir` (each test node has
    /// its own data dir, so this finds exactly one).
    pub fn of_data_dir(data_dir: &Path) -> Result<Proc> {
        let want = data_dir.display().to_string();
        for entry in std::fs::read_dir("/proc").context("read /proc")? {
            let Ok(entry) = entry else { continue };
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            if args.first().is_some_and(|a| a.ends_with(b"servant"))
                && args.contains(&want.as_bytes())
            {
                return Ok(Proc { pid });
            }
        }
        Err(anyhow!("no servant process runs with data dir {want}"))
    }

    /// Its open file descriptors (entries of `/proc/<pid>/fd`).
    pub fn open_fds(&self) -> Result<usize> {
        Ok(std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .with_context(|| format!("read /proc/{}/fd", self.pid))?
            .count())
    }

    /// Its resident memory in bytes (`VmRSS`).
    pub fn rss(&self) -> Result<u64> {
        self.status_kib("VmRSS:").map(|kib| kib * 1024)
    }

    /// Its soft limit on open files, as `/proc/<pid>/limits` says.
    pub fn fd_limit(&self) -> Result<String> {
        let text = std::fs::read_to_string(format!("/proc/{}/limits", self.pid))?;
        text.lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no 'Max open files' in /proc/{}/limits", self.pid))
    }

    fn status_kib(&self, field: &str) -> Result<u64> {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .with_context(|| format!("read /proc/{}/status", self.pid))?;
        text.lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("no {field} in /proc/{}/status", self.pid))
    }
}

/// Mebibytes, for printing.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Opens a TCP connection to `dst` from the local address `src` (127.0.0.x on
/// loopback: each stands for another attacking host, as the node's per-IP cap sees it).
pub async fn tcp_from(src: IpAddr, dst: SocketAddr) -> io::Result<tokio::net::TcpStream> {
    let socket = match src {
        IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(src, 0))?;
    socket.set_nodelay(true)?;
    socket.connect(dst).await
}

/// A dial-only TCP transport whose connections leave from one local address, for
/// rust-libp2p peers that stand for hosts of their own (libp2p's TCP transport binds
/// outgoing sockets to the unspecified address, so on loopback every peer would come
/// from 127.0.0.1). Upgrade it with noise and yamux like libp2p's own.
pub struct BoundTcp {
    /// The local address every connection leaves from.
    pub src: IpAddr,
}

impl libp2p::core::Transport for BoundTcp {
    type Output = libp2p::tcp::tokio::TcpStream;
    type Error = io::Error;
    type ListenerUpgrade = std::future::Pending<Result<Self::Output, Self::Error>>;
    type Dial = futures::future::BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn listen_on(
        &mut self,
        _: libp2p::core::transport::ListenerId,
        addr: libp2p::Multiaddr,
    ) -> Result<(), libp2p::core::transport::TransportError<Self::Error>> {
        Err(libp2p::core::transport::TransportError::MultiaddrNotSupported(addr))
    }

    fn remove_listener(&mut self, _: libp2p::core::transport::ListenerId) -> bool {
        false
    }

    fn dial(
        &mut self,
        addr: libp2p::Multiaddr,
        _: libp2p::core::transport::DialOpts,
    ) -> Result<Self::Dial, libp2p::core::transport::TransportError<Self::Error>> {
        use libp2p::multiaddr::Protocol;
        let mut parts = addr.iter();
        let dst = match (parts.next(), parts.next()) {
            (Some(Protocol::Ip4(ip)), Some(Protocol::Tcp(port))) => {
                SocketAddr::new(IpAddr::V4(ip), port)
            }
            (Some(Protocol::Ip6(ip)), Some(Protocol::Tcp(port))) => {
                SocketAddr::new(IpAddr::V6(ip), port)
            }
            _ => return Err(libp2p::core::transport::TransportError::MultiaddrNotSupported(addr)),
        };
        if parts.any(|p| matches!(p, Protocol::P2pCircuit)) {
            return Err(libp2p::core::transport::TransportError::MultiaddrNotSupported(addr));
        }
        let src = self.src;
        Ok(Box::pin(async move {
            tcp_from(src, dst).await.map(libp2p::tcp::tokio::TcpStream)
        }))
    }

    fn poll(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<libp2p::core::transport::TransportEvent<Self::ListenerUpgrade, Self::Error>>
    {
        std::task::Poll::Pending
    }
}

/// multistream-select's header and the noise protocol, each a varint length (one
/// byte here) and the line; the node answers with the same bytes.
const SELECT_NOISE: &[u8] = b"\x13/multistream/1.0.0\n\x07/noise\n";

/// Proposes `proposal` (multistream-select lines) and checks the node echoes it,
/// which is how a listener accepts the header and the protocol.
async fn select<S>(io: &mut S, proposal: &[u8]) -> Result<()>
where
    S: futures::AsyncRead + futures::AsyncWrite + Unpin,
{
    io.write_all(proposal).await.context("propose")?;
    io.flush().await?;
    let mut answer = vec![0u8; proposal.len()];
    io.read_exact(&mut answer)
        .await
        .context("read the answer")?;
    ensure!(
        answer == proposal,
        "the node answered {:?} to {:?}",
        String::from_utf8_lossy(&answer),
        String::from_utf8_lossy(proposal)
    );
    Ok(())
}

/// Selects `/noise` and runs the noise handshake as `key` over `stream`; returns the
/// node's PeerId (as noise proved it) and the secured stream.
pub async fn secure(stream: tokio::net::TcpStream, key: &Keypair) -> Result<(PeerId, Secured)> {
    let mut io = libp2p::tcp::tokio::TcpStream(stream);
    select(&mut io, SELECT_NOISE)
        .await
        .context("select noise")?;
    noise::Config::new(key)
        .context("noise config")?
        .upgrade_outbound(io, "/noise")
        .await
        .map_err(|e| anyhow!("noise handshake: {e}"))
}

/// multistream-select's header and the yamux protocol, each a varint length (one
/// byte here) and the line.
const SELECT_YAMUX: &[u8] = b"\x13/multistream/1.0.0\n\x0d/yamux/1.0.0\n";

/// multistream-select's header alone: what a stream's dialer sends first. A stream
/// that never follows it with a protocol never finishes its negotiation.
pub const MULTISTREAM_HEADER: &[u8] = b"\x13/multistream/1.0.0\n";

/// Selects yamux on a secured connection by hand. After this, the connection is
/// established as far as the node knows.
pub async fn select_yamux(io: &mut Secured) -> Result<()> {
    select(io, SELECT_YAMUX).await.context("select yamux")
}

/// Connects from `src` to `dst` as `key` and brings the connection to the point where
/// the node counts it established: TCP, noise, yamux selected. `deadline` bounds the
/// whole setup.
pub async fn establish(
    src: IpAddr,
    dst: SocketAddr,
    key: &Keypair,
    deadline: Duration,
) -> Result<Secured> {
    tokio::time::timeout(deadline, async {
        let tcp = tcp_from(src, dst).await.context("tcp connect")?;
        let (_, mut io) = secure(tcp, key).await?;
        select_yamux(&mut io).await?;
        Ok(io)
    })
    .await
    .map_err(|_| anyhow!("no connection within {deadline:?}"))?
}

/// The shape of a connection flood.
#[derive(Debug, Clone, Copy)]
pub struct Flood {
    /// Dials in all.
    pub dials: usize,
    /// Source addresses: 127.0.0.2 ..= 127.0.0.(1 + sources), standing for hosts.
    pub sources: u8,
    /// The dials start evenly spread over this.
    pub spread: Duration,
    /// Most dials in flight (connecting or holding) at once.
    pub max_in_flight: usize,
    /// How long an established connection is held (unless the node closes it).
    pub hold: Duration,
}

/// What the dials of a flood ended in, counted as they end.
#[derive(Debug, Default)]
pub struct FloodOutcomes {
    /// Dials that completed TCP, noise and yamux.
    pub established: AtomicUsize,
    /// Dials that did not.
    pub refused: AtomicUsize,
    /// Established connections the node closed before the hold ended.
    pub closed_by_node: AtomicUsize,
    /// Dials started so far.
    pub started: AtomicUsize,
}

impl Flood {
    /// Runs the flood against `dst`, dial `i` with `keys[i % keys.len()]`: each
    /// completes TCP, noise and yamux and then sits on the connection reading
    /// whatever the node sends and answering none of it. Returns when every dial
    /// has ended.
    pub async fn run(self, dst: SocketAddr, keys: Arc<Vec<Keypair>>, out: Arc<FloodOutcomes>) {
        let in_flight = Arc::new(tokio::sync::Semaphore::new(self.max_in_flight));
        let mut pace = tokio::time::interval(self.spread / self.dials.max(1) as u32);
        let mut dials = Vec::with_capacity(self.dials);
        for i in 0..self.dials {
            pace.tick().await;
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                break;
            };
            out.started.store(i + 1, Ordering::Relaxed);
            let (keys, out) = (keys.clone(), out.clone());
            dials.push(tokio::spawn(async move {
                self.dial(i, dst, &keys, &out).await;
                drop(permit);
            }));
        }
        for d in dials {
            let _ = d.await;
        }
    }

    async fn dial(self, i: usize, dst: SocketAddr, keys: &[Keypair], out: &FloodOutcomes) {
        let src = IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            0,
            2 + (i % usize::from(self.sources.max(1))) as u8,
        ));
        let Some(key) = keys.get(i % keys.len().max(1)) else {
            return;
        };
        let mut io = match establish(src, dst, key, Duration::from_secs(10)).await {
            Ok(io) => io,
            Err(_) => {
                out.refused.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        out.established.fetch_add(1, Ordering::Relaxed);
        let mut sink = vec![0u8; 16 * 1024];
        let held = tokio::time::timeout(self.hold, async {
            while matches!(io.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
        if held.is_ok() {
            out.closed_by_node.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Yamux frames, written and parsed by hand (the spec's 12-byte header: version,
/// type, flags, stream id, length; all big-endian).
pub mod yamux {
    /// Frame type: data.
    pub const DATA: u8 = 0;
    /// Frame type: window update.
    pub const WINDOW_UPDATE: u8 = 1;
    /// Frame type: ping.
    pub const PING: u8 = 2;
    /// Frame type: go away (the whole session ends).
    pub const GO_AWAY: u8 = 3;
    /// Flag: opens a stream.
    pub const SYN: u16 = 1;
    /// Flag: acknowledges a stream (or answers a ping).
    pub const ACK: u16 = 2;
    /// Flag: half-closes a stream.
    pub const FIN: u16 = 4;
    /// Flag: resets a stream.
    pub const RST: u16 = 8;

    /// A frame header.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Header {
        /// Frame type.
        pub kind: u8,
        /// Flags.
        pub flags: u16,
        /// Stream id (0 for session frames).
        pub stream: u32,
        /// Body length (data), credit (window update), opaque value (ping) or code
        /// (go away).
        pub length: u32,
    }

    impl Header {
        /// The 12 bytes on the wire.
        pub fn encode(&self) -> [u8; 12] {
            let mut out = [0u8; 12];
            out[1] = self.kind;
            out[2..4].copy_from_slice(&self.flags.to_be_bytes());
            out[4..8].copy_from_slice(&self.stream.to_be_bytes());
            out[8..12].copy_from_slice(&self.length.to_be_bytes());
            out
        }

        /// Parses 12 bytes.
        pub fn decode(b: &[u8; 12]) -> Header {
            Header {
                kind: b[1],
                flags: u16::from_be_bytes([b[2], b[3]]),
                stream: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
                length: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
            }
        }
    }

    /// A data frame that opens stream `stream` and carries `body`.
    pub fn open_with(stream: u32, body: &[u8]) -> Vec<u8> {
        let mut out = Header {
            kind: DATA,
            flags: SYN,
            stream,
            length: body.len() as u32,
        }
        .encode()
        .to_vec();
        out.extend_from_slice(body);
        out
    }
}

/// A hostile peer that tries to make a node's `/metrics` grow: a rust-libp2p swarm
/// (TCP, noise, yamux) with a fresh identity that advertises, through identify, a
/// random agent, `protocols` made-up protocols and `addrs` listen addresses of
/// distinct protocol stacks (the stacks `first_stack..first_stack + addrs` in an
/// enumeration, so peers given disjoint ranges advertise disjoint stacks), and
/// subscribes through gossipsub to `topics` random topics, publishing to each.
/// Every value is chosen by the attacker; a metric labelled by any of them grows
/// with the attack. The returned task drives the swarm; abort it to disconnect.
pub async fn labelled_peer(
    target: libp2p::Multiaddr,
    protocols: usize,
    addrs: usize,
    first_stack: usize,
    topics: usize,
) -> Result<tokio::task::JoinHandle<()>> {
    use futures::StreamExt;
    use libp2p::{gossipsub, identify, swarm::SwarmEvent, StreamProtocol};

    #[derive(libp2p::swarm::NetworkBehaviour)]
    struct Labels {
        identify: identify::Behaviour,
        gossipsub: gossipsub::Behaviour,
        stream: libp2p_stream::Behaviour,
    }

    let random = || hex::encode(rand::random::<[u8; 8]>());
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default().nodelay(true),
            noise::Config::new,
            libp2p::yamux::Config::default,
        )?
        .with_behaviour(|key| {
            let gossipsub = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gossipsub::Config::default(),
            )?;
            Ok(Labels {
                identify: identify::Behaviour::new(
                    identify::Config::new(format!("/hostile/{}", random()), key.public())
                        .with_agent_version(format!("hostile/{}", random())),
                ),
                gossipsub,
                stream: libp2p_stream::Behaviour::new(),
            })
        })
        .map_err(|e| anyhow!("{e}"))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    // Accepting a protocol is what makes identify list it.
    let mut control = swarm.behaviour().stream.new_control();
    let mut accepting = Vec::new();
    for _ in 0..protocols {
        let name = format!("/hostile/{}/1.0.0", random());
        let protocol = StreamProtocol::try_from_owned(name).map_err(|e| anyhow!("{e}"))?;
        accepting.push(control.accept(protocol).map_err(|e| anyhow!("{e}"))?);
    }
    for n in first_stack..first_stack + addrs {
        swarm.add_external_address(protocol_stack(n).parse()?);
    }
    let mut joined = Vec::new();
    for _ in 0..topics {
        let topic = gossipsub::IdentTopic::new(format!("hostile-{}", random()));
        swarm.behaviour_mut().gossipsub.subscribe(&topic)?;
        joined.push(topic);
    }
    swarm.dial(target.clone())?;
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::ConnectionEstablished { .. } => return Ok(()),
                SwarmEvent::OutgoingConnectionError { error, .. } => {
                    return Err(anyhow!("dial {target}: {error}"))
                }
                _ => {}
            }
        }
    })
    .await
    .map_err(|_| anyhow!("no connection to {target} within 10 s"))??;
    Ok(tokio::spawn(async move {
        let _accepting = accepting;
        let mut published = false;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = swarm.select_next_some() => {}
                _ = tick.tick(), if !published => {
                    // Once the subscriptions have gone out: a message on every topic
                    // (the node has joined none of them, so it has no mesh to refuse).
                    published = true;
                    for topic in &joined {
                        let _ = swarm.behaviour_mut().gossipsub.publish(topic.clone(), b"x".to_vec());
                    }
                }
            }
        }
    }))
}

/// The `n`th listen address in an enumeration of distinct protocol stacks: an IPv4
/// address followed by one `tcp`, `udp`, `dccp` or `sctp` component per base-4 digit
/// of `n + 1` (numbers without leading zeros, so every `n` gets its own stack).
pub fn protocol_stack(n: usize) -> String {
    const PARTS: [&str; 4] = ["tcp", "udp", "dccp", "sctp"];
    let mut addr = String::from("/ip4/192.0.2.1");
    let mut n = n + 1;
    while n > 0 {
        addr.push_str(&format!("/{}/{}", PARTS[n % 4], 1000 + n % 4));
        n /= 4;
    }
    addr
}
