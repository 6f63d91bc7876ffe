//! Named crash points for fault tests. With `TANDEM_FAILPOINTS=a,b` in its
//! environment a process aborts the moment it reaches point `a` or `b`: no
//! cleanup, no flush, as abrupt as SIGKILL. Unset, a point costs one check
//! of an already-parsed list.

use std::sync::OnceLock;

static POINTS: OnceLock<Vec<String>> = OnceLock::new();

fn points() -> &'static [String] {
    POINTS.get_or_init(|| {
        std::env::var("TANDEM_FAILPOINTS")
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Aborts the process if `name` is an armed failpoint.
pub fn hit(name: &str) {
    if points().iter().any(|p| p == name) {
        eprintln!("failpoint {name} reached: aborting");
        std::process::abort();
    }
}
