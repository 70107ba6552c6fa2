//! Whether a host block device is in use by the host: mounted, holding a
//! mounted filesystem in a partition or in a device stacked on it (LVM,
//! dm-crypt, md), or active swap. Such a device never reaches a VM, whoever
//! asked for it: the guest writing to a disk the host has mounted corrupts
//! both.
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// How deep partitions and holders are followed (real stacks are 2-3 deep).
const MAX_DEPTH: usize = 8;

/// What holds a device, for the refusal message.
fn describe_use(dev: (u32, u32), name: &str, why: &str) -> String {
    format!("{name} ({}:{}) {why}", dev.0, dev.1)
}

/// The host's view, read once per check.
struct HostUse {
    /// `major:minor` of every mounted filesystem -> its first mount point.
    mounted: BTreeMap<(u32, u32), String>,
    /// Block devices that are active swap.
    swap: BTreeSet<(u32, u32)>,
}

impl HostUse {
    fn read(proc_root: &Path) -> io::Result<Self> {
        let mountinfo = fs::read_to_string(proc_root.join("self/mountinfo"))?;
        let mut mounted = BTreeMap::new();
        for line in mountinfo.lines() {
            let mut f = line.split(' ');
            let (Some(_), Some(_), Some(dev), Some(_), Some(point)) =
                (f.next(), f.next(), f.next(), f.next(), f.next())
            else {
                continue;
            };
            if let Some(d) = parse_dev(dev) {
                mounted.entry(d).or_insert_with(|| unescape(point));
            }
        }
        let mut swap = BTreeSet::new();
        // Missing on kernels without swap support: nothing is swap then.
        if let Ok(swaps) = fs::read_to_string(proc_root.join("swaps")) {
            for name in swaps
                .lines()
                .skip(1)
                .filter_map(|l| l.split_whitespace().next())
            {
                if let Ok(m) = fs::metadata(unescape(name)) {
                    if m.file_type().is_block_device() {
                        let rdev = m.rdev();
                        swap.insert((libc::major(rdev), libc::minor(rdev)));
                    }
                }
            }
        }
        Ok(Self { mounted, swap })
    }
}

/// `"8:1"` -> `(8, 1)`.
fn parse_dev(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Why block device `major:minor` is in use by the host, or `None`.
/// `sysfs_root` and `proc_root` are normally `/sys` and `/proc`.
pub fn block_device_in_use(
    sysfs_root: &Path,
    proc_root: &Path,
    major: u32,
    minor: u32,
) -> io::Result<Option<String>> {
    let host = HostUse::read(proc_root)?;
    let mut seen = BTreeSet::new();
    Ok(check(&host, sysfs_root, (major, minor), None, 0, &mut seen))
}

fn check(
    host: &HostUse,
    sysfs_root: &Path,
    dev: (u32, u32),
    via: Option<&str>,
    depth: usize,
    seen: &mut BTreeSet<(u32, u32)>,
) -> Option<String> {
    if depth > MAX_DEPTH || !seen.insert(dev) {
        return None;
    }
    let dir = sysfs_root.join(format!("dev/block/{}:{}", dev.0, dev.1));
    let name = fs::read_link(&dir)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| format!("block device {}:{}", dev.0, dev.1));
    let what = match via {
        Some(v) => format!("{v} {name}"),
        None => "it".to_string(),
    };
    if let Some(point) = host.mounted.get(&dev) {
        return Some(describe_use(dev, &what, &format!("is mounted at {point}")));
    }
    if host.swap.contains(&dev) {
        return Some(describe_use(dev, &what, "is active swap"));
    }
    // Partitions are subdirectories with a `partition` file; holders are
    // devices stacked on this one (dm, md).
    for (sub, relation) in [(dir.clone(), "partition"), (dir.join("holders"), "holder")] {
        let Ok(entries) = fs::read_dir(&sub) else {
            continue;
        };
        let mut names: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        names.sort();
        for p in names {
            if relation == "partition" && !p.join("partition").is_file() {
                continue;
            }
            let Some(child) = fs::read_to_string(p.join("dev"))
                .ok()
                .and_then(|s| parse_dev(&s))
            else {
                continue;
            };
            if let Some(why) = check(host, sysfs_root, child, Some(relation), depth + 1, seen) {
                return Some(why);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// /sys and /proc fixtures: sda (8:0) with partition sda1 (8:1),
    /// dm-0 (253:0) stacked on sda1.
    fn fixture(mounted: &str, swaps: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let sys = d.path().join("sys");
        let devices = sys.join("devices/virtual/block");
        let sda = devices.join("sda");
        std::fs::create_dir_all(sda.join("sda1/holders")).unwrap();
        std::fs::create_dir_all(sda.join("holders")).unwrap();
        std::fs::write(sda.join("dev"), "8:0\n").unwrap();
        std::fs::write(sda.join("sda1/dev"), "8:1\n").unwrap();
        std::fs::write(sda.join("sda1/partition"), "1\n").unwrap();
        let dm = devices.join("dm-0");
        std::fs::create_dir_all(dm.join("holders")).unwrap();
        std::fs::write(dm.join("dev"), "253:0\n").unwrap();
        std::os::unix::fs::symlink(&dm, sda.join("sda1/holders/dm-0")).unwrap();
        std::fs::create_dir_all(sys.join("dev/block")).unwrap();
        for (n, p) in [("8:0", &sda), ("8:1", &sda.join("sda1")), ("253:0", &dm)] {
            std::os::unix::fs::symlink(p, sys.join("dev/block").join(n)).unwrap();
        }
        let proc_self = d.path().join("proc/self");
        std::fs::create_dir_all(&proc_self).unwrap();
        std::fs::write(proc_self.join("mountinfo"), mounted).unwrap();
        std::fs::write(d.path().join("proc/swaps"), swaps).unwrap();
        d
    }

    fn in_use(d: &tempfile::TempDir, major: u32, minor: u32) -> Option<String> {
        block_device_in_use(&d.path().join("sys"), &d.path().join("proc"), major, minor).unwrap()
    }

    const HEADER: &str = "Filename Type Size Used Priority\n";

    #[test]
    fn finds_mounts_through_partitions_and_holders() {
        let free = fixture("22 1 0:21 / /proc rw - proc proc rw\n", HEADER);
        assert_eq!(in_use(&free, 8, 0), None);
        let whole = fixture(
            "30 1 8:0 / /mnt/my\\040disk rw - ext4 /dev/sda rw\n",
            HEADER,
        );
        let why = in_use(&whole, 8, 0).unwrap();
        assert!(why.contains("mounted at /mnt/my disk"), "{why}");
        let part = fixture("30 1 8:1 / /boot rw - ext4 /dev/sda1 rw\n", HEADER);
        let why = in_use(&part, 8, 0).unwrap();
        assert!(
            why.contains("partition sda1 (8:1) is mounted at /boot"),
            "{why}"
        );
        let stacked = fixture("30 1 253:0 / / rw - ext4 /dev/dm-0 rw\n", HEADER);
        let why = in_use(&stacked, 8, 0).unwrap();
        assert!(why.contains("holder dm-0 (253:0) is mounted at /"), "{why}");
        // The partition itself, and the stacked device itself.
        assert!(in_use(&stacked, 8, 1).is_some());
        assert!(in_use(&stacked, 253, 0).unwrap().starts_with("it "));
    }

    #[test]
    fn unescapes_mount_points() {
        assert_eq!(unescape("/a\\040b\\134c"), "/a b\\c");
        assert_eq!(unescape("/x\\04"), "/x\\04");
        assert_eq!(parse_dev("8:1\n"), Some((8, 1)));
        assert_eq!(parse_dev("8"), None);
    }
}
