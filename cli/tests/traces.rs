//! One order is one trace: an app's PublishTransactional through its
//! sidecar, the coordinator's prepare and commit, and the consuming
//! sidecar's delivery to its app, exported by three real processes to an
//! OTLP receiver in this test, share the app's trace id and nest.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1 as otlp;
use tandem_examples::process::Process;
use tandem_proto::app as app_pb;
use tandem_proto::coordinator as pb;
use tandem_proto::sidecar as sc;
use tonic::{Request, Response, Status};

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");

/// A span as received: its service, name, ids and parent, in hex.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    name: String,
    trace: String,
    id: String,
    parent: String,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The OTLP/gRPC trace receiver: keeps every span it is sent.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Received>>>);

#[tonic::async_trait]
impl otlp::trace_service_server::TraceService for Receiver {
    async fn export(
        &self,
        req: Request<otlp::ExportTraceServiceRequest>,
    ) -> Result<Response<otlp::ExportTraceServiceResponse>, Status> {
        let mut spans = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(
                        opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s),
                    ) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.push(Received {
                        service: service.clone(),
                        name: s.name,
                        trace: hex(&s.trace_id),
                        id: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                    });
                }
            }
        }
        Ok(Response::new(otlp::ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// The producer's and the consumer's app: commits every local
/// transaction; records the `traceparent` each call came with.
#[derive(Clone, Default)]
struct App(Arc<Mutex<HashMap<&'static str, String>>>);

impl App {
    fn saw(&self, call: &'static str, m: &tonic::metadata::MetadataMap) {
        let tp = m
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(call, tp);
    }

    fn get(&self, call: &str) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(call)
            .cloned()
    }
}

#[tonic::async_trait]
impl app_pb::app_server::App for App {
    async fn execute_local_transaction(
        &self,
        req: Request<app_pb::ExecuteLocalTransactionRequest>,
    ) -> Result<Response<app_pb::LocalTransactionResponse>, Status> {
        self.saw("ExecuteLocalTransaction", req.metadata());
        Ok(Response::new(app_pb::LocalTransactionResponse {
            state: pb::LocalState::Commit as i32,
        }))
    }

    async fn check_local_transaction(
        &self,
        _: Request<app_pb::CheckLocalTransactionRequest>,
    ) -> Result<Response<app_pb::LocalTransactionResponse>, Status> {
        Ok(Response::new(app_pb::LocalTransactionResponse {
            state: pb::LocalState::Commit as i32,
        }))
    }

    async fn handle_message(
        &self,
        req: Request<app_pb::HandleMessageRequest>,
    ) -> Result<Response<app_pb::HandleMessageResponse>, Status> {
        self.saw("HandleMessage", req.metadata());
        Ok(Response::new(app_pb::HandleMessageResponse {}))
    }

    async fn handle_messages(
        &self,
        _: Request<app_pb::HandleMessagesRequest>,
    ) -> Result<Response<app_pb::HandleMessagesResponse>, Status> {
        Err(Status::unimplemented("one at a time"))
    }

    async fn execute_branch(
        &self,
        _: Request<app_pb::BranchRequest>,
    ) -> Result<Response<app_pb::BranchResponse>, Status> {
        Err(Status::unimplemented("no sagas here"))
    }

    async fn compensate_branch(
        &self,
        _: Request<app_pb::BranchRequest>,
    ) -> Result<Response<app_pb::BranchResponse>, Status> {
        Err(Status::unimplemented("no sagas here"))
    }
}

/// Serves `router` on a free loopback port; returns its address.
async fn serve(router: tonic::transport::server::Router) -> TestResult<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    Ok(addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_order_is_one_trace_across_three_processes() -> TestResult {
    let dir = tempfile::tempdir()?;
    let receiver = Receiver::default();
    let otlp_addr = serve(tonic::transport::Server::builder().add_service(
        otlp::trace_service_server::TraceServiceServer::new(receiver.clone()),
    ))
    .await?;
    let app = App::default();
    let app_addr = serve(
        tonic::transport::Server::builder()
            .add_service(app_pb::app_server::AppServer::new(app.clone())),
    )
    .await?;
    let endpoint = format!("otlp_endpoint=http://{otlp_addr}");
    let env = [("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned())];
    let start = |name: &str, args: &[&str]| -> TestResult<Process> {
        let mut all: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        all.extend(["--set".into(), endpoint.clone()]);
        all.extend(["--set".into(), "metrics_listen=off".into()]);
        Ok(Process::start(
            name,
            Path::new(TANDEM),
            &all,
            &env,
            dir.path(),
        )?)
    };
    let data = dir.path().join("coordinator").display().to_string();
    let coordinator = start(
        "coordinator",
        &[
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data,
        ],
    )?;
    let app_url = format!("http://{app_addr}");
    let sidecar = |service: &str| -> TestResult<Process> {
        let db = dir
            .path()
            .join(format!("{service}.db"))
            .display()
            .to_string();
        start(
            &format!("{service}-sidecar"),
            &[
                "sidecar",
                "--listen",
                "127.0.0.1:0",
                "--coordinator",
                &coordinator.url(),
                "--service",
                service,
                "--app",
                &app_url,
                "--db",
                &db,
            ],
        )
    };
    let producer = sidecar("orders")?;
    let consumer = sidecar("cart")?;
    let mut c = pb::coordinator_client::CoordinatorClient::connect(coordinator.url()).await?;
    c.create_topic(pb::CreateTopicRequest {
        name: "orders".into(),
        partitions: 1,
    })
    .await?;
    sc::sidecar_client::SidecarClient::connect(consumer.url())
        .await?
        .subscribe(sc::SubscribeRequest {
            topic: "orders".into(),
            group: "cart".into(),
            start_from: pb::StartFrom::Earliest as i32,
            ..Default::default()
        })
        .await?;

    // The app's own trace: its call carries the W3C context.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let root = "00f067aa0ba902b7";
    let mut call = Request::new(sc::PublishTransactionalRequest {
        topic: "orders".into(),
        message: Some(pb::Message {
            value: bytes::Bytes::from_static(b"order-1"),
            ..Default::default()
        }),
        ..Default::default()
    });
    call.metadata_mut()
        .insert("traceparent", format!("00-{trace}-{root}-01").parse()?);
    let answer = sc::sidecar_client::SidecarClient::connect(producer.url())
        .await?
        .publish_transactional(call)
        .await?
        .into_inner();
    assert_eq!(answer.state, pb::TransactionState::Committed as i32);

    let wanted = [
        "sidecar.PublishTransactional",
        "coordinator.prepare",
        "coordinator.commit",
        "sidecar.deliver",
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    let spans = loop {
        let spans = receiver
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let have = |n: &str| spans.iter().any(|s| s.name == n);
        if wanted.iter().all(|n| have(n)) && app.get("HandleMessage").is_some() {
            break spans;
        }
        if Instant::now() > deadline {
            return Err(format!("spans received: {spans:#?}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let one = |n: &str| -> TestResult<Received> {
        let found: Vec<&Received> = spans.iter().filter(|s| s.name == n).collect();
        match found.as_slice() {
            [s] => Ok((*s).clone()),
            _ => Err(format!("{n}: {found:?}").into()),
        }
    };
    let send = one("sidecar.PublishTransactional")?;
    let prepare = one("coordinator.prepare")?;
    let commit = one("coordinator.commit")?;
    let deliver = one("sidecar.deliver")?;
    for s in [&send, &prepare, &commit, &deliver] {
        assert_eq!(s.trace, trace, "{s:?} is in the app's trace");
    }
    // Three processes, each under its own service name.
    assert_eq!(send.service, "orders-sidecar");
    assert_eq!(prepare.service, "tandem-coordinator");
    assert_eq!(commit.service, "tandem-coordinator");
    assert_eq!(deliver.service, "cart-sidecar");
    // Nesting: the app's call → the sidecar's send → the coordinator's
    // prepare and commit, and the consumer's delivery → the app's handler.
    assert_eq!(send.parent, root);
    assert_eq!(prepare.parent, send.id);
    assert_eq!(commit.parent, send.id);
    assert_eq!(deliver.parent, send.id);
    let handled = app.get("HandleMessage").unwrap_or_default();
    assert_eq!(
        handled,
        format!("00-{trace}-{}-01", deliver.id),
        "the consumer's app is handed the delivery's span"
    );
    let executed = app.get("ExecuteLocalTransaction").unwrap_or_default();
    assert_eq!(
        executed,
        format!("00-{trace}-{}-01", send.id),
        "the producer's local transaction runs in the send's span"
    );

    // The trace context is not part of a message's identity: a Begin and a
    // Publish sent again from another span are the same message, not a
    // conflicting one.
    let mut client = sc::sidecar_client::SidecarClient::connect(producer.url()).await?;
    let mut positions = Vec::new();
    for parent in ["1111111111111111", "2222222222222222"] {
        let traceparent: tonic::metadata::MetadataValue<_> =
            format!("00-{trace}-{parent}-01").parse()?;
        let mut begin = Request::new(sc::BeginRequest {
            topic: "orders".into(),
            txn_id: "retried-begin".into(),
            message: Some(pb::Message {
                value: bytes::Bytes::from_static(b"order-2"),
                ..Default::default()
            }),
            ..Default::default()
        });
        begin
            .metadata_mut()
            .insert("traceparent", traceparent.clone());
        client.begin(begin).await?;
        let mut publish = Request::new(pb::PublishRequest {
            topic: "orders".into(),
            messages: vec![pb::Message {
                id: "retried-publish".into(),
                value: bytes::Bytes::from_static(b"note"),
                ..Default::default()
            }],
        });
        publish.metadata_mut().insert("traceparent", traceparent);
        positions.push(client.publish(publish).await?.into_inner().positions);
    }
    assert_eq!(
        positions[0], positions[1],
        "the retry is answered with the first append"
    );
    Ok(())
}
