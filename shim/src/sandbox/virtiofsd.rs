//! virtiofsd: the vhost-user-fs backend serving the sandbox share.
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::Duration;

use capsule_hypervisor::process::{SpawnOptions, VmProcess};

use crate::config::{Virtiofsd, VirtiofsdSandbox};
use crate::error::{Error, Result};

/// How long the guest may cache a failed lookup, when virtiofsd can say so
/// (`config::NEGATIVE_TIMEOUT_FLAG`): `--cache=auto`'s timeout for entries
/// that exist, so a name the host creates or removes is seen within the same
/// second either way.
pub const NEGATIVE_TIMEOUT_SECS: u64 = 1;

/// The virtiofsd to start: one capsule can drive (`config::virtiofsd`).
pub fn resolve(bin: &Path) -> Result<Virtiofsd> {
    crate::config::resolve_virtiofsd(bin).map_err(Error::invalid)
}

/// virtiofsd's command line; `listener` is the listening socket it
/// inherits.
pub fn args(
    listener: RawFd,
    shared: &Path,
    sandbox: VirtiofsdSandbox,
    virtiofsd: &Virtiofsd,
) -> Vec<String> {
    let mut v = vec![
        format!("--fd={listener}"),
        format!("--shared-dir={}", shared.display()),
        format!("--sandbox={}", sandbox.as_str()),
        "--cache=auto".into(),
        "--announce-submounts".into(),
    ];
    if virtiofsd.negative_timeout {
        v.push(format!(
            "{}={NEGATIVE_TIMEOUT_SECS}",
            crate::config::NEGATIVE_TIMEOUT_FLAG
        ));
    }
    v
}

/// The last lines of virtiofsd's log.
pub fn tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Starts virtiofsd on `socket`, which the shim binds and listens on itself
/// and hands over as a descriptor (`--fd`, as Kata does): the socket accepts
/// from the moment this returns, so the connection that vets the backend
/// next can never find it bound but not yet listening (ECONNREFUSED, seen
/// with eight sandboxes starting at once). Called with the process recorded
/// right after the spawn by `on_spawn`. If virtiofsd then dies before it
/// answers, the vetting fails and [`exit_note`] says why.
pub async fn spawn(
    bin: &Path,
    socket: &Path,
    shared: &Path,
    sandbox: VirtiofsdSandbox,
    log: &Path,
    on_spawn: impl FnOnce(&VmProcess) -> Result<()>,
) -> Result<VmProcess> {
    let virtiofsd = resolve(bin)?;
    let bin = &virtiofsd.path;
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).map_err(|e| {
        crate::error::io(
            format!("listening on virtiofsd's socket {}", socket.display()),
            e,
        )
    })?;
    let fd = listener.as_raw_fd();
    let process = VmProcess::spawn(
        bin,
        &args(fd, shared, sandbox, &virtiofsd),
        SpawnOptions {
            log: Some(log),
            inherit_fds: vec![fd],
            die_with_parent: false,
            netns: None,
            keep_capabilities: None,
        },
    )
    .map_err(|e| crate::error::io(format!("starting {}", bin.display()), e))?;
    // virtiofsd has its own copy; ours closes here.
    drop(listener);
    if let Err(e) = on_spawn(&process) {
        process.kill(Duration::from_secs(3)).await;
        return Err(e);
    }
    Ok(process)
}

/// Why virtiofsd is gone, with its last log lines, if it has exited.
pub fn exit_note(process: &VmProcess, log: &Path) -> Option<String> {
    process
        .exit_info()
        .map(|info| format!("virtiofsd exited during startup ({info}): {}", tail(log)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn virtiofsd(negative_timeout: bool) -> Virtiofsd {
        Virtiofsd {
            path: "/usr/local/libexec/capsule/virtiofsd".into(),
            version: "virtiofsd 1.14.0".into(),
            negative_timeout,
        }
    }

    #[test]
    fn failed_lookups_are_cached_only_by_a_virtiofsd_that_offers_it() {
        let shared = Path::new("/run/capsule/s1/shared");
        let sandbox = VirtiofsdSandbox::Namespace;
        let capsules = args(7, shared, sandbox, &virtiofsd(true));
        assert!(
            capsules.contains(&format!("--negative-timeout={NEGATIVE_TIMEOUT_SECS}")),
            "{capsules:?}"
        );
        assert!(capsules.contains(&"--cache=auto".to_string()));
        let stock = args(7, shared, sandbox, &virtiofsd(false));
        assert!(
            !stock.iter().any(|a| a.starts_with("--negative-timeout")),
            "stock virtiofsd would refuse the flag: {stock:?}"
        );
        assert_eq!(&capsules[..stock.len()], &stock[..]);
    }
}
