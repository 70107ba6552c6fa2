//! A private Kubernetes "node" for the CRI suite: a network namespace made
//! for it, and containerd with the CRI plugin running inside it
//! (`nsenter --net`, which leaves the mount namespace and so the cgroup
//! mounts alone) with its own root, state, sockets, CNI network (Debian's
//! plugins, a private conf dir and IPAM data dir), CDI dir, pod log dir and
//! capsule configuration; the suite's images imported.
//!
//! Host-wide traces, all removed or checked: shim sockets in
//! `/run/containerd/s`, CNI's result cache in `/var/lib/cni/results`
//! (`capcri-*`), the pods' cgroups under `/<cgroup parent>` in each
//! hierarchy.
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::client::CriClient;
use super::containerd::{capsule_config_env, cri_config, ConfigInput, Containerd, Sandboxer};
use super::image;
use crate::{dead_shim_sockets, mounts_under, processes, run_with_timeout, text, wait_for, Ready};

/// The CNI network's name and the node's pod subnet.
pub const CNI_NETWORK: &str = "capcri";
pub const POD_SUBNET_PREFIX: &str = "10.99.0.";
/// Debian's CNI plugins (containernetworking-plugins).
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
const CNI_RESULTS: &str = "/var/lib/cni/results";

/// A network namespace made by the suite, deleted on drop.
pub struct Netns {
    pub name: String,
    pub path: PathBuf,
}

fn sh(cmd: &str) -> Result<Output> {
    let mut c = Command::new("sh");
    c.args(["-c", cmd]);
    run_with_timeout(c, Duration::from_secs(60))
}

impl Netns {
    pub fn new(name: &str) -> Result<Self> {
        let _ = sh(&format!("ip netns del {name} 2>/dev/null"));
        for cmd in [
            format!("ip netns add {name}"),
            format!("ip -n {name} link set lo up"),
        ] {
            let o = sh(&cmd)?;
            if !o.status.success() {
                bail!("`{cmd}` failed: {}", text(&o));
            }
        }
        Ok(Self {
            path: PathBuf::from(format!("/run/netns/{name}")),
            name: name.to_string(),
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&format!("ip netns del {}", self.name));
    }
}

#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub containerd: Containerd,
    pub sandboxer: Sandboxer,
    /// The capsule VM's memory.
    pub memory_mib: u32,
}

impl NodeOptions {
    /// From the environment: `CAPSULE_CONTAINERD`, `CAPSULE_CRI_SANDBOXER`.
    pub fn from_env() -> Result<Self> {
        Ok(Self {
            containerd: Containerd::selected()?.clone(),
            sandboxer: Sandboxer::from_env()?,
            memory_mib: 256,
        })
    }
}

pub struct Node {
    pub dir: tempfile::TempDir,
    pub opts: NodeOptions,
    pub netns: Netns,
    pub sock: PathBuf,
    pub cri: CriClient,
    pub capsule_config: PathBuf,
    /// capsule's state_dir.
    pub state_dir: PathBuf,
    /// Where pods' log directories go.
    pub log_dir: PathBuf,
    pub cdi_dir: PathBuf,
    pub ipam_dir: PathBuf,
    /// Pods' cgroup parent (cgroupfs driver).
    pub cgroup_parent: String,
    pub ready: &'static Ready,
    child: Option<Child>,
    sockets_before: Vec<PathBuf>,
    cni_results_before: Vec<String>,
}

fn cni_results() -> Vec<String> {
    std::fs::read_dir(CNI_RESULTS)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().map(String::from))
                .filter(|n| n.starts_with(&format!("{CNI_NETWORK}-")))
                .collect()
        })
        .unwrap_or_default()
}

impl Node {
    pub fn start(opts: NodeOptions) -> Result<Node> {
        let ready = crate::require_ready();
        let images = image::image_tar()?;
        let dir = tempfile::Builder::new()
            .prefix("capcri-")
            .tempdir_in("/tmp")?;
        let d = dir.path().to_path_buf();
        for sub in ["bin", "logs", "cni/net.d", "cni/ipam", "cdi"] {
            std::fs::create_dir_all(d.join(sub))?;
        }
        std::os::unix::fs::symlink(&ready.shim, d.join("bin/containerd-shim-capsule-v2"))?;
        let netns = Netns::new(&format!("capcri-{}", std::process::id()))?;
        let capsule_config = d.join("capsule.toml");
        // Short: CRI's sandbox ids are 64 characters, and QEMU's sockets
        // under <state_dir>/sandboxes/<id>/vm/ must fit sun_path (108).
        let state_dir = PathBuf::from(format!("/run/capcri.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state_dir);
        write_capsule_config(&capsule_config, &state_dir, ready, opts.memory_mib)?;
        let ipam_dir = d.join("cni/ipam");
        write_cni_config(&d.join("cni/net.d"), &ipam_dir)?;
        let cfg = cri_config(
            &opts.containerd,
            &ConfigInput {
                dir: &d,
                sandbox_image: image::PAUSE,
                capsule_config: &capsule_config,
                cni_conf_dir: &d.join("cni/net.d"),
                cni_bin_dir: Path::new(CNI_BIN_DIR),
                cdi_dir: &d.join("cdi"),
                sandboxer: opts.sandboxer,
            },
        );
        std::fs::write(d.join("containerd.toml"), cfg)?;
        let sockets_before = dead_shim_sockets();
        let cni_results_before = cni_results();
        let child = spawn_containerd(&d, &netns, &opts, &capsule_config)?;
        let sock = d.join("containerd.sock");
        let mut child = Some(child);
        let connected = wait_for("containerd's socket", Duration::from_secs(60), || {
            std::os::unix::net::UnixStream::connect(&sock).ok()
        })
        .and_then(|_| CriClient::connect(&sock));
        let cri = match connected {
            Ok(c) => c,
            Err(e) => {
                if let Some(mut c) = child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(e.context(log_tail(&d)));
            }
        };
        let node = Node {
            opts,
            netns,
            sock,
            cri,
            capsule_config,
            state_dir,
            log_dir: d.join("logs"),
            cdi_dir: d.join("cdi"),
            ipam_dir,
            cgroup_parent: format!("/capcri-{}", std::process::id()),
            ready,
            child,
            sockets_before,
            cni_results_before,
            dir,
        };
        node.wait_cri_ready()?;
        node.import_images(images)?;
        Ok(node)
    }

    fn wait_cri_ready(&self) -> Result<()> {
        let mut last = String::new();
        wait_for(
            "the CRI plugin to report ready",
            Duration::from_secs(60),
            || match self.cri.status() {
                Ok(s) => {
                    let conds = s.status.map(|s| s.conditions).unwrap_or_default();
                    last = format!("{conds:?}");
                    (conds.len() >= 2 && conds.iter().all(|c| c.status)).then_some(())
                }
                Err(e) => {
                    last = e.to_string();
                    None
                }
            },
        )
        .with_context(|| format!("last status: {last}\n{}", self.log_tail()))
    }

    fn import_images(&self, tar: &Path) -> Result<()> {
        let o = self.ctr(&["images", "import", &tar.display().to_string()])?;
        if !o.status.success() {
            bail!("importing {}: {}", tar.display(), text(&o));
        }
        for img in [image::BUSYBOX, image::PAUSE] {
            wait_for(
                &format!("the CRI image service to know {img}"),
                Duration::from_secs(30),
                || self.cri.image_present(img).ok().filter(|p| *p),
            )
            .with_context(|| self.log_tail())?;
        }
        Ok(())
    }

    /// `ctr --namespace k8s.io ARGS` against this node, in its netns.
    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        let mut c = self.in_netns(&self.opts.containerd.ctr);
        c.arg("--address")
            .arg(&self.sock)
            .args(["--namespace", "k8s.io"])
            .args(args);
        run_with_timeout(c, Duration::from_secs(120))
    }

    /// `program` in the node's network namespace.
    pub fn in_netns(&self, program: &Path) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.netns.path.display()))
            .arg(program);
        c
    }

    /// `capsule --config <ours> ARGS`.
    pub fn capsule(&self, args: &[&str]) -> Result<Output> {
        let mut c = Command::new(&self.ready.capsule);
        c.arg("--config").arg(&self.capsule_config).args(args);
        run_with_timeout(c, Duration::from_secs(60))
    }

    /// capsule sandboxes with a state directory.
    pub fn capsule_sandboxes(&self) -> Vec<String> {
        crate::host::sandbox_ids(&self.state_dir)
    }

    /// QEMU processes started for this node (an argument names the node's
    /// directory or capsule's state dir): (pid, argv).
    pub fn qemu_processes(&self) -> Vec<(u32, Vec<String>)> {
        self.vm_processes(|base| base.starts_with("qemu-system"))
    }

    fn vm_processes(&self, want: impl Fn(&str) -> bool) -> Vec<(u32, Vec<String>)> {
        let needles = [
            self.dir.path().display().to_string(),
            self.state_dir.display().to_string(),
        ];
        processes()
            .into_iter()
            .filter(|(_, args)| {
                let base = args
                    .first()
                    .and_then(|a| Path::new(a).file_name())
                    .map(|b| b.to_string_lossy().into_owned())
                    .unwrap_or_default();
                want(&base) && args.iter().any(|a| needles.iter().any(|n| a.contains(n)))
            })
            .collect()
    }

    /// Shims started by this node's containerd.
    pub fn shim_processes(&self) -> Vec<(u32, Vec<String>)> {
        let needle = self.sock.display().to_string();
        processes()
            .into_iter()
            .filter(|(_, args)| {
                args.first().is_some_and(|a| a.contains("containerd-shim"))
                    && args.iter().any(|a| a.contains(&needle))
            })
            .collect()
    }

    /// Everything a finished case must not leave: pods and containers in
    /// CRI, QEMU/virtiofsd/shim processes, mounts under the node's
    /// directory, capsule state, dead shim sockets, CNI leases and cached
    /// results.
    pub fn leftovers(&self) -> Vec<String> {
        let mut out = Vec::new();
        match self.cri.list_pod_sandbox(None) {
            Ok(pods) => out.extend(pods.iter().map(|p| {
                format!(
                    "pod {} ({}) still listed by ListPodSandbox",
                    p.id,
                    p.metadata.as_ref().map(|m| m.name.as_str()).unwrap_or("?")
                )
            })),
            Err(e) => out.push(format!("ListPodSandbox: {e}")),
        }
        match self.cri.list_containers(None) {
            Ok(cs) => out.extend(
                cs.iter()
                    .map(|c| format!("container {} still listed by ListContainers", c.id)),
            ),
            Err(e) => out.push(format!("ListContainers: {e}")),
        }
        for (pid, args) in
            self.vm_processes(|b| b.starts_with("qemu-system") || b.contains("virtiofsd"))
        {
            out.push(format!("process {pid}: {}", args.join(" ")));
        }
        for (pid, args) in self.shim_processes() {
            out.push(format!("shim {pid}: {}", args.join(" ")));
        }
        for dir in [self.dir.path(), &self.state_dir] {
            for m in mounts_under(dir) {
                out.push(format!("mount {}", m.display()));
            }
        }
        for s in self.capsule_sandboxes() {
            out.push(format!(
                "capsule state {}",
                self.state_dir.join("sandboxes").join(s).display()
            ));
        }
        for s in dead_shim_sockets() {
            if !self.sockets_before.contains(&s) {
                out.push(format!("dead shim socket {}", s.display()));
            }
        }
        for lease in self.ipam_leases() {
            out.push(format!("IPAM lease {lease}"));
        }
        for r in cni_results() {
            if !self.cni_results_before.contains(&r) {
                out.push(format!("CNI result cache {CNI_RESULTS}/{r}"));
            }
        }
        out
    }

    /// Addresses host-local still holds for pods.
    fn ipam_leases(&self) -> Vec<String> {
        std::fs::read_dir(self.ipam_dir.join(CNI_NETWORK))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str().map(String::from))
                    .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until [`leftovers`](Self::leftovers) is empty.
    pub fn wait_clean(&self, timeout: Duration) -> std::result::Result<(), Vec<String>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = self.leftovers();
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(left);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Removes whatever a failed case left so the next one starts clean:
    /// pods through CRI, then capsule's cleanup, then by force.
    pub fn force_clean(&self) {
        if let Ok(pods) = self.cri.list_pod_sandbox(None) {
            for p in pods {
                let _ = self.cri.stop_pod_sandbox(&p.id);
                let _ = self.cri.remove_pod_sandbox(&p.id);
            }
        }
        for s in self.capsule_sandboxes() {
            let _ = self.capsule(&["cleanup", &s, "--force"]);
        }
        for (pid, _) in
            self.vm_processes(|b| b.starts_with("qemu-system") || b.contains("virtiofsd"))
        {
            crate::sigkill(pid);
        }
        if self.cri.list_pod_sandbox(None).is_ok_and(|p| p.is_empty()) {
            self.kill_shims();
            for dir in [self.dir.path(), &self.state_dir] {
                for m in mounts_under(dir) {
                    let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
                }
            }
        }
        for lease in self.ipam_leases() {
            let _ = std::fs::remove_file(self.ipam_dir.join(CNI_NETWORK).join(lease));
        }
        for r in cni_results() {
            if !self.cni_results_before.contains(&r) {
                let _ = std::fs::remove_file(Path::new(CNI_RESULTS).join(r));
            }
        }
    }

    /// SIGKILLs this node's shims and removes the sockets they served
    /// (`-socket unix:///run/containerd/s/…`, containerd 2.x).
    fn kill_shims(&self) {
        let shims = self.shim_processes();
        for (pid, _) in &shims {
            crate::sigkill(*pid);
        }
        for (_, args) in &shims {
            let socket = args
                .iter()
                .skip_while(|a| *a != "-socket")
                .nth(1)
                .and_then(|s| s.strip_prefix("unix://"))
                .map(PathBuf::from);
            if let Some(s) = socket {
                let gone = wait_for(
                    "a killed shim's socket to die",
                    Duration::from_secs(5),
                    || dead_shim_sockets().contains(&s).then_some(()),
                );
                if gone.is_ok() {
                    let _ = std::fs::remove_file(&s);
                }
            }
        }
    }

    pub fn log_tail(&self) -> String {
        log_tail(self.dir.path())
    }

    /// The containerd log (the shims log into it too).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// containerd's error lines about capsule or its shim.
    pub fn log_errors(&self) -> Vec<String> {
        crate::containerd::error_lines(&self.log(), &[])
    }

    /// containerd's state directory of `plugin` (task bundles, sandboxes)
    /// for CRI's namespace, `k8s.io`.
    pub fn containerd_state(&self, plugin: &str) -> PathBuf {
        self.dir.path().join("state").join(plugin).join("k8s.io")
    }
}

fn log_tail(dir: &Path) -> String {
    let s = std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default();
    let lines: Vec<&str> = s.lines().rev().take(40).collect();
    format!(
        "containerd log (last lines):\n{}",
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}

fn spawn_containerd(
    d: &Path,
    netns: &Netns,
    opts: &NodeOptions,
    capsule_config: &Path,
) -> Result<Child> {
    let containerd = &opts.containerd;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(d.join("containerd.log"))?;
    let mut path = vec![d.join("bin")];
    // containerd's own runc shim, for the versions from the cache.
    if containerd.version != crate::containerd::Version::V1_6 {
        path.extend(containerd.containerd.parent().map(Path::to_path_buf));
    }
    path.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    let path = std::env::join_paths(path)?;
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.path.display()))
        .arg(&containerd.containerd)
        .arg("--config")
        .arg(d.join("containerd.toml"))
        .env("PATH", path)
        .env_remove("CAPSULE_CONFIG");
    if let Some((k, v)) = capsule_config_env(opts.sandboxer, capsule_config) {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", containerd.containerd.display()))
}

fn write_capsule_config(
    path: &Path,
    state_dir: &Path,
    ready: &Ready,
    memory_mib: u32,
) -> Result<()> {
    let text = format!(
        r#"state_dir = "{state}"
log_level = "debug"
block_device_driver = "virtio-scsi"

[hypervisor]
kernel = "{kernel}"
initramfs = "{initramfs}"
accel = "tcg"
memory_mib = {memory_mib}

[virtiofsd]
path = "{virtiofsd}"

[timeouts]
agent_connect = 180.0
agent_call = 60.0
"#,
        state = state_dir.display(),
        kernel = ready.kernel.display(),
        initramfs = ready.initramfs.display(),
        virtiofsd = ready.virtiofsd.display(),
    );
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn write_cni_config(conf_dir: &Path, ipam_dir: &Path) -> Result<()> {
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": CNI_NETWORK,
        "plugins": [{
            "type": "bridge",
            "bridge": "capcri0",
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": format!("{POD_SUBNET_PREFIX}0/24")}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": ipam_dir,
            }
        }]
    });
    std::fs::write(
        conf_dir.join("10-capcri.conflist"),
        serde_json::to_vec_pretty(&conf)?,
    )?;
    Ok(())
}

/// Removes a cgroup directory tree (children first) in every hierarchy.
fn remove_cgroups(parent: &str) {
    fn rm_tree(p: &Path) {
        if let Ok(d) = std::fs::read_dir(p) {
            for e in d.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    rm_tree(&e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(p);
    }
    let rel = parent.trim_start_matches('/');
    if rel.is_empty() {
        return;
    }
    let root = Path::new("/sys/fs/cgroup");
    rm_tree(&root.join(rel));
    if let Ok(d) = std::fs::read_dir(root) {
        for e in d.flatten() {
            rm_tree(&e.path().join(rel));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        crate::host::keep_containerd_log(self.dir.path());
        self.force_clean();
        if let Some(mut c) = self.child.take() {
            crate::stop_child(&mut c, Duration::from_secs(10));
        }
        self.kill_shims();
        for dir in [self.dir.path(), &self.state_dir] {
            for m in mounts_under(dir) {
                let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
        remove_cgroups(&self.cgroup_parent);
        // Sockets in the node's directory, so TempDir's removal can't trip.
        if let Ok(d) = std::fs::read_dir(self.dir.path()) {
            for e in d.flatten() {
                if e.file_type().is_ok_and(|t| t.is_socket()) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}
