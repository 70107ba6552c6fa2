//! A private Kubernetes "node" for the Sandbox API test: a network
//! namespace made for it, containerd 2.1 with the CRI plugin running inside
//! it (`nsenter --net`) with its own root, state, sockets, CNI network
//! (Debian's plugins in /usr/lib/cni, a private conf dir and IPAM data dir)
//! and capsule configuration, one runtime handler `capsule` with the
//! sandboxer under test, two local images (busybox, and a pause image for
//! `podsandbox`), and a CRI v1 client (k8s-cri) on its socket.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use capsule_tests::{
    containerd::error_lines, dead_shim_sockets, mounts_under, processes, run_with_timeout, text,
    wait_for, Containerd, ContainerdVersion, Ready,
};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

pub const HANDLER: &str = "capsule";
pub const BUSYBOX: &str = "capsule.test/sbx/busybox:latest";
pub const PAUSE: &str = "capsule.test/sbx/pause:latest";
const CNI_NETWORK: &str = "capsbx";
const CNI_RESULTS: &str = "/var/lib/cni/results";

/// containerd's `sandboxer` for the capsule handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sandboxer {
    /// A pause container, created as capsule's first task of the pod.
    PodSandbox,
    /// capsule serves the Sandbox API: no pause container.
    Shim,
}

impl Sandboxer {
    pub fn as_str(self) -> &'static str {
        match self {
            Sandboxer::PodSandbox => "podsandbox",
            Sandboxer::Shim => "shim",
        }
    }
}

fn sh(cmd: &str) -> Result<Output> {
    let mut c = Command::new("sh");
    c.args(["-c", cmd]);
    run_with_timeout(c, Duration::from_secs(60))
}

/// A network namespace made for the node, deleted on drop.
pub struct Netns {
    name: String,
    pub path: PathBuf,
}

impl Netns {
    fn new(name: &str) -> Result<Self> {
        let _ = sh(&format!("ip netns del {name} 2>/dev/null"));
        for cmd in [
            format!("ip netns add {name}"),
            format!("ip -n {name} link set lo up"),
        ] {
            let o = sh(&cmd)?;
            ensure!(o.status.success(), "`{cmd}` failed: {}", text(&o));
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

/// The CRI clients.
#[derive(Clone)]
pub struct Cri {
    pub runtime: RuntimeServiceClient<Channel>,
    pub images: ImageServiceClient<Channel>,
}

impl Cri {
    async fn connect(sock: &Path) -> Result<Self> {
        let path = sock.to_path_buf();
        let channel = tonic::transport::Endpoint::try_from("http://[::]:0")?
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await
            .with_context(|| format!("connecting to {}", sock.display()))?;
        Ok(Self {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }
}

/// A CRI call with a deadline; its status names the call.
pub async fn call<T>(
    what: &str,
    limit: Duration,
    f: impl std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T> {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => bail!("{what}: {:?}: {}", s.code(), s.message()),
        Err(_) => bail!("{what}: no answer within {limit:?}"),
    }
}

pub struct Node {
    pub dir: tempfile::TempDir,
    pub sandboxer: Sandboxer,
    pub sock: PathBuf,
    pub cri: Cri,
    pub capsule_config: PathBuf,
    /// capsule's state_dir.
    pub state_dir: PathBuf,
    pub ready: &'static Ready,
    pub containerd: Containerd,
    ipam_dir: PathBuf,
    child: Option<Child>,
    sockets_before: Vec<PathBuf>,
    cni_results_before: Vec<String>,
    // Dropped last: containerd must be gone first.
    _netns: Netns,
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
    pub async fn start(sandboxer: Sandboxer) -> Result<Node> {
        let ready = capsule_tests::require_ready();
        let containerd = Containerd::find(ContainerdVersion::V2_1)?;
        // Short paths: capsule's sockets live in <state_dir>/sandboxes/<64
        // hex digits of CRI's id>/vm/, and a unix socket path has 107 bytes.
        let dir = tempfile::Builder::new().prefix("csb").tempdir_in("/tmp")?;
        let d = dir.path().to_path_buf();
        for sub in ["bin", "logs", "cni/net.d", "cni/ipam"] {
            std::fs::create_dir_all(d.join(sub))?;
        }
        std::os::unix::fs::symlink(&ready.shim, d.join("bin/containerd-shim-capsule-v2"))?;
        let netns = Netns::new(&format!(
            "capsbx-{}-{}",
            sandboxer.as_str(),
            std::process::id()
        ))?;
        let capsule_config = d.join("capsule.toml");
        let state_dir = d.join("r");
        write_capsule_config(&capsule_config, &state_dir, ready)?;
        let ipam_dir = d.join("cni/ipam");
        write_cni_config(&d.join("cni/net.d"), &ipam_dir)?;
        std::fs::write(
            d.join("containerd.toml"),
            containerd_config(&d, sandboxer, &capsule_config),
        )?;
        let sockets_before = dead_shim_sockets();
        let cni_results_before = cni_results();
        let child = spawn_containerd(&d, &netns, &containerd, sandboxer, &capsule_config)?;
        let sock = d.join("containerd.sock");
        let mut child = Some(child);
        let connected = async {
            wait_for("containerd's socket", Duration::from_secs(60), || {
                std::os::unix::net::UnixStream::connect(&sock).ok()
            })?;
            Cri::connect(&sock).await
        }
        .await;
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
            dir,
            sandboxer,
            sock,
            cri,
            capsule_config,
            state_dir,
            ready,
            containerd,
            ipam_dir,
            child,
            sockets_before,
            cni_results_before,
            _netns: netns,
        };
        node.wait_cri_ready().await?;
        node.import_images().await?;
        Ok(node)
    }

    async fn wait_cri_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = String::new();
        while Instant::now() < deadline {
            let mut rt = self.cri.runtime.clone();
            match call(
                "Status",
                Duration::from_secs(10),
                rt.status(k8s_cri::v1::StatusRequest::default()),
            )
            .await
            {
                Ok(s) => {
                    let conds = s.status.map(|s| s.conditions).unwrap_or_default();
                    if conds.len() >= 2 && conds.iter().all(|c| c.status) {
                        return Ok(());
                    }
                    last = format!("{conds:?}");
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        bail!(
            "the CRI plugin did not report ready: {last}\n{}",
            self.log_tail()
        )
    }

    async fn import_images(&self) -> Result<()> {
        let tar = build_images(self.dir.path(), self.ready)?;
        let o = self.ctr(&["images", "import", &tar.display().to_string()])?;
        ensure!(o.status.success(), "importing the images: {}", text(&o));
        for img in [BUSYBOX, PAUSE] {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let mut is = self.cri.images.clone();
                let st = call(
                    "ImageStatus",
                    Duration::from_secs(10),
                    is.image_status(k8s_cri::v1::ImageStatusRequest {
                        image: Some(k8s_cri::v1::ImageSpec {
                            image: img.into(),
                            ..Default::default()
                        }),
                        verbose: false,
                    }),
                )
                .await?;
                if st.image.is_some() {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "the CRI image service does not know {img}\n{}",
                    self.log_tail()
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        Ok(())
    }

    /// `ctr --namespace k8s.io ARGS` against this node, in its netns.
    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self._netns.path.display()))
            .arg(&self.containerd.ctr)
            .arg("--address")
            .arg(&self.sock)
            .args(["--namespace", "k8s.io"])
            .args(args);
        run_with_timeout(c, Duration::from_secs(120))
    }

    /// capsule sandboxes with a state directory.
    pub fn capsule_sandboxes(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.state_dir.join("sandboxes"))
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().to_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// (pid, argv) of processes whose argv[0] base name satisfies `want`
    /// and whose arguments name this node's directory.
    pub fn processes_named(&self, want: impl Fn(&str) -> bool) -> Vec<(u32, Vec<String>)> {
        let needle = self.dir.path().display().to_string();
        processes()
            .into_iter()
            .filter(|(_, args)| {
                let base = args
                    .first()
                    .and_then(|a| Path::new(a).file_name())
                    .map(|b| b.to_string_lossy().into_owned())
                    .unwrap_or_default();
                want(&base) && args.iter().any(|a| a.contains(&needle))
            })
            .collect()
    }

    pub fn qemu_processes(&self) -> Vec<(u32, Vec<String>)> {
        self.processes_named(|b| b.starts_with("qemu-system"))
    }

    /// capsule shims started by this node's containerd.
    pub fn shim_processes(&self) -> Vec<(u32, Vec<String>)> {
        self.processes_named(|b| b.contains("containerd-shim-capsule"))
    }

    /// containerd's state directory for `plugin` (e.g. the task runtime's
    /// bundles), namespace k8s.io.
    pub fn containerd_state(&self, plugin: &str) -> PathBuf {
        self.dir.path().join("state").join(plugin).join("k8s.io")
    }

    /// Everything a removed pod must not leave: QEMU, virtiofsd and shim
    /// processes, mounts under the node's directory, capsule state, bundles,
    /// dead shim sockets, CNI leases and cached results.
    pub fn leftovers(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (pid, args) in
            self.processes_named(|b| b.starts_with("qemu-system") || b.contains("virtiofsd"))
        {
            out.push(format!("process {pid}: {}", args.join(" ")));
        }
        for (pid, args) in self.shim_processes() {
            out.push(format!("shim {pid}: {}", args.join(" ")));
        }
        for m in mounts_under(self.dir.path()) {
            out.push(format!("mount {}", m.display()));
        }
        for s in self.capsule_sandboxes() {
            out.push(format!("capsule state of sandbox {s}"));
        }
        for plugin in [
            "io.containerd.runtime.v2.task",
            "io.containerd.sandbox.controller.v1.shim",
        ] {
            let dir = self.containerd_state(plugin);
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                out.push(format!("bundle {}", e.path().display()));
            }
        }
        for s in dead_shim_sockets() {
            if !self.sockets_before.contains(&s) {
                out.push(format!("dead shim socket {}", s.display()));
            }
        }
        let leases = std::fs::read_dir(self.ipam_dir.join(CNI_NETWORK))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(String::from))
            .filter(|n| n.parse::<std::net::IpAddr>().is_ok());
        out.extend(leases.map(|l| format!("IPAM lease {l}")));
        for r in cni_results() {
            if !self.cni_results_before.contains(&r) {
                out.push(format!("CNI result cache {CNI_RESULTS}/{r}"));
            }
        }
        out
    }

    /// Waits until [`leftovers`](Self::leftovers) is empty.
    pub fn wait_clean(&self, timeout: Duration) -> Result<()> {
        let mut last = Vec::new();
        wait_for("nothing left of the pod", timeout, || {
            last = self.leftovers();
            last.is_empty().then_some(())
        })
        .with_context(|| format!("leftovers: {last:#?}\n{}", self.log_tail()))
    }

    /// The containerd log (the shims log into it too).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// containerd error lines about capsule or its shim.
    pub fn log_errors(&self) -> Vec<String> {
        error_lines(&self.log(), &[])
    }

    pub fn log_tail(&self) -> String {
        log_tail(self.dir.path())
    }
}

fn log_tail(dir: &Path) -> String {
    let s = std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default();
    let lines: Vec<&str> = s.lines().rev().take(60).collect();
    format!(
        "containerd log (last lines):\n{}",
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}

/// containerd's configuration. The capsule handler names capsule's
/// configuration in its options with `podsandbox`; with `shim` it has no
/// options, as CRI then creates the tasks with
/// `WithTaskAPIEndpoint`, which works only on runc's option type
/// (containerd fails "can't unmarshal type runtimeoptions.v1.Options to
/// output containerd.runc.v1.Options"): the shim reads `$CAPSULE_CONFIG`.
fn containerd_config(d: &Path, sandboxer: Sandboxer, capsule_config: &Path) -> String {
    let images = r#"plugins."io.containerd.cri.v1.images""#;
    let rt = r#"plugins."io.containerd.cri.v1.runtime""#;
    let options = match sandboxer {
        Sandboxer::PodSandbox => format!(
            "      [{rt}.containerd.runtimes.{HANDLER}.options]\n        ConfigPath = \"{}\"\n",
            capsule_config.display()
        ),
        Sandboxer::Shim => String::new(),
    };
    format!(
        r#"version = 3
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.internal.v1.opt", "io.containerd.tracing.processor.v1.otlp", "io.containerd.nri.v1.nri"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  address = "{d}/debug.sock"
  level = "debug"
[metrics]
  address = ""
[{images}]
  snapshotter = "overlayfs"
  [{images}.pinned_images]
    sandbox = "{PAUSE}"
[{rt}]
  disable_apparmor = true
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [{rt}.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "{d}/cni/net.d"
    max_conf_num = 1
  [{rt}.containerd]
    default_runtime_name = "{HANDLER}"
    [{rt}.containerd.runtimes.{HANDLER}]
      runtime_type = "io.containerd.capsule.v2"
      sandboxer = "{sandboxer}"
{options}[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"#,
        d = d.display(),
        sandboxer = sandboxer.as_str(),
    )
}

fn spawn_containerd(
    d: &Path,
    netns: &Netns,
    containerd: &Containerd,
    sandboxer: Sandboxer,
    capsule_config: &Path,
) -> Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(d.join("containerd.log"))?;
    let mut path = vec![d.join("bin")];
    if let Some(bin) = containerd.containerd.parent() {
        path.push(bin.to_path_buf());
    }
    path.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.path.display()))
        .arg(&containerd.containerd)
        .arg("--config")
        .arg(d.join("containerd.toml"))
        .env("PATH", std::env::join_paths(path)?);
    match sandboxer {
        Sandboxer::PodSandbox => cmd.env_remove("CAPSULE_CONFIG"),
        Sandboxer::Shim => cmd.env("CAPSULE_CONFIG", capsule_config),
    };
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", containerd.containerd.display()))
}

fn write_capsule_config(path: &Path, state_dir: &Path, ready: &Ready) -> Result<()> {
    let text = format!(
        r#"state_dir = "{state}"
log_level = "debug"
block_device_driver = "virtio-scsi"

[hypervisor]
kernel = "{kernel}"
initramfs = "{initramfs}"
accel = "tcg"
memory_mib = 256

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
            "bridge": "capsbx0",
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": "10.98.0.0/24"}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": ipam_dir,
            }
        }]
    });
    std::fs::write(
        conf_dir.join("10-capsbx.conflist"),
        serde_json::to_vec_pretty(&conf)?,
    )?;
    Ok(())
}

fn sha256(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum").arg(path).output()?;
    let s = String::from_utf8_lossy(&out.stdout);
    s.split_whitespace()
        .next()
        .map(String::from)
        .ok_or_else(|| anyhow!("sha256sum {}: no output", path.display()))
}

fn blob(layout: &Path, bytes: &[u8]) -> Result<(String, u64)> {
    let tmp = layout.join("blob.tmp");
    std::fs::write(&tmp, bytes)?;
    let d = sha256(&tmp)?;
    std::fs::rename(&tmp, layout.join("blobs/sha256").join(&d))?;
    Ok((format!("sha256:{d}"), bytes.len() as u64))
}

/// One OCI layout tarball with the busybox image (`sh`) and a pause image
/// (`sleep infinity`), sharing the harness's busybox layer.
fn build_images(dir: &Path, ready: &Ready) -> Result<PathBuf> {
    let out = dir.join("image");
    let layout = out.join("layout");
    std::fs::create_dir_all(layout.join("blobs/sha256"))?;
    let layer = out.join("layer.tar");
    let o = run_with_timeout(
        {
            let mut c = Command::new("tar");
            c.args([
                "--sort=name",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "-C",
            ])
            .arg(&ready.rootfs_dir)
            .arg("-cf")
            .arg(&layer)
            .arg(".");
            c
        },
        Duration::from_secs(60),
    )?;
    ensure!(o.status.success(), "tar of the layer: {}", text(&o));
    let (layer_digest, layer_size) = blob(&layout, &std::fs::read(&layer)?)?;
    let mut manifests = Vec::new();
    for (name, config) in [
        (
            BUSYBOX,
            serde_json::json!({"Env": ["PATH=/bin"], "Cmd": ["sh"], "WorkingDir": "/"}),
        ),
        (
            PAUSE,
            serde_json::json!({"Env": ["PATH=/bin"], "Entrypoint": ["/bin/sleep", "infinity"], "WorkingDir": "/"}),
        ),
    ] {
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        });
        let (config_digest, config_size) = blob(&layout, &serde_json::to_vec(&config)?)?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size}],
        });
        let (digest, size) = blob(&layout, &serde_json::to_vec(&manifest)?)?;
        manifests.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": name},
        }));
    }
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": manifests}))?,
    )?;
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let tarball = out.join("images.tar");
    let o = run_with_timeout(
        {
            let mut c = Command::new("tar");
            c.arg("-C").arg(&layout).arg("-cf").arg(&tarball).args([
                "oci-layout",
                "index.json",
                "blobs",
            ]);
            c
        },
        Duration::from_secs(60),
    )?;
    ensure!(o.status.success(), "tar of the images: {}", text(&o));
    Ok(tarball)
}

impl Drop for Node {
    fn drop(&mut self) {
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
        // What a failed test left: capsule's own cleanup, then by force.
        for s in self.capsule_sandboxes() {
            let mut c = Command::new(&self.ready.capsule);
            c.arg("--config")
                .arg(&self.capsule_config)
                .args(["cleanup", &s, "--force"]);
            let _ = run_with_timeout(c, Duration::from_secs(60));
        }
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain kill(2) of our own child.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for (pid, _) in self
            .processes_named(|b| b.starts_with("qemu-system") || b.contains("virtiofsd"))
            .into_iter()
            .chain(self.shim_processes())
        {
            capsule_tests::sigkill(pid);
        }
        for m in mounts_under(self.dir.path()) {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
        for r in cni_results() {
            if !self.cni_results_before.contains(&r) {
                let _ = std::fs::remove_file(Path::new(CNI_RESULTS).join(r));
            }
        }
    }
}
