//! containerd 2.1's CRI plugin with capsule as runtime handler, in both of
//! its sandbox modes (the CRI suite's private node, `capsule_tests::cri`):
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
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use capsule_tests::containerd::{Containerd, Version};
use capsule_tests::cri::containerd::{Sandboxer, CAPSULE_HANDLER};
use capsule_tests::cri::node::{Node, NodeOptions, POD_SUBNET_PREFIX};
use capsule_tests::cri::proto::v1 as cri;
use capsule_tests::cri::spec;

fn pod_config(node: &Node, name: &str) -> cri::PodSandboxConfig {
    let log_dir = node.log_dir.join(name);
    let _ = std::fs::create_dir_all(&log_dir);
    let mut pod = spec::pod(
        name,
        &format!("uid-{name}"),
        &log_dir.display().to_string(),
        &node.cgroup_parent,
    );
    pod.hostname = format!("{name}-0");
    pod
}

/// shareProcessNamespace: the containers share the pod's pid namespace
/// (ipc and uts are always the pod's).
fn shared_pid() -> cri::NamespaceOption {
    cri::NamespaceOption {
        pid: cri::NamespaceMode::Pod as i32,
        ..spec::namespaces()
    }
}

/// `sh -c script` in container `id`: its stdout (exit 0 required).
fn exec(node: &Node, id: &str, script: &str) -> Result<String> {
    let r = node.cri.exec_sync(id, &["sh", "-c", script], 120)?;
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

fn pod_with_two_containers(sandboxer: Sandboxer) -> Result<()> {
    // One VM at a time (TCG on a small machine).
    static SERIAL: Mutex<()> = Mutex::new(());
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let node = Node::start(NodeOptions {
        containerd: Containerd::find(Version::V2_1)?,
        sandboxer,
        memory_mib: 256,
    })?;
    let r = run(&node);
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

fn run(node: &Node) -> Result<()> {
    let mut config = pod_config(node, "web");
    spec::pod_security(&mut config).namespace_options = Some(shared_pid());
    let pod = node.cri.run_pod_sandbox(config.clone(), CAPSULE_HANDLER)?;
    let status = node
        .cri
        .pod_sandbox_status(&pod)?
        .status
        .context("no pod status")?;
    ensure!(
        status.state == cri::PodSandboxState::SandboxReady as i32,
        "pod not ready: {status:?}"
    );
    let ip = status.network.map(|n| n.ip).unwrap_or_default();
    ensure!(ip.starts_with(POD_SUBNET_PREFIX), "pod IP {ip:?} (CNI)");
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
        let mut c = spec::shell(name, script);
        spec::security(&mut c).namespace_options = Some(shared_pid());
        let id = node.cri.create_container(&pod, c, config.clone())?;
        node.cri.start_container(&id)?;
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
    let a = exec(node, &ids[0], look)?;
    let b = exec(node, &ids[1], look)?;
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
    let want_pid1 = match node.opts.sandboxer {
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
        exec(node, &ids[0], "cat /tmp/who")?.trim() == "c1",
        "exec output"
    );

    // What containerd did with capsule's replies to `start`.
    let containers =
        String::from_utf8_lossy(&node.ctr(&["containers", "ls", "-q"])?.stdout).into_owned();
    match node.opts.sandboxer {
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

    node.cri.stop_pod_sandbox(&pod)?;
    ensure!(
        node.qemu_processes().is_empty(),
        "QEMU still runs after StopPodSandbox: {:?}",
        node.qemu_processes()
    );
    node.cri.remove_pod_sandbox(&pod)?;
    let pods = node.cri.list_pod_sandbox(None)?;
    if !pods.is_empty() {
        bail!("pods left: {pods:?}");
    }
    node.wait_clean(Duration::from_secs(60))
        .map_err(|left| anyhow::anyhow!("left after the pod: {}", left.join("; ")))
}
#[test]
fn podsandbox_mode_runs_a_pod_in_one_vm() {
    if let Err(e) = pod_with_two_containers(Sandboxer::PodSandbox) {
        panic!("{e:#}");
    }
}

#[test]
fn shim_mode_serves_the_sandbox_api() {
    if let Err(e) = pod_with_two_containers(Sandboxer::Shim) {
        panic!("{e:#}");
    }
}
