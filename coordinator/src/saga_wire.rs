//! Sagas on the wire: definitions from `tandem.coordinator.v1` checked and
//! given their defaults, a saga start carried by a half message for
//! [`SAGA_TOPIC`], and a saga's state as the API shows it.

use tandem_proto::coordinator as pb;
use tandem_sagas::{BranchDef, Op, OpRecord, OpStatus, Saga, SagaDef, SagaStatus};

use crate::error::{Error, Result};
use crate::saga::SAGA_TOPIC;

/// A definition the state machine refused, as INVALID_ARGUMENT naming the
/// field under `prefix`.
pub(crate) fn definition_error(prefix: &str, e: tandem_sagas::Error) -> Error {
    match e {
        tandem_sagas::Error::InvalidDefinition { field, reason } if field.is_empty() => {
            Error::invalid(prefix, reason)
        }
        tandem_sagas::Error::InvalidDefinition { field, reason } => {
            Error::invalid(format!("{prefix}.{field}"), reason)
        }
        other => Error::Internal(other.to_string()),
    }
}

/// Checks the `StartSagaRequest` carried by a half message for
/// [`SAGA_TOPIC`]; returns the value to store, naming `service` (the
/// preparing service) as the saga's, with the saga's id and definition.
pub(crate) fn check_start(service: &str, value: &[u8]) -> Result<(bytes::Bytes, String, SagaDef)> {
    use prost::Message;
    let mut req = pb::StartSagaRequest::decode(value).map_err(|e| {
        Error::invalid(
            "message.value",
            format!("a message for {SAGA_TOPIC} must be a StartSagaRequest: {e}"),
        )
    })?;
    crate::service::check_id("message.value.saga_id", &req.saga_id)?;
    let def = req
        .definition
        .clone()
        .ok_or_else(|| Error::invalid("message.value.definition", "is required"))?;
    let def = definition_from_wire("message.value.definition", def)?;
    def.validate()
        .map_err(|e| definition_error("message.value.definition", e))?;
    req.service = service.to_owned();
    Ok((req.encode_to_vec().into(), req.saga_id, def))
}

fn or_default<T: PartialEq + Default>(v: T, default: T) -> T {
    if v == T::default() { default } else { v }
}

/// A definition from the wire, defaults filled in; checked by the state
/// machine when the saga starts.
pub(crate) fn definition_from_wire(field: &str, d: pb::SagaDefinition) -> Result<SagaDef> {
    let mut branches = Vec::with_capacity(d.branches.len());
    for (i, b) in d.branches.into_iter().enumerate() {
        if !d.concurrent && !b.after.is_empty() {
            return Err(Error::invalid(
                format!("{field}.branches[{i}].after"),
                "only a concurrent saga names what a branch waits for (set definition.concurrent)",
            ));
        }
        branches.push(BranchDef {
            name: b.name,
            service: b.service,
            action: b.action,
            compensation: b.compensation,
            payload: b.payload,
            after: b.after,
            max_attempts: or_default(b.max_attempts, tandem_sagas::DEFAULT_MAX_ATTEMPTS),
            timeout_ms: or_default(b.timeout_ms, tandem_sagas::DEFAULT_TIMEOUT_MS),
            initial_backoff_ms: or_default(
                b.initial_backoff_ms,
                tandem_sagas::DEFAULT_INITIAL_BACKOFF_MS,
            ),
            max_backoff_ms: or_default(b.max_backoff_ms, tandem_sagas::DEFAULT_MAX_BACKOFF_MS),
        });
    }
    let mut def = match d.concurrent {
        true => SagaDef {
            branches,
            timeout_ms: 0,
        },
        false => SagaDef::sequential(branches),
    };
    def.timeout_ms = d.timeout_ms;
    Ok(def)
}

fn op_to_wire(o: &OpRecord) -> pb::BranchOpState {
    let status = match o.status() {
        OpStatus::Pending => pb::BranchOpStatus::Pending,
        OpStatus::Calling => pb::BranchOpStatus::Calling,
        OpStatus::Backoff => pb::BranchOpStatus::Backoff,
        OpStatus::Succeeded => pb::BranchOpStatus::Succeeded,
        OpStatus::Failed => pb::BranchOpStatus::Failed,
        OpStatus::Skipped => pb::BranchOpStatus::Skipped,
    };
    pb::BranchOpState {
        status: status as i32,
        calls: o.calls,
        failures: o.failures,
        error: o.error.clone(),
    }
}

/// The wire form of a saga's status.
pub(crate) fn status_to_wire(s: SagaStatus) -> pb::SagaStatus {
    match s {
        SagaStatus::Running => pb::SagaStatus::Running,
        SagaStatus::Compensating => pb::SagaStatus::Compensating,
        SagaStatus::Succeeded => pb::SagaStatus::Succeeded,
        SagaStatus::Compensated => pb::SagaStatus::Compensated,
    }
}

/// A status filter from the wire: `None` for every status.
pub(crate) fn status_from_wire(s: i32) -> Result<Option<SagaStatus>> {
    Ok(match pb::SagaStatus::try_from(s) {
        Ok(pb::SagaStatus::Unspecified) => None,
        Ok(pb::SagaStatus::Running) => Some(SagaStatus::Running),
        Ok(pb::SagaStatus::Compensating) => Some(SagaStatus::Compensating),
        Ok(pb::SagaStatus::Succeeded) => Some(SagaStatus::Succeeded),
        Ok(pb::SagaStatus::Compensated) => Some(SagaStatus::Compensated),
        Err(_) => return Err(Error::invalid("status", format!("unknown status {s}"))),
    })
}

pub(crate) fn to_wire(service: &str, saga: &Saga, with_definition: bool) -> pb::Saga {
    let rec = saga.record();
    let def = saga.definition();
    let concurrent = def.branches.iter().enumerate().any(|(i, b)| match i {
        0 => !b.after.is_empty(),
        _ => b.after != [(i - 1) as u32],
    });
    pb::Saga {
        saga_id: rec.id.clone(),
        service: service.to_owned(),
        status: status_to_wire(saga.status()) as i32,
        reason: rec.reason.clone(),
        started_ms: rec.started_ms,
        finished_ms: rec.finished_ms,
        branches: def
            .branches
            .iter()
            .zip(&rec.branches)
            .map(|(d, r)| pb::SagaBranchState {
                name: d.name.clone(),
                service: d.service.clone(),
                action: Some(op_to_wire(r.op(Op::Action))),
                compensation: Some(op_to_wire(r.op(Op::Compensation))),
            })
            .collect(),
        definition: with_definition.then(|| pb::SagaDefinition {
            branches: def
                .branches
                .iter()
                .map(|b| pb::SagaBranch {
                    name: b.name.clone(),
                    service: b.service.clone(),
                    action: b.action.clone(),
                    compensation: b.compensation.clone(),
                    payload: b.payload.clone(),
                    after: if concurrent {
                        b.after.clone()
                    } else {
                        Vec::new()
                    },
                    max_attempts: b.max_attempts,
                    timeout_ms: b.timeout_ms,
                    initial_backoff_ms: b.initial_backoff_ms,
                    max_backoff_ms: b.max_backoff_ms,
                })
                .collect(),
            concurrent,
            timeout_ms: def.timeout_ms,
        }),
    }
}
