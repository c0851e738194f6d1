//! The `servant` binary: everything lives in the library (see `servant::cli`).

fn main() -> std::process::ExitCode {
    // Before anything runs, so a panic in any thread, start-up included, is counted.
    servant::metrics::install_panic_hook();
    tune_allocator();
    servant::cli::main()
}

/// glibc raises its mmap threshold each time a large block is freed, so after the
/// first 1 MiB chunk buffer later ones come from the heap and stay there: a node
/// moving files grew in 2.8 MB steps under the soak without holding more data. A
/// fixed threshold returns large buffers to the system when they are freed, and two
/// arenas (instead of eight per core) keep the runtime's threads from each holding
/// a heap of their own.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before any thread
    // starts, and a refused value (return 0) leaves glibc's default in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
