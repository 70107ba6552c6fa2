//! Tearing a sandbox down from whatever state it left: what `delete` (after a
//! crash, a SIGKILL of the shim at any point, a host reboot) and
//! `capsule cleanup` run, and what a live shim runs on Shutdown or when a
//! Create that started the VM fails.
//!
//! Rules:
//! - a process is signalled only when its pid **and** start time match
//!   what was recorded (a reused pid is never touched), through a pidfd;
//! - processes the record does not know yet (the shim died between spawning
//!   and recording them) are found by their command line: a QEMU or
//!   virtiofsd whose arguments name this sandbox's private directory;
//! - mounts are removed deepest first; the state directory is removed only
//!   when nothing is mounted under it any more (never recurse into a
//!   mounted rootfs);
//! - every step tolerates missing or partial state; errors are collected,
//!   not fatal, so one leftover does not keep the others.
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::state::{self, BundleRecord, ProcRef, SandboxPaths, SandboxRecord};

/// Processes as cleanup sees them (the real `/proc`, or a fake in tests).
pub trait ProcessTable: Send + Sync {
    /// The start time of `pid`, if it exists and is not a zombie.
    fn start_time(&self, pid: u32) -> Option<u64>;
    /// Its command line.
    fn cmdline(&self, pid: u32) -> Option<Vec<String>>;
    /// Every pid.
    fn pids(&self) -> Vec<u32>;
    /// Sends `sig` to `pid` if it still has `start_time`.
    fn signal(&self, pid: u32, start_time: u64, sig: i32) -> std::io::Result<()>;
}

/// The host's processes.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealProcesses;

impl ProcessTable for RealProcesses {
    fn start_time(&self, pid: u32) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let state = stat
            .get(stat.rfind(')')? + 1..)?
            .split_whitespace()
            .next()?;
        if state == "Z" || state == "X" {
            return None;
        }
        capsule_hypervisor::process::parse_stat_start_time(&stat)
    }
    fn cmdline(&self, pid: u32) -> Option<Vec<String>> {
        let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        Some(
            raw.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect(),
        )
    }
    fn pids(&self) -> Vec<u32> {
        std::fs::read_dir("/proc")
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
    fn signal(&self, pid: u32, start_time: u64, sig: i32) -> std::io::Result<()> {
        // Open the pidfd first, then check: a match now pins the process.
        let fd = capsule_hypervisor::process::PidFd::open(pid)?;
        if self.start_time(pid) != Some(start_time) {
            return Ok(());
        }
        match fd.signal(sig) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            r => r,
        }
    }
}

/// What a cleanup did and what it could not do.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub actions: Vec<String>,
    pub errors: Vec<String>,
}

impl Report {
    fn did(&mut self, a: impl Into<String>) {
        let a = a.into();
        tracing::info!(action = %a, "cleanup");
        self.actions.push(a);
    }
    fn failed(&mut self, e: impl Into<String>) {
        let e = e.into();
        tracing::warn!(error = %e, "cleanup");
        self.errors.push(e);
    }
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }
    fn merge(&mut self, o: Report) {
        self.actions.extend(o.actions);
        self.errors.extend(o.errors);
    }
}

/// Timing of process termination (shortened in tests).
#[derive(Debug, Clone, Copy)]
pub struct KillTiming {
    pub term_wait: Duration,
    pub kill_wait: Duration,
    pub poll: Duration,
}

impl Default for KillTiming {
    fn default() -> Self {
        Self {
            term_wait: Duration::from_secs(3),
            kill_wait: Duration::from_secs(3),
            poll: Duration::from_millis(20),
        }
    }
}

async fn wait_gone(procs: &dyn ProcessTable, p: ProcRef, within: Duration, poll: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if procs.start_time(p.pid) != Some(p.start_time) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(poll).await;
    }
}

/// SIGTERM, wait, SIGKILL, wait — only while pid and start time match.
pub async fn stop_process(
    procs: &dyn ProcessTable,
    p: ProcRef,
    name: &str,
    timing: KillTiming,
    report: &mut Report,
) {
    match procs.start_time(p.pid) {
        None => return,
        Some(t) if t != p.start_time => {
            report.did(format!(
                "{name} pid {} now belongs to another process (start time {t}, recorded {}); left alone",
                p.pid, p.start_time
            ));
            return;
        }
        Some(_) => {}
    }
    for (sig, wait) in [
        (libc::SIGTERM, timing.term_wait),
        (libc::SIGKILL, timing.kill_wait),
    ] {
        if let Err(e) = procs.signal(p.pid, p.start_time, sig) {
            report.failed(format!("signalling {name} (pid {}): {e}", p.pid));
        }
        if wait_gone(procs, p, wait, timing.poll).await {
            report.did(format!("stopped {name} (pid {})", p.pid));
            return;
        }
    }
    report.failed(format!("{name} (pid {}) survived SIGKILL", p.pid));
}

/// QEMU and virtiofsd processes whose command line names `dir`.
pub fn find_sandbox_processes(procs: &dyn ProcessTable, dir: &Path) -> Vec<(String, ProcRef)> {
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id();
    let mut found = Vec::new();
    for pid in procs.pids() {
        if pid == me {
            continue;
        }
        let Some(args) = procs.cmdline(pid) else {
            continue;
        };
        let Some(argv0) = args.first() else { continue };
        let base = Path::new(argv0)
            .file_name()
            .map(|b| b.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = if base.starts_with("qemu-system") || base == "qemu-kvm" {
            "QEMU"
        } else if base.contains("virtiofsd") {
            "virtiofsd"
        } else {
            continue;
        };
        // The directory itself or a path inside it, as an argument or in an
        // `opt=path,...` value.
        let names_dir = args.iter().skip(1).any(|a| {
            a.split([',', '=']).any(|part| {
                part == needle
                    || part
                        .strip_prefix(needle.as_str())
                        .is_some_and(|rest| rest.starts_with('/'))
            })
        });
        if !names_dir {
            continue;
        }
        if let Some(start_time) = procs.start_time(pid) {
            found.push((name.to_string(), ProcRef { pid, start_time }));
        }
    }
    found
}

/// Whether the shim owning `paths` still runs: it holds the device state
/// lock for its whole life, and its recorded pid/start time must match a
/// live (non-zombie) process.
pub fn shim_alive(
    paths: &SandboxPaths,
    vm: Option<&SandboxRecord>,
    procs: &dyn ProcessTable,
) -> bool {
    let recorded = vm
        .and_then(|v| v.shim)
        .filter(|s| s.pid != std::process::id())
        .is_some_and(|s| procs.start_time(s.pid) == Some(s.start_time));
    recorded && lock_held(&paths.devices_lock())
}

/// Whether another process holds the flock on `path`.
fn lock_held(path: &Path) -> bool {
    let Ok(f) = std::fs::OpenOptions::new().read(true).open(path) else {
        return false;
    };
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(_unlocked_on_drop) => false,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => true,
        Err(_) => false,
    }
}

/// Tears the sandbox down: QEMU, virtiofsd, mounts (also the rootfs of
/// every listed container's bundle and of `bundles`), sockets, the state
/// directory. Idempotent; tolerant of any partial state.
pub async fn teardown(
    paths: &SandboxPaths,
    bundles: &[PathBuf],
    procs: &dyn ProcessTable,
    timing: KillTiming,
) -> Report {
    let mut report = Report::default();
    let vm = match state::load::<SandboxRecord>(&paths.sandbox_file()) {
        Ok(v) => v,
        Err(e) => {
            report.failed(format!(
                "{e}; finding the sandbox's processes by command line instead"
            ));
            None
        }
    };
    // QEMU first (it holds the vhost-user connection of virtiofsd).
    let recorded: Vec<(String, ProcRef)> = [
        vm.as_ref().and_then(|v| v.qemu.as_ref()).map(|d| {
            (
                "QEMU".to_string(),
                ProcRef {
                    pid: d.pid,
                    start_time: d.start_time,
                },
            )
        }),
        vm.as_ref()
            .and_then(|v| v.virtiofsd)
            .map(|p| ("virtiofsd".to_string(), p)),
    ]
    .into_iter()
    .flatten()
    .collect();
    for (name, p) in &recorded {
        stop_process(procs, *p, name, timing, &mut report).await;
    }
    let mut found = find_sandbox_processes(procs, &paths.dir);
    found.sort_by_key(|(name, _)| name != "QEMU");
    for (name, p) in found {
        stop_process(procs, p, &format!("unrecorded {name}"), timing, &mut report).await;
    }

    // The pod network's plumbing (taps go with QEMU; the pod link's filter
    // and qdisc stay until removed), from devices.json.
    match state::load_devices(paths, vm.as_ref()) {
        Ok(devices) => {
            let (did, failed) = crate::sandbox::network::unplumb_recorded(&devices).await;
            for d in did {
                report.did(d);
            }
            for f in failed {
                report.failed(f);
            }
        }
        Err(e) => report.failed(format!("{e}; the pod network's plumbing (if any) is left")),
    }

    // Mounts: every container's rootfs in its bundle, then the share.
    let mut rootfs: Vec<PathBuf> = vm
        .iter()
        .flat_map(|v| v.containers.values())
        .map(|c| c.bundle.join("rootfs"))
        .chain(bundles.iter().map(|b| b.join("rootfs")))
        .collect();
    rootfs.sort();
    rootfs.dedup();
    for r in rootfs.iter().chain(std::iter::once(&paths.dir)) {
        let before = crate::mount::mounts_under(&crate::mount::mount_points(), r).len();
        let errs = crate::mount::unmount_under(r);
        if before > 0 && errs.is_empty() {
            report.did(format!("unmounted {before} mount(s) under {}", r.display()));
        }
        for e in errs {
            report.failed(e);
        }
    }

    if let Some(addr) = vm.as_ref().and_then(|v| v.shim_address.as_deref()) {
        report.merge(remove_dead_socket_at(addr));
    }
    if !paths.dir.exists() {
        return report;
    }
    let left = crate::mount::mounts_under(&crate::mount::mount_points(), &paths.dir);
    if !left.is_empty() {
        report.failed(format!(
            "not removing {}: still mounted: {}",
            paths.dir.display(),
            left.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        return report;
    }
    match std::fs::remove_dir_all(&paths.dir) {
        Ok(()) => report.did(format!("removed {}", paths.dir.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => report.failed(format!("removing {}: {e}", paths.dir.display())),
    }
    report
}

/// Where a container's sandbox state is, from its bundle.
pub fn locate(bundle: &Path, id: &str) -> (String, PathBuf, Option<PathBuf>) {
    match state::load::<BundleRecord>(&bundle.join(state::BUNDLE_FILE)) {
        Ok(Some(r)) => return (r.sandbox_id, r.state_dir, r.config_path),
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "ignoring the bundle record"),
    }
    // No record (the shim died before Create wrote it, or never got that
    // far): the annotations and the configuration say where it would be.
    let sandbox = std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<oci_spec::runtime::Spec>(&b).ok())
        .map(|s| crate::service::sandbox_id_of(id, &s))
        .unwrap_or_else(|| id.to_string());
    let state_dir = crate::config::Config::load(None)
        .map(|(c, _)| c.state_dir)
        .unwrap_or_else(|_| crate::config::DEFAULT_STATE_DIR.into());
    (sandbox, state_dir, None)
}

/// `containerd-shim-capsule-v2 delete`: cleans up after container `id`
/// whose bundle is `bundle`. While the sandbox's shim still runs (a pod
/// whose other containers live), only this container's own leftovers go;
/// when the shim is gone, the whole sandbox goes.
pub async fn delete_container(
    bundle: &Path,
    id: &str,
    procs: &dyn ProcessTable,
    timing: KillTiming,
) -> Report {
    let mut report = Report::default();
    let (sandbox_id, state_dir, _) = locate(bundle, id);
    let paths = SandboxPaths::new(&state_dir, &sandbox_id);
    if state::check_id("sandbox id", &sandbox_id).is_err() || !paths.dir.is_dir() {
        report.merge(unmount_bundle(bundle));
        report.merge(remove_dead_socket(bundle));
        return report;
    }
    let loaded = state::load::<SandboxRecord>(&paths.sandbox_file());
    let listed = match &loaded {
        Ok(r) => r.as_ref().is_some_and(|r| r.containers.contains_key(id)),
        Err(_) => true,
    };
    let vm = loaded.ok().flatten();
    let mut alive = shim_alive(&paths, vm.as_ref(), procs);
    if alive && listed {
        // containerd calls delete as soon as the shim's connection drops:
        // a killed shim may still be exiting.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while alive && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            alive = shim_alive(&paths, vm.as_ref(), procs);
        }
    }
    if alive {
        if listed {
            report.failed(format!(
                "container {id} is still owned by the running shim of sandbox {sandbox_id}; leaving the sandbox alone"
            ));
        }
        report.merge(unmount_bundle(bundle));
        return report;
    }
    report.merge(teardown(&paths, &[bundle.to_path_buf()], procs, timing).await);
    report.merge(remove_dead_socket(bundle));
    report
}

/// Removes the shim socket named by `bundle/address` when nothing listens
/// on it any more (a killed shim cannot remove it itself).
pub fn remove_dead_socket(bundle: &Path) -> Report {
    match std::fs::read_to_string(bundle.join("address")) {
        Ok(addr) => remove_dead_socket_at(&addr),
        Err(_) => Report::default(),
    }
}

/// Removes the unix socket at `addr` (`unix://` optional) when nothing
/// listens on it.
pub fn remove_dead_socket_at(addr: &str) -> Report {
    use std::os::unix::fs::FileTypeExt;
    let mut report = Report::default();
    let path = Path::new(addr.trim().trim_start_matches("unix://"));
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    if !is_socket {
        return report;
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            match std::fs::remove_file(path) {
                Ok(()) => report.did(format!("removed the dead shim socket {}", path.display())),
                Err(e) => report.failed(format!("removing {}: {e}", path.display())),
            }
        }
        _ => {}
    }
    report
}

fn unmount_bundle(bundle: &Path) -> Report {
    let mut report = Report::default();
    let rootfs = bundle.join("rootfs");
    if crate::mount::mounts_under(&crate::mount::mount_points(), &rootfs).is_empty() {
        return report;
    }
    let errs = crate::mount::unmount_under(&rootfs);
    if errs.is_empty() {
        report.did(format!("unmounted {}", rootfs.display()));
    }
    for e in errs {
        report.failed(e);
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    /// pid -> (start time, argv, ignores SIGTERM).
    type Table = BTreeMap<u32, (u64, Vec<String>, bool)>;

    /// A fake process table: processes die on SIGTERM unless stubborn.
    #[derive(Default)]
    struct Fake {
        procs: Mutex<Table>,
        signals: Mutex<Vec<(u32, i32)>>,
    }

    impl Fake {
        fn add(&self, pid: u32, start: u64, args: &[&str], stubborn: bool) {
            self.procs.lock().unwrap().insert(
                pid,
                (
                    start,
                    args.iter().map(|s| s.to_string()).collect(),
                    stubborn,
                ),
            );
        }
        fn alive(&self, pid: u32) -> bool {
            self.procs.lock().unwrap().contains_key(&pid)
        }
    }

    impl ProcessTable for Fake {
        fn start_time(&self, pid: u32) -> Option<u64> {
            self.procs.lock().unwrap().get(&pid).map(|p| p.0)
        }
        fn cmdline(&self, pid: u32) -> Option<Vec<String>> {
            self.procs.lock().unwrap().get(&pid).map(|p| p.1.clone())
        }
        fn pids(&self) -> Vec<u32> {
            self.procs.lock().unwrap().keys().copied().collect()
        }
        fn signal(&self, pid: u32, start: u64, sig: i32) -> std::io::Result<()> {
            let mut procs = self.procs.lock().unwrap();
            let Some(p) = procs.get(&pid) else {
                return Ok(());
            };
            if p.0 != start {
                return Ok(());
            }
            self.signals.lock().unwrap().push((pid, sig));
            if sig == libc::SIGKILL || !p.2 {
                procs.remove(&pid);
            }
            Ok(())
        }
    }

    fn timing() -> KillTiming {
        KillTiming {
            term_wait: Duration::from_millis(50),
            kill_wait: Duration::from_millis(50),
            poll: Duration::from_millis(5),
        }
    }

    fn sandbox(dir: &Path) -> (SandboxPaths, SandboxRecord) {
        let paths = SandboxPaths::new(dir, "sb1");
        std::fs::create_dir_all(paths.shared_dir()).unwrap();
        let mut vm = SandboxRecord::new("sb1");
        vm.shim = Some(ProcRef {
            pid: 10,
            start_time: 100,
        });
        vm.virtiofsd = Some(ProcRef {
            pid: 30,
            start_time: 300,
        });
        vm.manager = Some(state::ManagerRecord {
            block_driver: capsule_devmgr::BlockDriver::VirtioScsi,
            pci_slots: (6, 32),
            pmem_slots: (0, 4),
        });
        state::save(&paths.sandbox_file(), &vm).unwrap();
        (paths, vm)
    }

    #[tokio::test]
    async fn reused_pids_are_never_killed() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, _) = sandbox(dir.path());
        let fake = Fake::default();
        // pid 30 was virtiofsd (start 300); now an unrelated process has it.
        fake.add(30, 999, &["/usr/bin/sleep", "100"], false);
        let r = teardown(&paths, &[], &fake, timing()).await;
        assert!(fake.alive(30));
        assert!(fake.signals.lock().unwrap().is_empty());
        assert!(
            r.actions.iter().any(|a| a.contains("another process")),
            "{r:?}"
        );
        assert!(!paths.dir.exists(), "{r:?}");
        assert!(r.is_clean(), "{r:?}");
    }

    #[tokio::test]
    async fn recorded_and_unrecorded_processes_are_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, _) = sandbox(dir.path());
        let fake = Fake::default();
        let sock = paths.virtiofsd_socket().display().to_string();
        fake.add(
            30,
            300,
            &["virtiofsd", &format!("--socket-path={sock}")],
            true,
        );
        // A QEMU the record does not know (the shim died before saving it).
        let qmp = format!(
            "socket,id=qmp0,path={}/vm/qmp.sock,server=on",
            paths.dir.display()
        );
        fake.add(
            40,
            400,
            &["/usr/bin/qemu-system-x86_64", "-chardev", &qmp],
            false,
        );
        // Unrelated: another sandbox's QEMU, and a shell naming our dir.
        let other = format!("path={}0/vm/qmp.sock", paths.dir.display());
        fake.add(50, 500, &["qemu-system-x86_64", "-chardev", &other], false);
        fake.add(
            60,
            600,
            &["cat", &paths.sandbox_file().display().to_string()],
            false,
        );
        // A storage daemon naming the directory is not a sandbox process.
        let export = format!("addr.path={}/x.sock", paths.dir.display());
        fake.add(
            70,
            700,
            &["qemu-storage-daemon", "--export", &export],
            false,
        );
        let r = teardown(&paths, &[], &fake, timing()).await;
        assert!(!fake.alive(30) && !fake.alive(40), "{r:?}");
        assert!(fake.alive(50) && fake.alive(60) && fake.alive(70));
        let sigs = fake.signals.lock().unwrap().clone();
        assert_eq!(
            sigs,
            vec![
                (30, libc::SIGTERM),
                (30, libc::SIGKILL),
                (40, libc::SIGTERM)
            ]
        );
        assert!(!paths.dir.exists());
        // Idempotent.
        let again = teardown(&paths, &[], &fake, timing()).await;
        assert!(again.is_clean() && again.actions.is_empty(), "{again:?}");
    }

    #[test]
    fn dead_shim_sockets_are_removed_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let dead = dir.path().join("dead.sock");
        drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
        std::fs::write(
            dir.path().join("address"),
            format!("unix://{}", dead.display()),
        )
        .unwrap();
        let r = remove_dead_socket(dir.path());
        assert!(!dead.exists(), "{r:?}");
        let live = dir.path().join("live.sock");
        let _l = std::os::unix::net::UnixListener::bind(&live).unwrap();
        std::fs::write(
            dir.path().join("address"),
            format!("unix://{}", live.display()),
        )
        .unwrap();
        remove_dead_socket(dir.path());
        assert!(live.exists());
    }

    #[tokio::test]
    async fn corrupt_state_still_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, _) = sandbox(dir.path());
        std::fs::write(paths.sandbox_file(), "{ not json").unwrap();
        let fake = Fake::default();
        let qmp = format!("path={}/vm/qmp.sock", paths.dir.display());
        fake.add(40, 400, &["qemu-system-x86_64", "-chardev", &qmp], false);
        let r = teardown(&paths, &[], &fake, timing()).await;
        assert!(!fake.alive(40));
        assert!(r.errors.iter().any(|e| e.contains("corrupt")), "{r:?}");
        assert!(!paths.dir.exists());
    }

    #[tokio::test]
    async fn delete_leaves_a_live_shims_sandbox_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, mut vm) = sandbox(dir.path());
        let me = ProcRef::current().unwrap();
        // "The shim" is a live process holding the lock: this test process
        // (shim_alive ignores its own pid, so pretend with pid+1 and a fake
        // table).
        vm.shim = Some(ProcRef {
            pid: me.pid + 1,
            start_time: 7,
        });
        state::save(&paths.sandbox_file(), &vm).unwrap();
        let _lock = capsule_devmgr::FileStore::open(&paths.dir).unwrap();
        let fake = Fake::default();
        fake.add(me.pid + 1, 7, &["containerd-shim-capsule-v2"], false);
        let bundle = dir.path().join("bundle-c2");
        std::fs::create_dir_all(&bundle).unwrap();
        state::save(
            &bundle.join(state::BUNDLE_FILE),
            &BundleRecord {
                version: state::STATE_VERSION,
                container_id: "c2".into(),
                sandbox_id: "sb1".into(),
                state_dir: dir.path().to_path_buf(),
                config_path: None,
            },
        )
        .unwrap();
        let r = delete_container(&bundle, "c2", &fake, timing()).await;
        assert!(paths.dir.exists(), "{r:?}");
        assert!(r.is_clean(), "{r:?}");
        // Once the shim is gone, delete removes the sandbox.
        fake.procs.lock().unwrap().clear();
        drop(_lock);
        let r = delete_container(&bundle, "c2", &fake, timing()).await;
        assert!(!paths.dir.exists(), "{r:?}");
    }
}
