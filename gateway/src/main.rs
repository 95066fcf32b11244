//! The `tagway` binary: see `tagway --help`.

fn main() -> std::process::ExitCode {
    tagway::cli::main()
}
