//! `tandem-sidecar`: parses flags and the configuration, then runs the
//! sidecar until SIGTERM or SIGINT.

use std::process::ExitCode;

use clap::Parser;
use tandem_sidecar::{Config, SidecarArgs};

/// The Tandem sidecar.
#[derive(Parser)]
#[command(name = "tandem-sidecar", version, about)]
struct Cli {
    #[command(flatten)]
    args: SidecarArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = tandem_coordinator::failpoint::init() {
        eprintln!("tandem-sidecar: {e}");
        return ExitCode::from(2);
    }
    let config = match Config::load(&cli.args, std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tandem-sidecar: {e}");
            return ExitCode::from(2);
        }
    };
    tandem_coordinator::init_tracing(&config.log_filter);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tandem-sidecar: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(tandem_sidecar::run(
        config,
        tandem_coordinator::shutdown_signal(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandem-sidecar: {e}");
            ExitCode::FAILURE
        }
    }
}
