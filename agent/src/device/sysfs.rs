//! Guest address -> device, resolved against the *current* sysfs tree.
//!
//! Pure functions over a sysfs root, so fixture trees can stand in for `/sys`.
//! Each returns `Err(reason)` while the device is not (yet) there; the reason
//! ends up in the timeout error. Nothing here caches anything.
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use capsule_agent_protocol::wire::{PciPath, PciSlot, ScsiAddr};

/// Where a device is, parsed from a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// virtio-blk-pci / vhost-user-blk-pci: the disk of the PCI device.
    PciBlock(PciPath),
    /// A disk on a SCSI host (capsule's virtio-scsi preferred).
    Scsi(ScsiAddr),
    /// `/dev/pmemN`.
    Pmem(u32),
    /// The VFIO group node shared by these PCI functions.
    Vfio(Vec<PciPath>),
    /// A block device by kernel name (virtio-mmio drives, loop devices).
    BlockName(String),
}

/// A device node found in sysfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Node path relative to the guest's /dev (`vdb`, `vfio/12`).
    pub name: String,
    pub major: u32,
    pub minor: u32,
    /// Block (true) or character device.
    pub block: bool,
}

/// Resolves `target` once.
pub fn find(sysfs: &Path, target: &Target) -> Result<Found, String> {
    match target {
        Target::PciBlock(path) => pci_block(sysfs, path),
        Target::Scsi(addr) => scsi_block(sysfs, *addr),
        Target::Pmem(index) => pmem_block(sysfs, *index),
        Target::Vfio(paths) => vfio_group(sysfs, paths),
        Target::BlockName(name) => named_block(sysfs, name),
    }
}

/// Parses a sysfs `dev` file: `MAJOR:MINOR\n`.
pub fn read_dev(path: &Path) -> Result<(u32, u32), String> {
    let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (maj, min) = text
        .trim()
        .split_once(':')
        .ok_or_else(|| format!("{}: {text:?} is not MAJOR:MINOR", path.display()))?;
    match (maj.parse(), min.parse()) {
        (Ok(maj), Ok(min)) => Ok((maj, min)),
        _ => Err(format!("{}: {text:?} is not MAJOR:MINOR", path.display())),
    }
}

/// Sorted names of the entries of `dir` (empty when it does not exist).
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn hop_suffix(hop: PciSlot) -> String {
    format!(":{:02x}.{:x}", hop.slot, hop.function)
}

/// `DDDD:BB:SS.F`: a PCI device entry name.
fn is_bdf(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && b.iter()
            .enumerate()
            .all(|(i, c)| matches!(i, 4 | 7 | 10) || c.is_ascii_hexdigit())
}

/// The sysfs directory of the PCI device at `path`: the first hop is on the
/// root bus `0000:00`, each further hop on the secondary bus of the bridge
/// before it (its `pci_bus/DDDD:BB` entry; bridge children are subdirectories).
pub fn pci_device(sysfs: &Path, path: &PciPath) -> Result<PathBuf, String> {
    let mut dir = sysfs.join("devices/pci0000:00");
    let mut bus = String::from("0000:00");
    for (i, hop) in path.hops().iter().enumerate() {
        if i > 0 {
            let bridge = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            bus = match entries(&dir.join("pci_bus")).into_iter().next() {
                Some(b) => b,
                // No pci_bus (yet): accept a child entry with the right slot.
                None => match entries(&dir).into_iter().find(|n| is_bdf(n) && n.ends_with(&hop_suffix(*hop))) {
                    Some(child) => child[..7].to_owned(),
                    None => return Err(format!("PCI device {bridge} has no secondary bus (not a bridge, or not enumerated yet)")),
                },
            };
        }
        let name = format!("{bus}{}", hop_suffix(*hop));
        let next = dir.join(&name);
        if !next.is_dir() {
            return Err(format!(
                "no PCI device {name} (hop {} of PCI path {path})",
                i + 1
            ));
        }
        dir = next;
    }
    Ok(dir)
}

/// The (first) block device `<dir>/block/<name>`.
fn block_in(dir: &Path) -> Option<PathBuf> {
    entries(&dir.join("block"))
        .into_iter()
        .next()
        .map(|n| dir.join("block").join(n))
}

/// A block device directory -> [`Found`], once its `dev` file is readable.
fn block_found(blk: &Path) -> Result<Found, String> {
    let name = blk
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (major, minor) = read_dev(&blk.join("dev"))?;
    Ok(Found {
        name,
        major,
        minor,
        block: true,
    })
}

/// The disk of a virtio-blk (or vhost-user-blk) PCI device:
/// `<pci>/virtioN/block/<name>` (or `<pci>/block/<name>`).
pub fn pci_block(sysfs: &Path, path: &PciPath) -> Result<Found, String> {
    let dev = pci_device(sysfs, path)?;
    let blk = block_in(&dev).or_else(|| {
        entries(&dev)
            .into_iter()
            .filter(|n| n.starts_with("virtio"))
            .find_map(|n| block_in(&dev.join(n)))
    });
    match blk {
        Some(blk) => block_found(&blk),
        None => Err(format!(
            "PCI device {} has no block device",
            dev.file_name().unwrap_or_default().to_string_lossy()
        )),
    }
}

/// SCSI hosts under `class/scsi_host`: (number, is virtio-scsi), virtio first.
pub fn scsi_hosts(sysfs: &Path) -> Vec<(u32, bool)> {
    let class = sysfs.join("class/scsi_host");
    let mut hosts: Vec<(u32, bool)> = entries(&class)
        .into_iter()
        .filter_map(|n| {
            let h = n.strip_prefix("host")?.parse().ok()?;
            let proc_name =
                fs::read_to_string(class.join(&n).join("proc_name")).unwrap_or_default();
            Some((h, proc_name.trim() == "virtio_scsi"))
        })
        .collect();
    hosts.sort_by_key(|(h, virtio)| (!virtio, *h));
    hosts
}

/// The disk at `H:0:ID:LUN` under `bus/scsi/devices`, for any host H that
/// has one, virtio-scsi hosts first.
pub fn scsi_block(sysfs: &Path, addr: ScsiAddr) -> Result<Found, String> {
    let devices = sysfs.join("bus/scsi/devices");
    let suffix = format!(":0:{}:{}", addr.id, addr.lun);
    let virtio: Vec<u32> = scsi_hosts(sysfs)
        .into_iter()
        .filter(|h| h.1)
        .map(|h| h.0)
        .collect();
    let mut candidates: Vec<(bool, u32, String)> = entries(&devices)
        .into_iter()
        .filter_map(|n| {
            let host: u32 = n.strip_suffix(&suffix)?.parse().ok()?;
            Some((!virtio.contains(&host), host, n))
        })
        .collect();
    candidates.sort();
    let mut seen = Vec::new();
    for (_, _, name) in &candidates {
        match block_in(&devices.join(name)) {
            Some(blk) => return block_found(&blk),
            None => seen.push(name.as_str()),
        }
    }
    if seen.is_empty() {
        Err(format!(
            "no SCSI device 0:{}:{} on any host",
            addr.id, addr.lun
        ))
    } else {
        Err(format!(
            "SCSI device {} has no block device (yet)",
            seen.join(", ")
        ))
    }
}

/// Asks the kernel to scan `0 ID LUN` on capsule's virtio-scsi hosts (every
/// host when none is known as virtio-scsi). Blocking: the write returns when
/// the scan is done. Returns how many hosts accepted the request.
pub fn scsi_rescan(sysfs: &Path, addr: ScsiAddr) -> usize {
    let hosts = scsi_hosts(sysfs);
    let any_virtio = hosts.iter().any(|h| h.1);
    let mut done = 0;
    for (h, virtio) in hosts {
        if any_virtio && !virtio {
            continue;
        }
        let scan = sysfs.join(format!("class/scsi_host/host{h}/scan"));
        let res = fs::OpenOptions::new()
            .write(true)
            .open(&scan)
            .and_then(|mut f| f.write_all(format!("0 {} {}", addr.id, addr.lun).as_bytes()));
        match res {
            Ok(()) => done += 1,
            Err(e) => tracing::debug!("SCSI rescan {}: {e}", scan.display()),
        }
    }
    done
}

/// `pmemN`: `block/pmemN`, or a namespace's `block/pmemN` on the nd bus.
pub fn pmem_block(sysfs: &Path, index: u32) -> Result<Found, String> {
    let name = format!("pmem{index}");
    let direct = sysfs.join("block").join(&name);
    if direct.join("dev").exists() {
        return block_found(&direct);
    }
    let nd = sysfs.join("bus/nd/devices");
    for ns in entries(&nd) {
        let blk = nd.join(ns).join("block").join(&name);
        if blk.join("dev").exists() {
            return block_found(&blk);
        }
    }
    Err(format!("no block device {name}"))
}

/// A block device by kernel name: `block/<name>`.
pub fn named_block(sysfs: &Path, name: &str) -> Result<Found, String> {
    let dir = sysfs.join("block").join(name);
    if !dir.exists() {
        return Err(format!("no block device {name}"));
    }
    block_found(&dir)
}

/// The IOMMU group number of a PCI device (`<dev>/iommu_group` link).
fn iommu_group(dev: &Path) -> Result<String, String> {
    let link = fs::read_link(dev.join("iommu_group")).map_err(|_| {
        format!(
            "PCI device {} has no IOMMU group",
            dev.file_name().unwrap_or_default().to_string_lossy()
        )
    })?;
    let group = link
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if group.is_empty() || !group.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "IOMMU group link {} is not a group number",
            link.display()
        ));
    }
    Ok(group)
}

/// The VFIO group node of the functions at `paths` (all in one group):
/// `vfio/<group>` (or `vfio/noiommu-<group>`) with the numbers of
/// `class/vfio/<node>/dev`.
pub fn vfio_group(sysfs: &Path, paths: &[PciPath]) -> Result<Found, String> {
    let mut group: Option<(String, String)> = None;
    for path in paths {
        let dev = pci_device(sysfs, path)?;
        let g = iommu_group(&dev)?;
        match &group {
            Some((first, first_path)) if *first != g => {
                return Err(format!("PCI paths {first_path} and {path} are in different IOMMU groups ({first}, {g})"));
            }
            Some(_) => {}
            None => group = Some((g, path.to_string())),
        }
    }
    let Some((group, _)) = group else {
        return Err("no PCI path".into());
    };
    for node in [group.clone(), format!("noiommu-{group}")] {
        let dev = sysfs.join("class/vfio").join(&node).join("dev");
        if dev.exists() {
            let (major, minor) = read_dev(&dev)?;
            return Ok(Found {
                name: format!("vfio/{node}"),
                major,
                minor,
                block: false,
            });
        }
    }
    Err(format!(
        "IOMMU group {group} has no VFIO node (functions not bound to vfio-pci yet?)"
    ))
}

/// Best effort: binds the functions at `paths` to `vfio-pci` (driver_override,
/// unbind from the current driver, drivers_probe). Returns how many were asked.
pub fn vfio_bind(sysfs: &Path, paths: &[PciPath]) -> usize {
    let write = |p: PathBuf, v: &str| {
        let r = fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .and_then(|mut f| f.write_all(v.as_bytes()));
        if let Err(e) = &r {
            tracing::debug!("vfio bind: {}: {e}", p.display());
        }
        r.is_ok()
    };
    let mut asked = 0;
    for path in paths {
        let Ok(dev) = pci_device(sysfs, path) else {
            continue;
        };
        let bdf = dev
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let driver = fs::read_link(dev.join("driver")).ok();
        if driver
            .as_deref()
            .and_then(Path::file_name)
            .is_some_and(|d| d == "vfio-pci")
        {
            continue;
        }
        if !write(dev.join("driver_override"), "vfio-pci") {
            continue;
        }
        if driver.is_some() {
            write(dev.join("driver/unbind"), &bdf);
        }
        write(sysfs.join("bus/pci/drivers_probe"), &bdf);
        asked += 1;
    }
    asked
}
