//! `capsule`: arrives with the shim step (issue 5).
fn main() {
    eprintln!("capsule is not implemented yet (issue 5)");
    std::process::exit(1);
}
