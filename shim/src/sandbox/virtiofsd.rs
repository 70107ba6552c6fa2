//! virtiofsd: the vhost-user-fs backend serving the sandbox share.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use capsule_hypervisor::process::{SpawnOptions, VmProcess};

use crate::config::VirtiofsdSandbox;
use crate::error::{Error, Result};

/// How long virtiofsd may take to create its socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The virtiofsd to start: one capsule can drive (`config::virtiofsd`).
pub fn resolve(bin: &Path) -> Result<PathBuf> {
    crate::config::resolve_virtiofsd(bin).map_err(Error::invalid)
}

pub fn args(socket: &Path, shared: &Path, sandbox: VirtiofsdSandbox) -> Vec<String> {
    vec![
        format!("--socket-path={}", socket.display()),
        format!("--shared-dir={}", shared.display()),
        format!("--sandbox={}", sandbox.as_str()),
        "--cache=auto".into(),
        "--announce-submounts".into(),
    ]
}

fn tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Starts virtiofsd and waits for its socket. Called with the process
/// recorded right after the spawn by `on_spawn`.
pub async fn spawn(
    bin: &Path,
    socket: &Path,
    shared: &Path,
    sandbox: VirtiofsdSandbox,
    log: &Path,
    on_spawn: impl FnOnce(&VmProcess) -> Result<()>,
) -> Result<VmProcess> {
    let bin = resolve(bin)?;
    let _ = std::fs::remove_file(socket);
    let process = VmProcess::spawn(
        &bin,
        &args(socket, shared, sandbox),
        SpawnOptions {
            log: Some(log),
            inherit_fds: Vec::new(),
            die_with_parent: false,
            netns: None,
            keep_capabilities: None,
        },
    )
    .map_err(|e| crate::error::io(format!("starting {}", bin.display()), e))?;
    if let Err(e) = on_spawn(&process) {
        process.kill(Duration::from_secs(3)).await;
        return Err(e);
    }
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if socket.exists() {
            return Ok(process);
        }
        if let Some(info) = process.exit_info() {
            return Err(Error::internal(format!(
                "virtiofsd exited during startup ({info}): {}",
                tail(log)
            )));
        }
        if Instant::now() >= deadline {
            process.kill(Duration::from_secs(3)).await;
            return Err(Error::deadline(format!(
                "virtiofsd did not create {} within {START_TIMEOUT:?}: {}",
                socket.display(),
                tail(log)
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
