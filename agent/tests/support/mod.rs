//! Test support: boot the real guest (kernel + initramfs with the static
//! agent as /init) through `capsule-hypervisor` with virtio-serial and a
//! virtio-fs share, connect the host client, create containers from a
//! busybox rootfs.
//!
//! Reusable by other tests (device hotplug): [`Vm::boot`] (async) with
//! [`VmOptions::coldplug`] for devices cold-plugged through the device
//! manager, [`Vm::blk`] / [`Vm::scsi`] (device managers over the running
//! VM) for hotplug, [`agent_device`] to turn a manager's result into the
//! agent's `Device`, [`Vm::connect`], [`create_sandbox`],
//! [`Vm::busybox_container`] / [`create_container`], [`run`], [`run_as`].
//!
//! QEMU is launched only by the hypervisor crate (see [`qemu`]).
#![allow(dead_code)]

pub mod net;
pub mod qemu;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use capsule_agent_protocol::agent::*;
use capsule_agent_protocol::client::{AgentConn, ClientError, ConnOptions};
use serde_json::json;

pub use qemu::{Vm, VmOptions};

/// The virtio-fs tag and the guest mount point of the sandbox share.
pub const SHARE_TAG: &str = "capsule-shared";
pub const SHARE_GUEST: &str = "/run/capsule/shared";

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The directory of the guest images the tests boot: `$CAPSULE_GUEST_OUT`,
/// else `target/guest` (the capsule kernel; `target/guest/debian` holds the
/// Debian-kernel fallback).
pub fn guest_dir() -> PathBuf {
    std::env::var_os("CAPSULE_GUEST_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/guest"))
}

/// Kernel and initramfs with the current agent. Runs `agent/build-static.sh`
/// once per test binary (incremental: about a second when nothing changed;
/// it builds both kernels' images under `target/guest`), unless
/// `CAPSULE_TEST_NO_BUILD=1`, in which case the images must exist.
pub fn guest_images() -> (PathBuf, PathBuf) {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let ws = workspace();
    let kernel = guest_dir().join("vmlinuz");
    let initrd = guest_dir().join("initramfs.img");
    let r = BUILT.get_or_init(|| {
        if std::env::var("CAPSULE_TEST_NO_BUILD").as_deref() == Ok("1") {
            return Ok(());
        }
        let out = Command::new(ws.join("agent/build-static.sh"))
            .current_dir(&ws)
            .env_remove("CAPSULE_GUEST_OUT")
            .output()
            .map_err(|e| format!("running agent/build-static.sh: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "agent/build-static.sh failed ({}):\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    });
    if let Err(e) = r {
        panic!("cannot build the guest image: {e}\n(build it with `agent/build-static.sh`, or `make guest` + the script)");
    }
    for p in [&kernel, &initrd] {
        assert!(
            p.exists(),
            "{} is missing: run `make guest` and `agent/build-static.sh` (it packs the agent as /init)",
            p.display()
        );
    }
    (kernel, initrd)
}

/// One VM at a time per test binary: TCG is CPU hungry on a small box.
pub fn vm_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Makes `dir` a minimal busybox root (static busybox from the host).
pub fn busybox_rootfs(dir: &Path) {
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "root"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    let bb = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("static busybox on the host");
    std::fs::copy(bb, dir.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "echo", "cat", "sleep", "ls", "true", "false", "id", "hostname", "ps", "kill",
        "stty", "tty", "env", "pwd", "head", "wc", "yes", "mkdir", "test", "uname", "grep", "stat",
        "dd", "sync", "tr", "usleep", "od", "cut", "seq", "top", "readlink",
    ] {
        let _ = std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet));
    }
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )
    .unwrap();
    std::fs::write(dir.join("etc/group"), "root:x:0:\nnobody:x:65534:\n").unwrap();
}

/// An OCI process for `args`.
pub fn process(args: &[&str], terminal: bool) -> serde_json::Value {
    json!({
        "terminal": terminal,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/bin", "HOME=/root", "TERM=xterm"],
        "cwd": "/",
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": true
    })
}

/// A containerd-like OCI spec (namespaces, mounts, masked paths).
pub fn spec(args: &[&str], terminal: bool, hostname: &str) -> serde_json::Value {
    json!({
        "ociVersion": "1.1.0",
        "process": process(args, terminal),
        "root": {"path": "rootfs", "readonly": false},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}],
            "resources": {"memory": {"limit": 268435456}, "pids": {"limit": 200}},
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

pub fn opts() -> ConnOptions {
    ConnOptions {
        connect_timeout: Duration::from_secs(120),
        call_timeout: Duration::from_secs(90),
    }
}

/// CreateSandbox with the virtio-fs share at [`SHARE_GUEST`].
pub async fn create_sandbox(conn: &AgentConn, hostname: &str) -> Result<(), ClientError> {
    let mut st = Storage::new();
    st.driver = "virtiofs".into();
    st.source = SHARE_TAG.into();
    st.mount_point = SHARE_GUEST.into();
    let mut req = CreateSandboxRequest::new();
    req.sandbox_id = "sb1".into();
    req.hostname = hostname.into();
    req.storages.push(st);
    conn.create_sandbox(&req).await.map(|_| ())
}

/// CreateContainer `cid` with `rootfs` relative to the share and `spec`.
pub async fn create_container(
    conn: &AgentConn,
    cid: &str,
    rootfs: &str,
    spec: &serde_json::Value,
    devices: Vec<Device>,
    stdin: bool,
) -> Result<(), ClientError> {
    let mut req = CreateContainerRequest::new();
    req.container_id = cid.into();
    req.oci_spec = serde_json::to_vec(spec).unwrap();
    req.rootfs = rootfs.into();
    req.devices = devices;
    req.stdin = stdin;
    conn.create_container(&req).await.map(|_| ())
}

pub fn creq(cid: &str) -> ContainerRequest {
    let mut r = ContainerRequest::new();
    r.container_id = cid.into();
    r
}

pub fn preq(cid: &str, exec_id: &str) -> ProcessRequest {
    let mut r = ProcessRequest::new();
    r.container_id = cid.into();
    r.exec_id = exec_id.into();
    r
}

/// Reads stdout (or stderr) until end of stream.
pub async fn read_all(conn: &AgentConn, cid: &str, exec_id: &str, stderr: bool) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut r = ReadStreamRequest::new();
        r.container_id = cid.into();
        r.exec_id = exec_id.into();
        r.len = 65536;
        let chunk = if stderr {
            conn.read_stderr(&r).await
        } else {
            conn.read_stdout(&r).await
        }
        .expect("read stream");
        if chunk.data.is_empty() {
            return out;
        }
        out.extend(chunk.data);
    }
}

pub async fn exec(
    conn: &AgentConn,
    cid: &str,
    exec_id: &str,
    args: &[&str],
    terminal: bool,
    stdin: bool,
) -> Result<u32, ClientError> {
    let mut r = ExecProcessRequest::new();
    r.container_id = cid.into();
    r.exec_id = exec_id.into();
    r.process = serde_json::to_vec(&process(args, terminal)).unwrap();
    r.stdin = stdin;
    conn.exec_process(&r).await.map(|r| r.pid)
}

pub async fn wait(conn: &AgentConn, cid: &str, exec_id: &str) -> i32 {
    conn.wait_process(&preq(cid, exec_id))
        .await
        .expect("wait")
        .status
}

/// Execs `args` as `uid:gid` (with `groups`), returns (status, stdout, stderr).
pub async fn run_as(
    conn: &AgentConn,
    cid: &str,
    exec_id: &str,
    (uid, gid, groups): (u32, u32, &[u32]),
    args: &[&str],
) -> (i32, String, String) {
    let mut p = process(args, false);
    p["user"] = json!({"uid": uid, "gid": gid, "additionalGids": groups});
    let mut r = ExecProcessRequest::new();
    r.container_id = cid.into();
    r.exec_id = exec_id.into();
    r.process = serde_json::to_vec(&p).unwrap();
    conn.exec_process(&r)
        .await
        .unwrap_or_else(|e| panic!("exec {exec_id} in {cid}: {e}"));
    let (out, err) = tokio::join!(
        read_all(conn, cid, exec_id, false),
        read_all(conn, cid, exec_id, true)
    );
    let st = wait(conn, cid, exec_id).await;
    (
        st,
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

/// What the agent needs to find a device the manager attached (`kind` at
/// `addr`, known to QEMU as `id`) and make its node for `info`: the same
/// translation the shim does.
pub fn agent_device(
    id: &str,
    kind: &capsule_devmgr::DeviceKind,
    addr: &capsule_devmgr::GuestAddress,
    info: &capsule_devmgr::DeviceInfo,
) -> Device {
    use capsule_devmgr::device::VhostUserKind;
    use capsule_devmgr::{DeviceKind as K, GuestAddress as A};
    let (k, address) = match (kind, addr) {
        (K::Generic, _) => (DeviceKind::DEVICE_KIND_GENERIC, String::new()),
        (K::Block, A::Pci(p)) => (DeviceKind::DEVICE_KIND_BLK_PCI, p.to_string()),
        (K::Block, A::Scsi(a)) => (DeviceKind::DEVICE_KIND_SCSI, a.to_string()),
        (K::Block | K::Pmem, A::Pmem(n)) => (DeviceKind::DEVICE_KIND_PMEM, n.to_string()),
        (
            K::VhostUser {
                vhost: VhostUserKind::Blk,
                ..
            },
            A::Pci(p),
        ) => (DeviceKind::DEVICE_KIND_VHOST_USER_BLK, p.to_string()),
        (K::Vfio(_), A::Vfio(paths)) => (
            DeviceKind::DEVICE_KIND_VFIO,
            paths
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        ),
        (k, a) => panic!("device {id}: a {} device at {a:?}", k.name()),
    };
    let mut d = Device::new();
    d.id = id.into();
    d.kind = k.into();
    d.guest_address = address;
    d.container_path = info.container_path.display().to_string();
    d.dev_type = info.dev_type.to_string();
    d.file_mode = info.file_mode.unwrap_or(0);
    d.uid = info.uid.unwrap_or(0);
    d.gid = info.gid.unwrap_or(0);
    d.read_only = info.read_only;
    d.cgroup_access = info.cgroup_access.clone();
    d.host_major = i64::from(info.major);
    d.host_minor = i64::from(info.minor);
    d
}

/// Execs `args`, returns (status, stdout, stderr).
pub async fn run(
    conn: &AgentConn,
    cid: &str,
    exec_id: &str,
    args: &[&str],
) -> (i32, String, String) {
    exec(conn, cid, exec_id, args, false, false)
        .await
        .expect("exec");
    let (out, err) = tokio::join!(
        read_all(conn, cid, exec_id, false),
        read_all(conn, cid, exec_id, true)
    );
    let st = wait(conn, cid, exec_id).await;
    (
        st,
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

pub async fn signal(
    conn: &AgentConn,
    cid: &str,
    exec_id: &str,
    sig: u32,
    all: bool,
) -> Result<(), ClientError> {
    let mut r = SignalProcessRequest::new();
    r.container_id = cid.into();
    r.exec_id = exec_id.into();
    r.signal = sig;
    r.all = all;
    conn.signal_process(&r).await.map(|_| ())
}

pub async fn remove(conn: &AgentConn, cid: &str) -> Result<(), ClientError> {
    let mut r = RemoveContainerRequest::new();
    r.container_id = cid.into();
    r.timeout = 10;
    conn.remove_container(&r).await.map(|_| ())
}

impl Vm {
    /// Waits until the agent answers Health (boot under TCG takes seconds).
    pub async fn connect(&self) -> AgentConn {
        match AgentConn::wait_ready(&self.agent_socket, opts(), Duration::from_secs(180)).await {
            Ok(c) => c,
            Err(e) => panic!("agent not ready: {e}\n--- console ---\n{}", self.console()),
        }
    }

    /// Puts a busybox rootfs at `<share>/<cid>/rootfs`; returns the rootfs
    /// path relative to the share (what CreateContainer takes).
    pub fn busybox_rootfs(&self, cid: &str) -> String {
        let rel = format!("{cid}/rootfs");
        busybox_rootfs(&self.shared_dir.join(&rel));
        rel
    }

    /// CreateContainer + StartContainer of a busybox container running `args`.
    pub async fn busybox_container(
        &self,
        conn: &AgentConn,
        cid: &str,
        args: &[&str],
        terminal: bool,
    ) -> u32 {
        let rootfs = self.busybox_rootfs(cid);
        create_container(
            conn,
            cid,
            &rootfs,
            &spec(args, terminal, cid),
            vec![],
            false,
        )
        .await
        .unwrap_or_else(|e| panic!("create {cid}: {e}\n--- console ---\n{}", self.console()));
        conn.start_container(&creq(cid))
            .await
            .unwrap_or_else(|e| panic!("start {cid}: {e}"))
            .pid
    }
}

/// An ext4 image of `size_mb` populated from `from` (mkfs.ext4 -d).
pub fn ext4_image(from: &Path, image: &Path, size_mb: u64) {
    let f = std::fs::File::create(image).unwrap();
    f.set_len(size_mb << 20).unwrap();
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(from)
        .arg(image)
        .output()
        .expect("mkfs.ext4 (e2fsprogs)");
    assert!(
        out.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
