//! The example order service: `PlaceOrder(user, items)` inserts the order
//! and publishes `OrderPlaced` in one step, in table mode:
//!
//! 1. `Begin` on its sidecar with the event, the order id as transaction id;
//! 2. one local SQLite transaction: the order row and the `tandem_txn` row;
//! 3. `Commit` on its sidecar.
//!
//! If the service dies between any two steps, check-back finds the
//! `tandem_txn` row (commit) or its absence (rollback), so the order and its
//! event are never split. The demo can ask it to fail on purpose (`fault`).

use std::future::Future;
use std::net::SocketAddr;

use bytes::Bytes;
use prost::Message as _;
use sqlx::SqlitePool;
use tandem_proto::coordinator as pb;
use tandem_proto::examples as shop;
use tandem_proto::examples::orders_server::{Orders, OrdersServer};
use tandem_proto::sidecar as sc;
use tandem_proto::sidecar::sidecar_client::SidecarClient;
use tokio::net::TcpListener;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::db::open_sqlite;

/// The topic the service publishes `OrderPlaced` to.
pub const TOPIC: &str = "orders";

struct OrderService {
    db: SqlitePool,
    sidecar: SidecarClient<Channel>,
}

fn status_name(state: i32) -> &'static str {
    match pb::TransactionState::try_from(state) {
        Ok(pb::TransactionState::Committed) => "committed",
        Ok(pb::TransactionState::RolledBack) => "rolled back",
        _ => "pending",
    }
}

impl OrderService {
    /// The local transaction: the order and Tandem's row, together.
    async fn insert_order(
        &self,
        order_id: &str,
        req: &shop::PlaceOrderRequest,
        fail: bool,
    ) -> Result<(), sqlx::Error> {
        let items = shop::Cart {
            user: req.user.clone(),
            items: req.items.clone(),
        }
        .encode_to_vec();
        let mut tx = self.db.begin().await?;
        sqlx::query("INSERT INTO orders (order_id, user_id, items) VALUES ($1, $2, $3)")
            .bind(order_id)
            .bind(&req.user)
            .bind(items)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO tandem_txn (txn_id) VALUES ($1)")
            .bind(order_id)
            .execute(&mut *tx)
            .await?;
        if fail {
            // e.g. a constraint of the business failed: nothing is kept
            return tx.rollback().await.and(Err(sqlx::Error::RowNotFound));
        }
        tx.commit().await
    }
}

#[tonic::async_trait]
impl Orders for OrderService {
    async fn place_order(
        &self,
        req: Request<shop::PlaceOrderRequest>,
    ) -> Result<Response<shop::PlaceOrderResponse>, Status> {
        let req = req.into_inner();
        if req.user.is_empty() {
            return Err(Status::invalid_argument("user: is required"));
        }
        if req.items.is_empty() {
            return Err(Status::invalid_argument(
                "items: at least one item is required",
            ));
        }
        if let Some((i, _)) = req
            .items
            .iter()
            .enumerate()
            .find(|(_, it)| it.sku.is_empty() || it.quantity == 0)
        {
            return Err(Status::invalid_argument(format!(
                "items[{i}]: needs a sku and a quantity above 0"
            )));
        }
        let order_id = uuid::Uuid::now_v7().to_string();
        let event = shop::OrderPlaced {
            order_id: order_id.clone(),
            user: req.user.clone(),
            items: req.items.clone(),
        };
        let mut sidecar = self.sidecar.clone();
        sidecar
            .begin(sc::BeginRequest {
                topic: TOPIC.into(),
                message: Some(pb::Message {
                    id: String::new(),
                    key: Some(Bytes::from(req.user.clone())),
                    value: Bytes::from(event.encode_to_vec()),
                    headers: Vec::new(),
                    partition: None,
                }),
                txn_id: order_id.clone(),
                check_mode: sc::CheckMode::Table as i32,
            })
            .await?;
        let fault = shop::Fault::try_from(req.fault).unwrap_or(shop::Fault::None);
        let pending = || {
            Ok(Response::new(shop::PlaceOrderResponse {
                order_id: order_id.clone(),
                status: "pending".into(),
            }))
        };
        if fault == shop::Fault::Abandon {
            return pending(); // as if the service died right after Begin
        }
        let local = self
            .insert_order(&order_id, &req, fault == shop::Fault::LocalFailure)
            .await;
        let end = sc::EndRequest {
            txn_id: order_id.clone(),
        };
        let outcome = match local {
            Err(e) => {
                tracing::info!(order = %order_id, error = %e, "local transaction failed; rolling back");
                sidecar.rollback(end).await?.into_inner()
            }
            Ok(()) if fault == shop::Fault::SkipCommit => return pending(),
            Ok(()) => sidecar.commit(end).await?.into_inner(),
        };
        Ok(Response::new(shop::PlaceOrderResponse {
            order_id,
            status: status_name(outcome.state).into(),
        }))
    }
}

/// Runs the order service on `listen` with its database at `db`, talking to
/// its sidecar at `sidecar`, until `shutdown`.
pub async fn run(
    listen: SocketAddr,
    db: &str,
    sidecar: &str,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let pool = open_sqlite(db, 1).await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS orders (
             order_id   TEXT PRIMARY KEY,
             user_id    TEXT NOT NULL,
             items      BLOB NOT NULL,
             created_at INTEGER NOT NULL DEFAULT (CAST(strftime('%s', 'now') AS INTEGER) * 1000)
         );",
    )
    .execute(&pool)
    .await?;
    let sidecar = SidecarClient::new(Endpoint::from_shared(sidecar.to_owned())?.connect_lazy());
    let listener = TcpListener::bind(listen).await?;
    println!("order service listening on {}", listener.local_addr()?);
    tonic::transport::Server::builder()
        .add_service(OrdersServer::new(OrderService { db: pool, sidecar }))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown,
        )
        .await?;
    Ok(())
}
