//! Tandem's gRPC APIs (coordinator, sidecar, app callbacks) and the code
//! generated from them at build time.
