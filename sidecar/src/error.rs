//! The sidecar's error type and, in one place, its mapping to gRPC status
//! codes for the app.

/// Everything a sidecar operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is malformed.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The field.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// The coordinator refused or failed a call; its status is passed on.
    #[error("coordinator: {}", .0.message())]
    Coordinator(tonic::Status),
    /// The app's callback server failed or is unreachable.
    #[error("app callback {call} failed: {}", status.message())]
    App {
        /// Which callback.
        call: &'static str,
        /// Its status.
        status: tonic::Status,
    },
    /// A transaction with this id is already being executed by this sidecar.
    #[error("transaction {0:?} is already being executed by this sidecar")]
    InProgress(String),
    /// The app has no callback server configured (`--app`).
    #[error("no app callback server is configured (--app): {0} needs one")]
    NoApp(&'static str),
    /// A database statement failed.
    #[error("database: cannot {what}: {source}")]
    Db {
        /// What was being done.
        what: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// Recording processed messages in `tandem_inbox` failed.
    #[error("dedup table: {0}")]
    Inbox(String),
    /// Tandem's tables could not be created.
    #[error("database migration failed: {0}")]
    Migrate(String),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The Unix socket could not be bound.
    #[error("cannot listen on unix:{}: {source}", path.display())]
    BindSocket {
        /// The socket's path.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Serve(String),
    /// The TLS files cannot be used, or do not name this service.
    #[error(transparent)]
    Tls(#[from] tandem_runtime::tls::TlsError),
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> tonic::Status {
        use tonic::Code;
        match e {
            Error::InvalidArgument { .. } => tonic::Status::invalid_argument(e.to_string()),
            // Not ALREADY_EXISTS (that means "other content"): the same call
            // is still running; try again later or ask GetTransaction.
            Error::InProgress(_) => tonic::Status::aborted(e.to_string()),
            // The coordinator's verdict (NOT_FOUND, PERMISSION_DENIED, ...) is the answer.
            Error::Coordinator(s) => tonic::Status::new(s.code(), s.message().to_owned()),
            Error::App { .. } | Error::NoApp(_) => {
                tonic::Status::new(Code::FailedPrecondition, e.to_string())
            }
            Error::Db { .. }
            | Error::Inbox(_)
            | Error::Migrate(_)
            | Error::Bind { .. }
            | Error::BindSocket { .. }
            | Error::Serve(_)
            | Error::Tls(_) => {
                tracing::error!(error = %e, "internal error");
                tonic::Status::internal(e.to_string())
            }
        }
    }
}
