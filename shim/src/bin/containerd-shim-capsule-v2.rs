//! `containerd-shim-capsule-v2`: the containerd runtime v2 shim of capsule
//! (runtime `io.containerd.capsule.v2`). See `capsule_shim::bootstrap`.
fn main() {
    std::process::exit(capsule_shim::bootstrap::main(std::env::args_os().collect()));
}
