//! Choosing the accelerator: KVM only when it really works.
//!
//! Opening `/dev/kvm` proves little (on nested hosts it opens and guests hang
//! at boot). `auto` mode runs two probes and caches the verdict per host boot
//! and kernel:
//! 1. a KVM_RUN smoke test: a one-instruction guest (`hlt`) must exit with
//!    KVM_EXIT_HLT. It runs in a forked child that only makes raw syscalls,
//!    so a vCPU that never returns is killed with its process;
//! 2. a boot probe: the configured kernel and initramfs boot under KVM with
//!    `capsule.probe=1` and must print `CAPSULE-PROBE-OK` and power off in
//!    time.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::{Accel, AccelMode, VmConfig};

/// Marker the guest prints when booted with `capsule.probe=1`.
pub const PROBE_OK_MARKER: &str = "CAPSULE-PROBE-OK";

/// The accelerator chosen and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelDecision {
    pub accel: Accel,
    pub reason: String,
    /// Read from the verdict cache rather than probed now.
    pub cached: bool,
}

/// A cached verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CacheEntry {
    boot_id: String,
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    qemu: PathBuf,
    accel: Accel,
    reason: String,
}

/// Decides the accelerator for `cfg` (probing and caching in `auto` mode).
pub async fn choose_accel(cfg: &VmConfig, qemu: &Path) -> AccelDecision {
    let decision = match cfg.accel {
        AccelMode::Tcg => AccelDecision {
            accel: Accel::Tcg,
            reason: "forced by config (accel = tcg)".into(),
            cached: false,
        },
        AccelMode::Kvm => AccelDecision {
            accel: Accel::Kvm,
            reason: "forced by config (accel = kvm)".into(),
            cached: false,
        },
        AccelMode::Auto => auto(cfg, qemu).await,
    };
    tracing::info!(accel = %decision.accel, reason = %decision.reason, cached = decision.cached, "acceleration chosen");
    decision
}

async fn auto(cfg: &VmConfig, qemu: &Path) -> AccelDecision {
    let kvm = Path::new("/dev/kvm");
    if !kvm.exists() {
        return AccelDecision {
            accel: Accel::Tcg,
            reason: "/dev/kvm does not exist".into(),
            cached: false,
        };
    }
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .ok();
    let cache = match (&cfg.accel_cache_dir, &boot_id, &cfg.kernel) {
        (Some(dir), Some(boot_id), Some(kernel)) => Some((
            dir.join(cache_file_name(
                boot_id,
                kernel,
                cfg.initrd.as_deref(),
                qemu,
            )),
            CacheEntry {
                boot_id: boot_id.clone(),
                kernel: kernel.clone(),
                initrd: cfg.initrd.clone(),
                qemu: qemu.to_path_buf(),
                accel: Accel::Tcg,
                reason: String::new(),
            },
        )),
        _ => None,
    };
    if let Some((path, key)) = &cache {
        if let Some(hit) = read_cache(path, key) {
            return AccelDecision {
                accel: hit.accel,
                reason: hit.reason,
                cached: true,
            };
        }
    }
    let smoke_timeout = Duration::from_millis(cfg.timeouts.kvm_smoke_ms);
    let (accel, reason) =
        match tokio::task::spawn_blocking(move || kvm_smoke_test(smoke_timeout)).await {
            Err(e) => (Accel::Tcg, format!("KVM smoke test task failed: {e}")),
            Ok(Err(why)) => (Accel::Tcg, format!("KVM smoke test failed: {why}")),
            Ok(Ok(())) => match &cfg.kernel {
                None => (
                    Accel::Tcg,
                    "KVM_RUN works but no kernel is configured to run the boot probe".into(),
                ),
                Some(kernel) => match boot_probe(cfg, qemu, kernel).await {
                    Ok(took) => (
                        Accel::Kvm,
                        format!("KVM_RUN smoke test and boot probe passed (boot took {took:?})"),
                    ),
                    Err(why) => (
                        Accel::Tcg,
                        format!("KVM_RUN works but the KVM boot probe failed: {why}"),
                    ),
                },
            },
        };
    if let Some((path, mut entry)) = cache {
        entry.accel = accel;
        entry.reason = reason.clone();
        if let Err(e) = write_cache(&path, &entry) {
            tracing::warn!(path = %path.display(), error = %e, "cannot cache the acceleration verdict");
        }
    }
    AccelDecision {
        accel,
        reason,
        cached: false,
    }
}

/// Cache file name: a stable hash of the key (the key itself is stored
/// inside and compared on read).
fn cache_file_name(boot_id: &str, kernel: &Path, initrd: Option<&Path>, qemu: &Path) -> String {
    // FNV-1a: stable across Rust versions, unlike DefaultHasher.
    let mut h: u64 = 0xcbf29ce484222325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes.iter().chain(std::iter::once(&0u8)) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x100000001b3);
        }
    };
    use std::os::unix::ffi::OsStrExt;
    eat(boot_id.as_bytes());
    eat(kernel.as_os_str().as_bytes());
    eat(initrd.map(|p| p.as_os_str().as_bytes()).unwrap_or(b""));
    eat(qemu.as_os_str().as_bytes());
    format!("accel-{h:016x}.json")
}

fn read_cache(path: &Path, key: &CacheEntry) -> Option<CacheEntry> {
    let data = std::fs::read(path).ok()?;
    let entry: CacheEntry = match serde_json::from_slice(&data) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring a corrupt acceleration cache");
            return None;
        }
    };
    (entry.boot_id == key.boot_id
        && entry.kernel == key.kernel
        && entry.initrd == key.initrd
        && entry.qemu == key.qemu)
        .then_some(entry)
}

fn write_cache(path: &Path, entry: &CacheEntry) -> std::io::Result<()> {
    let data = serde_json::to_vec_pretty(entry).map_err(std::io::Error::other)?;
    if let Some(dir) = path.parent() {
        capsule_state_file::create_private_dir(dir)?;
    }
    capsule_state_file::write_atomic(path, &data).map_err(|e| std::io::Error::other(e.to_string()))
}

/// Boots the kernel under KVM with `capsule.probe=1`; `Ok(duration)` when
/// the guest printed the marker and QEMU exited in time.
async fn boot_probe(cfg: &VmConfig, qemu: &Path, kernel: &Path) -> Result<Duration, String> {
    let dir =
        tempfile_dir(&cfg.run_dir).map_err(|e| format!("cannot create a probe directory: {e}"))?;
    let log = dir.join("probe-console.log");
    let mut cmdline = cfg.cmdline.clone();
    if !cmdline
        .split_whitespace()
        .any(|w| w.starts_with("console="))
    {
        cmdline.push_str(" console=ttyS0");
    }
    cmdline.push_str(" capsule.probe=1");
    let mut args: Vec<String> = vec![
        "-machine".into(),
        cfg.machine.qemu_name().into(),
        "-accel".into(),
        "kvm".into(),
        "-cpu".into(),
        "host".into(),
        "-m".into(),
        "256M".into(),
        "-smp".into(),
        "1".into(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-kernel".into(),
        kernel.display().to_string(),
        "-append".into(),
        cmdline.trim().to_owned(),
        "-chardev".into(),
        format!(
            "file,id=con,path={}",
            crate::launch::argv::escape_opt(&log.display().to_string())
        ),
        "-serial".into(),
        "chardev:con".into(),
    ];
    if let Some(initrd) = &cfg.initrd {
        args.push("-initrd".into());
        args.push(initrd.display().to_string());
    }
    let timeout = Duration::from_millis(cfg.timeouts.kvm_boot_probe_ms);
    let start = Instant::now();
    let mut child = tokio::process::Command::new(qemu)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", qemu.display()))?;
    let status = tokio::time::timeout(timeout, child.wait()).await;
    let result = match status {
        Err(_) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            Err(format!("the guest did not power off within {timeout:?}"))
        }
        Ok(Err(e)) => Err(format!("waiting for the probe QEMU: {e}")),
        Ok(Ok(status)) => {
            let console = std::fs::read_to_string(&log).unwrap_or_default();
            if console.contains(PROBE_OK_MARKER) {
                Ok(start.elapsed())
            } else {
                let mut stderr = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use tokio::io::AsyncReadExt;
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), e.read_to_string(&mut stderr))
                            .await;
                }
                Err(format!(
                    "QEMU exited ({status}) without {PROBE_OK_MARKER} on the console; stderr: {}",
                    stderr.trim()
                ))
            }
        }
    };
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn tempfile_dir(parent: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(parent)?;
    let dir = parent.join(format!("accel-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Runs a `hlt` guest on one vCPU in a forked child; `Ok` on KVM_EXIT_HLT.
pub fn kvm_smoke_test(timeout: Duration) -> Result<(), String> {
    // SAFETY: the child only makes raw syscalls on stack data and `_exit`s (async-signal-safe after fork in a multi-threaded process).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: see above.
        unsafe { libc::_exit(kvm_hlt_child()) }
    }
    let deadline = Instant::now() + timeout;
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our own child pid.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        if r < 0 {
            return Err(format!("waitpid: {}", std::io::Error::last_os_error()));
        }
        if Instant::now() >= deadline {
            // SAFETY: our unreaped child: the pid cannot have been reused.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return Err(format!(
                "KVM_RUN did not return within {timeout:?} (vCPU hangs)"
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if !libc::WIFEXITED(status) {
        return Err(format!("probe child died (status {status:#x})"));
    }
    match libc::WEXITSTATUS(status) {
        0 => Ok(()),
        code => Err(smoke_failure(code)),
    }
}

fn smoke_failure(code: i32) -> String {
    match code {
        1 => "cannot open /dev/kvm".into(),
        2 => "KVM_GET_API_VERSION is not 12".into(),
        3 => "KVM_CREATE_VM failed".into(),
        4 => "cannot map guest memory".into(),
        5 => "KVM_SET_USER_MEMORY_REGION failed".into(),
        6 => "KVM_CREATE_VCPU failed".into(),
        7 => "KVM_GET_VCPU_MMAP_SIZE failed".into(),
        8 => "cannot map kvm_run".into(),
        9 => "KVM_GET_SREGS failed".into(),
        10 => "KVM_SET_SREGS failed".into(),
        11 => "KVM_SET_REGS failed".into(),
        12 => "KVM_RUN failed".into(),
        c if c >= 20 => format!(
            "unexpected KVM exit reason {} (expected KVM_EXIT_HLT)",
            c - 20
        ),
        c => format!("probe child exited with {c}"),
    }
}

const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
const KVM_GET_VCPU_MMAP_SIZE: libc::c_ulong = 0xAE04;
const KVM_CREATE_VCPU: libc::c_ulong = 0xAE41;
const KVM_RUN: libc::c_ulong = 0xAE80;
/// _IOW(0xAE, 0x46, struct kvm_userspace_memory_region) (32 bytes).
const KVM_SET_USER_MEMORY_REGION: libc::c_ulong = 0x4020_AE46;
/// _IOR/_IOW(0xAE, 0x83/0x84, struct kvm_sregs) (312 bytes).
const KVM_GET_SREGS: libc::c_ulong = 0x8138_AE83;
const KVM_SET_SREGS: libc::c_ulong = 0x4138_AE84;
/// _IOW(0xAE, 0x82, struct kvm_regs) (144 bytes).
const KVM_SET_REGS: libc::c_ulong = 0x4090_AE82;
const KVM_EXIT_HLT: u32 = 5;
const GUEST_ADDR: u64 = 0x1000;

#[repr(C)]
struct KvmUserspaceMemoryRegion {
    slot: u32,
    flags: u32,
    guest_phys_addr: u64,
    memory_size: u64,
    userspace_addr: u64,
}

/// Runs in the forked child. Returns the exit code.
fn kvm_hlt_child() -> i32 {
    // SAFETY: raw syscalls on descriptors and memory this function creates.
    unsafe {
        let kvm = libc::open(c"/dev/kvm".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if kvm < 0 {
            return 1;
        }
        if libc::ioctl(kvm, KVM_GET_API_VERSION, 0) != 12 {
            return 2;
        }
        let vm = libc::ioctl(kvm, KVM_CREATE_VM, 0);
        if vm < 0 {
            return 3;
        }
        let mem = libc::mmap(
            std::ptr::null_mut(),
            0x1000,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if mem == libc::MAP_FAILED {
            return 4;
        }
        *(mem as *mut u8) = 0xf4; // hlt
        let region = KvmUserspaceMemoryRegion {
            slot: 0,
            flags: 0,
            guest_phys_addr: GUEST_ADDR,
            memory_size: 0x1000,
            userspace_addr: mem as u64,
        };
        if libc::ioctl(
            vm,
            KVM_SET_USER_MEMORY_REGION,
            &region as *const KvmUserspaceMemoryRegion,
        ) < 0
        {
            return 5;
        }
        let vcpu = libc::ioctl(vm, KVM_CREATE_VCPU, 0);
        if vcpu < 0 {
            return 6;
        }
        let run_size = libc::ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
        if run_size <= 0 {
            return 7;
        }
        let run = libc::mmap(
            std::ptr::null_mut(),
            run_size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            vcpu,
            0,
        );
        if run == libc::MAP_FAILED {
            return 8;
        }
        // struct kvm_sregs: cs is the first kvm_segment {u64 base; u32 limit;
        // u16 selector; ...}: base at 0, selector at 12.
        let mut sregs = [0u8; 312];
        if libc::ioctl(vcpu, KVM_GET_SREGS, sregs.as_mut_ptr()) < 0 {
            return 9;
        }
        sregs[0..8].copy_from_slice(&0u64.to_ne_bytes());
        sregs[12..14].copy_from_slice(&0u16.to_ne_bytes());
        if libc::ioctl(vcpu, KVM_SET_SREGS, sregs.as_ptr()) < 0 {
            return 10;
        }
        // struct kvm_regs: 18 u64, rip = [16], rflags = [17].
        let mut regs = [0u64; 18];
        regs[16] = GUEST_ADDR;
        regs[17] = 0x2;
        if libc::ioctl(vcpu, KVM_SET_REGS, regs.as_ptr()) < 0 {
            return 11;
        }
        if libc::ioctl(vcpu, KVM_RUN, 0) < 0 {
            return 12;
        }
        // struct kvm_run: u8 request_interrupt_window, u8 immediate_exit,
        // u8 padding[6], u32 exit_reason.
        let exit_reason = *((run as *const u8).add(8) as *const u32);
        if exit_reason == KVM_EXIT_HLT {
            0
        } else {
            20 + exit_reason.min(200) as i32
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_is_stable_and_distinct() {
        let a = cache_file_name("b1", Path::new("/k"), None, Path::new("qemu"));
        assert_eq!(
            a,
            cache_file_name("b1", Path::new("/k"), None, Path::new("qemu"))
        );
        assert_ne!(
            a,
            cache_file_name("b2", Path::new("/k"), None, Path::new("qemu"))
        );
        assert_ne!(
            a,
            cache_file_name("b1", Path::new("/k2"), None, Path::new("qemu"))
        );
        assert_ne!(
            a,
            cache_file_name(
                "b1",
                Path::new("/k"),
                Some(Path::new("/i")),
                Path::new("qemu")
            )
        );
    }

    #[test]
    fn cache_round_trip_checks_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        let entry = CacheEntry {
            boot_id: "b".into(),
            kernel: "/k".into(),
            initrd: None,
            qemu: "q".into(),
            accel: Accel::Tcg,
            reason: "r".into(),
        };
        write_cache(&path, &entry).unwrap();
        assert_eq!(read_cache(&path, &entry), Some(entry.clone()));
        let other = CacheEntry {
            boot_id: "other".into(),
            ..entry
        };
        assert_eq!(read_cache(&path, &other), None);
        std::fs::write(&path, "{").unwrap();
        assert_eq!(read_cache(&path, &other), None);
    }

    #[tokio::test]
    async fn forced_modes_do_not_probe() {
        let mut cfg = VmConfig::new("/nonexistent");
        cfg.accel = AccelMode::Tcg;
        let d = choose_accel(&cfg, Path::new("qemu")).await;
        assert_eq!(d.accel, Accel::Tcg);
        assert!(d.reason.contains("forced"));
    }
}
