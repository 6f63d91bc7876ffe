//! `tandem`: the command line of Tandem.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tandem_cli::{ConsumeArgs, PublishArgs, TopicCommand};
use tandem_coordinator::{Config, CoordinatorArgs};
use tandem_sidecar::SidecarArgs;

/// Tandem: transactional messages for services that each own their database.
#[derive(Parser)]
#[command(name = "tandem", version, about)]
struct Cli {
    /// Coordinator to talk to.
    #[arg(
        long,
        global = true,
        env = "TANDEM_COORDINATOR",
        default_value = "http://127.0.0.1:7400"
    )]
    coordinator: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Topic administration.
    #[command(subcommand)]
    Topic(TopicCommand),
    /// Publishes one message per line of standard input.
    Publish(PublishArgs),
    /// Consumes messages as a member of a consumer group.
    Consume(ConsumeArgs),
    /// Runs the coordinator.
    Coordinator(CoordinatorArgs),
    /// Runs a sidecar next to a service.
    Sidecar(SidecarArgs),
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let url = cli.coordinator;
    match cli.command {
        Command::Topic(cmd) => tandem_cli::topic(&url, cmd, &mut std::io::stdout()).await,
        Command::Publish(args) => {
            let stdin = tokio::io::BufReader::with_capacity(1 << 20, tokio::io::stdin());
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            tandem_cli::publish(&url, args, stdin, &mut out)
                .await
                .map(drop)
        }
        Command::Consume(args) => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            tandem_cli::consume(&url, args, &mut out, tandem_coordinator::shutdown_signal())
                .await
                .map(drop)
        }
        Command::Coordinator(args) => {
            let config = Config::load(&args, std::env::vars())?;
            tandem_coordinator::init_tracing(&config.log_filter);
            Ok(tandem_coordinator::run(config, tandem_coordinator::shutdown_signal()).await?)
        }
        Command::Sidecar(args) => {
            let config = tandem_sidecar::Config::load(&args, std::env::vars())?;
            tandem_coordinator::init_tracing(&config.log_filter);
            Ok(tandem_sidecar::run(config, tandem_coordinator::shutdown_signal()).await?)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tandem: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandem: {e:#}");
            ExitCode::FAILURE
        }
    }
}
