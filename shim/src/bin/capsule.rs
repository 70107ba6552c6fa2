//! `capsule`: the admin CLI (check, list, inspect, cleanup). See
//! `capsule_shim::cli`.
fn main() {
    std::process::exit(capsule_shim::cli::main(std::env::args().skip(1).collect()));
}
