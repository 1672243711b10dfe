fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protoc comes from the system (protobuf-compiler), as for the metadata
    // and bookie services. Batches are `Bytes`: a received batch goes to the
    // log without a copy.
    tonic_prost_build::configure()
        .bytes(".")
        .compile_protos(&["proto/geo.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/geo.proto");
    Ok(())
}
