//! Re-attaching from another process: `capsule-vmctl` reads the persisted
//! description, checks pid + start time, lists the devices and unplugs.
mod common;

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use capsule_device_api::{BlockDriver, DeviceKind};
use capsule_device_api::{DeviceBackend, UnplugOutcome};
use capsule_hypervisor::{VmDescription, VmDevices};

use common::*;

const VMCTL: &str = env!("CARGO_BIN_EXE_capsule-vmctl");

fn vmctl(args: &[&str]) -> Result<(bool, String, String)> {
    let out = Command::new(VMCTL)
        .args(args)
        .output()
        .context("running capsule-vmctl")?;
    Ok((
        out.status.success(),
        String::from_utf8(out.stdout)?,
        String::from_utf8(out.stderr)?,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_process_lists_and_unplugs_devices() -> Result<()> {
    let vm = TestVm::boot(VmOpts {
        unplug_ms: 2_000,
        ..VmOpts::default()
    })
    .await?;
    let mut reqs = Vec::new();
    for (id, slot) in [("d1", 6), ("d2", 7)] {
        let img = vm.dir.path().join(format!("{id}.img"));
        std::fs::File::create(&img)?.set_len(4 << 20)?;
        let mut req = request(id, DeviceKind::Block, &img);
        req.driver = Some(BlockDriver::VirtioBlk);
        req.pci_slots = vec![slot];
        vm.vm.hotplug(&req).await?;
        reqs.push(req);
    }
    let mut sh = vm.shell().await?;
    sh.run_ok(
        ". /etc/capsule/helpers.sh; find_serial_block d1 10 && find_serial_block d2 10",
        Duration::from_secs(30),
    )
    .await?;

    // The description on disk is what a restarted runtime finds.
    let desc_path = description_path(&vm.config);
    let desc = VmDescription::load(&desc_path)?;
    assert_eq!(desc.pid, vm.vm.pid());
    assert_eq!(
        desc.start_time,
        capsule_hypervisor::process::proc_start_time(desc.pid)?
    );
    let desc_arg = desc_path.to_str().context("path")?;

    // QEMU serves one QMP client at a time: this process lets go, as a
    // crashed runtime would.
    vm.vm.disconnect().await;

    let (ok, out, err) = vmctl(&["devices", desc_arg])?;
    ensure!(ok, "vmctl devices failed: {err}");
    let devices: VmDevices = serde_json::from_str(&out)?;
    let d1 = devices.device("cap-d1").context("cap-d1 missing")?;
    assert_eq!(d1.capsule_id.as_deref(), Some("d1"));
    assert_eq!(d1.driver, "virtio-blk-pci");
    assert_eq!(
        d1.pci_path.as_ref().map(ToString::to_string).as_deref(),
        Some("06")
    );
    assert_eq!(
        devices
            .device("cap-d2")
            .and_then(|d| d.pci_path.as_ref())
            .map(ToString::to_string)
            .as_deref(),
        Some("07")
    );
    assert!(devices.block_nodes.contains(&"cap-d1-node".to_owned()));
    assert!(devices.device("vser0").is_some());

    // Unplug d1 from the request the device manager persisted.
    let req_path = vm.dir.path().join("d1-req.json");
    std::fs::write(&req_path, serde_json::to_vec(&reqs[0])?)?;
    let (ok, out, err) = vmctl(&["unplug", desc_arg, req_path.to_str().context("path")?])?;
    ensure!(ok, "vmctl unplug failed: {err}");
    assert!(out.contains("\"Removed\""), "{out}");
    // And d2 by id alone, rebuilt from what QEMU reports.
    let (ok, out, err) = vmctl(&["unplug-id", desc_arg, "d2"])?;
    ensure!(ok, "vmctl unplug-id failed: {err}");
    assert!(out.contains("\"Removed\""), "{out}");

    // This process reconnects on its next call and sees the same VM.
    let devices = vm.vm.devices().await?;
    assert!(devices.capsule_ids().is_empty(), "{devices:?}");
    sh.run_ok(
        "! find_serial_block d1 0 2>/dev/null && ! find_serial_block d2 0 2>/dev/null",
        Duration::from_secs(30),
    )
    .await
    .context("disks still visible in the guest after an unplug from another process")?;

    // A guest that does not answer in time (paused) leaves the unplug
    // pending with its backend held; a retry after it resumes completes it.
    let img = vm.dir.path().join("d3.img");
    std::fs::File::create(&img)?.set_len(4 << 20)?;
    let mut d3 = request("d3", DeviceKind::Block, &img);
    d3.driver = Some(BlockDriver::VirtioBlk);
    d3.pci_slots = vec![8];
    vm.vm.hotplug(&d3).await?;
    sh.run_ok("find_serial_block d3 10", Duration::from_secs(30))
        .await?;
    let qmp = vm.vm.qmp().await?;
    qmp.execute("stop", None).await?;
    assert_eq!(vm.vm.unplug(&d3).await?, UnplugOutcome::Pending);
    let devices = vm.vm.devices().await?;
    assert!(
        devices.device("cap-d3").is_some()
            && devices.block_nodes.contains(&"cap-d3-node".to_owned())
    );
    qmp.execute("cont", None).await?;
    let mut outcome = UnplugOutcome::Pending;
    for _ in 0..5 {
        outcome = vm.vm.unplug(&d3).await?;
        if outcome == UnplugOutcome::Removed {
            break;
        }
    }
    assert_eq!(outcome, UnplugOutcome::Removed);
    assert!(!vm.vm.devices().await?.has_capsule_id("d3"));
    drop(qmp);

    // A description whose start time does not match (a reused pid) is
    // refused and the process is not touched.
    let mut stale = desc.clone();
    stale.start_time += 1;
    let stale_path = vm.dir.path().join("stale.json");
    stale.save(&stale_path)?;
    vm.vm.disconnect().await;
    let (ok, _, err) = vmctl(&["stop", stale_path.to_str().context("path")?])?;
    assert!(!ok, "a mismatching start time must be refused");
    assert!(err.contains("reused"), "{err}");
    let status = vm.vm.qmp().await?.query_status().await?;
    assert!(status.running, "the VM must be untouched");

    // Re-attach in-process too, then hand back.
    vm.vm.disconnect().await;
    let again = capsule_hypervisor::QemuVm::attach(desc).await?;
    assert_eq!(again.pid(), vm.vm.pid());
    assert!(
        again.unplug(&reqs[0]).await.is_ok(),
        "repeated unplug is idempotent"
    );
    drop(again);
    drop(sh);
    vm.shutdown().await
}
