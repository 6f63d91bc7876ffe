//! Sidecar settings, layered like the coordinator's: defaults, then the
//! TOML file (`--config`), then `TANDEM_SIDECAR_<KEY>` environment
//! variables, then flags. Unknown keys are errors.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use tandem_runtime::settings::{ConfigError, Kind, Layers, Setting};
use tandem_storage::CronSchedule;

/// Command-line flags of `tandem-sidecar` (and `tandem sidecar`).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct SidecarArgs {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address the app calls [default: 127.0.0.1:7410].
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// The coordinator: one URL, or several replicas' URLs separated by
    /// commas; a host name stands for every address it resolves to
    /// [default: http://127.0.0.1:7400].
    #[arg(long, value_name = "URL[,URL…]")]
    pub coordinator: Option<String>,
    /// Name of the service this sidecar serves [default: app].
    #[arg(long, value_name = "NAME")]
    pub service: Option<String>,
    /// The app's callback server (ExecuteLocalTransaction, CheckLocalTransaction, HandleMessage).
    #[arg(long, value_name = "URL")]
    pub app: Option<String>,
    /// The app's database for Tandem's tables: a SQLite file (default ./tandem-sidecar.db) or postgres://….
    #[arg(long, value_name = "URL")]
    pub db: Option<String>,
    /// Any setting of the file, as KEY=VALUE (repeatable; --help lists them).
    #[arg(long = "set", value_name = "KEY=VALUE", long_help = tandem_runtime::settings::set_help("TANDEM_SIDECAR_", KEYS))]
    pub set: Vec<String>,
}

const KEYS: &[Setting] = &[
    Setting {
        key: "listen",
        kind: Kind::Str,
        default: Some("127.0.0.1:7410"),
        help: "gRPC address the app calls, HOST:PORT (an IP address or a host name), or unix:PATH (a Unix socket)",
    },
    Setting {
        key: "coordinator",
        kind: Kind::Str,
        default: Some("http://127.0.0.1:7400"),
        help: "the coordinator's URL, or several replicas' URLs separated by commas",
    },
    Setting {
        key: "service",
        kind: Kind::Str,
        default: Some("app"),
        help: "the service this sidecar acts for",
    },
    Setting {
        key: "app",
        kind: Kind::Str,
        default: None,
        help: "the app's callback server (ExecuteLocalTransaction, CheckLocalTransaction, HandleMessage) [default: none: no callbacks]",
    },
    Setting {
        key: "db",
        kind: Kind::Str,
        default: Some("./tandem-sidecar.db"),
        help: "the app's database for Tandem's tables: a SQLite file or postgres://...",
    },
    Setting {
        key: "instance",
        kind: Kind::Str,
        default: None,
        help: "names this instance in the coordinator's logs [default: HOSTNAME-pid]",
    },
    Setting {
        key: "callback_timeout_ms",
        kind: Kind::Int,
        default: Some("10000"),
        help: "how long ExecuteLocalTransaction and CheckLocalTransaction may take",
    },
    Setting {
        key: "handler_timeout_ms",
        kind: Kind::Int,
        default: Some("30000"),
        help: "how long HandleMessage may take before the attempt counts as failed (at most 285000)",
    },
    Setting {
        key: "retention_ms",
        kind: Kind::Int,
        default: Some("604800000"),
        help: "dedup rows and rollback markers older than this are deleted",
    },
    Setting {
        key: "cleanup_schedule",
        kind: Kind::Str,
        default: Some("17 * * * *"),
        help: "when that cleanup runs (cron)",
    },
    tandem_runtime::settings::LOG,
    tandem_runtime::settings::LOG_FORMAT,
    tandem_runtime::settings::METRICS_LISTEN,
    tandem_runtime::telemetry::OTLP_ENDPOINT,
    Setting {
        key: "tls_cert",
        kind: Kind::Str,
        default: None,
        help: "PEM certificate chain this sidecar presents to the coordinator (with tls_key and tls_ca: mutual TLS, https:// URLs); its URI or DNS SAN must name the service",
    },
    Setting {
        key: "tls_key",
        kind: Kind::Str,
        default: None,
        help: "PEM private key of tls_cert",
    },
    Setting {
        key: "tls_ca",
        kind: Kind::Str,
        default: None,
        help: "PEM CA bundle that signs the coordinator's certificate",
    },
    Setting {
        key: "coordinator_identity",
        kind: Kind::Str,
        default: None,
        help: "a coordinator certificate naming this full id (its URI or DNS SAN) is accepted whatever address was dialled [default: the id of the first coordinator certificate verified by the host dialled]",
    },
    Setting {
        key: "allow_remote_app",
        kind: Kind::Str,
        default: Some("false"),
        help: "true: listen and app may be addresses other than loopback (the app hop is plaintext: only on a network you trust)",
    },
    Setting {
        key: "worker_threads",
        kind: Kind::Int,
        default: Some("1"),
        help: "async runtime threads of a sidecar process (0: one per CPU)",
    },
];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    listen: Option<String>,
    coordinator: Option<String>,
    service: Option<String>,
    app: Option<String>,
    db: Option<String>,
    instance: Option<String>,
    callback_timeout_ms: Option<u64>,
    handler_timeout_ms: Option<u64>,
    retention_ms: Option<u64>,
    cleanup_schedule: Option<String>,
    log: Option<String>,
    log_format: Option<String>,
    metrics_listen: Option<String>,
    otlp_endpoint: Option<String>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    tls_ca: Option<String>,
    coordinator_identity: Option<String>,
    allow_remote_app: Option<String>,
    worker_threads: Option<u64>,
}

/// What a member needs beyond one handler call to finish with a partition
/// being moved: recording the dedup row, a dead letter, the acknowledgement.
const REVOKE_MARGIN: Duration = Duration::from_secs(15);
/// The coordinator's upper bound of a member's revoke timeout, less the margin.
const MAX_HANDLER_TIMEOUT_MS: u64 = 300_000 - 15_000;

/// Runtime threads of a sidecar unless set: a sidecar serves one app, and
/// one thread spares the CPU that waking a second costs on every call
/// (measured with `tandem bench sidecar`: see BENCHMARKS.md).
const DEFAULT_WORKER_THREADS: u64 = 1;

/// Where the sidecar serves its app.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address (loopback unless `allow_remote_app`).
    Tcp(SocketAddr),
    /// A Unix domain socket (`unix:PATH`).
    Unix(PathBuf),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// The checked sidecar settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the app calls.
    pub listen: Listen,
    /// The coordinator replicas' URLs (one for a single coordinator).
    pub coordinator: Vec<String>,
    /// The service this sidecar serves; it owns the transactions it starts.
    pub service: String,
    /// The app's callback server, if it has one.
    pub app: Option<String>,
    /// Database URL for Tandem's tables.
    pub db: String,
    /// Names this instance in the coordinator's logs.
    pub instance: String,
    /// How long ExecuteLocalTransaction and CheckLocalTransaction may take.
    pub callback_timeout: Duration,
    /// How long HandleMessage may take before the attempt counts as failed.
    pub handler_timeout: Duration,
    /// Dedup rows and rollback markers older than this are deleted.
    pub retention: Duration,
    /// When that cleanup runs.
    pub cleanup_schedule: CronSchedule,
    /// Log filter (`tracing` env-filter syntax).
    pub log_filter: String,
    /// Log lines as text or JSON.
    pub log_format: tandem_runtime::LogFormat,
    /// Where `run` serves Prometheus metrics (`None`: nowhere).
    pub metrics_listen: Option<SocketAddr>,
    /// The OTLP collector traces go to (`None`: the standard
    /// `OTEL_EXPORTER_OTLP_*` variables, if set).
    pub otlp_endpoint: Option<String>,
    /// Threads of the async runtime; `None`: one per CPU.
    pub worker_threads: Option<usize>,
    /// Mutual TLS to the coordinator (`None`: plaintext).
    pub tls: Option<tandem_runtime::tls::TlsFiles>,
    /// A coordinator certificate naming this is accepted at any address.
    pub coordinator_identity: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Raw::default().check().expect("the defaults are valid")
    }
}

impl Config {
    /// The async runtime the sidecar runs on, with its `worker_threads`.
    pub fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.enable_all();
        if let Some(n) = self.worker_threads {
            builder.worker_threads(n);
        }
        builder.build()
    }

    /// The revoke timeout this sidecar asks for when it joins a group:
    /// longer than any handler call, so a slow but legal handler is never
    /// expelled mid-call (and its partition never handled twice at once).
    pub fn revoke_timeout(&self) -> Duration {
        self.handler_timeout + REVOKE_MARGIN
    }

    /// Loads the settings: defaults, `--config`, `TANDEM_SIDECAR_*` from
    /// `env`, then the flags.
    pub fn load(
        args: &SidecarArgs,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let flags = [
            ("listen", args.listen.clone()),
            ("coordinator", args.coordinator.clone()),
            ("service", args.service.clone()),
            ("app", args.app.clone()),
            ("db", args.db.clone()),
        ];
        Layers {
            file: args.config.as_deref(),
            env_prefix: "TANDEM_SIDECAR_",
            keys: KEYS,
            flags: &flags,
            sets: &args.set,
            not_settings: &[],
        }
        .resolve::<Raw>(env)?
        .check()
    }
}

fn url(key: &'static str, v: String) -> Result<String, ConfigError> {
    let socket = key == "app" && tandem_runtime::unix::socket_path(&v).is_some();
    if v.starts_with("http://") || v.starts_with("https://") || socket {
        Ok(v)
    } else {
        Err(ConfigError::invalid(
            key,
            &v,
            if key == "app" {
                "expected an http:// URL or unix:PATH"
            } else {
                "expected an http:// or https:// URL"
            },
        ))
    }
}

/// Whether an `http://` URL's host is a loopback address or `localhost`,
/// or the URL names a Unix socket.
fn loopback_url(url: &str) -> bool {
    if tandem_runtime::unix::socket_path(url).is_some() {
        return true;
    }
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => authority,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Raw {
    fn check(self) -> Result<Config, ConfigError> {
        let invalid = ConfigError::invalid;
        let listen_s = self.listen.unwrap_or_else(|| "127.0.0.1:7410".into());
        let listen = match tandem_runtime::unix::socket_path(&listen_s) {
            Some(path) => Listen::Unix(path),
            None => Listen::Tcp(tandem_runtime::settings::listen_address(
                "listen", &listen_s,
            )?),
        };
        let service = self.service.unwrap_or_else(|| "app".into());
        tandem_runtime::check_id("service", &service)
            .map_err(|e| invalid("service", &service, &e.to_string()))?;
        let ms = |key: &'static str, v: Option<u64>, default: u64, min: u64, max: u64| {
            let v = v.unwrap_or(default);
            if (min..=max).contains(&v) {
                Ok(Duration::from_millis(v))
            } else {
                Err(invalid(
                    key,
                    &v,
                    &format!("must be between {min} and {max}"),
                ))
            }
        };
        let schedule_s = self.cleanup_schedule.unwrap_or_else(|| "17 * * * *".into());
        let cleanup_schedule = schedule_s.parse().map_err(|e: tandem_storage::Error| {
            invalid("cleanup_schedule", &schedule_s, &e.to_string())
        })?;
        let instance = self.instance.unwrap_or_else(|| {
            format!(
                "{}-{}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into()),
                std::process::id()
            )
        });
        let tls = tandem_runtime::tls::TlsFiles::from_settings(
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.tls_ca.as_deref(),
            ["tls_cert", "tls_key", "tls_ca"],
        )
        .map_err(|e| ConfigError::Parse {
            origin: "settings".into(),
            message: e.to_string(),
        })?;
        let coordinator = self
            .coordinator
            .unwrap_or_else(|| "http://127.0.0.1:7400".into())
            .split(',')
            .map(|u| url("coordinator", u.trim().to_owned()))
            .collect::<Result<Vec<_>, _>>()?;
        for u in &coordinator {
            tandem_runtime::tls::check_scheme("coordinator", u, tls.is_some())
                .map_err(|e| invalid("coordinator", u, &e.to_string()))?;
        }
        let allow_remote_app = match self.allow_remote_app.as_deref().map(str::trim) {
            None | Some("false") => false,
            Some("true") => true,
            Some(v) => return Err(invalid("allow_remote_app", &v, "expected true or false")),
        };
        let app = self.app.map(|a| url("app", a)).transpose()?;
        if !allow_remote_app {
            if matches!(listen, Listen::Tcp(a) if !a.ip().is_loopback()) {
                return Err(invalid(
                    "listen",
                    &listen_s,
                    "the app's calls are plaintext: listen on a loopback address (127.0.0.1, [::1]) or a Unix socket (unix:PATH), or set allow_remote_app = true on a network you trust",
                ));
            }
            if let Some(a) = &app
                && !loopback_url(a)
            {
                return Err(invalid(
                    "app",
                    a,
                    "callbacks are plaintext: the app must be on a loopback address (127.0.0.1, [::1], localhost) or a Unix socket (unix:PATH), or set allow_remote_app = true on a network you trust",
                ));
            }
        }
        Ok(Config {
            listen,
            coordinator,
            app,
            tls,
            coordinator_identity: self.coordinator_identity.filter(|v| !v.trim().is_empty()),
            db: self.db.unwrap_or_else(|| "./tandem-sidecar.db".into()),
            instance,
            service,
            callback_timeout: ms(
                "callback_timeout_ms",
                self.callback_timeout_ms,
                10_000,
                10,
                600_000,
            )?,
            handler_timeout: ms(
                "handler_timeout_ms",
                self.handler_timeout_ms,
                30_000,
                10,
                MAX_HANDLER_TIMEOUT_MS,
            )
            .map_err(|_| {
                invalid(
                    "handler_timeout_ms",
                    &self.handler_timeout_ms.unwrap_or_default(),
                    &format!(
                        "must be between 10 and {MAX_HANDLER_TIMEOUT_MS}: a member may hold a partition being moved for at most 300000 ms, and needs {} ms beyond its handler timeout to finish",
                        REVOKE_MARGIN.as_millis()
                    ),
                )
            })?,
            retention: ms(
                "retention_ms",
                self.retention_ms,
                7 * 24 * 3_600_000,
                60_000,
                365 * 24 * 3_600_000,
            )?,
            cleanup_schedule,
            // sqlx's notices ("relation already exists, skipping" at every
            // start) are not worth an operator's attention.
            log_filter: tandem_runtime::logging::filter_setting(self.log, "info,sqlx=warn")?,
            log_format: tandem_runtime::LogFormat::from_setting(self.log_format.as_deref())?,
            metrics_listen: tandem_runtime::metrics::listen_setting(
                "metrics_listen",
                self.metrics_listen.as_deref(),
                "127.0.0.1:0",
            )?,
            otlp_endpoint: self.otlp_endpoint.filter(|e| !e.trim().is_empty()),
            worker_threads: match self.worker_threads.unwrap_or(DEFAULT_WORKER_THREADS) {
                0 => None,
                n @ 1..=256 => Some(n as usize),
                n => {
                    return Err(invalid(
                        "worker_threads",
                        &n,
                        "must be between 0 (one per CPU) and 256",
                    ));
                }
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each default `--help` shows is the one the sidecar uses: setting it
    /// changes nothing.
    #[test]
    fn the_defaults_help_shows_are_the_defaults() -> Result<(), ConfigError> {
        let load = |set: Vec<String>| {
            let args = SidecarArgs {
                set,
                ..SidecarArgs::default()
            };
            Config::load(&args, Vec::new()).map(|c| format!("{c:?}"))
        };
        let plain = load(Vec::new())?;
        for s in KEYS {
            if let Some(d) = s.default {
                assert_eq!(load(vec![format!("{}={d}", s.key)])?, plain, "{}", s.key);
            }
        }
        Ok(())
    }

    #[test]
    fn defaults_suit_a_local_run_and_flags_win() -> Result<(), ConfigError> {
        let c = Config::default();
        assert_eq!(c.listen.to_string(), "127.0.0.1:7410");
        assert_eq!(c.coordinator, vec!["http://127.0.0.1:7400".to_owned()]);
        assert_eq!(c.app, None);
        let args = SidecarArgs {
            service: Some("orders".into()),
            app: Some("http://127.0.0.1:9000".into()),
            ..SidecarArgs::default()
        };
        let env = vec![
            ("TANDEM_SIDECAR_SERVICE".to_owned(), "carts".to_owned()),
            ("TANDEM_SIDECAR_DB".to_owned(), "x.db".to_owned()),
        ];
        let c = Config::load(&args, env)?;
        assert_eq!(c.service, "orders");
        assert_eq!(c.db, "x.db");
        assert_eq!(c.app.as_deref(), Some("http://127.0.0.1:9000"));
        Ok(())
    }

    #[test]
    fn bad_values_name_their_key() {
        let bad = |set: &str| {
            let args = SidecarArgs {
                set: vec![set.into()],
                ..SidecarArgs::default()
            };
            Config::load(&args, Vec::new()).expect_err(set).to_string()
        };
        assert!(bad("coordinator=localhost:7400").contains("coordinator"));
        assert!(bad("service=").contains("service"));
        assert!(bad("handler_timeout_ms=0").contains("handler_timeout_ms"));
        assert!(bad("colour=blue").contains("colour"));
        assert!(bad("worker_threads=257").contains("worker_threads"));
        assert!(bad("listen=0.0.0.0:7410").contains("loopback"));
        assert!(bad("app=http://10.1.2.3:9000").contains("loopback"));
        assert!(bad("coordinator=https://127.0.0.1:7400").contains("no TLS"));
        assert!(bad("tls_cert=/c.pem").contains("tls_key and tls_ca must be set"));
    }

    #[test]
    fn the_app_hop_stays_on_loopback_unless_allowed() -> Result<(), ConfigError> {
        for ok in [
            "http://127.0.0.1:9000",
            "http://localhost:9000",
            "http://[::1]:9000/",
        ] {
            assert!(loopback_url(ok), "{ok}");
        }
        for remote in [
            "http://10.0.0.1:9000",
            "http://app.shop.svc:9000",
            "http://127.0.0.1.nip.io:9000",
        ] {
            assert!(!loopback_url(remote), "{remote}");
        }
        let args = SidecarArgs {
            listen: Some("0.0.0.0:7410".into()),
            app: Some("http://10.0.0.1:9000".into()),
            set: vec!["allow_remote_app=true".into()],
            ..SidecarArgs::default()
        };
        let c = Config::load(&args, Vec::new())?;
        assert_eq!(c.listen.to_string(), "0.0.0.0:7410");
        let args = SidecarArgs {
            listen: Some("unix:/run/tandem/sidecar.sock".into()),
            app: Some("unix:/run/tandem/app.sock".into()),
            ..SidecarArgs::default()
        };
        let c = Config::load(&args, Vec::new())?;
        assert_eq!(c.listen, Listen::Unix("/run/tandem/sidecar.sock".into()));
        assert_eq!(c.app.as_deref(), Some("unix:/run/tandem/app.sock"));
        Ok(())
    }

    #[test]
    fn one_runtime_thread_unless_set() -> Result<(), ConfigError> {
        assert_eq!(Config::default().worker_threads, Some(1));
        let with = |set: &str| {
            let args = SidecarArgs {
                set: vec![set.into()],
                ..SidecarArgs::default()
            };
            Config::load(&args, Vec::new()).map(|c| c.worker_threads)
        };
        assert_eq!(with("worker_threads=4")?, Some(4));
        assert_eq!(with("worker_threads=0")?, None);
        Ok(())
    }
}
