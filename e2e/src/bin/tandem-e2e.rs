//! `tandem-e2e`: one binary that runs any process of an end-to-end test:
//! `coordinator`, `sidecar` (the same flags as the real binaries) or
//! `test-app`.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tandem_coordinator::{CoordinatorArgs, shutdown_signal};
use tandem_sidecar::SidecarArgs;

/// Runs one process of an end-to-end test.
#[derive(Parser)]
#[command(name = "tandem-e2e")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// A coordinator.
    Coordinator(CoordinatorArgs),
    /// A sidecar.
    Sidecar(SidecarArgs),
    /// The test application.
    TestApp {
        /// Address to serve the app callbacks on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Its SQLite database file.
        #[arg(long)]
        db: String,
    },
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Coordinator(args) => {
            let config = tandem_coordinator::Config::load(&args, std::env::vars())?;
            tandem_coordinator::init_tracing(&config.log_filter);
            Ok(tandem_coordinator::run(config, shutdown_signal()).await?)
        }
        Cmd::Sidecar(args) => {
            let config = tandem_sidecar::Config::load(&args, std::env::vars())?;
            tandem_coordinator::init_tracing(&config.log_filter);
            Ok(tandem_sidecar::run(config, shutdown_signal()).await?)
        }
        Cmd::TestApp { listen, db } => {
            tandem_coordinator::init_tracing("info");
            tandem_e2e::testapp::run(listen, &db, shutdown_signal()).await
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tandem-e2e: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandem-e2e: {e:#}");
            ExitCode::FAILURE
        }
    }
}
