//! A NAT lab in network namespaces: a public segment (198.18.0.0/24, a bridge in
//! its own namespace) with public hosts on it, and routers that NAT a private LAN
//! each (10.N.0.0/24) onto it with iptables, one peer behind each router.
//!
//! ```text
//!   <p>-boot 198.18.0.10 ─┐
//!   <p>-s1   198.18.0.11 ─┤
//!                         ├─ bridge in <p>-pub
//!   <p>-ra   198.18.0.21 ─┘ (wan)   <p>-ra lan 10.1.0.1 ── <p>-pa 10.1.0.2
//! ```
//!
//! Public hosts have only the public segment's route; peers route through their
//! router; routers have no default route. Nothing reaches outside the lab, and
//! every lab is new namespaces, so connection tracking starts clean. Routers drop
//! every unsolicited packet on their WAN side (as home routers do; a reset would
//! also kill TCP simultaneous opens).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};

/// How a router maps and filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// Linux's own MASQUERADE: endpoint-independent mapping (the source port is kept
    /// when free), address-and-port-dependent filtering.
    PortRestricted,
    /// MASQUERADE with `--random-fully`: a new outside port for every new flow, so
    /// every destination sees a different port (endpoint-dependent mapping).
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

/// A lab; dropping it kills its processes and deletes its namespaces.
pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    veths: u32,
    children: Vec<Child>,
    dir: PathBuf,
}

impl Lab {
    /// A public segment, empty. `dir` receives the logs of processes run in the lab.
    pub fn new(dir: &Path) -> Result<Lab> {
        // Unique per lab: tests of one binary run in parallel in one process.
        static LABS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = LABS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prefix = format!("sl{}{n}", std::process::id() % 10_000);
        // Leftovers of an earlier run with the same pid.
        for ns in sh(&["ip", "netns", "list"])?.lines() {
            let name = ns.split_whitespace().next().unwrap_or_default();
            if name.starts_with(&format!("{prefix}-")) {
                let _ = sh(&["ip", "netns", "del", name]);
            }
        }
        let mut lab = Lab {
            prefix,
            namespaces: Vec::new(),
            veths: 0,
            children: Vec::new(),
            dir: dir.to_path_buf(),
        };
        let public = lab.namespace("pub")?;
        sh(&["ip", "-n", &public, "link", "add", "br0", "type", "bridge"])?;
        sh(&["ip", "-n", &public, "link", "set", "br0", "up"])?;
        Ok(lab)
    }

    /// The namespace name of a lab member.
    pub fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    fn namespace(&mut self, name: &str) -> Result<String> {
        let ns = self.ns(name);
        sh(&["ip", "netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A veth pair with `inner` in `ns` and its other end on the public bridge.
    fn plug_public(&mut self, ns: &str, inner: &str) -> Result<()> {
        self.veths += 1;
        let outer = format!("{}p{}", self.prefix, self.veths);
        let public = self.ns("pub");
        sh(&[
            "ip", "link", "add", inner, "netns", ns, "type", "veth", "peer", "name", &outer,
            "netns", &public,
        ])?;
        sh(&[
            "ip", "-n", &public, "link", "set", &outer, "master", "br0", "up",
        ])?;
        sh(&["ip", "-n", ns, "link", "set", inner, "up"])?;
        Ok(())
    }

    /// A host on the public segment.
    pub fn host(&mut self, name: &str, ip: &str) -> Result<String> {
        let ns = self.namespace(name)?;
        self.plug_public(&ns, "eth0")?;
        sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "eth0",
        ])?;
        Ok(ns)
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
        let r = self.namespace(router)?;
        self.plug_public(&r, "wan")?;
        sh(&[
            "ip",
            "-n",
            &r,
            "addr",
            "add",
            &format!("{wan_ip}/24"),
            "dev",
            "wan",
        ])?;
        let p = self.namespace(peer)?;
        sh(&[
            "ip", "link", "add", "lan", "netns", &r, "type", "veth", "peer", "name", "eth0",
            "netns", &p,
        ])?;
        sh(&[
            "ip",
            "-n",
            &r,
            "addr",
            "add",
            &format!("10.{net}.0.1/24"),
            "dev",
            "lan",
        ])?;
        sh(&["ip", "-n", &r, "link", "set", "lan", "up"])?;
        sh(&[
            "ip",
            "-n",
            &p,
            "addr",
            "add",
            &format!("10.{net}.0.2/24"),
            "dev",
            "eth0",
        ])?;
        sh(&["ip", "-n", &p, "link", "set", "eth0", "up"])?;
        sh(&[
            "ip",
            "-n",
            &p,
            "route",
            "add",
            "default",
            "via",
            &format!("10.{net}.0.1"),
        ])?;
        sh(&[
            "ip",
            "netns",
            "exec",
            &r,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])?;
        let ipt = |rule: &[&str]| -> Result<()> {
            let mut args = vec!["ip", "netns", "exec", &r, "iptables"];
            args.extend_from_slice(rule);
            sh(&args).map(drop)
        };
        let mut masquerade = vec![
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            "wan",
            "-j",
            "MASQUERADE",
        ];
        if nat == Nat::Symmetric {
            masquerade.push("--random-fully");
        }
        ipt(&masquerade)?;
        for chain in ["FORWARD", "INPUT"] {
            ipt(&[
                "-A",
                chain,
                "-i",
                "wan",
                "-m",
                "conntrack",
                "--ctstate",
                "ESTABLISHED,RELATED",
                "-j",
                "ACCEPT",
            ])?;
            ipt(&["-A", chain, "-i", "wan", "-j", "DROP"])?;
        }
        Ok(p)
    }

    /// Forwards `proto` port `port` on router `router` to 10.`net`.0.2 (a port
    /// forward, as a user sets one up by hand).
    pub fn forward(&self, router: &str, net: u8, proto: &str, port: u16) -> Result<()> {
        let r = self.ns(router);
        let to = format!("10.{net}.0.2:{port}");
        let port = port.to_string();
        sh(&[
            "ip",
            "netns",
            "exec",
            &r,
            "iptables",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-i",
            "wan",
            "-p",
            proto,
            "--dport",
            &port,
            "-j",
            "DNAT",
            "--to-destination",
            &to,
        ])?;
        sh(&[
            "ip", "netns", "exec", &r, "iptables", "-I", "FORWARD", "1", "-i", "wan", "-p", proto,
            "--dport", &port, "-j", "ACCEPT",
        ])?;
        Ok(())
    }

    /// Removes the port forward [`Lab::forward`] added.
    pub fn unforward(&self, router: &str, net: u8, proto: &str, port: u16) -> Result<()> {
        let r = self.ns(router);
        let to = format!("10.{net}.0.2:{port}");
        let port = port.to_string();
        sh(&[
            "ip",
            "netns",
            "exec",
            &r,
            "iptables",
            "-t",
            "nat",
            "-D",
            "PREROUTING",
            "-i",
            "wan",
            "-p",
            proto,
            "--dport",
            &port,
            "-j",
            "DNAT",
            "--to-destination",
            &to,
        ])?;
        sh(&[
            "ip", "netns", "exec", &r, "iptables", "-D", "FORWARD", "-i", "wan", "-p", proto,
            "--dport", &port, "-j", "ACCEPT",
        ])?;
        Ok(())
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
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.reap();
        for ns in self.namespaces.iter().rev() {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
    }
}
