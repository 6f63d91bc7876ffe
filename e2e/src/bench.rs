//! What the benchmark drivers share.

use std::time::Duration;

use tandem_proto::coordinator as pb;
use tandem_proto::coordinator::coordinator_client::CoordinatorClient;

/// A fresh database on the PostgreSQL server of `url` (any of its
/// databases), as a coordinator store.
pub async fn fresh_store(url: &str) -> tandem_coordinator::Store {
    use sqlx::Connection;
    let name = format!("tandem_bench_{}", std::process::id());
    let mut c = sqlx::PgConnection::connect(url)
        .await
        .expect("connect to PostgreSQL");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name}"
    )))
    .execute(&mut c)
    .await
    .expect("drop an earlier bench database");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut c)
        .await
        .expect("create the bench database");
    let (base, _) = url.rsplit_once('/').expect("a URL with a database");
    tandem_coordinator::Store::Postgres {
        url: format!("{base}/{name}"),
    }
}

/// Waits until the coordinator at `url` serves (on PostgreSQL: holds the
/// lease), at most 30 s.
pub async fn wait_serving(url: &str) {
    for _ in 0..3000 {
        if let Ok(mut c) = CoordinatorClient::connect(url.to_owned()).await
            && c.list_topics(pb::ListTopicsRequest {}).await.is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the coordinator at {url} did not serve within 30 s");
}
