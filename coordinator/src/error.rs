//! The coordinator's error type and, in one place, its mapping to gRPC
//! status codes. Caller mistakes name the field at fault; faults of the
//! storage underneath are internal errors and say which file.

/// Everything a coordinator operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A field of the request is malformed or out of range.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The field, as a path into the request (`messages[3].id`).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A named thing does not exist.
    #[error("{what} {name:?} does not exist")]
    NotFound {
        /// What kind of thing (`topic`, `transaction`).
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// A named thing exists already.
    #[error("{what} {name:?} already exists")]
    AlreadyExists {
        /// What kind of thing.
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// An id already names a transaction with other content.
    #[error(
        "transaction {id:?} already exists with {what}: an id names one transaction for as long as the coordinator remembers it (txn_retention_ms after it ends)"
    )]
    IdConflict {
        /// The id.
        id: String,
        /// What differs.
        what: &'static str,
    },
    /// A publisher-chosen message id was published recently with other
    /// content.
    #[error(
        "{field}: message id {id:?} was published within the last {window_ms} ms with other content (key, value or headers); a retry must repeat the message exactly, a new message needs a new id"
    )]
    DuplicateId {
        /// The field naming the id.
        field: String,
        /// The id.
        id: String,
        /// The dedup window.
        window_ms: u64,
    },
    /// A plain message reuses the id of a transaction.
    #[error(
        "{field}: {id:?} is the id of a transaction the coordinator remembers; a plain message needs an id of its own"
    )]
    TransactionId {
        /// The field naming the id.
        field: String,
        /// The id.
        id: String,
    },
    /// A log write or fsync failed: the coordinator stops (see
    /// `EmbeddedLog::failed`).
    #[error("storage failed, stopping (restart to recover from disk): {0}")]
    StorageFailed(String),
    /// A task the coordinator relies on failed.
    #[error("internal error: {0}")]
    Internal(String),
    /// A field is larger than allowed.
    #[error("{field} is {size} bytes, over the limit of {max} bytes")]
    TooLarge {
        /// The field.
        field: String,
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// An operator's search read as much as one call may without an answer.
    #[error("{0}")]
    ScanLimit(String),
    /// The operation does not fit the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// An internal state log holds a record that cannot be decoded: start-up
    /// stops rather than rebuild a state that may have gone back in time.
    #[error(
        "internal log {log} holds an undecodable record at offset {offset}: {reason} (restore the data folder, or remove the record by hand)"
    )]
    CorruptState {
        /// The internal log.
        log: &'static str,
        /// The record's offset in it.
        offset: u64,
        /// What the decoder said.
        reason: String,
    },
    /// The coordinator is shutting down.
    #[error("the coordinator is shutting down")]
    ShuttingDown,
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Serve(String),
    /// The TLS files or settings cannot be used.
    #[error(transparent)]
    Tls(#[from] tandem_runtime::tls::TlsError),
    /// The storage underneath failed.
    #[error(transparent)]
    Storage(#[from] tandem_storage::Error),
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<tandem_runtime::InvalidField> for Error {
    fn from(e: tandem_runtime::InvalidField) -> Error {
        Error::InvalidArgument {
            field: e.field,
            reason: e.reason,
        }
    }
}

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
        use tandem_storage::Error as S;
        use tonic::Code;
        let code = match &e {
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::NotFound { .. } => Code::NotFound,
            Error::AlreadyExists { .. }
            | Error::IdConflict { .. }
            | Error::DuplicateId { .. }
            | Error::TransactionId { .. } => Code::AlreadyExists,
            Error::TooLarge { .. } | Error::ScanLimit(_) => Code::ResourceExhausted,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::ShuttingDown => Code::Unavailable,
            Error::Bind { .. }
            | Error::Serve(_)
            | Error::Tls(_)
            | Error::Internal(_)
            | Error::StorageFailed(_)
            | Error::CorruptState { .. } => Code::Internal,
            Error::Storage(s) => match s {
                S::UnknownPartition(_) => Code::NotFound,
                S::PartitionExists(_) => Code::AlreadyExists,
                S::InvalidTopicName { .. } | S::EmptyBatch | S::FieldTooLong { .. } => {
                    Code::InvalidArgument
                }
                S::RecordTooLarge { .. } | S::BatchTooLarge { .. } => Code::ResourceExhausted,
                S::OffsetOutOfRange { .. } => Code::OutOfRange,
                // The log stopped taking writes (a failed write, a lease
                // taken over, the database gone): this replica stops serving
                // and the request may be retried, here or on another.
                S::Closed | S::Poisoned { .. } | S::Store { .. } | S::Fenced { .. } => {
                    Code::Unavailable
                }
                _ => Code::Internal,
            },
        };
        if code == Code::Internal {
            tracing::error!(error = %e, "internal error");
        }
        tonic::Status::new(code, e.to_string())
    }
}
