//! A small test application for the fault tests: it implements the app
//! callback API over its own SQLite database (shared with its sidecar), and
//! behaves as the message's value tells it, so a test can make a local
//! transaction commit, roll back, crash, hang or answer UNKNOWN.
//!
//! Local transactions (callback mode) insert `business(txn_id, value)`.
//! `ExecuteLocalTransaction` by value prefix:
//! - `commit…`: insert, commit, answer COMMIT;
//! - `rollback…`: answer ROLLBACK (nothing inserted);
//! - `crash…`: insert, then abort the process before committing;
//! - `unknown…`: insert, commit, but answer UNKNOWN (the answer is lost);
//! - `check-unknown…`: as `unknown`, and the first check-back is UNKNOWN too;
//! - `hang…`: answer UNKNOWN, and never answer a check-back;
//! - `slow…`: take 2.5 s, then insert, commit, answer COMMIT.
//!
//! `CheckLocalTransaction` answers from `business` (COMMIT if the row is
//! there, else ROLLBACK) except for the cases above: the naive check that
//! is only right once the local transaction can no longer commit, which is
//! what the sidecar's own UNKNOWN for a running callback protects.
//!
//! `HandleMessage` inserts `effects(topic, message_id, value)`, with no unique key,
//! so a duplicate effect would show; in STRONG dedup mode it inserts the
//! `tandem_inbox` row in the same transaction and treats a conflict as
//! already done. Values starting with `slow` take 1.5 s before their
//! effect. Values starting with `fail` are refused with
//! FAILED_PRECONDITION; values starting with `raise` fail with UNKNOWN, as
//! an uncaught exception in a Python, Java or Go handler does. Every call is
//! recorded in `calls(topic, message_id, attempt, batch)`, `batch` being
//! the number of messages in the call: `HandleMessages` treats each message
//! as `HandleMessage` does and writes the effects of those that succeed in
//! one transaction. The `test.handle` header
//! ([`HANDLE_HEADER`]) asks for other behaviours: slow, failing with a given
//! status for the first calls, crashing.
//!
//! Saga branches (`ExecuteBranch`, `CompensateBranch`) keep the branch
//! barrier in their transaction and write `ledger(saga_id, branch, op)`;
//! the branch's payload tells them how to misbehave (see [`directive`]).

use sqlx::sqlite::SqlitePool;
use std::future::Future;
use std::net::SocketAddr;
use tandem_coordinator::failpoint;
use tandem_proto::app as app_pb;
use tandem_proto::app::app_server::{App, AppServer};
use tandem_proto::coordinator::LocalState;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

struct TestApp {
    db: SqlitePool,
    /// Local transactions being executed now (for the careful check).
    executing: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Header asking `CheckLocalTransaction` to follow the README's rule (the
/// fault campaign sets it): UNKNOWN while this app is still executing the
/// transaction, instead of the naive "row not there → ROLLBACK" the fault
/// tests use to show what the sidecar's own guard protects.
pub const CHECK_HEADER: &str = "test.check";

fn careful(m: Option<&tandem_proto::coordinator::Message>) -> bool {
    m.is_some_and(|m| {
        m.headers
            .iter()
            .any(|h| h.name == CHECK_HEADER && &h.value[..] == b"careful")
    })
}

/// Marks a local transaction as executing until dropped.
struct Running<'a>(&'a TestApp, String);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0
            .executing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.1);
    }
}

fn internal(e: sqlx::Error) -> Status {
    Status::internal(e.to_string())
}

fn value_of(m: Option<&tandem_proto::coordinator::Message>) -> String {
    m.map(|m| String::from_utf8_lossy(&m.value).into_owned())
        .unwrap_or_default()
}

fn answer(state: LocalState) -> Response<app_pb::LocalTransactionResponse> {
    Response::new(app_pb::LocalTransactionResponse {
        state: state as i32,
    })
}

impl TestApp {
    async fn insert_business(
        &self,
        txn_id: &str,
        value: &str,
        crash_before_commit: bool,
    ) -> Result<(), Status> {
        let mut tx = self.db.begin().await.map_err(internal)?;
        sqlx::query("INSERT INTO business (txn_id, value) VALUES ($1, $2)")
            .bind(txn_id)
            .bind(value)
            .execute(&mut *tx)
            .await
            .map_err(internal)?;
        if crash_before_commit {
            eprintln!("test app: crashing inside the local transaction of {txn_id}");
            std::process::abort();
        }
        tx.commit().await.map_err(internal)
    }

    async fn has_business(&self, txn_id: &str) -> Result<bool, Status> {
        Ok(sqlx::query("SELECT 1 FROM business WHERE txn_id = $1")
            .bind(txn_id)
            .fetch_optional(&self.db)
            .await
            .map_err(internal)?
            .is_some())
    }
}

/// Header that tells the test app's `HandleMessage` how to behave (the
/// fault campaign sets it): `slow` (1.5 s before the effect),
/// `fail:<code>:<n>` (fail with gRPC status `<code>` on the first `<n>`
/// calls of the message, then handle it), `crash` (abort the process on the
/// first call, before the effect), `crash:always` (abort it on every call).
pub const HANDLE_HEADER: &str = "test.handle";

impl TestApp {
    async fn behave(db: &SqlitePool, topic: &str, id: &str, how: &str) -> Result<(), Status> {
        let calls: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM calls WHERE topic = $1 AND message_id = $2")
                .bind(topic)
                .bind(id)
                .fetch_one(db)
                .await
                .map_err(internal)?;
        match how.split(':').collect::<Vec<_>>().as_slice() {
            ["slow"] => tokio::time::sleep(std::time::Duration::from_millis(1500)).await,
            ["crash"] if calls <= 1 => {
                eprintln!("test app: crashing on {id:?} as told");
                std::process::abort();
            }
            ["crash", "always"] => {
                eprintln!("test app: crashing on {id:?} as told, call {calls}");
                std::process::abort();
            }
            ["fail", code, n] => {
                let code: i32 = code.parse().unwrap_or(2);
                let n: i64 = n.parse().unwrap_or(1);
                if calls <= n {
                    return Err(Status::new(
                        tonic::Code::from_i32(code),
                        format!("test app fails {id:?} (call {calls} of {n} failing)"),
                    ));
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// What a saga branch's payload tells the test app to do, as
/// comma-separated directives: `fail` (the action answers a business
/// failure), `action-slow=MS` (the action's first call waits before its transaction),
/// `action-raise=N` / `comp-raise=N` (the action / compensation fails with
/// UNKNOWN on its first N calls), `action-crash` (abort the process on the
/// action's first call, before its effect).
fn directive(payload: &[u8], name: &str) -> Option<String> {
    String::from_utf8_lossy(payload)
        .split(',')
        .find_map(|d| match d.split_once('=') {
            Some((k, v)) if k == name => Some(v.to_owned()),
            None if d == name => Some(String::new()),
            _ => None,
        })
}

/// A branch operation, the barrier way: every call is recorded in
/// `branch_calls`; the effect is a `ledger` row (no unique key, so a
/// doubled effect would show) written in one transaction with the
/// operation's `tandem_barrier` row, and skipped when that row exists
/// (recorded in `barrier_conflicts`). It runs detached from the call, so a
/// call cut short by its deadline still reaches its transaction, as a
/// real app's work would.
async fn branch_step(
    db: SqlitePool,
    req: app_pb::BranchRequest,
    op: &'static str,
) -> Result<app_pb::BranchResponse, Status> {
    sqlx::query("INSERT INTO branch_calls (saga_id, branch, op, attempt) VALUES ($1, $2, $3, $4)")
        .bind(&req.saga_id)
        .bind(&req.branch)
        .bind(op)
        .bind(req.attempt as i64)
        .execute(&db)
        .await
        .map_err(internal)?;
    let calls: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM branch_calls WHERE saga_id = $1 AND branch = $2 AND op = $3",
    )
    .bind(&req.saga_id)
    .bind(&req.branch)
    .bind(op)
    .fetch_one(&db)
    .await
    .map_err(internal)?;
    let prefix = if op == "action" { "action" } else { "comp" };
    let raise = directive(&req.payload, &format!("{prefix}-raise"));
    if raise.is_some_and(|n| calls <= n.parse::<i64>().unwrap_or(1)) {
        return Err(Status::unknown(format!(
            "test app raises on {op} call {calls}"
        )));
    }
    if op == "action" {
        if directive(&req.payload, "action-crash").is_some() && calls <= 1 {
            eprintln!(
                "test app: crashing in the action of {}/{}",
                req.saga_id, req.branch
            );
            std::process::abort();
        }
        if let Some(ms) = directive(&req.payload, "action-slow").filter(|_| calls <= 1) {
            let ms = ms.parse().unwrap_or(1000);
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        if directive(&req.payload, "fail").is_some() {
            return Ok(app_pb::BranchResponse {
                failed: true,
                reason: "declined by the test app".into(),
            });
        }
    }
    let mut tx = db.begin().await.map_err(internal)?;
    let fresh = tandem_examples::db::enter_barrier(&mut tx, &req.saga_id, &req.branch, op)
        .await
        .map_err(internal)?;
    if !fresh {
        tx.rollback().await.map_err(internal)?;
        sqlx::query("INSERT INTO barrier_conflicts (saga_id, branch, op) VALUES ($1, $2, $3)")
            .bind(&req.saga_id)
            .bind(&req.branch)
            .bind(op)
            .execute(&db)
            .await
            .map_err(internal)?;
        return Ok(app_pb::BranchResponse::default());
    }
    sqlx::query("INSERT INTO ledger (saga_id, branch, op) VALUES ($1, $2, $3)")
        .bind(&req.saga_id)
        .bind(&req.branch)
        .bind(op)
        .execute(&mut *tx)
        .await
        .map_err(internal)?;
    tx.commit().await.map_err(internal)?;
    Ok(app_pb::BranchResponse::default())
}

impl TestApp {
    async fn branch(
        &self,
        req: app_pb::BranchRequest,
        op: &'static str,
    ) -> Result<app_pb::BranchResponse, Status> {
        tokio::spawn(branch_step(self.db.clone(), req, op))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
    }
}

#[tonic::async_trait]
impl App for TestApp {
    async fn execute_branch(
        &self,
        req: Request<app_pb::BranchRequest>,
    ) -> Result<Response<app_pb::BranchResponse>, Status> {
        Ok(Response::new(
            self.branch(req.into_inner(), "action").await?,
        ))
    }

    async fn compensate_branch(
        &self,
        req: Request<app_pb::BranchRequest>,
    ) -> Result<Response<app_pb::BranchResponse>, Status> {
        Ok(Response::new(
            self.branch(req.into_inner(), "compensation").await?,
        ))
    }

    async fn execute_local_transaction(
        &self,
        req: Request<app_pb::ExecuteLocalTransactionRequest>,
    ) -> Result<Response<app_pb::LocalTransactionResponse>, Status> {
        let req = req.into_inner();
        let v = value_of(req.message.as_ref());
        // Every start is recorded, whatever follows (the fault campaign
        // checks that no transaction's local part runs twice).
        sqlx::query("INSERT INTO executions (txn_id) VALUES ($1)")
            .bind(&req.txn_id)
            .execute(&self.db)
            .await
            .map_err(internal)?;
        self.executing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(req.txn_id.clone());
        let _running = Running(self, req.txn_id.clone());
        let state = if v.starts_with("commit") {
            self.insert_business(&req.txn_id, &v, false).await?;
            LocalState::Commit
        } else if v.starts_with("rollback") || v.starts_with("hang") {
            if v.starts_with("hang") {
                LocalState::Unknown
            } else {
                LocalState::Rollback
            }
        } else if v.starts_with("crash") {
            self.insert_business(&req.txn_id, &v, true).await?;
            LocalState::Unknown
        } else if v.starts_with("slow") {
            tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
            self.insert_business(&req.txn_id, &v, false).await?;
            LocalState::Commit
        } else if v.starts_with("unknown") || v.starts_with("check-unknown") {
            self.insert_business(&req.txn_id, &v, false).await?;
            LocalState::Unknown
        } else {
            return Err(Status::invalid_argument(format!(
                "test app: no behaviour for value {v:?}"
            )));
        };
        Ok(answer(state))
    }

    async fn check_local_transaction(
        &self,
        req: Request<app_pb::CheckLocalTransactionRequest>,
    ) -> Result<Response<app_pb::LocalTransactionResponse>, Status> {
        let req = req.into_inner();
        let v = value_of(req.message.as_ref());
        if v.starts_with("hang") {
            std::future::pending::<()>().await;
        }
        if v.starts_with("check-unknown") && req.attempt == 1 {
            return Ok(answer(LocalState::Unknown));
        }
        if careful(req.message.as_ref())
            && self
                .executing
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains(&req.txn_id)
        {
            return Ok(answer(LocalState::Unknown));
        }
        let committed = self.has_business(&req.txn_id).await?;
        Ok(answer(if committed {
            LocalState::Commit
        } else {
            LocalState::Rollback
        }))
    }

    /// Like the servers of grpcio, Java or Go apps, a call the sidecar gives
    /// up on (its deadline passed, its connection broke) still runs to its
    /// end: the effect may land after the sidecar stopped waiting.
    async fn handle_message(
        &self,
        req: Request<app_pb::HandleMessageRequest>,
    ) -> Result<Response<app_pb::HandleMessageResponse>, Status> {
        tokio::spawn(TestApp::handle(self.db.clone(), req.into_inner()))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(app_pb::HandleMessageResponse {}))
    }

    /// As `HandleMessage` for each message (each behaves as its value
    /// says), with the effects of those that succeed written in one
    /// transaction, as a batching app does.
    async fn handle_messages(
        &self,
        req: Request<app_pb::HandleMessagesRequest>,
    ) -> Result<Response<app_pb::HandleMessagesResponse>, Status> {
        let db = self.db.clone();
        let results = tokio::spawn(async move {
            let messages = req.into_inner().messages;
            let n = messages.len();
            let checked = futures_util::future::join_all(
                messages.into_iter().map(|r| TestApp::check(&db, r, n)),
            )
            .await;
            let mut tx = db.begin().await.map_err(internal)?;
            let mut results = Vec::with_capacity(checked.len());
            for c in checked {
                let result = match c {
                    Ok(req) => TestApp::apply(&mut tx, &req).await.map(|_| ()),
                    Err(s) => Err(s),
                };
                results.push(app_pb::MessageResult {
                    code: result.as_ref().err().map_or(0, |s| s.code() as i32),
                    message: result
                        .err()
                        .map(|s| s.message().to_owned())
                        .unwrap_or_default(),
                });
            }
            tx.commit().await.map_err(internal)?;
            failpoint::hit("app.handle.after_commit");
            Ok::<_, Status>(results)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(app_pb::HandleMessagesResponse { results }))
    }
}

impl TestApp {
    async fn handle(db: SqlitePool, req: app_pb::HandleMessageRequest) -> Result<(), Status> {
        let req = TestApp::check(&db, req, 1).await?;
        let mut tx = db.begin().await.map_err(internal)?;
        if TestApp::apply(&mut tx, &req).await? {
            tx.commit().await.map_err(internal)?;
            failpoint::hit("app.handle.after_commit");
        }
        Ok(())
    }

    /// Records the call (made with `batch` messages) and behaves as the
    /// message asks; the request back when its effect is to be applied.
    async fn check(
        db: &SqlitePool,
        req: app_pb::HandleMessageRequest,
        batch: usize,
    ) -> Result<app_pb::HandleMessageRequest, Status> {
        let m = req.message.clone().unwrap_or_default();
        let v = String::from_utf8_lossy(&m.value).into_owned();
        sqlx::query(
            "INSERT INTO calls (topic, message_id, value, attempt, batch) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&req.topic)
        .bind(&m.id)
        .bind(&v)
        .bind(i64::from(req.attempt))
        .bind(batch as i64)
        .execute(db)
        .await
        .map_err(internal)?;
        if let Some(h) = m.headers.iter().find(|h| h.name == HANDLE_HEADER) {
            let how = String::from_utf8_lossy(&h.value).into_owned();
            TestApp::behave(db, &req.topic, &m.id, &how).await?;
        }
        if v.starts_with("raise") {
            return Err(Status::unknown(format!(
                "Exception calling application: handler raised on {v:?}"
            )));
        }
        if v.starts_with("slow") {
            tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        }
        if v.starts_with("fail") {
            return Err(Status::failed_precondition(format!(
                "test app refuses {v:?}"
            )));
        }
        Ok(req)
    }

    /// Writes the effect (and in STRONG mode the dedup row) in `tx`; false
    /// when the dedup row was there already.
    async fn apply(
        tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
        req: &app_pb::HandleMessageRequest,
    ) -> Result<bool, Status> {
        let m = req.message.clone().unwrap_or_default();
        let v = String::from_utf8_lossy(&m.value).into_owned();
        if req.dedup == "STRONG" {
            let fresh = sqlx::query("INSERT INTO tandem_inbox (consumer_group, topic, message_id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
                .bind(&req.group)
                .bind(&req.topic)
                .bind(&m.id)
                .execute(&mut **tx)
                .await
                .map_err(internal)?
                .rows_affected()
                == 1;
            if !fresh {
                return Ok(false);
            }
        }
        sqlx::query("INSERT INTO effects (topic, message_id, value) VALUES ($1, $2, $3)")
            .bind(&req.topic)
            .bind(&m.id)
            .bind(&v)
            .execute(&mut **tx)
            .await
            .map_err(internal)?;
        Ok(true)
    }
}

/// Runs the test app on `addr` with its database at `db` until `shutdown`.
pub async fn run(
    addr: SocketAddr,
    db: &str,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let pool = tandem_examples::db::open_sqlite(db, 8).await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS business (txn_id TEXT PRIMARY KEY, value TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS effects (seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, message_id TEXT NOT NULL, value TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS calls (seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, message_id TEXT NOT NULL, value TEXT NOT NULL, attempt INTEGER NOT NULL, batch INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS executions (seq INTEGER PRIMARY KEY AUTOINCREMENT, txn_id TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS branch_calls (seq INTEGER PRIMARY KEY AUTOINCREMENT, saga_id TEXT NOT NULL, branch TEXT NOT NULL, op TEXT NOT NULL, attempt INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS ledger (seq INTEGER PRIMARY KEY AUTOINCREMENT, saga_id TEXT NOT NULL, branch TEXT NOT NULL, op TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS barrier_conflicts (seq INTEGER PRIMARY KEY AUTOINCREMENT, saga_id TEXT NOT NULL, branch TEXT NOT NULL, op TEXT NOT NULL);",
    )
    .execute(&pool)
    .await?;
    let listener = TcpListener::bind(addr).await?;
    println!("test app listening on {}", listener.local_addr()?);
    tonic::transport::Server::builder()
        .add_service(AppServer::new(TestApp {
            db: pool,
            executing: Default::default(),
        }))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await?;
    Ok(())
}
