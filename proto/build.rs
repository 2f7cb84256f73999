//! Generates the Rust types from `fovea/v1/fovea.proto` with protox (a pure-Rust protobuf
//! compiler), so building fovea — natively or cross — needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=fovea/v1/fovea.proto");
    let descriptors = protox::compile(["fovea/v1/fovea.proto"], ["."])?;
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
