//! Cron schedules for recurring jobs (retention, snapshots, cleanup). The
//! `cron` crate wants a seconds field; the common five-field form
//! (`min hour day month weekday`) is accepted too and runs at second 0.

use std::fmt;
use std::future::Future;
use std::str::FromStr;

use chrono::{DateTime, Utc};

use crate::error::Error;

/// A parsed cron expression.
#[derive(Clone)]
pub struct CronSchedule {
    expr: String,
    schedule: cron::Schedule,
}

impl fmt::Debug for CronSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CronSchedule").field(&self.expr).finish()
    }
}

impl FromStr for CronSchedule {
    type Err = Error;

    /// Parses 5 fields (minute first), 6 (second first) or 7 (with year).
    fn from_str(expr: &str) -> Result<Self, Error> {
        let fields = expr.split_whitespace().count();
        let full = match fields {
            5 => format!("0 {expr}"),
            6 | 7 => expr.to_owned(),
            n => {
                return Err(Error::Schedule {
                    expr: expr.to_owned(),
                    reason: format!("expected 5, 6 or 7 fields, found {n}"),
                });
            }
        };
        let schedule = cron::Schedule::from_str(&full).map_err(|e| Error::Schedule {
            expr: expr.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(CronSchedule {
            expr: expr.to_owned(),
            schedule,
        })
    }
}

impl CronSchedule {
    /// The expression as written.
    pub fn expr(&self) -> &str {
        &self.expr
    }

    /// The first time strictly after `t` at which the schedule fires.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.schedule.after(&t).next()
    }

    /// Runs `job` at every firing time, forever (until the task is aborted).
    pub async fn run<F, Fut>(self, mut job: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = ()>,
    {
        while let Some(at) = self.next_after(Utc::now()) {
            let wait = (at - Utc::now()).to_std().unwrap_or_default();
            tokio::time::sleep(wait).await;
            job().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn five_field_form_fires_at_second_zero() -> Result<(), Error> {
        let s: CronSchedule = "*/15 * * * *".parse()?;
        let t = Utc
            .with_ymd_and_hms(2026, 1, 1, 10, 7, 30)
            .single()
            .expect("valid date");
        let next = s.next_after(t).expect("fires again");
        assert_eq!(
            next,
            Utc.with_ymd_and_hms(2026, 1, 1, 10, 15, 0)
                .single()
                .expect("valid date")
        );
        Ok(())
    }

    #[test]
    fn six_field_form_keeps_seconds() -> Result<(), Error> {
        let s: CronSchedule = "30 0 * * * *".parse()?;
        let t = Utc
            .with_ymd_and_hms(2026, 1, 1, 10, 7, 30)
            .single()
            .expect("valid date");
        let next = s.next_after(t).expect("fires again");
        assert_eq!(
            next,
            Utc.with_ymd_and_hms(2026, 1, 1, 11, 0, 30)
                .single()
                .expect("valid date")
        );
        Ok(())
    }

    #[test]
    fn bad_expressions_are_refused_with_the_reason() {
        for bad in ["", "* * *", "61 * * * *", "every minute please ok then"] {
            let err = bad.parse::<CronSchedule>().expect_err(bad);
            assert!(matches!(err, Error::Schedule { .. }), "{bad}: {err}");
        }
    }
}
