//! `tandem`: the command line of Tandem.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use std::net::SocketAddr;

use tandem_cli::{
    AuditArgs, BenchArgs, CertCommand, ConsumeArgs, DemoArgs, DlqCommand, GroupCommand, HealthArgs,
    PublishArgs, ReadArgs, SagaCommand, TopicCommand, TxnCommand,
};
use tandem_coordinator::{Config, CoordinatorArgs};
use tandem_sidecar::SidecarArgs;

/// The allocator of the process (cargo feature `mimalloc`, on by default):
/// glibc's took 15 % of a transaction's CPU in a profile (BENCHMARKS.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tandem: transactional messages for services that each own their database.
#[derive(Parser)]
#[command(name = "tandem", version, about)]
struct Cli {
    /// Coordinator to talk to: a URL, or several replicas' URLs separated by
    /// commas (any replica that answers serves; a consume stream follows
    /// the replica that owns its topic).
    #[arg(
        long,
        global = true,
        env = "TANDEM_COORDINATOR",
        default_value = "http://127.0.0.1:7400"
    )]
    coordinator: String,
    /// Certificate (PEM chain) to present to the coordinator: mutual TLS,
    /// with --tls-key and --tls-ca, and https:// URLs.
    #[arg(long, global = true, env = "TANDEM_CLI_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<String>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, global = true, env = "TANDEM_CLI_TLS_KEY", value_name = "FILE")]
    tls_key: Option<String>,
    /// CA bundle (PEM) that signs the coordinator's certificate.
    #[arg(long, global = true, env = "TANDEM_CLI_TLS_CA", value_name = "FILE")]
    tls_ca: Option<String>,
    /// Accept a coordinator certificate that names this identity, whatever
    /// address was dialled.
    #[arg(
        long,
        global = true,
        env = "TANDEM_CLI_COORDINATOR_IDENTITY",
        value_name = "ID"
    )]
    coordinator_identity: Option<String>,
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
    /// Saga inspection: list, show.
    #[command(subcommand)]
    Saga(SagaCommand),
    /// Asks a coordinator's or sidecar's gRPC health service (for probes):
    /// exits 0 when SERVING, 1 otherwise.
    Health(HealthArgs),
    /// Certificates for mutual TLS: a CA, and one per service.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Consumer groups: list with lag, reset offsets, replay from a time.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Reads a partition from an offset or a time, or one message by id,
    /// without a consumer group (nothing is committed).
    Read(ReadArgs),
    /// Transactional messages: list open and recent ones, show one.
    #[command(subcommand)]
    Txn(TxnCommand),
    /// Dead letters: show them, redrive them to their topic.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Checks that a producer's database, the coordinator and the consumers'
    /// databases agree on every transaction; exits 1 when they do not.
    Audit(AuditArgs),
    /// Runs the coordinator.
    Coordinator(CoordinatorArgs),
    /// Runs a sidecar next to a service.
    Sidecar(SidecarArgs),
    /// Runs the order/cart demo: real processes, injected faults, a verdict.
    Demo(DemoArgs),
    /// Measures transactional messages through Tandem beside a hand-written
    /// PostgreSQL outbox, on the same PostgreSQL in the same run (in builds
    /// with the cargo feature `bench`).
    Bench(BenchArgs),
    /// Runs the example order service (used by the demo).
    #[command(hide = true)]
    ExampleOrderService {
        #[arg(long, default_value = "127.0.0.1:7420")]
        listen: SocketAddr,
        #[arg(long, default_value = "./orders.db")]
        db: String,
        #[arg(long, default_value = "http://127.0.0.1:7410")]
        sidecar: String,
    },
    /// Runs the example payments service (used by the demo).
    #[command(hide = true)]
    ExamplePaymentsService {
        #[arg(long, default_value = "127.0.0.1:7422")]
        listen: SocketAddr,
        #[arg(long, default_value = "./payments.db")]
        db: String,
    },
    /// Runs the example cart service (used by the demo).
    #[command(hide = true)]
    ExampleCartService {
        #[arg(long, default_value = "127.0.0.1:7421")]
        listen: SocketAddr,
        #[arg(long, default_value = "./cart.db")]
        db: String,
        /// Its sidecar, to subscribe through.
        #[arg(long)]
        sidecar: Option<String>,
        /// Consume without the dedup table.
        #[arg(long)]
        no_dedup: bool,
        /// Abort right after committing this many messages, before
        /// answering the last (the demo's crash).
        #[arg(long, value_name = "N")]
        crash_after_commit: Option<u64>,
    },
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let url = cli.coordinator;
    if let Some(files) = tandem_runtime::tls::TlsFiles::from_settings(
        cli.tls_cert.as_deref(),
        cli.tls_key.as_deref(),
        cli.tls_ca.as_deref(),
        ["--tls-cert", "--tls-key", "--tls-ca"],
    )? {
        tandem_cli::use_tls(tandem_runtime::tls::ClientTls::new(
            files,
            cli.coordinator_identity.clone(),
        )?)?;
    }
    match cli.command {
        Command::Topic(cmd) => tandem_cli::topic(&url, cmd, &mut std::io::stdout()).await,
        Command::Saga(cmd) => tandem_cli::saga(&url, cmd, &mut std::io::stdout()).await,
        Command::Cert(cmd) => tandem_cli::cert(cmd, &mut std::io::stdout()),
        Command::Health(args) => {
            let target = args.target.clone().unwrap_or_else(|| url.clone());
            if tandem_cli::health(&target, &args, &mut std::io::stdout()).await? {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        Command::Group(cmd) => tandem_cli::group(&url, cmd, &mut std::io::stdout()).await,
        Command::Read(args) => tandem_cli::read(&url, args, &mut std::io::stdout()).await,
        Command::Txn(cmd) => tandem_cli::txn(&url, cmd, &mut std::io::stdout()).await,
        Command::Dlq(cmd) => tandem_cli::dlq(&url, cmd, &mut std::io::stdout()).await,
        Command::Audit(args) => {
            if tandem_cli::audit(&url, args, &mut std::io::stdout()).await? {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
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
            let mut telemetry = tandem_coordinator::init_telemetry(
                &config.log_filter,
                config.log_format,
                config.otlp_endpoint.as_deref(),
                "tandem-coordinator",
            )?;
            let served =
                tandem_coordinator::run(config, tandem_coordinator::shutdown_signal()).await;
            telemetry.shutdown(); // the spans still buffered go out
            Ok(served?)
        }
        Command::Bench(args) => tandem_cli::bench(args, &mut std::io::stdout()).await,
        Command::Demo(args) => {
            let exe = std::env::current_exe()?;
            let mut out = std::io::stdout();
            if tandem_cli::demo(&exe, args, &mut out).await? {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        Command::ExampleOrderService {
            listen,
            db,
            sidecar,
        } => {
            tandem_coordinator::init_tracing("warn", Default::default())?;
            tandem_examples::order::run(
                listen,
                &db,
                &sidecar,
                tandem_coordinator::shutdown_signal(),
            )
            .await
        }
        Command::ExamplePaymentsService { listen, db } => {
            tandem_coordinator::init_tracing("warn", Default::default())?;
            tandem_examples::payments::run(listen, &db, tandem_coordinator::shutdown_signal()).await
        }
        Command::ExampleCartService {
            listen,
            db,
            sidecar,
            no_dedup,
            crash_after_commit,
        } => {
            tandem_coordinator::init_tracing("warn", Default::default())?;
            tandem_examples::cart::run(
                listen,
                &db,
                sidecar,
                !no_dedup,
                crash_after_commit,
                tandem_coordinator::shutdown_signal(),
            )
            .await
        }
        Command::Sidecar(_) => unreachable!("main runs a sidecar before the runtime starts"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = tandem_coordinator::failpoint::init() {
        eprintln!("tandem: {e}");
        return ExitCode::from(2);
    }
    // a sidecar runs on a runtime of its settings' own
    if let Command::Sidecar(args) = &cli.command {
        return tandem_sidecar::run_process("tandem", args);
    }
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
