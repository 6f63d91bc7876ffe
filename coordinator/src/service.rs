//! The gRPC face of the broker: checks every request field (naming it in
//! the error) before anything changes, and converts between the wire types
//! and the broker's.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tandem_proto::coordinator as pb;
use tandem_storage::{Log, Record};
use tonic::{Request, Response, Status, Streaming};

use crate::authz::{Action, Authorization, Caller};
use crate::broker::Outgoing;
use crate::cluster::{Cluster, Target, forwarded, was_forwarded};
use crate::consumer::{StartFrom, Subscription};
use crate::error::Error;
use crate::published::{CHOSEN_ID_BYTES, CHOSEN_ID_HEADER};
use crate::shards::shard_of;
use crate::statelog::now_ms;
use crate::transactions::MARKER_HEADER;
use crate::wire::headers_from_wire;
use tandem_proto::coordinator::coordinator_client::CoordinatorClient;
use tandem_runtime::tls::Identity;
use tonic::transport::Channel;

pub(crate) use tandem_runtime::{check_group, check_id};

/// Until when a replica may answer: the end of its lease as it counts it
/// (renewals move it on). Past it, the replica refuses, even before it
/// has noticed the loss: another one may hold the lease by then.
#[derive(Debug)]
pub struct Validity {
    base: tokio::time::Instant,
    until_us: std::sync::atomic::AtomicU64,
}

impl Validity {
    /// Valid until `until`.
    pub fn new(until: tokio::time::Instant) -> Validity {
        let base = tokio::time::Instant::now();
        let v = Validity {
            base,
            until_us: std::sync::atomic::AtomicU64::new(0),
        };
        v.extend(until);
        v
    }

    /// Valid until `until` now.
    pub fn extend(&self, until: tokio::time::Instant) {
        let us = until.saturating_duration_since(self.base).as_micros() as u64;
        self.until_us
            .store(us, std::sync::atomic::Ordering::Release);
    }

    /// The end of validity.
    pub fn until(&self) -> tokio::time::Instant {
        self.base + Duration::from_micros(self.until_us.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Still valid.
    pub fn valid(&self) -> bool {
        tokio::time::Instant::now() < self.until()
    }
}

/// What a replica serves of a shard right now.
pub enum Role<L> {
    /// It serves this broker; on a shared store, while its lease is valid.
    Active(Arc<crate::broker::Broker<L>>, Option<Arc<Validity>>),
    /// It does not: requests are refused as UNAVAILABLE, naming the holder
    /// when known (in the message and the `tandem-owner` metadata), so that
    /// clients go there.
    Standby {
        /// The holder's advertised address.
        owner: Option<String>,
    },
}

impl<L> Clone for Role<L> {
    fn clone(&self) -> Self {
        match self {
            Role::Active(b, v) => Role::Active(b.clone(), v.clone()),
            Role::Standby { owner } => Role::Standby {
                owner: owner.clone(),
            },
        }
    }
}

/// Items of one `Transact` call, at most.
pub(crate) const MAX_TRANSACT_ITEMS: usize = 4096;

/// Metadata key naming the replica that serves a refused request's shard,
/// on refusals of a replica that does not.
pub const OWNER_METADATA: &str = "tandem-owner";

/// The coordinator's gRPC service.
pub struct CoordinatorService<L> {
    cluster: Arc<Cluster<L>>,
    max_message_bytes: usize,
    default_session_timeout: Duration,
    /// This replica's identity when it serves TLS (`None`: plaintext, and
    /// nothing is checked).
    identity: Option<Identity>,
    authorization: Authorization,
}

impl<L: Log + Clone> CoordinatorService<L> {
    /// Serves the shards as `cluster` sees them at each request.
    pub(crate) fn with_cluster(
        cluster: Arc<Cluster<L>>,
        max_message_bytes: usize,
        default_session_timeout: Duration,
    ) -> Self {
        CoordinatorService {
            cluster,
            max_message_bytes,
            default_session_timeout,
            identity: None,
            authorization: Authorization::new(None),
        }
    }

    /// Checks callers against `authorization` when this replica serves TLS
    /// with `identity`.
    pub(crate) fn with_authorization(
        mut self,
        identity: Option<Identity>,
        authorization: Authorization,
    ) -> Self {
        self.identity = identity;
        self.authorization = authorization;
        self
    }

    /// Who sent `req` (UNAUTHENTICATED for a certificate that names nobody;
    /// PERMISSION_DENIED for a forwarded call not from a replica).
    fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        crate::authz::caller(
            req,
            self.identity.as_ref(),
            was_forwarded(req),
            self.authorization.identity_prefix.as_deref(),
        )
    }

    /// Allows `action` to `caller`, or refuses as PERMISSION_DENIED.
    fn allow(&self, caller: &Caller, action: Action<'_>) -> Result<(), Status> {
        self.authorization.allow(caller, action)
    }

    /// Where requests about topic `name` go.
    async fn for_topic(&self, name: &str, forwarded: bool) -> Result<Target<L>, Status> {
        self.cluster
            .target_waiting(shard_of(name, self.cluster.count()), forwarded)
            .await
    }

    /// Sends `req` on to `owner` with `call`. An owner that gave the shard
    /// away meanwhile refuses naming the next one: the request follows
    /// once, so that a move is not the client's to see.
    async fn forward<R, T, F, Fut>(
        &self,
        owner: String,
        req: R,
        call: F,
    ) -> Result<Response<T>, Status>
    where
        R: Clone,
        F: Fn(CoordinatorClient<Channel>, Request<R>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<T>, Status>>,
    {
        let first = call(self.cluster.peer(&owner)?, forwarded(req.clone())).await;
        match first {
            Err(s) if s.code() == tonic::Code::Unavailable => {
                let next = s
                    .metadata()
                    .get(OWNER_METADATA)
                    .and_then(|v| v.to_str().ok())
                    .filter(|n| *n != owner)
                    .map(str::to_owned);
                match next {
                    Some(next) => call(self.cluster.peer(&next)?, forwarded(req)).await,
                    None => Err(s),
                }
            }
            answer => answer,
        }
    }

    /// Where requests about transaction `id` go: the shard that knows it
    /// (asking the store which one when none served here does).
    async fn for_txn(&self, id: &str, forwarded: bool) -> Result<Target<L>, Status> {
        let local = self.cluster.local();
        if let Some((_, b)) = local.iter().find(|(_, b)| b.txns.knows(id)) {
            return Ok(Target::Here(b.clone()));
        }
        if self.cluster.count() <= 1 {
            return self.cluster.target_waiting(0, forwarded).await;
        }
        let claims = self.cluster.claims.get().ok_or_else(|| {
            Status::unavailable("this coordinator replica has not reached its store yet")
        })?;
        match claims.holder(id).await? {
            Some(k) => self.cluster.target_waiting(k, forwarded).await,
            None => Err(Error::NotFound {
                what: "transaction",
                name: id.to_owned(),
            }
            .into()),
        }
    }
}

/// `req` marked as forwarded and made inside this process (a `Transact`
/// item served here, checked when the call came in).
fn in_process<T>(req: Request<T>) -> Request<T> {
    let mut req = req;
    req.extensions_mut().insert(crate::authz::InProcess);
    req
}

/// Turns a wire message into a checked record for a topic of `partitions`.
/// Runs a state-changing step to its end even if the caller goes away: a
/// prepare, commit or rollback cancelled half way (its append queued, its
/// state record not yet written) would leave a message in the topic while
/// its transaction still looks open, and the retry would append it again.
async fn detached<T: Send + 'static>(
    step: impl std::future::Future<Output = Result<T, Error>> + Send + 'static,
) -> Result<T, Error> {
    tokio::spawn(step)
        .await
        .map_err(|e| Error::Internal(format!("transaction step failed: {e}")))?
}

/// A message of a publish (`publish`) or prepare, checked: an id made up
/// if none was sent, headers, partition and size.
pub(crate) fn outgoing(
    field: &str,
    m: pb::Message,
    partitions: u32,
    max_bytes: usize,
    publish: bool,
) -> Result<Outgoing, Error> {
    let chosen_id = !m.id.is_empty();
    let id = if !chosen_id {
        tandem_runtime::fresh_id()
    } else {
        check_id(&format!("{field}.id"), &m.id)?;
        m.id
    };
    if let Some(p) = m.partition
        && p >= partitions
    {
        return Err(Error::invalid(
            format!("{field}.partition"),
            format!("partition {p} does not exist: the topic has {partitions}"),
        ));
    }
    for (j, h) in m.headers.iter().enumerate() {
        if h.name.is_empty() {
            return Err(Error::invalid(
                format!("{field}.headers[{j}].name"),
                "must not be empty",
            ));
        }
        if h.name == MARKER_HEADER || h.name == CHOSEN_ID_HEADER {
            return Err(Error::invalid(
                format!("{field}.headers[{j}].name"),
                format!("{:?} is reserved for Tandem's own use", h.name),
            ));
        }
    }
    let record = Record {
        id: Bytes::from(id),
        key: m.key,
        value: m.value,
        headers: headers_from_wire(m.headers),
        timestamp_ms: now_ms(),
    };
    // (a publish marks a chosen id: counted here, so that what passes fits
    // in the log)
    let mark = if publish && chosen_id {
        CHOSEN_ID_BYTES
    } else {
        0
    };
    let size = record.encoded_len() + mark;
    if size > max_bytes {
        return Err(Error::TooLarge {
            field: field.to_owned(),
            size,
            max: max_bytes,
        });
    }
    Ok(Outgoing {
        chosen_id,
        partition: m.partition,
        record,
    })
}

/// A time in ms since the epoch (not before it).
fn time(field: &str, t: i64) -> Result<i64, Error> {
    if t < 0 {
        return Err(Error::invalid(
            field,
            format!("must be a time (ms since the epoch), got {t}"),
        ));
    }
    Ok(t)
}

fn required<'a>(field: &str, value: &'a str) -> Result<&'a str, Error> {
    if value.is_empty() {
        Err(Error::invalid(field, "is required"))
    } else {
        Ok(value)
    }
}

type ConsumeStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ConsumeResponse, Status>> + Send>>;
type SessionStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::SessionResponse, Status>> + Send>>;

/// A sidecar session that sends nothing for this long is closed.
pub const SIDECAR_SESSION_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes a stored record may exceed `max_message_bytes` by: Tandem's own
/// headers (a transaction's marker; on `<topic>.dlq`, the dead letter's
/// `tandem.*` headers).
pub(crate) const RESERVED_BYTES: usize = 16 << 10;

/// Transactions `ListTransactions` lists when it names no limit, and at most.
const DEFAULT_LIST_TXNS: u32 = 100;
const MAX_LIST_TXNS: u32 = 10_000;

/// Largest opaque producer context kept with a half message.
pub const MAX_CONTEXT_BYTES: usize = 64 << 10;

/// An item of a `Transact` call answered with `status`.
fn failed_item(status: &Status) -> pb::TransactResult {
    pb::TransactResult {
        code: status.code() as i32,
        message: status.message().to_owned(),
        kind: None,
    }
}

/// The sagas of `broker`, which must be of the shard of `__sagas`.
fn saga_host<L>(broker: &crate::broker::Broker<L>) -> Result<&crate::saga::Sagas, Status> {
    broker
        .sagas
        .as_ref()
        .ok_or_else(|| Status::internal("sagas asked of a shard that does not hold them"))
}

/// Checks the service and transaction ids of an outcome request.
fn end_request(req: &pb::EndTransactionRequest) -> Result<(), Error> {
    check_id("service", &req.service)?;
    Ok(check_id("txn_id", &req.txn_id)?)
}

/// The broker of a request's shard when it is served here; otherwise the
/// request, forwarded to the owner with `method`, is answered with the
/// owner's answer.
macro_rules! here_or_forward {
    ($self:ident, $target:expr, $req:expr, $method:ident) => {
        match $target {
            Target::Here(b) => b,
            Target::There(owner) => {
                return $self
                    .forward(owner, $req, |mut c, r| async move { c.$method(r).await })
                    .await;
            }
        }
    };
}

#[tonic::async_trait]
impl<L: Log + Clone> pb::coordinator_server::Coordinator for CoordinatorService<L> {
    async fn create_topic(
        &self,
        req: Request<pb::CreateTopicRequest>,
    ) -> Result<Response<pb::CreateTopicResponse>, Status> {
        let caller = self.caller(&req)?;
        let fwd = was_forwarded(&req);
        let req = req.into_inner();
        self.allow(&caller, Action::Create(&req.name))?;
        let broker = here_or_forward!(
            self,
            self.for_topic(&req.name, fwd).await?,
            req,
            create_topic
        );
        broker.create_topic(&req.name, req.partitions).await?;
        Ok(Response::new(pb::CreateTopicResponse {}))
    }

    async fn list_topics(
        &self,
        req: Request<pb::ListTopicsRequest>,
    ) -> Result<Response<pb::ListTopicsResponse>, Status> {
        self.allow(&self.caller(&req)?, Action::Describe)?;
        // The topics of the shards served here, and those of every other
        // owner (asked for theirs only).
        let others = if was_forwarded(&req) {
            Vec::new()
        } else {
            self.cluster.others().await?
        };
        let mut topics: Vec<pb::TopicSummary> = self
            .cluster
            .local()
            .into_iter()
            .flat_map(|(_, b)| b.list_topics())
            // Tandem's own topics (`__sagas`) are left out, as Kafka's
            // tools leave out internal topics; DescribeTopic shows them.
            .filter(|(name, _)| !name.starts_with("__"))
            .map(|(name, meta)| pb::TopicSummary {
                name,
                partitions: meta.partitions,
            })
            .collect();
        for o in others {
            let theirs = self
                .cluster
                .peer(&o)?
                .list_topics(forwarded(pb::ListTopicsRequest {}))
                .await?;
            topics.extend(theirs.into_inner().topics);
        }
        topics.sort_by(|a, b| a.name.cmp(&b.name));
        topics.dedup_by(|a, b| a.name == b.name);
        Ok(Response::new(pb::ListTopicsResponse { topics }))
    }

    async fn describe_topic(
        &self,
        req: Request<pb::DescribeTopicRequest>,
    ) -> Result<Response<pb::DescribeTopicResponse>, Status> {
        self.allow(&self.caller(&req)?, Action::Describe)?;
        let fwd = was_forwarded(&req);
        let name = req.into_inner().name;
        required("name", &name)?;
        let broker = here_or_forward!(
            self,
            self.for_topic(&name, fwd).await?,
            pb::DescribeTopicRequest { name },
            describe_topic
        );
        let (partitions, groups) = broker.describe(&name).await?;
        let groups = groups
            .into_iter()
            .map(|g| {
                let parts: Vec<pb::PartitionLag> = partitions
                    .iter()
                    .map(|p| {
                        let committed = g
                            .committed
                            .get(&p.partition)
                            .copied()
                            .unwrap_or(p.offsets.log_start);
                        pb::PartitionLag {
                            partition: p.partition,
                            committed_offset: committed,
                            lag: p.offsets.high_water_mark.saturating_sub(committed),
                        }
                    })
                    .collect();
                pb::GroupLag {
                    group: g.group,
                    total_lag: parts.iter().map(|p| p.lag).sum(),
                    partitions: parts,
                    members: g.members.len() as u32,
                    member_info: g
                        .members
                        .into_iter()
                        .map(|m| pb::GroupMember {
                            id: m.id,
                            credit: m.credit,
                            partitions: m.partitions,
                        })
                        .collect(),
                }
            })
            .collect();
        let partitions = partitions
            .into_iter()
            .map(|p| pb::PartitionInfo {
                partition: p.partition,
                log_start: p.offsets.log_start,
                high_water_mark: p.offsets.high_water_mark,
                size_bytes: p.offsets.size_bytes,
            })
            .collect();
        let shards = self.cluster.count();
        Ok(Response::new(pb::DescribeTopicResponse {
            shard: shard_of(&name, shards),
            shards,
            owner: self.cluster.advertise.clone().unwrap_or_default(),
            name,
            partitions,
            groups,
        }))
    }

    async fn publish(
        &self,
        req: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let caller = self.caller(&req)?;
        let fwd = was_forwarded(&req);
        let req = req.into_inner();
        let topic = required("topic", &req.topic)?;
        self.allow(&caller, Action::Publish(topic))?;
        self.authorization
            .check_dead_letters(&caller, topic, &req.messages)?;
        if topic.starts_with("__") {
            return Err(Error::invalid(
                "topic",
                "topics starting with \"__\" are Tandem's own: start sagas with StartSaga, or with a transaction (Prepare)",
            )
            .into());
        }
        let broker = here_or_forward!(self, self.for_topic(topic, fwd).await?, req, publish);
        let meta = broker.topic(topic)?;
        if req.messages.is_empty() {
            return Err(Error::invalid("messages", "at least one message is required").into());
        }
        // A dead letter carries its error headers on top of a message that
        // may already be as large as allowed.
        let limit = if topic.ends_with(".dlq") {
            self.max_message_bytes + RESERVED_BYTES
        } else {
            self.max_message_bytes
        };
        let messages = req
            .messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| outgoing(&format!("messages[{i}]"), m, meta.partitions, limit, true))
            .collect::<Result<Vec<_>, _>>()?;
        let ids: Vec<Bytes> = messages.iter().map(|m| m.record.id.clone()).collect();
        let positions = broker.publish(topic, meta, messages).await?;
        Ok(Response::new(pb::PublishResponse {
            positions: positions
                .into_iter()
                .zip(ids)
                .map(|(p, id)| pb::MessagePosition {
                    id: String::from_utf8_lossy(&id).into_owned(),
                    partition: p.partition,
                    offset: p.offset,
                })
                .collect(),
        }))
    }

    type ConsumeStream = ConsumeStream;

    async fn consume(
        &self,
        req: Request<Streaming<pb::ConsumeRequest>>,
    ) -> Result<Response<ConsumeStream>, Status> {
        let caller = self.caller(&req)?;
        let mut stream = req.into_inner();
        let first = stream.message().await?.ok_or_else(|| {
            Status::from(Error::invalid(
                "subscribe",
                "the stream ended before subscribing",
            ))
        })?;
        let Some(pb::consume_request::Kind::Subscribe(sub)) = first.kind else {
            return Err(Error::invalid(
                "subscribe",
                "the first request of a session must subscribe",
            )
            .into());
        };
        let topic = required("subscribe.topic", &sub.topic)?;
        // A stream is not forwarded: the client opens it at the owner.
        let broker = self
            .cluster
            .here(shard_of(topic, self.cluster.count()))
            .await?;
        let meta = broker.topic(topic)?;
        check_group("subscribe.group", &sub.group)?;
        self.allow(
            &caller,
            Action::Consume {
                topic,
                group: &sub.group,
            },
        )?;
        let session_timeout = match sub.session_timeout_ms {
            0 => self.default_session_timeout,
            ms @ 1_000..=300_000 => Duration::from_millis(u64::from(ms)),
            ms => {
                return Err(Error::invalid(
                    "subscribe.session_timeout_ms",
                    format!("must be between 1000 and 300000, got {ms}"),
                )
                .into());
            }
        };
        let start_from = match pb::StartFrom::try_from(sub.start_from) {
            Ok(pb::StartFrom::Earliest) => StartFrom::Earliest,
            Ok(pb::StartFrom::Latest | pb::StartFrom::Unspecified) => StartFrom::Latest,
            Err(_) => {
                return Err(Error::invalid(
                    "subscribe.start_from",
                    format!("unknown value {}", sub.start_from),
                )
                .into());
            }
        };
        let client_id = if sub.client_id.is_empty() {
            "consumer".to_owned()
        } else {
            check_id("subscribe.client_id", &sub.client_id)?;
            sub.client_id
        };
        let revoke_timeout = match sub.revoke_timeout_ms {
            0 => None,
            ms @ 100..=300_000 => Some(Duration::from_millis(u64::from(ms))),
            ms => {
                return Err(Error::invalid(
                    "subscribe.revoke_timeout_ms",
                    format!("must be between 100 and 300000, got {ms}"),
                )
                .into());
            }
        };
        let subscription = Subscription {
            revoke_timeout,
            topic: topic.to_owned(),
            group: sub.group,
            start_from,
            initial_credit: sub.initial_credit,
            session_timeout,
            client_id,
        };
        let out = broker
            .groups
            .start_session(subscription, meta.partitions, stream);
        Ok(Response::new(Box::pin(out)))
    }

    async fn prepare(
        &self,
        req: Request<pb::PrepareRequest>,
    ) -> Result<Response<pb::PrepareResponse>, Status> {
        let caller = self.caller(&req)?;
        let fwd = was_forwarded(&req);
        let req = req.into_inner();
        check_id("service", &req.service)?;
        let topic = required("topic", &req.topic)?;
        self.allow(&caller, Action::ActFor(&req.service))?;
        self.allow(&caller, Action::Prepare(topic))?;
        self.authorization
            .check_saga_start(&caller, &req.service, topic, req.message.as_ref())?;
        self.authorization
            .check_dead_letters(&caller, topic, req.message.as_slice())?;
        let broker = here_or_forward!(self, self.for_topic(topic, fwd).await?, req, prepare);
        let txn_id = if req.txn_id.is_empty() {
            tandem_runtime::fresh_id()
        } else {
            check_id("txn_id", &req.txn_id)?;
            req.txn_id
        };
        let topic = req.topic.as_str();
        let meta = broker.topic(topic)?;
        let mut message = req
            .message
            .ok_or_else(|| Error::invalid("message", "is required"))?;
        if topic == crate::saga::SAGA_TOPIC {
            // A saga started with a local transaction: checked now, and
            // started when (if) the transaction commits.
            let (value, id, def) = crate::saga_wire::check_start(&req.service, &message.value)?;
            saga_host(&broker)?
                .check_free(id, req.service.clone(), def)
                .await?;
            message.value = value;
        }
        if req.context.len() > MAX_CONTEXT_BYTES {
            return Err(Error::TooLarge {
                field: "context".into(),
                size: req.context.len(),
                max: MAX_CONTEXT_BYTES,
            }
            .into());
        }
        let message = outgoing(
            "message",
            pb::Message {
                id: txn_id.clone(),
                ..message
            },
            meta.partitions,
            self.max_message_bytes,
            false,
        )?;
        if !req.instance.is_empty() {
            check_id("instance", &req.instance)?;
        }
        if !req.attempt.is_empty() {
            check_id("attempt", &req.attempt)?;
        }
        let (topic, id) = (topic.to_owned(), txn_id.clone());
        let prepared = detached(async move {
            let half = crate::broker::HalfMessage {
                service: &req.service,
                instance: &req.instance,
                txn_id: &id,
                topic: &topic,
                message,
                context: req.context,
                attempt: &req.attempt,
            };
            broker.prepare(half, meta).await
        })
        .await?;
        Ok(Response::new(pb::PrepareResponse {
            txn_id,
            prepared_at_ms: prepared.at_ms,
            existed: prepared.existed,
            state: prepared.state as i32,
        }))
    }

    async fn commit(
        &self,
        req: Request<pb::EndTransactionRequest>,
    ) -> Result<Response<pb::EndTransactionResponse>, Status> {
        let caller = self.caller(&req)?;
        let fwd = was_forwarded(&req);
        let req = req.into_inner();
        end_request(&req)?;
        self.allow(&caller, Action::ActFor(&req.service))?;
        let broker = here_or_forward!(self, self.for_txn(&req.txn_id, fwd).await?, req, commit);
        Ok(Response::new(
            detached(async move { broker.txns.commit(&req.service, &req.txn_id).await }).await?,
        ))
    }

    async fn rollback(
        &self,
        req: Request<pb::EndTransactionRequest>,
    ) -> Result<Response<pb::EndTransactionResponse>, Status> {
        let caller = self.caller(&req)?;
        let fwd = was_forwarded(&req);
        let req = req.into_inner();
        end_request(&req)?;
        self.allow(&caller, Action::ActFor(&req.service))?;
        let broker = here_or_forward!(self, self.for_txn(&req.txn_id, fwd).await?, req, rollback);
        Ok(Response::new(
            detached(async move { broker.txns.rollback(&req.service, &req.txn_id).await }).await?,
        ))
    }

    async fn transact(
        &self,
        req: Request<pb::TransactRequest>,
    ) -> Result<Response<pb::TransactResponse>, Status> {
        let caller = self.caller(&req)?;
        use pb::transact_item::Kind;
        let fwd = was_forwarded(&req);
        let items = req.into_inner().items;
        if items.is_empty() {
            return Err(Error::invalid("items", "at least one item is required").into());
        }
        if items.len() > MAX_TRANSACT_ITEMS {
            return Err(Error::invalid(
                "items",
                format!(
                    "{} items; at most {MAX_TRANSACT_ITEMS} per call",
                    items.len()
                ),
            )
            .into());
        }
        // Each item goes where its own call would: served here, or sent on
        // to its shard's owner with the others for that owner in one call.
        let mut results: Vec<Option<pb::TransactResult>> = vec![None; items.len()];
        let mut here = Vec::new();
        let mut there: std::collections::BTreeMap<String, Vec<(usize, pb::TransactItem)>> =
            Default::default();
        // Routed all at once: one item waiting for its shard's owner (or
        // for the store to say where a transaction lives) holds up no other.
        // (Each item is authorised here; the owner trusts a replica.)
        let caller = &caller;
        let targets =
            futures_util::future::join_all(items.iter().enumerate().map(|(i, item)| async move {
                match &item.kind {
                    Some(Kind::Prepare(p)) => match required("topic", &p.topic) {
                        Ok(t) => {
                            self.allow(caller, Action::ActFor(&p.service))?;
                            self.allow(caller, Action::Prepare(t))?;
                            self.authorization.check_saga_start(
                                caller,
                                &p.service,
                                t,
                                p.message.as_ref(),
                            )?;
                            self.authorization.check_dead_letters(
                                caller,
                                t,
                                p.message.as_slice(),
                            )?;
                            self.for_topic(t, fwd).await
                        }
                        Err(e) => Err(e.into()),
                    },
                    Some(Kind::Commit(e) | Kind::Rollback(e)) => match end_request(e) {
                        Ok(()) => {
                            self.allow(caller, Action::ActFor(&e.service))?;
                            self.for_txn(&e.txn_id, fwd).await
                        }
                        Err(e) => Err(e.into()),
                    },
                    None => Err(Status::invalid_argument(format!(
                        "items[{i}]: prepare, commit or rollback is required"
                    ))),
                }
            }))
            .await;
        for ((i, item), target) in items.into_iter().enumerate().zip(targets) {
            match target {
                Ok(Target::Here(_)) => here.push((i, item)),
                Ok(Target::There(o)) => there.entry(o).or_default().push((i, item)),
                Err(s) => results[i] = Some(failed_item(&s)),
            }
        }
        let local = here.into_iter().map(|(i, item)| async move {
            // Served here unless the shard moved meanwhile (then refused
            // as UNAVAILABLE, and the caller sends the item again).
            let answer = match item.kind {
                Some(Kind::Prepare(p)) => self
                    .prepare(in_process(forwarded(p)))
                    .await
                    .map(|r| pb::transact_result::Kind::Prepare(r.into_inner())),
                Some(Kind::Commit(e)) => self
                    .commit(in_process(forwarded(e)))
                    .await
                    .map(|r| pb::transact_result::Kind::End(r.into_inner())),
                Some(Kind::Rollback(e)) => self
                    .rollback(in_process(forwarded(e)))
                    .await
                    .map(|r| pb::transact_result::Kind::End(r.into_inner())),
                None => unreachable!("refused above"),
            };
            let result = match answer {
                Ok(kind) => pb::TransactResult {
                    code: 0,
                    message: String::new(),
                    kind: Some(kind),
                },
                Err(s) => failed_item(&s),
            };
            vec![(i, result)]
        });
        let remote = there.into_iter().map(|(owner, batch)| async move {
            let (at, items): (Vec<usize>, Vec<pb::TransactItem>) = batch.into_iter().unzip();
            let n = items.len();
            let answer = match self.cluster.peer(&owner) {
                Ok(mut c) => c.transact(forwarded(pb::TransactRequest { items })).await,
                Err(s) => Err(s),
            };
            match answer {
                Ok(r) if r.get_ref().results.len() == n => {
                    at.into_iter().zip(r.into_inner().results).collect()
                }
                Ok(_) => {
                    let s = Status::unavailable(format!(
                        "{owner} answered a Transact call with a different number of items"
                    ));
                    at.into_iter().map(|i| (i, failed_item(&s))).collect()
                }
                Err(s) => at
                    .into_iter()
                    .map(|i| (i, failed_item(&s)))
                    .collect::<Vec<_>>(),
            }
        });
        let (local, remote) = futures_util::future::join(
            futures_util::future::join_all(local),
            futures_util::future::join_all(remote),
        )
        .await;
        for (i, r) in local.into_iter().chain(remote).flatten() {
            results[i] = Some(r);
        }
        let results = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| failed_item(&Status::internal("an item went unanswered"))))
            .collect();
        Ok(Response::new(pb::TransactResponse { results }))
    }

    async fn get_transaction(
        &self,
        req: Request<pb::GetTransactionRequest>,
    ) -> Result<Response<pb::Transaction>, Status> {
        let caller = self.caller(&req)?;
        let fwd = was_forwarded(&req);
        let id = req.into_inner().txn_id;
        check_id("txn_id", &id)?;
        let txn = match self.for_txn(&id, fwd).await? {
            Target::Here(broker) => broker.txns.get(&id).await?,
            Target::There(owner) => self
                .forward(
                    owner,
                    pb::GetTransactionRequest { txn_id: id },
                    |mut c, r| async move { c.get_transaction(r).await },
                )
                .await?
                .into_inner(),
        };
        self.allow(&caller, Action::ActFor(&txn.service))?;
        Ok(Response::new(txn))
    }

    async fn get_stats(
        &self,
        req: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::Stats>, Status> {
        self.allow(&self.caller(&req)?, Action::Describe)?;
        // The counters of every shard, here and at the other owners.
        let others = if was_forwarded(&req) {
            Vec::new()
        } else {
            self.cluster.others().await?
        };
        let mut all: Vec<pb::Stats> = self
            .cluster
            .local()
            .iter()
            .map(|(_, b)| b.txns.stats())
            .collect();
        for o in others {
            all.push(
                self.cluster
                    .peer(&o)?
                    .get_stats(forwarded(pb::GetStatsRequest {}))
                    .await?
                    .into_inner(),
            );
        }
        Ok(Response::new(all.into_iter().fold(
            pb::Stats::default(),
            |t, s| pb::Stats {
                prepared: t.prepared + s.prepared,
                committed: t.committed + s.committed,
                rolled_back: t.rolled_back + s.rolled_back,
                checks_sent: t.checks_sent + s.checks_sent,
                resolved_by_check: t.resolved_by_check + s.resolved_by_check,
                final_actions: t.final_actions + s.final_actions,
                open: t.open + s.open,
            },
        )))
    }

    async fn start_saga(
        &self,
        req: Request<pb::StartSagaRequest>,
    ) -> Result<Response<pb::Saga>, Status> {
        let caller = self.caller(&req)?;
        let fwd = was_forwarded(&req);
        let req = req.into_inner();
        check_id("saga_id", &req.saga_id)?;
        check_id("service", &req.service)?;
        self.allow(&caller, Action::ActFor(&req.service))?;
        self.authorization.check_saga_branches(
            &caller,
            &req.service,
            req.definition
                .iter()
                .flat_map(|d| &d.branches)
                .map(|b| b.service.as_str()),
        )?;
        let broker = here_or_forward!(
            self,
            self.for_topic(crate::saga::SAGA_TOPIC, fwd).await?,
            req,
            start_saga
        );
        let def = req
            .definition
            .ok_or_else(|| Error::invalid("definition", "is required"))?;
        let def = crate::saga_wire::definition_from_wire("definition", def)?;
        // Once sent, the start is the driver's: a caller going away does
        // not cut it half way.
        let sagas = saga_host(&broker)?.clone();
        Ok(Response::new(
            sagas.start(req.saga_id, req.service, def).await?,
        ))
    }

    async fn get_saga(
        &self,
        req: Request<pb::GetSagaRequest>,
    ) -> Result<Response<pb::Saga>, Status> {
        let caller = self.caller(&req)?;
        let fwd = was_forwarded(&req);
        let id = req.into_inner().saga_id;
        check_id("saga_id", &id)?;
        let saga = match self.for_topic(crate::saga::SAGA_TOPIC, fwd).await? {
            Target::Here(broker) => saga_host(&broker)?.get(id).await?,
            Target::There(owner) => self
                .forward(
                    owner,
                    pb::GetSagaRequest { saga_id: id },
                    |mut c, r| async move { c.get_saga(r).await },
                )
                .await?
                .into_inner(),
        };
        // (Its definition and payloads are the starting service's.)
        self.allow(&caller, Action::ActFor(&saga.service))?;
        Ok(Response::new(saga))
    }

    async fn list_sagas(
        &self,
        req: Request<pb::ListSagasRequest>,
    ) -> Result<Response<pb::ListSagasResponse>, Status> {
        self.allow(&self.caller(&req)?, Action::Operate("ListSagas"))?;
        let fwd = was_forwarded(&req);
        let req = req.into_inner();
        let status = crate::saga_wire::status_from_wire(req.status)?;
        let limit = match req.limit as usize {
            0 => crate::saga::MAX_LIST,
            n if n > crate::saga::MAX_LIST => {
                return Err(
                    Error::invalid("limit", format!("at most {}", crate::saga::MAX_LIST)).into(),
                );
            }
            n => n,
        };
        let broker = here_or_forward!(
            self,
            self.for_topic(crate::saga::SAGA_TOPIC, fwd).await?,
            req,
            list_sagas
        );
        let sagas = saga_host(&broker)?.list(status, limit).await?;
        Ok(Response::new(pb::ListSagasResponse { sagas }))
    }

    async fn list_transactions(
        &self,
        req: Request<pb::ListTransactionsRequest>,
    ) -> Result<Response<pb::ListTransactionsResponse>, Status> {
        self.allow(&self.caller(&req)?, Action::Operate("ListTransactions"))?;
        let fwd = was_forwarded(&req);
        let req = req.into_inner();
        let state = match pb::TransactionState::try_from(req.state) {
            Ok(pb::TransactionState::Unspecified) => None,
            Ok(s) => Some(s as i32),
            Err(_) => {
                return Err(Error::invalid(
                    "state",
                    format!("{} is not a TransactionState", req.state),
                )
                .into());
            }
        };
        if !req.service.is_empty() {
            check_id("service", &req.service)?;
        }
        let limit = match req.limit {
            0 => DEFAULT_LIST_TXNS,
            n if n > MAX_LIST_TXNS => {
                return Err(Error::invalid("limit", format!("at most {MAX_LIST_TXNS}")).into());
            }
            n => n,
        };
        // Every shard's, here and at the other owners (each sends its
        // oldest `limit`, which holds the oldest `limit` of all).
        let others = if fwd {
            Vec::new()
        } else {
            self.cluster.others().await?
        };
        let mut all = Vec::new();
        let mut matched = 0;
        for (_, b) in self.cluster.local() {
            let after = (!req.after_txn_id.is_empty())
                .then_some((req.after_prepared_at_ms, req.after_txn_id.as_str()));
            let (oldest, n) = b
                .txns
                .list(state, &req.service, after, limit as usize)
                .await;
            all.extend(oldest);
            matched += n;
        }
        for o in others {
            let theirs = self
                .cluster
                .peer(&o)?
                .list_transactions(forwarded(req.clone()))
                .await?
                .into_inner();
            matched += theirs.matched;
            all.extend(theirs.transactions);
        }
        all.sort_by(|a, b| (a.prepared_at_ms, &a.txn_id).cmp(&(b.prepared_at_ms, &b.txn_id)));
        // A shard moving between replicas while they were asked may be
        // listed by both.
        all.dedup_by(|a, b| a.txn_id == b.txn_id);
        all.truncate(limit as usize);
        Ok(Response::new(pb::ListTransactionsResponse {
            transactions: all,
            matched,
        }))
    }

    async fn read_messages(
        &self,
        req: Request<pb::ReadMessagesRequest>,
    ) -> Result<Response<pb::ReadMessagesResponse>, Status> {
        self.allow(&self.caller(&req)?, Action::Operate("ReadMessages"))?;
        let fwd = was_forwarded(&req);
        let req = req.into_inner();
        required("topic", &req.topic)?;
        let limit = match req.limit {
            0 => crate::inspect::DEFAULT_READ,
            n if n > crate::inspect::MAX_READ => {
                return Err(Error::invalid(
                    "limit",
                    format!("at most {}", crate::inspect::MAX_READ),
                )
                .into());
            }
            n => n,
        };
        let from = match req.from {
            None => Ok(0),
            Some(pb::read_messages_request::From::Offset(o)) => Ok(o),
            Some(pb::read_messages_request::From::TimestampMs(t)) => Err(time("timestamp_ms", t)?),
        };
        let broker = here_or_forward!(
            self,
            self.for_topic(&req.topic, fwd).await?,
            req.clone(),
            read_messages
        );
        Ok(Response::new(
            broker
                .read_messages(&req.topic, req.partition, from, limit)
                .await?,
        ))
    }

    async fn find_message(
        &self,
        req: Request<pb::FindMessageRequest>,
    ) -> Result<Response<pb::StoredMessage>, Status> {
        self.allow(&self.caller(&req)?, Action::Operate("FindMessage"))?;
        let fwd = was_forwarded(&req);
        let req = req.into_inner();
        required("topic", &req.topic)?;
        check_id("id", &req.id)?;
        let broker = here_or_forward!(
            self,
            self.for_topic(&req.topic, fwd).await?,
            req.clone(),
            find_message
        );
        Ok(Response::new(
            broker.find_message(&req.topic, &req.id).await?,
        ))
    }

    async fn reset_offsets(
        &self,
        req: Request<pb::ResetOffsetsRequest>,
    ) -> Result<Response<pb::ResetOffsetsResponse>, Status> {
        self.allow(&self.caller(&req)?, Action::Operate("ResetOffsets"))?;
        use crate::inspect::ResetTo;
        use pb::reset_offsets_request::To;
        let fwd = was_forwarded(&req);
        let req = req.into_inner();
        required("topic", &req.topic)?;
        check_group("group", &req.group)?;
        let to = match req.to {
            Some(To::Earliest(_)) => ResetTo::Earliest,
            Some(To::Latest(_)) => ResetTo::Latest,
            Some(To::Offset(o)) => ResetTo::Offset(o),
            Some(To::TimestampMs(t)) => ResetTo::Time(time("timestamp_ms", t)?),
            None => {
                return Err(Error::invalid(
                    "to",
                    "is required: earliest, latest, offset or timestamp_ms",
                )
                .into());
            }
        };
        let broker = here_or_forward!(
            self,
            self.for_topic(&req.topic, fwd).await?,
            req.clone(),
            reset_offsets
        );
        let moves = broker
            .reset_offsets(&req.topic, &req.group, &req.partitions, to, req.only_back)
            .await?;
        Ok(Response::new(pb::ResetOffsetsResponse { moves }))
    }

    async fn add_partitions(
        &self,
        req: Request<pb::AddPartitionsRequest>,
    ) -> Result<Response<pb::AddPartitionsResponse>, Status> {
        self.allow(&self.caller(&req)?, Action::Operate("AddPartitions"))?;
        let fwd = was_forwarded(&req);
        let req = req.into_inner();
        required("name", &req.name)?;
        let broker = here_or_forward!(
            self,
            self.for_topic(&req.name, fwd).await?,
            req.clone(),
            add_partitions
        );
        let previous = broker.add_partitions(&req.name, req.partitions).await?;
        Ok(Response::new(pb::AddPartitionsResponse {
            previous,
            partitions: req.partitions,
        }))
    }

    async fn delete_topic(
        &self,
        req: Request<pb::DeleteTopicRequest>,
    ) -> Result<Response<pb::DeleteTopicResponse>, Status> {
        self.allow(&self.caller(&req)?, Action::Operate("DeleteTopic"))?;
        let fwd = was_forwarded(&req);
        let req = req.into_inner();
        required("name", &req.name)?;
        let broker = here_or_forward!(
            self,
            self.for_topic(&req.name, fwd).await?,
            req.clone(),
            delete_topic
        );
        broker.delete_topic(&req.name).await?;
        Ok(Response::new(pb::DeleteTopicResponse {}))
    }

    type SessionStream = SessionStream;

    async fn session(
        &self,
        req: Request<Streaming<pb::SessionRequest>>,
    ) -> Result<Response<SessionStream>, Status> {
        let caller = self.caller(&req)?;
        let mut stream = req.into_inner();
        let first = stream.message().await?.ok_or_else(|| {
            Status::from(Error::invalid("hello", "the stream ended before Hello"))
        })?;
        let Some(pb::session_request::Kind::Hello(hello)) = first.kind else {
            return Err(
                Error::invalid("hello", "the first request of a session must be Hello").into(),
            );
        };
        check_id("hello.service", &hello.service)?;
        self.allow(&caller, Action::ActFor(&hello.service))?;
        // Sessions belong to the replica, whichever shards it serves:
        // check-backs and branch calls of each of them go down them.
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let sessions = self.cluster.sessions.clone();
        let id = sessions.register(&hello.service, &hello.instance, tx.clone());
        let mut replicas = self.cluster.replicas.clone();
        let welcome = pb::SessionResponse {
            kind: Some(pb::session_response::Kind::Welcome(pb::Welcome {
                session_id: format!("{}-{id}", hello.service),
                replicas: replicas.borrow_and_update().clone(),
            })),
        };
        tx.send(Ok(welcome))
            .await
            .map_err(|_| Status::cancelled("session closed"))?;
        let mut shutdown = self.cluster.stopping.clone();
        tokio::spawn(async move {
            tracing::info!(service = %hello.service, instance = %hello.instance, session = id, "sidecar session opened");
            let reason = loop {
                tokio::select! {
                    r = tokio::time::timeout(SIDECAR_SESSION_TIMEOUT, stream.message()) => match r {
                        Ok(Ok(Some(pb::SessionRequest { kind: Some(pb::session_request::Kind::CheckResult(c)) }))) => {
                            sessions.answer(&hello.service, c);
                        }
                        Ok(Ok(Some(pb::SessionRequest { kind: Some(pb::session_request::Kind::BranchResult(r)) }))) => {
                            sessions.branch_answer(&hello.service, r);
                        }
                        Ok(Ok(Some(_))) => {}
                        Ok(Ok(None)) => break "closed by the sidecar".to_owned(),
                        Ok(Err(s)) => break format!("stream broke: {}", s.message()),
                        Err(_) => break "no heartbeat within the session timeout".to_owned(),
                    },
                    Ok(()) = replicas.changed() => {
                        let list = replicas.borrow_and_update().clone();
                        let update = pb::SessionResponse {
                            kind: Some(pb::session_response::Kind::Replicas(pb::Replicas { replicas: list })),
                        };
                        if tx.send(Ok(update)).await.is_err() {
                            break "the sidecar stopped reading".to_owned();
                        }
                    }
                    // (Not holding the watch's guard across the sends above.)
                    () = async { let _ = shutdown.wait_for(|s| *s).await; } => break "the coordinator is shutting down".to_owned(),
                }
            };
            sessions.unregister(&hello.service, id);
            drop(tx);
            tracing::info!(service = %hello.service, session = id, %reason, "sidecar session closed");
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
