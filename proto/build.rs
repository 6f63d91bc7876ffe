//! Generates the gRPC code from `tandem/**/*.proto` with protox (pure Rust,
//! no system `protoc`) feeding tonic-prost-build. The sidecar and app APIs
//! use the coordinator's message types, which map onto `crate::coordinator`.

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
    Ok(())
}
