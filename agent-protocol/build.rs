//! Generates the agent service with ttrpc-codegen (pure Rust, no protoc).
//! protobuf and ttrpc are pinned in the workspace to the versions
//! containerd-shim-protos 0.12 uses, so there is one copy of each.
fn main() {
    println!("cargo:rerun-if-changed=protos/agent.proto");
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "rpc")]
    generate();
}

#[cfg(feature = "rpc")]
fn generate() {
    use std::{env, fs, path::PathBuf};
    use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    Codegen::new()
        .inputs(["protos/agent.proto"])
        .include("protos")
        .rust_protobuf()
        .rust_protobuf_customize(ProtobufCustomize::default().generate_accessors(true))
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .out_dir(&out)
        .run()
        .expect("ttrpc-codegen failed on protos/agent.proto");

    for name in ["agent.rs", "agent_ttrpc.rs"] {
        let path = out.join(name);
        let text = fs::read_to_string(&path).expect("generated file is readable");
        // `include!` rejects inner attributes and inner doc comments.
        let text: String = text
            .lines()
            .filter(|l| !l.starts_with("#!") && !l.starts_with("//!"))
            .collect::<Vec<_>>()
            .join("\n");
        fs::write(&path, text).expect("generated file is writable");
    }
}
