//! What an operator's tools see of real processes: gRPC server reflection
//! on every port, and the Prometheus metrics each process serves.

mod common;

use std::collections::BTreeSet;

use common::{Cluster, TestResult, publish_transactional};
use tandem_proto::coordinator as pb;
use tandem_proto::sidecar as sc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_reflection::pb::v1 as r1;
use tonic_reflection::pb::v1alpha as r1a;

/// The services a port lists through reflection v1, and for each the
/// names of the files reflection hands out for it.
async fn listed_v1(url: String) -> TestResult<Vec<(String, Vec<String>)>> {
    use r1::server_reflection_request::MessageRequest;
    use r1::server_reflection_response::MessageResponse;
    let channel = tonic::transport::Channel::from_shared(url)?
        .connect()
        .await?;
    let mut client = r1::server_reflection_client::ServerReflectionClient::new(channel);
    let ask = |m: MessageRequest| r1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([ask(MessageRequest::ListServices(
            String::new(),
        ))]))
        .await?
        .into_inner();
    let Some(answer) = answers.message().await? else {
        return Err("no answer to ListServices".into());
    };
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        return Err(format!("ListServices answered {:?}", answer.message_response).into());
    };
    let mut out = Vec::new();
    for service in list.service {
        let mut answers = client
            .server_reflection_info(tokio_stream::iter([ask(
                MessageRequest::FileContainingSymbol(service.name.clone()),
            )]))
            .await?
            .into_inner();
        let files = match answers.message().await?.and_then(|a| a.message_response) {
            Some(MessageResponse::FileDescriptorResponse(f)) => f
                .file_descriptor_proto
                .iter()
                .map(|bytes| {
                    <prost_types::FileDescriptorProto as prost::Message>::decode(&bytes[..])
                        .map(|f| f.name().to_owned())
                })
                .collect::<Result<Vec<_>, _>>()?,
            other => return Err(format!("{}: answered {other:?}", service.name).into()),
        };
        out.push((service.name, files));
    }
    Ok(out)
}

/// The services a port lists through reflection v1alpha.
async fn listed_v1alpha(url: String) -> TestResult<BTreeSet<String>> {
    use r1a::server_reflection_request::MessageRequest;
    use r1a::server_reflection_response::MessageResponse;
    let channel = tonic::transport::Channel::from_shared(url)?
        .connect()
        .await?;
    let mut client = r1a::server_reflection_client::ServerReflectionClient::new(channel);
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([r1a::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }]))
        .await?
        .into_inner();
    match answers.message().await?.and_then(|a| a.message_response) {
        Some(MessageResponse::ListServicesResponse(list)) => {
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
        other => Err(format!("ListServices answered {other:?}").into()),
    }
}

/// The coordinator's and a sidecar's ports each list exactly the services
/// they serve, with their descriptors, through both reflection versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_every_service_of_every_port() -> TestResult {
    let cluster = Cluster::start().await?;
    let common = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ];
    for (url, own, file) in [
        (
            cluster.coordinator.url(),
            "tandem.coordinator.v1.Coordinator",
            "tandem/coordinator/v1/coordinator.proto",
        ),
        (
            cluster.producer.url(),
            "tandem.sidecar.v1.Sidecar",
            "tandem/sidecar/v1/sidecar.proto",
        ),
    ] {
        let listed = listed_v1(url.clone()).await?;
        let names: BTreeSet<&str> = listed.iter().map(|(n, _)| n.as_str()).collect();
        let expected: BTreeSet<&str> = common.iter().copied().chain([own]).collect();
        assert_eq!(names, expected, "{url}: reflection v1 lists");
        for (name, files) in &listed {
            assert!(!files.is_empty(), "{url}: no descriptor for {name}");
            if name == own {
                assert!(
                    files.iter().any(|f| f == file),
                    "{url}: {name} comes in {files:?}, not {file}"
                );
            }
        }
        let alpha = listed_v1alpha(url.clone()).await?;
        let expected_alpha: BTreeSet<String> = [
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
            own,
        ]
        .into_iter()
        .map(String::from)
        .collect();
        assert_eq!(alpha, expected_alpha, "{url}: reflection v1alpha lists");
    }
    cluster.done()
}

/// The body of `GET url` (`http://HOST:PORT/PATH`), which must answer 200
/// with Prometheus's text format.
async fn scrape(url: &str) -> TestResult<String> {
    let rest = url.strip_prefix("http://").ok_or("not an http:// URL")?;
    let (host, path) = rest.split_once('/').ok_or("no path")?;
    let mut s = tokio::net::TcpStream::connect(host).await?;
    s.write_all(format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    let mut text = String::new();
    tokio::time::timeout(common::PATIENCE, s.read_to_string(&mut text)).await??;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no end of head")?;
    if !head.starts_with("HTTP/1.1 200 ") || !head.contains("text/plain; version=0.0.4") {
        return Err(format!("{url} answered {head}").into());
    }
    Ok(body.to_owned())
}

/// The value of the sample whose name and labels are `series` exactly.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// `promtool check metrics` on `text`, when the test command provides it.
fn promtool_check(what: &str, text: &str) -> TestResult {
    let Some(promtool) = common::promtool() else {
        return Ok(());
    };
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().ok_or("stdin")?;
        stdin.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() || !out.stdout.is_empty() || !out.stderr.is_empty() {
        return Err(format!(
            "promtool check metrics on {what}: {}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(())
}

/// After transactions flowed, the coordinator's and both sidecars'
/// endpoints report them (partition offsets, the consumer group's lag,
/// transactions by outcome, messages handled, the store's sync times), in
/// a format promtool accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_process_serves_metrics_that_count_what_happened() -> TestResult {
    let cluster = Cluster::start().await?;
    cluster.subscribe(sc::DedupMode::Strong).await?;
    let mut producer = cluster.producer_client().await?;
    for i in 0..3 {
        publish_transactional(
            &mut producer,
            &format!("metrics-{i}"),
            &format!("commit-{i}"),
        )
        .await?;
    }
    publish_transactional(&mut producer, "metrics-rollback", "rollback-x").await?;
    cluster
        .expect_effects(&["commit-0", "commit-1", "commit-2"])
        .await?;
    cluster.consumer_caught_up().await?;

    let coordinator = scrape(&cluster.coordinator.metrics_url()?).await?;
    promtool_check("the coordinator", &coordinator)?;
    let appended: f64 = coordinator
        .lines()
        .filter(|l| l.starts_with("tandem_partition_high_water_mark{topic=\"orders\","))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(appended, 3.0, "messages in orders:\n{coordinator}");
    assert_eq!(
        sample(
            &coordinator,
            "tandem_transactions_ended_total{shard=\"0\",outcome=\"committed\"}"
        ),
        Some(3.0),
        "{coordinator}"
    );
    assert_eq!(
        sample(
            &coordinator,
            "tandem_transactions_ended_total{shard=\"0\",outcome=\"rolled_back\"}"
        ),
        Some(1.0),
        "{coordinator}"
    );
    assert_eq!(
        sample(&coordinator, "tandem_open_half_messages{shard=\"0\"}"),
        Some(0.0),
        "{coordinator}"
    );
    let lag: Vec<f64> = coordinator
        .lines()
        .filter(|l| {
            l.starts_with("tandem_consumer_group_lag_messages{group=\"cart\",topic=\"orders\",")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(
        !lag.is_empty() && lag.iter().all(|l| *l == 0.0),
        "the caught-up group's lag: {lag:?}\n{coordinator}"
    );

    assert_eq!(
        sample(
            &coordinator,
            "tandem_consumer_group_members{group=\"cart\",topic=\"orders\"}"
        ),
        Some(1.0),
        "{coordinator}"
    );

    assert_eq!(
        sample(&coordinator, "tandem_sidecar_sessions{service=\"orders\"}"),
        Some(1.0),
        "{coordinator}"
    );
    // Four prepares and three messages, each waiting for its sync, one
    // transaction after the other.
    let syncs = sample(&coordinator, "tandem_log_sync_seconds_count").unwrap_or(0.0);
    assert!(syncs >= 7.0, "{syncs} syncs timed:\n{coordinator}");
    assert_eq!(
        sample(&coordinator, "tandem_log_sync_seconds_bucket{le=\"+Inf\"}"),
        Some(syncs),
        "{coordinator}"
    );

    let consumer = scrape(&cluster.consumer.metrics_url()?).await?;
    promtool_check("the consumer's sidecar", &consumer)?;
    assert_eq!(
        sample(&consumer, "tandem_sidecar_handled_total"),
        Some(3.0),
        "{consumer}"
    );
    assert_eq!(
        sample(&consumer, "tandem_sidecar_sequence_gaps_total"),
        Some(0.0),
        "{consumer}"
    );
    let producer_metrics = scrape(&cluster.producer.metrics_url()?).await?;
    promtool_check("the producer's sidecar", &producer_metrics)?;
    assert_eq!(
        sample(
            &producer_metrics,
            "tandem_sidecar_transactions_total{outcome=\"committed\"}"
        ),
        Some(3.0),
        "{producer_metrics}"
    );
    cluster.done()
}

/// A message the coordinator skips in delivery (a fault point standing in
/// for a bug that loses one) is seen by the consuming sidecar as a hole in
/// the offsets of its holding: counted, in its metrics, and logged with
/// its range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_coordinator_skips_shows_as_a_sequence_gap() -> TestResult {
    let cluster = Cluster::start_with(&["coordinator.deliver.skip=error"], &[]).await?;
    cluster.subscribe(sc::DedupMode::Sidecar).await?;
    // One request, one key: one batch the coordinator reads at once.
    let messages = (0..6)
        .map(|i| pb::Message {
            key: Some(bytes::Bytes::from_static(b"one-key")),
            ..common::message(&format!("gap-{i}"))
        })
        .collect();
    cluster
        .producer_client()
        .await?
        .publish(pb::PublishRequest {
            topic: "orders".into(),
            messages,
        })
        .await?;
    let consumer = cluster.consumer_client().await?;
    let stats = common::eventually("a sequence gap to be counted", || {
        let mut consumer = consumer.clone();
        async move {
            let s = consumer
                .get_stats(sc::GetStatsRequest {})
                .await?
                .into_inner();
            Ok((s.sequence_gaps > 0).then_some(s))
        }
    })
    .await?;
    assert!(
        stats.sequence_gap_messages >= stats.sequence_gaps,
        "{stats:?}"
    );
    let metrics = scrape(&cluster.consumer.metrics_url()?).await?;
    assert!(
        sample(&metrics, "tandem_sidecar_sequence_gaps_total").is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
    let log = std::fs::read_to_string(cluster.path().join("cart-sidecar.log"))?;
    assert!(log.contains("sequence gap"), "{log}");
    cluster.done()
}
