//! The example payments service of the checkout saga: it charges a user's
//! account for an order (one unit of money per item) and refunds it, each
//! with the branch barrier in the same SQLite transaction. A user whose
//! balance does not cover the order is declined: a business failure, after
//! which the saga releases the stock and cancels the order. Every account
//! starts with [`BALANCE`], so busy users run out and some payments fail
//! for good.

use std::future::Future;
use std::net::SocketAddr;

use prost::Message as _;
use sqlx::SqlitePool;
use tandem_proto::app as app_pb;
use tandem_proto::app::app_server::{App, AppServer};
use tandem_proto::examples as shop;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use crate::db::{enter_barrier, open_sqlite};

/// Every account's opening balance.
pub const BALANCE: i64 = 12;

struct PaymentsService {
    db: SqlitePool,
}

fn internal(e: sqlx::Error) -> Status {
    Status::internal(e.to_string())
}

const NOT_HERE: &str = "the payments service answers only saga branch calls";

#[tonic::async_trait]
impl App for PaymentsService {
    async fn execute_branch(
        &self,
        req: Request<app_pb::BranchRequest>,
    ) -> Result<Response<app_pb::BranchResponse>, Status> {
        let req = req.into_inner();
        let order = shop::Cart::decode(req.payload.clone())
            .map_err(|e| Status::invalid_argument(format!("payload: {e}")))?;
        let amount: i64 = order.items.iter().map(|i| i64::from(i.quantity)).sum();
        let mut tx = self.db.begin().await.map_err(internal)?;
        if !enter_barrier(&mut tx, &req.saga_id, &req.branch, "action")
            .await
            .map_err(internal)?
        {
            return Ok(Response::new(app_pb::BranchResponse::default()));
        }
        sqlx::query(
            "INSERT INTO accounts (user_id, balance) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(&order.user)
        .bind(BALANCE)
        .execute(&mut *tx)
        .await
        .map_err(internal)?;
        let charged = sqlx::query(
            "UPDATE accounts SET balance = balance - $2 WHERE user_id = $1 AND balance >= $2",
        )
        .bind(&order.user)
        .bind(amount)
        .execute(&mut *tx)
        .await
        .map_err(internal)?
        .rows_affected();
        if charged == 0 {
            // Declined: nothing charged (the barrier row goes too).
            return Ok(Response::new(app_pb::BranchResponse {
                failed: true,
                reason: format!("declined: {} cannot pay {amount}", order.user),
            }));
        }
        sqlx::query("INSERT INTO charges (saga_id, user_id, amount) VALUES ($1, $2, $3)")
            .bind(&req.saga_id)
            .bind(&order.user)
            .bind(amount)
            .execute(&mut *tx)
            .await
            .map_err(internal)?;
        tx.commit().await.map_err(internal)?;
        Ok(Response::new(app_pb::BranchResponse::default()))
    }

    async fn compensate_branch(
        &self,
        req: Request<app_pb::BranchRequest>,
    ) -> Result<Response<app_pb::BranchResponse>, Status> {
        let req = req.into_inner();
        let mut tx = self.db.begin().await.map_err(internal)?;
        if enter_barrier(&mut tx, &req.saga_id, &req.branch, "compensation")
            .await
            .map_err(internal)?
        {
            sqlx::query(
                "UPDATE accounts SET balance = balance + \\
                 (SELECT COALESCE(SUM(amount), 0) FROM charges c \\
                  WHERE c.saga_id = $1 AND c.user_id = accounts.user_id AND c.refunded = 0)",
            )
            .bind(&req.saga_id)
            .execute(&mut *tx)
            .await
            .map_err(internal)?;
            sqlx::query("UPDATE charges SET refunded = refunded + 1 WHERE saga_id = $1")
                .bind(&req.saga_id)
                .execute(&mut *tx)
                .await
                .map_err(internal)?;
        }
        tx.commit().await.map_err(internal)?;
        Ok(Response::new(app_pb::BranchResponse::default()))
    }

    async fn execute_local_transaction(
        &self,
        _: Request<app_pb::ExecuteLocalTransactionRequest>,
    ) -> Result<Response<app_pb::LocalTransactionResponse>, Status> {
        Err(Status::unimplemented(NOT_HERE))
    }

    async fn check_local_transaction(
        &self,
        _: Request<app_pb::CheckLocalTransactionRequest>,
    ) -> Result<Response<app_pb::LocalTransactionResponse>, Status> {
        Err(Status::unimplemented(NOT_HERE))
    }

    async fn handle_message(
        &self,
        _: Request<app_pb::HandleMessageRequest>,
    ) -> Result<Response<app_pb::HandleMessageResponse>, Status> {
        Err(Status::unimplemented(NOT_HERE))
    }

    async fn handle_messages(
        &self,
        _: Request<app_pb::HandleMessagesRequest>,
    ) -> Result<Response<app_pb::HandleMessagesResponse>, Status> {
        Err(Status::unimplemented(NOT_HERE))
    }
}

/// Runs the payments service on `listen` with its database at `db` until
/// `shutdown`.
pub async fn run(
    listen: SocketAddr,
    db: &str,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let pool = open_sqlite(db, 1).await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS accounts (
             user_id TEXT PRIMARY KEY,
             balance INTEGER NOT NULL CHECK (balance >= 0)
         );
         CREATE TABLE IF NOT EXISTS charges (
             seq      INTEGER PRIMARY KEY AUTOINCREMENT,
             saga_id  TEXT NOT NULL,
             user_id  TEXT NOT NULL,
             amount   INTEGER NOT NULL,
             refunded INTEGER NOT NULL DEFAULT 0
         );",
    )
    .execute(&pool)
    .await?;
    let listener = TcpListener::bind(listen).await?;
    println!("payments service listening on {}", listener.local_addr()?);
    tonic::transport::Server::builder()
        .add_service(AppServer::new(PaymentsService { db: pool }))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await?;
    Ok(())
}
