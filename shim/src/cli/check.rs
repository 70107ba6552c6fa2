//! `capsule check`: is this host ready to run capsule sandboxes?
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use capsule_hypervisor::config::{resolve_binary, AccelMode};

use super::Args;
use crate::config::Config;

#[derive(Default)]
struct Out {
    failed: bool,
}

impl Out {
    fn ok(&mut self, what: &str, detail: impl AsRef<str>) {
        println!("ok    {what}: {}", detail.as_ref());
    }
    fn warn(&mut self, what: &str, detail: impl AsRef<str>) {
        println!("warn  {what}: {}", detail.as_ref());
    }
    fn fail(&mut self, what: &str, detail: impl AsRef<str>) {
        self.failed = true;
        println!("FAIL  {what}: {}", detail.as_ref());
    }
}

fn version(bin: &Path) -> Option<String> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(|l| l.trim().to_string())
}

pub async fn run(a: &Args) -> Result<i32, String> {
    let mut out = Out::default();
    let config = match Config::load(a.config.as_deref()) {
        Ok((mut c, source)) => {
            out.ok("configuration", source.to_string());
            if let Some(d) = &a.state_dir {
                c.state_dir = d.clone();
            }
            c
        }
        Err(e) => {
            out.fail("configuration", e.to_string());
            Config::default()
        }
    };
    let h = &config.hypervisor;

    let qemu = resolve_binary(&h.path);
    match &qemu {
        Some(q) => match version(q) {
            Some(v) => out.ok("QEMU", format!("{} ({v})", q.display())),
            None => out.fail("QEMU", format!("{} does not run", q.display())),
        },
        None => out.fail("QEMU", format!("{} not found", h.path.display())),
    }
    for (what, p) in [
        ("guest kernel", &h.kernel),
        ("guest initramfs", &h.initramfs),
    ] {
        if p.is_file() {
            out.ok(what, p.display().to_string());
        } else {
            out.fail(
                what,
                format!("{} not found (install with shim/install.sh)", p.display()),
            );
        }
    }
    // Every candidate is probed: which one the shim will start, and why the
    // others (QEMU's legacy C virtiofsd…) are skipped.
    let lookup = crate::config::find_virtiofsd(&config.virtiofsd.path, true);
    match &lookup.found {
        Some(v) if v.negative_timeout => out.ok(
            "virtiofsd",
            format!(
                "{} ({}, negative lookups cached)",
                v.path.display(),
                v.version
            ),
        ),
        Some(v) => out.warn(
            "virtiofsd",
            format!(
                "{} ({}) offers no {}: every lookup of a missing file in a container is a round trip to the host (scripts/virtiofsd/build.sh builds capsule's virtiofsd)",
                v.path.display(),
                v.version,
                crate::config::NEGATIVE_TIMEOUT_FLAG
            ),
        ),
        None => out.fail("virtiofsd", lookup.error(&config.virtiofsd.path)),
    }
    if lookup.found.is_some() {
        for s in &lookup.skipped {
            out.warn(
                "virtiofsd",
                format!("skipped {}: {}", s.path.display(), s.reason),
            );
        }
    }

    // KVM, for real: the hypervisor's KVM_RUN smoke test, then its boot
    // probe with the configured guest.
    if !Path::new("/dev/kvm").exists() {
        out.warn(
            "acceleration",
            "/dev/kvm does not exist: sandboxes run under TCG (slow)",
        );
    } else {
        match capsule_hypervisor::accel::kvm_smoke_test(Duration::from_secs(2)) {
            Err(why) => out.warn(
                "acceleration",
                format!("KVM does not work ({why}): sandboxes run under TCG"),
            ),
            Ok(()) => match (&qemu, h.kernel.is_file() && h.initramfs.is_file()) {
                (Some(q), true) => {
                    let dir = tempdir_in(&config.state_dir)?;
                    let mut vm = crate::sandbox::qemu::vm_config(
                        &config,
                        &crate::state::SandboxPaths::new(&dir, "check"),
                    )
                    .map_err(|e| e.to_string())?;
                    vm.accel = AccelMode::Auto;
                    vm.accel_cache_dir = None;
                    let d = capsule_hypervisor::accel::choose_accel(&vm, q).await;
                    let _ = std::fs::remove_dir_all(&dir);
                    let msg = format!("{} ({})", d.accel, d.reason);
                    if d.accel == capsule_hypervisor::Accel::Kvm {
                        out.ok("acceleration", msg);
                    } else {
                        out.warn("acceleration", msg);
                    }
                }
                _ => out.warn(
                    "acceleration",
                    "KVM_RUN works; the boot probe needs QEMU and the guest image",
                ),
            },
        }
    }
    if Path::new("/dev/vhost-vsock").exists() {
        out.ok("vhost-vsock", "/dev/vhost-vsock present");
    } else {
        out.warn(
            "vhost-vsock",
            "/dev/vhost-vsock missing (modprobe vhost_vsock); the agent uses virtio-serial",
        );
    }
    match std::fs::create_dir_all(&config.state_dir) {
        Ok(()) => out.ok("state directory", config.state_dir.display().to_string()),
        Err(e) => out.fail(
            "state directory",
            format!("{}: {e}", config.state_dir.display()),
        ),
    }
    if config.enable_vhost_user_store {
        if config.vhost_user_store_path.is_dir() {
            out.ok(
                "vhost-user store",
                config.vhost_user_store_path.display().to_string(),
            );
        } else {
            out.fail(
                "vhost-user store",
                format!(
                    "{} is not a directory",
                    config.vhost_user_store_path.display()
                ),
            );
        }
    }
    Ok(if out.failed { 1 } else { 0 })
}

fn tempdir_in(base: &Path) -> Result<std::path::PathBuf, String> {
    let d = base.join(format!("check-{}", std::process::id()));
    std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
    Ok(d)
}
