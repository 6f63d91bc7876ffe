//! A fresh PostgreSQL database per test, on the server `scripts/test.sh`
//! starts (`TANDEM_TEST_POSTGRES`).

#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicU32, Ordering};

/// The URL of a new, empty database; `None` when no server was given and
/// none is required (`TANDEM_REQUIRE_POSTGRES` unset): the caller then says
/// it skipped. When one is required and missing, this panics: the test
/// fails, it does not pass.
pub async fn fresh_database() -> Result<Option<String>, Box<dyn std::error::Error>> {
    let Ok(admin) = std::env::var("TANDEM_TEST_POSTGRES") else {
        assert!(
            std::env::var_os("TANDEM_REQUIRE_POSTGRES").is_none(),
            "TANDEM_TEST_POSTGRES is not set but PostgreSQL tests are required"
        );
        eprintln!("skipped: no TANDEM_TEST_POSTGRES (scripts/test.sh provides one)");
        return Ok(None);
    };
    static N: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "tandem_t{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    Ok(Some(
        tandem_storage::PgStore::create_database(&admin, &name).await?,
    ))
}
