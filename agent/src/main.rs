//! capsule-agent: `/init` of the guest image. The hidden subcommands are the
//! agent re-executing itself as a container process (see
//! `capsule_agent::container::child`) or as a pod's pause process (see
//! `capsule_agent::pod`).
fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("init-container") => capsule_agent::container::child::init_container_main(),
        Some("exec-enter") => capsule_agent::container::child::exec_enter_main(),
        Some(capsule_agent::pod::SUBCOMMAND) => capsule_agent::pod::pause_main(),
        _ => capsule_agent::run_agent(),
    }
}
