//! Checks of client-chosen names: message, transaction and saga ids,
//! service and consumer group names.

/// A fresh id for a message or a transaction whose client chose none: a
/// UUID v7 (its time in ms, then a counter seeded at random each ms and
/// random bits, so a process's ids increase), hyphenated, lower-case.
pub fn fresh_id() -> String {
    let mut buf = uuid::Uuid::encode_buffer();
    uuid::Uuid::now_v7()
        .hyphenated()
        .encode_lower(&mut buf)
        .to_owned()
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_ids_are_hyphenated_lower_case_uuid_v7s_that_increase() {
        let ids: Vec<String> = (0..1000).map(|_| fresh_id()).collect();
        for id in &ids {
            let parsed = uuid::Uuid::parse_str(id).expect("a UUID");
            assert_eq!(parsed.get_version_num(), 7, "{id}");
            assert_eq!(id, &parsed.hyphenated().to_string(), "{id}");
            assert_eq!(id.len(), 36);
            assert!(check_id("id", id).is_ok());
        }
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "ids of a process increase"
        );
    }
}
