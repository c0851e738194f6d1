//! What the operating system says about this process and this machine: CPU time,
//! resident memory, core count, kernel.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// User plus system CPU seconds this process has used so far (all threads).
pub fn cpu_seconds() -> Result<f64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one `rusage` through the pointer, which points to
    // memory of that type; RUSAGE_SELF is always a valid target.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        bail!("getrusage: {}", std::io::Error::last_os_error());
    }
    // SAFETY: getrusage returned 0, so it filled the struct (and it was zeroed before).
    let usage = unsafe { usage.assume_init() };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(secs(usage.ru_utime) + secs(usage.ru_stime))
}

/// Hands freed heap pages back to the kernel (glibc's `malloc_trim`), so resident
/// memory shows live allocations rather than what churn left fragmented.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator's own arenas;
    // it takes no pointers and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Resident and peak resident memory of this process, in bytes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Rss {
    /// `VmRSS`.
    pub now: u64,
    /// `VmHWM`, the peak.
    pub peak: u64,
}

/// Reads `/proc/self/status`.
pub fn rss() -> Result<Rss> {
    let text = std::fs::read_to_string("/proc/self/status").context("read /proc/self/status")?;
    let field = |name: &str| -> Result<u64> {
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .with_context(|| format!("{name} missing in /proc/self/status"))?;
        let kib: u64 = line
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("{name} is not a number: {line}"))?;
        Ok(kib * 1024)
    };
    Ok(Rss {
        now: field("VmRSS:")?,
        peak: field("VmHWM:")?,
    })
}

/// CPU seconds the whole machine has been busy so far, all cores together: the
/// `cpu` line of `/proc/stat` (ticks of `USER_HZ`, 100 on Linux) without idle and
/// iowait. Steal counts as busy: it is time this process could not have.
pub fn machine_busy_seconds() -> Result<f64> {
    let text = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    if ticks.len() < 8 {
        bail!("short cpu line in /proc/stat: {line}");
    }
    let busy: f64 = ticks[..8].iter().sum::<f64>() - ticks[3] - ticks[4];
    Ok(busy / 100.0)
}

/// The 1-minute load average.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The machine the benchmark ran on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// Cores this process may use.
    pub nproc: usize,
    /// `uname -r`.
    pub kernel: String,
    /// The first `model name` in `/proc/cpuinfo`.
    pub cpu_model: String,
    /// `MemTotal`, in bytes.
    pub mem_total_bytes: u64,
    /// Servant's version.
    pub servant_version: String,
    /// Whether this binary was built with optimizations.
    pub release_build: bool,
}

impl Machine {
    /// Reads what it can; unknown fields stay empty rather than failing the run.
    pub fn detect() -> Machine {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let cpu_model = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default();
        let mem_total_bytes = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024);
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            cpu_model,
            mem_total_bytes,
            servant_version: servant::VERSION.to_string(),
            release_build: !cfg!(debug_assertions),
        }
    }
}

/// User plus system CPU seconds another process (all its threads) has used so far:
/// `utime` and `stime` of `/proc/<pid>/stat`, in clock ticks.
pub fn pid_cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    // The command name (field 2) is in parentheses and may hold spaces or ')':
    // fields are counted from after the last ')'.
    let rest = text
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("no command name in {path}"))?;
    // After the name: state is field 3, utime field 14, stime field 15.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Result<f64> {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("field {} missing in {path}", i + 3))
    };
    let (utime, stime) = (tick(11)?, tick(12)?);
    Ok((utime + stime) / clock_ticks_per_second())
}

/// `sysconf(_SC_CLK_TCK)`, the unit of `/proc/<pid>/stat`'s times (100 on Linux).
fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf takes a constant and reads no memory of ours.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// Starts `servant` children from a clean slate: the user's `RUST_LOG` and `SERVANT_*`
/// settings would change what a benchmark measures.
pub fn clear_servant_env(cmd: &mut std::process::Command) {
    cmd.env_remove("RUST_LOG");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("SERVANT_") {
            cmd.env_remove(key);
        }
    }
}
