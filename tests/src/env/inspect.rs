//! What an [`Env`] shows and leaves behind: containerd's log errors, the
//! sandboxes' state records, and the leftovers a test must not leave.
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::Env;
use crate::{containerd, dead_shim_sockets, mounts_under, processes, wait_for};

impl Env {
    /// Accepts containerd log errors containing `needle` (a test provokes
    /// them on purpose).
    pub fn allow_log_error(&mut self, needle: &str) {
        self.allowed_log_errors.push(needle.to_string());
    }

    /// containerd log lines at `level=error` about capsule or its shim that
    /// no [`allow_log_error`](Self::allow_log_error) accepts.
    pub fn log_errors(&self) -> Vec<String> {
        let log =
            std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default();
        containerd::error_lines(&log, &self.allowed_log_errors)
    }

    pub(super) fn log_errors_message(&self, errors: &[String]) -> String {
        format!(
            "containerd {} ({}) logged {} error line(s) about capsule:\n{}",
            self.daemon.version.as_str(),
            self.dir.path().join("containerd.log").display(),
            errors.len(),
            errors.join("\n")
        )
    }

    /// Fails when containerd logged errors about capsule (see
    /// [`log_errors`](Self::log_errors)).
    pub fn assert_no_log_errors(&self) -> Result<()> {
        let errors = self.log_errors();
        if errors.is_empty() {
            return Ok(());
        }
        self.log_errors_reported.set(true);
        bail!("{}", self.log_errors_message(&errors))
    }

    pub fn containerd_log_tail(&self) -> String {
        let s = std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = s.lines().rev().take(40).collect();
        format!(
            "containerd log (last lines):\n{}",
            lines.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("sandboxes").join(id)
    }

    /// Sandboxes with a state directory.
    pub fn sandboxes(&self) -> Vec<String> {
        crate::host::sandbox_ids(&self.state_dir)
    }

    /// QEMU/virtiofsd/shim processes of this environment, mounts under its
    /// directory, sandbox state: everything a test must not leave behind.
    pub fn leftovers(&self) -> Vec<String> {
        let mut out = Vec::new();
        let needle = self.dir.path().display().to_string();
        for (pid, args) in processes() {
            let a0 = args.first().map(|a| a.as_str()).unwrap_or_default();
            let base = Path::new(a0)
                .file_name()
                .map(|b| b.to_string_lossy().into_owned())
                .unwrap_or_default();
            let interesting = base.starts_with("qemu-system") || base.contains("virtiofsd");
            if interesting && args.iter().any(|a| a.contains(&needle)) {
                out.push(format!("process {pid}: {}", args.join(" ")));
            }
        }
        for m in mounts_under(self.dir.path()) {
            out.push(format!("mount {}", m.display()));
        }
        for s in self.sandboxes() {
            out.push(format!("sandbox state {}", self.sandbox_dir(&s).display()));
        }
        for s in dead_shim_sockets() {
            if !self.sockets_before.contains(&s) {
                out.push(format!("dead shim socket {}", s.display()));
            }
        }
        out
    }

    /// Waits until [`leftovers`](Self::leftovers) is empty.
    pub fn assert_clean(&self, timeout: Duration) -> Result<()> {
        let mut last = Vec::new();
        let r = wait_for("no leftovers", timeout, || {
            last = self.leftovers();
            last.is_empty().then_some(())
        });
        r.with_context(|| format!("leftovers: {last:#?}\n{}", self.containerd_log_tail()))?;
        self.assert_no_log_errors()
    }

    /// The shim serving sandbox `id` (from its sandbox.json).
    pub fn shim_pid(&self, sandbox: &str) -> Option<u32> {
        let v = self.sandbox_record(sandbox)?;
        v["shim"]["pid"].as_u64().map(|p| p as u32)
    }

    /// The sandbox's `sandbox.json` (processes, VM description, containers).
    pub fn sandbox_record(&self, sandbox: &str) -> Option<serde_json::Value> {
        let b = std::fs::read(self.sandbox_dir(sandbox).join("sandbox.json")).ok()?;
        serde_json::from_slice(&b).ok()
    }

    pub fn devices_record(&self, sandbox: &str) -> Option<serde_json::Value> {
        let b = std::fs::read(self.sandbox_dir(sandbox).join("devices.json")).ok()?;
        serde_json::from_slice(&b).ok()
    }
}
