//! The NAT lab from Rust: a thin driver of `tests/natlab/lab.sh` (see its header and
//! `tests/natlab/README.md`), which builds network namespaces with a public segment
//! (198.18.0.0/24), public hosts, and routers that NAT one peer's LAN each with
//! iptables, and tears them down again. This module adds what tests need on top:
//! running Servant in the lab's namespaces and reading their logs.
//!
//! Every lab is new namespaces, so connection tracking starts clean; nothing routes
//! out of the lab.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};

/// How a router maps and filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// Endpoint-independent mapping (the source port is kept when free),
    /// address-and-port-dependent filtering: Linux's own SNAT.
    PortRestricted,
    /// Endpoint-independent mapping, address-dependent filtering.
    AddressRestricted,
    /// Endpoint-independent mapping and filtering (one peer behind it).
    FullCone,
    /// A new outside port for every new flow (`--random-fully`): every destination
    /// sees a different port (endpoint-dependent mapping).
    Symmetric,
}

/// Runs a command; a failure carries its standard error.
pub fn sh(args: &[&str]) -> Result<String> {
    let Some((program, rest)) = args.split_first() else {
        bail!("no command");
    };
    let out = Command::new(program)
        .args(rest)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether the lab can run here: root, `ip` and `iptables`.
pub fn available() -> Result<(), String> {
    if !crate::is_root() {
        return Err("not root: network namespaces need root".into());
    }
    for (tool, flag) in [("ip", "-V"), ("iptables", "--version")] {
        let found = Command::new(tool)
            .arg(flag)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Err(format!(
                "`{tool}` is not installed (tests/setup/system.sh installs it)"
            ));
        }
    }
    Ok(())
}

/// `tests/natlab/lab.sh`, which builds and tears down the lab.
fn lab_sh() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("natlab/lab.sh")
}

/// A lab; dropping it kills its processes and deletes its namespaces.
pub struct Lab {
    name: String,
    children: Vec<Child>,
    /// Packet captures ([`Lab::capture`]): stopped after every other process, so they
    /// hold the last packets of the nodes' exit.
    captures: Vec<Child>,
    dir: PathBuf,
}

impl Lab {
    /// A public segment, empty. `dir` receives the logs of processes run in the lab.
    pub fn new(dir: &Path) -> Result<Lab> {
        // Unique per lab (tests of one binary run in parallel in one process), and
        // within lab.sh's six characters.
        static LABS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = LABS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("l{:03}{:02}", std::process::id() % 1000, n % 100);
        let lab = Lab {
            name,
            children: Vec::new(),
            captures: Vec::new(),
            dir: dir.to_path_buf(),
        };
        // Leftovers of an earlier run that had the same name.
        lab.sh(&["down"])?;
        lab.sh(&["up"])?;
        Ok(lab)
    }

    fn sh(&self, args: &[&str]) -> Result<String> {
        let script = lab_sh();
        let script = script.to_str().context("lab.sh path")?;
        let mut full = vec!["bash", script, args[0], &self.name];
        full.extend_from_slice(&args[1..]);
        sh(&full)
    }

    /// The namespace name of a lab member.
    pub fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.name)
    }

    /// A host on the public segment.
    pub fn host(&mut self, name: &str, ip: &str) -> Result<String> {
        self.sh(&["host", name, ip])?;
        Ok(self.ns(name))
    }

    /// A router with `wan_ip` on the public segment NATing 10.`net`.0.0/24, and one
    /// peer (10.`net`.0.2) behind it. Returns the peer's namespace.
    pub fn natted_peer(
        &mut self,
        router: &str,
        peer: &str,
        wan_ip: &str,
        net: u8,
        nat: Nat,
    ) -> Result<String> {
        let kind = match nat {
            Nat::PortRestricted => "port-restricted",
            Nat::AddressRestricted => "address-restricted",
            Nat::FullCone => "full-cone",
            Nat::Symmetric => "symmetric",
        };
        self.sh(&["router", router, wan_ip, &format!("10.{net}.0.0/24"), kind])?;
        self.sh(&["peer", peer, router, &format!("10.{net}.0.2")])?;
        Ok(self.ns(peer))
    }

    /// A port-restricted router with `wan_ip` (in 11.0.0.0/24, which libp2p-upnp takes
    /// for global) running miniupnpd for 10.`net`.0.0/24, and one peer (10.`net`.0.2)
    /// behind it. Returns the peer's namespace.
    pub fn upnp_peer(&mut self, router: &str, peer: &str, wan_ip: &str, net: u8) -> Result<String> {
        let ns = self.natted_peer(router, peer, wan_ip, net, Nat::PortRestricted)?;
        self.sh(&["upnp", router])?;
        Ok(ns)
    }

    /// The rules miniupnpd has installed on `router` for its mappings (the
    /// `-A MINIUPNPD…` lines of `iptables-legacy-save`: a DNAT in nat, an ACCEPT in
    /// filter per mapping). `-L` cannot show them: miniupnpd writes a DNAT target
    /// revision this iptables prints as "unsupported".
    pub fn upnp_mappings(&self, router: &str) -> Result<Vec<String>> {
        let ns = self.ns(router);
        let rules = sh(&["ip", "netns", "exec", &ns, "iptables-legacy-save"])?;
        Ok(rules
            .lines()
            .filter(|l| l.starts_with("-A MINIUPNPD"))
            .map(str::to_string)
            .collect())
    }

    /// The lab's self-check: the router maps and filters as its type says (needs two
    /// public hosts as observers). Returns its `checked:` lines.
    pub fn check(&self, router: &str, peer: &str) -> Result<String> {
        self.sh(&["check", router, peer])
    }

    /// Forwards `proto` port `port` on router `router` to 10.`net`.0.2 (a port
    /// forward, as a user sets one up by hand).
    pub fn forward(&self, router: &str, net: u8, proto: &str, port: u16) -> Result<()> {
        let port = port.to_string();
        self.sh(&["forward", router, proto, &port, &format!("10.{net}.0.2")])
            .map(drop)
    }

    /// Removes the port forward [`Lab::forward`] added. Flows already through it
    /// live on in connection tracking until they end.
    pub fn unforward(&self, router: &str, net: u8, proto: &str, port: u16) -> Result<()> {
        let port = port.to_string();
        self.sh(&["unforward", router, proto, &port, &format!("10.{net}.0.2")])
            .map(drop)
    }

    /// Makes router `router` hold every packet it forwards, either way, for `ms`
    /// milliseconds (`lab.sh delay`: an NFQUEUE program, as this kernel has no netem).
    pub fn delay(&self, router: &str, ms: f64) -> Result<()> {
        self.sh(&["delay", router, &ms.to_string()]).map(drop)
    }

    /// Starts `program args` in namespace `ns`; its output goes to `<dir>/<log>.log`.
    pub fn spawn(&mut self, ns: &str, log: &str, program: &Path, args: &[String]) -> Result<()> {
        let file = std::fs::File::create(self.dir.join(format!("{log}.log")))?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("start {} in {ns}", program.display()))?;
        self.children.push(child);
        Ok(())
    }

    /// Captures the frames that cross the public bridge's port to lab member `member`
    /// (a host or a router's WAN side) into the pcap file `file`, and returns once
    /// tcpdump captures: a trial can start at once without losing its first packets.
    /// Every port's frames are timestamped by the same kernel clock, so captures of
    /// two ports time a packet's way through a host between them.
    pub fn capture(&mut self, member: &str, file: &Path) -> Result<()> {
        let port = self.ns(member);
        let log = format!("tcpdump-{member}");
        let file = file.to_str().context("capture path")?;
        // The bridge's ports are named like the members' namespaces, in the segment's
        // own namespace (lab.sh). Whole frames, as a trial moves only kilobytes (and
        // the pcap reader refuses frames cut shorter than they were sent). Immediate
        // mode hands each packet over as it comes, and -U writes it at once: by
        // default the kernel hands packets over in blocks, at the latest after a
        // second, and a trial that ends sooner (a bare one takes a few hundred ms)
        // left an empty file when tcpdump was stopped.
        let args = ["-i", &port, "-n", "--immediate-mode", "-U", "-w", file].map(String::from);
        let pub_ns = self.ns("pub");
        self.spawn(&pub_ns, &log, Path::new("tcpdump"), &args)?;
        if let Some(child) = self.children.pop() {
            self.captures.push(child);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !self.log_tail(&log, 5).contains("listening on") {
            if std::time::Instant::now() >= deadline {
                bail!(
                    "tcpdump on {port} did not start (is tcpdump installed? \
                     tests/setup/system.sh installs it): {}",
                    self.log_tail(&log, 5)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Runs `program args` in `ns` to completion and returns its standard output.
    pub fn run(&self, ns: &str, program: &Path, args: &[&str]) -> Result<String> {
        let mut full = vec!["ip", "netns", "exec", ns];
        let program = program.to_str().context("program path")?;
        full.push(program);
        full.extend_from_slice(args);
        sh(&full)
    }

    /// The last lines of a process's log.
    pub fn log_tail(&self, log: &str, lines: usize) -> String {
        crate::tail(&self.dir.join(format!("{log}.log")), lines)
    }

    /// Waits a little for children to exit after a kill.
    fn reap(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
        }
        for child in &mut self.children {
            let _ = child.wait();
        }
        for capture in &mut self.captures {
            // SIGTERM, not SIGKILL: tcpdump then writes out what it still holds.
            // SAFETY: kill only sends a signal to our own child, not yet waited for.
            unsafe { libc::kill(capture.id() as libc::pid_t, libc::SIGTERM) };
        }
        for capture in &mut self.captures {
            let _ = capture.wait();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.reap();
        if let Err(e) = self.sh(&["down"]) {
            eprintln!("natlab: tearing down {}: {e:#}", self.name);
        }
    }
}

/// Runs `make` on a thread that joined network namespace `ns`, and returns what it
/// made: a socket made there stays in that namespace wherever it is used after.
pub fn in_ns<T: Send + 'static>(
    ns: &str,
    make: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    use std::os::fd::AsRawFd;
    let ns_path = format!("/run/netns/{ns}");
    std::thread::spawn(move || -> Result<T> {
        let file = std::fs::File::open(&ns_path).with_context(|| format!("open {ns_path}"))?;
        // SAFETY: setns only moves this short-lived thread into the namespace that the
        // open descriptor names; sockets made here keep it after the thread ends.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {ns_path}: {}", std::io::Error::last_os_error());
        }
        make()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the namespace thread panicked"))?
}

/// Sends one HTTP/1.1 request to `127.0.0.1:port` inside network namespace `ns` and
/// returns the response body (an error for a status other than 2xx). The socket is
/// made by a thread that joins the namespace, so no process starts: a benchmark can
/// talk to a node's API without a process launch (or exit) landing on the
/// milliseconds it measures, on a machine whose two cores the lab's nodes share.
pub fn http(ns: &str, port: u16, method: &str, path: &str, body: Option<&str>) -> Result<String> {
    use std::io::{Read, Write};
    let what = format!("{method} {path} in {ns}");
    let mut stream = in_ns(ns, move || {
        Ok(std::net::TcpStream::connect(("127.0.0.1", port))?)
    })
    .with_context(|| format!("{what}: connect"))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .with_context(|| format!("{what}: send"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .with_context(|| format!("{what}: read"))?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .with_context(|| format!("{what}: no HTTP response"))?;
    let head = std::str::from_utf8(&response[..split]).with_context(|| format!("{what}: head"))?;
    let rest = &response[split + 4..];
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if !status.starts_with('2') {
        bail!("{what}: {head}: {}", String::from_utf8_lossy(rest));
    }
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(rest).with_context(|| format!("{what}: chunked body"))?
    } else {
        rest.to_vec()
    };
    String::from_utf8(body).with_context(|| format!("{what}: body is not UTF-8"))
}

/// The payload of a chunked HTTP body; an error unless it ends with its last chunk.
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("a chunk size line without its end")?;
        let line = std::str::from_utf8(&rest[..line_end]).context("a chunk size line")?;
        // Chunk extensions (`;name=value`) are allowed and ignored.
        let size = line.split(';').next().unwrap_or("").trim();
        let n = usize::from_str_radix(size, 16).with_context(|| format!("chunk size {size:?}"))?;
        let data = &rest[line_end + 2..];
        if n == 0 {
            return Ok(out);
        }
        let chunk = data.get(..n).context("a chunk shorter than its size")?;
        out.extend_from_slice(chunk);
        rest = data
            .get(n..)
            .and_then(|r| r.strip_prefix(b"\r\n"))
            .context("a chunk without its line end")?;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_chunked_body_is_joined_and_a_broken_one_refused() {
        let body = "4\r\n{\"a\"\r\n3;x=y\r\n:1}\r\n0\r\n\r\n";
        assert_eq!(
            super::dechunk(body.as_bytes()).ok(),
            Some(b"{\"a\":1}".to_vec())
        );
        // A multi-byte character split across chunks is joined whole.
        let euro = "\u{20ac}".as_bytes();
        let mut split = b"1\r\n".to_vec();
        split.extend_from_slice(&euro[..1]);
        split.extend_from_slice(b"\r\n2\r\n");
        split.extend_from_slice(&euro[1..]);
        split.extend_from_slice(b"\r\n0\r\n\r\n");
        assert_eq!(super::dechunk(&split).ok(), Some(euro.to_vec()));
        // A size past the end, a missing last chunk, a bad size: errors, not panics.
        assert!(super::dechunk(b"ff\r\nabc").is_err());
        assert!(super::dechunk(b"3\r\nabc\r\n").is_err());
        assert!(super::dechunk(b"zz\r\nabc\r\n0\r\n\r\n").is_err());
    }
}
