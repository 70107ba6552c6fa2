//! `capsule list`, `capsule inspect` (with drift against QEMU) and
//! `capsule cleanup`.
use std::collections::BTreeSet;
use std::time::Duration;

use capsule_devmgr::{DeviceKind, DeviceRecord, DeviceStatus};
use capsule_hypervisor::{QemuVm, VmDevices};
use serde_json::json;

use super::Args;
use crate::cleanup::{self, KillTiming, ProcessTable, RealProcesses};
use crate::config::Config;
use crate::state::{self, ProcRef, SandboxPaths, SandboxRecord};

fn alive(p: Option<ProcRef>) -> bool {
    p.is_some_and(|p| RealProcesses.start_time(p.pid) == Some(p.start_time))
}

fn sandbox_ids(config: &Config) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(config.sandboxes_dir())
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .filter_map(|e| e.file_name().to_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

fn devices(paths: &SandboxPaths, vm: Option<&SandboxRecord>) -> Result<Vec<DeviceRecord>, String> {
    state::load_devices(paths, vm)
}

pub fn list(a: &Args, config: &Config) -> Result<i32, String> {
    let mut rows = Vec::new();
    for id in sandbox_ids(config) {
        let paths = SandboxPaths::new(&config.state_dir, &id);
        let vm = state::load::<SandboxRecord>(&paths.sandbox_file());
        let (vm, err) = match vm {
            Ok(v) => (v, None),
            Err(e) => (None, Some(e.to_string())),
        };
        let containers = vm
            .as_ref()
            .map(|c| c.containers.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default();
        let qemu = vm.as_ref().and_then(|v| v.qemu.as_ref()).map(|d| ProcRef {
            pid: d.pid,
            start_time: d.start_time,
        });
        let ndev = devices(&paths, vm.as_ref()).map(|d| d.len()).ok();
        rows.push(json!({
            "id": id,
            "shim_pid": vm.as_ref().and_then(|v| v.shim).map(|p| p.pid),
            "shim_alive": alive(vm.as_ref().and_then(|v| v.shim)),
            "vm_pid": qemu.map(|p| p.pid),
            "vm_alive": alive(qemu),
            "containers": containers,
            "devices": ndev,
            "error": err,
        }));
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_default()
        );
        return Ok(0);
    }
    println!(
        "{:<24} {:>10} {:>10} {:>8} {:>8}  CONTAINERS",
        "SANDBOX", "SHIM", "VM PID", "VM", "DEVICES"
    );
    for r in rows {
        let pid = |k: &str| r[k].as_u64().map_or("-".to_string(), |p| p.to_string());
        println!(
            "{:<24} {:>10} {:>10} {:>8} {:>8}  {}{}",
            r["id"].as_str().unwrap_or_default(),
            format!(
                "{}{}",
                pid("shim_pid"),
                if r["shim_alive"] == true { "" } else { "!" }
            ),
            pid("vm_pid"),
            if r["vm_alive"] == true {
                "alive"
            } else {
                "dead"
            },
            r["devices"].as_u64().map_or("?".into(), |n| n.to_string()),
            r["containers"]
                .as_array()
                .map(|c| c
                    .iter()
                    .filter_map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(","))
                .unwrap_or_default(),
            r["error"]
                .as_str()
                .map(|e| format!("  ({e})"))
                .unwrap_or_default(),
        );
    }
    Ok(0)
}

/// Differences between the device manager's records and the devices QEMU
/// has (by device manager id).
pub fn drift(records: &[DeviceRecord], vm_ids: &BTreeSet<String>) -> Vec<String> {
    let mut out = Vec::new();
    for r in records {
        let id = r.id.to_string();
        let in_vm = vm_ids.contains(&id);
        let generic = matches!(r.kind, DeviceKind::Generic);
        match r.status {
            DeviceStatus::Attached if !generic && !in_vm => out.push(format!(
                "{id} ({}) is recorded attached, but QEMU does not have it",
                r.describe()
            )),
            DeviceStatus::Detached if in_vm => out.push(format!(
                "{id} ({}) is recorded detached, but QEMU still has it",
                r.describe()
            )),
            DeviceStatus::Attaching | DeviceStatus::Detaching | DeviceStatus::UnplugPending => out
                .push(format!(
                    "{id} ({}) is {} (in flight); QEMU {} it",
                    r.describe(),
                    r.status,
                    if in_vm { "has" } else { "does not have" }
                )),
            _ => {}
        }
    }
    let known: BTreeSet<String> = records.iter().map(|r| r.id.to_string()).collect();
    for id in vm_ids.difference(&known) {
        out.push(format!(
            "QEMU has cap-{id}, which the device manager does not know"
        ));
    }
    out
}

async fn vm_devices(vm: &SandboxRecord) -> Result<VmDevices, String> {
    if let (Some(addr), true) = (&vm.shim_address, alive(vm.shim)) {
        let v = crate::admin::query_vm_devices(addr, Duration::from_secs(10))
            .await
            .map_err(|e| e.to_string())?;
        return serde_json::from_value(v).map_err(|e| format!("the shim's device list: {e}"));
    }
    let desc = vm.qemu.clone().ok_or("QEMU was never started")?;
    let qemu = QemuVm::attach(desc).await.map_err(|e| e.to_string())?;
    let d = qemu.devices().await.map_err(|e| e.to_string())?;
    qemu.disconnect().await;
    Ok(d)
}

pub async fn inspect(a: &Args, config: &Config) -> Result<i32, String> {
    let id = a.target.as_deref().unwrap_or_default();
    state::check_id("sandbox id", id).map_err(|e| e.to_string())?;
    let paths = SandboxPaths::new(&config.state_dir, id);
    if !paths.dir.is_dir() {
        return Err(format!(
            "no sandbox {id} under {}",
            config.sandboxes_dir().display()
        ));
    }
    let vm = state::load::<SandboxRecord>(&paths.sandbox_file()).map_err(|e| e.to_string())?;
    let containers = vm
        .as_ref()
        .map(|v| v.containers.clone())
        .unwrap_or_default();
    let records = devices(&paths, vm.as_ref())?;
    let (vm_devs, vm_error) = match &vm {
        Some(v) => match vm_devices(v).await {
            Ok(d) => (Some(d), None),
            Err(e) => (None, Some(e)),
        },
        None => (None, Some("no sandbox.json".to_string())),
    };
    let drift = vm_devs
        .as_ref()
        .map(|d| drift(&records, &d.capsule_ids()))
        .unwrap_or_default();
    let endpoints: Vec<serde_json::Value> = records
        .iter()
        .filter_map(|r| match &r.kind {
            DeviceKind::Network(ep) => Some(json!({
                "id": r.id.to_string(),
                "netns": ep.netns,
                "link": ep.link,
                "tap": ep.tap,
                "mac": ep.mac,
                "mtu": ep.mtu,
                "queues": ep.queues,
                "status": r.status.to_string(),
                "guest_address": r.guest_address,
            })),
            _ => None,
        })
        .collect();
    if a.json {
        let v = json!({
            "sandbox": id,
            "network": endpoints,
            "vm": vm,
            "containers": containers,
            "devices": records,
            "vm_devices": vm_devs,
            "vm_error": vm_error,
            "drift": drift,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(if drift.is_empty() { 0 } else { 3 });
    }
    println!("sandbox {id} ({})", paths.dir.display());
    if let Some(v) = &vm {
        let p = |r: Option<ProcRef>| match r {
            Some(r) => format!(
                "pid {} ({})",
                r.pid,
                if alive(Some(r)) { "alive" } else { "gone" }
            ),
            None => "-".into(),
        };
        println!(
            "  shim       {}  {}",
            p(v.shim),
            v.shim_address.clone().unwrap_or_default()
        );
        let q = v.qemu.as_ref().map(|d| ProcRef {
            pid: d.pid,
            start_time: d.start_time,
        });
        println!("  qemu       {}", p(q));
        println!("  virtiofsd  {}", p(v.virtiofsd));
    }
    println!("containers:");
    for c in containers.values() {
        // Which devices a container uses: devices.json's owners.
        let owner = capsule_devmgr::Owner::container(c.id.clone());
        let used: Vec<String> = records
            .iter()
            .flat_map(|r| {
                r.uses_of(&owner).filter_map(move |u| {
                    u.request
                        .as_ref()
                        .map(|i| format!("{}={}", r.id, i.container_path.display()))
                })
            })
            .collect();
        println!(
            "  {:<20} {:<9} {}  devices: {}",
            c.id,
            format!("{:?}", c.status).to_lowercase(),
            c.bundle.display(),
            used.join(" ")
        );
    }
    println!("devices:");
    println!(
        "  {:<6} {:<16} {:<15} {:>4} {:>4}  {:<18} HOST",
        "ID", "KIND", "STATUS", "REFS", "ATT", "GUEST"
    );
    for r in &records {
        println!(
            "  {:<6} {:<16} {:<15} {:>4} {:>4}  {:<18} {}",
            r.id.to_string(),
            r.kind.name(),
            r.status.to_string(),
            r.ref_count(),
            r.attach_count,
            r.guest_address
                .as_ref()
                .map(|g| serde_json::to_string(g).unwrap_or_default())
                .unwrap_or_else(|| "-".into()),
            r.host_path.display()
        );
    }
    if !endpoints.is_empty() {
        println!("network:");
        for e in &endpoints {
            let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            println!(
                "  {:<6} {} -> tap {}  mac {}  mtu {}  queues {}  netns {}  guest {}",
                s("id"),
                s("link"),
                s("tap"),
                s("mac"),
                e["mtu"],
                e["queues"],
                e["netns"].as_str().unwrap_or_default(),
                e["guest_address"]
            );
        }
    }
    match (&vm_devs, &vm_error) {
        (Some(d), _) => {
            println!("QEMU devices:");
            for dev in &d.devices {
                println!(
                    "  {:<16} {:<22} {}",
                    dev.qdev_id,
                    dev.driver,
                    dev.pci_path
                        .as_ref()
                        .map(|p| p.to_string())
                        .unwrap_or_default()
                );
            }
        }
        (None, Some(e)) => println!("QEMU devices: unavailable ({e})"),
        _ => {}
    }
    if drift.is_empty() {
        if vm_devs.is_some() {
            println!("drift: none");
        }
        Ok(0)
    } else {
        println!("DRIFT:");
        for d in &drift {
            println!("  {d}");
        }
        Ok(3)
    }
}

pub async fn cleanup(a: &Args, config: &Config) -> Result<i32, String> {
    let id = a.target.as_deref().unwrap_or_default();
    state::check_id("sandbox id", id).map_err(|e| e.to_string())?;
    let paths = SandboxPaths::new(&config.state_dir, id);
    if !paths.dir.exists() {
        println!("sandbox {id}: nothing to clean up");
        return Ok(0);
    }
    let vm = state::load::<SandboxRecord>(&paths.sandbox_file())
        .ok()
        .flatten();
    // A shim that was just killed may still be exiting.
    let mut alive = cleanup::shim_alive(&paths, vm.as_ref(), &RealProcesses);
    for _ in 0..20 {
        if !alive {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        alive = cleanup::shim_alive(&paths, vm.as_ref(), &RealProcesses);
    }
    if alive {
        let shim = vm.as_ref().and_then(|v| v.shim);
        if !a.force {
            return Err(format!(
                "sandbox {id} is served by a running shim (pid {}); delete its containers through containerd, or use --force",
                shim.map(|s| s.pid).unwrap_or(0)
            ));
        }
        if let Some(s) = shim {
            let mut r = cleanup::Report::default();
            cleanup::stop_process(&RealProcesses, s, "shim", KillTiming::default(), &mut r).await;
            for e in &r.errors {
                eprintln!("capsule: {e}");
            }
        }
    }
    let report = cleanup::teardown(&paths, &[], &RealProcesses, KillTiming::default()).await;
    for a in &report.actions {
        println!("{a}");
    }
    for e in &report.errors {
        eprintln!("capsule: {e}");
    }
    Ok(if report.is_clean() { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_both_ways() {
        let mut a = DeviceRecord {
            id: capsule_devmgr::DeviceId(0),
            host_path: "/dev/loop0".into(),
            kind: DeviceKind::Block,
            driver: Some(capsule_devmgr::BlockDriver::VirtioScsi),
            uses: vec![capsule_devmgr::DeviceUse::new(
                capsule_devmgr::Owner::runtime("test"),
                None,
            )],
            attach_count: 1,
            status: DeviceStatus::Attached,
            resources: Default::default(),
            guest_address: None,
        };
        let mut b = a.clone();
        b.id = capsule_devmgr::DeviceId(1);
        b.status = DeviceStatus::Detached;
        b.attach_count = 0;
        let vm: BTreeSet<String> = ["dev1".to_string(), "dev7".to_string()].into();
        let d = drift(&[a.clone(), b.clone()], &vm);
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d[0].contains("dev0") && d[0].contains("does not have"));
        assert!(d[1].contains("dev1") && d[1].contains("still has"));
        assert!(d[2].contains("cap-dev7"));
        a.status = DeviceStatus::Attached;
        let vm: BTreeSet<String> = ["dev0".to_string()].into();
        b.status = DeviceStatus::Detached;
        assert!(drift(&[a, b], &vm).is_empty());
    }
}
