//! What an operator's tools see of real processes: gRPC server reflection
//! on every port.

mod common;

use std::collections::BTreeSet;

use common::{Cluster, TestResult};
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
