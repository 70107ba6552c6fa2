//! Hypervisor faults: QEMU or virtiofsd exiting on their own.
//!
//! During Create every wait (the agent coming up, CreateSandbox) is raced
//! against both exits, so a dead QEMU fails Create at once instead of after
//! the whole `agent_connect` timeout. Once the sandbox runs, [`watch`] turns
//! a virtiofsd exit into a stopped VM: every pending process wait then
//! fails and the tasks are reported exited (255).
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use capsule_hypervisor::process::ExitInfo;
use capsule_hypervisor::QemuVm;
use tokio::sync::watch::Receiver;

use crate::error::Error;

/// Which helper process exited, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Qemu { pid: u32, exit: ExitInfo },
    Virtiofsd { pid: u32, exit: ExitInfo },
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Qemu { pid, exit } => write!(f, "QEMU (pid {pid}) exited ({exit})"),
            Self::Virtiofsd { pid, exit } => write!(f, "virtiofsd (pid {pid}) exited ({exit})"),
        }
    }
}

/// virtiofsd exits (code 0) when QEMU's connection goes, and its exit may
/// be seen first: a virtiofsd exit followed by QEMU's within this time is
/// QEMU's fault.
const FOLLOW_QEMU: Duration = Duration::from_secs(2);

/// The exits to watch: (pid, exit watch) of QEMU and of virtiofsd.
#[derive(Clone)]
pub struct Exits {
    pub qemu: (u32, Receiver<Option<ExitInfo>>),
    pub virtiofsd: (u32, Receiver<Option<ExitInfo>>),
}

/// Resolves with the exit; never, when the watch closes without one (the
/// reaper is gone only when the runtime shuts down).
async fn exited(mut rx: Receiver<Option<ExitInfo>>) -> ExitInfo {
    let got = rx.wait_for(|e| e.is_some()).await.ok().and_then(|v| *v);
    match got {
        Some(info) => info,
        None => std::future::pending().await,
    }
}

impl Exits {
    /// The first exit of QEMU or virtiofsd. QEMU wins a tie, and a QEMU
    /// exit within [`FOLLOW_QEMU`] after virtiofsd's: virtiofsd follows
    /// QEMU when QEMU's connection goes.
    pub async fn first(&self) -> Fault {
        let (qpid, qrx) = self.qemu.clone();
        let (vpid, vrx) = self.virtiofsd.clone();
        let first = tokio::select! {
            biased;
            exit = exited(qrx.clone()) => Fault::Qemu { pid: qpid, exit },
            exit = exited(vrx) => Fault::Virtiofsd { pid: vpid, exit },
        };
        if let Fault::Virtiofsd { .. } = first {
            if let Ok(exit) = tokio::time::timeout(FOLLOW_QEMU, exited(qrx)).await {
                return Fault::Qemu { pid: qpid, exit };
            }
        }
        first
    }

    /// Runs `work`, failing at once when QEMU or virtiofsd exits first. The
    /// error says which process exited, how, and what Create was doing,
    /// with the guest console's last lines.
    pub async fn race<T>(
        &self,
        doing: &str,
        console_log: &Path,
        work: impl std::future::Future<Output = crate::error::Result<T>>,
    ) -> crate::error::Result<T> {
        tokio::select! {
            r = work => r,
            fault = self.first() => {
                tracing::error!(%fault, doing, "sandbox helper exited during Create");
                Err(Error::internal(format!("{fault} while {doing}"))
                    .note(super::console_tail(console_log)))
            }
        }
    }
}

/// Watches a running sandbox. QEMU exiting is logged; virtiofsd exiting
/// (when not stopping) stops QEMU, so the containers are reported exited
/// instead of running on with a dead filesystem.
pub async fn watch(sandbox: String, vm: QemuVm, exits: Exits, stopping: Arc<AtomicBool>) {
    let fault = exits.first().await;
    let stopping_now = stopping.load(Ordering::SeqCst);
    match fault {
        Fault::Qemu { .. } if stopping_now => {
            tracing::info!(sandbox = %sandbox, %fault, "the sandbox VM stopped");
        }
        Fault::Qemu { .. } => {
            tracing::error!(sandbox = %sandbox, %fault, "the sandbox VM exited unexpectedly; its containers are lost");
        }
        Fault::Virtiofsd { .. } if stopping_now => {
            tracing::info!(sandbox = %sandbox, %fault, "virtiofsd stopped");
        }
        Fault::Virtiofsd { pid, exit } => {
            tracing::error!(
                sandbox = %sandbox,
                virtiofsd_pid = pid,
                exit = %exit,
                "virtiofsd exited while the sandbox runs; the shared filesystem is gone: stopping the VM (its containers are reported exited)"
            );
            if let Err(e) = vm.stop().await {
                tracing::error!(sandbox = %sandbox, error = %e, "stopping the VM after virtiofsd exited");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::sync::watch;

    #[tokio::test]
    async fn first_exit_wins_and_race_fails_at_once() {
        let (qtx, qrx) = watch::channel(None);
        let (vtx, vrx) = watch::channel(None);
        let exits = Exits {
            qemu: (10, qrx),
            virtiofsd: (20, vrx),
        };
        let dead = ExitInfo {
            code: None,
            signal: Some(9),
        };
        vtx.send_replace(Some(dead));
        let f = tokio::time::timeout(Duration::from_secs(5), exits.first())
            .await
            .unwrap();
        assert_eq!(
            f,
            Fault::Virtiofsd {
                pid: 20,
                exit: dead
            }
        );
        assert_eq!(f.to_string(), "virtiofsd (pid 20) exited (signal 9)");
        // QEMU's exit seen just after virtiofsd's: QEMU's fault.
        let later = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            qtx.send_replace(Some(dead));
            qtx
        });
        let f = exits.first().await;
        assert_eq!(
            f,
            Fault::Qemu {
                pid: 10,
                exit: dead
            }
        );
        let _qtx = later.await.unwrap();
        let start = std::time::Instant::now();
        let err = exits
            .race(
                "waiting for the guest agent",
                Path::new("/nonexistent/console.log"),
                std::future::pending::<crate::error::Result<()>>(),
            )
            .await
            .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!(
            err.to_string()
                .contains("QEMU (pid 10) exited (signal 9) while waiting for the guest agent"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_closed_watch_never_resolves() {
        let (qtx, qrx) = watch::channel(None);
        let (_vtx, vrx) = watch::channel(None);
        drop(qtx);
        let exits = Exits {
            qemu: (1, qrx),
            virtiofsd: (2, vrx),
        };
        let r = tokio::time::timeout(Duration::from_millis(200), exits.first()).await;
        assert!(r.is_err());
    }
}
