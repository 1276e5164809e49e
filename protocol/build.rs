//! Generates the Rust types of `proto/ferry.proto` (the client protocol) and
//! `proto/bus.proto` (the cluster bus) with `protox` (a pure-Rust Protobuf
//! compiler), so the build needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/ferry.proto");
    println!("cargo:rerun-if-changed=proto/bus.proto");
    let descriptors = protox::compile(["proto/ferry.proto", "proto/bus.proto"], ["proto"])?;
    prost_build::Config::new()
        // `bytes` fields become `bytes::Bytes`: decoding slices the frame
        // buffer instead of copying message bodies.
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
