//! `containerd-shim-capsule-v2`: arrives with the shim step (issue 5).
fn main() {
    eprintln!("containerd-shim-capsule-v2 is not implemented yet (issue 5)");
    std::process::exit(1);
}
