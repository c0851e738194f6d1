//! The C allocator, set up for a process that runs for months under churn.
//!
//! Rust's global allocator here is glibc's malloc. Its defaults suit short programs:
//! a dynamic mmap threshold and eight arenas per core. A node that opens and closes
//! thousands of connections and moves files in 1 MiB chunks needs them fixed.
//!
//! A periodic `malloc_trim` ([`trim_every`], the `heap_trim_interval` option) is off
//! by default: three times side by side it was inside the run-to-run noise. In one
//! 5-minute soak at 10x churn the measured nodes' memory slope was 1.7 MiB per 10
//! minutes with it and 1.9 without; after a 7-minute warm-up (a trim every 30 s) the
//! worst node's was 0.74 with it and 0.63 without; over 100 minutes (release, a trim
//! every minute, the same churn) 0.16-0.24 with it and 0.20-0.33 without, the free
//! bytes kept at the end 1.0-1.5 MiB against 1.4-2.3, and both met every criterion.
//! Most freed memory sits in holes between live blocks, which a trim hands back only
//! a page at a time.
//!
//! jemalloc in glibc's place was tried too (a throwaway build, side by side in a
//! 5-minute soak): no better. Its worst node's slope was 3.06 MiB per 10 minutes against
//! glibc's 1.93, and it started about 1 MB higher; returning freed pages at once did not
//! change that. The figures are in README.md (Soak).

/// Free memory a heap keeps at its top before giving it back to the system.
///
/// Fixing the mmap threshold (below) also fixes this at glibc's 128 KiB, and a
/// transfer frees far more than that at once: yamux copies every write into 16 KiB
/// frames, hundreds of them in flight. Each time the frames of a burst were freed the
/// heap was trimmed, and the next burst faulted the same pages in again, zeroed. Two
/// `servant` processes moving 2 GiB took 200,000 (provider) and 310,000 (fetcher)
/// page faults with the default and about 10,000 each with 2 MiB, and 21-22% less
/// CPU (`perf stat` over the same `servant-bench files` run); 512 KiB still left the
/// fetcher at 200,000. Idle, a node keeps at most this much per arena.
#[cfg_attr(not(all(target_os = "linux", target_env = "gnu")), allow(dead_code))]
const TRIM_THRESHOLD: i32 = 2 * 1024 * 1024;

/// Fixes the allocator's parameters; call before any other thread starts.
///
/// glibc raises its mmap threshold each time a large block is freed, so after the
/// first 1 MiB chunk buffer later ones come from the heap and stay there: a node
/// moving files grew in 2.8 MB steps under the soak without holding more data. A
/// fixed threshold returns large buffers to the system when they are freed, and two
/// arenas (instead of eight per core) keep the runtime's threads from each holding
/// a heap of their own. Chunk buffers, which a transfer would otherwise map and
/// unmap once per chunk, are recycled by [`crate::chunk_pool`] instead; see
/// [`TRIM_THRESHOLD`] for the trim threshold.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before any thread
    // starts, and a refused value (return 0) leaves glibc's default in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

/// Hands the heaps' free pages back to the system: the top of each arena above a
/// page, and whole free pages in holes below live blocks. Returns whether any memory
/// was released; `false` where the allocator is not glibc's.
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only works under the allocator's own locks; a pad of 0
        // keeps nothing beyond what live blocks need.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Calls [`trim`] every `period` until `stop` turns true; a zero `period` returns at
/// once. Runs on a blocking thread, as one trim walks every arena under its lock.
pub async fn trim_every(period: std::time::Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
    if period.is_zero() {
        return;
    }
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                let _ = tokio::task::spawn_blocking(trim).await;
            }
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    return;
                }
            }
        }
    }
}

/// What the C allocator holds, from glibc's `mallinfo2`, summed over its arenas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heap {
    /// Bytes handed out from the arenas and not yet freed.
    pub in_use: u64,
    /// Bytes of blocks above the mmap threshold, each mapped on its own and unmapped
    /// when freed. Their pages count as resident only once written: QUIC endpoints
    /// map buffers of megabytes that stay mostly untouched.
    pub mapped: u64,
    /// Bytes free in the arenas, kept for reuse rather than returned: blocks freed
    /// below live ones, and the top of each heap, resident only where once written.
    pub free: u64,
}

/// The allocator's figures now, or `None` where the allocator is not glibc's.
///
/// They tell apart the two reasons resident memory can rise: live data growing
/// (`in_use`, a cache or a leak) and freed memory the heap keeps (`free`: up to
/// [`TRIM_THRESHOLD`] at the top of each arena by design, and holes below it). Each call locks every arena briefly, cheap at the rate
/// of metric scrapes.
pub fn heap() -> Option<Heap> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 takes no arguments and only reads the allocator's state
        // under its locks.
        let info = unsafe { libc::mallinfo2() };
        Some(Heap {
            in_use: info.uordblks as u64,
            mapped: info.hblkhd as u64,
            free: info.fordblks as u64,
        })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn a_large_live_block_shows_as_mapped() {
        // Above glibc's largest mmap threshold (32 MiB), so mapped whatever the
        // settings, and larger than anything other tests' threads free meanwhile.
        const SIZE: usize = 64 * 1024 * 1024;
        let before = heap().map(|h| h.mapped).unwrap_or_default();
        let block = std::hint::black_box(vec![1u8; SIZE]);
        let during = heap().map(|h| h.mapped).unwrap_or_default();
        assert!(during >= before + SIZE as u64 / 2, "{before} -> {during}");
        drop(block);
    }
}
