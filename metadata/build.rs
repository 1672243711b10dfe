fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protoc comes from the system (protobuf-compiler); scripts/bootstrap
    // installs it on Debian.
    tonic_prost_build::configure().compile_protos(&["proto/metadata.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/metadata.proto");
    Ok(())
}
