//! Guest agent: arrives with the agent step (issue 4).
fn main() {
    eprintln!("capsule-agent is not implemented yet (issue 4)");
    std::process::exit(1);
}
