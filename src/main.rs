//! The `omoi` binary: parses the command line and hands over to `omoi::cli`.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = omoi::cli::Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("omoi: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(omoi::cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("omoi: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
