//! `tandem demo`: the first thing a new user runs. It starts a coordinator,
//! the order service and the cart service, each with its own SQLite
//! database and its own sidecar, as real processes on loopback; places
//! orders from concurrent clients while it injects faults; and then checks,
//! from both databases and the coordinator, that every committed order left
//! the cart exactly once and no rolled-back order touched it.
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
use tandem_e2e::db::open_sqlite;
use tandem_e2e::process::Process;
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
}

const SKUS: [&str; 3] = ["apple", "pear", "plum"];
const INITIAL: i64 = 100_000;

/// Settings that make check-back quick enough to watch.
const COORDINATOR: &[&str] = &[
    "check_after_ms=1000",
    "check_timeout_ms=1000",
    "max_checks=5",
    "max_check_interval_ms=2000",
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
    no_dedup: bool,
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
        let order_sidecar =
            Self::sidecar(exe, dir, "orders", &coordinator.url(), None, "orders.db", 0)?;
        let order_service = Process::start(
            "order-service",
            exe,
            &args(&[
                "example-order-service",
                "--listen",
                "127.0.0.1:0",
                "--db",
                &p("orders.db"),
                "--sidecar",
                &order_sidecar.url(),
            ]),
            &[],
            dir,
        )?;
        // The cart's sidecar needs the cart's address and the cart needs its
        // sidecar's: pick a free port for the cart first (and pick again if
        // something else took it meanwhile).
        let failpoint = format!("cart.after_commit@{cart_crash_at}");
        let mut attempt = 0;
        let (cart_sidecar, cart_service) = loop {
            attempt += 1;
            let cart_port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let mut sidecar = Self::sidecar(
                exe,
                dir,
                "cart",
                &coordinator.url(),
                Some(cart_port),
                "cart.db",
                0,
            )?;
            match Self::cart(
                exe,
                dir,
                cart_port,
                &sidecar.url(),
                no_dedup,
                Some(&failpoint),
            ) {
                Ok(service) => break (sidecar, service),
                Err(e) if attempt < 5 => {
                    tracing::debug!(error = %e, "cart port taken; picking another");
                    sidecar.kill();
                }
                Err(e) => return Err(e),
            }
        };
        Ok(Cluster {
            exe: exe.to_owned(),
            dir: dir.to_owned(),
            coordinator,
            order_sidecar,
            order_service,
            cart_sidecar,
            cart_service,
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
        failpoint: Option<&str>,
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
        let env: Vec<(&str, String)> = failpoint
            .map(|f| ("TANDEM_FAILPOINTS", f.to_owned()))
            .into_iter()
            .collect();
        Process::start("cart-service", exe, &a, &env, dir)
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
            &mut self.order_sidecar,
            &mut self.cart_sidecar,
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
            name: tandem_e2e::order::TOPIC.into(),
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
        "  started: coordinator, order service + sidecar, cart service + sidecar; {} carts filled",
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

    // Meanwhile: watch progress, restart the cart when its failpoint kills
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
                name: tandem_e2e::order::TOPIC.into(),
            })
            .await?
            .into_inner();
        let lag = d
            .groups
            .iter()
            .find(|g| g.group == tandem_e2e::cart::GROUP)
            .map_or(u64::MAX, |g| g.total_lag);
        if stats.open == 0 && lag == 0 {
            settled = true;
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let placed = std::mem::take(&mut *placed.lock().await);
    let verdict = verdict(&dir, &mut coordinator, &placed).await?;
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
    writeln!(out, "  messages delivered          {}", totals.delivered())?;
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
            "PASS: every committed order left the cart exactly once; no rolled-back order touched it"
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
