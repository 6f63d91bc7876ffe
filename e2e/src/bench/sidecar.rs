//! What a sidecar adds to a call: an app publishes one message of 100 B
//! per call through a sidecar running as its own process (the `tandem`
//! binary's `sidecar` command), and, alternately at the same rates,
//! straight to the coordinator (in this process, embedded store, fsync
//! `always`). Peak: callers flat out each way; paced: the latency of each
//! call each way, and the sidecar process's CPU per call while paced.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use tandem_proto::coordinator as pb;
use tandem_proto::coordinator::coordinator_client::CoordinatorClient;
use tandem_proto::sidecar::sidecar_client::SidecarClient;
use tonic::transport::Channel;

use super::{Latencies, Pacing, Phase, Point, Window, micros_since};
use tandem_examples::process::Process;

/// The case through the sidecar.
pub const VIA: &str = "via the sidecar";
/// The case straight to the coordinator.
pub const DIRECT: &str = "direct to the coordinator";

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Length of each phase.
    pub seconds: Duration,
    /// Callers at peak, each one call at a time.
    pub workers: usize,
    /// The paced phases after the peaks (each rate run both ways).
    pub pacing: Pacing,
    /// Data of the coordinator and the sidecar, and the sidecar's log.
    pub dir: PathBuf,
    /// The `tandem` binary, whose `sidecar` command is started.
    pub exe: PathBuf,
    /// The sidecar's `worker_threads` setting.
    pub worker_threads: u32,
}

/// What one run measured.
#[derive(Clone, Debug)]
pub struct Report {
    /// Calls answered per second at peak through the sidecar, over the
    /// peak's last 80 %.
    pub via_peak_per_s: f64,
    /// The same straight to the coordinator.
    pub direct_peak_per_s: f64,
    /// The sidecar process's CPU per call at peak, µs.
    pub sidecar_cpu_us_at_peak: f64,
    /// Latency through the sidecar at each paced rate, the main one first.
    pub via: Vec<Point>,
    /// Latency straight to the coordinator at the same rates.
    pub direct: Vec<Point>,
    /// The sidecar process's CPU per call in each paced phase through it, µs.
    pub sidecar_cpu_us: Vec<f64>,
}

/// Runs the scenario; `label` names it on the progress bar.
pub async fn run(opts: &Options, label: &str) -> anyhow::Result<Report> {
    std::fs::create_dir_all(&opts.dir)?;
    let config = tandem_coordinator::Config {
        data_dir: opts.dir.join("coordinator"),
        ..Default::default()
    };
    let coordinator = super::LocalCoordinator::start(config).await?;
    let result = with_coordinator(opts, label, &coordinator.url).await;
    coordinator.stop().await;
    result
}

async fn with_coordinator(opts: &Options, label: &str, url: &str) -> anyhow::Result<Report> {
    CoordinatorClient::connect(url.to_owned())
        .await?
        .create_topic(pb::CreateTopicRequest {
            name: "bench".into(),
            partitions: 4,
        })
        .await
        .context("CreateTopic")?;
    let args: Vec<String> = [
        "sidecar",
        "--listen",
        "127.0.0.1:0",
        "--coordinator",
        url,
        "--service",
        "bench",
        "--set",
        "log=warn",
        "--set",
        &format!("worker_threads={}", opts.worker_threads),
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "--db".into(),
        opts.dir.join("sidecar.db").display().to_string(),
    ])
    .collect();
    let exe = opts.exe.clone();
    let dir = opts.dir.clone();
    let mut sidecar =
        tokio::task::spawn_blocking(move || Process::start("sidecar", &exe, &args, &[], &dir))
            .await?
            .context("starting the sidecar")?;
    let mut via = Caller::Sidecar(SidecarClient::connect(sidecar.url()).await?);
    let direct = Caller::Coordinator(CoordinatorClient::connect(url.to_owned()).await?);
    // warm-up: the first publish through the sidecar, once it reaches the
    // coordinator (at most 30 s)
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = via.publish(0).await {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no publish went through the sidecar within 30 s: {e:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let result = phases(opts, label, &sidecar, via, direct).await;
    let _ = tokio::task::spawn_blocking(move || sidecar.terminate(Duration::from_secs(10))).await;
    result
}

/// Where an app's publish goes.
#[derive(Clone)]
enum Caller {
    Sidecar(SidecarClient<Channel>),
    Coordinator(CoordinatorClient<Channel>),
}

impl Caller {
    async fn publish(&mut self, n: u64) -> anyhow::Result<()> {
        // each way its own ids: the coordinator drops a repeated id
        let way = match self {
            Caller::Sidecar(_) => 's',
            Caller::Coordinator(_) => 'd',
        };
        let request = pb::PublishRequest {
            topic: "bench".into(),
            messages: vec![pb::Message {
                id: format!("{way}-{n}"),
                key: Some(Bytes::from(format!("k{}", n % 64))),
                value: Bytes::from(vec![b'x'; 100]),
                headers: Vec::new(),
                partition: None,
            }],
        };
        match self {
            Caller::Sidecar(c) => c.publish(request).await.context("Publish (sidecar)")?,
            Caller::Coordinator(c) => c.publish(request).await.context("Publish")?,
        };
        Ok(())
    }
}

async fn phases(
    opts: &Options,
    label: &str,
    sidecar: &Process,
    via: Caller,
    direct: Caller,
) -> anyhow::Result<Report> {
    let cpu_before = cpu(sidecar);
    let (via_peak_per_s, via_calls) =
        peak(opts, &format!("{label}: peak via the sidecar"), &via).await?;
    let sidecar_cpu_us_at_peak = per_call(cpu_before, cpu(sidecar), via_calls);
    let (direct_peak_per_s, _) = peak(opts, &format!("{label}: peak direct"), &direct).await?;

    let latencies = Arc::new(Latencies::default());
    let epoch = Instant::now();
    let (mut via_points, mut direct_points, mut sidecar_cpu_us) =
        (Vec::new(), Vec::new(), Vec::new());
    for rate in opts.pacing.rates(via_peak_per_s) {
        let once = Pacing {
            rate: Some(rate),
            curve: false,
        };
        // the order alternates from one rate to the next
        let mut ways = [(DIRECT, &direct), (VIA, &via)];
        if via_points.len() % 2 == 1 {
            ways.reverse();
        }
        for (way, caller) in ways {
            let cpu_before = cpu(sidecar);
            let mut points = super::paced(
                &format!("{label}: {way}"),
                &once,
                via_peak_per_s,
                opts.seconds,
                &latencies,
                "calls",
                |n, due| {
                    let (mut c, latencies) = (caller.clone(), latencies.clone());
                    async move {
                        let began = super::micros_at(epoch, due);
                        c.publish(n).await?;
                        latencies.add(micros_since(epoch).saturating_sub(began));
                        Ok(())
                    }
                },
            )
            .await?;
            let point = points.pop().context("a paced phase measured nothing")?;
            if matches!(caller, Caller::Sidecar(_)) {
                sidecar_cpu_us.push(per_call(cpu_before, cpu(sidecar), point.sent));
                via_points.push(point);
            } else {
                direct_points.push(point);
            }
        }
    }
    Ok(Report {
        via_peak_per_s,
        direct_peak_per_s,
        sidecar_cpu_us_at_peak,
        via: via_points,
        direct: direct_points,
        sidecar_cpu_us,
    })
}

/// CPU µs per call between two readings (NaN when unknown).
fn per_call(before: Option<Duration>, after: Option<Duration>, calls: u64) -> f64 {
    match (before, after) {
        (Some(a), Some(b)) if calls > 0 => b.saturating_sub(a).as_micros() as f64 / calls as f64,
        _ => f64::NAN,
    }
}

/// Callers flat out for a phase: calls per second over its last 80 %, and
/// the calls made in all.
async fn peak(opts: &Options, label: &str, caller: &Caller) -> anyhow::Result<(f64, u64)> {
    let secs = opts.seconds;
    let answered = Arc::new(AtomicU64::new(0));
    let phase = Phase::start(label.to_owned(), secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..opts.workers {
        let (mut c, answered) = (caller.clone(), answered.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = (w as u64) << 32;
            while start.elapsed() < secs {
                n += 1;
                c.publish(n).await?;
                answered.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(secs / 5).await;
    let window = Window::open(&answered);
    for t in tasks {
        t.await??;
    }
    let rate = window.rate(&answered);
    phase.end().await;
    Ok((rate, answered.load(Ordering::Relaxed)))
}

/// CPU time `p` has used so far (user and system, all threads), from
/// `/proc`; `None` where that cannot be read.
fn cpu(p: &Process) -> Option<Duration> {
    super::cpu_of(&format!("/proc/{}/stat", p.pid()))
}
