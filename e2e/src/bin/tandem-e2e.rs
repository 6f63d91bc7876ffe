//! `tandem-e2e`: one binary that runs any process of an end-to-end test:
//! `coordinator`, `sidecar` (the same flags as the real binaries) or
//! `test-app`; and `campaign`, the fault campaign that runs them all.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tandem_coordinator::{CoordinatorArgs, shutdown_signal};
use tandem_sidecar::SidecarArgs;

/// The allocator of the process (cargo feature `mimalloc`, on by default):
/// glibc's took 15 % of a transaction's CPU in a profile (BENCHMARKS.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// The fault campaign: seeded workload and faults, history checked.
    Campaign {
        /// Seed of the first cycle (cycle i uses seed + i); default: the
        /// clock.
        #[arg(long)]
        seed: Option<u64>,
        /// Cycles to run.
        #[arg(long, default_value_t = 5)]
        cycles: u32,
        /// Transactional messages per cycle.
        #[arg(long, default_value_t = 60)]
        messages: usize,
        /// Milliseconds of faults per cycle.
        #[arg(long, default_value_t = 8000)]
        chaos_ms: u64,
        /// Milliseconds the cluster may take to settle after the faults.
        #[arg(long, default_value_t = 90_000)]
        settle_ms: u64,
        /// Folder for the cycles' data (failing cycles are kept there).
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
        /// Keep every cycle's folder, not only failing ones.
        #[arg(long)]
        keep: bool,
        /// Three coordinator replicas on a PostgreSQL server of the
        /// campaign's own (its binaries from Debian's packages), instead of
        /// one coordinator on the embedded store.
        #[arg(long)]
        replicated: bool,
        /// Only these fault kinds, comma-separated: kill, stop, cut,
        /// blackhole, delay, leave, long-stop, fsync, storm, cutoff,
        /// kill-holder, stop-holder, pg-restart [default: all of the mode].
        #[arg(long, value_delimiter = ',')]
        faults: Vec<String>,
    },
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
            let mut telemetry = tandem_coordinator::init_telemetry(
                &config.log_filter,
                config.log_format,
                config.otlp_endpoint.as_deref(),
                "tandem-coordinator",
            )?;
            let served = tandem_coordinator::run(config, shutdown_signal()).await;
            telemetry.shutdown(); // the spans still buffered go out
            Ok(served?)
        }
        Cmd::Sidecar(_) => unreachable!("main runs a sidecar before the runtime starts"),
        Cmd::Campaign {
            seed,
            cycles,
            messages,
            chaos_ms,
            settle_ms,
            dir,
            keep,
            replicated,
            faults,
        } => {
            tandem_coordinator::init_tracing("warn", Default::default())?;
            let seed = seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_secs())
            });
            let opts = tandem_e2e::campaign::Options {
                seed,
                cycles,
                messages,
                chaos: std::time::Duration::from_millis(chaos_ms),
                settle: std::time::Duration::from_millis(settle_ms),
                bin: std::env::current_exe()?,
                root: dir.unwrap_or_else(|| std::env::temp_dir().join("tandem-campaign")),
                keep,
                replicated,
                only: faults,
            };
            // Stopped by SIGINT or SIGTERM: the running cycle is dropped,
            // and its processes are killed as the runtime shuts down.
            let reports = tokio::select! {
                r = tandem_e2e::campaign::run(&opts) => r?,
                () = shutdown_signal() => anyhow::bail!("stopped by a signal; the cycle in progress was abandoned"),
            };
            let failed = reports.iter().filter(|r| !r.violations.is_empty()).count();
            if failed > 0 {
                anyhow::bail!("{failed} of {} cycles broke the promise", reports.len());
            }
            Ok(())
        }
        Cmd::TestApp { listen, db } => {
            tandem_coordinator::init_tracing("info", Default::default())?;
            tandem_e2e::testapp::run(listen, &db, shutdown_signal()).await
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = tandem_coordinator::failpoint::init() {
        eprintln!("tandem-e2e: {e}");
        return ExitCode::from(2);
    }
    // a sidecar runs on a runtime of its settings' own
    if let Cmd::Sidecar(args) = &cli.command {
        return tandem_sidecar::run_process("tandem-e2e", args);
    }
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
