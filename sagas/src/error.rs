//! What can go wrong with a saga's definition or a stored saga record.

/// Errors of the saga crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A definition the caller gave breaks a rule; `field` names the first
    /// offending field, such as `branches[2].after`.
    #[error("invalid saga definition: {field}{}{reason}", if field.is_empty() { "" } else { ": " })]
    InvalidDefinition {
        /// The field, as a path from the definition (empty: the whole
        /// definition).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A stored record does not fit its definition (written by another
    /// version, or damaged): the saga cannot be restored from it.
    #[error("saga {id}: stored record does not fit its definition: {reason}")]
    Corrupt {
        /// The saga.
        id: String,
        /// What does not fit.
        reason: String,
    },
}

/// Results of the saga crate.
pub type Result<T> = std::result::Result<T, Error>;
