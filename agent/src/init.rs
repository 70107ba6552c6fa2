//! PID 1 duties: filesystems, console, kernel modules, cgroups, loopback,
//! and never exiting (PID 1 dying panics the kernel).
use std::collections::HashMap;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};

/// True when the agent should act as the guest's init: PID 1 and not
/// disabled with `CAPSULE_AGENT_NO_INIT=1` (host tests).
pub fn is_init() -> bool {
    std::process::id() == 1 && std::env::var("CAPSULE_AGENT_NO_INIT").as_deref() != Ok("1")
}

/// Mounts the guest's base filesystems. Runs before logging is set up, so
/// failures go to the console directly. Already-mounted is fine.
pub fn mount_base() {
    let nosuid = MsFlags::MS_NOSUID;
    let nodev = MsFlags::MS_NODEV;
    let noexec = MsFlags::MS_NOEXEC;
    let table: &[(&str, &str, &str, MsFlags, &str)] = &[
        ("proc", "/proc", "proc", nosuid | nodev | noexec, ""),
        ("sysfs", "/sys", "sysfs", nosuid | nodev | noexec, ""),
        ("devtmpfs", "/dev", "devtmpfs", nosuid, "mode=0755"),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            nosuid | noexec,
            "gid=5,mode=0620,ptmxmode=0666",
        ),
        ("shm", "/dev/shm", "tmpfs", nosuid | nodev, "mode=1777"),
        ("tmpfs", "/run", "tmpfs", nosuid | nodev, "mode=0755"),
        ("tmpfs", "/tmp", "tmpfs", nosuid | nodev, "mode=1777"),
        (
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            nosuid | nodev | noexec,
            "nsdelegate",
        ),
    ];
    for (src, dst, fstype, flags, data) in table {
        if let Err(e) = std::fs::create_dir_all(dst) {
            console(&format!("capsule-agent: create {dst}: {e}"));
        }
        let data = (!data.is_empty()).then_some(*data);
        match mount(Some(*src), *dst, Some(*fstype), *flags, data) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(e) => console(&format!(
                "capsule-agent: mount {fstype} on {dst}: {}",
                e.desc()
            )),
        }
    }
}

/// Points stdin at /dev/null and stdout/stderr at /dev/console (ttyS0).
pub fn setup_console() {
    // Logging is not up yet: problems go to the console directly.
    match std::fs::File::open("/dev/null") {
        Ok(null) => {
            if let Err(e) = nix::unistd::dup2_stdin(&null) {
                console(&format!(
                    "capsule-agent: stdin from /dev/null: {}",
                    e.desc()
                ));
            }
        }
        Err(e) => console(&format!("capsule-agent: open /dev/null: {e}")),
    }
    match std::fs::OpenOptions::new().write(true).open("/dev/console") {
        Ok(con) => {
            if let Err(e) =
                nix::unistd::dup2_stdout(&con).and_then(|()| nix::unistd::dup2_stderr(&con))
            {
                console(&format!(
                    "capsule-agent: stdout/stderr to /dev/console: {}",
                    e.desc()
                ));
            }
        }
        Err(e) => console(&format!("capsule-agent: open /dev/console: {e}")),
    }
    std::env::set_var("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
}

/// Writes one line straight to the console (works before and after logging).
pub fn console(msg: &str) {
    if let Ok(mut c) = std::fs::OpenOptions::new().write(true).open("/dev/console") {
        let _ = writeln!(c, "{msg}");
    } else {
        eprintln!("{msg}");
    }
}

/// `name -> path` from `modules.dep` ("kernel/x/y.ko: deps"), with '-' as '_'.
pub fn parse_modules_dep(dep: &str) -> HashMap<String, String> {
    dep.lines()
        .filter_map(|l| {
            let path = l.split(':').next()?.trim();
            let file = Path::new(path).file_name()?.to_str()?;
            let name = file.split(".ko").next()?.replace('-', "_");
            Some((name, path.to_string()))
        })
        .collect()
}

/// Loads the modules listed in `/etc/capsule/modules` (dependencies first,
/// as the image build orders them) with finit_module(2). Logs failures and
/// goes on.
pub fn load_modules() {
    let start = Instant::now();
    let Ok(list) = std::fs::read_to_string("/etc/capsule/modules") else {
        tracing::info!(
            "no /etc/capsule/modules: nothing to load (the kernel has its drivers built in)"
        );
        return;
    };
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let base = Path::new("/lib/modules").join(&release);
    let dep = std::fs::read_to_string(base.join("modules.dep")).unwrap_or_default();
    let paths = parse_modules_dep(&dep);
    let (mut loaded, mut failed) = (0, 0);
    for name in list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let key = name.replace('-', "_");
        let Some(rel) = paths.get(&key) else {
            // Built into the kernel, or missing from the image.
            if !Path::new("/sys/module").join(&key).exists() {
                tracing::warn!(module = name, "not in modules.dep and not built in");
                failed += 1;
            }
            continue;
        };
        match finit_module(&base.join(rel)) {
            Ok(()) => loaded += 1,
            Err(Errno::EEXIST) => {}
            Err(e) => {
                tracing::warn!(module = name, error = e.desc(), "module load failed");
                failed += 1;
            }
        }
    }
    tracing::info!(
        loaded,
        failed,
        ms = start.elapsed().as_millis() as u64,
        "kernel modules"
    );
}

fn finit_module(path: &Path) -> Result<(), Errno> {
    let f = std::fs::File::open(path)
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    nix::kmod::finit_module(&f, c"", nix::kmod::ModuleInitFlags::empty())
}

/// Enables cpu, memory, pids, io in the root cgroup and creates the parent of
/// the per-container groups.
pub fn setup_cgroups() {
    let root = Path::new(crate::paths::CGROUP_ROOT);
    crate::container::cgroup::enable_controllers(root);
    let parent = root.join(crate::paths::CGROUP_PARENT);
    if let Err(e) = std::fs::create_dir_all(&parent) {
        tracing::warn!(error = %e, "cannot create {}", parent.display());
        return;
    }
    crate::container::cgroup::enable_controllers(&parent);
}

/// Brings `lo` up: containers share the VM's network namespace.
pub fn loopback_up() {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let sock = match socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    ) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "loopback: no socket; lo stays down");
            return;
        }
    };
    // SAFETY: an all-zero ifreq is valid (empty name, zero flags).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo".iter().enumerate() {
        req.ifr_name[i] = *b as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of `req`, valid for the call, on an open socket.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "loopback: cannot read lo's flags; lo stays down");
        return;
    }
    // SAFETY: the union member SIOCGIFFLAGS filled in.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads `req`, valid for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "loopback: cannot bring lo up");
    }
}

/// Logs a fatal error on the console and, as PID 1, reaps and sleeps
/// forever instead of exiting (which would panic the kernel).
pub fn fatal(msg: &str) -> ! {
    tracing::error!("FATAL: {msg}");
    console(&format!("capsule-agent: FATAL: {msg}"));
    if std::process::id() != 1 {
        std::process::exit(1);
    }
    loop {
        match nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(-1), None) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

/// The kernel command line (`/proc/cmdline`; empty when unreadable), read
/// once at start for everything the agent takes from it.
pub fn kernel_cmdline() -> String {
    std::fs::read_to_string("/proc/cmdline").unwrap_or_default()
}

/// Log level from `CAPSULE_AGENT_LOG`, else `capsule.log=` on the kernel
/// command line, else info.
pub fn log_filter(cmdline: &str) -> String {
    if let Ok(v) = std::env::var("CAPSULE_AGENT_LOG") {
        return v;
    }
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("capsule.log="))
        .map(str::to_string)
        .unwrap_or_else(|| "info".to_string())
}

/// Benchmark modes, chosen with `capsule.bench=` on the kernel command line
/// and entered after the agent's early init (mounts, console, modules,
/// cgroups, loopback), instead of serving the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchMode {
    /// `ready-poweroff`: write [`BENCH_READY`] to the console and power off
    /// (the bare-QEMU boot baseline).
    ReadyPoweroff,
    /// `count-disks`: write [`BENCH_READY`], then `capsule-bench: disks=N`
    /// whenever the number of disks changes (the bare hotplug baseline).
    CountDisks,
}

/// The console line a benchmark mode writes once early init is done.
pub const BENCH_READY: &str = "capsule-bench: ready";

/// The benchmark mode named on a kernel command line, if any.
pub fn parse_bench_mode(cmdline: &str) -> Option<BenchMode> {
    match cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("capsule.bench="))?
    {
        "ready-poweroff" => Some(BenchMode::ReadyPoweroff),
        "count-disks" => Some(BenchMode::CountDisks),
        other => {
            console(&format!(
                "capsule-agent: unknown capsule.bench={other}; ignored"
            ));
            None
        }
    }
}

/// Runs a benchmark mode; never returns.
pub fn run_bench(mode: BenchMode) -> ! {
    console(BENCH_READY);
    match mode {
        BenchMode::ReadyPoweroff => {
            // SAFETY: sync(2) and reboot(2) take no pointers.
            let r = unsafe {
                libc::sync();
                libc::reboot(libc::RB_POWER_OFF)
            };
            fatal(&format!("power off failed ({r}): {}", Errno::last()))
        }
        BenchMode::CountDisks => count_disks(),
    }
}

/// Disks the guest can use: `/sys/block` entries backed by a device whose
/// `/dev` node exists.
pub fn disk_count(sysfs: &Path, dev: &Path) -> usize {
    let Ok(d) = std::fs::read_dir(sysfs.join("block")) else {
        return 0;
    };
    d.flatten()
        .filter(|e| e.path().join("device").exists() && dev.join(e.file_name()).exists())
        .count()
}

/// Prints the disk count on every change, woken by kernel uevents (and
/// every 10 ms, in case netlink drops some).
fn count_disks() -> ! {
    let sock = crate::device::uevent::open_socket().ok();
    let mut last = None;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = disk_count(Path::new("/sys"), Path::new("/dev"));
        if last != Some(n) {
            console(&format!("capsule-bench: disks={n}"));
            last = Some(n);
        }
        match &sock {
            Some(fd) => {
                let mut fds = [nix::poll::PollFd::new(
                    std::os::fd::AsFd::as_fd(fd),
                    nix::poll::PollFlags::POLLIN,
                )];
                match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(10u8)) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
                while nix::sys::socket::recv(
                    fd.as_raw_fd(),
                    &mut buf,
                    nix::sys::socket::MsgFlags::MSG_DONTWAIT,
                )
                .is_ok_and(|n| n > 0)
                {}
            }
            None => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_dep_names() {
        let dep = "kernel/drivers/virtio/virtio.ko:\nkernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko\nkernel/fs/fuse/virtiofs.ko: kernel/fs/fuse/fuse.ko\nkernel/net/vmw_vsock/vmw-vsock-virtio-transport.ko.xz:\n";
        let m = parse_modules_dep(dep);
        assert_eq!(m["virtio_console"], "kernel/drivers/char/virtio_console.ko");
        assert_eq!(m["virtiofs"], "kernel/fs/fuse/virtiofs.ko");
        assert_eq!(
            m["vmw_vsock_virtio_transport"],
            "kernel/net/vmw_vsock/vmw-vsock-virtio-transport.ko.xz"
        );
        assert_eq!(m.len(), 4);
    }

    #[test]
    fn bench_modes() {
        let m = |c: &str| parse_bench_mode(c);
        assert_eq!(
            m("console=ttyS0 capsule.bench=ready-poweroff quiet"),
            Some(BenchMode::ReadyPoweroff)
        );
        assert_eq!(m("capsule.bench=count-disks"), Some(BenchMode::CountDisks));
        assert_eq!(m("console=ttyS0 panic=-1 quiet"), None);
    }
}
