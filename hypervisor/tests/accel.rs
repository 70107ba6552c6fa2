//! The accelerator probe: KVM only when a guest really boots under it. On
//! the development hosts /dev/kvm opens but guests hang, so the verdict there
//! is TCG; the verdict is cached per boot id + kernel.
mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;

use capsule_hypervisor::accel::{choose_accel, kvm_smoke_test};
use capsule_hypervisor::config::{Accel, AccelMode};
use capsule_hypervisor::VmBuilder;

use common::*;

/// Collects formatted log lines.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        std::io::stderr().write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn auto_accel_probes_caches_and_logs_its_choice() -> Result<()> {
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("capsule_hypervisor=info")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let dir = tempfile::Builder::new().prefix("caphv").tempdir()?;
    let mut cfg = test_config(dir.path(), &VmOpts::default());
    cfg.accel = AccelMode::Auto;
    cfg.accel_cache_dir = Some(dir.path().join("cache"));
    let qemu = require_qemu();

    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("/dev/kvm does not exist on this host: the KVM smoke test and boot probe are skipped, auto must pick TCG");
    } else {
        match kvm_smoke_test(Duration::from_secs(2)) {
            Ok(()) => eprintln!("KVM_RUN smoke test passed on this host"),
            Err(e) => eprintln!("KVM_RUN smoke test failed on this host: {e}"),
        }
    }

    let start = Instant::now();
    let first = choose_accel(&cfg, &qemu).await;
    eprintln!("verdict {:?} after {:?}", first, start.elapsed());
    assert!(!first.cached);
    match first.accel {
        Accel::Kvm => assert!(
            first.reason.contains("boot probe passed"),
            "{}",
            first.reason
        ),
        Accel::Tcg => assert!(!first.reason.is_empty()),
    }
    if std::path::Path::new("/dev/kvm").exists() {
        // Nested KVM is broken on the development hosts (see
        // /work/shared/design/qemu.md): the boot probe must catch it.
        if std::env::var_os("CAPSULE_EXPECT_KVM").is_none() {
            assert_eq!(
                first.accel,
                Accel::Tcg,
                "expected TCG on this host: {}",
                first.reason
            );
        }
    }

    // Cached: same verdict, no probe.
    let start = Instant::now();
    let second = choose_accel(&cfg, &qemu).await;
    assert!(second.cached, "{second:?}");
    assert_eq!(second.accel, first.accel);
    assert!(start.elapsed() < Duration::from_millis(500));
    let files: Vec<_> = std::fs::read_dir(dir.path().join("cache"))?.collect();
    assert_eq!(files.len(), 1);

    // A VM started in auto mode uses the cached verdict and records it.
    let vm = VmBuilder::new(cfg.clone())?.start().await?;
    assert_eq!(vm.description().accel, first.accel);
    let t = TestVm {
        vm,
        dir,
        config: cfg,
    };
    t.wait_console(READY_MARKER, Duration::from_secs(90))
        .await?;
    t.shutdown().await?;

    let logs = String::from_utf8(capture.0.lock().unwrap().clone())?;
    let chosen: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("acceleration chosen"))
        .collect();
    assert!(chosen.len() >= 3, "{logs}");
    assert!(
        chosen
            .iter()
            .all(|l| l.contains(&format!("accel={}", first.accel))),
        "{chosen:?}"
    );
    assert!(chosen[0].contains("reason="), "{}", chosen[0]);
    Ok(())
}
