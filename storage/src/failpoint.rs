//! Named fault points for fault tests and the demo, armed by
//! `TANDEM_FAILPOINTS` in a process's environment (comma-separated):
//!
//! - `a` or `a@3`: the process aborts the moment it reaches point `a` (the
//!   third time, with `@3`): no cleanup, no flush, as abrupt as SIGKILL;
//! - `a=error` or `a@3=error`: from that hit on, [`error`] reports that the
//!   operation at `a` fails, as a disk that went bad would (the storage
//!   writer's `storage.fdatasync:<topic>/<partition>` and
//!   `storage.write:<topic>/<partition>` points).
//!
//! Unset, a point costs one check of an already-parsed list.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

struct Point {
    name: String,
    /// Fire on this hit (1 = the first).
    at: u64,
    /// Report an error from `at` on instead of aborting.
    error: bool,
    hits: AtomicU64,
}

static POINTS: OnceLock<Vec<Point>> = OnceLock::new();

fn parse(spec: &str) -> Vec<Point> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            let (s, error) = match s.strip_suffix("=error") {
                Some(rest) => (rest, true),
                None => (s, false),
            };
            let (name, at) = match s.split_once('@') {
                Some((n, at)) => (n, at.parse().unwrap_or(1)),
                None => (s, 1),
            };
            Point {
                name: name.to_owned(),
                at,
                error,
                hits: AtomicU64::new(0),
            }
        })
        .collect()
}

fn points() -> &'static [Point] {
    POINTS.get_or_init(|| parse(&std::env::var("TANDEM_FAILPOINTS").unwrap_or_default()))
}

/// Aborts the process if `name` is an armed abort point reached for the
/// armed time.
pub fn hit(name: &str) {
    for p in points().iter().filter(|p| p.name == name && !p.error) {
        if p.hits.fetch_add(1, Ordering::Relaxed) + 1 == p.at {
            eprintln!("failpoint {name} reached (hit {}): aborting", p.at);
            std::process::abort();
        }
    }
}

/// True if the operation at `name` must fail now: `name` is an armed error
/// point reached at least the armed number of times.
pub fn error(name: &str) -> bool {
    error_in(points(), name)
}

fn error_in(points: &[Point], name: &str) -> bool {
    let mut failed = false;
    for p in points.iter().filter(|p| p.name == name && p.error) {
        if p.hits.fetch_add(1, Ordering::Relaxed) + 1 >= p.at {
            failed = true;
        }
    }
    failed
}

/// True when any fault point is armed (callers may skip building names).
pub fn armed() -> bool {
    !points().is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_points_fail_from_their_hit_on_and_abort_points_are_apart() {
        let p = parse("x@3=error, y, z=error");
        assert_eq!(
            (0..5).map(|_| error_in(&p, "x")).collect::<Vec<_>>(),
            vec![false, false, true, true, true]
        );
        assert!(!error_in(&p, "y"), "an abort point never reports an error");
        assert!(error_in(&p, "z"));
        assert!(!error_in(&p, "other"));
    }
}
