//! The suite's frame: a case is a function over a [`Ctx`] that knows the
//! runtime handler under test and tracks what the case made (pods, loop
//! devices, host mounts) so that it is removed after the case whatever
//! happened; after every case the node must be clean.
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::client::CallResult;
use super::containerd::{CAPSULE_HANDLER, RUNC_HANDLER};
use super::node::Node;
use super::proto::v1::*;
use super::spec;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// The control.
    Runc,
    Capsule,
}

impl Runtime {
    pub fn handler(self) -> &'static str {
        match self {
            Runtime::Runc => RUNC_HANDLER,
            Runtime::Capsule => CAPSULE_HANDLER,
        }
    }
}

/// One case of the suite.
pub struct Case {
    pub name: &'static str,
    /// Runs only on containerd 2.x (CDI, PodSandboxStats).
    pub needs_2x: bool,
    /// A VM-inherent difference: capsule must refuse, fast and naming the
    /// reason (the case asserts that on capsule).
    pub expected_difference: Option<&'static str>,
    pub run: fn(&mut Ctx) -> Result<()>,
}

pub struct Ctx<'a> {
    pub node: &'a Node,
    pub runtime: Runtime,
    pub case: &'static str,
    pods: Vec<String>,
    loops: Vec<String>,
    cleanups: Vec<Box<dyn FnOnce()>>,
    notes: Vec<String>,
    seq: u32,
}

/// Deadline for a container to reach a state.
pub const STATE_TIMEOUT: Duration = Duration::from_secs(60);

impl<'a> Ctx<'a> {
    pub fn new(node: &'a Node, runtime: Runtime, case: &'static str) -> Self {
        Self {
            node,
            runtime,
            case,
            pods: Vec::new(),
            loops: Vec::new(),
            cleanups: Vec::new(),
            notes: Vec::new(),
            seq: 0,
        }
    }

    pub fn is_capsule(&self) -> bool {
        self.runtime == Runtime::Capsule
    }

    pub fn handler(&self) -> &'static str {
        self.runtime.handler()
    }

    /// A line for the report.
    pub fn note(&mut self, s: impl Into<String>) {
        self.notes.push(s.into());
    }

    /// A pod configuration with a fresh name, uid and log directory.
    pub fn pod_config(&mut self, name: &str) -> Result<PodSandboxConfig> {
        self.seq += 1;
        let full = format!("{}-{name}-{}", self.case.replace('_', "-"), self.seq);
        let uid = format!(
            "{}-{}-{}-{}",
            self.handler(),
            std::process::id(),
            self.case,
            self.seq
        );
        let logs = self.node.log_dir.join(&uid);
        std::fs::create_dir_all(&logs)?;
        Ok(spec::pod(
            &full,
            &uid,
            &logs.display().to_string(),
            &self.node.cgroup_parent,
        ))
    }

    /// RunPodSandbox with this runtime's handler; the pod is removed after
    /// the case.
    pub fn try_run_pod(&mut self, cfg: &PodSandboxConfig) -> CallResult<String> {
        let id = self.node.cri.run_pod_sandbox(cfg.clone(), self.handler())?;
        self.pods.push(id.clone());
        Ok(id)
    }

    pub fn run_pod(&mut self, cfg: &PodSandboxConfig) -> Result<String> {
        Ok(self.try_run_pod(cfg)?)
    }

    /// A pod with the default configuration.
    pub fn pod(&mut self, name: &str) -> Result<(String, PodSandboxConfig)> {
        let cfg = self.pod_config(name)?;
        let id = self.run_pod(&cfg)?;
        Ok((id, cfg))
    }

    pub fn try_create(
        &self,
        pod: &str,
        c: &ContainerConfig,
        p: &PodSandboxConfig,
    ) -> CallResult<String> {
        self.node.cri.create_container(pod, c.clone(), p.clone())
    }

    /// CreateContainer + StartContainer (the runtime sees the container
    /// only at StartContainer: CRI creates the task there).
    pub fn try_start(
        &self,
        pod: &str,
        c: &ContainerConfig,
        p: &PodSandboxConfig,
    ) -> CallResult<String> {
        let id = self.try_create(pod, c, p)?;
        self.node.cri.start_container(&id)?;
        Ok(id)
    }

    /// CreateContainer + StartContainer; the container is running.
    pub fn start(&self, pod: &str, c: &ContainerConfig, p: &PodSandboxConfig) -> Result<String> {
        Ok(self.try_start(pod, c, p)?)
    }

    pub fn status(&self, id: &str) -> Result<ContainerStatus> {
        self.node
            .cri
            .container_status(id)?
            .status
            .ok_or_else(|| anyhow!("ContainerStatus of {id}: no status"))
    }

    /// Waits for the container to exit; its final status.
    pub fn wait_exited(&self, id: &str, timeout: Duration) -> Result<ContainerStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status(id)?;
            if s.state == ContainerState::ContainerExited as i32 {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                bail!(
                    "container {id} did not exit within {timeout:?} (state {:?})",
                    ContainerState::try_from(s.state)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `sh -c SCRIPT` through ExecSync (60 s).
    pub fn sh(&self, id: &str, script: &str) -> Result<ExecSyncResponse> {
        Ok(self.node.cri.exec_sync(id, &["sh", "-c", script], 60)?)
    }

    /// `sh -c SCRIPT` that must exit 0; its stdout.
    pub fn sh_ok(&self, id: &str, script: &str) -> Result<String> {
        let r = self.sh(id, script)?;
        if r.exit_code != 0 {
            bail!(
                "`{script}` in {id} exited {}: stdout {:?} stderr {:?}",
                r.exit_code,
                String::from_utf8_lossy(&r.stdout),
                String::from_utf8_lossy(&r.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&r.stdout).into_owned())
    }

    /// StopPodSandbox + RemovePodSandbox (no longer removed after the
    /// case).
    pub fn remove_pod(&mut self, id: &str) -> Result<()> {
        self.pods.retain(|p| p != id);
        self.node.cri.stop_pod_sandbox(id)?;
        self.node.cri.remove_pod_sandbox(id)?;
        Ok(())
    }

    /// A loop device over a new file of `size` bytes; detached after the
    /// case.
    pub fn loop_device(&mut self, size: u64) -> Result<(String, PathBuf)> {
        self.seq += 1;
        let dir = self.node.dir.path().join("loops");
        std::fs::create_dir_all(&dir)?;
        let file = dir.join(format!("{}-{}-{}.img", self.handler(), self.case, self.seq));
        std::fs::File::create(&file)?.set_len(size)?;
        let o = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&file)
            .output()
            .context("running losetup")?;
        if !o.status.success() {
            bail!(
                "losetup {}: {}",
                file.display(),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let dev = String::from_utf8_lossy(&o.stdout).trim().to_string();
        self.loops.push(dev.clone());
        Ok((dev, file))
    }

    /// Runs `f` after the case (after its pods are removed).
    pub fn defer(&mut self, f: impl FnOnce() + 'static) {
        self.cleanups.push(Box::new(f));
    }

    /// A directory for the case's own files.
    pub fn scratch(&mut self, name: &str) -> Result<PathBuf> {
        self.seq += 1;
        let d = self.node.dir.path().join("scratch").join(format!(
            "{}-{}-{name}-{}",
            self.handler(),
            self.case,
            self.seq
        ));
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }

    /// Removes what the case made; errors of the CRI calls.
    fn teardown(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        for id in std::mem::take(&mut self.pods) {
            if let Err(e) = self.node.cri.stop_pod_sandbox(&id) {
                errors.push(format!("teardown of pod {id}: {e}"));
            }
            if let Err(e) = self.node.cri.remove_pod_sandbox(&id) {
                errors.push(format!("teardown of pod {id}: {e}"));
            }
        }
        for f in std::mem::take(&mut self.cleanups).into_iter().rev() {
            f();
        }
        for l in std::mem::take(&mut self.loops) {
            let _ = Command::new("losetup").args(["-d", &l]).status();
        }
        errors
    }
}

#[derive(Debug, Clone)]
pub enum Status {
    Pass,
    Fail(String),
    NotApplicable(String),
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub case: &'static str,
    pub runtime: Runtime,
    pub status: Status,
    pub notes: Vec<String>,
    pub elapsed: Duration,
    pub expected_difference: Option<&'static str>,
}

/// How long the node may take to be clean after a case.
pub const CLEAN_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs one case on one runtime, then checks the node is clean (and cleans
/// it by force when it is not, so the next case starts clean).
pub fn run_case(node: &Node, case: &Case, runtime: Runtime) -> Outcome {
    let start = Instant::now();
    let mut out = Outcome {
        case: case.name,
        runtime,
        status: Status::Pass,
        notes: Vec::new(),
        elapsed: Duration::ZERO,
        expected_difference: case.expected_difference,
    };
    if case.needs_2x && !node.opts.containerd.version.is_2x() {
        out.status = Status::NotApplicable(format!(
            "needs containerd 2.x (running {})",
            node.opts.containerd.version.as_str()
        ));
        return out;
    }
    let mut ctx = Ctx::new(node, runtime, case.name);
    let r = std::panic::catch_unwind(AssertUnwindSafe(|| (case.run)(&mut ctx)));
    let mut errors = Vec::new();
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => errors.push(format!("{e:#}")),
        Err(p) => errors.push(format!(
            "panicked: {}",
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        )),
    }
    errors.extend(ctx.teardown());
    if let Err(left) = node.wait_clean(CLEAN_TIMEOUT) {
        errors.push(format!("leftovers after the case: {}", left.join("; ")));
        node.force_clean();
        if let Err(left) = node.wait_clean(Duration::from_secs(30)) {
            errors.push(format!(
                "still left after forced cleanup: {}",
                left.join("; ")
            ));
        }
    }
    out.notes = ctx.notes;
    out.elapsed = start.elapsed();
    if !errors.is_empty() {
        out.status = Status::Fail(errors.join(" | "));
    }
    out
}

/// The cases selected by `CAPSULE_CRI_CASES` (comma-separated names; all
/// when unset).
pub fn selected(cases: &[Case]) -> Result<Vec<&Case>> {
    let Ok(list) = std::env::var("CAPSULE_CRI_CASES") else {
        return Ok(cases.iter().collect());
    };
    let mut out = Vec::new();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let c = cases
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| anyhow!("CAPSULE_CRI_CASES names an unknown case {name:?}"))?;
        out.push(c);
    }
    Ok(out)
}

/// The runtimes selected by `CAPSULE_CRI_RUNTIMES` (comma-separated
/// handler names; both when unset: a debugging aid, the verdict needs both).
pub fn selected_runtimes() -> Vec<Runtime> {
    let all = [Runtime::Runc, Runtime::Capsule];
    match std::env::var("CAPSULE_CRI_RUNTIMES") {
        Ok(list) => all
            .into_iter()
            .filter(|r| list.split(',').any(|n| n.trim() == r.handler()))
            .collect(),
        Err(_) => all.to_vec(),
    }
}

/// Every case on runc, then every case on capsule.
pub fn run_all(node: &Node, cases: &[&Case], mut progress: impl FnMut(&Outcome)) -> Vec<Outcome> {
    let mut out = Vec::new();
    for runtime in selected_runtimes() {
        for c in cases {
            let o = run_case(node, c, runtime);
            progress(&o);
            out.push(o);
        }
    }
    out
}
