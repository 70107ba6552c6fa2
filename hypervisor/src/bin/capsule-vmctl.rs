//! capsule-vmctl: inspect or change a running capsule VM from another
//! process, through its persisted description.
//!
//!   capsule-vmctl devices DESCRIPTION.json
//!   capsule-vmctl unplug DESCRIPTION.json REQUEST.json   (an AttachRequest)
//!   capsule-vmctl unplug-id DESCRIPTION.json ID           (by device manager id)
//!   capsule-vmctl status DESCRIPTION.json
//!   capsule-vmctl stop DESCRIPTION.json
//!
//! Output is JSON on stdout. Exit status 0 on success.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use capsule_device_api::{AttachRequest, DeviceBackend};
use capsule_device_api::{BlockDriver, DeviceKind, VhostUserKind};
use capsule_hypervisor::{QemuVm, VmDescription};

fn usage() -> ! {
    eprintln!(
        "usage: capsule-vmctl devices|status|stop DESCRIPTION.json\n       capsule-vmctl unplug DESCRIPTION.json REQUEST.json\n       capsule-vmctl unplug-id DESCRIPTION.json ID"
    );
    std::process::exit(2)
}

/// Rebuilds an unplug request from what QEMU has under capsule's names.
fn request_from_devices(
    id: &str,
    devices: &capsule_hypervisor::VmDevices,
) -> Result<AttachRequest> {
    let main = devices
        .device(&format!("cap-{id}"))
        .with_context(|| format!("no device cap-{id} in the VM"))?;
    let functions = devices
        .devices
        .iter()
        .filter(|d| d.capsule_id.as_deref() == Some(id))
        .count();
    let (kind, driver) = match main.driver.as_str() {
        "virtio-blk-pci" => (DeviceKind::Block, Some(BlockDriver::VirtioBlk)),
        "scsi-hd" => (DeviceKind::Block, Some(BlockDriver::VirtioScsi)),
        "nvdimm" => (DeviceKind::Pmem, None),
        d @ ("vhost-user-blk-pci" | "vhost-user-scsi-pci" | "vhost-user-fs-pci") => {
            let vhost = match d {
                "vhost-user-blk-pci" => VhostUserKind::Blk,
                "vhost-user-scsi-pci" => VhostUserKind::Scsi,
                _ => VhostUserKind::Fs,
            };
            (
                DeviceKind::VhostUser {
                    vhost,
                    socket: PathBuf::new(),
                    tag: String::new(),
                },
                None,
            )
        }
        "vfio-pci" => (
            DeviceKind::Vfio(capsule_device_api::VfioGroup {
                group: String::new(),
                mode: capsule_device_api::VfioMode::Legacy,
                functions: (0..functions)
                    .map(|_| capsule_device_api::VfioFunction::Mediated {
                        uuid: String::new(),
                        sysfsdev: PathBuf::new(),
                    })
                    .collect(),
            }),
            None,
        ),
        other => bail!("device cap-{id} is a {other}, which capsule-vmctl cannot unplug"),
    };
    Ok(AttachRequest {
        id: id.to_owned(),
        kind,
        host_path: PathBuf::new(),
        read_only: false,
        driver,
        block_index: None,
        drive_name: None,
        scsi_addr: None,
        pmem_index: None,
        pci_slots: vec![],
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, desc_path) = match args.as_slice() {
        [cmd, desc, ..] => (cmd.as_str(), PathBuf::from(desc)),
        _ => usage(),
    };
    let desc = VmDescription::load(&desc_path)
        .with_context(|| format!("loading {}", desc_path.display()))?;
    let vm = QemuVm::attach(desc).await.context("attaching to the VM")?;
    match (cmd, args.get(2)) {
        ("devices", None) => println!("{}", serde_json::to_string_pretty(&vm.devices().await?)?),
        ("status", None) => {
            let s = vm.qmp().await?.query_status().await?;
            println!(
                "{}",
                serde_json::json!({ "pid": vm.pid(), "status": s.status, "running": s.running })
            );
        }
        ("stop", None) => {
            vm.stop().await?;
            println!("{}", serde_json::json!({ "stopped": true }));
        }
        ("unplug", Some(req)) => {
            let req: AttachRequest = serde_json::from_slice(
                &std::fs::read(req).with_context(|| format!("reading {req}"))?,
            )
            .with_context(|| format!("parsing {req}"))?;
            let outcome = vm
                .unplug(&req)
                .await
                .with_context(|| format!("unplugging {}", req.id))?;
            println!(
                "{}",
                serde_json::json!({ "id": req.id, "outcome": outcome })
            );
        }
        ("unplug-id", Some(id)) => {
            let req = request_from_devices(id, &vm.devices().await?)?;
            let outcome = vm
                .unplug(&req)
                .await
                .with_context(|| format!("unplugging {id}"))?;
            println!("{}", serde_json::json!({ "id": id, "outcome": outcome }));
        }
        _ => usage(),
    }
    Ok(())
}
