//! Coordinator settings, layered: defaults, then the TOML file (`--config`),
//! then `TANDEM_*` environment variables, then command-line flags. Unknown
//! keys in the file, in `--set` or in `TANDEM_*` variables (other than the
//! sidecar's, the `tandem` command's and the tests') are an error;
//! [`Config::load`] checks every value and returns the checked [`Config`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use tandem_storage::{CronSchedule, FsyncPolicy, LogConfig, Retention};

use crate::settings::{ConfigError, Kind, Layers, Setting};

/// Command-line flags of `tandem-coordinator` (and `tandem coordinator`).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct CoordinatorArgs {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to serve gRPC on [default: 127.0.0.1:7400].
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Folder for the logs [default: ./tandem-data].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// When appends are forced to disk: always, interval or never [default: always].
    #[arg(long, value_name = "POLICY")]
    pub fsync: Option<String>,
    /// Where the logs live: `embedded` (files under --data-dir) or a
    /// `postgres://…` URL shared by any number of replicas [default: embedded].
    #[arg(long, value_name = "embedded|URL")]
    pub store: Option<String>,
    /// Address other replicas forward calls to and sidecars open sessions
    /// with (PostgreSQL store) [default: the listening address].
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise: Option<String>,
    /// Any setting of the file, as KEY=VALUE (repeatable; --help lists them).
    #[arg(long = "set", value_name = "KEY=VALUE", long_help = crate::settings::set_help("TANDEM_", KEYS))]
    pub set: Vec<String>,
}

/// Shards of a PostgreSQL store unless told otherwise.
pub const DEFAULT_SHARDS: u32 = 8;

/// Every setting; environment variable `TANDEM_<KEY>`.
const KEYS: &[Setting] = &[
    Setting {
        key: "listen",
        kind: Kind::Str,
        default: Some("127.0.0.1:7400"),
        help: "gRPC address, HOST:PORT (an IP address or a host name; port 0: any free port)",
    },
    Setting {
        key: "data_dir",
        kind: Kind::Str,
        default: Some("./tandem-data"),
        help: "folder of the embedded store's logs",
    },
    Setting {
        key: "fsync",
        kind: Kind::Str,
        default: Some("always"),
        help: "when appends are forced to disk: always, interval or never",
    },
    Setting {
        key: "store",
        kind: Kind::Str,
        default: Some("embedded"),
        help: "embedded, or a postgres:// URL shared by any number of replicas",
    },
    Setting {
        key: "advertise",
        kind: Kind::Str,
        default: None,
        help: "address other replicas and sidecars reach this one at (PostgreSQL store) [default: the listening address]",
    },
    Setting {
        key: "replica_id",
        kind: Kind::Str,
        default: None,
        help: "this replica's name in the store (PostgreSQL store) [default: a new UUID at every start]",
    },
    Setting {
        key: "lease_ms",
        kind: Kind::Int,
        default: Some("5000"),
        help: "a replica's hold on its shards lasts this long without renewal (PostgreSQL store)",
    },
    Setting {
        key: "shards",
        kind: Kind::Int,
        default: Some("8"),
        help: "shards of a PostgreSQL store, spread over the replicas",
    },
    Setting {
        key: "fsync_interval_ms",
        kind: Kind::Int,
        default: Some("100"),
        help: "with fsync = interval",
    },
    Setting {
        key: "internal_fsync",
        kind: Kind::Str,
        default: Some("always"),
        help: "the same for the internal logs (half messages, transaction states, offsets)",
    },
    Setting {
        key: "relaxed_sync_ms",
        kind: Kind::Int,
        default: Some("1000"),
        help: "committed offsets and COMMITTED records are durable within this long",
    },
    Setting {
        key: "group_commit_wait_us",
        kind: Kind::Int,
        default: Some("0"),
        help: "wait this long after the last append for more to share its sync",
    },
    Setting {
        key: "segment_bytes",
        kind: Kind::Int,
        default: Some("67108864"),
        help: "segment size of topic logs",
    },
    Setting {
        key: "max_message_bytes",
        kind: Kind::Int,
        default: Some("1048576"),
        help: "largest message (id, key, value, headers)",
    },
    Setting {
        key: "retention_ms",
        kind: Kind::Int,
        default: Some("604800000"),
        help: "delete segments older than this (-1: keep)",
    },
    Setting {
        key: "retention_bytes",
        kind: Kind::Int,
        default: Some("-1"),
        help: "per-partition size limit (-1: none)",
    },
    Setting {
        key: "retention_schedule",
        kind: Kind::Str,
        default: Some("*/5 * * * *"),
        help: "when retention runs (cron: 5 fields, or 6/7 with seconds first)",
    },
    Setting {
        key: "session_timeout_ms",
        kind: Kind::Int,
        default: Some("10000"),
        help: "for consumers that do not choose one",
    },
    Setting {
        key: "revoke_timeout_ms",
        kind: Kind::Int,
        default: Some("10000"),
        help: "time to acknowledge a partition being moved",
    },
    Setting {
        key: "publish_dedup_window_ms",
        kind: Kind::Int,
        default: Some("120000"),
        help: "a publisher-chosen message id is remembered this long per topic (0: off)",
    },
    Setting {
        key: "offsets_retention_ms",
        kind: Kind::Int,
        default: Some("604800000"),
        help: "committed offsets of a group with no member and no commit for this long are forgotten (0: kept)",
    },
    Setting {
        key: "saga_retention_ms",
        kind: Kind::Int,
        default: Some("604800000"),
        help: "a finished saga is remembered this long",
    },
    crate::settings::LOG,
    crate::settings::LOG_FORMAT,
    crate::settings::METRICS_LISTEN,
    tandem_runtime::telemetry::OTLP_ENDPOINT,
    Setting {
        key: "tls_cert",
        kind: Kind::Str,
        default: None,
        help: "PEM certificate chain to serve TLS with (with tls_key and tls_ca: mutual TLS on the gRPC port); its URI or DNS SAN is the replicas' identity",
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
        help: "PEM CA bundle that signs the clients' (sidecars', the tandem command's, other replicas') certificates",
    },
    Setting {
        key: "check_after_ms",
        kind: Kind::Int,
        default: Some("6000"),
        help: "first check-back of an open transaction",
    },
    Setting {
        key: "max_checks",
        kind: Kind::Int,
        default: Some("15"),
        help: "check-backs before the final action",
    },
    Setting {
        key: "check_timeout_ms",
        kind: Kind::Int,
        default: Some("3000"),
        help: "how long a check-back waits for its answer",
    },
    Setting {
        key: "max_check_interval_ms",
        kind: Kind::Int,
        default: Some("60000"),
        help: "cap of the check-back backoff",
    },
    Setting {
        key: "max_check_rate",
        kind: Kind::Int,
        default: Some("1000"),
        help: "check-backs started per second, at most, with bursts of up to a tenth of that on top",
    },
    Setting {
        key: "final_action",
        kind: Kind::Str,
        default: Some("rollback"),
        help: "rollback or commit after max_checks",
    },
    Setting {
        key: "txn_retention_ms",
        kind: Kind::Int,
        default: Some("300000"),
        help: "finished transactions are remembered this long",
    },
    Setting {
        key: "maintenance_schedule",
        kind: Kind::Str,
        default: Some("* * * * *"),
        help: "when the transaction log is compacted (cron)",
    },
];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    fsync: Option<String>,
    store: Option<String>,
    advertise: Option<String>,
    replica_id: Option<String>,
    lease_ms: Option<u64>,
    shards: Option<u32>,
    fsync_interval_ms: Option<u64>,
    internal_fsync: Option<String>,
    relaxed_sync_ms: Option<u64>,
    group_commit_wait_us: Option<u64>,
    segment_bytes: Option<u64>,
    max_message_bytes: Option<u64>,
    retention_ms: Option<i64>,
    retention_bytes: Option<i64>,
    retention_schedule: Option<String>,
    session_timeout_ms: Option<u64>,
    revoke_timeout_ms: Option<u64>,
    publish_dedup_window_ms: Option<u64>,
    offsets_retention_ms: Option<u64>,
    saga_retention_ms: Option<u64>,
    log: Option<String>,
    log_format: Option<String>,
    metrics_listen: Option<String>,
    otlp_endpoint: Option<String>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    tls_ca: Option<String>,
    /// Only in the file: a table, not a value.
    authorization: Option<crate::authz::AuthorizationRaw>,
    check_after_ms: Option<u64>,
    max_checks: Option<u32>,
    check_timeout_ms: Option<u64>,
    max_check_interval_ms: Option<u64>,
    max_check_rate: Option<u32>,
    final_action: Option<String>,
    txn_retention_ms: Option<u64>,
    maintenance_schedule: Option<String>,
}

/// What happens to a transaction nobody answers for after `max_checks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinalAction {
    /// Discard the half message (the default).
    Rollback,
    /// Deliver it.
    Commit,
}

/// Settings of the transactional-message protocol.
#[derive(Clone, Debug)]
pub struct TxnSettings {
    /// A transaction still open this long after Prepare is checked back.
    pub check_after: Duration,
    /// Check-backs before the final action.
    pub max_checks: u32,
    /// How long a check-back waits for its answer.
    pub check_timeout: Duration,
    /// Longest wait between two check-backs of a transaction.
    pub max_check_interval: Duration,
    /// Check-backs started per second, at most (all services together): a
    /// restart or takeover with a large backlog asks the apps at this pace.
    pub max_check_rate: u32,
    /// What happens after `max_checks` check-backs without an answer.
    pub final_action: FinalAction,
    /// How long a finished transaction is remembered (repeated outcomes are
    /// idempotent for this long).
    pub retention: Duration,
    /// When the transaction log is compacted and old transactions forgotten.
    pub maintenance_schedule: CronSchedule,
}

impl Default for TxnSettings {
    fn default() -> Self {
        Config::default().txn
    }
}

/// Where the coordinator keeps its logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Store {
    /// Segment files under `data_dir`: one coordinator.
    Embedded,
    /// Tables in a PostgreSQL database: any number of replicas, one holding
    /// the lease and serving, the others ready to take over.
    Postgres {
        /// The connection URL.
        url: String,
    },
}

impl Store {
    /// The store named by a setting: `embedded` or a `postgres://` URL.
    pub fn parse(s: &str) -> Result<Store, String> {
        if s == "embedded" {
            return Ok(Store::Embedded);
        }
        if let Some(rest) = s
            .strip_prefix("postgres://")
            .or_else(|| s.strip_prefix("postgresql://"))
        {
            if rest.is_empty() {
                return Err("the URL names no server".into());
            }
            return Ok(Store::Postgres { url: s.to_owned() });
        }
        Err("expected embedded or a postgres:// URL".into())
    }
}

/// How replicas sharing a PostgreSQL store take turns.
#[derive(Clone, Debug)]
pub struct Replication {
    /// This replica's name in the lease rows (a suffix of the process is
    /// added).
    pub replica_id: String,
    /// Where other replicas and sidecars reach this one (`None`: the
    /// listening address).
    pub advertise: Option<String>,
    /// How long a lease lasts unless renewed; a dead holder's partitions
    /// move after at most this long.
    pub lease: Duration,
    /// Units of ownership: each topic (its partitions, transactions,
    /// consumer groups and offsets) belongs to one shard by its name's
    /// hash, and each shard to one replica at a time through its own
    /// lease. Replicas balance the shards among themselves. Fixed for a
    /// database once a replica has used it.
    pub shards: u32,
}

/// The checked coordinator settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Address to serve gRPC on.
    pub listen: SocketAddr,
    /// Folder for the logs (embedded store).
    pub data_dir: PathBuf,
    /// Where the logs live.
    pub store: Store,
    /// Lease settings (PostgreSQL store).
    pub replication: Replication,
    /// Settings of the topic logs.
    pub log: LogConfig,
    /// When the internal logs (half messages, transaction states, offsets)
    /// are forced to disk: `always` unless told otherwise, whatever the
    /// topics' policy.
    pub internal_fsync: FsyncPolicy,
    /// Committed offsets and COMMITTED records (relaxed appends) are durable
    /// within this long.
    pub relaxed_sync: Duration,
    /// Largest message (id, key, value and headers, as stored) accepted.
    pub max_message_bytes: usize,
    /// When retention runs.
    pub retention_schedule: CronSchedule,
    /// Session timeout of consumers that do not ask for one.
    pub session_timeout: Duration,
    /// How long a member may take to acknowledge what it holds of a
    /// partition being moved away from it before it is expelled.
    pub revoke_timeout: Duration,
    /// A publisher-chosen message id is remembered this long per topic: a
    /// `Publish` repeating it is answered with the first append's position
    /// (zero: off).
    pub publish_dedup_window: Duration,
    /// Committed offsets of a (group, topic) with no member and no commit
    /// for this long are forgotten (zero: kept for ever).
    pub offsets_retention: Duration,
    /// A finished saga is remembered (GetSaga, ListSagas, an idempotent
    /// StartSaga) this long.
    pub saga_retention: Duration,
    /// Log filter (`tracing` env-filter syntax).
    pub log_filter: String,
    /// Log lines as text or JSON.
    pub log_format: crate::LogFormat,
    /// Where `run` serves Prometheus metrics (`None`: nowhere).
    pub metrics_listen: Option<SocketAddr>,
    /// The OTLP collector traces go to (`None`: the standard
    /// `OTEL_EXPORTER_OTLP_*` variables, if set).
    pub otlp_endpoint: Option<String>,
    /// Transactional messages.
    pub txn: TxnSettings,
    /// Mutual TLS on the gRPC port (`None`: plaintext).
    pub tls: Option<tandem_runtime::tls::TlsFiles>,
    /// Who may do what (with TLS).
    pub authorization: crate::authz::Authorization,
}

impl Default for Config {
    fn default() -> Self {
        Raw::default().check().expect("the defaults are valid")
    }
}

impl Config {
    /// Loads the settings: defaults, the file named by `--config`, then
    /// `TANDEM_*` from `env`, then the flags.
    pub fn load(
        args: &CoordinatorArgs,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let flags = [
            ("listen", args.listen.clone()),
            (
                "data_dir",
                args.data_dir.as_ref().map(|d| d.display().to_string()),
            ),
            ("fsync", args.fsync.clone()),
            ("store", args.store.clone()),
            ("advertise", args.advertise.clone()),
        ];
        let layers = Layers {
            file: args.config.as_deref(),
            env_prefix: "TANDEM_",
            keys: KEYS,
            flags: &flags,
            sets: &args.set,
            not_settings: tandem_runtime::settings::OTHER_TANDEM_VARIABLES,
        };
        layers.resolve::<Raw>(env)?.check()
    }
}

impl Raw {
    fn check(self) -> Result<Config, ConfigError> {
        let invalid = ConfigError::invalid;
        let listen_s = self.listen.unwrap_or_else(|| "127.0.0.1:7400".into());
        let listen = crate::settings::listen_address("listen", &listen_s)?;
        let interval = self.fsync_interval_ms.unwrap_or(100);
        if interval == 0 || interval > 60_000 {
            return Err(invalid(
                "fsync_interval_ms",
                &interval,
                "must be between 1 and 60000",
            ));
        }
        let policy = |key: &'static str, v: Option<&str>| match v.unwrap_or("always") {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            "interval" => Ok(FsyncPolicy::Interval(Duration::from_millis(interval))),
            other => Err(invalid(key, &other, "expected always, interval or never")),
        };
        let fsync = policy("fsync", self.fsync.as_deref())?;
        let internal_fsync = policy("internal_fsync", self.internal_fsync.as_deref())?;
        let relaxed_sync = self.relaxed_sync_ms.unwrap_or(1000);
        if !(1..=60_000).contains(&relaxed_sync) {
            return Err(invalid(
                "relaxed_sync_ms",
                &relaxed_sync,
                "must be between 1 and 60000",
            ));
        }
        let group_commit_wait = match self.group_commit_wait_us {
            None => LogConfig::default().group_commit_wait,
            Some(us) if us <= 100_000 => Duration::from_micros(us),
            Some(us) => {
                return Err(invalid(
                    "group_commit_wait_us",
                    &us,
                    "must be between 0 and 100000",
                ));
            }
        };
        let segment_bytes = self.segment_bytes.unwrap_or(64 << 20);
        if !(1 << 20..=1 << 30).contains(&segment_bytes) {
            return Err(invalid(
                "segment_bytes",
                &segment_bytes,
                "must be between 1 MiB and 1 GiB",
            ));
        }
        let max_message_bytes = self.max_message_bytes.unwrap_or(1 << 20);
        if !(1024..=64 << 20).contains(&max_message_bytes) {
            return Err(invalid(
                "max_message_bytes",
                &max_message_bytes,
                "must be between 1 KiB and 64 MiB",
            ));
        }
        let retention_ms = self.retention_ms.unwrap_or(7 * 24 * 3600 * 1000);
        let retention_bytes = self.retention_bytes.unwrap_or(-1);
        let positive_or_off = |v: i64| (v > 0).then_some(v as u64);
        if retention_ms == 0 || retention_ms < -1 {
            return Err(invalid(
                "retention_ms",
                &retention_ms,
                "must be positive, or -1 to keep forever",
            ));
        }
        if retention_bytes == 0 || retention_bytes < -1 {
            return Err(invalid(
                "retention_bytes",
                &retention_bytes,
                "must be positive, or -1 for no limit",
            ));
        }
        let schedule_s = self
            .retention_schedule
            .unwrap_or_else(|| "*/5 * * * *".into());
        let retention_schedule = schedule_s.parse().map_err(|e: tandem_storage::Error| {
            invalid("retention_schedule", &schedule_s, &e.to_string())
        })?;
        let session = self.session_timeout_ms.unwrap_or(10_000);
        if !(1_000..=300_000).contains(&session) {
            return Err(invalid(
                "session_timeout_ms",
                &session,
                "must be between 1000 and 300000",
            ));
        }
        let revoke = self.revoke_timeout_ms.unwrap_or(10_000);
        if !(100..=300_000).contains(&revoke) {
            return Err(invalid(
                "revoke_timeout_ms",
                &revoke,
                "must be between 100 and 300000",
            ));
        }
        let window = self.publish_dedup_window_ms.unwrap_or(120_000);
        if window > 86_400_000 {
            return Err(invalid(
                "publish_dedup_window_ms",
                &window,
                "must be at most 86400000 (a day); 0 turns producer dedup off",
            ));
        }
        let max_message = max_message_bytes as usize;
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
        let max_checks = self.max_checks.unwrap_or(15);
        if !(1..=1000).contains(&max_checks) {
            return Err(invalid(
                "max_checks",
                &max_checks,
                "must be between 1 and 1000",
            ));
        }
        let max_check_rate = self.max_check_rate.unwrap_or(1000);
        if !(1..=1_000_000).contains(&max_check_rate) {
            return Err(invalid(
                "max_check_rate",
                &max_check_rate,
                "must be between 1 and 1000000 check-backs per second",
            ));
        }
        let final_action = match self.final_action.as_deref().unwrap_or("rollback") {
            "rollback" => FinalAction::Rollback,
            "commit" => FinalAction::Commit,
            other => {
                return Err(invalid(
                    "final_action",
                    &other,
                    "expected rollback or commit",
                ));
            }
        };
        let maint_s = self
            .maintenance_schedule
            .unwrap_or_else(|| "* * * * *".into());
        let maintenance_schedule = maint_s.parse().map_err(|e: tandem_storage::Error| {
            invalid("maintenance_schedule", &maint_s, &e.to_string())
        })?;
        let saga_retention = ms(
            "saga_retention_ms",
            self.saga_retention_ms,
            7 * 24 * 3_600_000,
            1_000,
            30 * 24 * 3_600_000,
        )?;
        let txn = TxnSettings {
            check_after: ms("check_after_ms", self.check_after_ms, 6_000, 100, 3_600_000)?,
            max_checks,
            check_timeout: ms(
                "check_timeout_ms",
                self.check_timeout_ms,
                3_000,
                50,
                600_000,
            )?,
            max_check_interval: ms(
                "max_check_interval_ms",
                self.max_check_interval_ms,
                60_000,
                100,
                86_400_000,
            )?,
            max_check_rate,
            final_action,
            retention: ms(
                "txn_retention_ms",
                self.txn_retention_ms,
                300_000,
                1_000,
                604_800_000,
            )?,
            maintenance_schedule,
        };
        // Relations between timeouts, checked here rather than found out in
        // production.
        if txn.max_check_interval < txn.check_after {
            return Err(invalid(
                "max_check_interval_ms",
                &txn.max_check_interval.as_millis(),
                &format!(
                    "must be at least check_after_ms ({})",
                    txn.check_after.as_millis()
                ),
            ));
        }
        if txn.check_timeout >= txn.max_check_interval {
            return Err(invalid(
                "check_timeout_ms",
                &txn.check_timeout.as_millis(),
                &format!(
                    "must be less than max_check_interval_ms ({}): a check-back must end before the next one is due",
                    txn.max_check_interval.as_millis()
                ),
            ));
        }
        if txn.retention < txn.check_after {
            return Err(invalid(
                "txn_retention_ms",
                &txn.retention.as_millis(),
                &format!(
                    "must be at least check_after_ms ({}): a retried outcome must still find its transaction",
                    txn.check_after.as_millis()
                ),
            ));
        }
        let store_s = self.store.unwrap_or_else(|| "embedded".into());
        // The URL may hold a password: the error shows only its scheme.
        let store = Store::parse(&store_s).map_err(|why| {
            let shown = store_s.split("://").next().unwrap_or_default();
            invalid("store", &format!("{shown}://…"), &why)
        })?;
        let lease = self.lease_ms.unwrap_or(5_000);
        if !(500..=600_000).contains(&lease) {
            return Err(invalid(
                "lease_ms",
                &lease,
                "must be between 500 and 600000",
            ));
        }
        let shards = self.shards.unwrap_or(DEFAULT_SHARDS);
        if !(1..=crate::shards::MAX_SHARDS).contains(&shards) {
            return Err(invalid(
                "shards",
                &shards,
                &format!("must be between 1 and {}", crate::shards::MAX_SHARDS),
            ));
        }
        if let Some(a) = &self.advertise
            && a.rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(invalid("advertise", a, "expected HOST:PORT"));
        }
        let replica_id = match self.replica_id {
            Some(id) => {
                crate::service::check_id("replica_id", &id)
                    .map_err(|e| invalid("replica_id", &id, &e.to_string()))?;
                id
            }
            None => uuid::Uuid::now_v7().to_string(),
        };
        let authorization = crate::authz::Authorization::new(self.authorization);
        if let Some(p) = &authorization.identity_prefix
            && !p.ends_with('/')
        {
            // (`…/ns/shop` would also admit `…/ns/shop-dev/…`.)
            return Err(invalid(
                "authorization.identity_prefix",
                p,
                "must end with '/' (spiffe://DOMAIN/ns/NS/sa/)",
            ));
        }
        Ok(Config {
            store,
            replication: Replication {
                replica_id,
                advertise: self.advertise,
                lease: Duration::from_millis(lease),
                shards,
            },
            internal_fsync,
            relaxed_sync: Duration::from_millis(relaxed_sync),
            txn,
            listen,
            data_dir: self
                .data_dir
                .unwrap_or_else(|| PathBuf::from("./tandem-data")),
            log: LogConfig {
                segment_bytes,
                fsync,
                group_commit_wait,
                // Room for what Tandem adds: a transaction's marker header,
                // a dead letter's error headers.
                max_record_bytes: max_message + crate::service::RESERVED_BYTES,
                // A publish request's messages for one partition form one batch.
                max_batch_bytes: crate::MAX_REQUEST_BYTES + (1 << 20),
                retention: Retention {
                    max_age: positive_or_off(retention_ms).map(Duration::from_millis),
                    max_bytes: positive_or_off(retention_bytes),
                },
                ..LogConfig::default()
            },
            max_message_bytes: max_message,
            retention_schedule,
            session_timeout: Duration::from_millis(session),
            revoke_timeout: Duration::from_millis(revoke),
            publish_dedup_window: Duration::from_millis(window),
            offsets_retention: Duration::from_millis(
                self.offsets_retention_ms.unwrap_or(7 * 24 * 3_600_000),
            ),
            saga_retention,
            // sqlx's notices ("relation already exists, skipping" at every
            // start) are not worth an operator's attention.
            log_filter: crate::logging::filter_setting(self.log, "info,sqlx=warn")?,
            log_format: crate::LogFormat::from_setting(self.log_format.as_deref())?,
            metrics_listen: tandem_runtime::metrics::listen_setting(
                "metrics_listen",
                self.metrics_listen.as_deref(),
                "127.0.0.1:0",
            )?,
            otlp_endpoint: self.otlp_endpoint.filter(|e| !e.trim().is_empty()),
            tls: tandem_runtime::tls::TlsFiles::from_settings(
                self.tls_cert.as_deref(),
                self.tls_key.as_deref(),
                self.tls_ca.as_deref(),
                ["tls_cert", "tls_key", "tls_ca"],
            )
            .map_err(|e| ConfigError::Parse {
                origin: "settings".into(),
                message: e.to_string(),
            })?,
            authorization,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Each default `--help` shows is the one the coordinator uses: setting
    /// it changes nothing.
    #[test]
    fn the_defaults_help_shows_are_the_defaults() -> Result<(), ConfigError> {
        let load = |set: &[String]| {
            let args = CoordinatorArgs {
                set: [vec!["replica_id=r1".to_owned()], set.to_vec()].concat(),
                ..CoordinatorArgs::default()
            };
            Config::load(&args, Vec::new()).map(|c| format!("{c:?}"))
        };
        let plain = load(&[])?;
        for s in KEYS {
            if let Some(d) = s.default {
                assert_eq!(load(&[format!("{}={d}", s.key)])?, plain, "{}", s.key);
            }
        }
        Ok(())
    }

    #[test]
    fn defaults_suit_a_local_run() {
        let c = Config::default();
        assert_eq!(c.listen.to_string(), "127.0.0.1:7400");
        assert_eq!(c.data_dir, PathBuf::from("./tandem-data"));
        assert_eq!(c.log.fsync, FsyncPolicy::Always);
        assert_eq!(c.max_message_bytes, 1 << 20);
    }

    #[test]
    fn file_then_environment_then_flags() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("tandem.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:1\"\nfsync = \"never\"\nsegment_bytes = 2097152\nsession_timeout_ms = 5000\n",
        )?;
        let args = CoordinatorArgs {
            config: Some(file),
            fsync: Some("interval".into()),
            set: vec!["fsync_interval_ms=7".into()],
            ..CoordinatorArgs::default()
        };
        let c = Config::load(
            &args,
            env(&[
                ("TANDEM_LISTEN", "127.0.0.1:2"),
                ("TANDEM_SEGMENT_BYTES", "4194304"),
                ("PATH", "/bin"),
            ]),
        )?;
        assert_eq!(
            c.listen.to_string(),
            "127.0.0.1:2",
            "environment beats file"
        );
        assert_eq!(c.log.segment_bytes, 4 << 20);
        assert_eq!(
            c.log.fsync,
            FsyncPolicy::Interval(Duration::from_millis(7)),
            "flags beat file"
        );
        assert_eq!(
            c.session_timeout,
            Duration::from_secs(5),
            "file beats defaults"
        );
        Ok(())
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors_naming_the_key()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("tandem.toml");
        std::fs::write(&file, "listen = \"127.0.0.1:1\"\nlisten_port = 3\n")?;
        let args = CoordinatorArgs {
            config: Some(file),
            ..CoordinatorArgs::default()
        };
        let err = Config::load(&args, env(&[])).expect_err("unknown key");
        assert!(err.to_string().contains("listen_port"), "{err}");

        let bad = |set: &str| {
            let args = CoordinatorArgs {
                set: vec![set.into()],
                ..CoordinatorArgs::default()
            };
            Config::load(&args, env(&[])).expect_err(set).to_string()
        };
        assert!(bad("fsync=sometimes").contains("fsync"));
        assert!(bad("segment_bytes=12").contains("segment_bytes"));
        assert!(bad("segment_bytes=lots").contains("segment_bytes"));
        assert!(bad("retention_schedule=every day").contains("retention_schedule"));
        assert!(bad("colour=blue").contains("colour"));
        assert!(bad("listen=localhost").contains("listen"));
        assert!(bad("internal_fsync=sometimes").contains("internal_fsync"));
        assert!(bad("max_check_rate=0").contains("max_check_rate"));
        assert!(bad("max_check_rate=-3").contains("max_check_rate"));
        assert!(
            bad("max_check_interval_ms=1000").contains("max_check_interval_ms"),
            "below check_after_ms"
        );
        assert!(
            bad("check_timeout_ms=60000").contains("check_timeout_ms"),
            "not shorter than max_check_interval_ms"
        );
        let err = Config::load(
            &CoordinatorArgs::default(),
            env(&[("TANDEM_SESSION_TIMEOUT_MS", "5")]),
        )
        .expect_err("too short");
        assert!(err.to_string().contains("session_timeout_ms"), "{err}");
        // A misspelt variable is an error listing the real ones; the other
        // Tandem programs' variables are left alone.
        let err = Config::load(
            &CoordinatorArgs::default(),
            env(&[("TANDEM_LISTN", "127.0.0.1:1")]),
        )
        .expect_err("a typo");
        let text = err.to_string();
        assert!(
            text.contains("TANDEM_LISTN") && text.contains("TANDEM_LISTEN"),
            "{text}"
        );
        Config::load(
            &CoordinatorArgs::default(),
            env(&[
                ("TANDEM_SIDECAR_DB", "x.db"),
                ("TANDEM_COORDINATOR", "http://127.0.0.1:1"),
                ("TANDEM_TEST_POSTGRES", "postgres://x"),
                ("TANDEM_FAILPOINTS", ""),
                // Kubernetes' links to a Service named tandem-coordinator
                ("TANDEM_COORDINATOR_SERVICE_HOST", "10.0.0.1"),
                ("TANDEM_COORDINATOR_SERVICE_PORT_GRPC", "7400"),
                ("TANDEM_COORDINATOR_PORT", "tcp://10.0.0.1:7400"),
                ("TANDEM_COORDINATOR_PORT_7400_TCP_ADDR", "10.0.0.1"),
            ]),
        )?;
        Ok(())
    }

    #[test]
    fn five_field_cron_is_accepted() -> Result<(), Box<dyn std::error::Error>> {
        let args = CoordinatorArgs {
            set: vec!["retention_schedule=0 * * * *".into()],
            ..CoordinatorArgs::default()
        };
        assert_eq!(
            Config::load(&args, env(&[]))?.retention_schedule.expr(),
            "0 * * * *"
        );
        Ok(())
    }
}
