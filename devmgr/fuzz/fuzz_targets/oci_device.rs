//! Fuzzes the OCI device translation ([`device_info`], [`spec_devices`])
//! with structured field values and with raw JSON. It must never panic, and
//! every accepted device must hold the invariants `DeviceInfo` promises.
#![no_main]

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

use arbitrary::Arbitrary;
use capsule_devmgr::device::{DevType, DeviceInfo, MAX_MAJOR, MAX_MINOR};
use capsule_devmgr::oci::{device_info, spec_devices};
use libfuzzer_sys::fuzz_target;
use oci_spec::runtime::{LinuxDevice, LinuxDeviceCgroup, LinuxDeviceType, Spec};

#[derive(Arbitrary, Debug)]
struct Dev {
    path: Vec<u8>,
    typ: u8,
    major: i64,
    minor: i64,
    file_mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
}

#[derive(Arbitrary, Debug)]
struct Rule {
    allow: bool,
    typ: Option<u8>,
    major: Option<i64>,
    minor: Option<i64>,
    access: Option<String>,
}

#[derive(Arbitrary, Debug)]
enum Input {
    /// One device and its rules, plus more devices for a whole spec.
    Fields {
        dev: Dev,
        rules: Vec<Rule>,
        more: Vec<Dev>,
    },
    /// A whole spec, or a `[device, rules]` pair, as JSON.
    Json(String),
}

fn dev_type(b: u8) -> LinuxDeviceType {
    match b % 5 {
        0 => LinuxDeviceType::A,
        1 => LinuxDeviceType::B,
        2 => LinuxDeviceType::C,
        3 => LinuxDeviceType::U,
        _ => LinuxDeviceType::P,
    }
}

fn device(d: &Dev) -> LinuxDevice {
    let mut out = LinuxDevice::default();
    out.set_path(PathBuf::from(OsString::from_vec(d.path.clone())))
        .set_typ(dev_type(d.typ))
        .set_major(d.major)
        .set_minor(d.minor)
        .set_file_mode(d.file_mode)
        .set_uid(d.uid)
        .set_gid(d.gid);
    out
}

fn rule(r: &Rule) -> LinuxDeviceCgroup {
    let mut out = LinuxDeviceCgroup::default();
    out.set_allow(r.allow)
        .set_typ(r.typ.map(dev_type))
        .set_major(r.major)
        .set_minor(r.minor)
        .set_access(r.access.clone());
    out
}

fn check(info: &DeviceInfo) {
    assert!(info.major <= MAX_MAJOR && info.minor <= MAX_MINOR);
    assert!(info.container_path.is_absolute());
    assert!(info.file_mode.is_none_or(|m| m <= 0o7777));
    assert_eq!(info.read_only, !info.cgroup_access.contains('w'));
    assert!(info.dev_type != DevType::Fifo || (info.major, info.minor) == (0, 0));
}

fn spec_with(devices: Vec<LinuxDevice>, rules: Vec<LinuxDeviceCgroup>) -> Spec {
    let mut spec = Spec::default();
    let mut linux = spec.linux().clone().unwrap_or_default();
    let mut resources = linux.resources().clone().unwrap_or_default();
    resources.set_devices(Some(rules));
    linux
        .set_devices(Some(devices))
        .set_resources(Some(resources));
    spec.set_linux(Some(linux));
    spec
}

fn check_spec(spec: &Spec) {
    if let Ok(infos) = spec_devices(spec) {
        infos.iter().for_each(check);
        let mut paths: Vec<_> = infos.iter().map(|i| &i.container_path).collect();
        paths.sort();
        paths.dedup();
        assert_eq!(
            paths.len(),
            infos.len(),
            "duplicate container paths accepted"
        );
    }
}

fuzz_target!(|input: Input| {
    match input {
        Input::Fields { dev, rules, more } => {
            let rules: Vec<LinuxDeviceCgroup> = rules.iter().map(rule).collect();
            let first = device(&dev);
            if let Ok(info) = device_info(&first, &rules) {
                check(&info);
            }
            let devices = std::iter::once(first)
                .chain(more.iter().map(device))
                .collect();
            check_spec(&spec_with(devices, rules));
        }
        Input::Json(text) => {
            if let Ok(spec) = serde_json::from_str::<Spec>(&text) {
                check_spec(&spec);
            }
            if let Ok((dev, rules)) =
                serde_json::from_str::<(LinuxDevice, Vec<LinuxDeviceCgroup>)>(&text)
            {
                if let Ok(info) = device_info(&dev, &rules) {
                    check(&info);
                }
            }
        }
    }
});
