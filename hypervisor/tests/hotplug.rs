//! Hotplug and unplug of every kind against real QEMU (TCG) with the test
//! guest: the guest finds each device by its address and moves data.
mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use capsule_device_api::{BackendErrorKind, DeviceBackend, UnplugOutcome};
use capsule_device_api::{BlockDriver, DeviceKind, GuestAddress, ScsiAddr, VhostUserKind};
use capsule_hypervisor::config::MachineType;

use common::*;

const T: Duration = Duration::from_secs(30);

/// Guest command writing `pattern(tag, len)` at offset 1 MiB of `dev`,
/// flushed to the host.
fn guest_write(dev: &str, tag: &str, len: usize) -> String {
    format!("yes {tag} | tr -d '\\n' | head -c {len} | dd of={dev} bs=4096 seek=256 conv=fsync 2>&1 && sync")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtio_blk_loop_device_hotplug_and_unplug() -> Result<()> {
    let vm = TestVm::boot(VmOpts::default()).await?;
    let lo = LoopDev::new(vm.dir.path(), "blk.img", 32 << 20)?;
    let mut req = request("blk1", DeviceKind::Block, &lo.device);
    req.driver = Some(BlockDriver::VirtioBlk);
    req.pci_slots = vec![7];
    let addr = vm.vm.hotplug(&req).await?;
    let GuestAddress::Pci(path) = &addr else {
        anyhow::bail!("expected a PCI address, got {addr:?}")
    };
    assert_eq!(path.to_string(), "07");

    let mut sh = vm.shell().await?;
    let by_serial = sh
        .run_ok(". /etc/capsule/helpers.sh; find_serial_block blk1 10", T)
        .await?;
    let by_path = sh
        .run_ok(
            &format!(". /etc/capsule/helpers.sh; find_pci_block {path} 10"),
            T,
        )
        .await?;
    assert_eq!(
        by_serial.trim(),
        by_path.trim(),
        "serial and PCI path name different disks"
    );
    let dev = by_serial.trim().to_owned();
    ensure!(dev.starts_with("/dev/vd"), "unexpected disk {dev}");

    // Guest writes, host reads the loop device's backing file.
    sh.run_ok(&guest_write(&dev, "capsule-blk", 8192), T)
        .await?;
    let mut buf = vec![0u8; 8192];
    std::fs::File::open(&lo.file)?.read_exact_at(&mut buf, 1 << 20)?;
    assert_eq!(
        buf,
        pattern("capsule-blk", 8192)[..],
        "host does not see the guest's write"
    );

    let name = dev.trim_start_matches("/dev/");
    assert_eq!(vm.vm.unplug(&req).await?, UnplugOutcome::Removed);
    sh.run_ok(&format!("i=0; while [ -e /sys/block/{name} ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done; ! [ -e /sys/block/{name} ]"), T)
        .await
        .context("disk still present in the guest after unplug")?;
    let snap = vm.snapshot().await?;
    ensure!(
        !snap.peripheral.iter().any(|d| d.starts_with("cap-")),
        "{snap:?}"
    );
    ensure!(
        !snap.block_nodes.iter().any(|n| n.starts_with("cap-")),
        "{snap:?}"
    );
    drop(sh);
    vm.shutdown().await
}

/// Guest command printing `len` bytes at offset 1 MiB of `dev`.
fn guest_read(dev: &str, len: usize) -> String {
    format!(
        "dd if={dev} bs=4096 skip=256 count={} 2>/dev/null | head -c {len}",
        len.div_ceil(4096)
    )
}

/// Waits until `/sys/block/<name>` is gone in the guest.
async fn wait_gone(sh: &mut GuestShell, dev: &str) -> Result<()> {
    let name = dev.trim_start_matches("/dev/");
    sh.run_ok(
        &format!("i=0; while [ -e /sys/block/{name} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; ! [ -e /sys/block/{name} ]"),
        T,
    )
    .await
    .with_context(|| format!("{dev} still present in the guest after unplug"))
    .map(drop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scsi_hd_loop_device_hotplug_and_unplug() -> Result<()> {
    let vm = TestVm::boot(VmOpts::default()).await?;
    let lo = LoopDev::new(vm.dir.path(), "scsi.img", 32 << 20)?;
    let mut req = request("scsi1", DeviceKind::Block, &lo.device);
    req.driver = Some(BlockDriver::VirtioScsi);
    req.scsi_addr = Some(ScsiAddr { id: 0, lun: 3 });
    let addr = vm.vm.hotplug(&req).await?;
    assert_eq!(addr, GuestAddress::Scsi(ScsiAddr { id: 0, lun: 3 }));

    let mut sh = vm.shell().await?;
    let by_addr = sh
        .run_ok(". /etc/capsule/helpers.sh; find_scsi_block 0:3 10", T)
        .await?;
    let by_serial = sh
        .run_ok(". /etc/capsule/helpers.sh; find_serial_block scsi1 10", T)
        .await?;
    assert_eq!(by_addr.trim(), by_serial.trim());
    let dev = by_addr.trim().to_owned();
    ensure!(dev.starts_with("/dev/sd"), "unexpected disk {dev}");

    sh.run_ok(&guest_write(&dev, "capsule-scsi", 8192), T)
        .await?;
    let mut buf = vec![0u8; 8192];
    std::fs::File::open(&lo.file)?.read_exact_at(&mut buf, 1 << 20)?;
    assert_eq!(
        buf,
        pattern("capsule-scsi", 8192)[..],
        "host does not see the guest's write"
    );

    assert_eq!(vm.vm.unplug(&req).await?, UnplugOutcome::Removed);
    wait_gone(&mut sh, &dev).await?;
    let snap = vm.snapshot().await?;
    ensure!(
        !snap
            .peripheral
            .iter()
            .chain(&snap.block_nodes)
            .any(|d| d.starts_with("cap-")),
        "{snap:?}"
    );
    drop(sh);
    vm.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhost_user_blk_with_qemu_storage_daemon_on_q35() -> Result<()> {
    let qsd = require_binary(
        "qemu-storage-daemon",
        "install it with `apt-get install qemu-system-common`",
    );
    let vm = TestVm::boot(VmOpts {
        machine: MachineType::Q35,
        ..VmOpts::default()
    })
    .await?;
    let dir = vm.dir.path();
    let img = dir.join("vu.img");
    let f = std::fs::File::create(&img)?;
    f.set_len(32 << 20)?;
    f.write_all_at(&pattern("capsule-vhost", 8192), 1 << 20)?;
    drop(f);
    let sock = dir.join("vu.sock");
    let log = dir.join("qsd.log");
    let mut daemon = Daemon::spawn(
        Command::new(qsd)
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f1,filename={}",
                img.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e1,node-name=f1,addr.type=unix,addr.path={},writable=on",
                sock.display()
            )),
        "qemu-storage-daemon",
        &log,
    )?;
    daemon.wait_for(&sock, Duration::from_secs(10))?;

    let mut req = request(
        "vub1",
        DeviceKind::VhostUser {
            vhost: VhostUserKind::Blk,
            socket: sock.clone(),
            tag: String::new(),
        },
        dir,
    );
    req.pci_slots = vec![1];
    let addr = vm.vm.hotplug(&req).await?;
    let GuestAddress::Pci(path) = &addr else {
        anyhow::bail!("expected a PCI address, got {addr:?}")
    };
    assert_eq!(path.to_string(), "09/00", "behind root port rp1");

    let mut sh = vm.shell().await?;
    let dev = sh
        .run_ok(
            &format!(". /etc/capsule/helpers.sh; find_pci_block {path} 10"),
            T,
        )
        .await?
        .trim()
        .to_owned();
    let data = sh.run_ok(&guest_read(&dev, 8192), T).await?;
    assert_eq!(
        data.as_bytes(),
        &pattern("capsule-vhost", 8192)[..],
        "guest does not read the host's pattern"
    );

    assert_eq!(vm.vm.unplug(&req).await?, UnplugOutcome::Removed);
    wait_gone(&mut sh, &dev).await?;
    let snap = vm.snapshot().await?;
    ensure!(
        !snap
            .peripheral
            .iter()
            .chain(&snap.chardevs)
            .any(|d| d.starts_with("cap-")),
        "{snap:?}"
    );
    ensure!(
        daemon.child.try_wait()?.is_none(),
        "qemu-storage-daemon died"
    );
    drop(sh);
    vm.shutdown().await
}

fn spawn_virtiofsd(dir: &Path, share: &Path, sock: &Path) -> Result<Daemon> {
    let bin = require_binary("virtiofsd", "install it with `cargo install virtiofsd`");
    let mut last = String::new();
    for sandbox in ["namespace", "none"] {
        let _ = std::fs::remove_file(sock);
        let log = dir.join(format!("virtiofsd-{sandbox}.log"));
        let mut d = Daemon::spawn(
            Command::new(&bin)
                .arg(format!("--socket-path={}", sock.display()))
                .arg(format!("--shared-dir={}", share.display()))
                .arg(format!("--sandbox={sandbox}")),
            "virtiofsd",
            &log,
        )?;
        match d.wait_for(sock, Duration::from_secs(10)) {
            Ok(()) => return Ok(d),
            Err(e) => last = e.to_string(),
        }
    }
    anyhow::bail!("virtiofsd did not start: {last}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtio_fs_with_virtiofsd() -> Result<()> {
    let vm = TestVm::boot(VmOpts::default()).await?;
    let dir = vm.dir.path();
    let share = dir.join("share");
    std::fs::create_dir(&share)?;
    std::fs::write(share.join("from-host.txt"), "hello from the host\n")?;
    let sock = dir.join("vfs.sock");
    let _daemon = spawn_virtiofsd(dir, &share, &sock)?;

    let mut req = request(
        "fs1",
        DeviceKind::VhostUser {
            vhost: VhostUserKind::Fs,
            socket: sock,
            tag: "capfs".into(),
        },
        dir,
    );
    req.pci_slots = vec![6];
    let addr = vm.vm.hotplug(&req).await?;
    ensure!(matches!(addr, GuestAddress::Pci(_)), "{addr:?}");

    let mut sh = vm.shell().await?;
    // The hot-added device is probed asynchronously: retry until its tag is known.
    let mount = "mkdir -p /mnt/fs; i=0; until mount -t virtiofs capfs /mnt/fs 2>/dev/null; do \
                 i=$((i+1)); [ $i -gt 100 ] && mount -t virtiofs capfs /mnt/fs && break; sleep 0.1; done";
    if let Err(e) = sh.run_ok(mount, T).await {
        let dmesg = sh.run("dmesg | tail -20; ls /sys/bus/virtio/devices/; cat /sys/bus/virtio/devices/*/device", T).await?;
        anyhow::bail!("{e}\nguest dmesg:\n{}", dmesg.1);
    }
    let got = sh.run_ok("cat /mnt/fs/from-host.txt", T).await?;
    assert_eq!(got, "hello from the host\n");
    sh.run_ok(
        "echo hello from the guest > /mnt/fs/from-guest.txt && sync",
        T,
    )
    .await?;
    assert_eq!(
        std::fs::read_to_string(share.join("from-guest.txt"))?,
        "hello from the guest\n"
    );
    // Host writes after mount are visible too.
    std::fs::write(share.join("later.txt"), "later\n")?;
    assert_eq!(sh.run_ok("cat /mnt/fs/later.txt", T).await?, "later\n");
    sh.run_ok("umount /mnt/fs", T).await?;

    assert_eq!(vm.vm.unplug(&req).await?, UnplugOutcome::Removed);
    let snap = vm.snapshot().await?;
    ensure!(
        !snap
            .peripheral
            .iter()
            .chain(&snap.chardevs)
            .any(|d| d.starts_with("cap-")),
        "{snap:?}"
    );
    drop(sh);
    vm.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nvdimm_coldplug_and_hotplug_unplug_refused() -> Result<()> {
    let scratch = tempfile::tempdir()?;
    let make = |name: &str, tag: &str| -> Result<std::path::PathBuf> {
        let p = scratch.path().join(name);
        let f = std::fs::File::create(&p)?;
        f.set_len(16 << 20)?;
        f.write_all_at(&pattern(tag, 8192), 1 << 20)?;
        Ok(p)
    };
    let cold_file = make("cold.img", "capsule-pmem-cold")?;
    let hot_file = make("hot.img", "capsule-pmem-hot")?;
    let cold = request("pm0", DeviceKind::Pmem, &cold_file);
    let vm = TestVm::boot_with(
        VmOpts {
            pmem: true,
            ..VmOpts::default()
        },
        vec![cold.clone()],
    )
    .await?;
    let mut sh = vm.shell().await?;
    sh.run_ok("i=0; while ! [ -b /dev/pmem0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; [ -b /dev/pmem0 ]", T)
        .await
        .context("cold-plugged pmem0 not in the guest")?;
    let data = sh.run_ok(&guest_read("/dev/pmem0", 8192), T).await?;
    assert_eq!(data.as_bytes(), &pattern("capsule-pmem-cold", 8192)[..]);

    let mut hot = request("pm1", DeviceKind::Pmem, &hot_file);
    hot.pmem_index = Some(1);
    assert_eq!(vm.vm.hotplug(&hot).await?, GuestAddress::Pmem(1));
    sh.run_ok("i=0; while ! [ -b /dev/pmem1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; [ -b /dev/pmem1 ]", T)
        .await
        .context("hot-added pmem1 not in the guest")?;
    let data = sh.run_ok(&guest_read("/dev/pmem1", 8192), T).await?;
    assert_eq!(data.as_bytes(), &pattern("capsule-pmem-hot", 8192)[..]);
    sh.run_ok("ls /sys/bus/nd/devices | grep -q region", T)
        .await?;

    for req in [&cold, &hot] {
        let err = vm
            .vm
            .unplug(req)
            .await
            .expect_err("nvdimm unplug must be refused");
        assert_eq!(err.kind, BackendErrorKind::Unsupported);
        assert!(
            err.message.contains(&req.id) && err.message.contains("nvdimm"),
            "{err}"
        );
    }
    let snap = vm.snapshot().await?;
    ensure!(
        snap.peripheral.contains(&"cap-pm1".to_owned())
            && snap.objects.contains(&"cap-pm1-mem".to_owned()),
        "{snap:?}"
    );
    drop(sh);
    vm.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coldplugged_devices_are_where_the_layout_says() -> Result<()> {
    use capsule_device_api::DeviceBackend;
    use capsule_hypervisor::VmBuilder;
    init_tracing();
    let dir = tempfile::Builder::new().prefix("caphv").tempdir()?;
    let opts = VmOpts::default();
    let config = test_config(dir.path(), &opts);
    let share = dir.path().join("share");
    std::fs::create_dir(&share)?;
    std::fs::write(share.join("cold.txt"), "cold share\n")?;
    let sock = dir.path().join("vfs.sock");
    let _daemon = spawn_virtiofsd(dir.path(), &share, &sock)?;
    let blk_img = dir.path().join("cold-blk.img");
    std::fs::File::create(&blk_img)?.set_len(8 << 20)?;
    let scsi_img = dir.path().join("cold-scsi.img");
    std::fs::File::create(&scsi_img)?.set_len(8 << 20)?;

    let builder = VmBuilder::new(config.clone())?;
    let mut blk = request("cblk", DeviceKind::Block, &blk_img);
    blk.driver = Some(BlockDriver::VirtioBlk);
    blk.pci_slots = vec![12];
    let blk_addr = builder.coldplug(&blk).await?;
    assert_eq!(blk_addr, GuestAddress::Pci("0c".parse()?));
    let mut scsi = request("cscsi", DeviceKind::Block, &scsi_img);
    scsi.scsi_addr = Some(ScsiAddr { id: 0, lun: 5 });
    assert_eq!(
        builder.coldplug(&scsi).await?,
        GuestAddress::Scsi(ScsiAddr { id: 0, lun: 5 })
    );
    let mut fs = request(
        "cfs",
        DeviceKind::VhostUser {
            vhost: VhostUserKind::Fs,
            socket: sock,
            tag: "coldfs".into(),
        },
        dir.path(),
    );
    fs.pci_slots = vec![6];
    let GuestAddress::Pci(fs_path) = builder.coldplug(&fs).await? else {
        anyhow::bail!("virtio-fs has a PCI address")
    };
    // On the slot the request carries (the device manager's allocation).
    assert_eq!(fs_path.to_string(), "06");
    // A taken slot is refused before boot.
    let mut clash = blk.clone();
    clash.id = "clash".into();
    assert!(builder.coldplug(&clash).await.is_err());

    let vm = builder.start().await?;
    assert_eq!(vm.description().coldplugged.len(), 3);
    let t = TestVm { vm, dir, config };
    t.wait_console(READY_MARKER, Duration::from_secs(90))
        .await?;
    let devices = t.vm.devices().await?;
    assert_eq!(
        devices.device("cap-cblk").and_then(|d| d.pci_path.clone()),
        Some("0c".parse()?)
    );
    assert_eq!(
        devices.device("cap-cfs").and_then(|d| d.pci_path.clone()),
        Some(fs_path.clone())
    );

    let mut sh = t.shell().await?;
    let by_path = sh
        .run_ok(". /etc/capsule/helpers.sh; find_pci_block 0c 10", T)
        .await?;
    let by_serial = sh.run_ok("find_serial_block cblk 10", T).await?;
    assert_eq!(by_path, by_serial);
    sh.run_ok("find_scsi_block 0:5 10", T).await?;
    sh.run_ok("mkdir -p /mnt/c && mount -t virtiofs coldfs /mnt/c", T)
        .await?;
    assert_eq!(sh.run_ok("cat /mnt/c/cold.txt", T).await?, "cold share\n");
    sh.run_ok("umount /mnt/c", T).await?;
    // Cold-plugged devices unplug like hot-plugged ones.
    for req in [&blk, &scsi, &fs] {
        assert_eq!(
            t.vm.unplug(req).await?,
            UnplugOutcome::Removed,
            "{}",
            req.id
        );
    }
    assert!(t.vm.devices().await?.capsule_ids().is_empty());
    drop(sh);
    t.shutdown().await
}
