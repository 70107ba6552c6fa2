//! End-to-end harness: a private containerd (1.6, 1.7 or 2.1:
//! `CAPSULE_CONTAINERD`, see [`containerd`]; its own root, state, socket and
//! config; the capsule runtime resolved through a private PATH entry), a busybox OCI image built by hand from the host's busybox-static
//! and imported with `ctr`, `ctr` invocations with deadlines, loop devices,
//! and leak checks (QEMU/virtiofsd processes, mounts, state files).
//!
//! Nothing system-wide changes except what containerd itself does: shim
//! sockets land in `/run/containerd/s/<hash of our socket>`.
pub mod cri;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

pub mod netfix;

pub mod containerd;
pub use containerd::{Containerd, Version as ContainerdVersion};

pub const RUNTIME: &str = "io.containerd.capsule.v2";
pub const IMAGE: &str = "docker.io/library/capsule-busybox:latest";
pub const NAMESPACE: &str = "capsule-e2e";

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Everything the end-to-end tests need. Panics (the tests fail, never
/// skip) naming what is missing and how to get it.
pub fn require_ready() -> &'static Ready {
    static READY: OnceLock<std::result::Result<Ready, String>> = OnceLock::new();
    match READY.get_or_init(|| ready().map_err(|e| format!("{e:#}"))) {
        Ok(r) => r,
        Err(e) => panic!("end-to-end prerequisites missing: {e}"),
    }
}

#[derive(Debug)]
pub struct Ready {
    pub shim: PathBuf,
    pub capsule: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub virtiofsd: PathBuf,
    pub image_tar: PathBuf,
    /// The image's filesystem, unpacked (for `ctr run --config`).
    pub rootfs_dir: PathBuf,
    /// The containerd of `CAPSULE_CONTAINERD`.
    pub containerd: &'static Containerd,
}

fn which(name: &str, extra: &[PathBuf]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra.iter().cloned())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn ready() -> Result<Ready> {
    let guest = std::env::var_os("CAPSULE_GUEST_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("guest"));
    // capsule's kernel boots as the uncompressed ELF (PVH), as installed;
    // Debian's fallback has only its bzImage.
    let kernel = Some(guest.join("vmlinux"))
        .filter(|k| k.is_file())
        .unwrap_or_else(|| guest.join("vmlinuz"));
    let initramfs = guest.join("initramfs.img");
    if !kernel.is_file() {
        bail!(
            "{} is missing: build the guest with `make guest`",
            kernel.display()
        );
    }
    if !initramfs.is_file() {
        bail!(
            "{} (the guest image with the agent as /init) is missing: build it with agent/build-static.sh",
            initramfs.display()
        );
    }
    let containerd = Containerd::selected()?;
    for tool in [
        "qemu-system-x86_64",
        "losetup",
        "script",
        "tar",
        "sha256sum",
    ] {
        which(tool, &[])
            .ok_or_else(|| anyhow!("{tool} not found in PATH (scripts/install-deps.sh)"))?;
    }
    // capsule's own lookup: a virtiofsd it can drive (not QEMU's C one).
    let virtiofsd = capsule_shim::config::find_virtiofsd(Path::new("virtiofsd"), false);
    let virtiofsd = match virtiofsd.found {
        Some(v) => v.path,
        None => bail!("{}", virtiofsd.error(Path::new("virtiofsd"))),
    };
    // The shim binaries: built here, as `cargo test -p capsule-tests` builds
    // only the library of capsule-shim.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let st = Command::new(cargo)
        .current_dir(workspace_root())
        .args(["build", "-p", "capsule-shim", "--bins"])
        .status()
        .context("running cargo build -p capsule-shim --bins")?;
    if !st.success() {
        bail!("cargo build -p capsule-shim --bins failed");
    }
    let bin = target_dir().join("debug");
    let image_tar = build_image().context("building the busybox test image")?;
    let rootfs_dir = image_tar.with_file_name("rootfs");
    Ok(Ready {
        rootfs_dir,
        shim: bin.join("containerd-shim-capsule-v2"),
        capsule: bin.join("capsule"),
        kernel,
        initramfs,
        virtiofsd,
        image_tar,
        containerd,
    })
}

pub(crate) fn sha256(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum").arg(path).output()?;
    let s = String::from_utf8_lossy(&out.stdout);
    s.split_whitespace()
        .next()
        .map(String::from)
        .ok_or_else(|| anyhow!("sha256sum {}: no output", path.display()))
}

pub(crate) fn blob(dir: &Path, bytes: &[u8]) -> Result<(String, u64)> {
    let tmp = dir.join("blob.tmp");
    std::fs::write(&tmp, bytes)?;
    let d = sha256(&tmp)?;
    std::fs::rename(&tmp, dir.join("blobs/sha256").join(&d))?;
    Ok((format!("sha256:{d}"), bytes.len() as u64))
}

/// An OCI image layout tarball with one layer: busybox-static and its
/// applet links. Built once per test process.
/// SIGTERM to our child `c`, SIGKILL after `grace`; reaped either way.
pub fn stop_child(c: &mut std::process::Child, grace: Duration) {
    // SAFETY: plain kill(2) of our own child.
    unsafe {
        libc::kill(c.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// `base/image-<our pid>`, emptied, after removing the image directories
/// of earlier test processes that are gone.
pub(crate) fn fresh_image_dir(base: &Path) -> PathBuf {
    if let Ok(d) = std::fs::read_dir(base) {
        for e in d.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix("image-")
                .and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let out = base.join(format!("image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    out
}

fn build_image() -> Result<PathBuf> {
    let out = fresh_image_dir(&target_dir().join("e2e"));
    let root = out.join("rootfs");
    for d in [
        "bin", "dev", "proc", "sys", "tmp", "etc", "root", "run", "mnt",
    ] {
        std::fs::create_dir_all(root.join(d))?;
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("busybox not found (apt-get install busybox-static)"))?;
    std::fs::copy(&busybox, root.join("bin/busybox"))?;
    std::fs::set_permissions(
        root.join("bin/busybox"),
        std::fs::Permissions::from_mode(0o755),
    )?;
    let list = Command::new(&busybox).arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" {
            continue;
        }
        let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    std::fs::write(root.join("etc/group"), "root:x:0:\n")?;
    let layout = out.join("layout");
    std::fs::create_dir_all(layout.join("blobs/sha256"))?;
    let layer = out.join("layer.tar");
    let st = Command::new("tar")
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "-C",
        ])
        .arg(&root)
        .arg("-cf")
        .arg(&layer)
        .arg(".")
        .status()?;
    if !st.success() {
        bail!("tar of the layer failed");
    }
    let layer_bytes = std::fs::read(&layer)?;
    let (layer_digest, layer_size) = blob(&layout, &layer_bytes)?;
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let (config_digest, config_size) = blob(&layout, &serde_json::to_vec(&config)?)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size}],
    });
    let (manifest_digest, manifest_size) = blob(&layout, &serde_json::to_vec(&manifest)?)?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": IMAGE,
                "org.opencontainers.image.ref.name": "latest"
            }
        }]
    });
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let tarball = out.join("image.tar");
    let st = Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&tarball)
        .args(["oci-layout", "index.json", "blobs"])
        .status()?;
    if !st.success() {
        bail!("tar of the image failed");
    }
    Ok(tarball)
}

/// Runs `cmd` with a deadline; kills it when the deadline passes.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let mut so = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut se = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let t1 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t2 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: t1.join().unwrap_or_default(),
        stderr: t2.join().unwrap_or_default(),
    })
}

pub fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Polls `f` until it returns `Some`, at most `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

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

/// The shim and CLI: the debug build, or (`release`) what `make install`
/// ships, built by `shim/build-dist.sh` (static, size-optimised), once per
/// process.
pub fn shim_binaries(release: bool) -> Result<(PathBuf, PathBuf)> {
    static DIST: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    if !release {
        let r = require_ready();
        return Ok((r.shim.clone(), r.capsule.clone()));
    }
    let dir = DIST
        .get_or_init(|| {
            let o = Command::new(workspace_root().join("shim/build-dist.sh"))
                .stderr(Stdio::inherit())
                .output()
                .map_err(|e| format!("running shim/build-dist.sh: {e}"))?;
            if !o.status.success() {
                return Err("shim/build-dist.sh failed".into());
            }
            let out = String::from_utf8_lossy(&o.stdout).trim().to_string();
            Ok(workspace_root().join(out))
        })
        .clone()
        .map_err(|e| anyhow!(e))?;
    Ok((dir.join("containerd-shim-capsule-v2"), dir.join("capsule")))
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

    /// The `ctr` matching this environment's containerd.
    pub fn ctr_path(&self) -> &Path {
        &self.daemon.ctr
    }

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

    fn log_errors_message(&self, errors: &[String]) -> String {
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

    /// `program`, run in the environment's network namespace when it has
    /// one.
    pub fn in_netns(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display())).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut c = self.in_netns(&self.daemon.ctr);
        c.arg("--address")
            .arg(&self.sock)
            .args(["--namespace", NAMESPACE])
            .args(args);
        c
    }

    /// `ctr ARGS` with a 300 s deadline.
    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        run_with_timeout(self.ctr_cmd(args), Duration::from_secs(300))
    }

    /// `ctr ARGS` that must succeed; returns stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> Result<String> {
        let o = self.ctr(args)?;
        if !o.status.success() {
            bail!(
                "ctr {args:?} failed: {}\n{}",
                text(&o),
                self.containerd_log_tail()
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// `ctr run --runtime io.containerd.capsule.v2 OPTS IMAGE ID CMD...`.
    pub fn run(&self, opts: &[&str], id: &str, cmd: &[&str]) -> Result<Output> {
        let mut args = vec!["run", "--runtime", self.runtime.as_str()];
        args.extend_from_slice(opts);
        args.push(IMAGE);
        args.push(id);
        args.extend_from_slice(cmd);
        self.ctr(&args)
    }

    /// `ctr ... run` under `script`, which gives ctr a terminal (for `-t`).
    pub fn run_in_pty(&self, opts: &[&str], id: &str, cmd: &[&str]) -> Result<Output> {
        let mut words: Vec<String> = vec![
            self.daemon.ctr.display().to_string(),
            "--address".into(),
            self.sock.display().to_string(),
            "--namespace".into(),
            NAMESPACE.into(),
            "run".into(),
            "--runtime".into(),
            self.runtime.clone(),
        ];
        words.extend(opts.iter().map(|s| s.to_string()));
        words.push(IMAGE.into());
        words.push(id.into());
        words.extend(cmd.iter().map(|s| s.to_string()));
        let line = words
            .iter()
            .map(|w| format!("'{}'", w.replace('\'', "'\\''")))
            .collect::<Vec<_>>()
            .join(" ");
        let mut c = Command::new("script");
        c.args(["-q", "-e", "-c", &line, "/dev/null"]);
        run_with_timeout(c, Duration::from_secs(300))
    }

    /// The task's status column in `ctr task ls` (None when absent).
    pub fn task_status(&self, id: &str) -> Option<String> {
        let out = self.ctr_ok(&["task", "ls"]).ok()?;
        out.lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.first() == Some(&id))
            .and_then(|f| f.get(2).map(|s| s.to_string()))
    }

    /// Kills, deletes and removes container `id` (whatever is left of it).
    pub fn remove(&self, id: &str) {
        let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        let _ = wait_for("the task to stop", Duration::from_secs(30), || {
            match self.task_status(id).as_deref() {
                None | Some("STOPPED") => Some(()),
                _ => None,
            }
        });
        let _ = self.ctr(&["task", "delete", id]);
        let _ = self.ctr(&["container", "delete", id]);
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

    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("sandboxes").join(id)
    }

    /// Sandboxes with a state directory.
    pub fn sandboxes(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.state_dir.join("sandboxes"))
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().to_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
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

    /// `capsule --config <ours> ARGS`.
    pub fn capsule(&self, args: &[&str]) -> Result<Output> {
        let mut c = Command::new(&self.capsule_cli);
        c.arg("--config").arg(&self.config_path).args(args);
        run_with_timeout(c, Duration::from_secs(120))
    }

    /// A shell snippet's output inside a running container.
    pub fn exec(&self, id: &str, exec_id: &str, cmd: &[&str]) -> Result<Output> {
        let mut args = vec!["task", "exec", "--exec-id", exec_id, id];
        args.extend_from_slice(cmd);
        self.ctr(&args)
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
        if let Some(keep) = std::env::var_os("CAPSULE_E2E_LOGS") {
            let keep = PathBuf::from(keep);
            let _ = std::fs::create_dir_all(&keep);
            let name = self
                .dir
                .path()
                .file_name()
                .map(|n| n.to_os_string())
                .unwrap_or_default();
            let _ = std::fs::copy(
                self.dir.path().join("containerd.log"),
                keep.join(name).with_extension("log"),
            );
        }
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

/// (pid, argv) of every process.
pub fn processes() -> Vec<(u32, Vec<String>)> {
    let mut v = Vec::new();
    let Ok(d) = std::fs::read_dir("/proc") else {
        return v;
    };
    for e in d.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args.is_empty() {
            v.push((pid, args));
        }
    }
    v
}

/// Sockets in containerd's shim socket directory nobody listens on.
pub fn dead_shim_sockets() -> Vec<PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(d) = std::fs::read_dir("/run/containerd/s") else {
        return Vec::new();
    };
    d.flatten()
        .map(|e| e.path())
        .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket()))
        .filter(|p| {
            matches!(std::os::unix::net::UnixStream::connect(p),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
        })
        .collect()
}

/// Mount points at or under `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let points = capsule_shim::mount::parse_mountinfo(&info);
    capsule_shim::mount::mounts_under(&points, dir)
}

/// A device node (`kind` S_IFBLK or S_IFCHR), mode 0600.
pub fn mknod(path: &Path, kind: nix::sys::stat::SFlag, major: u64, minor: u64) -> Result<()> {
    nix::sys::stat::mknod(
        path,
        kind,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(major, minor),
    )
    .with_context(|| format!("mknod {}", path.display()))
}

/// A block device node, mode 0600.
pub fn mknod_block(path: &Path, major: u64, minor: u64) -> Result<()> {
    mknod(path, nix::sys::stat::SFlag::S_IFBLK, major, minor)
}

/// Sends SIGKILL to `pid`.
pub fn sigkill(pid: u32) {
    // SAFETY: plain kill(2).
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
}

/// One ttrpc call to a shim socket, without an async runtime (tests).
/// Returns the response payload, or the status code and message.
pub fn shim_call(
    address: &str,
    service: &str,
    method: &str,
    payload: Vec<u8>,
) -> Result<std::result::Result<Vec<u8>, (i32, String)>> {
    use capsule_shim::protos::protobuf::Message;
    use capsule_shim::protos::ttrpc;
    use std::io::Write;
    let path = address.strip_prefix("unix://").unwrap_or(address);
    let mut sock = std::os::unix::net::UnixStream::connect(path)
        .with_context(|| format!("connecting to {path}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut r = ttrpc::Request::new();
    r.service = service.into();
    r.method = method.into();
    r.payload = payload;
    let body = r.write_to_bytes()?;
    let mut frame = Vec::new();
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&1u32.to_be_bytes());
    frame.extend_from_slice(&[1, 0]);
    frame.extend_from_slice(&body);
    sock.write_all(&frame)?;
    let mut header = [0u8; 10];
    sock.read_exact(&mut header)?;
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let mut body = vec![0u8; len];
    sock.read_exact(&mut body)?;
    let resp = ttrpc::Response::parse_from_bytes(&body)?;
    let code = resp.status.code.value();
    if code != 0 {
        return Ok(Err((code, resp.status.message.clone())));
    }
    Ok(Ok(resp.payload))
}
