//! Checks of client-chosen names: message, transaction and saga ids,
//! service and consumer group names.

/// Longest id accepted.
pub const MAX_ID_LEN: usize = 128;

/// A field whose value is refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidField {
    /// The field, as the request names it (`messages[3].id`).
    pub field: String,
    /// What is wrong with its value.
    pub reason: String,
}

fn invalid(field: &str, reason: impl Into<String>) -> InvalidField {
    InvalidField {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// Checks a client-chosen id (message or transaction): 1 to 128 bytes, no
/// control characters.
pub fn check_id(field: &str, id: &str) -> Result<(), InvalidField> {
    if id.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(invalid(
            field,
            format!("is {} bytes, longer than {MAX_ID_LEN}", id.len()),
        ));
    }
    if id.chars().any(char::is_control) {
        return Err(invalid(field, "must not contain control characters"));
    }
    Ok(())
}

/// Checks a consumer group name: 1 to 255 bytes, no control characters.
pub fn check_group(field: &str, group: &str) -> Result<(), InvalidField> {
    if group.is_empty() || group.len() > 255 || group.chars().any(char::is_control) {
        return Err(invalid(
            field,
            "must be 1 to 255 bytes without control characters",
        ));
    }
    Ok(())
}

impl From<InvalidField> for tonic::Status {
    fn from(e: InvalidField) -> tonic::Status {
        tonic::Status::invalid_argument(e.to_string())
    }
}
