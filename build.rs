//! Compiles proto/ with protox (pure Rust), so a build needs cargo alone: no system protoc.
use prost::Message;
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/callout/v1/callout.proto";
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile([proto], ["proto"])?;
    // The encoded set (imports included) feeds server reflection.
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(out.join("callout_descriptor.bin"), fds.encode_to_vec())?;
    // `bytes` fields as `Bytes`: a response body, a stream chunk or a request body is handed
    // on by reference count instead of copied into a Vec.
    // The codec maps a request that does not decode to INVALID_ARGUMENT (tonic-prost's says
    // INTERNAL).
    tonic_prost_build::configure()
        .codec_path("crate::api::codec::ProtoCodec")
        .build_client(true)
        .build_server(true)
        .bytes(".callout.v1")
        // The request's optional sections boxed: most actions set few of them, and tonic's unary
        // and generated service futures hold the request by value while the action is in flight
        // (1,048 bytes inline, 512 with these boxed).
        .boxed(".callout.v1.ExecuteHttpActionRequest.timeouts")
        .boxed(".callout.v1.ExecuteHttpActionRequest.retry")
        .boxed(".callout.v1.ExecuteHttpActionRequest.redirects")
        .boxed(".callout.v1.ExecuteHttpActionRequest.tls")
        .boxed(".callout.v1.ExecuteHttpActionRequest.proxy")
        .boxed(".callout.v1.ExecuteHttpActionRequest.auth")
        .boxed(".callout.v1.ExecuteHttpActionRequest.signing")
        .boxed(".callout.v1.ExecuteHttpActionRequest.async_poll")
        .boxed(".callout.v1.ExecuteHttpActionRequest.paginate")
        .compile_fds(fds)?;
    Ok(())
}
