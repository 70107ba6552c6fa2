//! What containerd's CRI plugin needs from the agent, in the real guest
//! (QEMU, TCG): pod namespaces joined by path, pod sysctls, stop signals
//! that reach the process, seccomp, OOM events, privileged containers.
//!
//! Needs what `vm.rs` needs (qemu, virtiofsd, the guest image).
#![allow(clippy::await_holding_lock)]
mod support;

use std::time::{Duration, Instant};

use capsule_agent_protocol::client::AgentConn;
use serde_json::json;
use support::*;
use ttrpc::Code;

/// A CRI-like spec: `namespaces` and `sysctl` replace the defaults.
fn pod_spec(
    args: &[&str],
    hostname: &str,
    namespaces: serde_json::Value,
    sysctl: serde_json::Value,
) -> serde_json::Value {
    let mut s = spec(args, false, hostname);
    s["linux"]["namespaces"] = namespaces;
    s["linux"]["sysctl"] = sysctl;
    s
}

async fn start(vm: &Vm, conn: &AgentConn, cid: &str, s: &serde_json::Value) -> u32 {
    let rootfs = vm.busybox_rootfs(cid);
    create_container(conn, cid, &rootfs, s, vec![], false)
        .await
        .unwrap_or_else(|e| panic!("create {cid}: {e}\n--- console ---\n{}", vm.console()));
    conn.start_container(&creq(cid))
        .await
        .unwrap_or_else(|e| panic!("start {cid}: {e}"))
        .pid
}

/// Runs `script` in `cid` with `sh -c`; returns its stdout, asserting exit 0.
async fn sh(conn: &AgentConn, cid: &str, exec_id: &str, script: &str) -> String {
    let (st, out, err) = run(conn, cid, exec_id, &["sh", "-c", script]).await;
    assert_eq!(st, 0, "{cid}: {script}: {out}{err}");
    out
}

/// Waits for the init of `cid` at most `limit`; returns status and time.
async fn wait_init(conn: &AgentConn, cid: &str, limit: Duration) -> (Option<i32>, Duration) {
    let t = Instant::now();
    let st = tokio::time::timeout(limit, wait(conn, cid, "")).await.ok();
    (st, t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_namespaces_sysctls_and_stop_signals() {
    let _g = vm_lock();
    let vm = Vm::boot(VmOptions::default()).await;
    let conn = vm.connect().await;
    create_sandbox(&conn, "").await.unwrap();

    // The sandbox (pause) container: new pid, ipc, uts; pod sysctls.
    let pause = start(
        &vm,
        &conn,
        "pause",
        &pod_spec(
            &["sleep", "100000"],
            "pod-host",
            json!([{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                   {"type": "network", "path": "/var/run/netns/cni-1234"}]),
            json!({"kernel.shm_rmid_forced": "1", "fs.mqueue.msg_max": "64"}),
        ),
    )
    .await;
    let ns = |t: &str| format!("/proc/{pause}/ns/{t}");

    // A container of the pod (PodPID mode): joins the sandbox's namespaces
    // by path, applies its own IPC sysctl in the shared namespace.
    start(
        &vm,
        &conn,
        "app",
        &pod_spec(
            &["sh", "-c", "sleep 5; exec top"],
            "pod-host",
            json!([{"type": "pid", "path": ns("pid")}, {"type": "ipc", "path": ns("ipc")},
                   {"type": "uts", "path": ns("uts")}, {"type": "mount"},
                   {"type": "network", "path": "/var/run/netns/cni-1234"}]),
            json!({"kernel.msgmax": "12345"}),
        ),
    )
    .await;
    let out = sh(
        &conn,
        "app",
        "look",
        "tr '\\0' ' ' < /proc/1/cmdline; echo; hostname; cat /proc/sys/kernel/shm_rmid_forced \
         /proc/sys/fs/mqueue/msg_max /proc/sys/kernel/msgmax; readlink /proc/self/ns/ipc; readlink /proc/self/ns/uts",
    )
    .await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0].trim(),
        "sleep 100000",
        "/proc/1 is the pause process: {out}"
    );
    assert_eq!(lines[1], "pod-host", "{out}");
    assert_eq!(&lines[2..5], ["1", "64", "12345"], "pod sysctls: {out}");
    let pause_ns = sh(
        &conn,
        "pause",
        "ns",
        "readlink /proc/self/ns/ipc; readlink /proc/self/ns/uts; cat /proc/sys/kernel/msgmax",
    )
    .await;
    assert_eq!(
        lines[5..7].join("\n"),
        pause_ns.lines().take(2).collect::<Vec<_>>().join("\n"),
        "same ipc and uts namespaces"
    );
    assert_eq!(pause_ns.lines().nth(2), Some("12345"), "{pause_ns}");

    // HostPID / HostIPC: no pid or ipc namespace in the spec shares the
    // VM's (the agent is its PID 1); the pod's sysctls are not there.
    start(
        &vm,
        &conn,
        "hostns",
        &pod_spec(
            &["sleep", "100000"],
            "",
            json!([{"type": "mount"}, {"type": "network"}]),
            json!({}),
        ),
    )
    .await;
    let out = sh(
        &conn,
        "hostns",
        "look",
        "tr '\\0' ' ' < /proc/1/cmdline; echo; cat /proc/sys/kernel/shm_rmid_forced; readlink /proc/self/ns/ipc",
    )
    .await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0].trim(), "/init", "the VM's pid namespace: {out}");
    assert_eq!(lines[1], "0", "{out}");
    assert_ne!(lines[2], pause_ns.lines().next().unwrap_or(""), "{out}");

    // Refused: paths that are not a live process of this sandbox with the
    // matching namespace type, and IPC sysctls without an ipc namespace.
    let rootfs = vm.busybox_rootfs("bad");
    for (namespaces, sysctl, want) in [
        (
            json!([{"type": "ipc", "path": "/proc/1/ns/ipc"}]),
            json!({}),
            "not a container process",
        ),
        (
            json!([{"type": "ipc", "path": "/proc/99999/ns/ipc"}]),
            json!({}),
            "not running",
        ),
        (
            json!([{"type": "ipc", "path": ns("uts")}]),
            json!({}),
            "not \"ipc\"",
        ),
        (
            json!([{"type": "uts", "path": "/run/netns/x"}]),
            json!({}),
            "/proc/<pid>/ns/<type>",
        ),
        (
            json!([{"type": "mount"}]),
            json!({"kernel.shm_rmid_forced": "1"}),
            "ipc namespace",
        ),
    ] {
        let s = pod_spec(&["true"], "", namespaces.clone(), sysctl);
        let e = create_container(&conn, "bad", &rootfs, &s, vec![], false)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(Code::INVALID_ARGUMENT), "{e}");
        let m = e.to_string();
        assert!(
            m.contains("\"bad\"") && m.contains(want),
            "{namespaces}: {m}"
        );
        if let Some(p) = namespaces[0]["path"].as_str() {
            assert!(
                m.contains(p) && m.contains(namespaces[0]["type"].as_str().unwrap()),
                "{m}"
            );
        }
    }

    // Stop signals. In the pod's pid namespace `sh` is not init: SIGTERM
    // during `sleep 5` ends it at once, as with runc.
    signal(&conn, "app", "", 15, false).await.unwrap();
    let (st, took) = wait_init(&conn, "app", Duration::from_secs(3)).await;
    assert_eq!(st, Some(143), "app stopped by SIGTERM in {took:?}");

    // With a pid namespace of its own, `sh` is PID 1 there and the kernel
    // drops a SIGTERM it does not handle: the agent sends SIGKILL.
    let own = json!([{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]);
    start(
        &vm,
        &conn,
        "own",
        &pod_spec(
            &["sh", "-c", "sleep 5; exec top"],
            "own",
            own.clone(),
            json!({}),
        ),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    signal(&conn, "own", "", 15, false).await.unwrap();
    let (st, took) = wait_init(&conn, "own", Duration::from_secs(3)).await;
    assert_eq!(st, Some(137), "stopped during the sleep, in {took:?}");
    eprintln!(
        "SIGTERM during `sleep 5; exec top` as PID 1: stopped in {:?}",
        t.elapsed()
    );

    // CRI's case: SIGTERM right after StartContainer, before `top` has
    // installed its handlers.
    start(
        &vm,
        &conn,
        "top",
        &pod_spec(&["top"], "top", own.clone(), json!({})),
    )
    .await;
    let t = Instant::now();
    signal(&conn, "top", "", 15, false).await.unwrap();
    let (st, took) = wait_init(&conn, "top", Duration::from_secs(3)).await;
    assert!(
        matches!(st, Some(137 | 143)),
        "top stopped: {st:?} in {took:?}"
    );
    eprintln!(
        "SIGTERM right after start of top: {st:?} in {:?}",
        t.elapsed()
    );

    // A PID 1 that handles SIGTERM gets SIGTERM itself.
    start(
        &vm,
        &conn,
        "trap",
        &pod_spec(
            &[
                "sh",
                "-c",
                "trap 'exit 42' TERM; echo ready > /tmp/r; while true; do sleep 0.2; done",
            ],
            "trap",
            own,
            json!({}),
        ),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    while run(&conn, "trap", &format!("r{n}"), &["test", "-f", "/tmp/r"])
        .await
        .0
        != 0
    {
        n += 1;
        assert!(Instant::now() < deadline, "the trap never got installed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    signal(&conn, "trap", "", 15, false).await.unwrap();
    let (st, took) = wait_init(&conn, "trap", Duration::from_secs(5)).await;
    assert_eq!(st, Some(42), "the trap ran, in {took:?}");

    for c in ["app", "own", "top", "trap", "hostns", "pause"] {
        remove(&conn, c).await.unwrap();
    }
    vm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seccomp_profiles() {
    let _g = vm_lock();
    let vm = Vm::boot(VmOptions::default()).await;
    let conn = vm.connect().await;
    create_sandbox(&conn, "").await.unwrap();
    let own = json!([{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]);
    let profile = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": ["sethostname", "not_a_syscall_at_all"], "action": "SCMP_ACT_ERRNO"},
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 28},
            {"names": ["sync"], "action": "SCMP_ACT_KILL_PROCESS"},
            {"names": ["personality"], "action": "SCMP_ACT_ERRNO",
             "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]}
        ]
    });
    let script = "grep -E '^(Seccomp|NoNewPrivs|CapEff):' /proc/self/status; \
                  hostname blocked 2>&1; echo rc=$?; mkdir /tmp/d 2>&1; echo rc=$?";

    // no_new_privs on (support::process): loaded right before execve.
    let mut s = pod_spec(
        &["sh", "-c", &format!("{script}; sleep 100000")],
        "sc",
        own.clone(),
        json!({}),
    );
    s["linux"]["seccomp"] = profile.clone();
    s["process"]["capabilities"] = json!({"bounding": ["CAP_SYS_ADMIN", "CAP_KILL"],
        "effective": ["CAP_SYS_ADMIN", "CAP_KILL"], "permitted": ["CAP_SYS_ADMIN", "CAP_KILL"]});
    start(&vm, &conn, "sc", &s).await;
    let out = sh(&conn, "sc", "again", script).await;
    for want in [
        "Seccomp:\t2",
        "NoNewPrivs:\t1",
        "CapEff:\t000001ffffffffff",
        "Operation not permitted",
        "No space left on device",
    ] {
        assert!(
            out.contains(want),
            "exec in a seccomp container: {want}: {out}"
        );
    }
    assert_eq!(out.matches("rc=1").count(), 2, "{out}");
    // KILL_PROCESS: SIGSYS.
    let (st, _, _) = run(&conn, "sc", "sync", &["sync"]).await;
    assert_eq!(st, 128 + libc::SIGSYS, "sync under SCMP_ACT_KILL_PROCESS");
    // The init's own output (same profile, loaded in the init).
    signal(&conn, "sc", "", 9, false).await.unwrap();
    let init_out = String::from_utf8_lossy(&read_all(&conn, "sc", "", false).await).into_owned();
    assert!(
        init_out.contains("Seccomp:\t2")
            && init_out.contains("CapEff:\t0000000000200020")
            && init_out.contains("Operation not permitted"),
        "{init_out}"
    );

    // no_new_privs off, root with every capability: loaded before the
    // capabilities are set, still in force.
    let mut s = pod_spec(&["sh", "-c", script], "sc2", own.clone(), json!({}));
    s["linux"]["seccomp"] = profile.clone();
    s["process"]["noNewPrivileges"] = json!(false);
    start(&vm, &conn, "sc2", &s).await;
    let out = String::from_utf8_lossy(&read_all(&conn, "sc2", "", false).await).into_owned();
    assert_eq!(wait(&conn, "sc2", "").await, 0, "{out}");
    assert!(
        out.contains("Seccomp:\t2") && out.contains("NoNewPrivs:\t0"),
        "{out}"
    );
    assert!(
        out.contains("CapEff:\t000001ffffffffff"),
        "all capabilities: {out}"
    );
    assert!(out.contains("Operation not permitted"), "{out}");

    // Without a profile: mode 0 and sethostname works.
    start(
        &vm,
        &conn,
        "plain",
        &pod_spec(&["sh", "-c", script], "plain", own.clone(), json!({})),
    )
    .await;
    let out = String::from_utf8_lossy(&read_all(&conn, "plain", "", false).await).into_owned();
    assert_eq!(wait(&conn, "plain", "").await, 0, "{out}");
    assert!(out.contains("Seccomp:\t0"), "{out}");
    assert_eq!(out.matches("rc=0").count(), 2, "{out}");

    // Refused at CreateContainer: SCMP_ACT_NOTIFY.
    let mut s = pod_spec(&["true"], "x", own, json!({}));
    s["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["ioctl"], "action": "SCMP_ACT_NOTIFY"}]});
    let rootfs = vm.busybox_rootfs("notify");
    let e = create_container(&conn, "notify", &rootfs, &s, vec![], false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::INVALID_ARGUMENT), "{e}");
    assert!(
        e.to_string().contains("NOTIFY") && e.to_string().contains("\"notify\""),
        "{e}"
    );

    for c in ["sc", "sc2", "plain"] {
        remove(&conn, c).await.unwrap();
    }
    vm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_events_and_privileged_devices() {
    use capsule_agent_protocol::agent::GetOOMEventRequest;
    let _g = vm_lock();
    let vm = Vm::boot(VmOptions::default()).await;
    let conn = vm.connect().await;
    create_sandbox(&conn, "").await.unwrap();
    let own = json!([{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]);
    let oom_req = |after: u64| {
        let mut r = GetOOMEventRequest::new();
        r.after = after;
        r
    };

    // No OOM yet: the long poll waits (and is cancelled here, losing nothing).
    let none = tokio::time::timeout(Duration::from_secs(1), conn.get_oom_event(&oom_req(0))).await;
    assert!(none.is_err(), "no OOM event yet: {none:?}");

    // A container under a 24 MiB limit that keeps 100 MB in a shell variable.
    let mut s = pod_spec(
        &[
            "sh",
            "-c",
            "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo survived",
        ],
        "oom",
        own.clone(),
        json!({}),
    );
    s["linux"]["resources"]["memory"] = json!({"limit": 24 << 20});
    let t = Instant::now();
    start(&vm, &conn, "hog", &s).await;
    let poll = tokio::time::timeout(Duration::from_secs(60), conn.get_oom_event(&oom_req(0)))
        .await
        .expect("an OOM event within 60 s")
        .unwrap();
    assert_eq!(poll.container_id, "hog");
    assert_eq!(poll.seq, 1);
    eprintln!("OOM event {:?} after start", t.elapsed());
    let (st, _) = wait_init(&conn, "hog", Duration::from_secs(30)).await;
    assert_eq!(st, Some(137), "the init was OOM-killed");
    // Asking again from the start gives the same event; after it, nothing.
    assert_eq!(conn.get_oom_event(&oom_req(0)).await.unwrap().seq, 1);
    let after =
        tokio::time::timeout(Duration::from_millis(500), conn.get_oom_event(&oom_req(1))).await;
    assert!(after.is_err(), "one event per OOM kill: {after:?}");
    remove(&conn, "hog").await.unwrap();
    // Stats of a removed container are gone; no new event from the removal.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), conn.get_oom_event(&oom_req(1)))
            .await
            .is_err()
    );

    // Privileged: the allow-all device rule gives the guest's devices and
    // the spec's capabilities.
    let all_caps: Vec<String> = capsule_agent::container::spec::CAPS
        .iter()
        .map(|c| format!("CAP_{c}"))
        .collect();
    let script = "ls /dev; grep CapEff /proc/self/status; test -c /dev/kmsg && echo kmsg-ok; \
                  test -e /dev/console && echo console-there; test -L /dev/ptmx && echo ptmx-link; \
                  head -c 4 /dev/hwrng | wc -c";
    let mut s = pod_spec(&["sh", "-c", script], "priv", own.clone(), json!({}));
    s["linux"]["resources"]["devices"] =
        json!([{"allow": false, "access": "rwm"}, {"allow": true, "access": "rwm"}]);
    s["process"]["capabilities"] = json!({"bounding": all_caps, "effective": all_caps,
        "permitted": all_caps});
    s["linux"]["maskedPaths"] = json!([]);
    s["linux"]["readonlyPaths"] = json!([]);
    start(&vm, &conn, "priv", &s).await;
    let out = String::from_utf8_lossy(&read_all(&conn, "priv", "", false).await).into_owned();
    assert_eq!(wait(&conn, "priv", "").await, 0, "{out}");
    // (capsule's kernel has no /dev/mem: CONFIG_DEVMEM is off.)
    for want in [
        "kmsg-ok",
        "ttyS0",
        "hwrng",
        "ptmx-link",
        "CapEff:\t000001ffffffffff",
    ] {
        assert!(out.contains(want), "privileged /dev: {want}: {out}");
    }
    assert!(!out.contains("console-there"), "{out}");
    assert!(
        out.trim_end().ends_with('4'),
        "the guest's hwrng works: {out}"
    );
    // The same without the rule: only the standard nodes.
    s["linux"]["resources"]["devices"] = json!([{"allow": false, "access": "rwm"}]);
    start(&vm, &conn, "plain", &s).await;
    let out = String::from_utf8_lossy(&read_all(&conn, "plain", "", false).await).into_owned();
    assert!(!out.contains("kmsg-ok") && !out.contains("hwrng"), "{out}");
    let _ = wait(&conn, "plain", "").await;
    for c in ["priv", "plain"] {
        remove(&conn, c).await.unwrap();
    }
    vm.shutdown().await;
}
