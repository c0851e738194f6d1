//! The network namespaces of the multi-source run: one fetcher namespace holding a
//! bridge, and one namespace per provider joined to it by a veth pair whose provider
//! end is rate limited with `tbf` (this kernel has no netem). Addresses live only in
//! these namespaces, which have no route out.
//!
//! ```text
//!   sbench-f: bridge sbbr 10.213.77.1/24 ── sbv1 ══ eth0 10.213.77.11 (sbench-p1, tbf R)
//!                                        ── sbv2 ══ eth0 10.213.77.12 (sbench-p2, tbf R) ...
//! ```

use std::{
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

/// Prefix of every namespace this benchmark makes; leftovers with it are removed.
const PREFIX: &str = "sbench-";
/// The fetcher's namespace.
const FETCHER: &str = "sbench-f";

/// A command that runs `program` in `netns` (through `ip netns exec`, which execs
/// in place, so the child's pid is the program's) or, without one, here.
pub fn command(netns: Option<&str>, program: &Path) -> Command {
    match netns {
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns]).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// Whether this process may make namespaces (root), and `ip` and `tc` are there.
pub fn available() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root: network namespaces need root".into());
    }
    for tool in ["ip", "tc"] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Err(format!("`{tool}` (iproute2) is not installed"));
        }
    }
    Ok(())
}

fn run(args: &[&str]) -> Result<()> {
    output(args).map(|_| ())
}

/// Runs a command to completion and returns its standard output; a failure carries
/// its standard error.
fn output(args: &[&str]) -> Result<String> {
    let Some((program, rest)) = args.split_first() else {
        bail!("no command to run");
    };
    let output = Command::new(program)
        .args(rest)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {}", args.join(" ")))?;
    if !output.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Removes namespaces a crashed run left behind, ending the processes still in them
/// (a previous run of this benchmark started them).
pub fn cleanup_leftovers() -> Result<()> {
    let list = output(&["ip", "netns", "list"])?;
    for name in list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
    {
        eprintln!("[files] removing the leftover namespace {name}");
        remove(name);
    }
    Ok(())
}

fn remove(name: &str) {
    let pids = output(&["ip", "netns", "pids", name]).unwrap_or_default();
    for pid in pids.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
        // SAFETY: kill takes plain integers; the pid was read from the namespace's
        // own process list just now.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
    if !pids.trim().is_empty() {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    if let Err(e) = run(&["ip", "netns", "del", name]) {
        eprintln!("[files] warning: {e:#}");
    }
}

/// The namespaces of one multi-source run; removed when dropped.
pub struct Lab {
    providers: usize,
    made: Vec<String>,
}

impl Lab {
    /// Makes the fetcher's namespace and `providers` provider namespaces, each
    /// provider's egress limited to `rate_mbit` Mbit/s.
    pub fn create(providers: usize, rate_mbit: u32) -> Result<Lab> {
        cleanup_leftovers()?;
        let mut lab = Lab {
            providers,
            made: Vec::new(),
        };
        lab.add_namespace(FETCHER)?;
        let fetcher_cidr = format!("{}/24", Self::fetcher_ip());
        for args in [
            vec!["ip", "-n", FETCHER, "link", "add", "sbbr", "type", "bridge"],
            vec![
                "ip",
                "-n",
                FETCHER,
                "addr",
                "add",
                &fetcher_cidr,
                "dev",
                "sbbr",
            ],
            vec!["ip", "-n", FETCHER, "link", "set", "sbbr", "up"],
        ] {
            run(&args)?;
        }
        // The bucket holds 10 ms at the rate, and at least a few full-size GSO
        // packets (64 KiB), which tbf would otherwise have to split or drop.
        let burst = (u64::from(rate_mbit) * 1_000_000 / 8 / 100).max(256 * 1024);
        let rate = format!("{rate_mbit}mbit");
        let burst = burst.to_string();
        for i in 0..providers {
            let ns = Self::provider_ns(i);
            lab.add_namespace(&ns)?;
            let veth = format!("sbv{}", i + 1);
            let cidr = format!("{}/24", Self::provider_ip(i));
            for args in [
                vec![
                    "ip", "-n", FETCHER, "link", "add", &veth, "type", "veth", "peer", "name",
                    "eth0", "netns", &ns,
                ],
                vec!["ip", "-n", FETCHER, "link", "set", &veth, "master", "sbbr"],
                vec!["ip", "-n", FETCHER, "link", "set", &veth, "up"],
                vec!["ip", "-n", &ns, "addr", "add", &cidr, "dev", "eth0"],
                vec!["ip", "-n", &ns, "link", "set", "eth0", "up"],
                vec![
                    "tc", "-n", &ns, "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", &rate,
                    "burst", &burst, "latency", "50ms",
                ],
            ] {
                run(&args)?;
            }
        }
        Ok(lab)
    }

    fn add_namespace(&mut self, name: &str) -> Result<()> {
        run(&["ip", "netns", "add", name])?;
        self.made.push(name.to_string());
        run(&["ip", "-n", name, "link", "set", "lo", "up"])
    }

    /// The fetcher's namespace.
    pub fn fetcher_ns(&self) -> &'static str {
        FETCHER
    }

    /// The fetcher's address.
    pub fn fetcher_ip() -> Ipv4Addr {
        Ipv4Addr::new(10, 213, 77, 1)
    }

    /// Provider `i`'s namespace.
    pub fn provider_ns(i: usize) -> String {
        format!("{PREFIX}p{}", i + 1)
    }

    /// Provider `i`'s address.
    pub fn provider_ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, 77, 11 + i as u8)
    }

    /// How many provider namespaces there are.
    pub fn providers(&self) -> usize {
        self.providers
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for name in self.made.drain(..).rev() {
            remove(&name);
        }
    }
}
