//! Generates the gRPC code from `tandem/**/*.proto` with protox (pure Rust,
//! no system `protoc`) feeding tonic-prost-build. The sidecar and app APIs
//! use the coordinator's message types, which map onto `crate::coordinator`.
//! It also writes every file's descriptors, imports included, for the
//! servers' gRPC reflection (`tandem.bin` in `OUT_DIR`).

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let coordinator = ["tandem/coordinator/v1/coordinator.proto"];
    let others = [
        "tandem/sidecar/v1/sidecar.proto",
        "tandem/app/v1/app.proto",
        "tandem/examples/v1/shop.proto",
    ];
    for p in coordinator.iter().chain(&others) {
        println!("cargo:rerun-if-changed={p}");
    }
    // Generating the others also writes an (empty) coordinator module, so
    // the coordinator's own code is generated last.
    tonic_prost_build::configure()
        .bytes(".")
        .extern_path(".tandem.coordinator.v1", "crate::coordinator")
        .compile_fds(protox::compile(others, ["."])?)?;
    tonic_prost_build::configure()
        .bytes(".")
        .compile_fds(protox::compile(coordinator, ["."])?)?;
    let all = protox::compile(coordinator.iter().chain(&others), ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("tandem.bin");
    std::fs::write(out, all.encode_to_vec())?;
    Ok(())
}
