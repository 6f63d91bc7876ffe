//! `tandem demo`: the first thing a new user runs. It starts a coordinator,
//! the order service, the cart service and the payments service, each with
//! its own SQLite database and its own sidecar, as real processes on
//! loopback; places orders from concurrent clients while it injects faults;
//! and then checks, from the databases and the coordinator, that every
//! committed order left the cart exactly once and no rolled-back order
//! touched it.
//!
//! Meanwhile other clients check out: each checkout is a saga (the order
//! row and the saga's start in one local transaction; the cart reserves
//! stock, payments charges the user, the order is confirmed). Accounts are
//! small, so busy users' payments are declined for good and their sagas
//! release the stock and cancel the order. The verdict checks from all
//! three databases that every saga ended all done or all undone, with no
//! double reservation, charge, release or refund.
//!
//! Faults: some local transactions fail (rollback), some orders are
//! committed locally but never confirmed, some abandoned right after Begin
//! (both settled by check-back); the cart service is killed once between
//! its database commit and its acknowledgement (so the message is really
//! delivered again) and restarted; the cart's sidecar is killed with SIGKILL
//! half way and restarted.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use prost::Message as _;
use sqlx::Row;
use tandem_examples::db::open_sqlite;
use tandem_examples::process::Process;
use tandem_proto::coordinator as pb;
use tandem_proto::coordinator::coordinator_client::CoordinatorClient;
use tandem_proto::examples as shop;
use tandem_proto::examples::carts_client::CartsClient;
use tandem_proto::examples::orders_client::OrdersClient;
use tandem_proto::sidecar as sc;
use tandem_proto::sidecar::sidecar_client::SidecarClient;
use tokio::sync::Mutex;

/// Flags of `tandem demo`.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// Orders to place.
    #[arg(long, default_value_t = 1000)]
    pub orders: u32,
    /// Clients placing them concurrently.
    #[arg(long, default_value_t = 16)]
    pub clients: u32,
    /// Users, each with a cart.
    #[arg(long, default_value_t = 50)]
    pub users: u32,
    /// Keep the databases and logs here instead of a temporary folder.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Switch the dedup table off, so redeliveries reach the cart twice:
    /// the verdict must then fail.
    #[arg(long)]
    pub no_dedup: bool,
    /// Checkouts (sagas) to place, alongside the orders.
    #[arg(long, default_value_t = 300)]
    pub checkouts: u32,
}

const SKUS: [&str; 3] = ["apple", "pear", "plum"];
const INITIAL: i64 = 100_000;

/// Settings that make check-back quick enough to watch (a local
/// transaction still running after `check_after_ms` with no `tandem_txn`
/// row is rolled back by check-back: 3 s leaves room for the order
/// database's one writer under the checkouts' load on a busy machine).
const COORDINATOR: &[&str] = &[
    "check_after_ms=3000",
    "check_timeout_ms=1000",
    "max_checks=5",
    "max_check_interval_ms=3000",
    "session_timeout_ms=3000",
    "revoke_timeout_ms=3000",
    "log=warn",
];

fn set(settings: &[&str]) -> Vec<String> {
    settings
        .iter()
        .flat_map(|s| ["--set".to_owned(), (*s).to_owned()])
        .collect()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// The order a client places as number `i`: deterministic, so runs compare.
fn order(i: u32, users: u32) -> shop::PlaceOrderRequest {
    let mut x = u64::from(i)
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    let mut next = |n: u64| {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (x >> 33) % n
    };
    let user = format!("user-{}", next(u64::from(users)));
    let items = (0..1 + next(3))
        .map(|k| shop::Item {
            sku: SKUS[k as usize].to_owned(),
            quantity: 1 + next(3) as u32,
        })
        .collect();
    let fault = match i % 50 {
        3 | 13 | 23 => shop::Fault::LocalFailure,
        7 => shop::Fault::SkipCommit,
        31 => shop::Fault::Abandon,
        _ => shop::Fault::None,
    };
    shop::PlaceOrderRequest {
        user,
        items,
        fault: fault as i32,
    }
}

struct Cluster {
    exe: PathBuf,
    dir: PathBuf,
    coordinator: Process,
    order_sidecar: Process,
    order_service: Process,
    cart_sidecar: Process,
    cart_service: Process,
    payments_sidecar: Process,
    payments_service: Process,
    no_dedup: bool,
}

/// Starts a service and its sidecar, which need each other's addresses:
/// a free port is picked for the service first (and picked again if
/// something else took it meanwhile).
fn with_sidecar(
    exe: &Path,
    dir: &Path,
    service: &str,
    db: &str,
    coordinator: &str,
    start: impl Fn(u16, &str) -> anyhow::Result<Process>,
) -> anyhow::Result<(Process, Process)> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut sidecar = Cluster::sidecar(exe, dir, service, coordinator, Some(port), db, 0)?;
        match start(port, &sidecar.url()) {
            Ok(p) => return Ok((sidecar, p)),
            Err(e) if attempt < 5 => {
                tracing::debug!(error = %e, "{service} port taken; picking another");
                sidecar.kill();
            }
            Err(e) => return Err(e),
        }
    }
}

impl Cluster {
    fn start(
        exe: &Path,
        dir: &Path,
        no_dedup: bool,
        cart_crash_at: u32,
    ) -> anyhow::Result<Cluster> {
        let p = |name: &str| dir.join(name).display().to_string();
        let mut a = args(&[
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &p("coordinator"),
        ]);
        a.extend(set(COORDINATOR));
        let coordinator = Process::start("coordinator", exe, &a, &[], dir)?;
        let url = coordinator.url();
        let (order_sidecar, order_service) =
            with_sidecar(exe, dir, "orders", "orders.db", &url, |port, sidecar| {
                let a = args(&[
                    "example-order-service",
                    "--listen",
                    &format!("127.0.0.1:{port}"),
                    "--db",
                    &p("orders.db"),
                    "--sidecar",
                    sidecar,
                ]);
                Process::start("order-service", exe, &a, &[], dir)
            })?;
        let (cart_sidecar, cart_service) =
            with_sidecar(exe, dir, "cart", "cart.db", &url, |port, sidecar| {
                Self::cart(
                    exe,
                    dir,
                    port,
                    sidecar,
                    no_dedup,
                    Some(u64::from(cart_crash_at)),
                )
            })?;
        let (payments_sidecar, payments_service) =
            with_sidecar(exe, dir, "payments", "payments.db", &url, |port, _| {
                let a = args(&[
                    "example-payments-service",
                    "--listen",
                    &format!("127.0.0.1:{port}"),
                    "--db",
                    &p("payments.db"),
                ]);
                Process::start("payments-service", exe, &a, &[], dir)
            })?;
        Ok(Cluster {
            exe: exe.to_owned(),
            dir: dir.to_owned(),
            coordinator,
            order_sidecar,
            order_service,
            cart_sidecar,
            cart_service,
            payments_sidecar,
            payments_service,
            no_dedup,
        })
    }

    fn sidecar(
        exe: &Path,
        dir: &Path,
        service: &str,
        coordinator: &str,
        app_port: Option<u16>,
        db: &str,
        port: u16,
    ) -> anyhow::Result<Process> {
        let mut a = vec![
            "sidecar".to_owned(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--coordinator".into(),
            coordinator.to_owned(),
            "--service".into(),
            service.to_owned(),
            "--db".into(),
            dir.join(db).display().to_string(),
        ];
        if let Some(port) = app_port {
            a.extend(["--app".to_owned(), format!("http://127.0.0.1:{port}")]);
        }
        a.extend(set(&["log=warn"]));
        Process::start(&format!("{service}-sidecar"), exe, &a, &[], dir)
    }

    fn cart(
        exe: &Path,
        dir: &Path,
        port: u16,
        sidecar: &str,
        no_dedup: bool,
        crash_after_commit: Option<u64>,
    ) -> anyhow::Result<Process> {
        let mut a = args(&[
            "example-cart-service",
            "--db",
            &dir.join("cart.db").display().to_string(),
            "--sidecar",
            sidecar,
        ]);
        a.extend(["--listen".to_owned(), format!("127.0.0.1:{port}")]);
        if no_dedup {
            a.push("--no-dedup".into());
        }
        if let Some(n) = crash_after_commit {
            a.extend(["--crash-after-commit".to_owned(), n.to_string()]);
        }
        Process::start("cart-service", exe, &a, &[], dir)
    }

    fn restart_cart(&mut self) -> anyhow::Result<()> {
        let port = self.cart_service.addr.port();
        self.cart_service.kill();
        self.cart_service = Self::cart(
            &self.exe,
            &self.dir,
            port,
            &self.cart_sidecar.url(),
            self.no_dedup,
            None,
        )?;
        Ok(())
    }

    fn restart_cart_sidecar(&mut self) -> anyhow::Result<()> {
        let port = self.cart_sidecar.addr.port();
        self.cart_sidecar.kill(); // SIGKILL
        let app = Some(self.cart_service.addr.port());
        self.cart_sidecar = Self::sidecar(
            &self.exe,
            &self.dir,
            "cart",
            &self.coordinator.url(),
            app,
            "cart.db",
            port,
        )?;
        Ok(())
    }

    fn stop(&mut self) {
        for p in [
            &mut self.order_service,
            &mut self.cart_service,
            &mut self.payments_service,
            &mut self.order_sidecar,
            &mut self.cart_sidecar,
            &mut self.payments_sidecar,
            &mut self.coordinator,
        ] {
            if p.terminate(Duration::from_secs(10)).is_err() {
                p.kill();
            }
        }
    }
}

/// What happened to the placed orders.
#[derive(Default)]
struct Placed {
    /// Order id → what PlaceOrder said.
    answers: HashMap<String, String>,
    failed: u32,
}

/// Counters of the cart's sidecar, summed over its incarnations.
#[derive(Default)]
struct SidecarTotals {
    finished: sc::Stats,
    current: sc::Stats,
}

impl SidecarTotals {
    fn retire(&mut self) {
        let c = std::mem::take(&mut self.current);
        self.finished.delivered += c.delivered;
        self.finished.duplicates_skipped += c.duplicates_skipped;
    }

    fn delivered(&self) -> u64 {
        self.finished.delivered + self.current.delivered
    }

    fn duplicates(&self) -> u64 {
        self.finished.duplicates_skipped + self.current.duplicates_skipped
    }
}

async fn sidecar_stats(url: &str) -> Option<sc::Stats> {
    let mut c = SidecarClient::connect(url.to_owned()).await.ok()?;
    Some(c.get_stats(sc::GetStatsRequest {}).await.ok()?.into_inner())
}

fn progress(done: u32, total: u32, tty: bool, last_quarter: &mut u32) {
    if tty {
        let width = 30;
        let filled = (done as usize * width) / total.max(1) as usize;
        eprint!(
            "\r  placing orders [{}{}] {done}/{total}",
            "#".repeat(filled),
            ".".repeat(width - filled)
        );
        let _ = std::io::stderr().flush();
    } else if done * 4 / total.max(1) > *last_quarter {
        *last_quarter = done * 4 / total.max(1);
        eprintln!("  placed {done}/{total} orders");
    }
}

/// Runs the demo with the `tandem` executable at `exe`; returns whether the
/// consistency verdict passed.
pub async fn demo(exe: &Path, a: DemoArgs, out: &mut impl Write) -> anyhow::Result<bool> {
    if a.orders == 0 || a.clients == 0 || a.users == 0 {
        bail!("--orders, --clients and --users must be at least 1");
    }
    let temp = match &a.data_dir {
        Some(_) => None,
        None => Some(tempfile::tempdir().context("creating a temporary folder")?),
    };
    let dir = match (&a.data_dir, &temp) {
        (Some(d), _) => {
            std::fs::create_dir_all(d)?;
            if std::fs::read_dir(d)?.next().is_some() {
                bail!(
                    "--data-dir {} is not empty: the demo starts from nothing, give it an empty folder",
                    d.display()
                );
            }
            d.clone()
        }
        (None, Some(t)) => t.path().to_owned(),
        (None, None) => unreachable!("a temporary folder exists when no --data-dir is given"),
    };
    let started = Instant::now();
    writeln!(
        out,
        "Tandem demo: {} orders from {} clients, data and logs in {}",
        a.orders,
        a.clients,
        dir.display()
    )?;
    let cart_crash_at = (a.orders / 4).max(1);
    let cluster = Cluster::start(exe, &dir, a.no_dedup, cart_crash_at)?;
    let mut coordinator = CoordinatorClient::connect(cluster.coordinator.url()).await?;
    coordinator
        .create_topic(pb::CreateTopicRequest {
            name: tandem_examples::order::TOPIC.into(),
            partitions: 4,
        })
        .await?;
    let mut carts = CartsClient::connect(cluster.cart_service.url()).await?;
    for u in 0..a.users {
        carts
            .add_to_cart(shop::AddToCartRequest {
                user: format!("user-{u}"),
                items: SKUS
                    .iter()
                    .map(|s| shop::Item {
                        sku: (*s).into(),
                        quantity: INITIAL as u32,
                    })
                    .collect(),
            })
            .await?;
    }
    writeln!(
        out,
        "  started: coordinator, order, cart and payments services, each with its sidecar; {} carts filled",
        a.users
    )?;

    // Place the orders.
    let orders_client = OrdersClient::connect(cluster.order_service.url()).await?;
    let next = Arc::new(AtomicU32::new(0));
    let done = Arc::new(AtomicU32::new(0));
    let placed = Arc::new(Mutex::new(Placed::default()));
    let mut clients = Vec::new();
    for _ in 0..a.clients {
        let (mut c, next, done, placed) = (
            orders_client.clone(),
            next.clone(),
            done.clone(),
            placed.clone(),
        );
        let (orders, users) = (a.orders, a.users);
        clients.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= orders {
                    return;
                }
                let r = c.place_order(order(i, users)).await;
                let mut p = placed.lock().await;
                match r {
                    Ok(r) => {
                        let r = r.into_inner();
                        p.answers.insert(r.order_id, r.status);
                    }
                    Err(_) => p.failed += 1,
                }
                drop(p);
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    // Checkouts, from clients of their own: every twentieth fails in its
    // local transaction, so its saga never starts.
    let checkouts = Arc::new(Mutex::new(Placed::default()));
    let next_checkout = Arc::new(AtomicU32::new(0));
    for _ in 0..a.checkouts.min(4) {
        let (mut c, next, placed) = (
            orders_client.clone(),
            next_checkout.clone(),
            checkouts.clone(),
        );
        let (total, users) = (a.checkouts, a.users);
        clients.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return;
                }
                let mut req = order(1_000_000 + i, users);
                req.fault = if i % 20 == 9 {
                    shop::Fault::LocalFailure
                } else {
                    shop::Fault::None
                } as i32;
                let r = c.checkout(req).await;
                let mut p = placed.lock().await;
                match r {
                    Ok(r) => {
                        let r = r.into_inner();
                        p.answers.insert(r.order_id, r.status);
                    }
                    Err(_) => p.failed += 1,
                }
            }
        }));
    }

    // Meanwhile: watch progress, restart the cart when its --crash-after-commit kills
    // it, kill its sidecar half way.
    let mut cluster = cluster;
    let tty = std::io::stderr().is_terminal();
    let mut cart_restarts = 0u32;
    let mut totals = SidecarTotals::default();
    let mut sidecar_killed = false;
    let mut quarter = 0;
    while clients.iter().any(|c| !c.is_finished()) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let d = done.load(Ordering::Relaxed);
        progress(d, a.orders, tty, &mut quarter);
        if let Some(s) = sidecar_stats(&cluster.cart_sidecar.url()).await {
            totals.current = s;
        }
        if cluster.cart_service.has_exited() {
            tokio::task::block_in_place(|| cluster.restart_cart())?;
            cart_restarts += 1;
        }
        if !sidecar_killed && d >= a.orders / 2 {
            if let Some(s) = sidecar_stats(&cluster.cart_sidecar.url()).await {
                totals.current = s;
            }
            totals.retire();
            tokio::task::block_in_place(|| cluster.restart_cart_sidecar())?;
            sidecar_killed = true;
        }
    }
    for c in clients {
        c.await?;
    }
    progress(a.orders, a.orders, tty, &mut quarter);
    if tty {
        eprintln!();
    }

    // Let check-back settle what is open and the cart catch up.
    let deadline = Instant::now() + Duration::from_secs(45);
    let mut settled = false;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if cluster.cart_service.has_exited() {
            tokio::task::block_in_place(|| cluster.restart_cart())?;
            cart_restarts += 1;
        }
        if let Some(s) = sidecar_stats(&cluster.cart_sidecar.url()).await {
            totals.current = s;
        }
        let stats = coordinator
            .get_stats(pb::GetStatsRequest {})
            .await?
            .into_inner();
        let d = coordinator
            .describe_topic(pb::DescribeTopicRequest {
                name: tandem_examples::order::TOPIC.into(),
            })
            .await?
            .into_inner();
        let lag = d
            .groups
            .iter()
            .find(|g| g.group == tandem_examples::cart::GROUP)
            .map_or(u64::MAX, |g| g.total_lag);
        let mut sagas_out = 0;
        for status in [pb::SagaStatus::Running, pb::SagaStatus::Compensating] {
            sagas_out += coordinator
                .list_sagas(pb::ListSagasRequest {
                    status: status as i32,
                    limit: 1,
                })
                .await?
                .into_inner()
                .sagas
                .len();
        }
        if stats.open == 0 && lag == 0 && sagas_out == 0 {
            settled = true;
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let placed = std::mem::take(&mut *placed.lock().await);
    let checkouts = std::mem::take(&mut *checkouts.lock().await);
    let mut verdict = verdict(&dir, &mut coordinator, &placed).await?;
    let sagas = saga_verdict(&dir, &mut coordinator, &checkouts).await?;
    verdict.problems.extend(sagas.problems.iter().cloned());
    // The generic check any deployment can run: `tandem audit`.
    let db = |name: &str| dir.join(name).display().to_string();
    let audit = crate::audit::audit_report(
        &cluster.coordinator.url(),
        &crate::audit::AuditArgs {
            service: "orders".into(),
            producer_db: db("orders.db"),
            consumers: if a.no_dedup {
                Vec::new() // no dedup rows to check against
            } else {
                vec![(tandem_examples::cart::GROUP.to_owned(), db("cart.db"))]
            },
            stuck_after_ms: 60_000,
            window_ms: 240_000,
            json: false,
        },
    )
    .await?;
    verdict.problems.extend(
        audit
            .problems
            .iter()
            .map(|p| format!("audit: {} {}: {}", p.kind, p.txn_id, p.detail)),
    );
    tokio::task::block_in_place(|| cluster.stop());

    let mut by_state: BTreeMap<&str, u32> = BTreeMap::new();
    for s in verdict.states.values() {
        *by_state.entry(s.as_str()).or_default() += 1;
    }
    writeln!(out)?;
    writeln!(out, "Report ({:.1} s)", started.elapsed().as_secs_f64())?;
    writeln!(out, "  orders placed               {}", a.orders)?;
    if placed.failed > 0 {
        writeln!(out, "    of which PlaceOrder failed {}", placed.failed)?;
    }
    writeln!(
        out,
        "  committed                   {}",
        by_state.get("committed").copied().unwrap_or(0)
    )?;
    writeln!(
        out,
        "  rolled back                 {}",
        by_state.get("rolled back").copied().unwrap_or(0)
    )?;
    writeln!(out, "  resolved by check-back      {}", verdict.by_check)?;
    writeln!(
        out,
        "  tandem audit                {} ({} transactions, {} tandem_txn rows with rollback markers, {} inconsistencies)",
        if audit.problems.is_empty() {
            "consistent"
        } else {
            "INCONSISTENT"
        },
        audit.by_state.values().sum::<u64>(),
        audit.local_rows.0 + audit.local_rows.1,
        audit.problems.len()
    )?;
    writeln!(
        out,
        "  deliveries to the cart      {} (redeliveries included)",
        totals.delivered()
    )?;
    writeln!(
        out,
        "  checkouts (sagas)           {}: {} confirmed, {} cancelled ({} payments declined), {} never started (local transaction failed){}",
        a.checkouts,
        sagas.succeeded,
        sagas.compensated,
        sagas.declined,
        sagas.not_started,
        if checkouts.failed > 0 {
            format!(", {} Checkout calls failed", checkouts.failed)
        } else {
            String::new()
        }
    )?;
    writeln!(
        out,
        "  duplicates filtered         {} (by the sidecar {}, by the cart's own transaction {})",
        totals.duplicates() + verdict.cart_duplicates,
        totals.duplicates(),
        verdict.cart_duplicates
    )?;
    // Only what really happened: the order service's own answers, and the
    // kills this run made.
    let answered = |status: &str| placed.answers.values().filter(|s| *s == status).count();
    let mut faults = Vec::new();
    if cart_restarts > 0 {
        faults.push(format!("cart service killed after commit {cart_restarts}x"));
    }
    if sidecar_killed {
        faults.push("cart sidecar SIGKILLed 1x".to_owned());
    }
    let (failed_locally, left_open) = (answered("rolled back"), answered("pending"));
    if failed_locally > 0 {
        faults.push(format!("local transactions failed {failed_locally}x"));
    }
    if left_open > 0 {
        faults.push(format!(
            "orders left to check-back {left_open}x (unconfirmed or abandoned)"
        ));
    }
    if faults.is_empty() {
        faults.push("none".to_owned());
    }
    writeln!(out, "  faults injected             {}", faults.join(", "))?;
    if a.no_dedup {
        writeln!(out, "  dedup                       OFF (--no-dedup)")?;
    }
    if !settled {
        writeln!(
            out,
            "  warning: transactions or the cart had not settled after 45 s"
        )?;
    }
    for problem in verdict.problems.iter().take(10) {
        writeln!(out, "  problem: {problem}")?;
    }
    if verdict.problems.len() > 10 {
        writeln!(out, "  … and {} more problems", verdict.problems.len() - 10)?;
    }
    let ok = verdict.problems.is_empty() && settled;
    writeln!(
        out,
        "Verdict: {}",
        if ok {
            "PASS: every committed order left the cart exactly once; no rolled-back order touched it; every saga ended all done or all undone"
        } else {
            "FAIL: the databases disagree (see the problems above)"
        }
    )?;
    if a.data_dir.is_some() || !ok {
        writeln!(out, "  logs: {}/*.log", dir.display())?;
    }
    if !ok && let Some(t) = temp {
        let _ = t.keep(); // keep the evidence
    }
    Ok(ok)
}

/// How the checkouts' sagas ended, and what disagrees.
struct SagaVerdict {
    succeeded: u32,
    compensated: u32,
    declined: u32,
    not_started: u32,
    problems: Vec<String>,
}

/// Rows (saga id, text, number, times undone) grouped by saga id.
async fn by_saga(
    db: &sqlx::SqlitePool,
    sql: &'static str,
) -> anyhow::Result<HashMap<String, Vec<(String, i64, i64)>>> {
    let mut out: HashMap<String, Vec<(String, i64, i64)>> = HashMap::new();
    for row in sqlx::query(sql).fetch_all(db).await? {
        out.entry(row.try_get(0)?).or_default().push((
            row.try_get(1)?,
            row.try_get(2)?,
            row.try_get(3)?,
        ));
    }
    Ok(out)
}

/// Checks the checkouts from the three databases and the coordinator:
/// every committed checkout's saga ended; a confirmed one holds its stock
/// reservation and its charge, a cancelled one released and refunded
/// what it took, nothing twice; and stock and balances add up.
async fn saga_verdict(
    dir: &Path,
    coordinator: &mut CoordinatorClient<tonic::transport::Channel>,
    placed: &Placed,
) -> anyhow::Result<SagaVerdict> {
    use tandem_examples::{cart, payments};
    let path = |db: &str| dir.join(db).display().to_string();
    let (orders, carts, pay) = (
        open_sqlite(&path("orders.db"), 1).await?,
        open_sqlite(&path("cart.db"), 1).await?,
        open_sqlite(&path("payments.db"), 1).await?,
    );
    let mut local: HashMap<String, (String, shop::Cart)> = HashMap::new();
    for row in sqlx::query("SELECT order_id, status, items FROM checkouts")
        .fetch_all(&orders)
        .await?
    {
        let items: Vec<u8> = row.try_get(2)?;
        local.insert(
            row.try_get(0)?,
            (row.try_get(1)?, shop::Cart::decode(items.as_slice())?),
        );
    }
    // saga → (sku, quantity, released) of its reservations.
    let reserved = by_saga(
        &carts,
        "SELECT saga_id, sku, quantity, released FROM reservations",
    )
    .await?;
    // saga → (user, amount, refunded) of its charges.
    let charged = by_saga(
        &pay,
        "SELECT saga_id, user_id, amount, refunded FROM charges",
    )
    .await?;
    let mut v = SagaVerdict {
        succeeded: 0,
        compensated: 0,
        declined: 0,
        not_started: 0,
        problems: Vec::new(),
    };
    let ids: std::collections::BTreeSet<&String> =
        placed.answers.keys().chain(local.keys()).collect();
    for id in ids {
        let saga = match coordinator
            .get_saga(pb::GetSagaRequest {
                saga_id: id.clone(),
            })
            .await
        {
            Ok(s) => Some(s.into_inner()),
            Err(e) if e.code() == tonic::Code::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        let reservations = reserved.get(id).map_or(&[][..], Vec::as_slice);
        let charges = charged.get(id).map_or(&[][..], Vec::as_slice);
        let (Some(saga), Some((status, order))) = (saga, local.get(id)) else {
            if local.contains_key(id) {
                v.problems.push(format!(
                    "checkout {id} committed but its saga never started"
                ));
            } else if !reservations.is_empty() || !charges.is_empty() {
                v.problems.push(format!(
                    "checkout {id} never committed but reserved or charged"
                ));
            } else {
                v.not_started += 1;
            }
            continue;
        };
        let items = order.items.len();
        match pb::SagaStatus::try_from(saga.status) {
            Ok(pb::SagaStatus::Succeeded) => {
                v.succeeded += 1;
                let held = reservations.len() == items && reservations.iter().all(|r| r.2 == 0);
                let paid = charges.len() == 1 && charges[0].2 == 0;
                if status != "confirmed" || !held || !paid {
                    v.problems.push(format!(
                        "checkout {id} succeeded but the order is {status}, reservations {reservations:?}, charges {charges:?}"
                    ));
                }
            }
            Ok(pb::SagaStatus::Compensated) => {
                v.compensated += 1;
                if saga.reason.contains("declined") {
                    v.declined += 1;
                }
                let released = reservations.iter().all(|r| r.2 == 1)
                    && (reservations.is_empty() || reservations.len() == items);
                let refunded = charges.len() <= 1 && charges.iter().all(|c| c.2 == 1);
                if status != "cancelled" || !released || !refunded {
                    v.problems.push(format!(
                        "checkout {id} was compensated but the order is {status}, reservations {reservations:?}, charges {charges:?}"
                    ));
                }
            }
            _ => v.problems.push(format!(
                "checkout {id}'s saga did not finish: {}",
                saga.reason
            )),
        }
    }
    // Stock and balances: what is held equals what was taken and kept.
    for row in sqlx::query("SELECT sku, available FROM stock")
        .fetch_all(&carts)
        .await?
    {
        let (sku, available): (String, i64) = (row.try_get(0)?, row.try_get(1)?);
        let kept: i64 = reserved
            .values()
            .flatten()
            .filter(|r| r.0 == sku && r.2 == 0)
            .map(|r| r.1)
            .sum();
        if available != cart::STOCK - kept {
            v.problems.push(format!(
                "{sku}: {available} in stock where reservations leave {}",
                cart::STOCK - kept
            ));
        }
    }
    for row in sqlx::query("SELECT user_id, balance FROM accounts")
        .fetch_all(&pay)
        .await?
    {
        let (user, balance): (String, i64) = (row.try_get(0)?, row.try_get(1)?);
        let kept: i64 = charged
            .values()
            .flatten()
            .filter(|c| c.0 == user && c.2 == 0)
            .map(|c| c.1)
            .sum();
        if balance != payments::BALANCE - kept {
            v.problems.push(format!(
                "account of {user} holds {balance} where charges leave {}",
                payments::BALANCE - kept
            ));
        }
    }
    Ok(v)
}

struct Verdict {
    /// Order id → its transaction's state ("committed", "rolled back", …).
    states: HashMap<String, String>,
    by_check: u32,
    cart_duplicates: u64,
    problems: Vec<String>,
}

/// Checks the run from both databases and the coordinator.
async fn verdict(
    dir: &Path,
    coordinator: &mut CoordinatorClient<tonic::transport::Channel>,
    placed: &Placed,
) -> anyhow::Result<Verdict> {
    let orders = open_sqlite(&dir.join("orders.db").display().to_string(), 1).await?;
    let cart = open_sqlite(&dir.join("cart.db").display().to_string(), 1).await?;
    // What the order service committed locally: order → (user, items).
    let mut local: HashMap<String, shop::Cart> = HashMap::new();
    for row in sqlx::query("SELECT order_id, items FROM orders")
        .fetch_all(&orders)
        .await?
    {
        let id: String = row.try_get(0)?;
        let items: Vec<u8> = row.try_get(1)?;
        local.insert(id, shop::Cart::decode(items.as_slice())?);
    }
    let mut applied: HashMap<String, u32> = HashMap::new();
    for row in sqlx::query("SELECT order_id FROM applied_orders")
        .fetch_all(&cart)
        .await?
    {
        *applied.entry(row.try_get(0)?).or_default() += 1;
    }
    let cart_duplicates: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM duplicate_deliveries")
        .fetch_one(&cart)
        .await?;
    let mut quantities: HashMap<(String, String), i64> = HashMap::new();
    for row in sqlx::query("SELECT user_id, sku, quantity FROM cart_items")
        .fetch_all(&cart)
        .await?
    {
        quantities.insert((row.try_get(0)?, row.try_get(1)?), row.try_get(2)?);
    }

    let mut problems = Vec::new();
    let mut states = HashMap::new();
    let mut by_check = 0;
    let ids: std::collections::BTreeSet<&String> =
        placed.answers.keys().chain(local.keys()).collect();
    for id in ids {
        let t = coordinator
            .get_transaction(pb::GetTransactionRequest { txn_id: id.clone() })
            .await?
            .into_inner();
        let state = match pb::TransactionState::try_from(t.state) {
            Ok(pb::TransactionState::Committed) => "committed",
            Ok(pb::TransactionState::RolledBack) => "rolled back",
            _ => "open",
        };
        if t.resolved_by_check {
            by_check += 1;
        }
        let committed_locally = local.contains_key(id);
        match (committed_locally, state) {
            (true, "committed") | (false, "rolled back") => {}
            (true, s) => problems.push(format!(
                "order {id} is in the order database but its message is {s}"
            )),
            (false, s) => problems.push(format!(
                "order {id} is not in the order database but its message is {s}"
            )),
        }
        let times = applied.get(id).copied().unwrap_or(0);
        match (committed_locally, times) {
            (true, 1) | (false, 0) => {}
            (true, n) => problems.push(format!(
                "committed order {id} was applied to the cart {n} times"
            )),
            (false, n) => problems.push(format!(
                "order {id} was never committed but was applied to the cart {n} times"
            )),
        }
        states.insert(id.clone(), state.to_owned());
    }
    // Every cart holds its initial quantity minus its committed orders.
    let mut expected: HashMap<(String, String), i64> = HashMap::new();
    for order in local.values() {
        for item in &order.items {
            *expected
                .entry((order.user.clone(), item.sku.clone()))
                .or_insert(INITIAL) -= i64::from(item.quantity);
        }
    }
    for (key, want) in &expected {
        let got = quantities.get(key).copied().unwrap_or(0);
        if got != *want {
            problems.push(format!(
                "cart of {} holds {got} {} where committed orders leave {want}",
                key.0, key.1
            ));
        }
    }
    for (key, got) in &quantities {
        if !expected.contains_key(key) && *got != INITIAL {
            problems.push(format!(
                "cart of {} holds {got} {} though no committed order took any",
                key.0, key.1
            ));
        }
    }
    Ok(Verdict {
        states,
        by_check,
        cart_duplicates: cart_duplicates as u64,
        problems,
    })
}
