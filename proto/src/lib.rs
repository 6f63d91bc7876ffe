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
