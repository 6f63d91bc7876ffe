//! A private PostgreSQL server for fault runs that restart it: initialised
//! in a folder of its own (removed when it stops) from the binaries of
//! Debian's packages
//! (`/usr/lib/postgresql/<version>/bin`, which `scripts/test.sh` installs),
//! listening on a loopback ephemeral port, stopped when dropped. As root it
//! runs as the `postgres` account the package creates (PostgreSQL refuses
//! to run as root).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// A running PostgreSQL server.
pub struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    dir: PathBuf,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    as_postgres: bool,
    fsync: bool,
}

fn newest_bin() -> anyhow::Result<PathBuf> {
    let mut found: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL's binaries are not installed (/usr/lib/postgresql); scripts/test.sh installs them")?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let version = e
                .file_name()
                .to_string_lossy()
                .split('.')
                .map(|p| p.parse().ok())
                .collect::<Option<Vec<u32>>>()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, b)| b)
        .context("no PostgreSQL version with initdb under /usr/lib/postgresql")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Postgres {
    /// Initialises a server under `dir` and starts it with `fsync = off`
    /// (fault runs: a restart of the server is a crash of the process, not
    /// a power cut, so its syncs only cost time).
    pub fn start(dir: &Path) -> anyhow::Result<Postgres> {
        Postgres::start_with(dir, false)
    }

    /// Initialises a server under `dir` and starts it with the defaults of
    /// `initdb` (`fsync = on`, `synchronous_commit = on`): benchmarks.
    pub fn start_durable(dir: &Path) -> anyhow::Result<Postgres> {
        Postgres::start_with(dir, true)
    }

    fn start_with(dir: &Path, fsync: bool) -> anyhow::Result<Postgres> {
        let bin = newest_bin()?;
        std::fs::create_dir_all(dir)?;
        // The effective user, from `id -u`.
        let uid = Command::new("id").arg("-u").output()?;
        let as_postgres = String::from_utf8_lossy(&uid.stdout).trim() == "0";
        if as_postgres {
            let status = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(dir)
                .status()?;
            if !status.success() {
                bail!("cannot give {} to the postgres account", dir.display());
            }
        }
        let pg = Postgres {
            bin,
            data: dir.join("data"),
            dir: dir.to_owned(),
            port: free_port()?,
            as_postgres,
            fsync,
        };
        let data = pg.data.display().to_string();
        pg.run("initdb", &["-D", &data, "-A", "trust", "-U", "tandem"])?;
        pg.pg_ctl(&["start", "-w"])?;
        Ok(pg)
    }

    fn command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn run(&self, tool: &str, args: &[&str]) -> anyhow::Result<()> {
        let out = self
            .command(tool)
            .args(args)
            .output()
            .with_context(|| format!("running {tool}"))?;
        if !out.status.success() {
            bail!(
                "{tool} {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn pg_ctl(&self, what: &[&str]) -> anyhow::Result<()> {
        let data = self.data.display().to_string();
        let log = self.dir.join("postgres.log").display().to_string();
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync={} -c max_connections=200",
            self.port,
            self.dir.display(),
            if self.fsync { "on" } else { "off" }
        );
        let mut args = vec!["-D", &data, "-l", &log, "-o", &options];
        args.extend_from_slice(what);
        self.run("pg_ctl", &args)
    }

    /// The URL of database `db` on it.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://tandem@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `name`.
    pub async fn create_database(&self, name: &str) -> anyhow::Result<String> {
        Ok(tandem_storage::PgStore::create_database(&self.url("postgres"), name).await?)
    }

    /// Crashes the server (`-m immediate`: no checkpoint, as a killed
    /// server) and starts it again.
    pub fn restart_immediate(&self) -> anyhow::Result<()> {
        self.pg_ctl(&["restart", "-m", "immediate", "-w"])
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["stop", "-m", "immediate"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
