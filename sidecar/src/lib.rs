//! The Tandem sidecar, deployed next to every service: the app-facing API,
//! local-transaction callbacks, and the dedup and barrier tables.
