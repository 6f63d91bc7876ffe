//! Named crash points for fault tests and the demo. With
//! `TANDEM_FAILPOINTS=a,b@3` in its environment a process aborts the moment
//! it reaches point `a`, or the third time it reaches `b`: no cleanup, no
//! flush, as abrupt as SIGKILL. Unset, a point costs one check of an
//! already-parsed list.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

struct Point {
    name: String,
    /// Abort on this hit (1 = the first).
    at: u64,
    hits: AtomicU64,
}

static POINTS: OnceLock<Vec<Point>> = OnceLock::new();

fn points() -> &'static [Point] {
    POINTS.get_or_init(|| {
        std::env::var("TANDEM_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                let (name, at) = match s.split_once('@') {
                    Some((n, at)) => (n, at.parse().unwrap_or(1)),
                    None => (s, 1),
                };
                Point {
                    name: name.to_owned(),
                    at,
                    hits: AtomicU64::new(0),
                }
            })
            .collect()
    })
}

/// Aborts the process if `name` is an armed failpoint reached for the
/// armed time.
pub fn hit(name: &str) {
    for p in points().iter().filter(|p| p.name == name) {
        if p.hits.fetch_add(1, Ordering::Relaxed) + 1 == p.at {
            eprintln!("failpoint {name} reached (hit {}): aborting", p.at);
            std::process::abort();
        }
    }
}
