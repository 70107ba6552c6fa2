//! The Sandbox API against the fake sandbox: its lifecycle, the task
//! service around it, and what it refuses.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use containerd_shim::ExitSignal;
use containerd_shim_protos::api as task;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::CodedOutputStream;

use super::*;
use crate::error::Kind;
use crate::events::RecordingSink;
use crate::sandbox::fake::FakeFactory;
use crate::service::{
    create as task_create, ops, ConfigSource, TaskService, CONTAINER_TYPE, SANDBOX_ID,
};

struct Env {
    dir: tempfile::TempDir,
    svc: TaskService,
    factory: FakeFactory,
    exit: Arc<ExitSignal>,
    config: Config,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        state_dir: dir.path().join("state"),
        ..Config::default()
    };
    let factory = FakeFactory::new(&dir.path().join("host"));
    let exit = Arc::new(ExitSignal::default());
    let svc = TaskService::new(
        "k8s.io",
        "unix:///nowhere",
        Arc::new(RecordingSink::new()),
        Arc::new(factory.clone()),
        ConfigSource::Fixed(Box::new(config.clone())),
        exit.clone(),
    );
    Env {
        dir,
        svc,
        factory,
        exit,
        config,
    }
}

/// A `PodSandboxConfig` with `hostname`, and `linux.security_context.
/// namespace_options` = (network, pid, ipc) and `linux.sysctls` as given.
fn pod_options(hostname: &str, modes: (u64, u64, u64), sysctls: &[(&str, &str)]) -> Any {
    fn msg(f: impl FnOnce(&mut CodedOutputStream<'_>)) -> Vec<u8> {
        let mut v = Vec::new();
        {
            let mut os = CodedOutputStream::vec(&mut v);
            f(&mut os);
            os.flush().unwrap();
        }
        v
    }
    let ns = msg(|o| {
        o.write_uint64(1, modes.0).unwrap();
        o.write_uint64(2, modes.1).unwrap();
        o.write_uint64(3, modes.2).unwrap();
    });
    let security = msg(|o| o.write_bytes(1, &ns).unwrap());
    let linux = msg(|o| {
        o.write_bytes(2, &security).unwrap();
        for (k, v) in sysctls {
            let entry = msg(|e| {
                e.write_string(1, k).unwrap();
                e.write_string(2, v).unwrap();
            });
            o.write_bytes(3, &entry).unwrap();
        }
    });
    let value = msg(|o| {
        o.write_string(2, hostname).unwrap();
        o.write_bytes(8, &linux).unwrap();
    });
    Any {
        type_url: pod_config::TYPE_URL.into(),
        value,
        ..Default::default()
    }
}

fn exited(exit: &ExitSignal) -> bool {
    futures::FutureExt::now_or_never(exit.wait()).is_some()
}

impl Env {
    fn sandbox_bundle(&self, id: &str) -> PathBuf {
        let b = self
            .dir
            .path()
            .join("io.containerd.sandbox.controller.v1.shim/k8s.io")
            .join(id);
        std::fs::create_dir_all(b.join("rootfs")).unwrap();
        b
    }

    fn create_req(&self, id: &str, netns: &str, options: Any) -> api::CreateSandboxRequest {
        api::CreateSandboxRequest {
            sandbox_id: id.into(),
            bundle_path: self.sandbox_bundle(id).display().to_string(),
            options: MessageField::some(options),
            netns_path: netns.into(),
            ..Default::default()
        }
    }

    async fn create_pod(&self, id: &str) -> Result<api::CreateSandboxResponse> {
        let req = self.create_req(
            id,
            "/var/run/netns/cni-1",
            pod_options("web-0", (0, 0, 0), &[]),
        );
        create(&self.svc.inner, req).await
    }

    async fn start_pod(&self, id: &str) -> Result<api::StartSandboxResponse> {
        start(
            &self.svc.inner,
            api::StartSandboxRequest {
                sandbox_id: id.into(),
                ..Default::default()
            },
        )
        .await
    }

    async fn stop_pod(&self, id: &str) -> Result<api::StopSandboxResponse> {
        stop(
            &self.svc.inner,
            api::StopSandboxRequest {
                sandbox_id: id.into(),
                ..Default::default()
            },
        )
        .await
    }

    async fn status(&self, id: &str) -> Result<api::SandboxStatusResponse> {
        status(
            &self.svc.inner,
            api::SandboxStatusRequest {
                sandbox_id: id.into(),
                verbose: true,
                ..Default::default()
            },
        )
        .await
    }

    fn wait_pod(&self, id: &str) -> tokio::task::JoinHandle<Result<api::WaitSandboxResponse>> {
        let inner = self.svc.inner.clone();
        let req = api::WaitSandboxRequest {
            sandbox_id: id.into(),
            ..Default::default()
        };
        tokio::spawn(async move { wait(&inner, req).await })
    }

    /// A CRI container of `pod`, as containerd creates its task.
    async fn create_container(&self, id: &str, pod: &str) -> crate::Result<u32> {
        let b = self.dir.path().join("bundles").join(id);
        std::fs::create_dir_all(b.join("rootfs")).unwrap();
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "annotations": {CONTAINER_TYPE: "container", SANDBOX_ID: pod},
            "linux": {"namespaces": [
                {"type": "pid", "path": "/proc/77/ns/pid"},
                {"type": "ipc", "path": "/proc/77/ns/ipc"},
                {"type": "uts", "path": "/proc/77/ns/uts"},
                {"type": "network", "path": "/proc/77/ns/net"},
                {"type": "mount"}
            ]},
        });
        std::fs::write(b.join("config.json"), serde_json::to_vec(&spec).unwrap()).unwrap();
        let req = task::CreateTaskRequest {
            id: id.into(),
            bundle: b.display().to_string(),
            ..Default::default()
        };
        task_create::create(&self.svc.inner, req)
            .await
            .map(|r| r.pid)
    }

    async fn delete_container(&self, id: &str) -> crate::Result<()> {
        ops::delete(
            &self.svc.inner,
            task::DeleteRequest {
                id: id.into(),
                ..Default::default()
            },
        )
        .await
        .map(|_| ())
    }

    fn state_dir(&self, id: &str) -> PathBuf {
        SandboxPaths::new(&self.config.state_dir, id).dir
    }
}

#[tokio::test]
async fn a_pod_without_pause_container_from_create_to_shutdown() {
    let e = env();
    e.create_pod("pod1").await.unwrap();
    // Recorded for `delete`, nothing started.
    let rec: BundleRecord = state::load(&e.sandbox_bundle("pod1").join(state::BUNDLE_FILE))
        .unwrap()
        .unwrap();
    assert_eq!(rec.sandbox_id, "pod1");
    assert_eq!(rec.state_dir, e.config.state_dir);
    assert!(e.factory.setups.lock().unwrap().is_empty());
    assert_eq!(e.status("pod1").await.unwrap().state, "SANDBOX_NOTREADY");
    // A container before StartSandbox is refused.
    let err = e.create_container("c0", "pod1").await.unwrap_err();
    assert_eq!(err.kind(), Kind::FailedPrecondition, "{err}");

    let started = e.start_pod("pod1").await.unwrap();
    assert_eq!(started.pid, 77, "the pod pause's guest pid");
    let setups = e.factory.setups.lock().unwrap().clone();
    assert_eq!(
        setups,
        vec![SandboxSetup {
            hostname: "web-0".into(),
            network: PodNetwork::Netns("/var/run/netns/cni-1".into()),
            pod_namespaces: true,
        }]
    );
    assert!(e
        .factory
        .sandbox
        .calls()
        .contains(&"network_ready".to_string()));
    assert!(e.state_dir("pod1").join("sandbox.json").is_file());
    // Idempotent.
    assert_eq!(e.start_pod("pod1").await.unwrap().pid, 77);
    let st = e.status("pod1").await.unwrap();
    assert_eq!((st.state.as_str(), st.pid), ("SANDBOX_READY", 77));
    assert_eq!(st.info["podPid"], "77");
    assert_eq!(st.info["vmPid"], "4242");
    ping(
        &e.svc.inner,
        api::PingRequest {
            sandbox_id: "pod1".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let waiter = e.wait_pod("pod1");

    // Two containers join the running sandbox: no second VM.
    e.create_container("c1", "pod1").await.unwrap();
    e.create_container("c2", "pod1").await.unwrap();
    assert_eq!(e.factory.created.lock().unwrap().len(), 1);
    // A container of another pod is refused.
    let err = e.create_container("x", "pod2").await.unwrap_err();
    assert_eq!(err.kind(), Kind::FailedPrecondition, "{err}");
    e.delete_container("c1").await.unwrap();
    assert!(e
        .factory
        .sandbox
        .calls()
        .contains(&"remove_container c1".to_string()));
    // The task Shutdown containerd may send does not end the shim.
    ops::shutdown(&e.svc.inner, task::ShutdownRequest::default())
        .await
        .unwrap();
    assert!(!exited(&e.exit));
    assert!(!waiter.is_finished());

    // StopSandbox: the VM stops, the state goes, WaitSandbox returns 0.
    e.stop_pod("pod1").await.unwrap();
    assert!(e.factory.sandbox.is_shut_down());
    assert!(!e.state_dir("pod1").exists());
    let w = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(w.exit_status, 0);
    assert!(w.exited_at.is_some());
    assert_eq!(e.status("pod1").await.unwrap().state, "SANDBOX_NOTREADY");
    // Stopping again is fine; starting again is not.
    e.stop_pod("pod1").await.unwrap();
    assert_eq!(
        e.start_pod("pod1").await.unwrap_err().kind(),
        Kind::FailedPrecondition
    );
    // c2 outlived the VM: its Delete has only bookkeeping left.
    let calls = e.factory.sandbox.calls().len();
    e.delete_container("c2").await.unwrap();
    assert_eq!(
        e.factory.sandbox.calls().len(),
        calls,
        "no guest or host call"
    );
    assert!(e.svc.container_ids().is_empty());

    shutdown(
        &e.svc.inner,
        api::ShutdownSandboxRequest {
            sandbox_id: "pod1".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(exited(&e.exit));
}

#[tokio::test]
async fn shutdown_stops_a_running_sandbox_first() {
    let e = env();
    e.create_pod("pod1").await.unwrap();
    e.start_pod("pod1").await.unwrap();
    e.create_container("c1", "pod1").await.unwrap();
    shutdown(
        &e.svc.inner,
        api::ShutdownSandboxRequest {
            sandbox_id: "pod1".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(e.factory.sandbox.is_shut_down());
    assert!(!e.state_dir("pod1").exists());
    assert!(e.svc.container_ids().is_empty());
    assert!(exited(&e.exit));
}

#[tokio::test]
async fn a_vm_that_dies_ends_the_sandbox_with_255() {
    let e = env();
    e.create_pod("pod1").await.unwrap();
    e.start_pod("pod1").await.unwrap();
    let waiter = e.wait_pod("pod1");
    e.factory.sandbox.crash();
    let w = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(w.exit_status, 255);
    assert_eq!(e.status("pod1").await.unwrap().state, "SANDBOX_NOTREADY");
    let err = ping(
        &e.svc.inner,
        api::PingRequest {
            sandbox_id: "pod1".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("has stopped (status 255)"),
        "{err}"
    );
    // StopSandbox still removes what is left on the host.
    assert!(e.state_dir("pod1").exists());
    e.stop_pod("pod1").await.unwrap();
    assert!(!e.state_dir("pod1").exists());
}

#[tokio::test]
async fn what_a_vm_cannot_give_a_pod_is_refused_by_name() {
    let e = env();
    for (netns, modes, sysctls, want) in [
        ("", (0, 0, 0), vec![], "host network is not supported"),
        (
            "/var/run/netns/x",
            (2, 0, 0),
            vec![],
            "host network is not supported",
        ),
        (
            "/var/run/netns/x",
            (0, 0, 2),
            vec![],
            "host IPC is not supported",
        ),
        (
            "/var/run/netns/x",
            (0, 0, 0),
            vec![("net.ipv4.ip_forward", "1")],
            "pod sysctls (net.ipv4.ip_forward)",
        ),
    ] {
        let req = e.create_req("pod1", netns, pod_options("h", modes, &sysctls));
        let err = create(&e.svc.inner, req).await.unwrap_err();
        assert_eq!(err.kind(), Kind::InvalidArgument, "{err}");
        assert!(err.to_string().contains(want), "{want}: {err}");
        assert!(err.to_string().contains("pod sandbox pod1"), "{err}");
    }
    // Host PID is the pod's own in the VM: accepted.
    let req = e.create_req("pod1", "/var/run/netns/x", pod_options("h", (0, 2, 0), &[]));
    create(&e.svc.inner, req).await.unwrap();
    // Once per shim.
    let err = e.create_pod("pod2").await.unwrap_err();
    assert_eq!(err.kind(), Kind::AlreadyExists, "{err}");
    // Unknown sandboxes are NOT_FOUND (containerd's Stop takes it as done).
    let err = e.start_pod("pod2").await.unwrap_err();
    assert_eq!(err.kind(), Kind::NotFound, "{err}");
    assert_eq!(e.stop_pod("pod2").await.unwrap_err().kind(), Kind::NotFound);
}

#[tokio::test]
async fn metrics_add_up_the_containers() {
    let e = env();
    e.create_pod("pod1").await.unwrap();
    e.start_pod("pod1").await.unwrap();
    e.create_container("c1", "pod1").await.unwrap();
    e.create_container("c2", "pod1").await.unwrap();
    let mut s = GuestStats {
        version: "v2".into(),
        ..Default::default()
    };
    s.cgroup.memory_usage_bytes = 1000;
    s.cgroup.cpu_usage_usec = 7;
    s.cgroup.pids_current = 2;
    e.factory.sandbox.set_stats(s);
    let m = metrics(
        &e.svc.inner,
        api::SandboxMetricsRequest {
            sandbox_id: "pod1".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let metric = m.metrics.into_option().unwrap();
    assert_eq!(metric.id, "pod1");
    let data = metric.data.into_option().unwrap();
    assert_eq!(data.type_url, crate::service::stats::V2_TYPE);
    let v2: containerd_shim_protos::cgroups_v2::metrics::Metrics =
        containerd_shim_protos::protobuf::Message::parse_from_bytes(&data.value).unwrap();
    assert_eq!(v2.memory.usage, 2000);
    assert_eq!(v2.cpu.usage_usec, 14);
    assert_eq!(v2.pids.current, 4);
}
