//! Tandem's gRPC APIs (coordinator, sidecar, app callbacks) and the code
//! generated from them at build time. The `.proto` files are the contract;
//! this crate only compiles them.

/// The coordinator API, v1.
pub mod coordinator {
    #![allow(missing_docs, unreachable_pub, clippy::all)]
    tonic::include_proto!("tandem.coordinator.v1");
}

/// The sidecar API (called by applications), v1.
pub mod sidecar {
    #![allow(missing_docs, unreachable_pub, clippy::all)]
    tonic::include_proto!("tandem.sidecar.v1");
}

/// The app callback API (implemented by applications), v1.
pub mod app {
    #![allow(missing_docs, unreachable_pub, clippy::all)]
    tonic::include_proto!("tandem.app.v1");
}

/// The example order and cart services of `tandem demo`, v1.
pub mod examples {
    #![allow(missing_docs, unreachable_pub, clippy::all)]
    tonic::include_proto!("tandem.examples.v1");
}

/// Every `.proto` file of these APIs as an encoded `FileDescriptorSet`,
/// imports included: what gRPC reflection serves.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tandem.bin"));

/// `router` with gRPC server reflection added for a port serving
/// `services` (their full names, e.g. `tandem.sidecar.v1.Sidecar`), the
/// standard health service and reflection itself, so that `grpcurl` and
/// `buf curl` list and call them without the `.proto` files. Both versions
/// of the reflection API: v1, and v1alpha for the tools that still ask it.
pub fn with_reflection<L>(
    router: tonic::transport::server::Router<L>,
    services: &[&str],
) -> Result<tonic::transport::server::Router<L>, tonic_reflection::server::Error> {
    use tonic_reflection::server::Builder;
    let builder = || {
        let mut b = Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health");
        for s in services {
            b = b.with_service_name(*s);
        }
        b
    };
    Ok(router
        .add_service(
            builder()
                .with_service_name("grpc.reflection.v1.ServerReflection")
                .build_v1()?,
        )
        .add_service(
            builder()
                .with_service_name("grpc.reflection.v1alpha.ServerReflection")
                .build_v1alpha()?,
        ))
}
