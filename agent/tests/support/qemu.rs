//! Raw QEMU + virtiofsd launching for the agent tests (the only place that
//! knows the command line; swap for capsule-hypervisor when it cold-plugs
//! virtio-fs).
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct VmOptions {
    pub memory_mb: u64,
    /// Extra QEMU arguments (cold-plugged devices, ...).
    pub extra_args: Vec<String>,
    /// Extra kernel command line words.
    pub cmdline: String,
}

impl Default for VmOptions {
    fn default() -> Self {
        Self {
            memory_mb: 512,
            extra_args: Vec::new(),
            cmdline: String::new(),
        }
    }
}

pub struct Vm {
    qemu: Child,
    virtiofsd: Child,
    _dir: tempfile::TempDir,
    /// QEMU's chardev socket for `agent.channel.0`.
    pub agent_socket: PathBuf,
    /// QMP socket (`-qmp unix:...,server=on,wait=off`).
    pub qmp_socket: PathBuf,
    /// Host directory shared as virtio-fs tag `capsule-shared`.
    pub shared_dir: PathBuf,
    pub console_log: PathBuf,
    pub run_dir: PathBuf,
}

fn virtiofsd() -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    for p in [
        PathBuf::from(&home).join(".cargo/bin/virtiofsd"),
        PathBuf::from("/usr/libexec/virtiofsd"),
        PathBuf::from("/usr/bin/virtiofsd"),
    ] {
        if p.exists() {
            return p;
        }
    }
    panic!("virtiofsd not found (~/.cargo/bin/virtiofsd, /usr/libexec/virtiofsd): run scripts/install-deps.sh");
}

fn wait_for(path: &Path, timeout: Duration, what: &str) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < timeout,
            "{what}: {} did not appear within {timeout:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Vm {
    pub fn boot(opts: VmOptions) -> Vm {
        let (kernel, initrd) = super::guest_images();
        let dir = tempfile::Builder::new()
            .prefix("capsule-agent-vm")
            .tempdir()
            .expect("tempdir");
        let run = dir.path().to_path_buf();
        let shared = run.join("shared");
        std::fs::create_dir_all(&shared).unwrap();
        let vfs_sock = run.join("vfs.sock");
        let agent_socket = run.join("agent.sock");
        let qmp_socket = run.join("qmp.sock");
        let console_log = run.join("console.log");
        let virtiofsd = Command::new(virtiofsd())
            .arg(format!("--socket-path={}", vfs_sock.display()))
            .arg(format!("--shared-dir={}", shared.display()))
            .args(["--sandbox=none", "--cache=never"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(run.join("virtiofsd.log")).unwrap())
            .spawn()
            .expect("start virtiofsd");
        wait_for(&vfs_sock, Duration::from_secs(10), "virtiofsd socket");
        let accel = std::env::var("CAPSULE_TEST_ACCEL").unwrap_or_else(|_| "tcg".into());
        let mem = opts.memory_mb;
        let mut args: Vec<String> = [
            "-accel",
            &accel,
            "-m",
            &format!("{mem}M"),
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            &kernel.display().to_string(),
            "-initrd",
            &initrd.display().to_string(),
            "-append",
            &format!("console=ttyS0 panic=-1 quiet {}", opts.cmdline),
            "-serial",
            &format!("file:{}", console_log.display()),
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
            "-machine",
            "pc,memory-backend=mem",
            "-device",
            "virtio-rng-pci",
            "-device",
            "virtio-serial-pci,id=vser0",
            "-chardev",
            &format!(
                "socket,id=agent0,path={},server=on,wait=off",
                agent_socket.display()
            ),
            "-device",
            "virtserialport,bus=vser0.0,chardev=agent0,name=agent.channel.0",
            "-chardev",
            &format!("socket,id=vfs,path={}", vfs_sock.display()),
            "-device",
            "vhost-user-fs-pci,chardev=vfs,tag=capsule-shared",
            "-qmp",
            &format!("unix:{},server=on,wait=off", qmp_socket.display()),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(opts.extra_args);
        let qemu = Command::new("qemu-system-x86_64")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(run.join("qemu.log")).unwrap())
            .spawn()
            .expect("start qemu-system-x86_64");
        Vm {
            qemu,
            virtiofsd,
            _dir: dir,
            agent_socket,
            qmp_socket,
            shared_dir: shared,
            console_log,
            run_dir: run,
        }
    }

    pub fn console(&self) -> String {
        let mut s = std::fs::read_to_string(&self.console_log).unwrap_or_default();
        if let Ok(q) = std::fs::read_to_string(self.run_dir.join("qemu.log")) {
            if !q.is_empty() {
                s.push_str("\n--- qemu stderr ---\n");
                s.push_str(&q);
            }
        }
        s
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        let _ = self.virtiofsd.kill();
        let _ = self.virtiofsd.wait();
        if std::env::var("CAPSULE_TEST_KEEP").is_ok() {
            let keep = std::env::temp_dir()
                .join(format!("capsule-agent-console-{}.log", std::process::id()));
            let _ = std::fs::copy(&self.console_log, &keep);
        }
    }
}
