//! Real processes for the demo and the end-to-end tests: start one, learn the
//! address it listens on from its first line (`… listening on HOST:PORT`),
//! and stop it with SIGTERM or SIGKILL. A process is killed when its handle
//! is dropped, so nothing outlives its test. Standard error goes to a log
//! file next to the data, whose tail is printed if a test panics.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};

fn rx_of(
    m: &std::sync::Mutex<mpsc::Receiver<String>>,
) -> std::sync::MutexGuard<'_, mpsc::Receiver<String>> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A running child process.
pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
    /// Where it listens (`0.0.0.0:0` when on a Unix socket).
    pub addr: SocketAddr,
    /// Where it said it listens (`127.0.0.1:7410`, `unix:/run/s.sock`).
    pub listening: String,
    /// The lines of standard output after the one saying where it listens.
    lines: std::sync::Mutex<mpsc::Receiver<String>>,
    /// Its metrics URL, once read.
    metrics: std::sync::OnceLock<String>,
}

impl Process {
    /// Starts `bin args…` with `env`, logging standard error to
    /// `<log_dir>/<name>.log`, and waits (at most 30 s) for it to say where
    /// it listens.
    pub fn start(
        name: &str,
        bin: &Path,
        args: &[String],
        env: &[(&str, String)],
        log_dir: &Path,
    ) -> anyhow::Result<Process> {
        let log = log_dir.join(format!("{name}.log"));
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({})", bin.display()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("{name}: no stdout"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Read to the end, even when nobody listens any more: a child
            // printing into a closed pipe would fail.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut p = Process {
            name: name.to_owned(),
            child,
            log,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            listening: String::new(),
            lines: std::sync::Mutex::new(rx),
            metrics: std::sync::OnceLock::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx_of(&p.lines).recv_timeout(left) {
                Ok(l) => l,
                Err(_) => bail!("{name} did not start within 30 s; log:\n{}", p.log_tail()),
            };
            if let Some((_, addr)) = line.split_once(" listening on ") {
                p.listening = addr.trim().to_owned();
                if !p.listening.starts_with("unix:") {
                    p.addr = p
                        .listening
                        .parse()
                        .with_context(|| format!("{name} printed {line:?}"))?;
                } else {
                    p.addr = SocketAddr::from(([0, 0, 0, 0], 0));
                }
                return Ok(p);
            }
        }
    }

    /// The `http://…/metrics` URL it prints after where it listens (the
    /// coordinator and the sidecar do, unless `metrics_listen = off`),
    /// waiting up to 10 s for it the first time.
    pub fn metrics_url(&self) -> anyhow::Result<String> {
        if let Some(url) = self.metrics.get() {
            return Ok(url.clone());
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx_of(&self.lines)
                .recv_timeout(left)
                .map_err(|_| anyhow!("{} printed no metrics address", self.name))?;
            if let Some((_, url)) = line.split_once(" metrics on ") {
                return Ok(self.metrics.get_or_init(|| url.trim().to_owned()).clone());
            }
        }
    }

    /// The process's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `http://HOST:PORT` of its gRPC address.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Kills it with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits (at most `limit`) for it to exit.
    pub fn terminate(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        self.wait(limit)
    }

    /// Stops it (SIGSTOP): it keeps its sockets but does nothing.
    pub fn pause(&mut self) -> anyhow::Result<()> {
        self.signal("-STOP")
    }

    /// Lets a paused process go on (SIGCONT).
    pub fn resume(&mut self) -> anyhow::Result<()> {
        self.signal("-CONT")
    }

    fn signal(&mut self, sig: &str) -> anyhow::Result<()> {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args([sig, &pid]).status()?;
        if !status.success() {
            bail!("kill {sig} {} failed: {status}", self.name);
        }
        Ok(())
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True once it has exited.
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Waits (at most `limit`) for it to exit by itself.
    pub fn wait(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {limit:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- {} log (tail) ----\n{}", self.name, self.log_tail());
        }
    }
}
