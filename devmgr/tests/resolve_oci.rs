//! OCI `linux.devices` translation, and never-panic properties of the OCI
//! translation, the uevent parser and the resolver.
//!
//! Every test lives in a `resolve_*` module so `cargo test resolve` runs them.
use std::path::{Path, PathBuf};

use capsule_devmgr::device::{DevType, DeviceInfo, MAX_MAJOR, MAX_MINOR};
use capsule_devmgr::oci::{device_info, spec_devices};
use capsule_devmgr::resolve::{ResolveError, Resolver, ResolverConfig};
use capsule_devmgr::uevent::Uevent;
use oci_spec::runtime::{LinuxDevice, LinuxDeviceCgroup, LinuxDeviceType, Spec};
use proptest::prelude::*;
use serde_json::json;

fn dev(path: &str, typ: LinuxDeviceType, major: i64, minor: i64) -> LinuxDevice {
    let mut d = LinuxDevice::default();
    d.set_path(PathBuf::from(path))
        .set_typ(typ)
        .set_major(major)
        .set_minor(minor);
    d
}

fn rule(
    allow: bool,
    typ: Option<LinuxDeviceType>,
    major: Option<i64>,
    minor: Option<i64>,
    access: Option<&str>,
) -> LinuxDeviceCgroup {
    let mut r = LinuxDeviceCgroup::default();
    r.set_allow(allow)
        .set_typ(typ)
        .set_major(major)
        .set_minor(minor)
        .set_access(access.map(str::to_owned));
    r
}

fn spec(devices: serde_json::Value, rules: serde_json::Value) -> Spec {
    serde_json::from_value(json!({
        "ociVersion": "1.2.0",
        "linux": { "devices": devices, "resources": { "devices": rules } }
    }))
    .unwrap()
}

mod resolve_oci {
    use super::*;
    use LinuxDeviceType::{A, B, C, P, U};

    #[test]
    fn translates_every_field() {
        let mut d = dev("/dev/xvdb", B, 8, 0);
        d.set_file_mode(Some(0o660))
            .set_uid(Some(1000))
            .set_gid(Some(6));
        let got = device_info(&d, &[]).unwrap();
        assert_eq!(
            got,
            DeviceInfo {
                container_path: "/dev/xvdb".into(),
                dev_type: DevType::Block,
                major: 8,
                minor: 0,
                file_mode: Some(0o660),
                uid: Some(1000),
                gid: Some(6),
                read_only: false,
                cgroup_access: "rwm".into(),
            }
        );
        assert_eq!(
            device_info(&dev("/dev/c", C, 1, 3), &[]).unwrap().dev_type,
            DevType::Char
        );
        assert_eq!(
            device_info(&dev("/dev/u", U, 1, 3), &[]).unwrap().dev_type,
            DevType::CharUnbuffered
        );
        assert_eq!(
            device_info(&dev("/dev/p", P, 0, 0), &[]).unwrap().dev_type,
            DevType::Fifo
        );
    }

    #[test]
    fn cgroup_rule_without_w_makes_the_device_read_only() {
        let rules = [
            rule(false, None, None, None, Some("rwm")),
            rule(true, Some(B), Some(8), Some(0), Some("rm")),
        ];
        let got = device_info(&dev("/dev/xvdb", B, 8, 0), &rules).unwrap();
        assert!(got.read_only);
        assert_eq!(got.cgroup_access, "rm");
        let got = device_info(&dev("/dev/xvdc", B, 8, 16), &rules).unwrap();
        assert!(got.read_only, "only the deny-all rule matches");
        assert_eq!(got.cgroup_access, "");
    }

    #[test]
    fn last_matching_rule_wins() {
        let wide_rw = rule(true, Some(B), Some(8), None, Some("rw"));
        let exact_r = rule(true, Some(B), Some(8), Some(0), Some("r"));
        let d = dev("/dev/sda", B, 8, 0);
        let got = device_info(&d, &[wide_rw.clone(), exact_r.clone()]).unwrap();
        assert_eq!((got.read_only, got.cgroup_access.as_str()), (true, "r"));
        let got = device_info(&d, &[exact_r, wide_rw]).unwrap();
        assert_eq!((got.read_only, got.cgroup_access.as_str()), (false, "rw"));
        // A later rule for another device or type does not count.
        let rules = [
            rule(true, Some(A), None, None, Some("r")),
            rule(true, Some(C), Some(8), Some(0), Some("rwm")),
        ];
        assert!(device_info(&d, &rules).unwrap().read_only);
    }

    #[test]
    fn deny_rule_removes_access() {
        let rules = [
            rule(true, None, None, None, Some("rwm")),
            rule(false, Some(B), None, None, Some("w")),
        ];
        let got = device_info(&dev("/dev/sda", B, 8, 0), &rules).unwrap();
        assert_eq!((got.read_only, got.cgroup_access.as_str()), (true, "rm"));
    }

    #[test]
    fn no_matching_rule_means_rwm() {
        let rules = [rule(true, Some(C), Some(1), Some(3), Some("r"))];
        let got = device_info(&dev("/dev/sda", B, 8, 0), &rules).unwrap();
        assert_eq!((got.read_only, got.cgroup_access.as_str()), (false, "rwm"));
    }

    #[test]
    fn absent_access_means_rwm_and_bad_access_is_rejected() {
        let got = device_info(
            &dev("/dev/sda", B, 8, 0),
            &[rule(true, Some(B), None, None, None)],
        )
        .unwrap();
        assert_eq!(got.cgroup_access, "rwm");
        let e = device_info(
            &dev("/dev/sda", B, 8, 0),
            &[rule(true, Some(B), None, None, Some("rx"))],
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("device /dev/sda (b 8:0): linux.resources.devices[0]")
                && msg.contains("'x'"),
            "{msg}"
        );
    }

    #[test]
    fn char_rules_cover_unbuffered_char_devices() {
        let rules = [rule(true, Some(C), Some(4), None, Some("r"))];
        assert!(
            device_info(&dev("/dev/tty9", U, 4, 9), &rules)
                .unwrap()
                .read_only
        );
    }

    #[test]
    fn bad_container_paths_are_rejected() {
        for (path, why) in [
            ("relative", "is not absolute"),
            ("/dev/../etc", "'..'"),
            ("/dev//x", "'//'"),
            ("/", "root directory"),
            ("", "empty"),
            ("/dev/x/", "trailing"),
            ("/dev/./x", "'.'"),
            ("/dev/x\0", "NUL"),
        ] {
            let e = device_info(&dev(path, C, 1, 3), &[]).unwrap_err();
            assert!(matches!(e, ResolveError::InvalidDevice { .. }));
            let msg = e.to_string();
            assert!(msg.contains(why), "{path:?}: {msg}");
            if !path.is_empty() {
                assert!(
                    msg.contains(&format!("device {}", Path::new(path).display())),
                    "{path:?}: {msg}"
                );
            }
        }
    }

    #[test]
    fn device_type_a_is_rejected() {
        let msg = device_info(&dev("/dev/all", A, 1, 3), &[])
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("device /dev/all (a 1:3): type \"a\""),
            "{msg}"
        );
    }

    #[test]
    fn out_of_range_numbers_are_rejected() {
        let max_major = i64::from(MAX_MAJOR);
        let max_minor = i64::from(MAX_MINOR);
        assert!(device_info(&dev("/dev/x", C, max_major, max_minor), &[]).is_ok());
        for (major, minor, what) in [
            (-1, 0, "major -1"),
            (0, -5, "minor -5"),
            (max_major + 1, 0, "major 4096"),
            (0, max_minor + 1, "minor 1048576"),
            (i64::MAX, 0, "major 9223372036854775807"),
            (i64::MIN, 0, "major -9223372036854775808"),
            (0, 1 << 40, "minor 1099511627776"),
        ] {
            let msg = device_info(&dev("/dev/x", B, major, minor), &[])
                .unwrap_err()
                .to_string();
            assert!(
                msg.contains(what) && msg.contains("outside"),
                "{major}:{minor}: {msg}"
            );
        }
    }

    #[test]
    fn fifo_rules() {
        assert!(device_info(&dev("/dev/f", P, 0, 0), &[]).is_ok());
        for (major, minor) in [(1, 0), (0, 1), (-1, 0)] {
            let msg = device_info(&dev("/dev/f", P, major, minor), &[])
                .unwrap_err()
                .to_string();
            assert!(msg.contains("a fifo has no device number"), "{msg}");
        }
        // Fifos match `p` and wildcard rules, never `c`/`b` rules.
        let rules = [
            rule(true, Some(P), None, None, Some("r")),
            rule(true, Some(C), None, None, Some("rw")),
        ];
        assert!(
            device_info(&dev("/dev/f", P, 0, 0), &rules)
                .unwrap()
                .read_only
        );
        let rules = [rule(true, Some(A), None, None, Some("r"))];
        assert!(
            device_info(&dev("/dev/f", P, 0, 0), &rules)
                .unwrap()
                .read_only
        );
    }

    #[test]
    fn file_mode_must_be_permission_bits() {
        let mut d = dev("/dev/x", C, 1, 3);
        d.set_file_mode(Some(0o7777));
        assert!(device_info(&d, &[]).is_ok());
        for mode in [0o20666, 0o10000, u32::MAX] {
            d.set_file_mode(Some(mode));
            let msg = device_info(&d, &[]).unwrap_err().to_string();
            assert!(msg.starts_with("device /dev/x (c 1:3): fileMode"), "{msg}");
        }
    }

    #[test]
    fn spec_devices_translates_in_order_with_rules() {
        let s = spec(
            json!([
                {"path": "/dev/sda", "type": "b", "major": 8, "minor": 0},
                {"path": "/dev/null", "type": "c", "major": 1, "minor": 3, "fileMode": 438},
            ]),
            json!([
                {"allow": false, "access": "rwm"},
                {"allow": true, "type": "b", "major": 8, "minor": 0, "access": "r"},
                {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
            ]),
        );
        let got = spec_devices(&s).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(
            (got[0].container_path.as_path(), got[0].read_only),
            (Path::new("/dev/sda"), true)
        );
        assert_eq!(
            (got[1].container_path.as_path(), got[1].read_only),
            (Path::new("/dev/null"), false)
        );
        assert_eq!(got[1].file_mode, Some(0o666));
    }

    #[test]
    fn spec_without_devices_is_empty() {
        let s: Spec = serde_json::from_value(json!({"ociVersion": "1.2.0"})).unwrap();
        assert!(spec_devices(&s).unwrap().is_empty());
        let s: Spec = serde_json::from_value(json!({"ociVersion": "1.2.0", "linux": {}})).unwrap();
        assert!(spec_devices(&s).unwrap().is_empty());
    }

    #[test]
    fn spec_duplicates_name_both_entries() {
        let s = spec(
            json!([
                {"path": "/dev/x", "type": "c", "major": 1, "minor": 3},
                {"path": "/dev/y", "type": "c", "major": 1, "minor": 5},
                {"path": "/dev/x", "type": "b", "major": 8, "minor": 0},
            ]),
            json!([]),
        );
        let e = spec_devices(&s).unwrap_err();
        assert!(matches!(e, ResolveError::DuplicatePath { .. }));
        let msg = e.to_string();
        assert!(msg.contains("linux.devices[0] /dev/x (c 1:3)"), "{msg}");
        assert!(msg.contains("linux.devices[2] /dev/x (b 8:0)"), "{msg}");
        assert!(msg.contains("duplicate container path /dev/x"), "{msg}");
    }

    #[test]
    fn spec_entry_without_path_is_named_by_index() {
        let s = spec(
            json!([
                {"path": "/dev/x", "type": "c", "major": 1, "minor": 3},
                {"type": "c", "major": 1, "minor": 5},
            ]),
            json!([]),
        );
        let msg = spec_devices(&s).unwrap_err().to_string();
        assert!(
            msg.starts_with("device linux.devices[1] (c 1:5): container path is empty"),
            "{msg}"
        );
    }
}

/// Any `LinuxDeviceType`.
fn any_type() -> impl Strategy<Value = LinuxDeviceType> {
    prop_oneof![
        Just(LinuxDeviceType::A),
        Just(LinuxDeviceType::B),
        Just(LinuxDeviceType::C),
        Just(LinuxDeviceType::U),
        Just(LinuxDeviceType::P),
    ]
}

/// Numbers near the interesting edges, plus anything.
fn any_number() -> impl Strategy<Value = i64> {
    prop_oneof![
        -2i64..300,
        Just(i64::from(MAX_MAJOR)),
        Just(i64::from(MAX_MAJOR) + 1),
        Just(i64::from(MAX_MINOR)),
        Just(i64::from(MAX_MINOR) + 1),
        any::<i64>(),
    ]
}

fn any_path() -> impl Strategy<Value = String> {
    prop_oneof![
        "(/[a-z.]{0,3}){0,4}/?",
        "/dev/[a-z0-9]{1,8}",
        any::<String>(),
        "[/.\\x00a]{0,8}",
    ]
}

prop_compose! {
    fn any_device()(
        path in any_path(),
        typ in any_type(),
        major in any_number(),
        minor in any_number(),
        file_mode in any::<Option<u32>>(),
        uid in any::<Option<u32>>(),
        gid in any::<Option<u32>>(),
    ) -> LinuxDevice {
        let mut d = dev(&path, typ, major, minor);
        d.set_file_mode(file_mode).set_uid(uid).set_gid(gid);
        d
    }
}

prop_compose! {
    fn any_rule()(
        allow in any::<bool>(),
        typ in proptest::option::of(any_type()),
        major in proptest::option::of(any_number()),
        minor in proptest::option::of(any_number()),
        access in proptest::option::of("[rwmx]{0,4}|.{0,4}"),
    ) -> LinuxDeviceCgroup {
        rule(allow, typ, major, minor, access.as_deref())
    }
}

mod resolve_props {
    use super::*;

    proptest! {
        #[test]
        fn oci_translation_never_panics(d in any_device(), rules in proptest::collection::vec(any_rule(), 0..6)) {
            if let Ok(info) = device_info(&d, &rules) {
                prop_assert!(info.major <= MAX_MAJOR && info.minor <= MAX_MINOR);
                prop_assert!(info.container_path.is_absolute());
                prop_assert_eq!(info.read_only, !info.cgroup_access.contains('w'));
                prop_assert!(info.file_mode.is_none_or(|m| m <= 0o7777));
                prop_assert!(info.dev_type != DevType::Fifo || (info.major, info.minor) == (0, 0));
            }
        }

        #[test]
        fn spec_translation_never_panics(devs in proptest::collection::vec(any_device(), 0..5), rules in proptest::collection::vec(any_rule(), 0..4)) {
            let mut s = Spec::default();
            let mut linux = s.linux().clone().unwrap_or_default();
            linux.set_devices(Some(devs));
            let mut res = linux.resources().clone().unwrap_or_default();
            res.set_devices(Some(rules));
            linux.set_resources(Some(res));
            s.set_linux(Some(linux));
            if let Ok(infos) = spec_devices(&s) {
                let mut paths: Vec<_> = infos.iter().map(|i| &i.container_path).collect();
                paths.sort();
                paths.dedup();
                prop_assert_eq!(paths.len(), infos.len());
            }
        }

        #[test]
        fn uevent_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(u) = Uevent::parse(&bytes) {
                let _ = (u.major(), u.minor(), u.devname(), u.devtype(), u.len());
            }
        }

        #[test]
        fn uevent_parser_never_panics_on_near_valid_input(s in "([A-Z_]{0,4}(=[a-z0-9/.]{0,6})?\n){0,5}\n{0,2}") {
            if let Ok(u) = Uevent::parse(s.as_bytes()) {
                if let Ok(Some(name)) = u.devname() {
                    prop_assert!(name.is_relative());
                }
            }
        }

        #[test]
        fn resolver_never_panics(d in any_device()) {
            let tmp = tempfile::tempdir().unwrap();
            let r = Resolver::new(ResolverConfig {
                sysfs_root: tmp.path().join("sys"),
                dev_root: tmp.path().join("dev"),
                vhost_user_store: Some(tmp.path().join("store")),
                ..ResolverConfig::default()
            }).unwrap();
            if let Ok(info) = device_info(&d, &[]) {
                prop_assert!(r.resolve(&info).is_err());
            }
        }
    }
}
