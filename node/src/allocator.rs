//! The C allocator, set up for a process that runs for months under churn.
//!
//! Rust's global allocator here is glibc's malloc. Its defaults suit short programs:
//! a dynamic mmap threshold and eight arenas per core. A node that opens and closes
//! thousands of connections and moves files in 1 MiB chunks needs them fixed.
//!
//! A periodic `malloc_trim` was tried as well and left out: side by side in one
//! 5-minute soak at 10x churn, the measured nodes' memory slope was 1.7 MiB per 10
//! minutes with it and 1.9 without, inside the run-to-run noise.

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
