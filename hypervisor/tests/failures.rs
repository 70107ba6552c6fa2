//! Failure paths: each ends with a clear error within its deadline and
//! leaves nothing behind in QEMU (devices, nodes, chardevs, objects, fds).
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

use capsule_device_api::{BackendErrorKind, DeviceBackend, UnplugOutcome};
use capsule_device_api::{
    Bdf, BlockDriver, DeviceKind, VfioFunction, VfioGroup, VfioMode, VhostUserKind,
};
use capsule_hypervisor::config::VmConfig;
use capsule_hypervisor::{HypervisorError, VmBuilder};

use common::*;

fn no_guest() -> VmOpts {
    VmOpts {
        guest: false,
        ..VmOpts::default()
    }
}

/// A vhost-user-blk request on PCI slot 8 (the device manager allocates
/// slots; these tests play its part).
fn vhost_blk(id: &str, socket: &Path) -> capsule_device_api::AttachRequest {
    let mut req = request(
        id,
        DeviceKind::VhostUser {
            vhost: VhostUserKind::Blk,
            socket: socket.to_path_buf(),
            tag: String::new(),
        },
        Path::new("/"),
    );
    req.pci_slots = vec![8];
    req
}

/// A vhost-user "backend" that answers the first GET_FEATURES on a
/// connection (capsule's probe) and then either goes silent or hangs up.
async fn fake_backend(path: &Path, then_hang_up: bool) -> Result<tokio::task::JoinHandle<()>> {
    let listener = UnixListener::bind(path)?;
    Ok(tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = listener.accept().await {
            let mut hdr = [0u8; 12];
            if s.read_exact(&mut hdr).await.is_err() {
                continue;
            }
            let mut reply = [0u8; 20];
            reply[0] = 1; // GET_FEATURES
            reply[4] = 5; // version 1 | reply
            reply[8] = 8; // u64 payload
            reply[12..20].copy_from_slice(&(1u64 << 32 | 1 << 30).to_le_bytes());
            let _ = s.write_all(&reply).await;
            if !then_hang_up {
                held.push(s); // never answers again
            }
        }
    }))
}

/// How long QEMU may take to be back where it was. QEMU 7.2 cleans up
/// after a vhost-user backend that hung up in a bottom half
/// (`vhost_user_async_close`), which can run after it has answered the
/// failed command: one CI run saw 6 fds more at the first look (not
/// reproduced in 14 runs here, idle or loaded). A leak still fails, once
/// this has passed.
const SETTLE: Duration = Duration::from_secs(5);

async fn assert_unchanged(vm: &TestVm, before: &Snapshot) -> Result<()> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let after = vm.snapshot().await?;
        if &after == before {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "QEMU state changed by a failed hotplug (still after {SETTLE:?}):\nbefore {before:?}\nafter  {after:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhost_user_missing_socket_fails_cleanly() -> Result<()> {
    let vm = TestVm::boot(no_guest()).await?;
    let before = vm.snapshot().await?;
    let sock = vm.dir.path().join("missing.sock");
    let start = Instant::now();
    let err = vm
        .vm
        .hotplug(&vhost_blk("vu1", &sock))
        .await
        .expect_err("missing socket must fail");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
    assert_eq!(err.kind, BackendErrorKind::Failed);
    assert!(
        err.message.contains("vu1") && err.message.contains("missing.sock"),
        "{err}"
    );
    assert_unchanged(&vm, &before).await?;
    vm.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhost_user_silent_backend_is_refused_before_qemu_freezes() -> Result<()> {
    let vm = TestVm::boot(no_guest()).await?;
    let before = vm.snapshot().await?;
    let sock = vm.dir.path().join("silent.sock");
    let listener = UnixListener::bind(&sock)?;
    let accepter = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s); // accepts, never answers
        }
    });
    let start = Instant::now();
    let err = vm
        .vm
        .hotplug(&vhost_blk("vu2", &sock))
        .await
        .expect_err("silent backend must be refused");
    let took = start.elapsed();
    assert!(took < Duration::from_secs(4), "probe took {took:?}");
    assert_eq!(err.kind, BackendErrorKind::Timeout);
    assert!(
        err.message.contains("vu2") && err.message.contains("GET_FEATURES"),
        "{err}"
    );
    // QMP still answers at once: QEMU never saw the backend.
    let qmp = vm.vm.qmp().await?;
    let start = Instant::now();
    let status = qmp.query_status().await?;
    assert!(status.running);
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "query-status took {:?}",
        start.elapsed()
    );
    assert_unchanged(&vm, &before).await?;
    accepter.abort();
    vm.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhost_user_backend_dying_after_probe_is_rolled_back() -> Result<()> {
    let vm = TestVm::boot(no_guest()).await?;
    let before = vm.snapshot().await?;
    let sock = vm.dir.path().join("dying.sock");
    let backend = fake_backend(&sock, true).await?;
    let err = vm
        .vm
        .hotplug(&vhost_blk("vu3", &sock))
        .await
        .expect_err("device_add must fail");
    assert!(
        err.message.contains("vu3") && err.message.contains("device_add"),
        "{err}"
    );
    assert!(err.message.contains("rolled back"), "{err}");
    assert_unchanged(&vm, &before).await?;
    backend.abort();
    vm.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhost_user_without_shared_memory_is_refused() -> Result<()> {
    let vm = TestVm::boot(VmOpts {
        shared_memory: false,
        ..no_guest()
    })
    .await?;
    let before = vm.snapshot().await?;
    let sock = vm.dir.path().join("vu.sock");
    let backend = fake_backend(&sock, false).await?;
    for vhost in [VhostUserKind::Blk, VhostUserKind::Fs, VhostUserKind::Scsi] {
        let mut req = request(
            "vu4",
            DeviceKind::VhostUser {
                vhost,
                socket: sock.clone(),
                tag: "t".into(),
            },
            Path::new("/"),
        );
        req.pci_slots = vec![8];
        let err = vm
            .vm
            .hotplug(&req)
            .await
            .expect_err("vhost-user without share=on must be refused");
        assert_eq!(err.kind, BackendErrorKind::Unsupported, "{err}");
        assert!(err.message.contains("shared"), "{err}");
    }
    assert_unchanged(&vm, &before).await?;
    backend.abort();
    vm.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_killed_mid_hotplug_fails_promptly_with_disconnected() -> Result<()> {
    let vm = TestVm::boot(VmOpts {
        qmp_ms: 30_000,
        ..no_guest()
    })
    .await?;
    let sock = vm.dir.path().join("hang.sock");
    // Passes the probe, then never answers QEMU: device_add blocks QEMU.
    let backend = fake_backend(&sock, false).await?;
    let backend_vm = vm.vm.clone();
    let req = vhost_blk("vu5", &sock);
    let hotplug = tokio::spawn(async move { backend_vm.hotplug(&req).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!hotplug.is_finished(), "device_add should be stuck in QEMU");
    let killed_at = Instant::now();
    vm.vm.process().signal(libc::SIGKILL)?;
    let err = tokio::time::timeout(Duration::from_secs(5), hotplug)
        .await??
        .expect_err("hotplug must fail");
    let took = killed_at.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "error came {took:?} after the kill"
    );
    assert!(
        err.message.contains("vu5") && err.message.contains("connection lost"),
        "{err}"
    );
    // Reaped by the single waiter, no zombie.
    assert!(vm
        .vm
        .process()
        .wait_exit(Duration::from_secs(5))
        .await
        .is_some());
    assert!(!Path::new(&format!("/proc/{}", vm.vm.pid())).exists());
    // Later operations fail at once.
    let start = Instant::now();
    assert!(vm.vm.devices().await.is_err());
    assert!(start.elapsed() < Duration::from_secs(1));
    backend.abort();
    vm.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unplug_without_guest_ack_is_pending_and_keeps_the_backend() -> Result<()> {
    // No kernel: nothing acknowledges the ACPI unplug request.
    let vm = TestVm::boot(VmOpts {
        unplug_ms: 1_000,
        ..no_guest()
    })
    .await?;
    let img = vm.dir.path().join("d.img");
    std::fs::File::create(&img)?.set_len(1 << 20)?;
    let mut req = request("blk9", DeviceKind::Block, &img);
    req.driver = Some(BlockDriver::VirtioBlk);
    req.pci_slots = vec![9];
    vm.vm.hotplug(&req).await?;
    for attempt in 0..2 {
        let start = Instant::now();
        assert_eq!(
            vm.vm.unplug(&req).await?,
            UnplugOutcome::Pending,
            "attempt {attempt}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "took {:?}",
            start.elapsed()
        );
        let devices = vm.vm.devices().await?;
        let dev = devices
            .device("cap-blk9")
            .expect("device still listed while the unplug is pending");
        assert_eq!(dev.capsule_id.as_deref(), Some("blk9"));
        assert_eq!(
            dev.pci_path.as_ref().map(ToString::to_string).as_deref(),
            Some("09")
        );
        assert!(
            devices.block_nodes.contains(&"cap-blk9-node".to_owned()),
            "backend freed too early"
        );
    }
    // (Completing a pending unplug on retry is covered with a paused guest
    // in tests/reconnect.rs: a reset would end this -no-reboot VM.)
    vm.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vfio_without_iommu_group_fails_cleanly() -> Result<()> {
    let vm = TestVm::boot(no_guest()).await?;
    let before = vm.snapshot().await?;
    let f = |bdf: &str| VfioFunction::Pci {
        bdf: bdf.parse::<Bdf>().unwrap(),
        vendor: 0x8086,
        device: 0x1234,
        class: 0x020000,
        is_pcie: false,
        large_bar: false,
    };
    let group = VfioGroup {
        group: "7".into(),
        mode: VfioMode::Legacy,
        functions: vec![f("0000:00:01.0"), f("0000:00:01.1")],
    };
    let mut req = request("vf1", DeviceKind::Vfio(group), Path::new("/dev/vfio/7"));
    req.pci_slots = vec![10, 11];
    let err = vm.vm.hotplug(&req).await.expect_err("no vfio on this host");
    assert!(
        err.message.contains("vf1") && err.message.contains("iommu_group"),
        "{err}"
    );
    assert_unchanged(&vm, &before).await?;
    vm.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_that_never_serves_qmp_is_killed_and_reaped() -> Result<()> {
    init_tracing();
    let dir = tempfile::tempdir()?;
    // A "QEMU" that ignores its arguments and never creates the QMP socket.
    let fake = dir.path().join("fake-qemu");
    std::fs::write(&fake, "#!/bin/sh\necho fake qemu here >&2\nexec sleep 60\n")?;
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let mut cfg = VmConfig::new(dir.path().join("run"));
    cfg.qemu_binary = fake;
    cfg.accel = capsule_hypervisor::AccelMode::Tcg;
    cfg.timeouts.startup_ms = 1_000;
    let start = Instant::now();
    let err = VmBuilder::new(cfg)?
        .start()
        .await
        .expect_err("start must fail");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    let HypervisorError::Start { reason, stderr } = &err else {
        panic!("unexpected error {err}")
    };
    assert!(reason.contains("no QMP"), "{reason}");
    assert!(stderr.contains("fake qemu here"), "{stderr}");
    // No process left: neither running nor zombie.
    let out = std::process::Command::new("pgrep")
        .args(["-f", &dir.path().display().to_string()])
        .output()?;
    assert!(
        out.stdout.is_empty(),
        "leftover: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_rejecting_its_arguments_reports_why() -> Result<()> {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let mut cfg = test_config(dir.path(), &no_guest());
    // A kernel file that is not a kernel: QEMU exits at once.
    let bogus = dir.path().join("not-a-kernel");
    std::fs::write(&bogus, "nope")?;
    cfg.kernel = Some(bogus);
    let err = VmBuilder::new(cfg)?
        .start()
        .await
        .expect_err("start must fail");
    let HypervisorError::Start { reason, stderr } = &err else {
        panic!("unexpected error {err}")
    };
    assert!(reason.contains("exited during startup"), "{reason}");
    assert!(!stderr.is_empty(), "QEMU's complaint should be reported");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_start_in_a_live_run_dir_is_refused() -> Result<()> {
    let vm = TestVm::boot(no_guest()).await?;
    let err = VmBuilder::new(vm.config.clone())?
        .start()
        .await
        .expect_err("must not start a second VM");
    assert!(
        matches!(err, HypervisorError::AlreadyRunning { pid, .. } if pid == vm.vm.pid()),
        "{err}"
    );
    // The running VM is untouched.
    assert!(vm.vm.qmp().await?.query_status().await?.running);
    vm.vm.stop().await?;
    // Once it is gone, the run directory can be reused.
    let again = VmBuilder::new(vm.config.clone())?.start().await?;
    again.stop().await?;
    drop(vm);
    Ok(())
}
