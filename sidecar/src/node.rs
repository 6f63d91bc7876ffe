//! What every part of a running sidecar shares: its settings, the app's
//! database, the clients of the coordinator and of the app, and counters.

use std::sync::atomic::{AtomicU64, Ordering};

use tandem_proto::app::app_client::AppClient;
use tandem_proto::coordinator::coordinator_client::CoordinatorClient;
use tandem_proto::sidecar as sc;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::transport::{Channel, Endpoint};

use crate::config::Config;
use crate::db::Db;
use crate::error::{Error, Result};

/// Counters reported by `GetStats`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) delivered: AtomicU64,
    pub(crate) duplicates_skipped: AtomicU64,
    pub(crate) handled: AtomicU64,
    pub(crate) handler_failures: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) check_backs_answered: AtomicU64,
    pub(crate) committed: AtomicU64,
    pub(crate) rolled_back: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> sc::Stats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        sc::Stats {
            delivered: g(&self.delivered),
            duplicates_skipped: g(&self.duplicates_skipped),
            handled: g(&self.handled),
            handler_failures: g(&self.handler_failures),
            dead_lettered: g(&self.dead_lettered),
            check_backs_answered: g(&self.check_backs_answered),
            transactions_committed: g(&self.committed),
            transactions_rolled_back: g(&self.rolled_back),
        }
    }
}

type InboxRequest = (String, String, oneshot::Sender<Result<(), String>>);

/// Records processed messages in `tandem_inbox`, many per database
/// transaction: concurrent handlers' rows are gathered while the previous
/// batch commits (group commit, as the log does).
#[derive(Debug)]
pub(crate) struct Inbox {
    tx: mpsc::Sender<InboxRequest>,
}

impl Inbox {
    fn start(db: Db) -> Inbox {
        let (tx, mut rx) = mpsc::channel::<InboxRequest>(4096);
        // Ends when the node (the only sender) is dropped.
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < 512 {
                    match rx.try_recv() {
                        Ok(r) => batch.push(r),
                        Err(_) => break,
                    }
                }
                let rows: Vec<(String, String)> = batch
                    .iter()
                    .map(|(g, id, _)| (g.clone(), id.clone()))
                    .collect();
                let result = db.inbox_add_all(&rows).await.map_err(|e| e.to_string());
                for (_, _, reply) in batch {
                    let _ = reply.send(result.clone());
                }
            }
        });
        Inbox { tx }
    }

    /// Records that `group` processed `message_id`; resolves once committed.
    pub(crate) async fn add(&self, group: &str, message_id: &str) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((group.to_owned(), message_id.to_owned(), reply))
            .await
            .map_err(|_| Error::Inbox("the inbox writer stopped".into()))?;
        rx.await
            .map_err(|_| Error::Inbox("the inbox writer stopped".into()))?
            .map_err(Error::Inbox)
    }
}

/// The shared state of one sidecar.
#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) config: Config,
    pub(crate) db: Db,
    pub(crate) inbox: Inbox,
    pub(crate) coordinator: CoordinatorClient<Channel>,
    app: Option<AppClient<Channel>>,
    pub(crate) counters: Counters,
}

fn endpoint(url: &str) -> Result<Endpoint> {
    Endpoint::from_shared(url.to_owned()).map_err(|e| Error::invalid("url", format!("{url}: {e}")))
}

impl Node {
    pub(crate) fn new(config: Config, db: Db) -> Result<Node> {
        let max = tandem_coordinator::MAX_REQUEST_BYTES;
        let coordinator = CoordinatorClient::new(
            endpoint(&config.coordinator)?
                .tcp_nodelay(true)
                .connect_lazy(),
        )
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
        let app = match &config.app {
            Some(url) => Some(
                AppClient::new(endpoint(url)?.tcp_nodelay(true).connect_lazy())
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            ),
            None => None,
        };
        Ok(Node {
            config,
            inbox: Inbox::start(db.clone()),
            db,
            coordinator,
            app,
            counters: Counters::default(),
        })
    }

    /// The coordinator client (cheap to clone).
    pub(crate) fn coordinator(&self) -> CoordinatorClient<Channel> {
        self.coordinator.clone()
    }

    /// The app's callback client, or an error naming what needed it.
    pub(crate) fn app(&self, call: &'static str) -> Result<AppClient<Channel>> {
        self.app.clone().ok_or(Error::NoApp(call))
    }
}

/// Resolves once `flag` turns true (or its sender is gone).
pub(crate) async fn stopped(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|s| *s).await;
}
