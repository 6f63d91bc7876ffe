//! Generates the gRPC code from `tandem/**/*.proto` with protox (pure Rust,
//! no system `protoc`) feeding tonic-prost-build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["tandem/coordinator/v1/coordinator.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["."])?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
