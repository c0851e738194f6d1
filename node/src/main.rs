//! The `servant` binary: everything lives in the library (see `servant::cli`).

fn main() -> std::process::ExitCode {
    servant::cli::main()
}
