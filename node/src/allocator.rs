//! The C allocator, set up for a process that runs for months under churn.
//!
//! Rust's global allocator here is glibc's malloc. Its defaults suit short programs:
//! a dynamic mmap threshold, eight arenas per core, and free pages kept inside the
//! heap until something at its top is freed. A node that opens and closes thousands
//! of connections frees buffers all over its heaps, and without help its resident
//! memory only ratchets up.

use std::time::Duration;

/// How often free pages are handed back to the kernel.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(30);

/// Fixes the allocator's parameters; call before any other thread starts.
///
/// glibc raises its mmap threshold each time a large block is freed, so after the
/// first 1 MiB chunk buffer later ones come from the heap and stay there: a node
/// moving files grew in 2.8 MB steps under the soak without holding more data. A
/// fixed threshold returns large buffers to the system when they are freed, and two
/// arenas (instead of eight per core) keep the runtime's threads from each holding
/// a heap of their own.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before any thread
    // starts, and a refused value (return 0) leaves glibc's default in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Starts a thread that returns the heaps' free pages to the kernel every
/// [`TRIM_INTERVAL`].
///
/// Connection buffers are smaller than the mmap threshold, so they live in the
/// heaps, and a departed peer's buffers leave holes that malloc keeps resident;
/// `malloc_trim` releases every whole free page, not only the top of the heap. A
/// thread of its own rather than a runtime task: it blocks on the arenas' locks for
/// a moment, and it should not count as one of the node's tasks.
pub fn spawn_trimmer() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let spawned = std::thread::Builder::new()
            .name("servant-trim".into())
            .spawn(|| loop {
                std::thread::sleep(TRIM_INTERVAL);
                // SAFETY: malloc_trim only walks glibc's own arenas under their
                // locks; 0 keeps no extra padding at the top of the heap.
                unsafe {
                    libc::malloc_trim(0);
                }
            });
        if let Err(e) = spawned {
            // Not fatal: the node runs as before, only holding freed pages longer.
            eprintln!("servant: cannot start the allocator trim thread: {e}");
        }
    }
}
