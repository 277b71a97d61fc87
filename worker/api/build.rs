//! Generates the gRPC code of `proto/tandem.proto` with a vendored `protoc`,
//! so building Tandem needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build finds the compiler through PROTOC.
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/tandem.proto");
    // KV chunks as `Bytes`: slices of the sender's buffers, no copies.
    tonic_prost_build::configure()
        .bytes(".tandem.v1.KvChunk")
        .compile_protos(&["proto/tandem.proto"], &["proto"])?;
    Ok(())
}
