//! The `servant` binary: everything lives in the library (see `servant::cli`).

fn main() -> std::process::ExitCode {
    // Before anything runs, so a panic in any thread, start-up included, is counted.
    servant::metrics::install_panic_hook();
    servant::allocator::tune();
    servant::cli::main()
}
