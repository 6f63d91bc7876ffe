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
//!
//! `Checkout(user, items)` does the same with a saga instead of an event:
//! the `checkouts` row (status `pending`) and the saga's start commit
//! together (`BeginSaga`), and the saga runs four branches: `order` here
//! (nothing to do forward; its compensation cancels the order), `stock` on
//! the cart service (reserve / release), `payment` on the payments service
//! (charge / refund; a declined card is a business failure), `confirm`
//! here (the order is confirmed). The service is also the app of its
//! sidecar, for those branch calls, with the branch barrier in its
//! database.

use std::future::Future;
use std::net::SocketAddr;

use bytes::Bytes;
use prost::Message as _;
use sqlx::SqlitePool;
use tandem_proto::app as app_pb;
use tandem_proto::app::app_server::{App, AppServer};
use tandem_proto::coordinator as pb;
use tandem_proto::examples as shop;
use tandem_proto::examples::orders_server::{Orders, OrdersServer};
use tandem_proto::sidecar as sc;
use tandem_proto::sidecar::sidecar_client::SidecarClient;
use tokio::net::TcpListener;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::db::{enter_barrier, open_sqlite};

/// The topic the service publishes `OrderPlaced` to.
pub const TOPIC: &str = "orders";

#[derive(Clone)]
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

fn check_order(req: &shop::PlaceOrderRequest) -> Result<(), Status> {
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
    Ok(())
}

/// The checkout saga of `order_id`, each branch given the order.
fn checkout_saga(order_id: &str, cart: &shop::Cart) -> pb::StartSagaRequest {
    let payload = Bytes::from(cart.encode_to_vec());
    let branch = |name: &str, service: &str, action: &str, compensation: &str| pb::SagaBranch {
        name: name.into(),
        service: service.into(),
        action: action.into(),
        compensation: compensation.into(),
        payload: payload.clone(),
        ..Default::default()
    };
    pb::StartSagaRequest {
        saga_id: order_id.into(),
        service: String::new(),
        definition: Some(pb::SagaDefinition {
            branches: vec![
                branch("order", "orders", "accept", "cancel"),
                branch("stock", "cart", "reserve", "release"),
                branch("payment", "payments", "charge", "refund"),
                branch("confirm", "orders", "confirm", ""),
            ],
            concurrent: false,
            timeout_ms: 0,
        }),
    }
}

#[tonic::async_trait]
impl Orders for OrderService {
    async fn checkout(
        &self,
        req: Request<shop::PlaceOrderRequest>,
    ) -> Result<Response<shop::PlaceOrderResponse>, Status> {
        let req = req.into_inner();
        check_order(&req)?;
        let order_id = uuid::Uuid::now_v7().to_string();
        let cart = shop::Cart {
            user: req.user.clone(),
            items: req.items.clone(),
        };
        let mut sidecar = self.sidecar.clone();
        sidecar
            .begin_saga(sc::BeginSagaRequest {
                saga: Some(checkout_saga(&order_id, &cart)),
                txn_id: order_id.clone(),
                check_mode: sc::CheckMode::Table as i32,
            })
            .await?;
        let fail = shop::Fault::try_from(req.fault) == Ok(shop::Fault::LocalFailure);
        let local = async {
            let mut tx = self.db.begin().await?;
            sqlx::query(
                "INSERT INTO checkouts (order_id, user_id, items, status) VALUES ($1, $2, $3, 'pending')",
            )
            .bind(&order_id)
            .bind(&req.user)
            .bind(cart.encode_to_vec())
            .execute(&mut *tx)
            .await?;
            sqlx::query("INSERT INTO tandem_txn (txn_id) VALUES ($1)")
                .bind(&order_id)
                .execute(&mut *tx)
                .await?;
            if fail {
                return tx.rollback().await.and(Err(sqlx::Error::RowNotFound));
            }
            tx.commit().await
        }
        .await;
        let end = sc::EndRequest {
            txn_id: order_id.clone(),
        };
        let outcome = match local {
            Err(e) => {
                tracing::info!(order = %order_id, error = %e, "checkout's local transaction failed; rolling back");
                sidecar.rollback(end).await?.into_inner()
            }
            Ok(()) => sidecar.commit(end).await?.into_inner(),
        };
        Ok(Response::new(shop::PlaceOrderResponse {
            order_id,
            status: status_name(outcome.state).into(),
        }))
    }

    async fn place_order(
        &self,
        req: Request<shop::PlaceOrderRequest>,
    ) -> Result<Response<shop::PlaceOrderResponse>, Status> {
        let req = req.into_inner();
        check_order(&req)?;
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

impl OrderService {
    /// A checkout saga's branch on this service, with the barrier.
    async fn branch(&self, req: app_pb::BranchRequest, op: &str) -> Result<(), Status> {
        let internal = |e: sqlx::Error| Status::internal(e.to_string());
        let mut tx = self.db.begin().await.map_err(internal)?;
        if !enter_barrier(&mut tx, &req.saga_id, &req.branch, op)
            .await
            .map_err(internal)?
        {
            return Ok(()); // done before, or refused: change nothing
        }
        let status = match (req.branch.as_str(), op) {
            ("order", "action") => None, // accepted: nothing to change
            ("order", "compensation") => Some("cancelled"),
            ("confirm", "action") => Some("confirmed"),
            (b, o) => {
                return Err(Status::invalid_argument(format!(
                    "branch: the order service has no {o} for branch {b:?}"
                )));
            }
        };
        if let Some(status) = status {
            sqlx::query("UPDATE checkouts SET status = $2 WHERE order_id = $1")
                .bind(&req.saga_id)
                .bind(status)
                .execute(&mut *tx)
                .await
                .map_err(internal)?;
        }
        tx.commit().await.map_err(internal)
    }
}

#[tonic::async_trait]
impl App for OrderService {
    async fn execute_branch(
        &self,
        req: Request<app_pb::BranchRequest>,
    ) -> Result<Response<app_pb::BranchResponse>, Status> {
        self.branch(req.into_inner(), "action").await?;
        Ok(Response::new(app_pb::BranchResponse::default()))
    }

    async fn compensate_branch(
        &self,
        req: Request<app_pb::BranchRequest>,
    ) -> Result<Response<app_pb::BranchResponse>, Status> {
        self.branch(req.into_inner(), "compensation").await?;
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

/// The order service uses table mode and consumes nothing: its sidecar
/// calls it only for saga branches.
const NOT_HERE: &str = "the order service answers only saga branch calls";

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
         );
         CREATE TABLE IF NOT EXISTS checkouts (
             order_id TEXT PRIMARY KEY,
             user_id  TEXT NOT NULL,
             items    BLOB NOT NULL,
             status   TEXT NOT NULL CHECK (status IN ('pending', 'confirmed', 'cancelled'))
         );",
    )
    .execute(&pool)
    .await?;
    let sidecar = SidecarClient::new(Endpoint::from_shared(sidecar.to_owned())?.connect_lazy());
    let listener = TcpListener::bind(listen).await?;
    println!("order service listening on {}", listener.local_addr()?);
    let service = OrderService { db: pool, sidecar };
    // (Probes ask it: the server's overall health is SERVING.)
    let (_, health) = tonic_health::server::health_reporter();
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(OrdersServer::new(service.clone()))
        .add_service(AppServer::new(service))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await?;
    Ok(())
}
