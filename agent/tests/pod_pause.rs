//! A pod without a pause container (containerd's Sandbox API), in the real
//! guest (QEMU, TCG): CreateSandbox with `pod_namespaces` makes the pod's
//! pid, ipc and uts namespaces, held by the agent's own pause process, and
//! containers join them by `/proc/<pod pid>/ns/<type>` as CRI specifies.
//!
//! Needs what `vm.rs` needs (qemu, virtiofsd, the guest image).
#![allow(clippy::await_holding_lock)]
mod support;

use capsule_agent_protocol::agent::{CreateSandboxRequest, Storage};
use capsule_agent_protocol::client::AgentConn;
use serde_json::json;
use support::*;
use ttrpc::Code;

async fn create_pod(conn: &AgentConn, hostname: &str) -> Result<u32, String> {
    let mut st = Storage::new();
    st.driver = "virtiofs".into();
    st.source = SHARE_TAG.into();
    st.mount_point = SHARE_GUEST.into();
    let mut req = CreateSandboxRequest::new();
    req.sandbox_id = "pod1".into();
    req.hostname = hostname.into();
    req.storages.push(st);
    req.pod_namespaces = true;
    conn.create_sandbox(&req)
        .await
        .map(|r| r.pod_pid)
        .map_err(|e| e.to_string())
}

/// A CRI container of the pod: joins its pid, ipc and uts namespaces.
fn app_spec(args: &[&str], pod_pid: u32) -> serde_json::Value {
    let mut s = spec(args, false, "pod-host");
    let ns = |t: &str| format!("/proc/{pod_pid}/ns/{t}");
    s["linux"]["namespaces"] = json!([
        {"type": "pid", "path": ns("pid")}, {"type": "ipc", "path": ns("ipc")},
        {"type": "uts", "path": ns("uts")}, {"type": "mount"},
        {"type": "network", "path": ns("net")}
    ]);
    s
}

async fn sh(conn: &AgentConn, cid: &str, exec_id: &str, script: &str) -> String {
    let (st, out, err) = run(conn, cid, exec_id, &["sh", "-c", script]).await;
    assert_eq!(st, 0, "{cid}: {script}: {out}{err}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_join_the_pod_namespaces_of_the_agents_pause() {
    let _g = vm_lock();
    let vm = Vm::boot(VmOptions::default()).await;
    let conn = vm.connect().await;
    let pod = create_pod(&conn, "pod-host")
        .await
        .unwrap_or_else(|e| panic!("CreateSandbox: {e}\n--- console ---\n{}", vm.console()));
    assert!(pod > 1, "pod pid {pod}");
    // Once.
    let again = create_pod(&conn, "pod-host").await.unwrap_err();
    assert!(again.contains("exist already"), "{again}");

    for cid in ["app1", "app2"] {
        let rootfs = vm.busybox_rootfs(cid);
        create_container(
            &conn,
            cid,
            &rootfs,
            &app_spec(&["sleep", "100000"], pod),
            vec![],
            false,
        )
        .await
        .unwrap_or_else(|e| panic!("create {cid}: {e}\n--- console ---\n{}", vm.console()));
        conn.start_container(&creq(cid))
            .await
            .unwrap_or_else(|e| panic!("start {cid}: {e}"));
    }
    let look = "tr '\\0' ' ' < /proc/1/cmdline; echo; hostname; readlink /proc/self/ns/ipc; \
                readlink /proc/self/ns/uts; readlink /proc/self/ns/pid; ps -o args | grep -c '^sleep 100000$'";
    let a = sh(&conn, "app1", "look", look).await;
    let b = sh(&conn, "app2", "look", look).await;
    let lines: Vec<&str> = a.lines().collect();
    assert_eq!(
        lines[0].trim(),
        "capsule-pod pod-pause",
        "PID 1 of the pod is the agent's pause: {a}"
    );
    assert_eq!(lines[1], "pod-host", "{a}");
    assert_eq!(
        lines[5], "2",
        "both containers' processes in one pid namespace: {a}"
    );
    assert_eq!(
        a.lines().skip(2).take(3).collect::<Vec<_>>(),
        b.lines().skip(2).take(3).collect::<Vec<_>>(),
        "same ipc, uts and pid namespaces"
    );

    // After DestroySandbox the pause is gone: its namespaces can no longer
    // be joined.
    let mut d = capsule_agent_protocol::agent::DestroySandboxRequest::new();
    d.sandbox_id = "pod1".into();
    conn.destroy_sandbox(&d).await.expect("DestroySandbox");
    let rootfs = vm.busybox_rootfs("late");
    let e = create_container(
        &conn,
        "late",
        &rootfs,
        &app_spec(&["true"], pod),
        vec![],
        false,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Some(Code::INVALID_ARGUMENT), "{e}");
    assert!(e.to_string().contains("is not running in the guest"), "{e}");
}
