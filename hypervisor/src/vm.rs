//! A running QEMU VM: lifecycle, QMP session, hotplug and unplug.
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{watch, Mutex};

use capsule_device_api::GuestAddress;
use capsule_device_api::{
    AttachRequest, BackendError, BackendErrorKind, DeviceBackend, UnplugOutcome,
};

use crate::description::VmDescription;
use crate::devices::VmDevices;
use crate::error::HypervisorError;
use crate::hotplug::exec::{self, ExecContext};
use crate::hotplug::{self, unplug, DevicePlan};
use crate::layout::VmLayout;
use crate::process::{ExitInfo, VmProcess};
use crate::qmp::{QmpClient, QmpOptions};
use crate::tap_fds::TapFds;

/// A QEMU VM. Cheap to clone. Dropping it leaves the VM running (a later
/// process may re-attach from its [`VmDescription`]); [`QemuVm::stop`] ends it.
#[derive(Clone)]
pub struct QemuVm {
    inner: Arc<Inner>,
}

struct Inner {
    desc: VmDescription,
    process: VmProcess,
    qmp: Mutex<Option<QmpClient>>,
    qmp_opts: QmpOptions,
    /// Serialises mutating QMP sequences.
    serial: Mutex<()>,
    /// Tap queues handed over for network endpoints.
    taps: Arc<TapFds>,
}

impl std::fmt::Debug for QemuVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuVm")
            .field("pid", &self.pid())
            .field("run_dir", &self.inner.desc.run_dir)
            .finish()
    }
}

fn qmp_options(desc: &VmDescription) -> QmpOptions {
    QmpOptions {
        command_timeout: desc.timeouts.qmp_command(),
        handshake_timeout: desc.timeouts.qmp_command().min(Duration::from_secs(5)),
    }
}

impl QemuVm {
    pub(crate) fn from_parts(
        desc: VmDescription,
        process: VmProcess,
        qmp: QmpClient,
        taps: Arc<TapFds>,
    ) -> Self {
        let qmp_opts = qmp_options(&desc);
        Self {
            inner: Arc::new(Inner {
                desc,
                process,
                qmp: Mutex::new(Some(qmp)),
                qmp_opts,
                serial: Mutex::new(()),
                taps,
            }),
        }
    }

    /// Re-attaches to a VM another process started, from its persisted
    /// description. The pid must still belong to the same process (start
    /// time check); otherwise nothing is touched.
    pub async fn attach(desc: VmDescription) -> Result<Self, HypervisorError> {
        let process = VmProcess::adopt(desc.pid, desc.start_time)?;
        let qmp_opts = qmp_options(&desc);
        let qmp = QmpClient::connect(&desc.qmp_socket, qmp_opts).await?;
        let status = qmp.query_status().await?;
        tracing::info!(pid = desc.pid, status = %status.status, run_dir = %desc.run_dir.display(), "attached to a running VM");
        Ok(Self::from_parts(desc, process, qmp, Arc::default()))
    }

    /// [`attach`](Self::attach) from a description file.
    pub async fn attach_file(path: &Path) -> Result<Self, HypervisorError> {
        let desc = VmDescription::load(path)?;
        Self::attach(desc).await
    }

    pub fn description(&self) -> &VmDescription {
        &self.inner.desc
    }

    pub fn layout(&self) -> VmLayout {
        self.inner.desc.layout()
    }

    pub fn pid(&self) -> u32 {
        self.inner.process.pid()
    }

    /// Where network endpoints' tap queues are handed over before their
    /// hotplug.
    pub fn taps(&self) -> Arc<TapFds> {
        self.inner.taps.clone()
    }

    /// Turns `Some` when QEMU is gone.
    pub fn exit_watch(&self) -> watch::Receiver<Option<ExitInfo>> {
        self.inner.process.exit_watch()
    }

    pub fn process(&self) -> &VmProcess {
        &self.inner.process
    }

    /// The QMP session, reconnecting when the previous one dropped while
    /// QEMU still runs.
    pub async fn qmp(&self) -> Result<QmpClient, HypervisorError> {
        let mut slot = self.inner.qmp.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| c.is_connected()) {
            return Ok(c.clone());
        }
        if let Some(info) = self.inner.process.exit_info() {
            return Err(HypervisorError::Exited {
                pid: self.pid(),
                how: info.to_string(),
            });
        }
        tracing::info!(pid = self.pid(), "(re)connecting to QMP");
        let c = QmpClient::connect(&self.inner.desc.qmp_socket, self.inner.qmp_opts).await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Closes this process's QMP session (QEMU serves one at a time), e.g.
    /// to let another process attach. The next call reconnects.
    pub async fn disconnect(&self) {
        if let Some(c) = self.inner.qmp.lock().await.take() {
            c.close();
        }
    }

    /// Reads the real device list from QEMU.
    pub async fn devices(&self) -> Result<VmDevices, HypervisorError> {
        let qmp = self.qmp().await?;
        Ok(VmDevices::query(&qmp).await?)
    }

    /// `quit`, then SIGTERM, then SIGKILL (each with its timeout); removes
    /// the sockets, pidfile and description once QEMU is gone.
    pub async fn stop(&self) -> Result<(), HypervisorError> {
        let t = self.inner.desc.timeouts;
        let p = &self.inner.process;
        if !p.has_exited() {
            let qmp = self
                .inner
                .qmp
                .lock()
                .await
                .take()
                .filter(|c| c.is_connected());
            let qmp = match qmp {
                Some(c) => Some(c),
                None => QmpClient::connect(&self.inner.desc.qmp_socket, self.inner.qmp_opts)
                    .await
                    .ok(),
            };
            if let Some(qmp) = qmp {
                match qmp
                    .execute_with_timeout("quit", None, Duration::from_millis(t.stop_quit_ms))
                    .await
                {
                    Ok(_) => {}
                    Err(e) if e.is_disconnected() => {}
                    Err(e) => tracing::warn!(pid = p.pid(), error = %e, "QMP quit failed"),
                }
            }
            if p.wait_exit(Duration::from_millis(t.stop_quit_ms))
                .await
                .is_none()
                && !p
                    .terminate(
                        Duration::from_millis(t.stop_term_ms),
                        Duration::from_millis(t.stop_kill_ms),
                    )
                    .await
            {
                return Err(HypervisorError::Stop {
                    pid: p.pid(),
                    reason: "still running after SIGKILL".into(),
                });
            }
        }
        tracing::info!(pid = p.pid(), exit = ?p.exit_info(), "VM stopped");
        let d = &self.inner.desc;
        for f in [&d.qmp_socket, &d.agent_socket, &d.pidfile] {
            match std::fs::remove_file(f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(path = %f.display(), error = %e, "cleanup after stop"),
            }
        }
        Ok(())
    }

    fn exec_ctx<'a>(&'a self, qmp: &'a QmpClient) -> ExecContext<'a> {
        ExecContext {
            qmp,
            taps: &self.inner.taps,
            serial: &self.inner.serial,
            unplug_timeout: self.inner.desc.timeouts.unplug(),
            vhost_probe_timeout: self.inner.desc.timeouts.vhost_probe(),
        }
    }

    async fn qmp_for(&self, id: &str) -> Result<QmpClient, BackendError> {
        self.qmp()
            .await
            .map_err(|e| BackendError::new(BackendErrorKind::Failed, format!("device {id}: {e}")))
    }

    fn plan(&self, req: &AttachRequest) -> Result<DevicePlan, BackendError> {
        hotplug::plan(req, &self.layout())
    }
}

#[async_trait]
impl DeviceBackend for QemuVm {
    async fn hotplug(&self, req: &AttachRequest) -> Result<GuestAddress, BackendError> {
        tracing::info!(device = %req.id, kind = req.kind.name(), host_path = %req.host_path.display(), "hotplug");
        // Refusals that need no QEMU come first.
        let plan = self.plan(req)?;
        if plan.steps.is_empty() {
            return Ok(GuestAddress::None);
        }
        let qmp = self.qmp_for(&req.id).await?;
        exec::hotplug(&self.exec_ctx(&qmp), &plan).await
    }

    async fn unplug(&self, req: &AttachRequest) -> Result<UnplugOutcome, BackendError> {
        tracing::info!(device = %req.id, kind = req.kind.name(), "unplug");
        let plan = hotplug::removal_plan(req, &self.layout())?;
        if plan.unplug_unsupported.is_none() && plan.steps.is_empty() {
            return Ok(UnplugOutcome::Removed);
        }
        if let Some(why) = plan.unplug_unsupported {
            return Err(BackendError::new(
                BackendErrorKind::Unsupported,
                format!("device {}: {why}", req.id),
            ));
        }
        let qmp = self.qmp_for(&req.id).await?;
        unplug::unplug(&self.exec_ctx(&qmp), &plan).await
    }

    async fn coldplug(&self, req: &AttachRequest) -> Result<GuestAddress, BackendError> {
        Err(BackendError::new(
            BackendErrorKind::Unsupported,
            format!("device {}: the VM is already running; cold-plug happens before start (use hotplug)", req.id),
        ))
    }
}
