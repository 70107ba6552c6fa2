//! The private containerd environment ([`Env`]): its capsule configuration,
//! starting, restarting and killing containerd, its loop devices, and the
//! teardown on drop. The `ctr` and `capsule` commands are in `ctr`, the
//! log and leftover checks in `inspect`.
mod ctr;
mod inspect;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{
    dead_shim_sockets, mounts_under, processes, require_ready, shim_binaries, stop_child, text,
    wait_for, Containerd, Ready, RUNTIME,
};

/// Options of an [`Env`]'s capsule configuration.
#[derive(Debug, Clone)]
pub struct CapsuleOptions {
    pub block_device_driver: String,
    pub vhost_user_store: Option<PathBuf>,
    /// `[timeouts]` entries (seconds) replacing the defaults below or added.
    pub timeouts: Vec<(String, f64)>,
    /// Environment of containerd, and so of every shim it starts (fault
    /// points: `CAPSULE_FAULT`).
    pub containerd_env: Vec<(String, String)>,
    /// Use the shipped build of the shim and CLI (`shim/build-dist.sh`;
    /// benchmarks).
    pub release: bool,
    pub memory_mib: u32,
    /// Run containerd (and so every shim, QEMU and CNI it starts) and ctr
    /// inside this network namespace (`nsenter --net`; `ip netns exec`
    /// would hide the cgroup mounts).
    pub netns: Option<PathBuf>,
    /// containerd runs in a service manager's minimal environment, as on a
    /// node: `env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin` (no HOME, no
    /// CAPSULE_CONFIG, no private PATH entry for the shim) plus
    /// `containerd_env`. Tests then name the runtime by the shim's absolute
    /// path ([`Env::runtime`]) and the config by `--runtime-config-path`.
    pub service_env: bool,
    /// `[virtiofsd] path`: the harness's absolute path when `None`.
    pub virtiofsd: Option<String>,
    /// Where `vmlinuz` and `initramfs.img` are: the built guest when `None`.
    pub guest_dir: Option<PathBuf>,
}

impl Default for CapsuleOptions {
    fn default() -> Self {
        Self {
            block_device_driver: "virtio-scsi".into(),
            vhost_user_store: None,
            timeouts: Vec::new(),
            containerd_env: Vec::new(),
            release: false,
            memory_mib: 256,
            netns: None,
            service_env: false,
            virtiofsd: None,
            guest_dir: None,
        }
    }
}

/// A private containerd with the capsule runtime and the test image.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub state_dir: PathBuf,
    pub config_path: PathBuf,
    /// The shim binary containerd runs, and the `capsule` CLI.
    pub shim: PathBuf,
    pub capsule_cli: PathBuf,
    containerd_env: Vec<(String, String)>,
    /// The network namespace containerd and ctr run in.
    pub netns: Option<PathBuf>,
    service_env: bool,
    containerd: Option<Child>,
    loops: Vec<String>,
    pub ready: &'static Ready,
    /// The containerd binaries this environment runs.
    pub daemon: &'static Containerd,
    /// The runtime `run` asks for: [`RUNTIME`], or a shim's absolute path.
    pub runtime: String,
    /// containerd log errors a test provokes on purpose (substrings).
    allowed_log_errors: Vec<String>,
    /// The log errors were reported already (by `assert_clean`).
    log_errors_reported: std::cell::Cell<bool>,
    /// Dead sockets in containerd's shim socket directory before this
    /// environment started (not ours to report).
    sockets_before: Vec<PathBuf>,
}

impl Env {
    pub fn start() -> Result<Env> {
        Self::start_with(CapsuleOptions::default())
    }

    pub fn start_with(opts: CapsuleOptions) -> Result<Env> {
        let ready = require_ready();
        let dir = tempfile::Builder::new().prefix("cap-").tempdir_in("/tmp")?;
        let d = dir.path();
        let bin = d.join("bin");
        std::fs::create_dir_all(&bin)?;
        let (shim, capsule_cli) = shim_binaries(opts.release)?;
        std::os::unix::fs::symlink(&shim, bin.join("containerd-shim-capsule-v2"))?;
        let sock = d.join("containerd.sock");
        let state_dir = d.join("run");
        let config_path = d.join("capsule.toml");
        let mut env = Env {
            sock,
            state_dir,
            config_path,
            shim,
            capsule_cli,
            containerd_env: opts.containerd_env.clone(),
            netns: opts.netns.clone(),
            service_env: opts.service_env,
            containerd: None,
            loops: Vec::new(),
            ready,
            daemon: ready.containerd,
            runtime: RUNTIME.into(),
            allowed_log_errors: Vec::new(),
            log_errors_reported: std::cell::Cell::new(false),
            dir,
            sockets_before: dead_shim_sockets(),
        };
        env.write_capsule_config(&env.config_path.clone(), &opts)?;
        let d = env.dir.path().to_path_buf();
        std::fs::write(d.join("containerd.toml"), env.daemon.config(&d))?;
        env.spawn_containerd()?;
        let o = env.ctr(&["images", "import", &ready.image_tar.display().to_string()])?;
        if !o.status.success() {
            bail!("importing the test image: {}", text(&o));
        }
        Ok(env)
    }

    /// Writes a capsule configuration file for this environment.
    pub fn write_capsule_config(&self, path: &Path, opts: &CapsuleOptions) -> Result<()> {
        let store = match &opts.vhost_user_store {
            Some(p) => format!(
                "enable_vhost_user_store = true\nvhost_user_store_path = \"{}\"\n",
                p.display()
            ),
            None => String::new(),
        };
        let mut timeouts: Vec<(String, f64)> =
            vec![("agent_connect".into(), 180.0), ("agent_call".into(), 60.0)];
        for (k, v) in &opts.timeouts {
            timeouts.retain(|(d, _)| d != k);
            timeouts.push((k.clone(), *v));
        }
        let timeouts: String = timeouts
            .iter()
            .map(|(k, v)| format!("{k} = {v:?}\n"))
            .collect();
        let (kernel, initramfs) = match &opts.guest_dir {
            Some(d) => (
                Some(d.join("vmlinux"))
                    .filter(|k| k.is_file())
                    .unwrap_or_else(|| d.join("vmlinuz")),
                d.join("initramfs.img"),
            ),
            None => (self.ready.kernel.clone(), self.ready.initramfs.clone()),
        };
        let text = format!(
            r#"state_dir = "{state}"
log_level = "debug"
block_device_driver = "{driver}"
{store}
[hypervisor]
kernel = "{kernel}"
initramfs = "{initramfs}"
accel = "tcg"
memory_mib = {memory}

[virtiofsd]
path = "{virtiofsd}"

[timeouts]
{timeouts}"#,
            memory = opts.memory_mib,
            state = self.state_dir.display(),
            driver = opts.block_device_driver,
            kernel = kernel.display(),
            initramfs = initramfs.display(),
            virtiofsd = opts.virtiofsd.clone().unwrap_or_else(|| self
                .ready
                .virtiofsd
                .display()
                .to_string()),
        );
        std::fs::write(path, text)?;
        Ok(())
    }

    /// The running containerd's pid.
    pub fn containerd_pid(&self) -> Option<u32> {
        self.containerd.as_ref().map(Child::id)
    }

    fn spawn_containerd(&mut self) -> Result<()> {
        let d = self.dir.path().to_path_buf();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("containerd.log"))?;
        let mut cmd = self.in_netns(&self.daemon.containerd);
        cmd.arg("--config").arg(d.join("containerd.toml"));
        if self.service_env {
            cmd.env_clear().env("PATH", SERVICE_PATH);
        } else {
            let path = format!(
                "{}:{}",
                d.join("bin").display(),
                std::env::var("PATH").unwrap_or_default()
            );
            cmd.env("PATH", path)
                .env("CAPSULE_CONFIG", &self.config_path);
        }
        let child = cmd
            .envs(self.containerd_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting containerd")?;
        self.containerd = Some(child);
        wait_for("containerd's socket", Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(&self.sock).ok()
        })
        .with_context(|| self.containerd_log_tail())?;
        Ok(())
    }

    /// Kills containerd (SIGKILL) and starts it again; shims keep running.
    pub fn restart_containerd(&mut self) -> Result<()> {
        self.kill_containerd();
        self.spawn_containerd()
    }

    /// Kills containerd (SIGKILL), leaving its shims running.
    pub fn kill_containerd(&mut self) {
        if let Some(mut c) = self.containerd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A loop device over a new `size`-byte file; detached on drop.
    pub fn loop_device(&mut self, name: &str, size: u64) -> Result<(String, PathBuf)> {
        let file = self.dir.path().join(format!("{name}.img"));
        std::fs::File::create(&file)?.set_len(size)?;
        let o = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&file)
            .output()?;
        if !o.status.success() {
            bail!("losetup: {}", String::from_utf8_lossy(&o.stderr));
        }
        let dev = String::from_utf8_lossy(&o.stdout).trim().to_string();
        self.loops.push(dev.clone());
        Ok((dev, file))
    }

    /// A vhost-user store in this environment's directory
    /// (`store/block/{devices,sockets}`) and a capsule configuration naming
    /// it, otherwise `opts`; returns (store, config file for
    /// `--runtime-config-path`).
    pub fn vhost_store(&self, opts: &CapsuleOptions) -> Result<(PathBuf, PathBuf)> {
        let store = self.dir.path().join("store");
        std::fs::create_dir_all(store.join("block/devices"))?;
        std::fs::create_dir_all(store.join("block/sockets"))?;
        let cfg = self.dir.path().join("capsule-store.toml");
        let mut o = opts.clone();
        o.vhost_user_store = Some(store.clone());
        self.write_capsule_config(&cfg, &o)?;
        Ok((store, cfg))
    }
}

/// PATH of a service manager's minimal environment (what containerd gets
/// from an init system that sets nothing else).
pub const SERVICE_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

impl Drop for Env {
    fn drop(&mut self) {
        // Errors logged during the test, before the cleanup below adds its
        // own; reported once the cleanup is done.
        let log_errors = if self.log_errors_reported.get() || std::thread::panicking() {
            Vec::new()
        } else {
            self.log_errors()
        };
        // CAPSULE_E2E_LOGS=DIR keeps every environment's containerd log
        // (the shim logs into it) for debugging.
        crate::host::keep_containerd_log(self.dir.path());
        // Whatever a failed test left: tasks, containers, sandboxes.
        if let Ok(out) = self.ctr_ok(&["container", "ls", "-q"]) {
            for id in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
                self.remove(id);
            }
        }
        for s in self.sandboxes() {
            let _ = self.capsule(&["cleanup", &s, "--force"]);
        }
        if let Some(mut c) = self.containerd.take() {
            stop_child(&mut c, Duration::from_secs(10));
        }
        // Shims of this containerd that survived.
        let needle = self.sock.display().to_string();
        for (pid, args) in processes() {
            if args
                .first()
                .is_some_and(|a| a.contains("containerd-shim-capsule-v2"))
                && args.iter().any(|a| a == &needle)
            {
                // SAFETY: plain kill(2).
                unsafe {
                    libc::kill(pid as i32, libc::SIGKILL);
                }
            }
        }
        for m in mounts_under(self.dir.path()) {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
        for l in &self.loops {
            let _ = Command::new("losetup").args(["-d", l]).status();
        }
        if !log_errors.is_empty() {
            panic!("{}", self.log_errors_message(&log_errors));
        }
    }
}
