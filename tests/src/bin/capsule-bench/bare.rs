//! Bare QEMU: capsule's own QEMU command line for a sandbox of the bench's
//! configuration (the shim's `vm_config` through the hypervisor's
//! `build_argv`, so the machine, accel, memory, vCPUs, devices and kernel
//! command line are the same), without the cold-plugged virtio-fs share,
//! and with the agent in a benchmark mode (`capsule.bench=` on the kernel
//! command line, see agent/src/init.rs).
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use capsule_hypervisor::accel::choose_accel;
use capsule_hypervisor::config::{resolve_binary, VsockMode};
use capsule_hypervisor::launch::argv::{build_argv, ArgvInput};
use capsule_shim::config::Config;
use capsule_shim::state::SandboxPaths;
use capsule_tests::Env;

/// What the agent writes on the console once its early init is done
/// (`capsule_agent::init::BENCH_READY`).
pub const READY: &str = "capsule-bench: ready";

/// A bare QEMU invocation.
#[derive(Debug, Clone)]
pub struct BareLaunch {
    pub qemu: PathBuf,
    pub args: Vec<String>,
    pub run_dir: PathBuf,
    pub console_log: PathBuf,
    pub qmp_socket: PathBuf,
    pub accel: String,
}

impl BareLaunch {
    /// The launch for `env`'s configuration in `run_dir`, agent in `mode`.
    pub fn new(env: &Env, run_dir: &Path, mode: &str) -> Result<Self> {
        let config = Config::load_file(&env.config_path).map_err(|e| anyhow!("{e}"))?;
        let paths = SandboxPaths::new(run_dir, "bare");
        let mut vm =
            capsule_shim::sandbox::qemu::vm_config(&config, &paths).map_err(|e| anyhow!("{e}"))?;
        vm.run_dir = run_dir.to_path_buf();
        vm.cmdline = format!("{} capsule.bench={mode}", vm.cmdline);
        let qemu = resolve_binary(&vm.qemu_binary)
            .ok_or_else(|| anyhow!("{} not found", vm.qemu_binary.display()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let accel = rt.block_on(choose_accel(&vm, &qemu)).accel;
        let vsock = match vm.agent.vsock {
            VsockMode::On => true,
            VsockMode::Off => false,
            VsockMode::Auto => vm.agent.vhost_vsock_device.exists(),
        };
        let args = build_argv(&ArgvInput {
            config: &vm,
            accel,
            vsock,
            coldplug: &[],
        })
        .map_err(|e| anyhow!("bare QEMU command line: {e}"))?;
        std::fs::create_dir_all(run_dir)?;
        Ok(Self {
            qemu,
            args,
            run_dir: run_dir.to_path_buf(),
            console_log: vm.console_log(),
            qmp_socket: vm.qmp_socket(),
            accel: accel.to_string(),
        })
    }

    /// The command, with the previous run's console and sockets removed.
    pub fn command(&self) -> Command {
        for p in [&self.console_log, &self.qmp_socket] {
            let _ = std::fs::remove_file(p);
        }
        let mut c = Command::new(&self.qemu);
        c.args(&self.args);
        c
    }

    /// The console so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console_log).unwrap_or_default()
    }
}

/// A bare VM left running (killed and reaped on drop).
pub struct BareVm {
    child: Child,
    pub launch: BareLaunch,
    offset: usize,
}

impl BareVm {
    pub fn start(launch: BareLaunch) -> Result<Self> {
        let log = std::fs::File::create(launch.run_dir.join("qemu.log"))?;
        let child = launch
            .command()
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting bare QEMU")?;
        Ok(Self {
            child,
            launch,
            offset: 0,
        })
    }

    /// Waits until the console, after what earlier waits consumed, has a
    /// line equal to `line`; consumes up to it.
    pub fn wait_line(&mut self, line: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let con = std::fs::read(&self.launch.console_log).unwrap_or_default();
            let new = String::from_utf8_lossy(con.get(self.offset..).unwrap_or_default());
            let mut pos = 0;
            for l in new.split_inclusive('\n') {
                pos += l.len();
                if l.ends_with('\n') && l.trim_end() == line {
                    self.offset += pos;
                    return Ok(());
                }
            }
            if let Some(st) = self.child.try_wait()? {
                bail!("bare QEMU exited ({st}) before `{line}`");
            }
            if Instant::now() >= deadline {
                bail!(
                    "bare guest: no `{line}` within {timeout:?}; console:\n{}",
                    self.launch.console()
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for BareVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
