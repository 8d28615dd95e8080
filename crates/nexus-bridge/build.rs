//! With the `grpc` feature: the gateway's gRPC client, generated from
//! `proto/` at build time with protox (no system `protoc` needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    #[cfg(feature = "grpc")]
    {
        let proto_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
        let file = proto_dir.join("nexus/v1/nexus.proto");
        println!("cargo:rerun-if-changed={}", file.display());
        let fds = protox::compile([&file], [&proto_dir])?;
        tonic_prost_build::configure()
            .build_client(true)
            .build_server(false)
            .compile_fds(fds)?;
    }
    Ok(())
}
