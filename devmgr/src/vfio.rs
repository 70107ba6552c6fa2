//! VFIO nodes: legacy groups (`/dev/vfio/<N>`), the container node
//! (`/dev/vfio/vfio`) and iommufd cdevs (`/dev/vfio/devices/vfioX`).
//!
//! A legacy group's members are the entries of
//! `<sysfs>/kernel/iommu_groups/<N>/devices/`: PCI functions named by their
//! address (`0000:3b:00.0`) and mediated devices named by their UUID. Host
//! and PCI-to-PCI bridges (class `0x0600xx`, `0x0604xx`) are skipped; every
//! other entry must parse, or the whole group is rejected. A cdev is one
//! device: `<sysfs>/class/vfio-dev/vfioX/device` links to it.
//!
//! For each PCI function:
//! - `vendor`, `device`, `class`: hex (`0x10de`), mandatory;
//! - PCIe when the `config` file is larger than 256 bytes;
//! - `large_bar` when one of the six standard BARs in `resource` (lines of
//!   `start end flags`) is a 64-bit memory BAR (`IORESOURCE_MEM` 0x200 and
//!   `IORESOURCE_MEM_64` 0x100000 set) of 4 GiB or more. ROM and SR-IOV
//!   lines are not BARs of this function and are ignored.
//!
//! A missing `config` or `resource` file is logged and read as "PCI" / "no
//! large BAR"; real sysfs always has both.
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use crate::device::{Bdf, DevType, DeviceInfo, DeviceKind, VfioFunction, VfioGroup, VfioMode};
pub use crate::resolve::ResolveError;
use crate::resolve::{describe, is_missing};
use crate::uevent::parse_decimal_u32;

/// `IORESOURCE_MEM` from `linux/ioport.h`.
pub const IORESOURCE_MEM: u64 = 0x0000_0200;
/// `IORESOURCE_MEM_64` from `linux/ioport.h`: a 64-bit memory BAR.
pub const IORESOURCE_MEM_64: u64 = 0x0010_0000;
/// A BAR this large needs a large MMIO window in the guest.
pub const LARGE_BAR_BYTES: u64 = 4 << 30;
/// Standard BARs in a `resource` file (the lines after them are the ROM,
/// bridge windows and SR-IOV BARs).
const STANDARD_BARS: usize = 6;
/// Standard PCI config space size; PCIe extends it to 4096.
const PCI_CONFIG_BYTES: u64 = 256;
/// Largest sysfs attribute read.
const ATTR_MAX_BYTES: u64 = 64 * 1024;

/// What a node under `/dev/vfio/` is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VfioNode {
    /// `/dev/vfio/vfio`: the legacy container node, not a device.
    Container,
    /// `/dev/vfio/<N>`: legacy group N (decimal).
    Group(String),
    /// `/dev/vfio/devices/vfioX`: an iommufd cdev.
    Cdev(String),
}

/// Classifies a path relative to `<dev_root>/vfio`.
pub fn classify(rel: &Path) -> Result<VfioNode, String> {
    let parts: Vec<&str> = rel
        .components()
        .map(|c| match c {
            Component::Normal(s) => s.to_str(),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| format!("vfio/{} is not a VFIO node name", rel.display()))?;
    match parts.as_slice() {
        ["vfio"] => Ok(VfioNode::Container),
        [n] if is_group_name(n) => Ok(VfioNode::Group((*n).to_owned())),
        ["devices", c] if is_cdev_name(c) => Ok(VfioNode::Cdev((*c).to_owned())),
        _ => Err(format!(
            "vfio/{} is neither a group (vfio/<N>), the container (vfio/vfio) nor a cdev (vfio/devices/vfioN)",
            rel.display()
        )),
    }
}

/// Group names are decimal numbers.
pub fn is_group_name(s: &str) -> bool {
    parse_decimal_u32(s.as_bytes()).is_some()
}

/// Cdev names are `vfio` followed by a decimal number.
pub fn is_cdev_name(s: &str) -> bool {
    s.strip_prefix("vfio").is_some_and(is_group_name)
}

/// Mediated devices are named by a UUID: 8-4-4-4-12 hex digits.
pub fn is_mdev_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    groups.len() == lens.len()
        && groups
            .iter()
            .zip(lens)
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Resolves a char node found at `<dev_root>/vfio/<rel>` to its kind.
pub fn resolve_node(
    sysfs_root: &Path,
    info: &DeviceInfo,
    rel: &Path,
) -> Result<DeviceKind, ResolveError> {
    let dev = describe(info);
    let node = classify(rel).map_err(|why| ResolveError::invalid(&dev, why))?;
    if info.dev_type == DevType::Block {
        return Err(ResolveError::invalid(
            dev,
            "a block device cannot be a VFIO node",
        ));
    }
    match node {
        VfioNode::Container => Ok(DeviceKind::Generic),
        VfioNode::Group(g) => legacy_group(sysfs_root, &g, &dev).map(DeviceKind::Vfio),
        VfioNode::Cdev(c) => iommufd_cdev(sysfs_root, &c, &dev).map(DeviceKind::Vfio),
    }
}

/// Reads legacy IOMMU group `group` from `<sysfs_root>/kernel/iommu_groups`.
/// `device` names the request in errors.
pub fn legacy_group(
    sysfs_root: &Path,
    group: &str,
    device: &str,
) -> Result<VfioGroup, ResolveError> {
    let err = |reason: String| ResolveError::Vfio {
        device: device.to_owned(),
        group: format!("group {group}"),
        reason,
    };
    if !is_group_name(group) {
        return Err(err("group name must be a decimal number".into()));
    }
    let canon_sysfs = canonical_root(sysfs_root).map_err(&err)?;
    let dir = sysfs_root
        .join("kernel/iommu_groups")
        .join(group)
        .join("devices");
    let names = list_names(&dir).map_err(&err)?;
    let mut functions = Vec::new();
    for name in names {
        if let Some(f) = group_member(&dir, &name, &canon_sysfs).map_err(&err)? {
            functions.push(f);
        }
    }
    if functions.is_empty() {
        return Err(err(format!(
            "{} has no devices to pass through (bridges are skipped)",
            dir.display()
        )));
    }
    functions.sort_by_key(sort_key);
    Ok(VfioGroup {
        group: group.to_owned(),
        mode: VfioMode::Legacy,
        functions,
    })
}

/// Reads iommufd cdev `cdev` (`vfio3`): the one device its
/// `<sysfs_root>/class/vfio-dev/<cdev>/device` link points to.
pub fn iommufd_cdev(
    sysfs_root: &Path,
    cdev: &str,
    device: &str,
) -> Result<VfioGroup, ResolveError> {
    let err = |reason: String| ResolveError::Vfio {
        device: device.to_owned(),
        group: format!("cdev {cdev}"),
        reason,
    };
    if !is_cdev_name(cdev) {
        return Err(err("cdev name must be vfio<N>".into()));
    }
    let canon_sysfs = canonical_root(sysfs_root).map_err(&err)?;
    let link = sysfs_root.join("class/vfio-dev").join(cdev).join("device");
    let target = canonical_inside(&link, &canon_sysfs).map_err(&err)?;
    let name = target
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| err(format!("{} has no usable name", target.display())))?
        .to_owned();
    let function = member_at(&target, &name, &canon_sysfs)
        .map_err(&err)?
        .ok_or_else(|| err(format!("{name} is a bridge, not a device to pass through")))?;
    Ok(VfioGroup {
        group: cdev.to_owned(),
        mode: VfioMode::Iommufd,
        functions: vec![function],
    })
}

/// Sorted entry names of `dir`; every name must be UTF-8.
fn list_names(dir: &Path) -> Result<Vec<String>, String> {
    let entries = fs::read_dir(dir).map_err(|e| match is_missing(&e) {
        true => format!("no such IOMMU group ({} is missing)", dir.display()),
        false => format!("cannot list {}: {e}", dir.display()),
    })?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        let name = entry.file_name();
        let name = name.to_str().ok_or_else(|| {
            format!(
                "malformed entry {:?} in {}",
                name.to_string_lossy(),
                dir.display()
            )
        })?;
        names.push(name.to_owned());
    }
    names.sort();
    Ok(names)
}

/// One entry of a group's `devices/` directory; `None` for a bridge.
fn group_member(
    dir: &Path,
    name: &str,
    canon_sysfs: &Path,
) -> Result<Option<VfioFunction>, String> {
    member_at(&dir.join(name), name, canon_sysfs)
}

/// A device at `path` (followed), named `name`; `None` for a bridge.
fn member_at(path: &Path, name: &str, canon_sysfs: &Path) -> Result<Option<VfioFunction>, String> {
    if is_mdev_uuid(name) {
        let sysfsdev = canonical_inside(path, canon_sysfs)?;
        return Ok(Some(VfioFunction::Mediated {
            uuid: name.to_owned(),
            sysfsdev,
        }));
    }
    let bdf: Bdf = name.parse().map_err(|e| {
        format!("malformed entry {name:?}: neither a PCI address nor an mdev UUID ({e})")
    })?;
    pci_function(path, bdf).map_err(|e| format!("{bdf}: {e}"))
}

/// Reads a PCI function's attributes from its sysfs directory; `None` for
/// host and PCI-to-PCI bridges.
pub fn pci_function(dir: &Path, bdf: Bdf) -> Result<Option<VfioFunction>, String> {
    let class = read_hex(&dir.join("class"), 0xff_ffff)?;
    if is_bridge(class) {
        tracing::debug!(%bdf, class = format_args!("{class:#08x}"), "skipping bridge in IOMMU group");
        return Ok(None);
    }
    let vendor = read_hex(&dir.join("vendor"), 0xffff)? as u16;
    let device = read_hex(&dir.join("device"), 0xffff)? as u16;
    let is_pcie = match fs::metadata(dir.join("config")) {
        Ok(m) => m.len() > PCI_CONFIG_BYTES,
        Err(e) if is_missing(&e) => {
            tracing::warn!(%bdf, "no config file; assuming conventional PCI");
            false
        }
        Err(e) => return Err(format!("config: {e}")),
    };
    let large_bar = match read_attr(&dir.join("resource")) {
        Ok(text) => has_large_bar(&text).map_err(|e| format!("resource: {e}"))?,
        Err(e) if is_missing(&e) => {
            tracing::warn!(%bdf, "no resource file; assuming no large BAR");
            false
        }
        Err(e) => return Err(format!("resource: {e}")),
    };
    Ok(Some(VfioFunction::Pci {
        bdf,
        vendor,
        device,
        class,
        is_pcie,
        large_bar,
    }))
}

/// Host bridge (0x0600xx) or PCI-to-PCI bridge (0x0604xx).
pub fn is_bridge(class: u32) -> bool {
    matches!(class >> 8, 0x0600 | 0x0604)
}

/// Parses a sysfs hex attribute: `0x10de` (the `0x` is optional), with an
/// optional trailing newline.
pub fn parse_hex_attr(text: &str, max: u32) -> Result<u32, String> {
    let t = text.strip_suffix('\n').unwrap_or(text);
    let digits = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{t:?} is not a hex number"));
    }
    u32::from_str_radix(digits, 16)
        .ok()
        .filter(|v| *v <= max)
        .ok_or_else(|| format!("{t:?} is larger than {max:#x}"))
}

/// Whether a `resource` file shows a 64-bit memory BAR of 4 GiB or more
/// among the standard BARs. Every line must be `start end flags` in hex.
pub fn has_large_bar(text: &str) -> Result<bool, String> {
    let mut large = false;
    for (i, line) in text.lines().enumerate().take(STANDARD_BARS) {
        let (start, end, flags) =
            parse_resource_line(line).map_err(|e| format!("line {}: {e}", i + 1))?;
        let size = if end >= start && (start, end) != (0, 0) {
            (end - start).saturating_add(1)
        } else {
            0
        };
        let mem64 = flags & IORESOURCE_MEM != 0 && flags & IORESOURCE_MEM_64 != 0;
        large |= mem64 && size >= LARGE_BAR_BYTES;
    }
    Ok(large)
}

fn parse_resource_line(line: &str) -> Result<(u64, u64, u64), String> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [start, end, flags] = fields.as_slice() else {
        return Err(format!("{line:?} is not `start end flags`"));
    };
    let hex = |s: &str| {
        let d = s.strip_prefix("0x").unwrap_or(s);
        if d.is_empty() || d.len() > 16 || !d.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{s:?} is not a hex number"));
        }
        u64::from_str_radix(d, 16).map_err(|e| format!("{s:?}: {e}"))
    };
    Ok((hex(start)?, hex(end)?, hex(flags)?))
}

/// Sort order of a group's functions: PCI by address, then mdevs by UUID.
fn sort_key(f: &VfioFunction) -> (u8, Option<Bdf>, String) {
    match f {
        VfioFunction::Pci { bdf, .. } => (0, Some(*bdf), String::new()),
        VfioFunction::Mediated { uuid, .. } => (1, None, uuid.to_ascii_lowercase()),
    }
}

fn read_attr(path: &Path) -> io::Result<String> {
    use std::io::Read;
    let mut s = String::new();
    fs::File::open(path)?
        .take(ATTR_MAX_BYTES)
        .read_to_string(&mut s)?;
    Ok(s)
}

fn read_hex(path: &Path, max: u32) -> Result<u32, String> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let text = read_attr(path).map_err(|e| format!("{name}: {e}"))?;
    parse_hex_attr(&text, max).map_err(|e| format!("{name}: {e}"))
}

fn canonical_root(sysfs_root: &Path) -> Result<PathBuf, String> {
    fs::canonicalize(sysfs_root).map_err(|e| format!("sysfs root {}: {e}", sysfs_root.display()))
}

/// Canonicalizes `path` and checks it stays inside `canon_sysfs`.
fn canonical_inside(path: &Path, canon_sysfs: &Path) -> Result<PathBuf, String> {
    let real = fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !real.starts_with(canon_sysfs) {
        return Err(format!(
            "{} resolves outside sysfs, to {}",
            path.display(),
            real.display()
        ));
    }
    Ok(real)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_vfio_nodes() {
        assert_eq!(classify(Path::new("vfio")), Ok(VfioNode::Container));
        assert_eq!(classify(Path::new("12")), Ok(VfioNode::Group("12".into())));
        assert_eq!(
            classify(Path::new("devices/vfio3")),
            Ok(VfioNode::Cdev("vfio3".into()))
        );
        for bad in [
            "",
            "x",
            "12a",
            "-1",
            "devices",
            "devices/vfio",
            "devices/foo3",
            "12/x",
            "99999999999",
        ] {
            assert!(classify(Path::new(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn uuids() {
        assert!(is_mdev_uuid("83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"));
        assert!(is_mdev_uuid("83B8F4F2-509F-382F-3C1E-E6BFE0FA1001"));
        for bad in [
            "",
            "83b8f4f2509f382f3c1ee6bfe0fa1001",
            "83b8f4f2-509f-382f-3c1e-e6bfe0fa100",
            "g3b8f4f2-509f-382f-3c1e-e6bfe0fa1001",
            "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001-0",
        ] {
            assert!(!is_mdev_uuid(bad), "{bad}");
        }
    }

    #[test]
    fn hex_attributes() {
        assert_eq!(parse_hex_attr("0x10de\n", 0xffff), Ok(0x10de));
        assert_eq!(parse_hex_attr("10DE", 0xffff), Ok(0x10de));
        assert_eq!(parse_hex_attr("0x030000\n", 0xff_ffff), Ok(0x030000));
        for bad in [
            "",
            "0x",
            "0x1g",
            "0x10000",
            " 0x1",
            "0x1\n\n",
            "0x123456789",
        ] {
            assert!(parse_hex_attr(bad, 0xffff).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bridges() {
        assert!(is_bridge(0x060000));
        assert!(is_bridge(0x060400));
        assert!(is_bridge(0x060401));
        assert!(!is_bridge(0x060100));
        assert!(!is_bridge(0x030000));
    }

    #[test]
    fn large_bars() {
        let small = "0x00000000fa000000 0x00000000faffffff 0x0000000000040200\n";
        let big64 = "0x0000038000000000 0x00000387ffffffff 0x000000000014220c\n";
        let big32 = "0x0000038000000000 0x00000387ffffffff 0x0000000000040200\n";
        let empty = "0x0000000000000000 0x0000000000000000 0x0000000000000000\n";
        assert!(!has_large_bar(small).unwrap());
        assert!(has_large_bar(&format!("{small}{empty}{big64}")).unwrap());
        assert!(!has_large_bar(big32).unwrap());
        // The 7th line is the ROM and later lines SR-IOV BARs: ignored.
        assert!(!has_large_bar(&format!("{}{big64}", empty.repeat(6))).unwrap());
        assert!(!has_large_bar("").unwrap());
        assert!(has_large_bar("0x0 0xffffffff")
            .unwrap_err()
            .contains("line 1"));
        assert!(has_large_bar("0x0 0xzz 0x0").is_err());
        // end < start is an empty BAR, not an overflow.
        assert!(!has_large_bar("0x10 0x0 0x100200").unwrap());
        assert!(has_large_bar("0x0 0xffffffffffffffff 0x100200").unwrap());
    }
}
