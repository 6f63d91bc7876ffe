//! `tandem-coordinator`: parses flags and the configuration, then runs the
//! coordinator until SIGTERM or SIGINT.

use std::process::ExitCode;

use clap::Parser;
use tandem_coordinator::{Config, CoordinatorArgs, init_telemetry, run, shutdown_signal};

/// The allocator of the process (cargo feature `mimalloc`, on by default):
/// glibc's took 15 % of a transaction's CPU in a profile (BENCHMARKS.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The Tandem coordinator.
#[derive(Parser)]
#[command(name = "tandem-coordinator", version, about)]
struct Cli {
    #[command(flatten)]
    args: CoordinatorArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = tandem_coordinator::failpoint::init() {
        eprintln!("tandem-coordinator: {e}");
        return ExitCode::from(2);
    }
    let config = match Config::load(&cli.args, std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tandem-coordinator: {e}");
            return ExitCode::from(2);
        }
    };
    let mut telemetry = match init_telemetry(
        &config.log_filter,
        config.log_format,
        config.otlp_endpoint.as_deref(),
        "tandem-coordinator",
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("tandem-coordinator: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tandem-coordinator: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = rt.block_on(run(config, shutdown_signal()));
    telemetry.shutdown(); // the spans still buffered go out
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandem-coordinator: {e}");
            ExitCode::FAILURE
        }
    }
}
