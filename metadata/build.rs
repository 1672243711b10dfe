fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protoc comes from the system (protobuf-compiler); scripts/bootstrap
    // installs it on Debian.
    // `bytes` fields as `Bytes`: values pass from the state machine to the
    // wire, and from the wire into the log, without a copy per request.
    tonic_prost_build::configure()
        .bytes(".")
        .compile_protos(&["proto/metadata.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/metadata.proto");
    Ok(())
}
