//! A container's devices as one unit: `resolve_spec` once, then
//! `attach_container` (all or nothing) and `detach_container`; the owners
//! recorded in `devices.json` alone say which container uses which device.
use std::sync::Arc;

use capsule_devmgr::state::STATE_FILE;
use capsule_devmgr::testing::{loop_host, loop_spec, BackendOp, RecordingBackend};
use capsule_devmgr::{
    BlockDriver, DeviceManager, FileStore, ManagerConfig, ManagerError, NullStore, Owner,
    ResolveError,
};

fn manager(backend: &Arc<RecordingBackend>) -> DeviceManager {
    DeviceManager::new(
        ManagerConfig::new(BlockDriver::VirtioScsi, 6..32),
        backend.clone(),
        NullStore,
    )
    .unwrap()
}

#[tokio::test]
async fn attach_is_all_or_nothing_and_shared_devices_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let host = loop_host(dir.path(), 3).unwrap();
    let backend = Arc::new(RecordingBackend::new());
    let mgr = manager(&backend);

    // The third device fails in the hypervisor: the first two go again.
    backend.fail_on(BackendOp::Hotplug, Some("dev2"));
    let three = host
        .resolve_spec(&loop_spec(&[("/dev/a", 0), ("/dev/b", 1), ("/dev/c", 2)]))
        .unwrap();
    assert_eq!(three.len(), 3);
    let e = mgr.attach_container("c1", three).await.unwrap_err();
    assert!(e.to_string().contains("dev2"), "{e}");
    assert!(backend.plugged().is_empty(), "{:?}", backend.plugged());
    assert!(mgr.is_empty());
    assert!(mgr.container_devices("c1").is_empty());
    assert!(backend.anomalies().is_empty(), "{:?}", backend.anomalies());

    // Two containers share /dev/loop0: plugged once, unplugged with the
    // last user.
    backend.clear_failures();
    let spec = loop_spec(&[("/dev/a", 0)]);
    let a = mgr
        .attach_container("c1", host.resolve_spec(&spec).unwrap())
        .await
        .unwrap();
    let b = mgr
        .attach_container("c2", host.resolve_spec(&spec).unwrap())
        .await
        .unwrap();
    assert_eq!(a[0].id, b[0].id);
    assert_eq!(a, mgr.container_devices("c1"));
    assert_eq!(backend.plugged().len(), 1);
    mgr.detach_container("c1").await.unwrap();
    assert!(mgr.container_devices("c1").is_empty());
    assert_eq!(backend.plugged().len(), 1);
    assert_eq!(mgr.container_devices("c2").len(), 1);
    mgr.detach_container("c2").await.unwrap();
    assert!(backend.plugged().is_empty());
    assert!(mgr.is_empty());
    // Nothing left: a second detach is a no-op.
    mgr.detach_container("c2").await.unwrap();
}

#[tokio::test]
async fn the_attach_reuses_the_resolution_and_never_looks_at_the_host_again() {
    let dir = tempfile::tempdir().unwrap();
    let host = loop_host(dir.path(), 2).unwrap();
    let backend = Arc::new(RecordingBackend::new());
    let mgr = manager(&backend);
    let resolved = host
        .resolve_spec(&loop_spec(&[("/dev/x", 0), ("/dev/y", 1)]))
        .unwrap();
    // The host's view vanishes after the resolution: an attach that looked
    // again would fail.
    std::fs::remove_dir_all(dir.path().join("sys")).unwrap();
    std::fs::remove_dir_all(dir.path().join("dev")).unwrap();
    let devs = mgr.attach_container("c1", resolved).await.unwrap();
    assert_eq!(devs.len(), 2);
    assert_eq!(devs[1].request.container_path.to_str(), Some("/dev/y"));
}

#[tokio::test]
async fn devices_json_alone_says_which_container_uses_which_device() {
    let dir = tempfile::tempdir().unwrap();
    let host = loop_host(&dir.path().join("host"), 3).unwrap();
    let state = dir.path().join("state");
    let backend = Arc::new(RecordingBackend::new());
    let mgr = DeviceManager::new(
        ManagerConfig::new(BlockDriver::VirtioScsi, 6..32),
        backend.clone(),
        FileStore::open(&state).unwrap(),
    )
    .unwrap();
    let attach = |cid: &'static str, devs: &'static [(&'static str, u32)]| {
        let r = host.resolve_spec(&loop_spec(devs)).unwrap();
        let mgr = &mgr;
        async move { mgr.attach_container(cid, r).await.unwrap() }
    };
    attach("c1", &[("/dev/a", 0), ("/dev/b", 1)]).await;
    attach("c2", &[("/dev/b", 1), ("/dev/c", 2)]).await;

    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join(STATE_FILE)).unwrap()).unwrap();
    let mut owners: Vec<(String, String, String)> = Vec::new();
    for d in v["devices"].as_array().unwrap() {
        for u in d["uses"].as_array().unwrap() {
            owners.push((
                d["host_path"]
                    .as_str()
                    .unwrap()
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .into(),
                u["owner"]["name"].as_str().unwrap().into(),
                u["request"]["container_path"].as_str().unwrap().into(),
            ));
        }
    }
    let want: Vec<(String, String, String)> = [
        ("loop0", "c1", "/dev/a"),
        ("loop1", "c1", "/dev/b"),
        ("loop1", "c2", "/dev/b"),
        ("loop2", "c2", "/dev/c"),
    ]
    .iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    .collect();
    assert_eq!(owners, want);
    assert!(v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|d| d["uses"].as_array().unwrap())
        .all(|u| u["owner"]["owner"] == "container"));

    mgr.detach_container("c1").await.unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join(STATE_FILE)).unwrap()).unwrap();
    let text = v.to_string();
    assert!(!text.contains("\"c1\""), "{text}");
    assert_eq!(backend.plugged().len(), 2);
}

#[tokio::test]
async fn a_failed_detach_keeps_what_it_could_not_release_and_a_retry_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let host = loop_host(dir.path(), 2).unwrap();
    let backend = Arc::new(RecordingBackend::new());
    let mgr = manager(&backend);
    let r = host
        .resolve_spec(&loop_spec(&[("/dev/a", 0), ("/dev/b", 1)]))
        .unwrap();
    mgr.attach_container("c1", r).await.unwrap();
    backend.fail_on(BackendOp::Unplug, Some("dev0"));
    let e = mgr.detach_container("c1").await.unwrap_err();
    assert!(matches!(e, ManagerError::Backend { .. }), "{e}");
    let left = mgr.container_devices("c1");
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].id.to_string(), "dev0");
    backend.clear_failures();
    mgr.detach_container("c1").await.unwrap();
    assert!(mgr.is_empty());
    assert!(backend.plugged().is_empty());
}

#[tokio::test]
async fn runtime_devices_are_owned_by_the_runtime() {
    let backend = Arc::new(RecordingBackend::new());
    let mgr = manager(&backend);
    let share = capsule_devmgr::HostDevice {
        info: None,
        host_path: "/run/share".into(),
        kind: capsule_devmgr::DeviceKind::VhostUser {
            vhost: capsule_devmgr::device::VhostUserKind::Fs,
            socket: "/run/share.sock".into(),
            tag: "t".into(),
        },
    };
    let (id, _) = mgr
        .attach_runtime("virtio-fs share", share, true)
        .await
        .unwrap();
    let rec = mgr.get(&id).unwrap();
    assert_eq!(rec.uses[0].owner, Owner::runtime("virtio-fs share"));
    assert_eq!(backend.ops(), [(BackendOp::Coldplug, "dev0".into())]);
    // A container's use must carry its request; the runtime's must not.
    let e = mgr
        .new_device(Owner::container("c1"), rec.host_device())
        .unwrap_err();
    assert!(e.to_string().contains("must carry an OCI request"), "{e}");
}

#[test]
fn privileged_specs_get_no_host_devices_and_mounted_disks_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let host = loop_host(dir.path(), 2).unwrap();
    // containerd's privileged spec: every host device, the allow-all rule,
    // CAP_SYS_ADMIN and nothing masked.
    let privileged = |caps: &[&str], masked: &[&str]| -> oci_spec::runtime::Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"cwd": "/", "user": {"uid": 0, "gid": 0},
                        "capabilities": {"bounding": caps}},
            "linux": {
                "devices": [
                    {"path": "/dev/loop0", "type": "b", "major": 7, "minor": 0},
                    {"path": "/dev/loop1", "type": "b", "major": 7, "minor": 1}
                ],
                "resources": {"devices": [{"allow": true, "access": "rwm"}]},
                "maskedPaths": masked
            }
        }))
        .unwrap()
    };
    let r = host
        .resolve_spec(&privileged(&["CAP_SYS_ADMIN", "CAP_NET_ADMIN"], &[]))
        .unwrap();
    assert!(r.is_empty());
    assert_eq!(r.skipped_host_devices(), 2);
    // Allowing every device alone is not privileged: the devices are
    // resolved (and passed through) as asked.
    let r = host.resolve_spec(&privileged(&["CAP_CHOWN"], &[])).unwrap();
    assert_eq!(r.len(), 2);
    let r = host
        .resolve_spec(&privileged(&["CAP_SYS_ADMIN"], &["/proc/kcore"]))
        .unwrap();
    assert_eq!(r.len(), 2);

    // A disk the host has mounted is refused, whoever asks for it.
    std::fs::write(
        dir.path().join("proc/self/mountinfo"),
        "30 1 7:1 / /mnt/data rw - ext4 /dev/loop1 rw\n",
    )
    .unwrap();
    let e = host.resolve_spec(&loop_spec(&[("/dev/b", 1)])).unwrap_err();
    assert!(matches!(e, ResolveError::InUse { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("/dev/b (b 7:1)") && msg.contains("mounted at /mnt/data"),
        "{msg}"
    );
    assert!(host.resolve_spec(&loop_spec(&[("/dev/a", 0)])).is_ok());
}
