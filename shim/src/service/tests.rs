//! Task service tests against the fake sandbox and a recording event sink.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use containerd_shim::ExitSignal;
use containerd_shim_protos::api;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use tokio::io::AsyncReadExt;

use super::{create, ops, ConfigSource, TaskService};
use crate::config::Config;
use crate::error::Kind;
use crate::events::RecordingSink;
use crate::sandbox::fake::{FakeFactory, FakeSandbox, Step};
use crate::sandbox::GuestStats;
use crate::state::{self, SandboxPaths, SandboxRecord};

struct Env {
    dir: tempfile::TempDir,
    svc: TaskService,
    sink: RecordingSink,
    fake: FakeSandbox,
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
    let sink = RecordingSink::new();
    let factory = FakeFactory::new(&dir.path().join("host"));
    let exit = Arc::new(ExitSignal::default());
    let svc = TaskService::new(
        "testns",
        "unix:///nowhere",
        Arc::new(sink.clone()),
        Arc::new(factory.clone()),
        ConfigSource::Fixed(Box::new(config.clone())),
        exit.clone(),
    );
    Env {
        fake: factory.sandbox.clone(),
        dir,
        svc,
        sink,
        factory,
        exit,
        config,
    }
}

impl Env {
    /// A bundle with `config.json` (annotations and devices as given).
    fn bundle(&self, id: &str, annotations: &[(&str, &str)], devices: &[(&str, u32)]) -> PathBuf {
        let b = self.dir.path().join("bundles").join(id);
        std::fs::create_dir_all(b.join("rootfs")).unwrap();
        let ann: serde_json::Map<String, serde_json::Value> = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
            .collect();
        let devs: Vec<serde_json::Value> = devices
            .iter()
            .map(|(p, m)| serde_json::json!({"path": p, "type": "b", "major": 7, "minor": m}))
            .collect();
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "hostname": id,
            "annotations": ann,
            "linux": {
                "devices": devs,
                "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "network"}, {"type": "mount"}]
            },
        });
        std::fs::write(b.join("config.json"), serde_json::to_vec(&spec).unwrap()).unwrap();
        b
    }

    fn fifo(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        p
    }

    async fn create(&self, id: &str, bundle: &Path, stdout: &str) -> crate::Result<u32> {
        let req = api::CreateTaskRequest {
            id: id.into(),
            bundle: bundle.display().to_string(),
            stdout: stdout.into(),
            ..Default::default()
        };
        create::create(&self.svc.inner, req).await.map(|r| r.pid)
    }

    async fn start(&self, id: &str, exec: &str) -> crate::Result<u32> {
        ops::start(
            &self.svc.inner,
            api::StartRequest {
                id: id.into(),
                exec_id: exec.into(),
                ..Default::default()
            },
        )
        .await
        .map(|r| r.pid)
    }

    async fn wait(&self, id: &str, exec: &str) -> u32 {
        tokio::time::timeout(
            Duration::from_secs(10),
            ops::wait(
                &self.svc.inner,
                api::WaitRequest {
                    id: id.into(),
                    exec_id: exec.into(),
                    ..Default::default()
                },
            ),
        )
        .await
        .expect("wait timed out")
        .unwrap()
        .exit_status
    }

    async fn kill(&self, id: &str, exec: &str, signal: u32) -> crate::Result<()> {
        ops::kill(
            &self.svc.inner,
            api::KillRequest {
                id: id.into(),
                exec_id: exec.into(),
                signal,
                ..Default::default()
            },
        )
        .await
        .map(drop)
    }

    async fn delete(&self, id: &str, exec: &str) -> crate::Result<api::DeleteResponse> {
        ops::delete(
            &self.svc.inner,
            api::DeleteRequest {
                id: id.into(),
                exec_id: exec.into(),
                ..Default::default()
            },
        )
        .await
    }

    async fn shutdown(&self) {
        ops::shutdown(&self.svc.inner, api::ShutdownRequest::default())
            .await
            .unwrap();
    }

    fn paths(&self, sandbox: &str) -> SandboxPaths {
        SandboxPaths::new(&self.config.state_dir, sandbox)
    }

    fn containers(&self, sandbox: &str) -> Option<SandboxRecord> {
        state::load::<SandboxRecord>(&self.paths(sandbox).sandbox_file()).unwrap()
    }

    fn status(&self, id: &str) -> api::StateResponse {
        ops::state(
            &self.svc.inner,
            api::StateRequest {
                id: id.into(),
                ..Default::default()
            },
        )
        .unwrap()
    }
}

fn exited(exit: &ExitSignal) -> bool {
    futures::FutureExt::now_or_never(exit.wait()).is_some()
}

#[tokio::test]
async fn run_publishes_events_in_order_and_copies_output() {
    let e = env();
    let b = e.bundle("c1", &[], &[]);
    let out = e.fifo("c1-out");
    let mut reader = tokio::net::unix::pipe::OpenOptions::new()
        .open_receiver(&out)
        .unwrap();
    let pid = e
        .create("c1", &b, &out.display().to_string())
        .await
        .unwrap();
    assert_eq!(pid, 4242);
    assert_eq!(
        e.status("c1").status.enum_value().unwrap(),
        api::Status::CREATED
    );
    let rec = e.containers("c1").unwrap();
    assert_eq!(rec.containers["c1"].status, state::ContainerStatus::Created);
    assert!(b.join(state::BUNDLE_FILE).exists());

    e.fake.push_output("c1", "", b"hello from the guest\n");
    e.start("c1", "").await.unwrap();
    assert_eq!(
        e.status("c1").status.enum_value().unwrap(),
        api::Status::RUNNING
    );
    e.fake.exit("c1", "", 3);
    assert_eq!(e.wait("c1", "").await, 3);
    let mut got = Vec::new();
    reader.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"hello from the guest\n");
    let st = e.status("c1");
    assert_eq!(st.status.enum_value().unwrap(), api::Status::STOPPED);
    assert_eq!(st.exit_status, 3);

    let d = e.delete("c1", "").await.unwrap();
    assert_eq!(d.exit_status, 3);
    assert_eq!(
        e.sink.labels(),
        ["create c1", "start c1", "exit c1", "delete c1"]
    );
    assert!(e.fake.prepared_rootfs().is_empty());
    assert!(e.fake.guest_containers().is_empty());
    assert!(e.containers("c1").unwrap().containers.is_empty());
    // The TaskCreate event carries the stdio.
    match &e.sink.events()[0] {
        crate::events::TaskEvent::Create(c) => {
            assert_eq!(c.io.stdout, out.display().to_string());
            assert_eq!(c.pid, 4242);
        }
        other => panic!("{other:?}"),
    }
    // Shutdown with nothing left: the sandbox stops, the shim exits, the
    // state directory is gone.
    e.shutdown().await;
    assert!(e.fake.is_shut_down());
    assert!(exited(&e.exit));
    assert!(!e.paths("c1").dir.exists());
}

#[tokio::test]
async fn exec_kill_delete_events_and_errors() {
    let e = env();
    let b = e.bundle("c1", &[], &[]);
    e.create("c1", &b, "").await.unwrap();
    // Exec before start is refused.
    let spec = Any {
        type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
        value: br#"{"args":["true"],"cwd":"/"}"#.to_vec(),
        ..Default::default()
    };
    let exec_req = |id: &str| api::ExecProcessRequest {
        id: "c1".into(),
        exec_id: id.into(),
        spec: Some(spec.clone()).into(),
        ..Default::default()
    };
    let err = ops::exec(&e.svc.inner, exec_req("e1")).await.unwrap_err();
    assert_eq!(err.kind(), Kind::FailedPrecondition);
    e.start("c1", "").await.unwrap();
    // Starting twice is refused.
    assert_eq!(
        e.start("c1", "").await.unwrap_err().kind(),
        Kind::FailedPrecondition
    );

    ops::exec(&e.svc.inner, exec_req("e1")).await.unwrap();
    assert_eq!(
        ops::exec(&e.svc.inner, exec_req("e1"))
            .await
            .unwrap_err()
            .kind(),
        Kind::AlreadyExists
    );
    let pid = e.start("c1", "e1").await.unwrap();
    // Task pids are the guest's (the fake's init is 1, its execs 10x), never
    // the VM's.
    assert_eq!(e.status("c1").pid, 1);
    assert!(pid > 100 && pid != 4242, "{pid}");
    e.kill("c1", "e1", 9).await.unwrap();
    assert_eq!(e.wait("c1", "e1").await, 137);
    // A finished process cannot be signalled.
    assert_eq!(
        e.kill("c1", "e1", 9).await.unwrap_err().kind(),
        Kind::NotFound
    );
    let d = e.delete("c1", "e1").await.unwrap();
    assert_eq!(d.exit_status, 137);
    assert_eq!(
        e.delete("c1", "e1").await.unwrap_err().kind(),
        Kind::NotFound
    );

    // The running init cannot be deleted; after SIGTERM it can.
    assert_eq!(
        e.delete("c1", "").await.unwrap_err().kind(),
        Kind::FailedPrecondition
    );
    e.kill("c1", "", 15).await.unwrap();
    assert_eq!(e.wait("c1", "").await, 143);
    e.delete("c1", "").await.unwrap();
    assert_eq!(
        e.sink.labels(),
        [
            "create c1",
            "start c1",
            "exec-added c1/e1",
            "exec-started c1/e1",
            "exit c1/e1",
            "exit c1",
            "delete c1"
        ]
    );
    assert_eq!(e.delete("c1", "").await.unwrap_err().kind(), Kind::NotFound);
}

#[tokio::test]
async fn kill_all_after_the_init_exited_still_signals_the_container() {
    let e = env();
    let b = e.bundle("c1", &[], &[]);
    e.create("c1", &b, "").await.unwrap();
    e.start("c1", "").await.unwrap();
    e.kill("c1", "", 9).await.unwrap();
    e.wait("c1", "").await;
    // containerd's WithProcessKill: kill --all of an exited init answers
    // NotFound, but what is left in the container (hostPID: the init's
    // children) is signalled all the same.
    let r = ops::kill(
        &e.svc.inner,
        api::KillRequest {
            id: "c1".into(),
            signal: 9,
            all: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(r.map(drop).unwrap_err().kind(), Kind::NotFound);
    assert!(
        e.fake.calls().iter().any(|c| c == "signal c1/ 9 all=true"),
        "{:?}",
        e.fake.calls()
    );
    e.delete("c1", "").await.unwrap();
}

#[tokio::test]
async fn shutdown_is_ignored_while_tasks_live() {
    let e = env();
    let b = e.bundle("c1", &[], &[]);
    e.create("c1", &b, "").await.unwrap();
    e.start("c1", "").await.unwrap();
    e.shutdown().await;
    assert!(!exited(&e.exit));
    assert!(!e.fake.is_shut_down());
    assert!(e.paths("c1").dir.exists());
    e.kill("c1", "", 9).await.unwrap();
    e.wait("c1", "").await;
    e.delete("c1", "").await.unwrap();
    e.shutdown().await;
    assert!(exited(&e.exit));
    assert!(e.fake.is_shut_down());
}

#[tokio::test]
async fn pod_containers_share_one_sandbox_and_devices() {
    let e = env();
    let sb = e.bundle(
        "pod1",
        &[
            ("io.kubernetes.cri.container-type", "sandbox"),
            ("io.kubernetes.cri.sandbox-id", "pod1"),
        ],
        &[("/dev/disk", 5)],
    );
    let app = e.bundle(
        "app1",
        &[
            ("io.kubernetes.cri.container-type", "container"),
            ("io.kubernetes.cri.sandbox-id", "pod1"),
        ],
        &[("/dev/disk", 5)],
    );
    e.create("pod1", &sb, "").await.unwrap();
    e.create("app1", &app, "").await.unwrap();
    assert_eq!(e.factory.created.lock().unwrap().clone(), ["pod1"]);
    assert_eq!(e.fake.attached().get("7:5"), Some(&2));
    let rec = e.containers("pod1").unwrap();
    assert_eq!(rec.containers.len(), 2);
    // devices.json says who uses the disk: both containers.
    let mgr = e.fake.device_manager().unwrap();
    let (a, p) = (mgr.container_devices("app1"), mgr.container_devices("pod1"));
    assert_eq!((a.len(), p.len()), (1, 1));
    assert_eq!(a[0].id, p[0].id);
    assert_eq!(a[0].request.minor, 5);
    // A container of another pod is refused by this shim.
    let other = e.bundle(
        "app2",
        &[
            ("io.kubernetes.cri.container-type", "container"),
            ("io.kubernetes.cri.sandbox-id", "pod2"),
        ],
        &[],
    );
    let err = e.create("app2", &other, "").await.unwrap_err();
    assert_eq!(err.kind(), Kind::FailedPrecondition);
    assert!(err.to_string().contains("pod1"), "{err}");
    // Deleting one user keeps the device; the last one releases it.
    e.delete("app1", "").await.unwrap();
    assert_eq!(e.fake.attached().get("7:5"), Some(&1));
    e.shutdown().await;
    assert!(!exited(&e.exit));
    e.delete("pod1", "").await.unwrap();
    assert!(e.fake.attached().is_empty());
    e.shutdown().await;
    assert!(exited(&e.exit));
}

#[tokio::test]
async fn an_oom_kill_in_the_guest_is_published_before_the_exit() {
    let e = env();
    let b = e.bundle("c1", &[], &[]);
    e.create("c1", &b, "").await.unwrap();
    e.start("c1", "").await.unwrap();
    e.fake.oom_kill("c1");
    assert_eq!(e.wait("c1", "").await, 137);
    let labels = e.sink.labels();
    let oom = labels.iter().position(|l| l == "oom c1");
    let exit = labels.iter().position(|l| l == "exit c1");
    assert!(
        matches!((oom, exit), (Some(o), Some(x)) if o < x),
        "TaskOOM before TaskExit: {labels:?}"
    );
    // Published once, however many times the watcher and the exit asked.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(e.sink.labels().iter().filter(|l| *l == "oom c1").count(), 1);
    e.delete("c1", "").await.unwrap();
    e.shutdown().await;
}

#[tokio::test]
async fn create_resolves_each_device_once_and_devices_json_names_the_owner() {
    use std::sync::atomic::Ordering::SeqCst;
    let e = env();
    let b = e.bundle("c1", &[], &[("/dev/a", 1), ("/dev/b", 2), ("/dev/c", 3)]);
    e.create("c1", &b, "").await.unwrap();
    assert_eq!(
        e.factory.resolutions.load(SeqCst),
        1,
        "one resolution per Create"
    );
    assert_eq!(
        e.factory.devices_resolved.load(SeqCst),
        3,
        "each device once"
    );
    let app = e.bundle(
        "app1",
        &[
            ("io.kubernetes.cri.container-type", "container"),
            ("io.kubernetes.cri.sandbox-id", "c1"),
        ],
        &[("/dev/b", 2)],
    );
    e.create("app1", &app, "").await.unwrap();
    assert_eq!(e.factory.resolutions.load(SeqCst), 2);
    assert_eq!(e.factory.devices_resolved.load(SeqCst), 4);

    // devices.json alone: loop1..3 used by c1, loop2 also by app1.
    let bytes = std::fs::read(e.paths("c1").devices_file()).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let mut uses: Vec<(u64, String)> = Vec::new();
    for d in v["devices"].as_array().unwrap() {
        for u in d["uses"].as_array().unwrap() {
            uses.push((
                u["request"]["minor"].as_u64().unwrap(),
                u["owner"]["name"].as_str().unwrap().to_string(),
            ));
        }
    }
    uses.sort();
    let want: Vec<(u64, String)> = [(1, "c1"), (2, "app1"), (2, "c1"), (3, "c1")]
        .iter()
        .map(|(m, o)| (*m, o.to_string()))
        .collect();
    assert_eq!(uses, want);
    // sandbox.json holds no device list of its own.
    let rec = std::fs::read_to_string(e.paths("c1").sandbox_file()).unwrap();
    assert!(!rec.contains("\"devices\""), "{rec}");
}

#[tokio::test]
async fn failed_create_rolls_back_every_step() {
    for step in [
        Step::StartSandbox,
        Step::PrepareRootfs,
        Step::AttachDevices,
        Step::CreateContainer,
    ] {
        let e = env();
        let b = e.bundle("c1", &[], &[("/dev/a", 1), ("/dev/b", 2)]);
        e.fake.fail_at(step);
        let err = e.create("c1", &b, "").await.unwrap_err();
        match err.to_ttrpc() {
            ttrpc::Error::RpcStatus(st) => {
                assert!(st.message().starts_with("capsule: "), "{step:?}: {err}");
                assert!(
                    !st.message().starts_with("capsule: capsule:"),
                    "{step:?}: {err}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(
            e.fake.attached().is_empty(),
            "{step:?}: {:?}",
            e.fake.attached()
        );
        assert!(e.fake.prepared_rootfs().is_empty(), "{step:?}");
        assert!(e.fake.guest_containers().is_empty(), "{step:?}");
        assert!(
            e.sink.events().is_empty(),
            "{step:?}: {:?}",
            e.sink.labels()
        );
        assert!(!e.paths("c1").dir.exists(), "{step:?}: state dir left");
        assert!(!b.join(state::BUNDLE_FILE).exists(), "{step:?}");
        assert!(e.svc.container_ids().is_empty());
        if step != Step::StartSandbox {
            assert!(e.fake.is_shut_down(), "{step:?}: sandbox left running");
        }
        // The shim can still create the container afterwards.
        e.fake.clear_failures();
        e.create("c1", &b, "").await.unwrap();
        assert_eq!(e.fake.attached().len(), 2);
    }

    // In a running sandbox, a failed Create leaves the sandbox and the
    // other containers alone.
    let e = env();
    let b1 = e.bundle("p1", &[], &[("/dev/a", 1)]);
    e.create("p1", &b1, "").await.unwrap();
    let b2 = e.bundle(
        "c2",
        &[
            ("io.kubernetes.cri.container-type", "container"),
            ("io.kubernetes.cri.sandbox-id", "p1"),
        ],
        &[("/dev/a", 1), ("/dev/b", 2)],
    );
    e.fake.fail_at(Step::AttachDevices);
    e.create("c2", &b2, "").await.unwrap_err();
    assert_eq!(e.fake.attached().len(), 1);
    assert_eq!(e.fake.attached().get("7:1"), Some(&1));
    assert!(!e.fake.is_shut_down());
    let rec = e.containers("p1").unwrap();
    assert_eq!(rec.containers.keys().collect::<Vec<_>>(), ["p1"]);
    assert_eq!(e.sink.labels(), ["create p1"]);
}

#[tokio::test]
async fn pause_resume_stats_pids_update_resize() {
    let e = env();
    let b = e.bundle("c1", &[], &[]);
    e.create("c1", &b, "").await.unwrap();
    e.start("c1", "").await.unwrap();
    let inner = &e.svc.inner;
    ops::pause(
        inner,
        api::PauseRequest {
            id: "c1".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        e.status("c1").status.enum_value().unwrap(),
        api::Status::PAUSED
    );
    assert_eq!(
        ops::pause(
            inner,
            api::PauseRequest {
                id: "c1".into(),
                ..Default::default()
            }
        )
        .await
        .unwrap_err()
        .kind(),
        Kind::FailedPrecondition
    );
    ops::resume(
        inner,
        api::ResumeRequest {
            id: "c1".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(e.sink.labels()[2..], ["paused c1", "resumed c1"]);

    let mut s = GuestStats::default();
    s.cgroup.memory_usage_bytes = 1234;
    s.version = "v2".into();
    e.fake.set_stats(s);
    let st = ops::stats(
        inner,
        api::StatsRequest {
            id: "c1".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(st.stats.type_url, "io.containerd.cgroups.v2.Metrics");

    let pids = ops::pids(
        inner,
        api::PidsRequest {
            id: "c1".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(pids.processes[0].pid, 1);

    let res = Any {
        type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into(),
        value: br#"{"pids":{"limit":10}}"#.to_vec(),
        ..Default::default()
    };
    ops::update(
        inner,
        api::UpdateTaskRequest {
            id: "c1".into(),
            resources: Some(res).into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(e
        .fake
        .calls()
        .iter()
        .any(|c| c.contains(r#"update c1 {"pids":{"limit":10}}"#)));
    // No terminal: resize is refused.
    let err = ops::resize_pty(
        inner,
        api::ResizePtyRequest {
            id: "c1".into(),
            width: 80,
            height: 24,
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), Kind::FailedPrecondition);
    let c = ops::connect(
        inner,
        api::ConnectRequest {
            id: "c1".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        (c.shim_pid, c.task_pid),
        (std::process::id(), 1),
        "the guest pid"
    );
}

/// Over a real ttrpc socket: the service answers under containerd 1.6's
/// `containerd.task.v2.Task` name, and Checkpoint is UNIMPLEMENTED (not the
/// generated NOT_FOUND).
#[tokio::test]
async fn ttrpc_v2_service_name_and_unimplemented_checkpoint() {
    let e = env();
    let sock = e.dir.path().join("shim.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let mut services = containerd_shim_protos::shim_async::create_task(Arc::new(e.svc.clone()));
    let v3 = services.remove(crate::bootstrap::TASK_V3).unwrap();
    services.insert(crate::bootstrap::TASK_V2.into(), v3);
    let mut server = ttrpc::r#async::Server::new()
        .add_listener(ttrpc::r#async::transport::Listener::try_from(listener).unwrap())
        .register_service(services);
    server.start().await.unwrap();
    let client = ttrpc::r#async::Client::connect(&format!("unix://{}", sock.display()))
        .await
        .unwrap();
    let call = |method: &str, payload: Vec<u8>| {
        let mut req = ttrpc::Request::new();
        req.service = crate::bootstrap::TASK_V2.into();
        req.method = method.into();
        req.payload = payload;
        req.timeout_nano = 5_000_000_000;
        client.request(req)
    };
    use containerd_shim_protos::protobuf::Message;
    let err = call(
        "Checkpoint",
        api::CheckpointTaskRequest {
            id: "c1".into(),
            ..Default::default()
        }
        .write_to_bytes()
        .unwrap(),
    )
    .await
    .unwrap_err();
    match err {
        ttrpc::Error::RpcStatus(s) => {
            assert_eq!(s.code(), ttrpc::Code::UNIMPLEMENTED);
            assert!(s.message().contains("checkpoint"), "{}", s.message());
        }
        other => panic!("{other:?}"),
    }
    let err = call(
        "State",
        api::StateRequest {
            id: "nope".into(),
            ..Default::default()
        }
        .write_to_bytes()
        .unwrap(),
    )
    .await
    .unwrap_err();
    match err {
        ttrpc::Error::RpcStatus(s) => assert_eq!(s.code(), ttrpc::Code::NOT_FOUND),
        other => panic!("{other:?}"),
    }
    server.shutdown().await.unwrap();
}
