//! Log set-up shared by the coordinator and the sidecar: lines to standard
//! error, as text or as one JSON object per line, through a filter in
//! `tracing`'s env-filter syntax (`RUST_LOG`, when set, wins over the
//! `log` setting). A filter that does not parse is an error, never a
//! silent fallback.

use crate::settings::ConfigError;

/// How log lines are written (the `log_format` setting).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines, coloured on a terminal.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields`,
    /// `span`, `spans`), for log collectors.
    Json,
}

impl LogFormat {
    /// The `log_format` setting: `text` (the default) or `json`.
    pub fn from_setting(value: Option<&str>) -> Result<LogFormat, ConfigError> {
        match value {
            None | Some("text") => Ok(LogFormat::Text),
            Some("json") => Ok(LogFormat::Json),
            Some(other) => Err(ConfigError::invalid(
                "log_format",
                &other,
                "must be \"text\" or \"json\"",
            )),
        }
    }
}

/// The `log` setting checked: a filter in `tracing`'s env-filter syntax,
/// `default` when unset.
pub fn filter_setting(value: Option<String>, default: &str) -> Result<String, ConfigError> {
    let filter = value.unwrap_or_else(|| default.to_owned());
    match tracing_subscriber::EnvFilter::try_new(&filter) {
        Ok(_) => Ok(filter),
        Err(e) => Err(ConfigError::invalid(
            "log",
            &filter,
            &format!("not a log filter ({e}); e.g. \"info,sqlx=warn\""),
        )),
    }
}

/// A log filter that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("{origin} = {value:?} is not a log filter: {cause}")]
pub struct BadFilter {
    /// Where it came from (`RUST_LOG`, or the setting).
    origin: &'static str,
    /// The filter as given.
    value: String,
    /// What is wrong with it (in the message already, so not a `source`
    /// that a chain printer would repeat).
    cause: tracing_subscriber::filter::ParseError,
}

/// `filter`, or `RUST_LOG` when that is set and not empty, parsed.
pub(crate) fn env_filter(filter: &str) -> Result<tracing_subscriber::EnvFilter, BadFilter> {
    match std::env::var("RUST_LOG") {
        Ok(env) if !env.trim().is_empty() => {
            tracing_subscriber::EnvFilter::try_new(&env).map_err(|cause| BadFilter {
                origin: "RUST_LOG",
                value: env.clone(),
                cause,
            })
        }
        _ => tracing_subscriber::EnvFilter::try_new(filter).map_err(|cause| BadFilter {
            origin: "the log setting",
            value: filter.to_owned(),
            cause,
        }),
    }
}

/// Sets up logging to standard error with `filter`, or `RUST_LOG` when
/// that is set and not empty; an unparsable filter is an error. A second
/// call in one process changes nothing. (Processes that export traces use
/// [`crate::init_telemetry`].)
pub fn init_tracing(filter: &str, format: LogFormat) -> Result<(), BadFilter> {
    let filter = env_filter(filter)?;
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        assert_eq!(LogFormat::from_setting(None).ok(), Some(LogFormat::Text));
        assert_eq!(
            LogFormat::from_setting(Some("json")).ok(),
            Some(LogFormat::Json)
        );
        let e = LogFormat::from_setting(Some("xml"))
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| e.contains("log_format")),
            "{e:?}"
        );
        assert_eq!(
            filter_setting(None, "info,sqlx=warn").ok().as_deref(),
            Some("info,sqlx=warn")
        );
        let e = filter_setting(Some("info,sqlx=loud".into()), "info")
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|e| e.contains("log") && e.contains("sqlx=loud")),
            "{e:?}"
        );
    }
}
