//! What the benchmark drivers share.

use std::time::Duration;

use tandem_proto::coordinator as pb;
use tandem_proto::coordinator::coordinator_client::CoordinatorClient;

/// A fresh database on the PostgreSQL server of `url` (any of its
/// databases), as a coordinator store.
pub async fn fresh_store(url: &str) -> tandem_coordinator::Store {
    let name = format!(
        "tandem_bench_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    );
    tandem_coordinator::Store::Postgres {
        url: tandem_storage::PgStore::create_database(url, &name)
            .await
            .expect("create the bench database"),
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
