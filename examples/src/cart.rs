//! The example cart service: it consumes `OrderPlaced` through its sidecar
//! and takes the ordered quantities out of the user's cart. A decrement is
//! not idempotent by itself, so the service uses strong-mode dedup: the
//! `tandem_inbox` row goes into the same database transaction as the cart
//! change, and a delivery whose row is already there changes nothing. It
//! also keeps a log of applied orders, from which the demo's verdict checks
//! that each committed order was applied exactly once.
//!
//! As the inventory of the checkout saga it reserves stock (`stock`,
//! `reservations`) and releases it, each with the branch barrier in the
//! same transaction; an order for more than is left is a business failure.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use prost::Message as _;
use sqlx::{Row, SqlitePool};
use tandem_proto::app as app_pb;
use tandem_proto::app::app_server::{App, AppServer};
use tandem_proto::coordinator as pb;
use tandem_proto::examples as shop;
use tandem_proto::examples::carts_server::{Carts, CartsServer};
use tandem_proto::sidecar as sc;
use tandem_proto::sidecar::sidecar_client::SidecarClient;
use tokio::net::TcpListener;
use tonic::transport::Endpoint;
use tonic::{Request, Response, Status};

use crate::db::{enter_barrier, open_sqlite};
use crate::order::TOPIC;

/// The consumer group of the cart service.
pub const GROUP: &str = "cart";
/// The skus in the warehouse, and how many of each it starts with.
pub const STOCKED: [&str; 3] = ["apple", "pear", "plum"];
/// Each stocked sku's initial quantity.
pub const STOCK: i64 = 1_000_000;

#[derive(Clone)]
struct CartService {
    db: SqlitePool,
    /// Messages committed so far, and after which one to crash (the
    /// demo's crash between commit and answer).
    committed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    crash_after_commit: Option<u64>,
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

impl CartService {
    async fn cart(&self, user: &str) -> Result<shop::Cart, Status> {
        let rows =
            sqlx::query("SELECT sku, quantity FROM cart_items WHERE user_id = $1 ORDER BY sku")
                .bind(user)
                .fetch_all(&self.db)
                .await
                .map_err(internal)?;
        let items = rows
            .iter()
            .map(|r| {
                Ok(shop::Item {
                    sku: r.try_get(0)?,
                    quantity: r.try_get::<i64, _>(1)?.max(0) as u32,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(internal)?;
        Ok(shop::Cart {
            user: user.to_owned(),
            items,
        })
    }
}

#[tonic::async_trait]
impl Carts for CartService {
    async fn add_to_cart(
        &self,
        req: Request<shop::AddToCartRequest>,
    ) -> Result<Response<shop::Cart>, Status> {
        let req = req.into_inner();
        if req.user.is_empty() {
            return Err(Status::invalid_argument("user: is required"));
        }
        let mut tx = self.db.begin().await.map_err(internal)?;
        for item in &req.items {
            sqlx::query(
                "INSERT INTO cart_items (user_id, sku, quantity) VALUES ($1, $2, $3)
                 ON CONFLICT (user_id, sku) DO UPDATE SET quantity = quantity + excluded.quantity",
            )
            .bind(&req.user)
            .bind(&item.sku)
            .bind(i64::from(item.quantity))
            .execute(&mut *tx)
            .await
            .map_err(internal)?;
        }
        tx.commit().await.map_err(internal)?;
        Ok(Response::new(self.cart(&req.user).await?))
    }

    async fn get_cart(
        &self,
        req: Request<shop::GetCartRequest>,
    ) -> Result<Response<shop::Cart>, Status> {
        Ok(Response::new(self.cart(&req.into_inner().user).await?))
    }
}

#[tonic::async_trait]
impl App for CartService {
    async fn execute_local_transaction(
        &self,
        _: Request<app_pb::ExecuteLocalTransactionRequest>,
    ) -> Result<Response<app_pb::LocalTransactionResponse>, Status> {
        Err(Status::unimplemented("the cart service does not publish"))
    }

    async fn check_local_transaction(
        &self,
        _: Request<app_pb::CheckLocalTransactionRequest>,
    ) -> Result<Response<app_pb::LocalTransactionResponse>, Status> {
        Err(Status::unimplemented("the cart service does not publish"))
    }

    async fn handle_message(
        &self,
        req: Request<app_pb::HandleMessageRequest>,
    ) -> Result<Response<app_pb::HandleMessageResponse>, Status> {
        let req = req.into_inner();
        let message = req.message.unwrap_or_default();
        let order = shop::OrderPlaced::decode(message.value.as_ref())
            .map_err(|e| Status::invalid_argument(format!("not an OrderPlaced: {e}")))?;
        let mut tx = self.db.begin().await.map_err(internal)?;
        if req.dedup != "OFF" {
            // Strong mode: the dedup row commits with the cart change.
            let fresh = sqlx::query(
                "INSERT INTO tandem_inbox (consumer_group, topic, message_id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            )
            .bind(&req.group)
            .bind(&req.topic)
            .bind(&message.id)
            .execute(&mut *tx)
            .await
            .map_err(internal)?
            .rows_affected()
                == 1;
            if !fresh {
                sqlx::query("INSERT INTO duplicate_deliveries (order_id) VALUES ($1)")
                    .bind(&order.order_id)
                    .execute(&mut *tx)
                    .await
                    .map_err(internal)?;
                tx.commit().await.map_err(internal)?;
                return Ok(Response::new(app_pb::HandleMessageResponse {}));
            }
        }
        for item in &order.items {
            sqlx::query(
                "UPDATE cart_items SET quantity = quantity - $1 WHERE user_id = $2 AND sku = $3",
            )
            .bind(i64::from(item.quantity))
            .bind(&order.user)
            .bind(&item.sku)
            .execute(&mut *tx)
            .await
            .map_err(internal)?;
        }
        sqlx::query("INSERT INTO applied_orders (order_id, user_id) VALUES ($1, $2)")
            .bind(&order.order_id)
            .bind(&order.user)
            .execute(&mut *tx)
            .await
            .map_err(internal)?;
        tx.commit().await.map_err(internal)?;
        // The demo kills the service here once: committed, not yet answered.
        let n = self
            .committed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if self.crash_after_commit == Some(n) {
            eprintln!("cart service: crashing after commit {n}, as asked (--crash-after-commit)");
            std::process::abort();
        }
        Ok(Response::new(app_pb::HandleMessageResponse {}))
    }

    async fn execute_branch(
        &self,
        req: Request<app_pb::BranchRequest>,
    ) -> Result<Response<app_pb::BranchResponse>, Status> {
        let req = req.into_inner();
        let order = shop::Cart::decode(req.payload.clone())
            .map_err(|e| Status::invalid_argument(format!("payload: {e}")))?;
        let mut tx = self.db.begin().await.map_err(internal)?;
        if !enter_barrier(&mut tx, &req.saga_id, &req.branch, "action")
            .await
            .map_err(internal)?
        {
            return Ok(Response::new(app_pb::BranchResponse::default()));
        }
        for item in &order.items {
            let taken = sqlx::query(
                "UPDATE stock SET available = available - $2 WHERE sku = $1 AND available >= $2",
            )
            .bind(&item.sku)
            .bind(i64::from(item.quantity))
            .execute(&mut *tx)
            .await
            .map_err(internal)?
            .rows_affected();
            if taken == 0 {
                // Out of stock: nothing reserved (the barrier row goes too).
                return Ok(Response::new(app_pb::BranchResponse {
                    failed: true,
                    reason: format!("out of stock: {}", item.sku),
                }));
            }
            sqlx::query("INSERT INTO reservations (saga_id, sku, quantity) VALUES ($1, $2, $3)")
                .bind(&req.saga_id)
                .bind(&item.sku)
                .bind(i64::from(item.quantity))
                .execute(&mut *tx)
                .await
                .map_err(internal)?;
        }
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
                "UPDATE stock SET available = available + \
                 (SELECT COALESCE(SUM(quantity), 0) FROM reservations r \
                  WHERE r.saga_id = $1 AND r.sku = stock.sku AND r.released = 0)",
            )
            .bind(&req.saga_id)
            .execute(&mut *tx)
            .await
            .map_err(internal)?;
            sqlx::query("UPDATE reservations SET released = released + 1 WHERE saga_id = $1")
                .bind(&req.saga_id)
                .execute(&mut *tx)
                .await
                .map_err(internal)?;
        }
        tx.commit().await.map_err(internal)?;
        Ok(Response::new(app_pb::BranchResponse::default()))
    }

    async fn handle_messages(
        &self,
        _: Request<app_pb::HandleMessagesRequest>,
    ) -> Result<Response<app_pb::HandleMessagesResponse>, Status> {
        Err(Status::unimplemented(
            "the cart service handles one message per call",
        ))
    }
}

/// Subscribes the cart to `orders` through its sidecar, retrying until the
/// sidecar answers (it may start after the service).
async fn subscribe(sidecar: String, dedup: sc::DedupMode) {
    let mut delay = Duration::from_millis(100);
    loop {
        let request = sc::SubscribeRequest {
            topic: TOPIC.into(),
            group: GROUP.into(),
            start_from: pb::StartFrom::Earliest as i32,
            dedup: dedup as i32,
            max_in_flight: 64,
            ..Default::default()
        };
        let result = async {
            let mut client =
                SidecarClient::new(Endpoint::from_shared(sidecar.clone())?.connect().await?);
            client.subscribe(request).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        }
        .await;
        match result {
            Ok(()) => return,
            Err(e) => tracing::debug!(error = %e, "subscribing through the sidecar; retrying"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Runs the cart service on `listen` with its database at `db` until
/// `shutdown`; with `sidecar`, it subscribes itself (`dedup` off only for
/// the demo's `--no-dedup`). With `crash_after_commit`, it aborts right
/// after committing that many messages, before answering the last (the
/// demo's crash).
pub async fn run(
    listen: SocketAddr,
    db: &str,
    sidecar: Option<String>,
    dedup: bool,
    crash_after_commit: Option<u64>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let pool = open_sqlite(db, 1).await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS cart_items (
             user_id  TEXT NOT NULL,
             sku      TEXT NOT NULL,
             quantity INTEGER NOT NULL,
             PRIMARY KEY (user_id, sku)
         );
         CREATE TABLE IF NOT EXISTS applied_orders (
             seq      INTEGER PRIMARY KEY AUTOINCREMENT,
             order_id TEXT NOT NULL,
             user_id  TEXT NOT NULL
         );
         CREATE TABLE IF NOT EXISTS duplicate_deliveries (
             seq      INTEGER PRIMARY KEY AUTOINCREMENT,
             order_id TEXT NOT NULL
         );
         CREATE TABLE IF NOT EXISTS stock (
             sku       TEXT PRIMARY KEY,
             available INTEGER NOT NULL
         );
         CREATE TABLE IF NOT EXISTS reservations (
             seq      INTEGER PRIMARY KEY AUTOINCREMENT,
             saga_id  TEXT NOT NULL,
             sku      TEXT NOT NULL,
             quantity INTEGER NOT NULL,
             released INTEGER NOT NULL DEFAULT 0
         );",
    )
    .execute(&pool)
    .await?;
    for sku in STOCKED {
        sqlx::query("INSERT INTO stock (sku, available) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(sku)
            .bind(STOCK)
            .execute(&pool)
            .await?;
    }
    let listener = TcpListener::bind(listen).await?;
    println!("cart service listening on {}", listener.local_addr()?);
    let subscriber = sidecar.map(|s| {
        let mode = if dedup {
            sc::DedupMode::Strong
        } else {
            sc::DedupMode::Off
        };
        tokio::spawn(subscribe(s, mode))
    });
    let service = CartService {
        db: pool,
        committed: Default::default(),
        crash_after_commit,
    };
    // (Probes ask it: the server's overall health is SERVING.)
    let (_, health) = tonic_health::server::health_reporter();
    let served = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(CartsServer::new(service.clone()))
        .add_service(AppServer::new(service))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await;
    if let Some(s) = subscriber {
        s.abort();
    }
    Ok(served?)
}
