//! containerd 2.1's CRI plugin with capsule as runtime handler, in both of
//! its sandbox modes (see `node` for the private node):
//!
//! - `podsandbox`: the pod's sandbox is a pause container, capsule's first
//!   task of the pod; the pod's containers join its shim and VM;
//! - `shim`: capsule serves containerd's Sandbox API (`service::sandbox_api`):
//!   CreateSandbox/StartSandbox boot the VM, there is no pause container,
//!   and the containers are created as task API v3 tasks on the sandbox's
//!   shim (no `start` of their own).
//!
//! Each runs a pod with two containers sharing the pod's pid, ipc and uts
//! namespaces in one VM, execs in a container, stops and removes the pod,
//! and checks nothing is left (QEMU, virtiofsd, shim, state, mounts,
//! bundles, sockets, CNI leases) and containerd logged no error about
//! capsule. The VM runs under TCG: the calls get minutes.
#[path = "sandbox_api/node.rs"]
mod node;

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use k8s_cri::v1 as cri;
use node::{call, Node, Sandboxer, BUSYBOX, HANDLER};

const SLOW: Duration = Duration::from_secs(300);

fn pod_config(node: &Node, name: &str) -> cri::PodSandboxConfig {
    let log_dir = node.dir.path().join("logs").join(name);
    let _ = std::fs::create_dir_all(&log_dir);
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: format!("{name}-0"),
        log_directory: log_dir.display().to_string(),
        labels: HashMap::from([("app".to_string(), name.to_string())]),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                // shareProcessNamespace: the containers share the pod's pid
                // namespace (ipc and uts are always the pod's).
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Pod as i32,
                    pid: cri::NamespaceMode::Pod as i32,
                    ipc: cri::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn container_config(name: &str, script: &str) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: BUSYBOX.into(),
            ..Default::default()
        }),
        command: vec!["sh".into(), "-c".into(), script.into()],
        log_path: format!("{name}.log"),
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Pod as i32,
                    pid: cri::NamespaceMode::Pod as i32,
                    ipc: cri::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `sh -c script` in container `id`: its stdout (exit 0 required).
async fn exec(node: &Node, id: &str, script: &str) -> Result<String> {
    let mut rt = node.cri.runtime.clone();
    let r = call(
        &format!("ExecSync in {id}"),
        SLOW,
        rt.exec_sync(cri::ExecSyncRequest {
            container_id: id.into(),
            cmd: vec!["sh".into(), "-c".into(), script.into()],
            timeout: 120,
        }),
    )
    .await?;
    ensure!(
        r.exit_code == 0,
        "`{script}` in {id} exited {}: {}{}",
        r.exit_code,
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    Ok(String::from_utf8_lossy(&r.stdout).into_owned())
}

/// The bundle containerd gave a container's task, and what its
/// `bootstrap.json` (written only when the task joins a sandbox's shim
/// without a `start`) says.
fn bootstrap_of(node: &Node, id: &str) -> Option<serde_json::Value> {
    let b = node
        .containerd_state("io.containerd.runtime.v2.task")
        .join(id)
        .join("bootstrap.json");
    serde_json::from_slice(&std::fs::read(b).ok()?).ok()
}

async fn pod_with_two_containers(sandboxer: Sandboxer) -> Result<()> {
    // One VM at a time (TCG on a small machine).
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _serial = SERIAL.lock().await;
    let node = Node::start(sandboxer).await?;
    let r = run(&node).await;
    if let Err(e) = &r {
        return Err(anyhow::anyhow!("{e:#}\n{}", node.log_tail()));
    }
    let errors = node.log_errors();
    ensure!(
        errors.is_empty(),
        "containerd logged {} error line(s) about capsule:\n{}",
        errors.len(),
        errors.join("\n")
    );
    Ok(())
}

async fn run(node: &Node) -> Result<()> {
    let mut rt = node.cri.runtime.clone();
    let config = pod_config(node, "web");
    let pod = call(
        "RunPodSandbox",
        SLOW,
        rt.run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: HANDLER.into(),
        }),
    )
    .await?
    .pod_sandbox_id;
    let status = call(
        "PodSandboxStatus",
        SLOW,
        rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        }),
    )
    .await?
    .status
    .context("no pod status")?;
    ensure!(
        status.state == cri::PodSandboxState::SandboxReady as i32,
        "pod not ready: {status:?}"
    );
    let ip = status.network.map(|n| n.ip).unwrap_or_default();
    ensure!(ip.starts_with("10.98.0."), "pod IP {ip:?} (CNI)");
    ensure!(
        node.capsule_sandboxes() == vec![pod.clone()],
        "capsule sandboxes {:?}, pod {pod}",
        node.capsule_sandboxes()
    );

    let mut ids = Vec::new();
    for (name, script) in [
        ("c1", "echo c1 > /tmp/who; exec sleep 100001"),
        ("c2", "exec sleep 100002"),
    ] {
        let id = call(
            &format!("CreateContainer {name}"),
            SLOW,
            rt.create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container_config(name, script)),
                sandbox_config: Some(config.clone()),
            }),
        )
        .await?
        .container_id;
        call(
            &format!("StartContainer {name}"),
            SLOW,
            rt.start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            }),
        )
        .await?;
        ids.push(id);
    }

    // One VM, one shim for the whole pod.
    ensure!(
        node.qemu_processes().len() == 1,
        "QEMU processes: {:?}",
        node.qemu_processes()
    );
    ensure!(
        node.shim_processes().len() == 1,
        "shims: {:?}",
        node.shim_processes()
    );

    // The containers share the pod's namespaces: hostname, ipc, pid.
    let look = "hostname; for n in ipc uts pid; do readlink /proc/self/ns/$n; done; \
                ps -o args | grep -c '^sleep 10000[12]$'; tr '\\0' ' ' < /proc/1/cmdline";
    let a = exec(node, &ids[0], look).await?;
    let b = exec(node, &ids[1], look).await?;
    let la: Vec<&str> = a.lines().collect();
    ensure!(la.first() == Some(&"web-0"), "hostname: {a}");
    ensure!(
        a.lines().skip(1).take(3).collect::<Vec<_>>()
            == b.lines().skip(1).take(3).collect::<Vec<_>>(),
        "the containers do not share ipc/uts/pid namespaces:\n{a}\n--\n{b}"
    );
    ensure!(
        la.get(4) == Some(&"2"),
        "both containers' processes visible: {a}"
    );
    let pid1 = la.get(5).map(|s| s.trim()).unwrap_or_default();
    let want_pid1 = match node.sandboxer {
        // The pause container's init.
        Sandboxer::PodSandbox => "/bin/sleep infinity",
        // The agent's own pod pause: there is no pause container.
        Sandboxer::Shim => "capsule-pod pod-pause",
    };
    ensure!(
        pid1 == want_pid1,
        "PID 1 of the pod is {pid1:?}, not {want_pid1:?}"
    );
    ensure!(
        exec(node, &ids[0], "cat /tmp/who").await?.trim() == "c1",
        "exec output"
    );

    // What containerd did with capsule's replies to `start`.
    let containers =
        String::from_utf8_lossy(&node.ctr(&["containers", "ls", "-q"])?.stdout).into_owned();
    match node.sandboxer {
        Sandboxer::PodSandbox => {
            ensure!(
                containers.lines().any(|l| l == pod),
                "no pause container {pod}: {containers}"
            );
            for id in &ids {
                ensure!(
                    bootstrap_of(node, id).is_none_or(|b| b["version"] == 2),
                    "{id} joined with task API v3 in podsandbox mode"
                );
            }
        }
        Sandboxer::Shim => {
            ensure!(
                !containers.lines().any(|l| l == pod),
                "a pause container exists: {containers}"
            );
            let bundle = node
                .containerd_state("io.containerd.sandbox.controller.v1.shim")
                .join(&pod);
            ensure!(
                bundle.is_dir() && !bundle.join("config.json").exists(),
                "the sandbox's bundle {}",
                bundle.display()
            );
            for id in &ids {
                let b = bootstrap_of(node, id).with_context(|| {
                    format!("{id}: no bootstrap.json: it was started, not joined")
                })?;
                ensure!(b["version"] == 3, "{id} joined with {b}");
            }
        }
    }

    call(
        "StopPodSandbox",
        SLOW,
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        }),
    )
    .await?;
    ensure!(
        node.qemu_processes().is_empty(),
        "QEMU still runs after StopPodSandbox: {:?}",
        node.qemu_processes()
    );
    call(
        "RemovePodSandbox",
        SLOW,
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        }),
    )
    .await?;
    let pods = call(
        "ListPodSandbox",
        SLOW,
        rt.list_pod_sandbox(cri::ListPodSandboxRequest::default()),
    )
    .await?
    .items;
    if !pods.is_empty() {
        bail!("pods left: {pods:?}");
    }
    node.wait_clean(Duration::from_secs(60))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podsandbox_mode_runs_a_pod_in_one_vm() {
    if let Err(e) = pod_with_two_containers(Sandboxer::PodSandbox).await {
        panic!("{e:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shim_mode_serves_the_sandbox_api() {
    if let Err(e) = pod_with_two_containers(Sandboxer::Shim).await {
        panic!("{e:#}");
    }
}
