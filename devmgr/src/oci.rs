//! OCI `linux.devices` -> [`DeviceInfo`].
//!
//! Each entry is validated field by field and its cgroup access is taken
//! from `linux.resources.devices`:
//! - rules are evaluated in order and the **last** matching rule wins;
//! - a rule matches on type (`a` or no type = all; `c` and `u` both mean
//!   "char device", as the device cgroup knows only `c`; `p` matches fifos),
//!   and on major/minor (`None` = wildcard);
//! - an allow rule grants its access (empty or absent = `rwm`), a deny rule
//!   grants `rwm` minus what it denies;
//! - no matching rule: `rwm`. `read_only` is true when the granted access
//!   lacks `w`.
use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxDevice, LinuxDeviceCgroup, LinuxDeviceType, Spec};

use crate::device::{DevType, DeviceInfo, MAX_MAJOR, MAX_MINOR};
use crate::resolve::describe;
pub use crate::resolve::ResolveError;

/// Highest `fileMode` accepted: permission, setuid/setgid and sticky bits.
pub const MAX_FILE_MODE: u32 = 0o7777;

/// Translates one OCI device, with the spec's cgroup device rules.
pub fn device_info(
    dev: &LinuxDevice,
    rules: &[LinuxDeviceCgroup],
) -> Result<DeviceInfo, ResolveError> {
    device_info_at(dev, rules, None)
}

/// Translates every `linux.devices` entry of `spec`, in order. Rejects two
/// entries with the same container path, naming both.
pub fn spec_devices(spec: &Spec) -> Result<Vec<DeviceInfo>, ResolveError> {
    let Some(linux) = spec.linux() else {
        return Ok(Vec::new());
    };
    let rules: &[LinuxDeviceCgroup] = linux
        .resources()
        .as_ref()
        .and_then(|r| r.devices().as_deref())
        .unwrap_or_default();
    let devices: &[LinuxDevice] = linux.devices().as_deref().unwrap_or_default();
    let mut seen: HashMap<PathBuf, usize> = HashMap::new();
    let mut out: Vec<DeviceInfo> = Vec::with_capacity(devices.len());
    for (index, dev) in devices.iter().enumerate() {
        let info = device_info_at(dev, rules, Some(index))?;
        if let Some(&first) = seen.get(&info.container_path) {
            let first_info = out.get(first).map(describe).unwrap_or_default();
            return Err(ResolveError::DuplicatePath {
                path: info.container_path.display().to_string(),
                first: format!("linux.devices[{first}] {first_info}"),
                second: format!("linux.devices[{index}] {}", describe(&info)),
            });
        }
        seen.insert(info.container_path.clone(), index);
        out.push(info);
    }
    Ok(out)
}

/// Whether `spec` is a privileged container's, as containerd writes it
/// with its list of every host device in `linux.devices`: the device cgroup
/// allows every device ([`allows_all_devices`]), the process holds
/// `CAP_SYS_ADMIN` in its bounding set, and nothing is masked.
pub fn is_privileged_with_host_devices(spec: &Spec) -> bool {
    let sys_admin = spec
        .process()
        .as_ref()
        .and_then(|p| p.capabilities().as_ref())
        .and_then(|c| c.bounding().as_ref())
        .is_some_and(|b| b.contains(&oci_spec::runtime::Capability::SysAdmin));
    let unmasked = spec
        .linux()
        .as_ref()
        .and_then(|l| l.masked_paths().as_ref())
        .is_none_or(|m| m.is_empty());
    allows_all_devices(spec) && sys_admin && unmasked
}

/// Whether the spec's device cgroup allows every device: a rule
/// `{"allow": true, "access": "rwm"}` with no type (or type `a`) and no
/// numbers.
pub fn allows_all_devices(spec: &Spec) -> bool {
    let rules: &[LinuxDeviceCgroup] = spec
        .linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.devices().as_deref())
        .unwrap_or_default();
    rules.iter().any(|r| {
        let all_types = r
            .typ()
            .is_none_or(|t| t == oci_spec::runtime::LinuxDeviceType::A);
        let access = r.access().as_deref().unwrap_or("rwm");
        r.allow()
            && all_types
            && r.major().is_none()
            && r.minor().is_none()
            && ["r", "w", "m"].iter().all(|c| access.contains(c))
    })
}

/// Re-validates a [`DeviceInfo`] (its fields are public, so it may not come
/// from [`device_info`]): path, numbers and mode.
pub fn validate_info(info: &DeviceInfo) -> Result<(), ResolveError> {
    let dev = describe(info);
    validate_container_path(&info.container_path).map_err(|r| ResolveError::invalid(&dev, r))?;
    check_numbers(info.dev_type, i64::from(info.major), i64::from(info.minor))
        .map_err(|r| ResolveError::invalid(&dev, r))?;
    check_mode(info.file_mode).map_err(|r| ResolveError::invalid(&dev, r))
}

/// Checks that a container path is absolute and normalised: not empty, not
/// `/`, no NUL, no `//`, no trailing `/`, no `.` or `..` component.
pub fn validate_container_path(path: &Path) -> Result<(), String> {
    let bytes = path.as_os_str().as_bytes();
    let fail = |why: &str| {
        Err(format!(
            "container path {:?} {why}",
            path.display().to_string()
        ))
    };
    if bytes.is_empty() {
        return Err("container path is empty".to_owned());
    }
    if bytes.contains(&0) {
        return fail("contains a NUL byte");
    }
    // The state file and the agent protocol carry paths as strings.
    if std::str::from_utf8(bytes).is_err() {
        return fail("is not valid UTF-8");
    }
    if bytes.first() != Some(&b'/') {
        return fail("is not absolute");
    }
    if bytes == b"/" {
        return fail("is the root directory");
    }
    if bytes.ends_with(b"/") {
        return fail("has a trailing '/'");
    }
    // Skip the leading '/': every remaining component must be a plain name.
    for comp in bytes.get(1..).unwrap_or_default().split(|b| *b == b'/') {
        match comp {
            b"" => return fail("is not normalised (contains '//')"),
            b"." => return fail("is not normalised (has a '.' component)"),
            b".." => return fail("is not normalised (has a '..' component)"),
            _ => {}
        }
    }
    Ok(())
}

fn device_info_at(
    dev: &LinuxDevice,
    rules: &[LinuxDeviceCgroup],
    index: Option<usize>,
) -> Result<DeviceInfo, ResolveError> {
    let label = raw_label(dev, index);
    let bad = |reason: String| ResolveError::invalid(&label, reason);
    validate_container_path(dev.path()).map_err(bad)?;
    let dev_type = dev_type(dev.typ()).map_err(bad)?;
    let (major, minor) = check_numbers(dev_type, dev.major(), dev.minor()).map_err(bad)?;
    check_mode(dev.file_mode()).map_err(bad)?;
    let access = effective_access(rules, dev_type, major, minor).map_err(bad)?;
    let read_only = !access.contains('w');
    if read_only {
        tracing::debug!(device = %label, access = %access, "device is read-only by its cgroup rule");
    }
    Ok(DeviceInfo {
        container_path: dev.path().clone(),
        dev_type,
        major,
        minor,
        file_mode: dev.file_mode(),
        uid: dev.uid(),
        gid: dev.gid(),
        read_only,
        cgroup_access: access,
    })
}

/// Names an entry before it is validated: `/dev/x (c 1:3)`, or its index
/// when it has no path.
fn raw_label(dev: &LinuxDevice, index: Option<usize>) -> String {
    let numbers = format!("({} {}:{})", dev.typ().as_str(), dev.major(), dev.minor());
    if !dev.path().as_os_str().is_empty() {
        return format!("{} {numbers}", dev.path().display());
    }
    match index {
        Some(i) => format!("linux.devices[{i}] {numbers}"),
        None => format!("<no path> {numbers}"),
    }
}

fn dev_type(t: LinuxDeviceType) -> Result<DevType, String> {
    match t {
        LinuxDeviceType::B => Ok(DevType::Block),
        LinuxDeviceType::C => Ok(DevType::Char),
        LinuxDeviceType::U => Ok(DevType::CharUnbuffered),
        LinuxDeviceType::P => Ok(DevType::Fifo),
        LinuxDeviceType::A => {
            Err("type \"a\" (all) is only valid in cgroup rules, not for a device (expected b, c, u or p)".to_owned())
        }
    }
}

/// Checks major/minor for the type and converts them.
fn check_numbers(dev_type: DevType, major: i64, minor: i64) -> Result<(u32, u32), String> {
    if dev_type == DevType::Fifo && (major != 0 || minor != 0) {
        return Err(format!(
            "a fifo has no device number, but {major}:{minor} was given"
        ));
    }
    let major = u32::try_from(major)
        .ok()
        .filter(|m| *m <= MAX_MAJOR)
        .ok_or_else(|| format!("major {major} is outside 0..={MAX_MAJOR}"))?;
    let minor = u32::try_from(minor)
        .ok()
        .filter(|m| *m <= MAX_MINOR)
        .ok_or_else(|| format!("minor {minor} is outside 0..={MAX_MINOR}"))?;
    Ok((major, minor))
}

fn check_mode(mode: Option<u32>) -> Result<(), String> {
    match mode {
        Some(m) if m > MAX_FILE_MODE => Err(format!(
            "fileMode {m:#o} has bits outside {MAX_FILE_MODE:#o} (file type bits are not allowed)"
        )),
        _ => Ok(()),
    }
}

/// The access granted by the last matching rule, as canonical `rwm` order.
fn effective_access(
    rules: &[LinuxDeviceCgroup],
    dev_type: DevType,
    major: u32,
    minor: u32,
) -> Result<String, String> {
    let Some((i, rule)) = rules
        .iter()
        .enumerate()
        .rev()
        .find(|(_, r)| rule_matches(r, dev_type, major, minor))
    else {
        return Ok("rwm".to_owned());
    };
    let bits = Access::parse(rule.access().as_deref())
        .map_err(|why| format!("linux.resources.devices[{i}] ({rule}): {why}"))?;
    let granted = if rule.allow() {
        bits
    } else {
        Access::ALL.minus(bits)
    };
    Ok(granted.to_string())
}

/// Whether a cgroup rule applies to a device of this type and number.
pub fn rule_matches(rule: &LinuxDeviceCgroup, dev_type: DevType, major: u32, minor: u32) -> bool {
    let type_ok = match rule.typ() {
        None | Some(LinuxDeviceType::A) => true,
        Some(LinuxDeviceType::B) => dev_type == DevType::Block,
        Some(LinuxDeviceType::C | LinuxDeviceType::U) => {
            matches!(dev_type, DevType::Char | DevType::CharUnbuffered)
        }
        Some(LinuxDeviceType::P) => dev_type == DevType::Fifo,
    };
    let num_ok = |want: Option<i64>, have: u32| want.is_none_or(|w| w == i64::from(have));
    type_ok && num_ok(rule.major(), major) && num_ok(rule.minor(), minor)
}

/// A set of cgroup device permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Access {
    read: bool,
    write: bool,
    mknod: bool,
}

impl Access {
    const ALL: Access = Access {
        read: true,
        write: true,
        mknod: true,
    };

    /// `None` or `""` means all; otherwise only `r`, `w` and `m`.
    fn parse(s: Option<&str>) -> Result<Self, String> {
        let s = s.unwrap_or_default();
        if s.is_empty() {
            return Ok(Self::ALL);
        }
        let mut a = Access {
            read: false,
            write: false,
            mknod: false,
        };
        for c in s.chars() {
            match c {
                'r' => a.read = true,
                'w' => a.write = true,
                'm' => a.mknod = true,
                other => {
                    return Err(format!(
                        "access {s:?} has {other:?} (expected only r, w and m)"
                    ))
                }
            }
        }
        Ok(a)
    }

    fn minus(self, other: Access) -> Access {
        Access {
            read: self.read && !other.read,
            write: self.write && !other.write,
            mknod: self.mknod && !other.mknod,
        }
    }
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (on, c) in [(self.read, "r"), (self.write, "w"), (self.mknod, "m")] {
            if on {
                f.write_str(c)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(
        allow: bool,
        typ: Option<LinuxDeviceType>,
        major: Option<i64>,
        minor: Option<i64>,
        access: &str,
    ) -> LinuxDeviceCgroup {
        let mut r = LinuxDeviceCgroup::default();
        r.set_allow(allow)
            .set_typ(typ)
            .set_major(major)
            .set_minor(minor)
            .set_access(Some(access.to_owned()));
        r
    }

    #[test]
    fn container_paths() {
        for ok in [
            "/dev/null",
            "/dev/vfio/12",
            "/x",
            "/dev/a..b",
            "/dev/.hidden",
        ] {
            assert!(validate_container_path(Path::new(ok)).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("relative", "not absolute"),
            ("dev/null", "not absolute"),
            ("/", "root"),
            ("/dev/", "trailing"),
            ("/dev//x", "'//'"),
            ("//dev/x", "'//'"),
            ("/dev/../etc", "'..'"),
            ("/dev/./x", "'.'"),
            ("/dev/..", "'..'"),
            ("/dev/x\0y", "NUL"),
        ] {
            let e = validate_container_path(Path::new(bad)).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn numbers() {
        assert_eq!(check_numbers(DevType::Block, 8, 0), Ok((8, 0)));
        assert_eq!(
            check_numbers(DevType::Char, i64::from(MAX_MAJOR), i64::from(MAX_MINOR)),
            Ok((MAX_MAJOR, MAX_MINOR))
        );
        for (maj, min) in [
            (-1, 0),
            (0, -1),
            (i64::from(MAX_MAJOR) + 1, 0),
            (0, i64::from(MAX_MINOR) + 1),
            (i64::MAX, 0),
            (i64::MIN, 0),
            (1 << 32, 0),
        ] {
            assert!(
                check_numbers(DevType::Char, maj, min).is_err(),
                "{maj}:{min}"
            );
        }
        assert_eq!(check_numbers(DevType::Fifo, 0, 0), Ok((0, 0)));
        assert!(check_numbers(DevType::Fifo, 1, 0)
            .unwrap_err()
            .contains("fifo"));
        assert!(check_numbers(DevType::Fifo, 0, -1)
            .unwrap_err()
            .contains("fifo"));
    }

    #[test]
    fn modes() {
        assert!(check_mode(None).is_ok());
        assert!(check_mode(Some(0o7777)).is_ok());
        assert!(check_mode(Some(0o20666)).is_err());
        assert!(check_mode(Some(0o10000)).is_err());
        assert!(check_mode(Some(u32::MAX)).is_err());
    }

    #[test]
    fn access_parsing_and_display() {
        assert_eq!(Access::parse(None).unwrap().to_string(), "rwm");
        assert_eq!(Access::parse(Some("")).unwrap().to_string(), "rwm");
        assert_eq!(Access::parse(Some("mwr")).unwrap().to_string(), "rwm");
        assert_eq!(Access::parse(Some("rr")).unwrap().to_string(), "r");
        assert!(Access::parse(Some("rx")).unwrap_err().contains("'x'"));
        assert_eq!(
            Access::ALL
                .minus(Access::parse(Some("w")).unwrap())
                .to_string(),
            "rm"
        );
    }

    #[test]
    fn rule_matching() {
        use LinuxDeviceType::*;
        assert!(rule_matches(
            &rule(true, None, None, None, "r"),
            DevType::Fifo,
            0,
            0
        ));
        assert!(rule_matches(
            &rule(true, Some(A), None, None, "r"),
            DevType::Block,
            8,
            0
        ));
        assert!(rule_matches(
            &rule(true, Some(C), Some(1), None, "r"),
            DevType::CharUnbuffered,
            1,
            9
        ));
        assert!(rule_matches(
            &rule(true, Some(U), Some(1), Some(9), "r"),
            DevType::Char,
            1,
            9
        ));
        assert!(!rule_matches(
            &rule(true, Some(C), None, None, "r"),
            DevType::Block,
            1,
            9
        ));
        assert!(!rule_matches(
            &rule(true, Some(B), Some(8), Some(1), "r"),
            DevType::Block,
            8,
            0
        ));
        assert!(rule_matches(
            &rule(true, Some(P), None, None, "r"),
            DevType::Fifo,
            0,
            0
        ));
        assert!(!rule_matches(
            &rule(true, Some(P), None, None, "r"),
            DevType::Char,
            0,
            0
        ));
    }

    #[test]
    fn last_match_wins_and_deny_subtracts() {
        use LinuxDeviceType::*;
        let rules = [
            rule(false, None, None, None, "rwm"),
            rule(true, Some(B), Some(8), None, "rwm"),
            rule(true, Some(B), Some(8), Some(0), "r"),
            rule(false, Some(B), Some(8), Some(16), "w"),
        ];
        assert_eq!(effective_access(&rules, DevType::Block, 8, 0).unwrap(), "r");
        assert_eq!(
            effective_access(&rules, DevType::Block, 8, 1).unwrap(),
            "rwm"
        );
        assert_eq!(
            effective_access(&rules, DevType::Block, 8, 16).unwrap(),
            "rm"
        );
        assert_eq!(effective_access(&rules, DevType::Char, 8, 0).unwrap(), "");
        assert_eq!(effective_access(&[], DevType::Char, 8, 0).unwrap(), "rwm");
    }
}
