//! What every part of a running sidecar shares: its settings, the app's
//! database, the clients of the coordinator and of the app, and counters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tandem_proto::app::app_client::AppClient;
use tandem_proto::coordinator as pb;
use tandem_proto::coordinator::coordinator_client::CoordinatorClient;
use tandem_proto::sidecar as sc;
use tandem_runtime::tls::{ClientTls, TlsError};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tonic::transport::{Channel, Endpoint};
use tonic::{Response, Status};

use crate::config::Config;
use crate::coordinators::Coordinators;
use crate::db::{Admission, Admit, Db, InboxRow};
use crate::delivery::Claims;
use crate::error::{Error, Result};
use crate::transact::{self, Batcher};

/// Counters reported by `GetStats`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) delivered: AtomicU64,
    pub(crate) duplicates_skipped: AtomicU64,
    pub(crate) handled: AtomicU64,
    pub(crate) handler_failures: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) dead_letter_failures: AtomicU64,
    pub(crate) claim_waits: AtomicU64,
    pub(crate) redriven_for_other_groups: AtomicU64,
    pub(crate) sequence_gaps: AtomicU64,
    pub(crate) sequence_gap_messages: AtomicU64,
    pub(crate) retention_skipped: AtomicU64,
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
            dead_letter_failures: g(&self.dead_letter_failures),
            claim_waits: g(&self.claim_waits),
            redriven_for_other_groups: g(&self.redriven_for_other_groups),
            sequence_gaps: g(&self.sequence_gaps),
            sequence_gap_messages: g(&self.sequence_gap_messages),
            retention_skipped: g(&self.retention_skipped),
            check_backs_answered: g(&self.check_backs_answered),
            transactions_committed: g(&self.committed),
            transactions_rolled_back: g(&self.rolled_back),
        }
    }
}

enum InboxRequest {
    /// Record a processed message.
    Record(InboxRow, oneshot::Sender<Result<(), String>>),
    /// Check (and claim) a delivery about to be handled.
    Admit(Admit, oneshot::Sender<Result<Admission, String>>),
}

/// The sidecar's one writer to `tandem_inbox` and `tandem_claim`: the rows
/// of processed messages and the checks and claims of deliveries about to
/// be handled, gathered from concurrent handlers while the previous batch
/// commits, go in one database transaction (group commit, as the log
/// does); one writer means its own batches never wait for each other's
/// locks.
#[derive(Debug)]
pub(crate) struct Inbox {
    tx: mpsc::Sender<InboxRequest>,
}

fn writer_stopped() -> Error {
    Error::Inbox("the inbox writer stopped".into())
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
                let mut records = Vec::new();
                let mut admits = Vec::new();
                for r in &batch {
                    match r {
                        InboxRequest::Record(row, _) => records.push(row.clone()),
                        InboxRequest::Admit(a, _) => admits.push(a.clone()),
                    }
                }
                // Claims are timed now, when written: time spent queued
                // does not shorten them.
                let now = crate::check::now_ms();
                for c in admits.iter_mut().filter_map(|a| a.claim.as_mut()) {
                    let life = c.expires_at_ms.saturating_sub(c.now_ms);
                    c.now_ms = now;
                    c.expires_at_ms = now.saturating_add(life);
                }
                let result = db
                    .dedup_batch(&records, &admits)
                    .await
                    .map_err(|e| e.to_string());
                let mut answers = match &result {
                    Ok(a) => a.clone().into_iter(),
                    Err(_) => Vec::new().into_iter(),
                };
                for r in batch {
                    match r {
                        InboxRequest::Record(_, reply) => {
                            let _ = reply.send(result.clone().map(drop));
                        }
                        InboxRequest::Admit(_, reply) => {
                            let answer = match &result {
                                Ok(_) => answers
                                    .next()
                                    .ok_or_else(|| "an admission went unanswered".to_owned()),
                                Err(e) => Err(e.clone()),
                            };
                            let _ = reply.send(answer);
                        }
                    }
                }
            }
        });
        Inbox { tx }
    }

    /// Records a processed message; resolves once committed.
    pub(crate) async fn add(&self, row: InboxRow) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(InboxRequest::Record(row, reply))
            .await
            .map_err(|_| writer_stopped())?;
        rx.await
            .map_err(|_| writer_stopped())?
            .map_err(Error::Inbox)
    }

    /// Checks (and claims) a delivery; resolves once committed.
    pub(crate) async fn admit(&self, admit: Admit) -> Result<Admission> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(InboxRequest::Admit(admit, reply))
            .await
            .map_err(|_| writer_stopped())?;
        rx.await
            .map_err(|_| writer_stopped())?
            .map_err(Error::Inbox)
    }
}

/// Handler calls in progress, also those of ended sessions (which run to
/// their end and record their dedup row): shutdown waits for them, so that
/// a sidecar stopped with SIGTERM (a rolling update) leaves no call whose
/// effect landed without its record.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    count: AtomicUsize,
    idle: Notify,
}

/// One handler call counted in [`InFlight`] until dropped.
pub(crate) struct InFlightCall(Arc<InFlight>);

impl Drop for InFlightCall {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl InFlight {
    /// Counts a call until the returned value is dropped.
    pub(crate) fn enter(self: &Arc<Self>) -> InFlightCall {
        self.count.fetch_add(1, Ordering::AcqRel);
        InFlightCall(self.clone())
    }

    /// Waits until no call is in progress, at most `within`; whether none is.
    pub(crate) async fn idle_within(&self, within: Duration) -> bool {
        tokio::time::timeout(within, async {
            loop {
                let idle = self.idle.notified();
                if self.count.load(Ordering::Acquire) == 0 {
                    return;
                }
                idle.await;
            }
        })
        .await
        .is_ok()
    }
}

/// Transactions whose `ExecuteLocalTransaction` this sidecar has started
/// and not yet seen through: a check-back for one of them is answered from
/// here (UNKNOWN while the callback runs, its answer once it returned)
/// instead of asking the app, which cannot know yet.
#[derive(Debug, Default)]
pub(crate) struct Executing {
    txns: Mutex<HashMap<String, Option<pb::LocalState>>>,
}

/// One transaction in [`Executing`]; dropping it forgets the transaction.
pub(crate) struct Running<'a> {
    executing: &'a Executing,
    txn_id: String,
}

impl Executing {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<pb::LocalState>>> {
        self.txns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a transaction about to be prepared; a second call with the
    /// same id while the first runs is refused.
    pub(crate) fn start(&self, txn_id: &str) -> Result<Running<'_>> {
        let mut map = self.map();
        if map.contains_key(txn_id) {
            return Err(Error::InProgress(txn_id.to_owned()));
        }
        map.insert(txn_id.to_owned(), None);
        Ok(Running {
            executing: self,
            txn_id: txn_id.to_owned(),
        })
    }

    /// The answer for a check-back, if this sidecar is running the
    /// transaction's callback: UNKNOWN while it runs.
    pub(crate) fn state(&self, txn_id: &str) -> Option<pb::LocalState> {
        self.map()
            .get(txn_id)
            .map(|s| s.unwrap_or(pb::LocalState::Unknown))
    }
}

impl Running<'_> {
    /// The callback answered `state`.
    pub(crate) fn decided(&self, state: pb::LocalState) {
        if let Some(s) = self.executing.map().get_mut(&self.txn_id) {
            *s = Some(state);
        }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.executing.map().remove(&self.txn_id);
    }
}

/// The shared state of one sidecar.
#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) config: Config,
    pub(crate) db: Db,
    pub(crate) inbox: Inbox,
    /// Dedup keys being handled right now.
    pub(crate) claims: Claims,
    /// Callback-mode transactions being executed.
    pub(crate) executing: Executing,
    /// Handler calls in progress.
    pub(crate) in_flight: Arc<InFlight>,
    /// Handler calls in the app, to tell which message killed it.
    pub(crate) turns: crate::handler::Turns,
    /// The coordinator replicas.
    pub(crate) coordinators: Arc<Coordinators>,
    /// Prepares and outcomes gathered into `Transact` calls.
    batcher: Batcher,
    app: Option<AppClient<Channel>>,
    pub(crate) counters: Counters,
    /// Owner name of this process's claims in `tandem_claim`: the instance
    /// plus a per-process suffix, so a restarted sidecar (same instance
    /// name, e.g. pid 1 in a container) never takes its predecessor's claim
    /// for its own while that call may still run in the app.
    pub(crate) claim_owner: String,
}

fn endpoint(url: &str) -> Result<Endpoint> {
    Endpoint::from_shared(url.to_owned()).map_err(|e| Error::invalid("url", format!("{url}: {e}")))
}

impl Node {
    pub(crate) fn new(config: Config, db: Db) -> Result<Node> {
        let max = tandem_runtime::MAX_REQUEST_BYTES;
        let tls = match &config.tls {
            Some(files) => {
                let tls = ClientTls::new(files.clone(), config.coordinator_identity.clone())?;
                let me = tls.identity();
                if me.name != config.service {
                    return Err(TlsError::Settings(format!(
                        "service {:?} does not match this sidecar's certificate, which names {me}: a sidecar acts only for the service its certificate names",
                        config.service
                    ))
                    .into());
                }
                tracing::info!(identity = %me, "mutual TLS to the coordinator");
                Some(tls)
            }
            None => None,
        };
        let coordinators = Arc::new(Coordinators::new(&config.coordinator, tls)?);
        let app = match &config.app {
            Some(url) => {
                let channel = match tandem_runtime::unix::socket_path(url) {
                    Some(path) => tandem_runtime::unix::lazy_channel(path),
                    None => endpoint(url)?.tcp_nodelay(true).connect_lazy(),
                };
                Some(
                    AppClient::new(channel)
                        .max_decoding_message_size(max)
                        .max_encoding_message_size(max),
                )
            }
            None => None,
        };
        Ok(Node {
            claim_owner: format!("{}#{}", config.instance, uuid::Uuid::now_v7().simple()),
            config,
            inbox: Inbox::start(db.clone()),
            claims: Claims::default(),
            executing: Executing::default(),
            in_flight: Arc::default(),
            turns: crate::handler::Turns::default(),
            db,
            batcher: Batcher::start(coordinators.clone()),
            coordinators,
            app,
            counters: Counters::default(),
        })
    }

    /// Runs a unary call on a coordinator replica that serves (see
    /// [`Coordinators::call`]).
    pub(crate) async fn call<T, F, Fut>(&self, call: F) -> std::result::Result<Response<T>, Status>
    where
        F: FnMut(CoordinatorClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<Response<T>, Status>>,
    {
        self.coordinators.call(call).await
    }

    /// Sends a prepare, commit or rollback to a coordinator replica that
    /// serves, in a `Transact` call with other transactions' items, retried
    /// as [`call`](Self::call) retries.
    pub(crate) async fn transact(
        &self,
        item: pb::transact_item::Kind,
    ) -> std::result::Result<pb::transact_result::Kind, Status> {
        self.coordinators
            .retrying(|| async {
                match self.batcher.submit(item.clone()).await {
                    (_, Err(s)) if s.code() == tonic::Code::Unimplemented => {
                        let (index, client) = self.coordinators.pick();
                        (index, transact::unary(client, item.clone()).await)
                    }
                    answer => answer,
                }
            })
            .await
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
