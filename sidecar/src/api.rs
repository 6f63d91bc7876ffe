//! The sidecar API the app calls: publishing (plain and transactional),
//! explicit transactions, subscriptions.

use std::sync::Arc;

use bytes::Bytes;
use tandem_proto::app as app_pb;
use tandem_proto::coordinator as pb;
use tandem_proto::sidecar as sc;
use tandem_runtime::telemetry;
use tandem_storage::failpoint;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

use crate::check::Mode;
use crate::error::{Error, Result};
use crate::node::{Counters, Node};
use crate::subscription::{self, Subscriptions};

/// The sidecar's gRPC service.
pub(crate) struct SidecarService {
    pub(crate) node: Arc<Node>,
    pub(crate) subscriptions: Arc<Subscriptions>,
}

/// This sidecar's span of an app's call, a child of the trace context in
/// the call's metadata, and the context to pass on (the span's own, or
/// the incoming one unchanged when traces are not exported).
fn call_span(
    name: &'static str,
    meta: &tonic::metadata::MetadataMap,
) -> (tracing::Span, Option<String>) {
    let incoming = telemetry::from_metadata(meta);
    let span = telemetry::span(name, || incoming.clone());
    let pass = telemetry::pass_on(&span, incoming.as_deref());
    (span, pass)
}

/// `m` with the trace context `tp` in its headers, for its consumers
/// (unless the app put one there itself).
fn traced(mut m: pb::Message, tp: Option<&str>) -> pb::Message {
    if let Some(tp) = tp
        && !m.headers.iter().any(|h| h.name == telemetry::TRACEPARENT)
    {
        m.headers.push(pb::Header {
            name: telemetry::TRACEPARENT.to_owned(),
            value: Bytes::from(tp.to_owned()),
        });
    }
    m
}

/// The call may not have reached the coordinator, or its answer was lost.
fn lost_call(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    )
}

fn response(txn_id: String, r: pb::EndTransactionResponse) -> sc::TransactionResponse {
    sc::TransactionResponse {
        txn_id,
        state: r.state,
        position: r.position,
    }
}

fn left_to_check_back(txn_id: String) -> sc::TransactionResponse {
    sc::TransactionResponse {
        txn_id,
        state: pb::TransactionState::Prepared as i32,
        position: None,
    }
}

impl SidecarService {
    async fn prepare(
        &self,
        topic: String,
        message: Option<pb::Message>,
        txn_id: String,
        mode: Mode,
    ) -> Result<pb::PrepareResponse> {
        let req = pb::PrepareRequest {
            service: self.node.config.service.clone(),
            txn_id,
            topic,
            message,
            context: Bytes::from_static(mode.context()),
            instance: self.node.config.instance.clone(),
            // This call's own: retried on another replica after its answer
            // was lost, the prepare is still recognised as this call's.
            attempt: tandem_runtime::fresh_id(),
        };
        match self
            .node
            .transact(pb::transact_item::Kind::Prepare(req))
            .await
            .map_err(Error::Coordinator)?
        {
            pb::transact_result::Kind::Prepare(r) => Ok(r),
            pb::transact_result::Kind::End(_) => Err(Error::Coordinator(Status::internal(
                "the coordinator answered a prepare as an outcome",
            ))),
        }
    }

    /// Sends an outcome; `Node::transact` retries it on another replica or
    /// after a lost answer (outcomes are idempotent) for up to its failover
    /// wait.
    async fn end(&self, txn_id: &str, commit: bool) -> Result<pb::EndTransactionResponse> {
        let req = pb::EndTransactionRequest {
            service: self.node.config.service.clone(),
            txn_id: txn_id.to_owned(),
        };
        let item = if commit {
            pb::transact_item::Kind::Commit(req)
        } else {
            pb::transact_item::Kind::Rollback(req)
        };
        let r = match self.node.transact(item).await.map_err(Error::Coordinator)? {
            pb::transact_result::Kind::End(r) => r,
            pb::transact_result::Kind::Prepare(_) => {
                return Err(Error::Coordinator(Status::internal(
                    "the coordinator answered an outcome as a prepare",
                )));
            }
        };
        Counters::bump(if commit {
            &self.node.counters.committed
        } else {
            &self.node.counters.rolled_back
        });
        Ok(r)
    }
}

/// Tandem's topic of committed saga starts (see the coordinator).
const SAGA_TOPIC: &str = "__sagas";

/// How long Subscribe waits to hear whether the coordinator takes the
/// subscription's first session.
const FIRST_SESSION_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

impl SidecarService {
    /// Begin of a transactional message or a saga.
    async fn begin_any(
        &self,
        topic: String,
        message: Option<pb::Message>,
        txn_id: String,
        check_mode: i32,
    ) -> Result<Response<sc::BeginResponse>, Status> {
        let mode = match sc::CheckMode::try_from(check_mode) {
            Ok(sc::CheckMode::Callback) => {
                self.node.app("Begin with CHECK_MODE_CALLBACK")?;
                Mode::Callback
            }
            Ok(_) => Mode::Table,
            Err(_) => {
                return Err(
                    Error::invalid("check_mode", format!("unknown mode {check_mode}")).into(),
                );
            }
        };
        let txn_id = self.prepare(topic, message, txn_id, mode).await?.txn_id;
        failpoint::hit("sidecar.begin.after_prepare");
        Ok(Response::new(sc::BeginResponse { txn_id }))
    }
}

impl SidecarService {
    /// PublishTransactional within its span; `tp` is the trace context
    /// handed to the app's ExecuteLocalTransaction.
    async fn publish_transactional_traced(
        &self,
        req: sc::PublishTransactionalRequest,
        tp: Option<String>,
    ) -> Result<Response<sc::TransactionResponse>, Status> {
        let mut app = self.node.app("PublishTransactional")?;
        // The id is chosen here, so that a check-back arriving before
        // ExecuteLocalTransaction has even started is answered UNKNOWN.
        let txn_id = if req.txn_id.is_empty() {
            tandem_runtime::fresh_id()
        } else {
            req.txn_id
        };
        let running = self.node.executing.start(&txn_id)?;
        let prepared = self
            .prepare(
                req.topic.clone(),
                req.message.clone(),
                txn_id,
                Mode::Callback,
            )
            .await?;
        let txn_id = prepared.txn_id;
        if prepared.existed {
            // A retry (the answer to an earlier call was lost): the local
            // transaction is not run again. A decided one is answered with
            // its outcome; an open one is left to check-back, which asks
            // CheckLocalTransaction.
            drop(running);
            if prepared.state == pb::TransactionState::Prepared as i32 {
                return Ok(Response::new(left_to_check_back(txn_id)));
            }
            let req = pb::GetTransactionRequest {
                txn_id: txn_id.clone(),
            };
            let t = self
                .node
                .call(|mut c| {
                    let req = req.clone();
                    async move { c.get_transaction(req).await }
                })
                .await?
                .into_inner();
            return Ok(Response::new(sc::TransactionResponse {
                txn_id,
                state: t.state,
                position: t.position,
            }));
        }
        let execute = app_pb::ExecuteLocalTransactionRequest {
            txn_id: txn_id.clone(),
            topic: req.topic,
            message: req.message.map(|m| pb::Message {
                id: txn_id.clone(),
                ..m
            }),
        };
        // The app sees the deadline (grpc-timeout); a call cut short is
        // cancelled, and the transaction is left to check-back.
        let mut execute = Request::new(execute);
        execute.set_timeout(self.node.config.callback_timeout);
        telemetry::to_metadata(execute.metadata_mut(), tp.as_deref());
        let state = match tokio::time::timeout(
            self.node.config.callback_timeout,
            app.execute_local_transaction(execute),
        )
        .await
        {
            Ok(Ok(r)) => {
                pb::LocalState::try_from(r.into_inner().state).unwrap_or(pb::LocalState::Unknown)
            }
            Ok(Err(s)) => {
                tracing::warn!(txn = %txn_id, error = %s.message(), "ExecuteLocalTransaction failed; leaving the outcome to check-back");
                pb::LocalState::Unknown
            }
            Err(_) => {
                tracing::warn!(txn = %txn_id, "ExecuteLocalTransaction timed out; leaving the outcome to check-back");
                pb::LocalState::Unknown
            }
        };
        running.decided(state);
        let reply = match state {
            pb::LocalState::Commit | pb::LocalState::Rollback => {
                let commit = state == pb::LocalState::Commit;
                match self.end(&txn_id, commit).await {
                    Ok(r) => response(txn_id.clone(), r),
                    // The local transaction is decided: check-back will
                    // settle it; the app is told so, not that it failed.
                    Err(Error::Coordinator(s)) if lost_call(&s) => {
                        tracing::warn!(txn = %txn_id, commit, error = %s.message(), "outcome not confirmed by any coordinator; left to check-back");
                        left_to_check_back(txn_id)
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            _ => left_to_check_back(txn_id),
        };
        Ok(Response::new(reply))
    }
}

#[tonic::async_trait]
impl sc::sidecar_server::Sidecar for SidecarService {
    async fn publish(
        &self,
        req: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let (span, tp) = call_span("sidecar.Publish", req.metadata());
        let mut req = req.into_inner();
        span.record("topic", req.topic.as_str());
        // Every message gets an id here, so that a publish retried on
        // another coordinator replica (the first one went down mid-call) is
        // deduplicated there instead of appended twice.
        req.messages = std::mem::take(&mut req.messages)
            .into_iter()
            .map(|mut m| {
                if m.id.is_empty() {
                    m.id = tandem_runtime::fresh_id();
                }
                traced(m, tp.as_deref())
            })
            .collect();
        Ok(Response::new(
            self.node
                .call(|mut c| {
                    let req = req.clone();
                    async move { c.publish(req).await }
                })
                .instrument(span)
                .await?
                .into_inner(),
        ))
    }

    async fn publish_transactional(
        &self,
        req: Request<sc::PublishTransactionalRequest>,
    ) -> Result<Response<sc::TransactionResponse>, Status> {
        let (span, tp) = call_span("sidecar.PublishTransactional", req.metadata());
        let mut req = req.into_inner();
        span.record("topic", req.topic.as_str());
        req.message = req.message.map(|m| traced(m, tp.as_deref()));
        self.publish_transactional_traced(req, tp)
            .instrument(span)
            .await
    }

    async fn begin(
        &self,
        req: Request<sc::BeginRequest>,
    ) -> Result<Response<sc::BeginResponse>, Status> {
        let (span, tp) = call_span("sidecar.Begin", req.metadata());
        let req = req.into_inner();
        span.record("topic", req.topic.as_str());
        let message = req.message.map(|m| traced(m, tp.as_deref()));
        self.begin_any(req.topic, message, req.txn_id, req.check_mode)
            .instrument(span)
            .await
    }

    async fn begin_saga(
        &self,
        req: Request<sc::BeginSagaRequest>,
    ) -> Result<Response<sc::BeginResponse>, Status> {
        let req = req.into_inner();
        let mut saga = req
            .saga
            .ok_or_else(|| Status::from(Error::invalid("saga", "is required")))?;
        saga.service = self.node.config.service.clone();
        let message = pb::Message {
            key: Some(saga.saga_id.clone().into()),
            value: prost::Message::encode_to_vec(&saga).into(),
            ..Default::default()
        };
        self.begin_any(SAGA_TOPIC.into(), Some(message), req.txn_id, req.check_mode)
            .await
            .map_err(|s| match s.message().strip_prefix("message.value.") {
                // The coordinator checked the saga inside the half message:
                // name the field as the app sent it.
                Some(rest) if s.code() == Code::InvalidArgument => {
                    Status::invalid_argument(format!("saga.{rest}"))
                }
                _ => s,
            })
    }

    async fn commit(
        &self,
        req: Request<sc::EndRequest>,
    ) -> Result<Response<sc::TransactionResponse>, Status> {
        let (span, _) = call_span("sidecar.Commit", req.metadata());
        let txn_id = req.into_inner().txn_id;
        span.record("txn", txn_id.as_str());
        failpoint::hit("sidecar.commit.before_forward");
        match self.end(&txn_id, true).instrument(span).await {
            Ok(r) => Ok(Response::new(response(txn_id, r))),
            Err(Error::Coordinator(s)) if lost_call(&s) => {
                // The local transaction is committed; check-back will deliver.
                Ok(Response::new(left_to_check_back(txn_id)))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn start_saga(
        &self,
        req: Request<pb::StartSagaRequest>,
    ) -> Result<Response<pb::Saga>, Status> {
        let mut req = req.into_inner();
        // A saga is started on behalf of this service, whatever was sent.
        req.service = self.node.config.service.clone();
        Ok(Response::new(
            self.node
                .call(|mut c| {
                    let req = req.clone();
                    async move { c.start_saga(req).await }
                })
                .await?
                .into_inner(),
        ))
    }

    async fn get_saga(
        &self,
        req: Request<pb::GetSagaRequest>,
    ) -> Result<Response<pb::Saga>, Status> {
        let req = req.into_inner();
        tandem_runtime::check_id("saga_id", &req.saga_id).map_err(Status::from)?;
        Ok(Response::new(
            self.node
                .call(|mut c| {
                    let req = req.clone();
                    async move { c.get_saga(req).await }
                })
                .await?
                .into_inner(),
        ))
    }

    async fn get_transaction(
        &self,
        req: Request<pb::GetTransactionRequest>,
    ) -> Result<Response<pb::Transaction>, Status> {
        let req = req.into_inner();
        tandem_runtime::check_id("txn_id", &req.txn_id).map_err(Status::from)?;
        let t = self
            .node
            .call(|mut c| {
                let req = req.clone();
                async move { c.get_transaction(req).await }
            })
            .await?
            .into_inner();
        if t.service != self.node.config.service {
            return Err(Status::permission_denied(format!(
                "transaction {:?} belongs to service {:?}, not {:?}",
                t.txn_id, t.service, self.node.config.service
            )));
        }
        Ok(Response::new(t))
    }

    async fn rollback(
        &self,
        req: Request<sc::EndRequest>,
    ) -> Result<Response<sc::TransactionResponse>, Status> {
        let (span, _) = call_span("sidecar.Rollback", req.metadata());
        let txn_id = req.into_inner().txn_id;
        span.record("txn", txn_id.as_str());
        match self.end(&txn_id, false).instrument(span).await {
            Ok(r) => Ok(Response::new(response(txn_id, r))),
            Err(Error::Coordinator(s)) if lost_call(&s) => {
                Ok(Response::new(left_to_check_back(txn_id)))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn subscribe(
        &self,
        req: Request<sc::SubscribeRequest>,
    ) -> Result<Response<sc::SubscribeResponse>, Status> {
        let spec = subscription::normalize(&self.node, req.into_inner())?;
        self.node.app("Subscribe")?;
        // The topic must exist; its dead-letter topic is created with it.
        let describe = pb::DescribeTopicRequest {
            name: spec.topic.clone(),
        };
        self.node
            .call(|mut c| {
                let req = describe.clone();
                async move { c.describe_topic(req).await }
            })
            .await?;
        let dlq = pb::CreateTopicRequest {
            name: format!("{}.dlq", spec.topic),
            partitions: 1,
        };
        let created = self
            .node
            .call(|mut c| {
                let req = dlq.clone();
                async move { c.create_topic(req).await }
            })
            .await;
        match created {
            Ok(_) => {}
            Err(s) if s.code() == Code::AlreadyExists => {}
            Err(s) => return Err(s),
        }
        // (Put back if the coordinator refuses the new settings.)
        let previous = self.subscriptions.current(&spec.topic, &spec.group);
        self.node
            .db
            .save_subscription(&spec.topic, &spec.group, &subscription::encode(&spec))
            .await?;
        // The coordinator decides whether this service may consume the
        // topic as the group when the first session opens: a refusal is the
        // app's answer, and nothing is kept (a coordinator not reached
        // within a few seconds is not waited for: the subscription is kept
        // and tried until it is).
        let (first, opened) = tokio::sync::oneshot::channel();
        self.subscriptions
            .start(&self.node, spec.clone(), Some(first))
            .await;
        if let Ok(Ok(Err(refused))) = tokio::time::timeout(FIRST_SESSION_WAIT, opened).await {
            self.subscriptions.stop(&spec.topic, &spec.group).await;
            match previous {
                Some(old) => {
                    self.node
                        .db
                        .save_subscription(&old.topic, &old.group, &subscription::encode(&old))
                        .await?;
                    self.subscriptions.start(&self.node, old, None).await;
                }
                None => {
                    self.node
                        .db
                        .delete_subscription(&spec.topic, &spec.group)
                        .await?;
                }
            }
            return Err(refused);
        }
        tracing::info!(topic = %spec.topic, group = %spec.group, "subscribed");
        Ok(Response::new(sc::SubscribeResponse {}))
    }

    async fn unsubscribe(
        &self,
        req: Request<sc::UnsubscribeRequest>,
    ) -> Result<Response<sc::UnsubscribeResponse>, Status> {
        let req = req.into_inner();
        if req.topic.is_empty() {
            return Err(Error::invalid("topic", "is required").into());
        }
        let group = if req.group.is_empty() {
            self.node.config.service.clone()
        } else {
            req.group
        };
        let saved = self.node.db.delete_subscription(&req.topic, &group).await?;
        let running = self.subscriptions.stop(&req.topic, &group).await;
        if !saved && !running {
            return Err(Status::not_found(format!(
                "no subscription to {:?} for group {group:?}",
                req.topic
            )));
        }
        Ok(Response::new(sc::UnsubscribeResponse {}))
    }

    async fn list_subscriptions(
        &self,
        _: Request<sc::ListSubscriptionsRequest>,
    ) -> Result<Response<sc::ListSubscriptionsResponse>, Status> {
        Ok(Response::new(sc::ListSubscriptionsResponse {
            subscriptions: self.subscriptions.list(),
        }))
    }

    async fn get_stats(
        &self,
        _: Request<sc::GetStatsRequest>,
    ) -> Result<Response<sc::Stats>, Status> {
        Ok(Response::new(self.node.counters.snapshot()))
    }
}
