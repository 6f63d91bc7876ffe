//! `tandem-sidecar`: parses flags and the configuration, then runs the
//! sidecar until SIGTERM or SIGINT.

use std::process::ExitCode;

use clap::Parser;
use tandem_sidecar::SidecarArgs;

/// The allocator of the process (cargo feature `mimalloc`, on by default):
/// glibc's took 15 % of a transaction's CPU in a profile (BENCHMARKS.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The Tandem sidecar.
#[derive(Parser)]
#[command(name = "tandem-sidecar", version, about)]
struct Cli {
    #[command(flatten)]
    args: SidecarArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = tandem_storage::failpoint::init() {
        eprintln!("tandem-sidecar: {e}");
        return ExitCode::from(2);
    }
    tandem_sidecar::run_process("tandem-sidecar", &cli.args)
}
