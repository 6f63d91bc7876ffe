//! `tandem saga list|show`: what operators of a saga engine look at first,
//! which sagas are stuck or compensating, and where each branch is.

use std::io::Write;

use tandem_proto::coordinator as pb;

use crate::{connect, status};

/// Saga inspection.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum SagaCommand {
    /// Lists sagas, newest first.
    List {
        /// Only sagas with this status: running, compensating, succeeded or
        /// compensated.
        #[arg(long)]
        status: Option<String>,
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Shows one saga: each branch's action and compensation, with calls,
    /// failures and the latest error.
    Show {
        /// The saga's id.
        id: String,
    },
}

/// Text from participants, on one line.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn status_name(s: i32) -> &'static str {
    match pb::SagaStatus::try_from(s) {
        Ok(pb::SagaStatus::Running) => "running",
        Ok(pb::SagaStatus::Compensating) => "compensating",
        Ok(pb::SagaStatus::Succeeded) => "succeeded",
        Ok(pb::SagaStatus::Compensated) => "compensated",
        _ => "unknown",
    }
}

fn op_name(o: &Option<pb::BranchOpState>) -> String {
    let Some(o) = o else {
        return "-".into();
    };
    let s = match pb::BranchOpStatus::try_from(o.status) {
        Ok(pb::BranchOpStatus::Pending) => "pending",
        Ok(pb::BranchOpStatus::Calling) => "calling",
        Ok(pb::BranchOpStatus::Backoff) => "waiting to retry",
        Ok(pb::BranchOpStatus::Succeeded) => "succeeded",
        Ok(pb::BranchOpStatus::Failed) => "failed",
        Ok(pb::BranchOpStatus::Skipped) => "skipped",
        _ => "unknown",
    };
    match (o.calls, o.failures) {
        (0, _) => s.to_owned(),
        (c, 0) => format!("{s} ({c} calls)"),
        (c, f) => format!("{s} ({c} calls, {f} failed)"),
    }
}

/// Runs a saga command against the coordinator at `url`, writing to `out`.
pub async fn saga(url: &str, cmd: SagaCommand, out: &mut impl Write) -> anyhow::Result<()> {
    match cmd {
        SagaCommand::List {
            status: only,
            limit,
        } => {
            let wanted = match only.as_deref() {
                None => pb::SagaStatus::Unspecified,
                Some("running") => pb::SagaStatus::Running,
                Some("compensating") => pb::SagaStatus::Compensating,
                Some("succeeded") => pb::SagaStatus::Succeeded,
                Some("compensated") => pb::SagaStatus::Compensated,
                Some(other) => anyhow::bail!(
                    "--status: {other:?} is not running, compensating, succeeded or compensated"
                ),
            };
            let mut c = connect(url).await?;
            let sagas = c
                .list_sagas(pb::ListSagasRequest {
                    status: wanted as i32,
                    limit,
                })
                .await
                .map_err(status)?
                .into_inner()
                .sagas;
            writeln!(
                out,
                "{:<36} {:<13} {:<16} {:>8} {:>13}  reason",
                "saga", "status", "service", "branches", "started (ms)"
            )?;
            for s in sagas {
                writeln!(
                    out,
                    "{:<36} {:<13} {:<16} {:>8} {:>13}  {}",
                    s.saga_id,
                    status_name(s.status),
                    s.service,
                    s.branches.len(),
                    s.started_ms,
                    one_line(&s.reason)
                )?;
            }
        }
        SagaCommand::Show { id } => {
            let mut c = connect(url).await?;
            let s = c
                .get_saga(pb::GetSagaRequest { saga_id: id })
                .await
                .map_err(status)?
                .into_inner();
            writeln!(
                out,
                "saga {} of {}: {}",
                s.saga_id,
                s.service,
                status_name(s.status)
            )?;
            if !s.reason.is_empty() {
                writeln!(out, "reason: {}", one_line(&s.reason))?;
            }
            writeln!(
                out,
                "started_ms {}  finished_ms {}",
                s.started_ms, s.finished_ms
            )?;
            writeln!(
                out,
                "{:<3} {:<20} {:<16} {:<32} {:<32}",
                "#", "branch", "service", "action", "compensation"
            )?;
            for (i, b) in s.branches.iter().enumerate() {
                writeln!(
                    out,
                    "{:<3} {:<20} {:<16} {:<32} {:<32}",
                    i,
                    b.name,
                    b.service,
                    op_name(&b.action),
                    if s.status == pb::SagaStatus::Succeeded as i32 {
                        "not needed".to_owned()
                    } else {
                        op_name(&b.compensation)
                    }
                )?;
                for (what, o) in [("action", &b.action), ("compensation", &b.compensation)] {
                    if let Some(o) = o.as_ref().filter(|o| !o.error.is_empty()) {
                        writeln!(out, "    {what}: {}", one_line(&o.error))?;
                    }
                }
            }
        }
    }
    Ok(())
}
