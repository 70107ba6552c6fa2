#!/bin/sh
# Regenerates runtime.v1.rs from api.proto (needs protoc: apt-get install
# protobuf-compiler). Builds a throwaway crate in a temporary directory.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/src"
cp "$here/api.proto" "$tmp/api.proto"
cat > "$tmp/Cargo.toml" <<'TOML'
[package]
name = "cri-regen"
version = "0.0.0"
edition = "2021"
[build-dependencies]
tonic-prost-build = "0.14"
TOML
cat > "$tmp/build.rs" <<'RS'
fn main() {
    let out = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("gen");
    std::fs::create_dir_all(&out).unwrap();
    tonic_prost_build::configure()
        .build_server(false)
        .out_dir(&out)
        .compile_protos(&["api.proto"], &["."])
        .unwrap();
}
RS
echo 'fn main() {}' > "$tmp/src/main.rs"
(cd "$tmp" && cargo build --quiet)
cp "$tmp/gen/runtime.v1.rs" "$here/runtime.v1.rs"
echo "regenerated $here/runtime.v1.rs"
