//! The benchmark scenarios behind `tandem bench`: transactional messages
//! through Tandem ([`txn`]) with the services' tables nowhere, on SQLite or
//! on PostgreSQL, the hand-written PostgreSQL outbox they are measured
//! against ([`outbox`]), one empty gRPC call ([`unary`]), the floor each
//! hop of a transaction pays, sagas ([`saga`]), publish → consume
//! ([`pubsub`]) and a publish through a sidecar process beside one straight
//! to the coordinator ([`sidecar`]); each in a peak phase (clients flat out) and paced phases
//! (latency from the start of a transaction to its applied effect). Beside
//! them, the embedded log's appends against raw writes and syncs
//! ([`append`]) and a restart with many open transactions ([`restart`]).

pub mod append;
pub mod outbox;
pub mod pubsub;
pub mod restart;
pub mod saga;
pub mod sidecar;
pub mod txn;
pub mod unary;

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tandem_proto::coordinator as pb;
use tandem_proto::coordinator::coordinator_client::CoordinatorClient;

static DATABASES: AtomicU64 = AtomicU64::new(0);

/// A database name no other bench of this or another run uses.
fn database_name(prefix: &str) -> String {
    format!(
        "tandem_bench_{prefix}_{}_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        DATABASES.fetch_add(1, Ordering::Relaxed)
    )
}

/// A fresh database on the PostgreSQL server of `url` (any of its
/// databases), as a coordinator store.
pub async fn fresh_store(url: &str) -> tandem_coordinator::Store {
    tandem_coordinator::Store::Postgres {
        url: fresh_database(url, "store")
            .await
            .expect("create the bench database"),
    }
}

/// Creates a fresh database on the PostgreSQL server of `url` (any of its
/// databases) and returns its URL.
pub async fn fresh_database(url: &str, prefix: &str) -> anyhow::Result<String> {
    let name = database_name(prefix);
    tandem_storage::PgStore::create_database(url, &name)
        .await
        .with_context(|| format!("creating database {name}"))
}

/// Drops the database of `url` (made by [`fresh_database`]); errors are
/// ignored, a left-over database only takes space.
pub async fn drop_database(url: &str) {
    let Some((server, name)) = url.rsplit_once('/') else {
        return;
    };
    let admin = format!("{server}/postgres");
    if let Ok(pool) = sqlx::PgPool::connect(&admin).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
        )))
        .execute(&pool)
        .await;
        pool.close().await;
    }
}

/// A coordinator serving in this process on a loopback port.
pub struct LocalCoordinator {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Its embedded store's fdatasync count (`None` on PostgreSQL).
    pub syncs: Option<tandem_storage::SyncCounter>,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<tandem_coordinator::Result<()>>,
}

impl LocalCoordinator {
    /// Opens a coordinator with `config` and waits until it serves.
    pub async fn start(config: tandem_coordinator::Config) -> anyhow::Result<LocalCoordinator> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let coordinator = tandem_coordinator::Coordinator::open(config)
            .await
            .context("opening the coordinator")?;
        let syncs = coordinator.sync_counter();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(coordinator.serve(listener, async {
            let _ = stopped.await;
        }));
        wait_serving(&url).await;
        Ok(LocalCoordinator {
            url,
            syncs,
            stop,
            server,
        })
    }

    /// Shuts it down and waits until it has.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.server.await;
    }
}

/// Waits until the coordinator at `url` serves (on PostgreSQL: holds the
/// lease), at most 30 s.
pub async fn wait_serving(url: &str) {
    for _ in 0..3000 {
        if let Ok(mut c) = CoordinatorClient::connect(url.to_owned()).await
            && c.list_topics(pb::ListTopicsRequest {}).await.is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the coordinator at {url} did not serve within 30 s");
}

/// Latencies in microseconds, gathered from many tasks.
#[derive(Default)]
pub struct Latencies {
    samples: std::sync::Mutex<Vec<u64>>,
    on: AtomicBool,
}

impl Latencies {
    /// Drops the samples kept so far and keeps the ones that follow.
    pub fn restart(&self) {
        self.samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
        self.on.store(true, Ordering::Relaxed);
    }

    /// Keeps `micros` if started.
    pub fn add(&self, micros: u64) {
        if self.on.load(Ordering::Relaxed) {
            self.samples
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(micros);
        }
    }

    /// How many samples are kept.
    pub fn len(&self) -> usize {
        self.samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Whether no sample is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The samples' percentiles.
    pub fn summary(&self) -> Percentiles {
        let mut v = self
            .samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        v.sort_unstable();
        let at = |p: f64| {
            if v.is_empty() {
                f64::NAN
            } else {
                v[((v.len() as f64 - 1.0) * p).round() as usize] as f64 / 1000.0
            }
        };
        Percentiles {
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            max_ms: at(1.0),
            samples: v.len(),
        }
    }
}

/// Latency percentiles of a paced phase.
#[derive(Clone, Copy, Debug)]
pub struct Percentiles {
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Largest sample, ms.
    pub max_ms: f64,
    /// Number of samples.
    pub samples: usize,
}

/// Microseconds since `epoch`, as carried in messages and rows.
pub fn micros_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_micros() as u64
}

/// Microseconds from `epoch` to `at`.
pub fn micros_at(epoch: Instant, at: Instant) -> u64 {
    at.saturating_duration_since(epoch).as_micros() as u64
}

/// A counter read twice to give a rate over a window.
pub struct Window {
    count: u64,
    at: Instant,
}

impl Window {
    /// Opens a window on `counter` now.
    pub fn open(counter: &AtomicU64) -> Window {
        Window {
            count: counter.load(Ordering::Relaxed),
            at: Instant::now(),
        }
    }

    /// Events per second of `counter` since the window opened.
    pub fn rate(&self, counter: &AtomicU64) -> f64 {
        (counter.load(Ordering::Relaxed) - self.count) as f64 / self.at.elapsed().as_secs_f64()
    }
}

/// CPU time this process has used (user and system, all threads), from
/// `/proc/self/stat`; `None` where that cannot be read.
pub fn process_cpu() -> Option<Duration> {
    cpu_of("/proc/self/stat")
}

/// CPU time (user and system, all threads) of the process whose `stat`
/// file is at `path`; `None` where that cannot be read.
pub fn cpu_of(path: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces), from field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
    // utime and stime are fields 14 and 15, in USER_HZ (100 per second).
    let total = ticks(11)? + ticks(12)?;
    Some(Duration::from_millis(total * 10))
}

/// CPU time per event of a counter over a window: the process's CPU used
/// since it opened over the events counted meanwhile.
pub struct CpuWindow {
    cpu: Option<Duration>,
    count: u64,
}

impl CpuWindow {
    /// Opens a window on `counter` now.
    pub fn open(counter: &AtomicU64) -> CpuWindow {
        CpuWindow {
            cpu: process_cpu(),
            count: counter.load(Ordering::Relaxed),
        }
    }

    /// Microseconds of CPU per event of `counter` since the window opened
    /// (NaN when unknown).
    pub fn micros_per_event(&self, counter: &AtomicU64) -> f64 {
        let events = counter.load(Ordering::Relaxed).saturating_sub(self.count);
        match (self.cpu, process_cpu()) {
            (Some(a), Some(b)) if events > 0 => {
                b.saturating_sub(a).as_micros() as f64 / events as f64
            }
            _ => f64::NAN,
        }
    }
}

/// Waits until `counter` reaches `target`, at most `limit`; says whether it
/// did.
pub async fn wait_for(counter: &AtomicU64, target: u64, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while counter.load(Ordering::Relaxed) < target {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

/// Which paced phases a scenario runs after its peak.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pacing {
    /// The main paced phase's rate; `None`: half the scenario's own peak.
    pub rate: Option<f64>,
    /// Also run paced phases at 10, 25, 75 and 90 % of the peak, for a
    /// throughput/latency curve.
    pub curve: bool,
}

impl Pacing {
    /// The rates to run at given the peak, the main phase's first.
    pub fn rates(&self, peak: f64) -> Vec<f64> {
        let mut rates = vec![self.rate.unwrap_or(peak / 2.0)];
        if self.curve {
            rates.extend([0.1, 0.25, 0.75, 0.9].map(|f| peak * f));
        }
        rates.into_iter().map(|r| r.max(1.0)).collect()
    }
}

/// The latency measured in one paced phase.
#[derive(Clone, Copy, Debug)]
pub struct Point {
    /// The rate the phase offered, per second.
    pub rate: f64,
    /// Calls (or transactions) it started.
    pub sent: u64,
    /// Its latencies.
    pub latency: Percentiles,
    /// How late the pacer started its calls after they were due (part of
    /// `latency`); `None` where no pacer started them.
    pub late: Option<Percentiles>,
}

/// Every paced phase of `pacing` after a peak of `peak` per second: at each
/// rate, starts `one(n, at)` at that rate for `secs` (under a progress bar
/// labelled `label`), waits for every one, then for `latencies` to hold a
/// sample of each, at most 120 s (`what` names them in the error if they do
/// not). `at` is when the call was due: latencies are taken from it, so
/// that a call the pacer or the in-flight bound held back counts its wait.
/// Each phase's `n` are new: no two phases of a run share one.
pub async fn paced<F, Fut>(
    label: &str,
    pacing: &Pacing,
    peak: f64,
    secs: Duration,
    latencies: &Latencies,
    what: &str,
    mut one: F,
) -> anyhow::Result<Vec<Point>>
where
    F: FnMut(u64, Instant) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut points = Vec::new();
    for rate in pacing.rates(peak) {
        let base = PACED_PHASES.fetch_add(1, Ordering::Relaxed) << 40;
        latencies.restart();
        let phase = Phase::start(format!("{label}: paced at {rate:.0}/s"), secs);
        let start = Instant::now();
        let (dues, mut due_rx) = tokio::sync::mpsc::unbounded_channel();
        let pacer = pacer(start, rate, secs, dues);
        let late = Latencies::default();
        late.restart();
        let mut sent = 0u64;
        let mut tasks = tokio::task::JoinSet::new();
        let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
        while let Some(due) = due_rx.recv().await {
            // Calls the in-flight bound held back past the phase's end are
            // not sent (dropping the receiver ends the pacer).
            if start.elapsed() >= secs {
                break;
            }
            sent += 1;
            let permit = in_flight.clone().acquire_owned().await?;
            late.add(micros_at(due, Instant::now()));
            let call = one(base + sent, due);
            tasks.spawn(async move {
                let r = call.await;
                drop(permit);
                r
            });
            // answered ones are reaped as they go
            while let Some(t) = tasks.try_join_next() {
                t??;
            }
        }
        drop(due_rx);
        let _ = pacer.join();
        // what was offered: below `rate` when MAX_IN_FLIGHT held it back
        let offered = sent as f64 / start.elapsed().as_secs_f64();
        while let Some(t) = tasks.join_next().await {
            t??;
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while latencies.len() < sent as usize && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        phase.end().await;
        anyhow::ensure!(
            latencies.len() >= sent as usize,
            "{} of {sent} paced {what} were applied within 120 s",
            latencies.len()
        );
        points.push(Point {
            rate: offered.min(rate),
            sent,
            latency: latencies.summary(),
            late: Some(late.summary()),
        });
    }
    Ok(points)
}

/// Sends, from a thread of its own, when each call of a paced phase is
/// due, `rate` per second for `secs` from `start`, until the receiver
/// goes. A thread's sleep wakes within tens of µs; a timer of the runtime
/// the servers share rounds up to its 1 ms tick, and that wait would be
/// counted as the servers' latency. (The calls still start on that
/// runtime: waking the task that starts them is part of `late`.)
fn pacer(
    start: Instant,
    rate: f64,
    secs: Duration,
    dues: tokio::sync::mpsc::UnboundedSender<Instant>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for n in 0u64.. {
            let after = Duration::from_secs_f64(n as f64 / rate);
            if after >= secs {
                break;
            }
            let due = start + after;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if dues.send(due).is_err() {
                break;
            }
        }
    })
}

/// Calls a paced phase keeps in flight at most, as a client's pool would:
/// past it the phase offers less than its rate (and says so in its point)
/// instead of opening streams without bound until the server gives up on
/// the connection.
const MAX_IN_FLIGHT: usize = 2048;

/// Paced phases started in this process: each phase's numbers start at
/// its count times 2^40, above the peak phases' (worker index times 2^32,
/// for fewer than 256 workers).
static PACED_PHASES: AtomicU64 = AtomicU64::new(1);

/// A progress bar on standard error for one phase of a scenario, drawn
/// while it lives when standard error is a terminal (one line per phase
/// otherwise).
pub struct Phase {
    stop: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Phase {
    /// Shows `label`, expected to take `length`.
    pub fn start(label: String, length: Duration) -> Phase {
        let stop = Arc::new(AtomicBool::new(false));
        if !std::io::stderr().is_terminal() {
            eprintln!("{label} ({:.0} s)", length.as_secs_f64());
            return Phase { stop, task: None };
        }
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let start = Instant::now();
            const WIDTH: usize = 30;
            while !flag.load(Ordering::Relaxed) {
                let done = (start.elapsed().as_secs_f64() / length.as_secs_f64()).min(1.0);
                let filled = (done * WIDTH as f64) as usize;
                {
                    let mut err = std::io::stderr().lock();
                    let _ = write!(
                        err,
                        "\r\x1b[2K{label} [{}{}] {:.1}/{:.0} s",
                        "#".repeat(filled),
                        " ".repeat(WIDTH - filled),
                        start.elapsed().as_secs_f64(),
                        length.as_secs_f64()
                    );
                    let _ = err.flush();
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
        });
        Phase {
            stop,
            task: Some(task),
        }
    }

    /// Ends the phase and clears its bar.
    pub async fn end(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Phase {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
