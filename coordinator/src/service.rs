//! The gRPC face of the broker: checks every request field (naming it in
//! the error) before anything changes, and converts between the wire types
//! and the broker's.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tandem_proto::coordinator as pb;
use tandem_storage::{Log, Record};
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use crate::broker::{Broker, Outgoing};
use crate::consumer::{StartFrom, Subscription};
use crate::error::Error;
use crate::statelog::now_ms;
use crate::transactions::MARKER_HEADER;
use crate::wire::headers_from_wire;

/// Longest message id accepted.
pub const MAX_ID_LEN: usize = 128;

/// Checks a client-chosen id (message or transaction): 1 to 128 bytes, no
/// control characters.
pub fn check_id(field: &str, id: &str) -> Result<(), Error> {
    if id.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(Error::invalid(
            field,
            format!("is {} bytes, longer than {MAX_ID_LEN}", id.len()),
        ));
    }
    if id.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(())
}

/// Checks a consumer group name: 1 to 255 bytes, no control characters.
pub fn check_group(field: &str, group: &str) -> Result<(), Error> {
    if group.is_empty() || group.len() > 255 || group.chars().any(char::is_control) {
        return Err(Error::invalid(
            field,
            "must be 1 to 255 bytes without control characters",
        ));
    }
    Ok(())
}

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

/// What a replica serves right now.
pub enum Role<L> {
    /// It serves this broker; on a shared store, while its lease is valid.
    Active(Arc<Broker<L>>, Option<Arc<Validity>>),
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

/// Metadata key naming the replica that holds the lease, on refusals of a
/// standby.
pub const OWNER_METADATA: &str = "tandem-owner";

/// The coordinator's gRPC service.
pub struct CoordinatorService<L> {
    role: watch::Receiver<Role<L>>,
    max_message_bytes: usize,
    default_session_timeout: Duration,
}

impl<L> CoordinatorService<L> {
    /// Serves `broker`.
    pub fn new(
        broker: Arc<Broker<L>>,
        max_message_bytes: usize,
        default_session_timeout: Duration,
    ) -> Self {
        Self::with_role(
            watch::channel(Role::Active(broker, None)).1,
            max_message_bytes,
            default_session_timeout,
        )
    }

    /// Serves whichever broker `role` holds at each request.
    pub fn with_role(
        role: watch::Receiver<Role<L>>,
        max_message_bytes: usize,
        default_session_timeout: Duration,
    ) -> Self {
        CoordinatorService {
            role,
            max_message_bytes,
            default_session_timeout,
        }
    }

    fn broker(&self) -> Result<Arc<Broker<L>>, Status> {
        match &*self.role.borrow() {
            Role::Active(_, Some(v)) if !v.valid() => Err(Status::unavailable(
                "this coordinator replica's lease ran out before it could renew it",
            )),
            Role::Active(b, _) => Ok(b.clone()),
            Role::Standby { owner } => Err(not_serving(owner.as_deref())),
        }
    }
}

/// The refusal of a replica that does not hold the lease.
fn not_serving(owner: Option<&str>) -> Status {
    let mut status = Status::unavailable(match owner {
        Some(o) => format!("this coordinator replica does not hold the lease; {o} does"),
        None => "this coordinator replica does not hold the lease (no holder known yet)".into(),
    });
    if let Some(v) = owner.and_then(|o| o.parse().ok()) {
        status.metadata_mut().insert(OWNER_METADATA, v);
    }
    status
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

pub(crate) fn outgoing(
    field: &str,
    m: pb::Message,
    partitions: u32,
    max_bytes: usize,
) -> Result<Outgoing, Error> {
    let chosen_id = !m.id.is_empty();
    let id = if !chosen_id {
        uuid::Uuid::now_v7().to_string()
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
        if h.name == MARKER_HEADER {
            return Err(Error::invalid(
                format!("{field}.headers[{j}].name"),
                format!("{MARKER_HEADER:?} is reserved for Tandem's own use"),
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
    let size = record.encoded_len();
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

/// Largest opaque producer context kept with a half message.
pub const MAX_CONTEXT_BYTES: usize = 64 << 10;

/// Checks the service and transaction ids of an outcome request.
fn end_request(req: &pb::EndTransactionRequest) -> Result<(), Error> {
    check_id("service", &req.service)?;
    check_id("txn_id", &req.txn_id)
}

#[tonic::async_trait]
impl<L: Log + Clone> pb::coordinator_server::Coordinator for CoordinatorService<L> {
    async fn create_topic(
        &self,
        req: Request<pb::CreateTopicRequest>,
    ) -> Result<Response<pb::CreateTopicResponse>, Status> {
        let req = req.into_inner();
        self.broker()?
            .create_topic(&req.name, req.partitions)
            .await?;
        Ok(Response::new(pb::CreateTopicResponse {}))
    }

    async fn list_topics(
        &self,
        _: Request<pb::ListTopicsRequest>,
    ) -> Result<Response<pb::ListTopicsResponse>, Status> {
        let topics = self
            .broker()?
            .list_topics()
            .into_iter()
            // Tandem's own topics (`__sagas`) are left out, as Kafka's
            // tools leave out internal topics; DescribeTopic shows them.
            .filter(|(name, _)| !name.starts_with("__"))
            .map(|(name, meta)| pb::TopicSummary {
                name,
                partitions: meta.partitions,
            })
            .collect();
        Ok(Response::new(pb::ListTopicsResponse { topics }))
    }

    async fn describe_topic(
        &self,
        req: Request<pb::DescribeTopicRequest>,
    ) -> Result<Response<pb::DescribeTopicResponse>, Status> {
        let name = req.into_inner().name;
        required("name", &name)?;
        let (partitions, groups) = self.broker()?.describe(&name).await?;
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
        Ok(Response::new(pb::DescribeTopicResponse {
            name,
            partitions,
            groups,
        }))
    }

    async fn publish(
        &self,
        req: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let req = req.into_inner();
        let topic = required("topic", &req.topic)?;
        if topic.starts_with("__") {
            return Err(Error::invalid(
                "topic",
                "topics starting with \"__\" are Tandem's own: start sagas with StartSaga, or with a transaction (Prepare)",
            )
            .into());
        }
        let broker = self.broker()?;
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
            .map(|(i, m)| outgoing(&format!("messages[{i}]"), m, meta.partitions, limit))
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
        let broker = self.broker()?;
        let meta = broker.topic(topic)?;
        check_group("subscribe.group", &sub.group)?;
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
        let req = req.into_inner();
        check_id("service", &req.service)?;
        let txn_id = if req.txn_id.is_empty() {
            uuid::Uuid::now_v7().to_string()
        } else {
            check_id("txn_id", &req.txn_id)?;
            req.txn_id
        };
        let topic = required("topic", &req.topic)?;
        let broker = self.broker()?;
        let meta = broker.topic(topic)?;
        let mut message = req
            .message
            .ok_or_else(|| Error::invalid("message", "is required"))?;
        if topic == crate::saga::SAGA_TOPIC {
            // A saga started with a local transaction: checked now, and
            // started when (if) the transaction commits.
            let (value, id, def) = crate::saga_wire::check_start(&req.service, &message.value)?;
            broker
                .sagas
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
        let req = req.into_inner();
        end_request(&req)?;
        let broker = self.broker()?;
        Ok(Response::new(
            detached(async move { broker.txns.commit(&req.service, &req.txn_id).await }).await?,
        ))
    }

    async fn rollback(
        &self,
        req: Request<pb::EndTransactionRequest>,
    ) -> Result<Response<pb::EndTransactionResponse>, Status> {
        let req = req.into_inner();
        end_request(&req)?;
        let broker = self.broker()?;
        Ok(Response::new(
            detached(async move { broker.txns.rollback(&req.service, &req.txn_id).await }).await?,
        ))
    }

    async fn transact(
        &self,
        req: Request<pb::TransactRequest>,
    ) -> Result<Response<pb::TransactResponse>, Status> {
        use pb::transact_item::Kind;
        use pb::transact_result::Kind as Answer;
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
        // Not serving: the whole call is refused, naming the holder.
        self.broker()?;
        let answers = items.into_iter().enumerate().map(|(i, item)| async move {
            let answer = match item.kind {
                Some(Kind::Prepare(p)) => self
                    .prepare(Request::new(p))
                    .await
                    .map(|r| Answer::Prepare(r.into_inner())),
                Some(Kind::Commit(e)) => self
                    .commit(Request::new(e))
                    .await
                    .map(|r| Answer::End(r.into_inner())),
                Some(Kind::Rollback(e)) => self
                    .rollback(Request::new(e))
                    .await
                    .map(|r| Answer::End(r.into_inner())),
                None => Err(Status::invalid_argument(format!(
                    "items[{i}]: prepare, commit or rollback is required"
                ))),
            };
            match answer {
                Ok(kind) => pb::TransactResult {
                    code: 0,
                    message: String::new(),
                    kind: Some(kind),
                },
                Err(s) => pb::TransactResult {
                    code: s.code() as i32,
                    message: s.message().to_owned(),
                    kind: None,
                },
            }
        });
        let results = futures_util::future::join_all(answers).await;
        // Stopped serving meanwhile: refused as a whole, naming the holder,
        // so that the caller goes there with every item (each is safe to
        // send again).
        self.broker()?;
        Ok(Response::new(pb::TransactResponse { results }))
    }

    async fn get_transaction(
        &self,
        req: Request<pb::GetTransactionRequest>,
    ) -> Result<Response<pb::Transaction>, Status> {
        let id = req.into_inner().txn_id;
        check_id("txn_id", &id)?;
        Ok(Response::new(self.broker()?.txns.get(&id).await?))
    }

    async fn get_stats(
        &self,
        _: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::Stats>, Status> {
        Ok(Response::new(self.broker()?.txns.stats()))
    }

    async fn start_saga(
        &self,
        req: Request<pb::StartSagaRequest>,
    ) -> Result<Response<pb::Saga>, Status> {
        let req = req.into_inner();
        check_id("saga_id", &req.saga_id)?;
        check_id("service", &req.service)?;
        let def = req
            .definition
            .ok_or_else(|| Error::invalid("definition", "is required"))?;
        let def = crate::saga_wire::definition_from_wire("definition", def)?;
        // Once sent, the start is the driver's: a caller going away does
        // not cut it half way.
        let sagas = self.broker()?.sagas.clone();
        Ok(Response::new(
            sagas.start(req.saga_id, req.service, def).await?,
        ))
    }

    async fn get_saga(
        &self,
        req: Request<pb::GetSagaRequest>,
    ) -> Result<Response<pb::Saga>, Status> {
        let id = req.into_inner().saga_id;
        check_id("saga_id", &id)?;
        Ok(Response::new(self.broker()?.sagas.get(id).await?))
    }

    async fn list_sagas(
        &self,
        req: Request<pb::ListSagasRequest>,
    ) -> Result<Response<pb::ListSagasResponse>, Status> {
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
        let sagas = self.broker()?.sagas.list(status, limit).await?;
        Ok(Response::new(pb::ListSagasResponse { sagas }))
    }

    type SessionStream = SessionStream;

    async fn session(
        &self,
        req: Request<Streaming<pb::SessionRequest>>,
    ) -> Result<Response<SessionStream>, Status> {
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
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let broker = self.broker()?;
        let sessions = broker.txns.sessions.clone();
        let id = sessions.register(&hello.service, &hello.instance, tx.clone());
        let welcome = pb::SessionResponse {
            kind: Some(pb::session_response::Kind::Welcome(pb::Welcome {
                session_id: format!("{}-{id}", hello.service),
            })),
        };
        tx.send(Ok(welcome))
            .await
            .map_err(|_| Status::cancelled("session closed"))?;
        let mut shutdown = broker.shutting_down();
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
                    _ = shutdown.wait_for(|s| *s) => break "the coordinator stopped serving (shutting down or no longer the lease holder)".to_owned(),
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
