//! Hotplug-to-guest-visible latency: capsule's API vs the same QMP commands
//! from a bare minimal client, in one VM, interleaved A B A B.
//!
//!   cargo bench -p capsule-hypervisor --bench hotplug [-- ROUNDS]
//!
//! Each round plugs a virtio-blk disk (blockdev-add + device_add) and stops
//! the clock when the guest sees a disk with the round's serial in
//! /sys/block/*/serial (a guest loop started before the plug, polling every
//! 2 ms). The disk is unplugged between rounds and the guest given 0.5 s to
//! settle (not timed). QEMU serves one
//! QMP client at a time, so the two clients take turns on the monitor; the
//! handover is not timed either.
#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use capsule_device_api::{BlockDriver, DeviceKind};
use capsule_device_api::{DeviceBackend, UnplugOutcome};

use capsule_hypervisor::testkit::BareQmp;
use common::*;

const SLOT: u32 = 10;
const T: Duration = Duration::from_secs(30);
const SETTLE: Duration = Duration::from_millis(500);

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    }
}

/// Guest loop: returns once a disk with `serial` exists. Shell builtins
/// only (no fork per poll), so the loop barely competes with the guest's
/// own hotplug work on its single vCPU.
fn guest_wait(serial: &str) -> String {
    format!(
        "n=0; f=; while [ -z \"$f\" ] && [ $n -lt 5000 ]; do for p in /sys/block/*/serial; do s=; \
         [ -r \"$p\" ] && read -r s <\"$p\"; [ \"$s\" = {serial} ] && f=1; done; \
         [ -z \"$f\" ] && usleep 2000; n=$((n+1)); done; [ -n \"$f\" ]"
    )
}

async fn run(rounds: usize) -> Result<()> {
    let vm = TestVm::boot(VmOpts {
        block_driver: BlockDriver::VirtioBlk,
        ..VmOpts::default()
    })
    .await?;
    let mut sh = vm.shell().await?;
    let qmp_path = vm.config.qmp_socket();
    let mut capsule_times = Vec::new();
    let mut bare_times = Vec::new();
    let (mut capsule_qmp, mut bare_qmp) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for side in ["capsule", "bare"] {
            let id = format!("{}{round}", &side[..1]);
            let img = vm.dir.path().join(format!("{id}.img"));
            std::fs::File::create(&img)?.set_len(8 << 20)?;
            let mut req = request(&id, DeviceKind::Block, &img);
            req.driver = Some(BlockDriver::VirtioBlk);
            req.pci_slots = vec![SLOT];
            if side == "capsule" {
                vm.vm.qmp().await?; // owns the monitor (untimed)
                let tag = sh.start(&guest_wait(&id)).await?;
                let t0 = Instant::now();
                vm.vm.hotplug(&req).await?;
                capsule_qmp.push(t0.elapsed());
                let (status, out) = sh.finish(&tag, "wait", T).await?;
                let took = t0.elapsed();
                if status != 0 {
                    bail!("guest never saw {id}: {out}");
                }
                capsule_times.push(took);
                if vm.vm.unplug(&req).await? != UnplugOutcome::Removed {
                    bail!("unplug of {id} pending");
                }
            } else {
                vm.vm.disconnect().await;
                let mut bare = BareQmp::connect(&qmp_path).await.context("bare client")?;
                let node = format!("{id}-node");
                let tag = sh.start(&guest_wait(&id)).await?;
                let t0 = Instant::now();
                bare.cmd(
                    "blockdev-add",
                    json!({"driver": "raw", "node-name": node, "read-only": false,
                           "file": {"driver": "file", "filename": img, "aio": "threads"}}),
                )
                .await?;
                bare.cmd(
                    "device_add",
                    json!({"driver": "virtio-blk-pci", "id": id, "drive": node, "serial": id,
                           "bus": "pci.0", "addr": format!("{SLOT:#04x}")}),
                )
                .await?;
                bare_qmp.push(t0.elapsed());
                let (status, out) = sh.finish(&tag, "wait", T).await?;
                let took = t0.elapsed();
                if status != 0 {
                    bail!("guest never saw {id}: {out}");
                }
                bare_times.push(took);
                bare.cmd("device_del", json!({ "id": id })).await?;
                bare.wait_deleted(&id).await?;
                bare.cmd("blockdev-del", json!({ "node-name": node }))
                    .await?;
            }
            // Let the guest finish tearing the last disk down so rounds do
            // not disturb each other.
            tokio::time::sleep(SETTLE).await;
            eprintln!(
                "round {round} {side}: {:?}",
                if side == "capsule" {
                    capsule_times.last()
                } else {
                    bare_times.last()
                }
            );
        }
    }
    let (mut a, mut b) = (capsule_times.clone(), bare_times.clone());
    let (ma, mb) = (median(&mut a), median(&mut b));
    println!(
        "hotplug-to-guest-visible latency, virtio-blk, TCG, {rounds} rounds each, interleaved"
    );
    println!(
        "  capsule API : median {:>8.1} ms  (min {:.1}, max {:.1})",
        ma.as_secs_f64() * 1e3,
        a[0].as_secs_f64() * 1e3,
        a[a.len() - 1].as_secs_f64() * 1e3
    );
    println!(
        "  bare QMP    : median {:>8.1} ms  (min {:.1}, max {:.1})",
        mb.as_secs_f64() * 1e3,
        b[0].as_secs_f64() * 1e3,
        b[b.len() - 1].as_secs_f64() * 1e3
    );
    println!(
        "  ratio capsule/bare (medians): {:.3}  (target <= 1.05)",
        ma.as_secs_f64() / mb.as_secs_f64()
    );
    let (qa, qb) = (median(&mut capsule_qmp), median(&mut bare_qmp));
    println!(
        "  QMP phase only (until the plug call returns): capsule {:.2} ms, bare {:.2} ms (capsule also resolves the PCI path with query-pci)",
        qa.as_secs_f64() * 1e3,
        qb.as_secs_f64() * 1e3
    );
    drop(sh);
    vm.shutdown().await
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; an optional number sets the rounds.
    let rounds = std::env::args()
        .skip(1)
        .find_map(|a| a.parse::<usize>().ok())
        .unwrap_or(30)
        .max(1);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(rounds))
}
