fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protoc comes from the system (protobuf-compiler); scripts/bootstrap
    // installs it on Debian. Payloads are `Bytes` so that an entry travels
    // from the socket to the journal and the write cache without copies.
    tonic_prost_build::configure()
        .bytes(".")
        .compile_protos(&["proto/bookie.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/bookie.proto");
    Ok(())
}
