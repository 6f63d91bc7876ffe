//! Layered settings, shared by the coordinator and the sidecar: defaults,
//! then a TOML file, then `<PREFIX><KEY>` environment variables, then flags
//! (named ones and `--set KEY=VALUE`). Every value is typed by its key's
//! [`Kind`]; a key that names no setting, in the file or in a flag, is an
//! error. The result deserializes into the caller's raw settings type,
//! which then checks ranges.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A setting that could not be read or is out of range.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file, a variable or a flag does not parse, or names no setting.
    #[error("{origin}: {message}")]
    Parse {
        /// Where the value came from.
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// A value out of its range.
    #[error("invalid setting {key} = {value}: {reason}")]
    Invalid {
        /// The setting.
        key: &'static str,
        /// Its value as given, in Rust's debug form (a string quoted once).
        value: String,
        /// What is allowed.
        reason: String,
    },
}

impl ConfigError {
    /// An out-of-range value.
    pub fn invalid(key: &'static str, value: &dyn std::fmt::Debug, reason: &str) -> ConfigError {
        ConfigError::Invalid {
            key,
            value: format!("{value:?}"),
            reason: reason.to_owned(),
        }
    }
}

/// A `listen` setting: `HOST:PORT` where HOST is an IP address or a name
/// that resolves (`localhost:7400`); a name is resolved once, here, and
/// its first IPv4 address is used (its first address if it has none).
pub fn listen_address(key: &'static str, value: &str) -> Result<std::net::SocketAddr, ConfigError> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = value.parse() {
        return Ok(addr);
    }
    match value.to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<std::net::SocketAddr> = addrs.collect();
            addrs
                .iter()
                .find(|a| a.is_ipv4())
                .or(addrs.first())
                .copied()
                .ok_or_else(|| {
                    ConfigError::invalid(key, &value, "the host name resolves to no address")
                })
        }
        Err(e) => Err(ConfigError::invalid(
            key,
            &value,
            &format!("expected HOST:PORT, HOST an IP address or a host name that resolves ({e})"),
        )),
    }
}

/// The type of a setting's value.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// Text.
    Str,
    /// A whole number.
    Int,
}

/// One setting: its key, the type of its value, its default as it would
/// be written in the file, and what it means.
#[derive(Clone, Copy, Debug)]
pub struct Setting {
    /// The key (`fsync_interval_ms`).
    pub key: &'static str,
    /// The type of its value.
    pub kind: Kind,
    /// Its default, as written in the file (`None`: unset, or computed at
    /// start as `help` says).
    pub default: Option<&'static str>,
    /// What it means, in one line.
    pub help: &'static str,
}

/// The log filter setting every process has.
pub const LOG: Setting = Setting {
    key: "log",
    kind: Kind::Str,
    default: Some("info,sqlx=warn"),
    help: "log filter in tracing's env-filter syntax (RUST_LOG wins when set)",
};

/// The log format setting every process has.
pub const LOG_FORMAT: Setting = Setting {
    key: "log_format",
    kind: Kind::Str,
    default: Some("text"),
    help: "text, or json: one JSON object per line",
};

/// The metrics endpoint setting every process has.
pub const METRICS_LISTEN: Setting = Setting {
    key: "metrics_listen",
    kind: Kind::Str,
    default: Some("127.0.0.1:0"),
    help: "Prometheus endpoint (GET /metrics), HOST:PORT (port 0: any free port, printed at start), or off",
};

/// The long help of `--set`: every setting with its default and meaning,
/// and the environment variable that sets it.
pub fn set_help(env_prefix: &str, keys: &[Setting]) -> String {
    let mut out = format!(
        "Any setting, as KEY=VALUE (repeatable); also the TOML file's keys and \
         {env_prefix}<KEY> environment variables. Settings and defaults:\n"
    );
    for s in keys {
        let default = s
            .default
            .map_or(String::new(), |d| format!(" [default: {d}]"));
        out.push_str(&format!("\n  {}{default}\n      {}", s.key, s.help));
    }
    out
}

/// Where settings come from, lowest precedence first.
#[derive(Debug)]
pub struct Layers<'a> {
    /// The TOML file, if any.
    pub file: Option<&'a Path>,
    /// Prefix of environment variables (`TANDEM_`).
    pub env_prefix: &'a str,
    /// Every setting.
    pub keys: &'a [Setting],
    /// Flags that name one setting each, with their values if given.
    pub flags: &'a [(&'a str, Option<String>)],
    /// `--set KEY=VALUE` flags.
    pub sets: &'a [String],
    /// Variables with the prefix that are not this process's settings but
    /// belong to something else (after the prefix; `NAME_*` for a family):
    /// left alone. Any other variable with the prefix that names no
    /// setting is an error (a typo would otherwise be silently ignored).
    pub not_settings: &'a [&'a str],
}

/// Whether a variable (after the prefix) is one Kubernetes sets for every
/// Service in the namespace (`<NAME>_SERVICE_HOST`, `<NAME>_SERVICE_PORT…`,
/// `<NAME>_PORT…`): a Service named `tandem-coordinator` gives every pod
/// `TANDEM_COORDINATOR_SERVICE_HOST` and the like.
fn service_link(key: &str) -> bool {
    key.ends_with("_SERVICE_HOST")
        || key.contains("_SERVICE_PORT")
        || key.ends_with("_PORT")
        || key.contains("_PORT_")
}

/// The `TANDEM_*` variables that are not the coordinator's settings: the
/// sidecar's (`TANDEM_SIDECAR_*`), the `tandem` command's
/// (`TANDEM_COORDINATOR`, `TANDEM_CLI_*`), fault points, and the test command's.
pub const OTHER_TANDEM_VARIABLES: &[&str] = &[
    "SIDECAR_*",
    "COORDINATOR",
    "CLI_*",
    "FAILPOINTS",
    "TEST_*",
    "REQUIRE_*",
    "POWERLOSS_*",
    "CAMPAIGN_CYCLES",
    "REPLICATED_CYCLES",
];

impl Layers<'_> {
    fn insert(
        &self,
        table: &mut toml::Table,
        key: &str,
        value: &str,
        origin: &str,
    ) -> Result<(), ConfigError> {
        let Some(kind) = self.keys.iter().find(|s| s.key == key).map(|s| s.kind) else {
            return Err(ConfigError::Parse {
                origin: origin.to_owned(),
                message: format!("unknown setting {key:?}"),
            });
        };
        let v = match kind {
            Kind::Str => toml::Value::String(value.to_owned()),
            Kind::Int => {
                toml::Value::Integer(value.trim().parse().map_err(|_| ConfigError::Parse {
                    origin: origin.to_owned(),
                    message: format!("{key} must be a whole number, got {value:?}"),
                })?)
            }
        };
        table.insert(key.to_owned(), v);
        Ok(())
    }

    /// Merges the layers and deserializes them into `T` (whose unknown keys
    /// should be denied).
    pub fn resolve<T: DeserializeOwned>(
        &self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<T, ConfigError> {
        let mut table = match self.file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Parse {
                        origin: path.display().to_string(),
                        message: e.to_string(),
                    })?
            }
            None => toml::Table::new(),
        };
        for (name, value) in env {
            let Some(key) = name.strip_prefix(self.env_prefix) else {
                continue;
            };
            let other = self.not_settings.iter().any(|o| match o.strip_suffix('*') {
                Some(family) => key.starts_with(family),
                None => key == *o,
            }) || service_link(key);
            let key = key.to_ascii_lowercase();
            if self.keys.iter().any(|s| s.key == key) {
                self.insert(&mut table, &key, &value, &name)?;
            } else if !other {
                let valid: Vec<String> = self
                    .keys
                    .iter()
                    .map(|s| format!("{}{}", self.env_prefix, s.key.to_ascii_uppercase()))
                    .collect();
                return Err(ConfigError::Parse {
                    origin: name,
                    message: format!(
                        "names no setting; the settings' variables are {}",
                        valid.join(", ")
                    ),
                });
            }
        }
        for (key, value) in self.flags {
            if let Some(v) = value {
                self.insert(&mut table, key, v, &format!("--{}", key.replace('_', "-")))?;
            }
        }
        for kv in self.sets {
            let (k, v) = kv.split_once('=').ok_or_else(|| ConfigError::Parse {
                origin: format!("--set {kv}"),
                message: "expected KEY=VALUE".into(),
            })?;
            self.insert(&mut table, k.trim(), v, &format!("--set {kv}"))?;
        }
        let origin = self
            .file
            .map_or("settings".to_owned(), |p| p.display().to_string());
        T::deserialize(toml::Value::Table(table)).map_err(|e| ConfigError::Parse {
            origin,
            message: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_takes_addresses_and_host_names() {
        assert_eq!(
            listen_address("listen", "127.0.0.1:7400").ok(),
            Some(std::net::SocketAddr::from(([127, 0, 0, 1], 7400)))
        );
        let local = listen_address("listen", "localhost:7400");
        assert!(
            local
                .as_ref()
                .is_ok_and(|a| a.ip().is_loopback() && a.port() == 7400),
            "{local:?}"
        );
        for bad in [
            "7400",
            "localhost",
            "no-such-host.invalid:7400",
            "127.0.0.1:99999",
        ] {
            let e = listen_address("listen", bad).err().map(|e| e.to_string());
            assert!(
                e.as_deref()
                    .is_some_and(|e| e.contains("listen") && e.contains(bad)),
                "{bad}: {e:?}"
            );
        }
    }
}
