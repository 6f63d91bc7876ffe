//! The fault campaign: cycles of a randomized, seeded workload against a
//! whole Tandem of real processes while a seeded schedule of faults hits
//! them, each cycle's history checked against the promise ([`check`]).
//!
//! One cycle: a coordinator; the `orders` producer (test app + sidecar,
//! callback mode); the `cart` consumer (test app + two sidecars in one
//! group, STRONG dedup); the sidecars reach the coordinator through an
//! in-process TCP proxy. Workers send transactional messages over several
//! keys whose local transactions commit, roll back, answer UNKNOWN, never
//! answer check-backs, take long, or crash the producer app; whose consumer
//! handlers are slow, fail for a while with various gRPC statuses, always
//! fail (poison), or crash the consumer app; some calls are retried with the
//! same id and content, and some ids are reused with other content. Meanwhile
//! faults: SIGKILL and restart of any process, SIGSTOP/SIGCONT of any
//! process (also past the session timeouts), the proxy cutting,
//! black-holing or delaying connections, a consumer leaving and rejoining.
//!
//! Replicated (`--replicated`): three coordinator replicas on a PostgreSQL
//! server of the campaign's own (a fresh database per cycle), every sidecar
//! given all three addresses; the faults add SIGKILL of the lease holder,
//! SIGSTOP of the holder past its lease, and PostgreSQL crashed and
//! restarted (`pg_ctl restart -m immediate`); the proxy and disk faults are
//! left out. Then the faults stop, everything is
//! brought back, the cluster must settle (no open transaction, no lag)
//! within a bound, and the history is checked: committed lost, rolled back
//! delivered, appended or applied twice, content replaced, per-key order,
//! offset gaps, dead letters with and without cause, stalls.
//!
//! A cycle's seed decides its workload and its fault schedule; timing still
//! varies between runs, so a replay (`--seed <cycle seed> --cycles 1`)
//! explores the same schedule, not the same interleaving.

pub mod check;
pub mod proxy;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tandem_proto::coordinator as pb;
use tandem_proto::coordinator::coordinator_client::CoordinatorClient;
use tandem_proto::sidecar as sc;
use tandem_proto::sidecar::sidecar_client::SidecarClient;
use tandem_storage::{EmbeddedLog, Log, LogConfig, ReadBudget, StoreLog};
use tokio::sync::Mutex;

use crate::testapp::{CHECK_HEADER, HANDLE_HEADER};
use check::{Conflict, Handling, History, Logged, Sent, Tally, Violation};
use proxy::{Mode, Proxy};
use tandem_examples::process::Process;

/// Campaign settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// Seed of the first cycle; cycle `i` uses `seed + i`.
    pub seed: u64,
    /// Cycles to run.
    pub cycles: u32,
    /// Messages per cycle.
    pub messages: usize,
    /// How long faults are injected in each cycle.
    pub chaos: Duration,
    /// How long the cluster may take to settle once the faults stop.
    pub settle: Duration,
    /// The `tandem-e2e` binary that runs each process.
    pub bin: PathBuf,
    /// Where cycle folders go (kept for failing cycles).
    pub root: PathBuf,
    /// Keep every cycle's folder (failing ones are always kept).
    pub keep: bool,
    /// Three coordinator replicas on PostgreSQL instead of one on the
    /// embedded store.
    pub replicated: bool,
    /// Inject only these kinds of faults ([`FAULTS`] names them); empty:
    /// every kind the mode has.
    pub only: Vec<String>,
}

/// The fault kinds, by the names `--faults` takes, in the order of their
/// weights.
pub const FAULTS: [&str; 13] = [
    "kill",
    "stop",
    "cut",
    "blackhole",
    "delay",
    "leave",
    "long-stop",
    "fsync",
    "storm",
    "cutoff",
    "kill-holder",
    "stop-holder",
    "pg-restart",
];

/// Weights of the fault kinds in embedded cycles.
const WEIGHTS: [u64; 13] = [30, 20, 10, 12, 10, 8, 6, 5, 12, 8, 0, 0, 0];
/// Weights in replicated cycles: no proxy faults (the sidecars reach the
/// replicas directly) and no disk faults; the replicated ones instead.
const REPLICATED_WEIGHTS: [u64; 13] = [30, 20, 0, 0, 0, 8, 6, 0, 12, 0, 14, 10, 6];

/// How long a replica's lease lasts in replicated cycles.
const LEASE_MS: u64 = 2000;

const TOPIC: &str = "orders";
const PARTITIONS: u32 = 4;
/// A second topic the same group consumes: some plain messages are
/// published to both topics under one id (the consumer's dedup key names
/// the topic, so each takes effect once).
const OTHER_TOPIC: &str = "refunds";
const OTHER_PARTITIONS: u32 = 2;

/// How the history names a message of `topic` with message id `id` (a key
/// likewise): as is on [`TOPIC`], prefixed with its topic elsewhere.
fn logical(topic: &str, id: &str) -> String {
    if topic == TOPIC {
        id.to_owned()
    } else {
        format!("{topic}/{id}")
    }
}
const KEYS: usize = 6;
const GROUP: &str = "cart";
const MAX_ATTEMPTS: u32 = 3;
/// Each sidecar's proxy to the coordinator.
struct Links(BTreeMap<Role, Proxy>);

impl Links {
    fn set(&self, mode: Mode) {
        self.0.values().for_each(|p| p.set(mode));
    }

    /// Every link half the time, one sidecar's otherwise; and which.
    fn pick(&self, rng: &mut Rng) -> (Vec<&Proxy>, &'static str) {
        if rng.below(2) == 0 {
            return (self.0.values().collect(), "every sidecar");
        }
        let role = SIDECARS[rng.below(SIDECARS.len() as u64) as usize];
        (vec![&self.0[&role]], role.name())
    }
}

/// Aborts its tasks when dropped.
struct AbortOnDrop(Vec<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// The fault kind of a long SIGSTOP of the consumer app (past the handler
/// timeout).
const CONSUMER_APP_STALLED: &str = "long SIGSTOP of the consumer app";
/// Credit each consumer sidecar subscribes with.
const MAX_IN_FLIGHT: u32 = 16;

const COORDINATOR_SETTINGS: &[&str] = &[
    "check_after_ms=1000",
    "check_timeout_ms=1000",
    // checks span ~25 s: longer than the longest stall a cycle injects, so
    // the final action never decides a transaction whose app is merely
    // stopped for a while
    "max_checks=8",
    "max_check_interval_ms=2000",
    "session_timeout_ms=3000",
    "revoke_timeout_ms=3000",
];
const SIDECAR_SETTINGS: &[&str] = &["callback_timeout_ms=5000", "handler_timeout_ms=5000"];

/// A small seeded generator (SplitMix64): the campaign's only randomness.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A duration uniform in `lo..=hi` milliseconds.
    pub fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }

    /// Picks by weight: the index of the chosen entry.
    pub fn weighted(&mut self, weights: &[u64]) -> usize {
        let total: u64 = weights.iter().sum();
        let mut x = self.below(total);
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        weights.len() - 1
    }
}

/// The processes of one cycle, by role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    Coordinator,
    Coordinator2,
    Coordinator3,
    OrdersApp,
    OrdersSidecar,
    CartApp,
    Cart1,
    Cart2,
}

const SIDECARS: [Role; 3] = [Role::OrdersSidecar, Role::Cart1, Role::Cart2];

const ROLES: [Role; 6] = [
    Role::Coordinator,
    Role::OrdersApp,
    Role::OrdersSidecar,
    Role::CartApp,
    Role::Cart1,
    Role::Cart2,
];

/// The roles of a replicated cycle.
const REPLICATED_ROLES: [Role; 8] = [
    Role::Coordinator,
    Role::Coordinator2,
    Role::Coordinator3,
    Role::OrdersApp,
    Role::OrdersSidecar,
    Role::CartApp,
    Role::Cart1,
    Role::Cart2,
];

const REPLICAS: [Role; 3] = [Role::Coordinator, Role::Coordinator2, Role::Coordinator3];

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Coordinator2 => "coordinator-2",
            Role::Coordinator3 => "coordinator-3",
            Role::OrdersApp => "orders-app",
            Role::OrdersSidecar => "orders-sidecar",
            Role::CartApp => "cart-app",
            Role::Cart1 => "cart-sidecar-1",
            Role::Cart2 => "cart-sidecar-2",
        }
    }
}

/// One cycle's processes and how to (re)start each on its port.
struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    procs: BTreeMap<Role, Process>,
    ports: BTreeMap<Role, u16>,
    /// Held down by a fault: the watchdog leaves it alone.
    down: BTreeMap<Role, bool>,
    /// Stopped (SIGSTOP) by a fault.
    paused: BTreeMap<Role, bool>,
    /// Each sidecar's own proxy to the coordinator.
    links: BTreeMap<Role, SocketAddr>,
    /// Restarts after an exit nobody asked for (crashes as told, fatal
    /// errors): counted, not hidden.
    unplanned_restarts: u32,
    /// The cycle's database, in replicated cycles.
    store: Option<String>,
}

impl Cluster {
    fn roles(&self) -> &'static [Role] {
        if self.store.is_some() {
            &REPLICATED_ROLES
        } else {
            &ROLES
        }
    }

    fn replicas(&self) -> &'static [Role] {
        if self.store.is_some() {
            &REPLICAS
        } else {
            &REPLICAS[..1]
        }
    }

    /// Every coordinator replica's URL, comma-separated.
    fn coordinators(&self) -> String {
        self.replicas()
            .iter()
            .map(|r| self.url(*r))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn args(&self, role: Role, port: u16) -> Vec<String> {
        let listen = format!("127.0.0.1:{port}");
        let url = |r: Role| format!("http://127.0.0.1:{}", self.ports[&r]);
        let mut a: Vec<String> = match role {
            Role::Coordinator | Role::Coordinator2 | Role::Coordinator3 => {
                let mut a = vec!["coordinator".into(), "--listen".into(), listen];
                match &self.store {
                    Some(url) => a.extend([
                        "--store".into(),
                        url.clone(),
                        "--set".into(),
                        format!("lease_ms={LEASE_MS}"),
                    ]),
                    None => a.extend([
                        "--data-dir".into(),
                        self.dir.join("coordinator").display().to_string(),
                    ]),
                }
                a
            }
            Role::OrdersApp | Role::CartApp => vec![
                "test-app".into(),
                "--listen".into(),
                listen,
                "--db".into(),
                self.dir
                    .join(format!("{}.db", role.name()))
                    .display()
                    .to_string(),
            ],
            Role::OrdersSidecar | Role::Cart1 | Role::Cart2 => {
                let (service, app) = if role == Role::OrdersSidecar {
                    ("orders", Role::OrdersApp)
                } else {
                    ("cart", Role::CartApp)
                };
                vec![
                    "sidecar".into(),
                    "--listen".into(),
                    listen,
                    "--coordinator".into(),
                    match self.store {
                        Some(_) => self.coordinators(),
                        None => format!("http://{}", self.links[&role]),
                    },
                    "--service".into(),
                    service.into(),
                    "--app".into(),
                    url(app),
                    "--db".into(),
                    self.dir
                        .join(format!("{}.db", app.name()))
                        .display()
                        .to_string(),
                    "--set".into(),
                    format!("instance={}", role.name()),
                ]
            }
        };
        let settings = match role {
            Role::Coordinator | Role::Coordinator2 | Role::Coordinator3 => COORDINATOR_SETTINGS,
            Role::OrdersSidecar | Role::Cart1 | Role::Cart2 => SIDECAR_SETTINGS,
            _ => &[],
        };
        for s in settings {
            a.extend(["--set".into(), (*s).into()]);
        }
        a
    }

    fn start(&mut self, role: Role) -> anyhow::Result<()> {
        self.start_with(role, &[])
    }

    /// Starts `role` with extra environment variables (this start only).
    fn start_with(&mut self, role: Role, env: &[(&str, String)]) -> anyhow::Result<()> {
        let port = self.ports.get(&role).copied().unwrap_or(0);
        let args = self.args(role, port);
        // A restart keeps its port (the others know the address); another
        // process on the machine may hold it for a moment meanwhile.
        let p = tokio::task::block_in_place(|| {
            let mut attempt = 0;
            loop {
                match Process::start(role.name(), &self.bin, &args, env, &self.dir) {
                    Err(e)
                        if attempt < 40 && format!("{e:#}").contains("Address already in use") =>
                    {
                        attempt += 1;
                        std::thread::sleep(Duration::from_millis(250));
                    }
                    other => break other,
                }
            }
        })
        .with_context(|| format!("starting {}", role.name()))?;
        self.ports.insert(role, p.addr.port());
        self.procs.insert(role, p);
        self.down.insert(role, false);
        self.paused.insert(role, false);
        Ok(())
    }

    fn kill(&mut self, role: Role) {
        if let Some(mut p) = self.procs.remove(&role) {
            tokio::task::block_in_place(|| p.kill());
        }
        self.down.insert(role, true);
        self.paused.insert(role, false);
    }

    fn pause(&mut self, role: Role) -> anyhow::Result<()> {
        if let Some(p) = self.procs.get_mut(&role) {
            p.pause()?;
            self.paused.insert(role, true);
        }
        Ok(())
    }

    fn resume(&mut self, role: Role) -> anyhow::Result<()> {
        if let Some(p) = self.procs.get_mut(&role) {
            p.resume()?;
        }
        self.paused.insert(role, false);
        Ok(())
    }

    /// Restarts whatever exited on its own (a crash the workload asked for,
    /// a fatal error); true if something was restarted.
    fn revive(&mut self) -> anyhow::Result<bool> {
        let mut any = false;
        for &role in self.roles() {
            let exited = match self.procs.get_mut(&role) {
                Some(p) => p.has_exited(),
                None => !self.down.get(&role).copied().unwrap_or(false),
            };
            if exited {
                self.procs.remove(&role);
                self.unplanned_restarts += 1;
                self.start(role)?;
                any = true;
            }
        }
        Ok(any)
    }

    /// Everything running and not paused.
    fn heal(&mut self) -> anyhow::Result<()> {
        for &role in self.roles() {
            if self.paused.get(&role).copied().unwrap_or(false) {
                self.resume(role)?;
            }
            if !self.procs.contains_key(&role) {
                self.start(role)?;
            }
        }
        self.revive()?;
        Ok(())
    }

    fn url(&self, role: Role) -> String {
        format!("http://127.0.0.1:{}", self.ports[&role])
    }

    /// The replica holding the lease of the shard of the transactions'
    /// topic, by the lease row (replicated cycles).
    async fn holder(&self) -> Option<Role> {
        use tandem_coordinator::shards::{lease_name, shard_of};
        let url = self.store.as_ref()?;
        let store = tandem_storage::PgStore::connect(url, Duration::from_secs(5))
            .await
            .ok()?;
        let n = tandem_coordinator::DEFAULT_SHARDS;
        let lease = store
            .holder(&lease_name(shard_of(TOPIC, n), n))
            .await
            .ok()
            .flatten()
            .filter(|l| l.expires_in > 0);
        store.close().await;
        let lease = lease?;
        let port: u16 = lease.address.rsplit_once(':')?.1.parse().ok()?;
        REPLICAS.into_iter().find(|r| {
            self.ports.get(r) == Some(&port) && !self.down.get(r).copied().unwrap_or(true)
        })
    }
}

/// A client of whichever replica among `urls` (comma-separated) serves.
async fn connect_any(urls: &str) -> anyhow::Result<CoordinatorClient<tonic::transport::Channel>> {
    let mut last = anyhow::anyhow!("no coordinator URL");
    for url in urls.split(',') {
        match CoordinatorClient::connect(url.to_owned()).await {
            Ok(mut c) => match c.list_topics(pb::ListTopicsRequest {}).await {
                Ok(_) => return Ok(c),
                Err(s) => last = anyhow::anyhow!("{url}: {}", s.message()),
            },
            Err(e) => last = anyhow::anyhow!("{url}: {e}"),
        }
    }
    Err(last)
}

/// What one cycle found.
#[derive(Debug)]
pub struct CycleReport {
    /// The cycle's seed (replays it).
    pub seed: u64,
    /// `embedded` (one coordinator) or `replicated` (three on PostgreSQL).
    pub store: &'static str,
    /// The consumer's dedup mode in this cycle.
    pub dedup: &'static str,
    /// The consumers' `max_batch` in this cycle (1: HandleMessage).
    pub batch: u32,
    /// How the producer app answers check-backs in this cycle: `careful`
    /// (UNKNOWN while its local transaction runs, as the README asks) or
    /// `naive` (from its table alone).
    pub checks: &'static str,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, u32>,
    /// Processes restarted after exiting on their own.
    pub unplanned_restarts: u32,
    /// Counts of the history.
    pub tally: Tally,
    /// The last answer the workload got for each message, counted by kind.
    pub answers: BTreeMap<String, u32>,
    /// Broken promises.
    pub violations: Vec<Violation>,
    /// Seconds the cycle took.
    pub seconds: f64,
    /// The cycle's folder, kept when it failed.
    pub kept: Option<PathBuf>,
}

/// Runs the campaign; prints one line per cycle and a summary table;
/// returns the reports.
pub async fn run(opts: &Options) -> anyhow::Result<Vec<CycleReport>> {
    std::fs::create_dir_all(&opts.root)?;
    for f in &opts.only {
        if !FAULTS.contains(&f.as_str()) {
            bail!(
                "unknown fault kind {f:?}: expected one of {}",
                FAULTS.join(", ")
            );
        }
    }
    let mut reports = Vec::new();
    println!(
        "campaign: seed {} cycles {} messages/cycle {} chaos {:?}{}{}",
        opts.seed,
        opts.cycles,
        opts.messages,
        opts.chaos,
        if opts.replicated {
            " replicated: 3 coordinators on PostgreSQL"
        } else {
            ""
        },
        if opts.only.is_empty() {
            String::new()
        } else {
            format!(" faults {}", opts.only.join(","))
        }
    );
    let postgres = if opts.replicated {
        // Under the system's temporary folder: as root the server runs as
        // the postgres account, which must be able to reach its folder.
        let dir = std::env::temp_dir().join(format!("tandem-campaign-pg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Some(Arc::new(
            crate::postgres::Postgres::start(&dir).context("starting PostgreSQL")?,
        ))
    } else {
        None
    };
    let mut abandoned = 0;
    for i in 0..u64::from(opts.cycles) {
        let seed = opts.seed.wrapping_add(i);
        let r = match cycle(opts, seed, postgres.clone()).await {
            Ok(r) => r,
            Err(e) => {
                // Not a verdict on Tandem: the cycle could not be run.
                abandoned += 1;
                println!("cycle {i:>4} seed {seed:>20} abandoned, the harness failed: {e:#}");
                continue;
            }
        };
        println!(
            "cycle {:>4} seed {:>20} {:<10} {:<7} {:<7} batch {:>2} {:>5.1}s sent {:>3} committed {:>3} appended {:>3} effects {:>3} dlq {:>2} conflicts refused {:>2} faults {:>3} crashes {:>2}  {}",
            i,
            r.seed,
            r.store,
            r.dedup,
            r.checks,
            r.batch,
            r.seconds,
            r.tally.sent,
            r.tally.committed,
            r.tally.appended,
            r.tally.effects,
            r.tally.dead_lettered,
            r.tally.conflicts_refused,
            r.faults.values().sum::<u32>(),
            r.unplanned_restarts,
            if r.violations.is_empty() {
                "ok"
            } else {
                "FAILED"
            }
        );
        println!("    answers {:?}", r.answers);
        for v in &r.violations {
            println!("    {v}");
        }
        if let Some(k) = &r.kept {
            println!(
                "    kept {}; replay: tandem-e2e campaign --seed {} --cycles 1",
                k.display(),
                r.seed
            );
        }
        reports.push(r);
    }
    print_summary(&reports);
    if abandoned > 0 {
        println!(
            "{:<44}{:>10}",
            "cycles abandoned (harness failed)", abandoned
        );
    }
    if reports.is_empty() && abandoned > 0 {
        bail!("every cycle was abandoned: the harness failed");
    }
    Ok(reports)
}

fn print_summary(reports: &[CycleReport]) {
    let mut faults: BTreeMap<&str, u32> = BTreeMap::new();
    let mut t = Tally::default();
    let mut kinds: BTreeMap<&str, u32> = BTreeMap::new();
    for r in reports {
        for (k, n) in &r.faults {
            *faults.entry(k).or_default() += n;
        }
        t.sent += r.tally.sent;
        t.committed += r.tally.committed;
        t.appended += r.tally.appended;
        t.effects += r.tally.effects;
        t.dead_lettered += r.tally.dead_lettered;
        t.conflicts_refused += r.tally.conflicts_refused;
        for v in &r.violations {
            *kinds.entry(v.kind).or_default() += 1;
        }
    }
    let failed: Vec<u64> = reports
        .iter()
        .filter(|r| !r.violations.is_empty())
        .map(|r| r.seed)
        .collect();
    println!("\n== campaign summary: {} cycles ==", reports.len());
    println!("{:<44}{:>10}", "messages sent", t.sent);
    println!("{:<44}{:>10}", "local transactions committed", t.committed);
    println!("{:<44}{:>10}", "messages appended", t.appended);
    println!("{:<44}{:>10}", "effects", t.effects);
    println!("{:<44}{:>10}", "dead letters (poison)", t.dead_lettered);
    println!(
        "{:<44}{:>10}",
        "conflicting reuses refused", t.conflicts_refused
    );
    println!(
        "{:<44}{:>10}",
        "unplanned restarts",
        reports.iter().map(|r| r.unplanned_restarts).sum::<u32>()
    );
    for (k, n) in &faults {
        println!("{:<44}{:>10}", format!("fault: {k}"), n);
    }
    if kinds.is_empty() {
        println!("{:<44}{:>10}", "violations", 0);
    }
    for (k, n) in &kinds {
        println!("{:<44}{:>10}", format!("VIOLATION: {k}"), n);
    }
    if !failed.is_empty() {
        println!("failing seeds: {failed:?}");
    }
}

async fn cycle(
    opts: &Options,
    seed: u64,
    postgres: Option<Arc<crate::postgres::Postgres>>,
) -> anyhow::Result<CycleReport> {
    let began = Instant::now();
    let dir = opts.root.join(format!("cycle-{seed}"));
    if dir.exists() {
        // a replay keeps what an earlier run of the seed left
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        std::fs::rename(&dir, opts.root.join(format!("cycle-{seed}.before-{now}")))?;
    }
    std::fs::create_dir_all(&dir)?;
    let mut rng = Rng::new(seed);
    let store = match &postgres {
        Some(pg) => Some(
            pg.create_database(&format!("cycle_{seed}_{}", std::process::id()))
                .await?,
        ),
        None => None,
    };

    // The coordinators first (the proxies need the port), then the rest.
    let mut cluster = Cluster {
        bin: opts.bin.clone(),
        dir: dir.clone(),
        procs: BTreeMap::new(),
        ports: BTreeMap::new(),
        down: BTreeMap::new(),
        paused: BTreeMap::new(),
        links: BTreeMap::new(),
        unplanned_restarts: 0,
        store,
    };
    for &role in cluster.replicas() {
        cluster.start(role)?;
    }
    let coordinator_addr = cluster.procs[&Role::Coordinator].addr;
    let mut links = Links(BTreeMap::new());
    if !opts.replicated {
        for role in SIDECARS {
            let p = Proxy::start(coordinator_addr).await?;
            cluster.links.insert(role, p.addr);
            links.0.insert(role, p);
        }
    }
    for role in [
        Role::OrdersApp,
        Role::CartApp,
        Role::OrdersSidecar,
        Role::Cart1,
        Role::Cart2,
    ] {
        cluster.start(role)?;
    }
    let mut admin = {
        let urls = cluster.coordinators();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match connect_any(&urls).await {
                Ok(c) => break c,
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context("no coordinator served within 30 s"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    };
    for (name, partitions) in [(TOPIC, PARTITIONS), (OTHER_TOPIC, OTHER_PARTITIONS)] {
        admin
            .create_topic(pb::CreateTopicRequest {
                name: name.into(),
                partitions,
            })
            .await
            .with_context(|| format!("creating topic {name}"))?;
    }
    // Even seeds consume in STRONG mode (exactly-once effect whatever
    // dies), odd ones in SIDECAR mode, whose promise excludes a consumer
    // sidecar or app dying between the effect and its record: those cycles
    // do not SIGKILL the consumer side (everything else still happens).
    // In every other pair of cycles the producer app's check-back is naive
    // (COMMIT if its row is there, else ROLLBACK, even while its local
    // transaction still runs): the sidecar's own UNKNOWN for a callback in
    // progress must keep that safe. Those cycles never SIGKILL the producer
    // sidecar (a new one cannot know the app still runs a callback) nor
    // stop the producer app (a callback held up past its timeout may still
    // commit after the sidecar stopped answering for it).
    let naive = (seed / 2) % 2 == 1;
    let dedup = if seed.is_multiple_of(2) {
        sc::DedupMode::Strong
    } else {
        sc::DedupMode::Sidecar
    };
    // In every other four cycles the consumers take their messages in
    // HandleMessages calls of up to MAX_IN_FLIGHT, one transaction each.
    let batch = if (seed / 4) % 2 == 1 {
        MAX_IN_FLIGHT
    } else {
        1
    };
    for role in [Role::Cart1, Role::Cart2] {
        let mut c = SidecarClient::connect(cluster.url(role))
            .await
            .with_context(|| format!("connecting to {}", role.name()))?;
        for topic in [TOPIC, OTHER_TOPIC] {
            c.subscribe(subscription(topic, dedup, batch)).await?;
        }
    }
    let producer_url = cluster.url(Role::OrdersSidecar);
    let cluster = Arc::new(Mutex::new(cluster));

    // Workload and faults run together; the faults stop after the chaos
    // period, the workload when its messages are sent.
    let plan = plan_messages(&mut rng, seed, opts.messages);
    // Each worker spreads its messages over the chaos period.
    let per_worker = (opts.messages / KEYS).max(1) as u32;
    let pace = opts.chaos / per_worker;
    let workload = tokio::spawn(workload(producer_url, plan, rng.next_u64(), pace, naive));
    // Processes that exit on their own (crashes the workload asks for, a
    // fatal error) are brought back for as long as the cycle runs.
    let (reviving, mut revive_stop) = tokio::sync::watch::channel(false);
    let reviver = {
        let cluster = cluster.clone();
        tokio::spawn(async move {
            loop {
                cluster.lock().await.revive()?;
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(300)) => {}
                    _ = revive_stop.wait_for(|s| *s) => return anyhow::Ok(()),
                }
            }
        })
    };
    let weights = {
        let base = if opts.replicated {
            REPLICATED_WEIGHTS
        } else {
            WEIGHTS
        };
        let mut w = base;
        if !opts.only.is_empty() {
            for (i, name) in FAULTS.iter().enumerate() {
                if !opts.only.iter().any(|o| o == name) {
                    w[i] = 0;
                }
            }
        }
        w
    };
    if weights.iter().sum::<u64>() == 0 {
        bail!(
            "none of the fault kinds {:?} happens in {} cycles",
            opts.only,
            if opts.replicated {
                "replicated"
            } else {
                "embedded"
            }
        );
    }
    let faults = tokio::spawn(inject_faults(
        cluster.clone(),
        Arc::new(links),
        Schedule {
            chaos: opts.chaos,
            seed: rng.next_u64(),
            weights,
            postgres,
            batch,
        },
        dedup == sc::DedupMode::Strong,
        naive,
        dir.join("faults.log"),
    ));
    // If the harness fails half-way, these tasks stop with the cycle, and
    // with them the last handles on its processes (killed when dropped).
    let _stop_with_cycle = AbortOnDrop(vec![
        workload.abort_handle(),
        reviver.abort_handle(),
        faults.abort_handle(),
    ]);
    let Injected {
        links,
        counts: faults,
        burst,
        credit_lost,
    } = faults.await??;
    let (sent, mut plain, conflicts) = workload.await??;
    plain.extend(burst);
    let _ = reviving.send(true);
    reviver.await??;

    // Heal, settle, stop, gather, check.
    links.set(Mode::Pass);
    cluster.lock().await.heal()?;
    let stalled = settle(&cluster, &sent, opts.settle).await?;
    let mut c = cluster.lock().await;
    for role in [
        Role::Cart1,
        Role::Cart2,
        Role::OrdersSidecar,
        Role::CartApp,
        Role::OrdersApp,
    ] {
        c.kill(role);
    }
    for &role in c.replicas() {
        if let Some(p) = c.procs.get_mut(&role) {
            let _ = tokio::task::block_in_place(|| p.terminate(Duration::from_secs(20)));
        }
        c.kill(role);
    }
    let unplanned_restarts = c.unplanned_restarts;
    let store = c.store.clone();
    drop(c);
    drop(links);
    let mut answers: BTreeMap<String, u32> = BTreeMap::new();
    for s in &sent {
        let last = s
            .answers
            .last()
            .map_or("none", |a| a.split(':').next().unwrap_or(a));
        *answers.entry(last.to_owned()).or_default() += 1;
    }
    let logs = match &store {
        Some(url) => {
            let pg = tandem_storage::PgStore::connect(url, Duration::from_secs(10)).await?;
            // Read only: reads are not fenced, so any lease will do.
            let reader = tandem_storage::Lease {
                name: tandem_coordinator::LEASE_NAME.into(),
                owner: "campaign".into(),
                address: String::new(),
                epoch: -1,
                expires_in: 0,
            };
            // The topic logs of every shard.
            let n = tandem_coordinator::DEFAULT_SHARDS;
            let mut logs = Vec::new();
            for k in 0..n {
                let (ns, _) = tandem_coordinator::shards::namespaces(k, n);
                logs.push(StoreLog::Postgres(
                    pg.open(&ns, &reader, LogConfig::default()).await?,
                ));
            }
            logs
        }
        None => {
            // as the coordinator opens them: one journal for both logs
            let mut both = EmbeddedLog::open_group(
                dir.join("coordinator"),
                vec![
                    ("topics".into(), LogConfig::default()),
                    ("internal".into(), LogConfig::default()),
                ],
            )
            .await?;
            let internal = both.pop().expect("two logs opened");
            internal.close().await;
            vec![StoreLog::Embedded(both.pop().expect("two logs opened"))]
        }
    };
    let mut history = gather(&dir, &logs, sent, plain, conflicts, stalled).await?;
    for log in logs {
        log.close().await;
    }
    history.consumer_app_stalled = faults.contains_key(CONSUMER_APP_STALLED);
    history.credit_lost = credit_lost;
    history.sidecar_mode = dedup == sc::DedupMode::Sidecar;
    history.uncertain = uncertain_calls(&dir);
    let (tally, violations) = check::check(&history);
    let kept = if violations.is_empty() && !opts.keep {
        let _ = std::fs::remove_dir_all(&dir);
        None
    } else {
        std::fs::write(dir.join("history.txt"), format!("{history:#?}"))?;
        Some(dir)
    };
    Ok(CycleReport {
        seed,
        store: if opts.replicated {
            "replicated"
        } else {
            "embedded"
        },
        dedup: if dedup == sc::DedupMode::Strong {
            "STRONG"
        } else {
            "SIDECAR"
        },
        checks: if naive { "naive" } else { "careful" },
        batch,
        faults,
        unplanned_restarts,
        tally,
        answers,
        violations,
        seconds: began.elapsed().as_secs_f64(),
        kept,
    })
}

/// One message of the workload, before it is sent.
#[derive(Clone, Debug)]
struct Planned {
    id: String,
    key: String,
    value: String,
    handle: Option<String>,
    handling: Handling,
    /// After a definitive answer: send it again unchanged.
    retry_same: bool,
    /// After a definitive answer: reuse the id with other content.
    reuse_other: bool,
    /// Also publish a plain message with an id of its own, retried.
    plain_too: bool,
    /// ... and that id to the other topic as well.
    other_topic_too: bool,
}

fn plan_messages(rng: &mut Rng, seed: u64, n: usize) -> Vec<Vec<Planned>> {
    // local transaction: what the producer app does
    const LOCAL: [(&str, u64); 7] = [
        ("commit", 55),
        ("unknown", 12),
        ("check-unknown", 6),
        ("rollback", 12),
        ("hang", 4),
        ("slow", 4),
        ("crash", 3),
    ];
    // gRPC codes a failing handler answers with
    const COUNTED: [i32; 5] = [2, 3, 4, 9, 13];
    let mut per_key: Vec<Vec<Planned>> = vec![Vec::new(); KEYS];
    for i in 0..n {
        let k = rng.below(KEYS as u64) as usize;
        let local = LOCAL[rng.weighted(&LOCAL.map(|(_, w)| w))].0;
        let id = format!("s{seed}-{i:04}");
        let (handle, handling) = match rng.weighted(&[70, 8, 4, 5, 5, 4, 4]) {
            0 => (None, Handling::Plain),
            1 => {
                let code = COUNTED[rng.below(COUNTED.len() as u64) as usize];
                (
                    Some(format!("fail:{code}:{}", 1 + rng.below(2))),
                    Handling::Transient,
                )
            }
            // UNAVAILABLE means "not reachable": retried, never counted
            2 => (Some("fail:14:2".to_owned()), Handling::Transient),
            3 => {
                let code = COUNTED[rng.below(COUNTED.len() as u64) as usize];
                (Some(format!("fail:{code}:99")), Handling::Poison(code))
            }
            4 => (Some("slow".to_owned()), Handling::Plain),
            5 => (Some("crash".to_owned()), Handling::Plain),
            _ => (Some("fail:2:1".to_owned()), Handling::Transient),
        };
        per_key[k].push(Planned {
            value: format!("{local}-{id}"),
            id,
            key: format!("k{k}"),
            handle,
            handling,
            retry_same: rng.below(100) < 6,
            reuse_other: rng.below(100) < 6,
            plain_too: rng.below(100) < 15,
            other_topic_too: rng.below(100) < 50,
        });
    }
    per_key
}

fn answer_of(r: &Result<tonic::Response<sc::TransactionResponse>, tonic::Status>) -> String {
    match r {
        Ok(r) => pb::TransactionState::try_from(r.get_ref().state)
            .map(|s| {
                s.as_str_name()
                    .trim_start_matches("TRANSACTION_STATE_")
                    .to_owned()
            })
            .unwrap_or_else(|_| "?".into()),
        Err(s) => status_text(s),
    }
}

/// `OK`, or the status a publish was answered with.
fn publish_answer<T>(r: &Result<tonic::Response<T>, tonic::Status>) -> String {
    match r {
        Ok(_) => "OK".to_owned(),
        Err(s) => status_text(s),
    }
}

/// `CODE: message`, as the checker reads answers.
fn status_text(s: &tonic::Status) -> String {
    format!("{}: {}", code_name(s.code()), s.message())
}

fn code_name(c: tonic::Code) -> String {
    format!("{c:?}")
        .chars()
        .enumerate()
        .flat_map(|(i, ch)| {
            let sep = (i > 0 && ch.is_uppercase()).then_some('_');
            sep.into_iter().chain(ch.to_uppercase())
        })
        .collect()
}

/// Sends every planned message, one worker per key (so each key's messages
/// go out in order), retrying a call whose answer was lost.
async fn workload(
    producer: String,
    plan: Vec<Vec<Planned>>,
    seed: u64,
    pace: Duration,
    naive: bool,
) -> anyhow::Result<(Vec<Sent>, Vec<Sent>, Vec<Conflict>)> {
    let mut workers = Vec::new();
    for (w, messages) in plan.into_iter().enumerate() {
        let producer = producer.clone();
        let mut rng = Rng::new(seed.wrapping_add(w as u64));
        workers.push(tokio::spawn(async move {
            let channel = tonic::transport::Endpoint::from_shared(producer)?
                .connect_timeout(Duration::from_secs(2))
                .connect_lazy();
            let mut client = SidecarClient::new(channel);
            let mut sent = Vec::new();
            let mut plain = Vec::new();
            let mut conflicts = Vec::new();
            for m in messages {
                let pause = pace.as_millis() as u64;
                tokio::time::sleep(rng.ms(0, 2 * pause)).await;
                let request = |value: &str| {
                    let mut message = pb::Message {
                        id: String::new(),
                        key: Some(m.key.clone().into_bytes().into()),
                        value: value.as_bytes().to_vec().into(),
                        headers: Vec::new(),
                        partition: None,
                    };
                    if !naive {
                        message.headers.push(pb::Header {
                            name: CHECK_HEADER.into(),
                            value: b"careful".to_vec().into(),
                        });
                    }
                    if let Some(h) = &m.handle {
                        message.headers.push(pb::Header {
                            name: HANDLE_HEADER.into(),
                            value: h.clone().into_bytes().into(),
                        });
                    }
                    let mut r = tonic::Request::new(sc::PublishTransactionalRequest {
                        topic: TOPIC.into(),
                        message: Some(message),
                        txn_id: m.id.clone(),
                    });
                    r.set_timeout(Duration::from_secs(15));
                    r
                };
                let mut answers = Vec::new();
                let mut definitive = false;
                for attempt in 0..4 {
                    let r = client.publish_transactional(request(&m.value)).await;
                    answers.push(answer_of(&r));
                    match r {
                        Ok(_) => {
                            definitive = true;
                            break;
                        }
                        // The outcome is unknown: retry the same call (the
                        // id makes it the same transaction).
                        Err(_) if attempt < 3 => {
                            tokio::time::sleep(rng.ms(200, 1000)).await;
                        }
                        Err(_) => {}
                    }
                }
                if definitive && m.retry_same {
                    let r = client.publish_transactional(request(&m.value)).await;
                    answers.push(answer_of(&r));
                }
                // a plain message with its own id, published and retried
                // (an answer lost, or on purpose): one append; the same id
                // also goes to the other topic, with other content
                let plain_topics: &[&str] = match (m.plain_too, m.other_topic_too) {
                    (false, _) => &[],
                    (true, false) => &[TOPIC],
                    (true, true) => &[TOPIC, OTHER_TOPIC],
                };
                for &topic in plain_topics {
                    let id = format!("{}-plain", m.id);
                    let value = format!("plain-{topic}-{}", m.id);
                    let publish = || pb::PublishRequest {
                        topic: topic.into(),
                        messages: vec![pb::Message {
                            id: id.clone(),
                            key: Some(m.key.clone().into_bytes().into()),
                            value: value.clone().into_bytes().into(),
                            headers: Vec::new(),
                            partition: None,
                        }],
                    };
                    let mut plain_answers = Vec::new();
                    for attempt in 0..3 {
                        let r = client.publish(publish()).await;
                        plain_answers.push(publish_answer(&r));
                        if r.is_ok() && attempt > 0 {
                            break;
                        }
                        tokio::time::sleep(rng.ms(50, 500)).await;
                    }
                    plain.push(Sent {
                        id: logical(topic, &id),
                        key: logical(topic, &m.key),
                        value,
                        handling: Handling::Plain,
                        answers: plain_answers,
                    });
                }
                if definitive && m.reuse_other {
                    let other = format!("commit-other-{}", m.id);
                    // Asked again while the answer says the request may not
                    // have been heard (the sidecar down or cut off).
                    let mut answer = String::new();
                    for _ in 0..5 {
                        let r = client.publish_transactional(request(&other)).await;
                        answer = answer_of(&r);
                        let unheard = r.as_ref().err().is_some_and(|s| {
                            matches!(
                                s.code(),
                                tonic::Code::Unavailable
                                    | tonic::Code::DeadlineExceeded
                                    | tonic::Code::Cancelled
                                    | tonic::Code::Unknown
                            )
                        });
                        if !unheard {
                            break;
                        }
                        tokio::time::sleep(rng.ms(200, 1000)).await;
                    }
                    conflicts.push(Conflict {
                        id: m.id.clone(),
                        value: other,
                        answer,
                    });
                }
                sent.push(Sent {
                    id: m.id,
                    key: m.key,
                    value: m.value,
                    handling: m.handling,
                    answers,
                });
            }
            anyhow::Ok((sent, plain, conflicts))
        }));
    }
    let mut sent = Vec::new();
    let mut plain = Vec::new();
    let mut conflicts = Vec::new();
    for w in workers {
        let (s, p, c) = w.await??;
        sent.extend(s);
        plain.extend(p);
        conflicts.extend(c);
    }
    Ok((sent, plain, conflicts))
}

/// What [`inject_faults`] leaves.
struct Injected {
    links: Arc<Links>,
    /// Faults by kind.
    counts: BTreeMap<&'static str, u32>,
    /// Plain messages published by the faults themselves.
    burst: Vec<Sent>,
    /// Members found short of credit with nothing left to deliver, after
    /// rebalance storms.
    credit_lost: Vec<String>,
}

/// What faults a cycle injects, and for how long.
struct Schedule {
    chaos: Duration,
    seed: u64,
    /// Weight of each kind of [`FAULTS`].
    weights: [u64; 13],
    /// The PostgreSQL server of replicated cycles.
    postgres: Option<Arc<crate::postgres::Postgres>>,
    /// The consumers' `max_batch`.
    batch: u32,
}

/// Injects seeded faults for `chaos`, one at a time, keeping processes that
/// crashed on their own running; logs each to `log`.
async fn inject_faults(
    cluster: Arc<Mutex<Cluster>>,
    links: Arc<Links>,
    schedule: Schedule,
    kill_consumers: bool,
    naive: bool,
    log: PathBuf,
) -> anyhow::Result<Injected> {
    let Schedule {
        chaos,
        seed,
        weights,
        postgres,
        batch,
    } = schedule;
    let replicated = postgres.is_some();
    let roles = cluster.lock().await.roles();
    let mut rng = Rng::new(seed);
    let mut burst = Vec::new();
    let mut storms = 0;
    let mut slow_bursts = 0;
    let mut credit_lost = Vec::new();
    let mut counts: BTreeMap<&'static str, u32> = BTreeMap::new();
    let mut lines = Vec::new();
    let start = Instant::now();
    while start.elapsed() < chaos {
        tokio::time::sleep(rng.ms(200, 1200)).await;
        let role = roles[rng.below(roles.len() as u64) as usize];
        let consumer_side = matches!(role, Role::CartApp | Role::Cart1 | Role::Cart2);
        let kind = match rng.weighted(&weights) {
            0 if consumer_side && !kill_consumers => continue,
            0 if naive && role == Role::OrdersSidecar => continue,
            1 | 6 if naive && role == Role::OrdersApp => continue,
            // A stall longer than session timeouts (members expelled,
            // partitions moved, sessions broken while calls are in flight).
            // Not in SIDECAR cycles: a consumer stalled past its handler
            // timeout may legitimately run a handler twice there.
            6 if !kill_consumers => continue,
            6 => {
                let d = rng.ms(6000, 12_000);
                stall(&cluster, role, d).await?;
                lines.push(format!(
                    "{:?} long SIGSTOP {} for {d:?}",
                    start.elapsed(),
                    role.name()
                ));
                if role == Role::CartApp {
                    CONSUMER_APP_STALLED
                } else {
                    "long SIGSTOP (past timeouts)"
                }
            }
            0 => {
                let down = rng.ms(0, 1000);
                cluster.lock().await.kill(role);
                tokio::time::sleep(down).await;
                cluster.lock().await.start(role)?;
                lines.push(format!(
                    "{:?} SIGKILL {} down {down:?}",
                    start.elapsed(),
                    role.name()
                ));
                "SIGKILL + restart"
            }
            1 => {
                // SIDECAR mode: short enough that a call in progress stays
                // within the handler timeout (5 s)
                let d = rng.ms(300, if kill_consumers { 4000 } else { 2500 });
                stall(&cluster, role, d).await?;
                lines.push(format!(
                    "{:?} SIGSTOP {} for {d:?}",
                    start.elapsed(),
                    role.name()
                ));
                "SIGSTOP/SIGCONT"
            }
            2 => {
                let (cut, which) = links.pick(&mut rng);
                cut.iter().for_each(|p| p.cut());
                lines.push(format!("{:?} proxy cut ({which})", start.elapsed()));
                "proxy cut"
            }
            3 => {
                let d = rng.ms(300, 3000);
                let (held, which) = links.pick(&mut rng);
                held.iter().for_each(|p| p.set(Mode::Blackhole));
                tokio::time::sleep(d).await;
                held.iter().for_each(|p| p.set(Mode::Pass));
                lines.push(format!(
                    "{:?} proxy black hole {d:?} ({which})",
                    start.elapsed()
                ));
                "proxy black hole"
            }
            4 => {
                let (d, lag) = (rng.ms(500, 3000), rng.ms(20, 300));
                let (slow, which) = links.pick(&mut rng);
                slow.iter().for_each(|p| p.set(Mode::Delay(lag)));
                tokio::time::sleep(d).await;
                slow.iter().for_each(|p| p.set(Mode::Pass));
                lines.push(format!(
                    "{:?} proxy delay {lag:?} for {d:?} ({which})",
                    start.elapsed()
                ));
                "proxy delay"
            }
            8 => {
                // A burst of plain messages while the second consumer
                // leaves its group and joins again and again: partitions
                // are revoked while their deliveries are being read and
                // sent (where credit once leaked). Three storms in four hit
                // a coordinator restarted on a slow disk, whose reads take
                // long enough for revocations to land in the middle of them.
                // (Not with replicas: the restarted one would not be the
                // one serving.)
                let slow_disk = (rng.below(4) != 0)
                    .then(|| rng.ms(100, 400))
                    .filter(|_| !replicated);
                if let Some(d) = slow_disk {
                    let failpoint = format!("storage.read:{TOPIC}/*=delay:{}", d.as_millis());
                    let mut c = cluster.lock().await;
                    c.kill(Role::Coordinator);
                    c.start_with(Role::Coordinator, &[("TANDEM_FAILPOINTS", failpoint)])?;
                }
                let (producer, cart2, coordinator) = {
                    let c = cluster.lock().await;
                    (
                        c.url(Role::OrdersSidecar),
                        c.url(Role::Cart2),
                        c.coordinators(),
                    )
                };
                // Both consumers in the group first (after a restart they
                // take a moment to come back), or no partition is revoked.
                let joined = members_within(&coordinator, 2, Duration::from_secs(15)).await;
                let prefix = format!("burst{storms}");
                storms += 1;
                let publisher = tokio::spawn(publish_burst(producer, prefix, 20, 20, None));
                // deliveries under way before the first revocation
                tokio::time::sleep(Duration::from_millis(300)).await;
                let dedup = if kill_consumers {
                    sc::DedupMode::Strong
                } else {
                    sc::DedupMode::Sidecar
                };
                let rounds = 8 + rng.below(9);
                // Away and back for about as long as a read takes: the
                // other consumer's pumps of the partitions it takes over
                // get credit and start reading before they are revoked.
                let longest = slow_disk.map_or(100, |d| 2 * d.as_millis() as u64);
                for _ in 0..rounds {
                    leave_and_rejoin(&cart2, dedup, batch, rng.ms(10, longest)).await;
                    tokio::time::sleep(rng.ms(10, longest)).await;
                }
                burst.extend(publisher.await??);
                // Checked now, once the burst is consumed: a later fault
                // that starts new sessions would hide a leak by settle time.
                let lost = credit_lost_within(&coordinator, Duration::from_secs(90)).await;
                if let Some(what) = &lost {
                    credit_lost.push(format!("after storm {storms}: {what}"));
                }
                // and the disk is well again
                if slow_disk.is_some() {
                    let mut c = cluster.lock().await;
                    c.kill(Role::Coordinator);
                    c.start(Role::Coordinator)?;
                }
                lines.push(format!(
                    "{:?} burst of 400 plain messages, cart-sidecar-2 left and rejoined {rounds} times{}{}{}",
                    start.elapsed(),
                    if joined { "" } else { " (the group had not 2 members after 15 s)" },
                    slow_disk.map_or(String::new(), |d| format!(
                        ", coordinator restarted with reads {d:?} slower, then restarted as it was"
                    )),
                    lost.map_or(String::new(), |w| format!("; credit lost: {w}"))
                ));
                if slow_disk.is_some() {
                    "rebalance storm on a slow disk"
                } else {
                    "rebalance storm under a burst"
                }
            }
            9 => {
                // Slow messages reach the consumers; while their handlers
                // run, one consumer sidecar's link is cut and held black:
                // its partitions move to the other sidecar, which gets the
                // same messages while the first one's calls still run
                // (where SIDECAR dedup's claims keep the app from running
                // one id twice).
                let producer = cluster.lock().await.url(Role::OrdersSidecar);
                let prefix = format!("slow{slow_bursts}");
                slow_bursts += 1;
                burst.extend(publish_burst(producer, prefix, 1, 8, Some("slow")).await?);
                tokio::time::sleep(rng.ms(100, 700)).await;
                let role = [Role::Cart1, Role::Cart2][rng.below(2) as usize];
                let link = &links.0[&role];
                let d = rng.ms(500, 2500);
                link.set(Mode::Blackhole);
                link.cut();
                tokio::time::sleep(d).await;
                link.set(Mode::Pass);
                lines.push(format!(
                    "{:?} 8 slow messages, then {} cut off for {d:?} while handling them",
                    start.elapsed(),
                    role.name()
                ));
                "consumer cut off mid-call"
            }
            10 => {
                // The replica serving everything dies: another one takes
                // over once its lease expires.
                let Some(holder) = cluster.lock().await.holder().await else {
                    continue;
                };
                let down = rng.ms(0, 3000);
                cluster.lock().await.kill(holder);
                tokio::time::sleep(down).await;
                cluster.lock().await.start(holder)?;
                lines.push(format!(
                    "{:?} SIGKILL lease holder {} down {down:?}",
                    start.elapsed(),
                    holder.name()
                ));
                "SIGKILL of the lease holder"
            }
            11 => {
                // The holder freezes past its lease (a long GC pause, a VM
                // stalled): another replica takes over; when the first one
                // wakes up, whatever it was doing must not land.
                let Some(holder) = cluster.lock().await.holder().await else {
                    continue;
                };
                let d = Duration::from_millis(LEASE_MS) + rng.ms(500, 3000);
                cluster.lock().await.pause(holder)?;
                tokio::time::sleep(d).await;
                // Before it wakes: did another replica take over?
                let now = cluster.lock().await.holder().await;
                cluster.lock().await.resume(holder)?;
                let taken = now.is_some_and(|r| r != holder);
                lines.push(format!(
                    "{:?} SIGSTOP lease holder {} for {d:?}: {}",
                    start.elapsed(),
                    holder.name(),
                    match now {
                        Some(r) if r != holder => format!("{} took over", r.name()),
                        _ => "not taken over".to_owned(),
                    }
                ));
                if taken {
                    "SIGSTOP of the lease holder past its lease, taken over"
                } else {
                    "SIGSTOP of the lease holder past its lease, not taken over"
                }
            }
            12 => {
                let Some(pg) = postgres.clone() else { continue };
                tokio::task::spawn_blocking(move || pg.restart_immediate()).await??;
                lines.push(format!(
                    "{:?} PostgreSQL crashed and restarted",
                    start.elapsed()
                ));
                "PostgreSQL crashed and restarted"
            }
            7 => {
                // The disk fails an fdatasync: the coordinator must stop
                // (NOT_SERVING, exit) without acknowledging what it could
                // not sync; it is then restarted without the fault.
                let (partition, nth) = (rng.below(u64::from(PARTITIONS)), 1 + rng.below(20));
                let failpoint = format!("storage.fdatasync:{TOPIC}/{partition}@{nth}=error");
                let mut c = cluster.lock().await;
                c.kill(Role::Coordinator);
                c.start_with(
                    Role::Coordinator,
                    &[("TANDEM_FAILPOINTS", failpoint.clone())],
                )?;
                drop(c);
                lines.push(format!("{:?} restart with {failpoint}", start.elapsed()));
                "fdatasync error"
            }
            _ => {
                // a consumer leaves cleanly and comes back
                let d = rng.ms(200, 2000);
                let mut c = cluster.lock().await;
                if let Some(p) = c.procs.get_mut(&Role::Cart2) {
                    let _ = tokio::task::block_in_place(|| p.terminate(Duration::from_secs(15)));
                }
                c.kill(Role::Cart2);
                drop(c);
                tokio::time::sleep(d).await;
                cluster.lock().await.start(Role::Cart2)?;
                lines.push(format!(
                    "{:?} cart-sidecar-2 left for {d:?}",
                    start.elapsed()
                ));
                "consumer leaves + rejoins"
            }
        };
        *counts.entry(kind).or_default() += 1;
    }
    std::fs::write(&log, lines.join("\n"))?;
    Ok(Injected {
        links,
        counts,
        burst,
        credit_lost,
    })
}

/// The subscription every consumer sidecar of the campaign has.
fn subscription(topic: &str, dedup: sc::DedupMode, batch: u32) -> sc::SubscribeRequest {
    sc::SubscribeRequest {
        topic: topic.into(),
        group: GROUP.into(),
        start_from: pb::StartFrom::Earliest as i32,
        dedup: dedup as i32,
        max_in_flight: MAX_IN_FLIGHT,
        max_attempts: MAX_ATTEMPTS,
        retry_backoff_ms: 50,
        max_batch: batch,
    }
}

/// Waits until the consumer group has `n` members on the main topic, for
/// at most `within`; false if it did not.
async fn members_within(coordinator: &str, n: u32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(mut c) = connect_any(coordinator).await
            && let Ok(d) = c
                .describe_topic(pb::DescribeTopicRequest { name: TOPIC.into() })
                .await
            && d.get_ref()
                .groups
                .iter()
                .any(|g| g.group == GROUP && g.members >= n)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Unsubscribes the sidecar at `url` and subscribes it again `away` later
/// (errors ignored: it may be down or stopped).
async fn leave_and_rejoin(url: &str, dedup: sc::DedupMode, batch: u32, away: Duration) {
    let Ok(mut c) = SidecarClient::connect(url.to_owned()).await else {
        return;
    };
    let _ = c
        .unsubscribe(sc::UnsubscribeRequest {
            topic: TOPIC.into(),
            group: GROUP.into(),
        })
        .await;
    tokio::time::sleep(away).await;
    let _ = c.subscribe(subscription(TOPIC, dedup, batch)).await;
}

/// Publishes `batches` batches of `size` plain messages with ids of their
/// own over 16 keys (so that every partition gets some) through the
/// producer's sidecar as fast as it answers, each batch
/// retried up to three times, each message asking its handler to behave as
/// `handle` says; returns them as sent.
async fn publish_burst(
    producer: String,
    prefix: String,
    batches: usize,
    size: usize,
    handle: Option<&'static str>,
) -> anyhow::Result<Vec<Sent>> {
    let channel = tonic::transport::Endpoint::from_shared(producer)?
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy();
    let mut client = SidecarClient::new(channel);
    let mut out = Vec::new();
    for b in 0..batches {
        let batch: Vec<(String, String, String)> = (0..size)
            .map(|i| {
                let n = b * size + i;
                (
                    format!("{prefix}-{n:03}"),
                    format!("{prefix}-k{}", n % 16),
                    format!("plain-{prefix}-{n:03}"),
                )
            })
            .collect();
        let request = || pb::PublishRequest {
            topic: TOPIC.into(),
            messages: batch
                .iter()
                .map(|(id, key, value)| pb::Message {
                    id: id.clone(),
                    key: Some(key.clone().into_bytes().into()),
                    value: value.clone().into_bytes().into(),
                    headers: handle
                        .map(|h| pb::Header {
                            name: HANDLE_HEADER.into(),
                            value: h.as_bytes().to_vec().into(),
                        })
                        .into_iter()
                        .collect(),
                    partition: None,
                })
                .collect(),
        };
        let mut answers = Vec::new();
        for _ in 0..3 {
            let r = client.publish(request()).await;
            answers.push(publish_answer(&r));
            if r.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        out.extend(batch.into_iter().map(|(id, key, value)| Sent {
            id,
            key,
            value,
            handling: Handling::Plain,
            answers: answers.clone(),
        }));
    }
    Ok(out)
}

/// Stops `role` (SIGSTOP) for `d`, then lets it go on.
async fn stall(cluster: &Mutex<Cluster>, role: Role, d: Duration) -> anyhow::Result<()> {
    cluster.lock().await.pause(role)?;
    tokio::time::sleep(d).await;
    cluster.lock().await.resume(role)
}

/// Waits until every sent transaction is decided and the group has
/// consumed everything; `Some(what is left)` if that takes longer than
/// `bound`.
async fn settle(
    cluster: &Arc<Mutex<Cluster>>,
    sent: &[Sent],
    bound: Duration,
) -> anyhow::Result<Option<String>> {
    let deadline = Instant::now() + bound;
    let mut left = String::new();
    while Instant::now() < deadline {
        cluster.lock().await.revive()?;
        let url = cluster.lock().await.coordinators();
        match pending(&url, sent).await {
            Ok(None) => return Ok(None),
            Ok(Some(what)) => left = what,
            Err(e) => left = format!("coordinator not answering: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(Some(format!("after {bound:?}: {left}")))
}

/// What is still in flight: open transactions, consumer lag.
async fn pending(urls: &str, sent: &[Sent]) -> anyhow::Result<Option<String>> {
    let mut c = connect_any(urls).await?;
    let mut open = Vec::new();
    for s in sent {
        match c
            .get_transaction(pb::GetTransactionRequest {
                txn_id: s.id.clone(),
            })
            .await
        {
            Ok(t) if t.get_ref().state == pb::TransactionState::Prepared as i32 => {
                open.push(s.id.clone());
            }
            Ok(_) => {}
            Err(e) if e.code() == tonic::Code::NotFound => {}
            Err(e) => bail!("GetTransaction: {e}"),
        }
    }
    let (lag, short) = group_state(&mut c).await?;
    if open.is_empty() && lag == 0 && short.is_empty() {
        return Ok(None);
    }
    Ok(Some(format!(
        "{} open transactions {:?}, group lag {}{}",
        open.len(),
        open.iter().take(5).collect::<Vec<_>>(),
        if lag == u64::MAX {
            "unknown".into()
        } else {
            lag.to_string()
        },
        if short.is_empty() {
            String::new()
        } else {
            format!(", {}", short.join(", "))
        }
    )))
}

/// The consumer group's lag over both topics (`u64::MAX` if the group is
/// not there) and its members that lack credit. With nothing left to
/// deliver, every member has all its credit back: credit lost on the way (a
/// rebalance, a stopped pump) stalls a member for good once it reaches zero.
async fn group_state(
    c: &mut CoordinatorClient<tonic::transport::Channel>,
) -> anyhow::Result<(u64, Vec<String>)> {
    let mut lag = 0u64;
    let mut short = Vec::new();
    for topic in [TOPIC, OTHER_TOPIC] {
        let d = c
            .describe_topic(pb::DescribeTopicRequest { name: topic.into() })
            .await?
            .into_inner();
        let group = d.groups.iter().find(|g| g.group == GROUP);
        lag = lag.saturating_add(group.map_or(u64::MAX, |g| g.total_lag));
        short.extend(
            group
                .iter()
                .flat_map(|g| &g.member_info)
                .filter(|m| m.credit != u64::from(MAX_IN_FLIGHT))
                .map(|m| {
                    format!(
                        "{} ({topic}) has credit {} of {MAX_IN_FLIGHT}",
                        m.id, m.credit
                    )
                }),
        );
    }
    Ok((lag, short))
}

/// Watches the group for at most `within` after a rebalance storm: `None`
/// once it has nothing left to deliver and every member all its credit, or
/// if that cannot be told by then (the coordinator not answering, a slow
/// disk still draining). Credit is lost if members lack some for 3 s on
/// end while the group has nothing to deliver, or while its lag has not
/// moved for 20 s (a member left with no credit at all stalls).
async fn credit_lost_within(coordinator: &str, within: Duration) -> Option<String> {
    let deadline = Instant::now() + within;
    let mut last_lag = None;
    let mut lag_moved = Instant::now();
    let mut short_since: Option<Instant> = None;
    while Instant::now() < deadline {
        let state = match connect_any(coordinator).await {
            Ok(mut c) => group_state(&mut c).await.ok(),
            Err(_) => None,
        };
        if let Some((lag, short)) = state {
            if lag == 0 && short.is_empty() {
                return None;
            }
            if last_lag != Some(lag) {
                last_lag = Some(lag);
                lag_moved = Instant::now();
            }
            let stuck = lag == 0 || lag_moved.elapsed() >= Duration::from_secs(20);
            if stuck && !short.is_empty() {
                let since = *short_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= Duration::from_secs(3) {
                    return Some(format!("group lag {lag}, {}", short.join(", ")));
                }
            } else {
                short_since = None;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// Reads the history from what the processes left: the producer's business
/// rows, the topic and its dead letters as stored, the consumer's effects.
async fn gather(
    dir: &Path,
    logs: &[StoreLog],
    mut sent: Vec<Sent>,
    plain: Vec<Sent>,
    conflicts: Vec<Conflict>,
    stalled: Option<String>,
) -> anyhow::Result<History> {
    let orders =
        tandem_examples::db::open_sqlite(&dir.join("orders-app.db").display().to_string(), 2)
            .await?;
    let local_committed = sqlx::query_scalar::<_, String>("SELECT txn_id FROM business")
        .fetch_all(&orders)
        .await?
        .into_iter()
        .collect();
    let executions = sqlx::query_scalar::<_, String>("SELECT txn_id FROM executions ORDER BY seq")
        .fetch_all(&orders)
        .await?;
    orders.close().await;
    let cart =
        tandem_examples::db::open_sqlite(&dir.join("cart-app.db").display().to_string(), 2).await?;
    let effects =
        sqlx::query_as::<_, (String, String)>("SELECT topic, message_id FROM effects ORDER BY seq")
            .fetch_all(&cart)
            .await?
            .into_iter()
            .map(|(topic, id)| logical(&topic, &id))
            .collect();
    cart.close().await;

    let mut logged = Vec::new();
    let mut dead_letters = Vec::new();
    let mut ranges = Vec::new();
    let parts = logs
        .iter()
        .flat_map(|log| log.partitions().into_iter().map(move |tp| (log, tp)));
    for (log, tp) in parts {
        let offsets = log.offsets(&tp)?;
        let data = tp.topic == TOPIC || tp.topic == OTHER_TOPIC;
        let dlq = tp
            .topic
            .strip_suffix(".dlq")
            .filter(|t| *t == TOPIC || *t == OTHER_TOPIC);
        if data {
            ranges.push((
                tp.topic.clone(),
                tp.partition,
                offsets.log_start,
                offsets.high_water_mark,
            ));
        }
        let mut at = offsets.log_start;
        while at < offsets.high_water_mark {
            let batch = log.read(&tp, at, ReadBudget::default()).await?;
            let Some(last) = batch.last() else { break };
            at = last.offset + 1;
            for s in batch {
                let header = |name: &str| {
                    s.record
                        .headers
                        .iter()
                        .find(|h| h.name == name)
                        .map(|h| String::from_utf8_lossy(&h.value).into_owned())
                };
                let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                if data {
                    logged.push(Logged {
                        topic: tp.topic.clone(),
                        partition: tp.partition,
                        offset: s.offset,
                        id: logical(&tp.topic, &text(&s.record.id)),
                        key: logical(
                            &tp.topic,
                            &text(s.record.key.as_deref().unwrap_or_default()),
                        ),
                        value: text(&s.record.value),
                    });
                } else if let Some(topic) = dlq {
                    dead_letters.push((
                        logical(
                            topic,
                            &header("tandem.id").unwrap_or_else(|| text(&s.record.id)),
                        ),
                        header("tandem.error").unwrap_or_default(),
                    ));
                }
            }
        }
    }
    logged
        .sort_by(|a, b| (&a.topic, a.partition, a.offset).cmp(&(&b.topic, b.partition, b.offset)));
    let plain_ids = plain.iter().map(|p| p.id.clone()).collect();
    sent.extend(plain);
    Ok(History {
        sent,
        conflicts,
        local_committed,
        executions,
        plain: plain_ids,
        log: logged,
        effects,
        dead_letters,
        ranges,
        stalled,
        credit_lost: Vec::new(),
        consumer_app_stalled: false,
        sidecar_mode: false,
        uncertain: std::collections::BTreeSet::new(),
    })
}

/// Ids of the messages with a handler call whose outcome a consumer sidecar
/// could not know (it gave up past its handler timeout, or the app's
/// connection broke during the call), from the consumer sidecars' logs.
fn uncertain_calls(dir: &Path) -> std::collections::BTreeSet<String> {
    [Role::Cart1, Role::Cart2]
        .iter()
        .filter_map(|r| std::fs::read_to_string(dir.join(format!("{}.log", r.name()))).ok())
        .flat_map(|log| {
            log.lines()
                .filter(|l| {
                    l.contains("did not answer within handler_timeout_ms")
                        || l.contains("app unreachable") && !l.contains("code=Unavailable")
                })
                .filter_map(|l| {
                    let field = |name: &str| l.split(name).nth(1)?.split(' ').next();
                    Some(logical(field(" topic=")?, field(" id=")?))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_is_seeded_and_spreads() {
        let a: Vec<u64> = (0..5)
            .map({
                let mut r = Rng::new(7);
                move |_| r.below(100)
            })
            .collect();
        let b: Vec<u64> = (0..5)
            .map({
                let mut r = Rng::new(7);
                move |_| r.below(100)
            })
            .collect();
        assert_eq!(a, b, "same seed, same draws");
        let mut r = Rng::new(1);
        let mut hits = [0u32; 3];
        for _ in 0..3000 {
            hits[r.weighted(&[1, 1, 2])] += 1;
        }
        assert!(hits.iter().all(|&h| h > 500), "{hits:?}");
        assert!(hits[2] > hits[0], "{hits:?}");
    }

    #[test]
    fn code_names_are_grpc_style() {
        assert_eq!(code_name(tonic::Code::AlreadyExists), "ALREADY_EXISTS");
        assert_eq!(code_name(tonic::Code::Unknown), "UNKNOWN");
    }
}
