//! Named fault points for fault tests and the demo, armed by
//! `TANDEM_FAILPOINTS` in a process's environment (comma-separated):
//!
//! - `a` or `a@3`: the process aborts the moment it reaches point `a` (the
//!   third time, with `@3`): no cleanup, no flush, as abrupt as SIGKILL;
//! - `a=error` or `a@3=error`: from that hit on, [`error`] reports that the
//!   operation at `a` fails, as a disk that went bad would (the storage
//!   writer's `storage.fdatasync:<topic>/<partition>` and
//!   `storage.write:<topic>/<partition>` points);
//! - `a=delay:20`: every time the operation at `a` runs it first takes 20 ms
//!   longer, as a slow disk would (the storage `storage.read:<topic>/<partition>`
//!   point).
//!
//! A name ending in `*` arms every point whose name starts with what comes
//! before it (`storage.read:orders/*`: every partition of `orders`, not
//! `orders.dlq`), and counts the hits of all of them together (`@3` is the
//! third hit of any).
//!
//! Unset, a point costs one check of an already-parsed list.
//!
//! Only with the cargo feature `failpoints` (on in the test builds, through
//! `tandem-e2e`'s default features): without it, as in a release build of
//! `tandem`, every point is an empty function and a `TANDEM_FAILPOINTS` in
//! the environment stops the process at start with an error, so that no
//! environment variable can make a production process abort or fail.

#[cfg(feature = "failpoints")]
pub use armed::{armed, delay, error, hit, init};
#[cfg(not(feature = "failpoints"))]
pub use unarmed::{armed, delay, error, hit, init};

/// The points of a build without the feature: none is ever reached.
#[cfg(not(feature = "failpoints"))]
mod unarmed {
    use std::time::Duration;

    /// Refuses a `TANDEM_FAILPOINTS` this build cannot honour.
    pub fn init() -> Result<(), String> {
        match std::env::var("TANDEM_FAILPOINTS") {
            Ok(v) if !v.trim().is_empty() => Err(
                "TANDEM_FAILPOINTS is set, but this build has no fault points (the cargo feature failpoints of tandem-storage is off)".to_owned(),
            ),
            _ => Ok(()),
        }
    }

    /// Nothing.
    #[inline(always)]
    pub fn hit(_: &str) {}

    /// Never.
    #[inline(always)]
    pub fn error(_: &str) -> bool {
        false
    }

    /// Never.
    #[inline(always)]
    pub fn delay(_: &str) -> Option<Duration> {
        None
    }

    /// Never.
    #[inline(always)]
    pub fn armed() -> bool {
        false
    }
}

/// The points of a build with the feature, armed by `TANDEM_FAILPOINTS`.
#[cfg(feature = "failpoints")]
mod armed {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Action {
        Abort,
        Error,
        Delay(Duration),
    }

    struct Point {
        name: String,
        /// Fire on this hit (1 = the first).
        at: u64,
        action: Action,
        hits: AtomicU64,
    }

    impl Point {
        fn matches(&self, name: &str) -> bool {
            match self.name.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => self.name == name,
            }
        }
    }

    static POINTS: OnceLock<Vec<Point>> = OnceLock::new();

    fn parse(spec: &str) -> Result<Vec<Point>, String> {
        spec.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|entry| {
                let bad = |why: &str| format!("TANDEM_FAILPOINTS: {entry:?}: {why}");
                let (s, action) = match entry.split_once('=') {
                    Some((rest, how)) => match how.trim() {
                        "error" => (rest.trim(), Action::Error),
                        how => match how.strip_prefix("delay:").map(|ms| ms.trim().parse()) {
                            Some(Ok(ms)) => (rest.trim(), Action::Delay(Duration::from_millis(ms))),
                            _ => return Err(bad("after '=' comes error or delay:<ms>")),
                        },
                    },
                    None => (entry, Action::Abort),
                };
                let (name, at) = match s.split_once('@') {
                    Some((n, at)) => match at.trim().parse() {
                        Ok(at) if at >= 1 => (n.trim(), at),
                        _ => return Err(bad("after '@' comes a hit number from 1")),
                    },
                    None => (s, 1),
                };
                if name.is_empty() {
                    return Err(bad("no point name"));
                }
                Ok(Point {
                    name: name.to_owned(),
                    at,
                    action,
                    hits: AtomicU64::new(0),
                })
            })
            .collect()
    }

    fn from_env() -> Result<Vec<Point>, String> {
        parse(&std::env::var("TANDEM_FAILPOINTS").unwrap_or_default())
    }

    /// Reads `TANDEM_FAILPOINTS` now. Processes call it first thing, so that
    /// a malformed list stops them at start-up with an error naming the entry
    /// instead of at the first point reached.
    pub fn init() -> Result<(), String> {
        let points = from_env()?;
        let _ = POINTS.set(points);
        Ok(())
    }

    fn points() -> &'static [Point] {
        POINTS.get_or_init(|| from_env().unwrap_or_else(|e| panic!("{e}")))
    }

    /// Aborts the process if `name` is an armed abort point reached for the
    /// armed time.
    pub fn hit(name: &str) {
        for p in points()
            .iter()
            .filter(|p| p.action == Action::Abort && p.matches(name))
        {
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
        for p in points
            .iter()
            .filter(|p| p.action == Action::Error && p.matches(name))
        {
            if p.hits.fetch_add(1, Ordering::Relaxed) + 1 >= p.at {
                failed = true;
            }
        }
        failed
    }

    /// How long the operation at `name` must be held up first (the longest of
    /// the delay points armed for it and reached their hit).
    pub fn delay(name: &str) -> Option<Duration> {
        delay_in(points(), name)
    }

    fn delay_in(points: &[Point], name: &str) -> Option<Duration> {
        let mut longest = None;
        for p in points.iter().filter(|p| p.matches(name)) {
            if let Action::Delay(d) = p.action
                && p.hits.fetch_add(1, Ordering::Relaxed) + 1 >= p.at
            {
                longest = longest.max(Some(d));
            }
        }
        longest
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
            let p = parse("x@3=error, y, z = error").expect("well formed");
            assert_eq!(
                (0..5).map(|_| error_in(&p, "x")).collect::<Vec<_>>(),
                vec![false, false, true, true, true]
            );
            assert!(!error_in(&p, "y"), "an abort point never reports an error");
            assert!(error_in(&p, "z"));
            assert!(!error_in(&p, "other"));
        }

        #[test]
        fn delay_points_hold_up_every_name_they_match() {
            let p = parse("storage.read:t/*=delay:20, x@2=delay:5, y=error").expect("well formed");
            let ms = Duration::from_millis;
            assert_eq!(delay_in(&p, "storage.read:t/0"), Some(ms(20)));
            assert_eq!(delay_in(&p, "storage.read:t/3"), Some(ms(20)));
            assert_eq!(delay_in(&p, "storage.read:u/0"), None);
            assert_eq!(delay_in(&p, "x"), None, "not before its hit");
            assert_eq!(delay_in(&p, "x"), Some(ms(5)));
            assert_eq!(delay_in(&p, "y"), None, "an error point is no delay");
            assert!(!error_in(&p, "storage.read:t/0"), "a delay is no error");
        }

        #[test]
        fn a_malformed_list_is_refused_naming_the_entry() {
            for (spec, why) in [
                (
                    "a, x=dealy:5",
                    "\"x=dealy:5\": after '=' comes error or delay",
                ),
                ("x@two", "\"x@two\": after '@' comes a hit number"),
                ("x@0=error", "\"x@0=error\": after '@' comes a hit number"),
                ("=error", "no point name"),
            ] {
                let e = parse(spec).err().unwrap_or_default();
                assert!(e.contains(why), "{spec}: {e}");
            }
        }
    }
}
