//! End-to-end tests of the agent in the real guest under QEMU (TCG): the
//! host client over virtio-serial, containers on a virtio-fs share.
//!
//! Needs qemu-system-x86_64, virtiofsd and the guest image (built by
//! `agent/build-static.sh`, which the support module runs). One VM at a time:
//! each test holds `vm_lock()` (a std mutex, on purpose across awaits).
#![allow(clippy::await_holding_lock)]
mod support;

use std::time::{Duration, Instant};

use capsule_agent_protocol::agent::*;
use capsule_agent_protocol::client::AgentConn;
use support::*;
use ttrpc::Code;

fn code(e: &capsule_agent_protocol::client::ClientError) -> Option<Code> {
    e.code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_processes_and_stdio() {
    let _g = vm_lock();
    let vm = Vm::boot(VmOptions::default()).await;
    let conn = vm.connect().await;

    let d = conn
        .guest_details(&GuestDetailsRequest::new())
        .await
        .unwrap();
    assert_eq!(d.protocol, "capsule.agent.v1");
    let kv = guest_dir().join("kernel-version");
    let built = std::fs::read_to_string(&kv).unwrap_or_else(|e| panic!("{}: {e}", kv.display()));
    assert_eq!(
        d.kernel_version,
        built.trim(),
        "the guest runs the kernel built"
    );
    assert_eq!(d.agent_version, env!("CARGO_PKG_VERSION"));
    create_sandbox(&conn, "sandbox-host").await.unwrap();

    // echo: output read back, exit code 0.
    let t = Instant::now();
    vm.busybox_container(&conn, "echo", &["echo", "hello from capsule"], false)
        .await;
    let out = read_all(&conn, "echo", "", false).await;
    assert_eq!(String::from_utf8_lossy(&out), "hello from capsule\n");
    assert_eq!(wait(&conn, "echo", "").await, 0);
    eprintln!("echo container: {:?}", t.elapsed());
    remove(&conn, "echo").await.unwrap();
    assert_eq!(
        code(&conn.stats_container(&creq("echo")).await.unwrap_err()),
        Some(Code::NOT_FOUND)
    );

    // exit code 3, stderr separate.
    vm.busybox_container(
        &conn,
        "exit3",
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
        false,
    )
    .await;
    let (out, err) = tokio::join!(
        read_all(&conn, "exit3", "", false),
        read_all(&conn, "exit3", "", true)
    );
    assert_eq!(out, b"out\n");
    assert_eq!(err, b"err\n");
    assert_eq!(wait(&conn, "exit3", "").await, 3);
    remove(&conn, "exit3").await.unwrap();

    // A long-running container: namespaces, exec, signals, pause, stats.
    let pid = vm
        .busybox_container(&conn, "c1", &["sleep", "1000"], false)
        .await;
    assert!(pid > 1);
    let (st, out, _) = run(
        &conn,
        "c1",
        "e-id",
        &[
            "sh",
            "-c",
            "echo pid=$$; hostname; id -u; cat /proc/1/cmdline | tr '\\0' ' '",
        ],
    )
    .await;
    assert_eq!(st, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("pid=") && lines[0] != "pid=1", "{out}");
    assert_eq!(lines[1], "c1", "hostname from the spec: {out}");
    assert_eq!(lines[2], "0");
    assert_eq!(
        lines[3].trim(),
        "sleep 1000",
        "PID 1 of the container is its init: {out}"
    );
    let (st, out, _) = run(
        &conn,
        "c1",
        "e-dev",
        &[
            "sh",
            "-c",
            "ls /dev; test -c /dev/null && echo null-ok; cat /proc/kcore 2>&1 | wc -c",
        ],
    )
    .await;
    assert_eq!(st, 0);
    for want in ["null", "zero", "urandom", "tty", "pts", "shm", "null-ok"] {
        assert!(out.contains(want), "/dev lacks {want}: {out}");
    }
    let (st, _, _) = run(&conn, "c1", "e-exit", &["sh", "-c", "exit 7"]).await;
    assert_eq!(st, 7);
    // Duplicate exec id, unknown exec, exec of a missing binary.
    exec(&conn, "c1", "e-sleep", &["sleep", "1000"], false, false)
        .await
        .unwrap();
    let e = exec(&conn, "c1", "e-sleep", &["true"], false, false)
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(Code::ALREADY_EXISTS), "{e}");
    let e = conn.wait_process(&preq("c1", "nope")).await.unwrap_err();
    assert_eq!(code(&e), Some(Code::NOT_FOUND));
    assert!(e.to_string().contains("nope"), "{e}");
    let e = exec(&conn, "c1", "e-missing", &["/no/such/bin"], false, false)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("/no/such/bin"), "{e}");
    assert_eq!(code(&e), Some(Code::INVALID_ARGUMENT), "{e}");

    // ListProcesses sees init and the exec.
    let procs = conn.list_processes(&creq("c1")).await.unwrap();
    assert!(procs.processes.iter().any(|p| p.pid == pid), "{procs:?}");
    assert!(
        procs.processes.iter().any(|p| p.exec_id == "e-sleep"),
        "{procs:?}"
    );

    // User, groups, capabilities, rlimits, no_new_privs of an exec.
    let mut p = process(
        &[
            "sh",
            "-c",
            "id -u; id -g; id -G; ulimit -n; grep -E 'CapEff|CapBnd|NoNewPrivs' /proc/self/status",
        ],
        false,
    );
    p["user"] = serde_json::json!({"uid": 65534, "gid": 65534, "additionalGids": [1, 2]});
    // A non-root process keeps effective capabilities across execve only
    // through the ambient set (which needs them inheritable).
    p["capabilities"] = serde_json::json!({"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"],
        "inheritable": ["CAP_KILL"], "ambient": ["CAP_KILL"]});
    p["rlimits"] = serde_json::json!([{"type": "RLIMIT_NOFILE", "hard": 512, "soft": 256}]);
    let mut r = ExecProcessRequest::new();
    r.container_id = "c1".into();
    r.exec_id = "ids".into();
    r.process = serde_json::to_vec(&p).unwrap();
    conn.exec_process(&r).await.unwrap();
    let out = String::from_utf8_lossy(&read_all(&conn, "c1", "ids", false).await).into_owned();
    assert_eq!(wait(&conn, "c1", "ids").await, 0, "{out}");
    let want = ["65534", "65534", "65534 1 2", "256"];
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..4], &want, "{out}");
    assert!(out.contains("CapEff:\t0000000000000020"), "{out}");
    assert!(out.contains("CapBnd:\t0000000000000020"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");

    // Kill one exec: 128 + SIGTERM.
    signal(&conn, "c1", "e-sleep", 15, false).await.unwrap();
    assert_eq!(wait(&conn, "c1", "e-sleep").await, 143);
    let e = signal(&conn, "c1", "e-sleep", 15, false).await.unwrap_err();
    assert_eq!(code(&e), Some(Code::NOT_FOUND), "signal after exit: {e}");

    // Pause: the cgroup freezes; a process does not advance; resume.
    exec(
        &conn,
        "c1",
        "counter",
        &[
            "sh",
            "-c",
            "i=0; while true; do i=$((i+1)); echo $i > /tmp/n; sleep 0.1; done",
        ],
        false,
        false,
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    conn.pause_container(&creq("c1")).await.unwrap();
    let e = exec(&conn, "c1", "while-paused", &["true"], false, false)
        .await
        .unwrap_err();
    assert_eq!(
        code(&e),
        Some(Code::FAILED_PRECONDITION),
        "exec while paused: {e}"
    );
    let stats = conn.stats_container(&creq("c1")).await.unwrap();
    assert_eq!(stats.cgroup_version, "v2");
    let cg = stats.cgroup.unwrap();
    assert!(cg.memory_usage_bytes > 0, "{cg:?}");
    assert_eq!(cg.memory_limit_bytes, 268435456);
    assert!(cg.pids_current >= 2, "init + the counter shell: {cg:?}");
    assert_eq!(cg.pids_limit, 200);
    assert!(cg.cpu_usage_usec > 0);
    conn.resume_container(&creq("c1")).await.unwrap();
    let (_, n1, _) = run(&conn, "c1", "n1", &["cat", "/tmp/n"]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, n2, _) = run(&conn, "c1", "n2", &["cat", "/tmp/n"]).await;
    let (n1, n2): (u64, u64) = (n1.trim().parse().unwrap(), n2.trim().parse().unwrap());
    assert!(n2 > n1, "counter advances after resume: {n1} -> {n2}");
    let e = conn.resume_container(&creq("c1")).await.unwrap_err();
    assert_eq!(code(&e), Some(Code::FAILED_PRECONDITION));

    // Update resources, seen in the cgroup files.
    let mut up = UpdateContainerRequest::new();
    up.container_id = "c1".into();
    up.resources = br#"{"memory":{"limit":134217728},"cpu":{"quota":50000,"period":100000},"pids":{"limit":50}}"#.to_vec();
    conn.update_container(&up).await.unwrap();
    let cg = conn
        .stats_container(&creq("c1"))
        .await
        .unwrap()
        .cgroup
        .unwrap();
    assert_eq!(cg.memory_limit_bytes, 134217728);
    assert_eq!(cg.pids_limit, 50);
    up.resources = b"{not json".to_vec();
    assert_eq!(
        code(&conn.update_container(&up).await.unwrap_err()),
        Some(Code::INVALID_ARGUMENT)
    );

    // Terminal process (like `exec -t`): stdout carries the pty, stderr is empty.
    exec(
        &conn,
        "c1",
        "tty",
        &["sh", "-c", "tty; stty size; echo err-on-tty >&2"],
        true,
        false,
    )
    .await
    .unwrap();
    let out = String::from_utf8_lossy(&read_all(&conn, "c1", "tty", false).await).into_owned();
    assert!(out.contains("/dev/pts/"), "tty: {out}");
    assert!(
        out.contains("err-on-tty"),
        "stderr goes to the terminal: {out}"
    );
    assert!(read_all(&conn, "c1", "tty", true).await.is_empty());
    assert_eq!(wait(&conn, "c1", "tty").await, 0);

    // Interactive terminal with stdin and a resize.
    exec(&conn, "c1", "tty-in", &["sh"], true, true)
        .await
        .unwrap();
    let mut rs = TtyWinResizeRequest::new();
    rs.container_id = "c1".into();
    rs.exec_id = "tty-in".into();
    rs.rows = 33;
    rs.cols = 77;
    conn.tty_win_resize(&rs).await.unwrap();
    let mut w = WriteStreamRequest::new();
    w.container_id = "c1".into();
    w.exec_id = "tty-in".into();
    w.data = b"stty size; exit 5\n".to_vec();
    assert_eq!(conn.write_stdin(&w).await.unwrap().len, 18);
    let out = String::from_utf8_lossy(&read_all(&conn, "c1", "tty-in", false).await).into_owned();
    assert!(out.contains("33 77"), "resized terminal: {out}");
    assert_eq!(wait(&conn, "c1", "tty-in").await, 5);

    // Pipes with stdin: cat echoes until CloseStdin.
    exec(&conn, "c1", "cat", &["cat"], false, true)
        .await
        .unwrap();
    w.exec_id = "cat".into();
    w.data = b"line through stdin\n".to_vec();
    conn.write_stdin(&w).await.unwrap();
    conn.close_stdin(&preq("c1", "cat")).await.unwrap();
    assert_eq!(
        read_all(&conn, "c1", "cat", false).await,
        b"line through stdin\n"
    );
    assert_eq!(wait(&conn, "c1", "cat").await, 0);

    // Kill-all: every process of the container, the init included.
    exec(&conn, "c1", "bg", &["sleep", "1000"], false, false)
        .await
        .unwrap();
    let waiter = {
        let req = preq("c1", "");
        let c = conn.client().clone();
        tokio::spawn(async move {
            c.wait_process(ttrpc::context::Context::default(), &req)
                .await
        })
    };
    signal(&conn, "c1", "", 9, true).await.unwrap();
    assert_eq!(waiter.await.unwrap().unwrap().status, 137);
    assert_eq!(wait(&conn, "c1", "bg").await, 137);
    remove(&conn, "c1").await.unwrap();

    // A container whose init has a terminal: its own devpts, /dev/console.
    vm.busybox_container(
        &conn,
        "t1",
        &["sh", "-c", "tty; test -c /dev/console && echo console-ok"],
        true,
    )
    .await;
    let out = String::from_utf8_lossy(&read_all(&conn, "t1", "", false).await).into_owned();
    assert!(
        out.contains("/dev/pts/0") && out.contains("console-ok"),
        "{out}"
    );
    assert_eq!(wait(&conn, "t1", "").await, 0);
    // Left running: DestroySandbox removes it.
    vm.busybox_container(&conn, "left", &["sleep", "1000"], false)
        .await;

    conn.destroy_sandbox(&DestroySandboxRequest::new())
        .await
        .unwrap();
    eprintln!("--- console ---\n{}", vm.console());
    vm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_named_and_coded() {
    let _g = vm_lock();
    let vm = Vm::boot(VmOptions::default()).await;
    let conn = vm.connect().await;
    create_sandbox(&conn, "").await.unwrap();
    let rootfs = vm.busybox_rootfs("bad");
    let s = spec(&["true"], false, "bad");

    // Unknown container.
    let e = conn.start_container(&creq("ghost")).await.unwrap_err();
    assert_eq!(code(&e), Some(Code::NOT_FOUND));
    assert!(e.to_string().contains("ghost"), "{e}");
    // Bad id, bad JSON, escaping rootfs.
    let e = create_container(&conn, "../x", &rootfs, &s, vec![], false)
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(Code::INVALID_ARGUMENT));
    let mut req = CreateContainerRequest::new();
    req.container_id = "bad".into();
    req.oci_spec = b"{]".to_vec();
    req.rootfs = rootfs.clone();
    let e = conn.create_container(&req).await.unwrap_err();
    assert_eq!(code(&e), Some(Code::INVALID_ARGUMENT));
    assert!(e.to_string().contains("\"bad\""), "{e}");
    let e = create_container(&conn, "bad", "../../etc", &s, vec![], false)
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(Code::INVALID_ARGUMENT), "{e}");
    let e = create_container(&conn, "bad", "missing/rootfs", &s, vec![], false)
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(Code::INVALID_ARGUMENT), "{e}");

    // Duplicate container paths: rejected by the device module, naming both devices.
    let dev = |id: &str, path: &str| {
        let mut d = Device::new();
        d.id = id.into();
        d.kind = DeviceKind::DEVICE_KIND_GENERIC.into();
        d.container_path = path.into();
        d.dev_type = "c".into();
        d.host_major = 1;
        d.host_minor = 3;
        d
    };
    let e = create_container(
        &conn,
        "bad",
        &rootfs,
        &s,
        vec![dev("dev1", "/dev/mynull"), dev("dev2", "/dev/mynull")],
        false,
    )
    .await
    .unwrap_err();
    assert_eq!(code(&e), Some(Code::INVALID_ARGUMENT), "{e}");
    assert!(
        e.to_string().contains("dev1") && e.to_string().contains("dev2"),
        "{e}"
    );
    // A missing device times out with DEADLINE_EXCEEDED naming it.
    let mut blk = Device::new();
    blk.id = "dev9".into();
    blk.kind = DeviceKind::DEVICE_KIND_BLK_PCI.into();
    blk.guest_address = "1f".into();
    blk.container_path = "/dev/xvdz".into();
    blk.dev_type = "b".into();
    let t = Instant::now();
    let e = create_container(&conn, "bad", &rootfs, &s, vec![blk], false)
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(Code::DEADLINE_EXCEEDED), "{e}");
    assert!(e.to_string().contains("dev9"), "{e}");
    eprintln!("device timeout after {:?}", t.elapsed());

    // A generic device is created in the container's /dev.
    create_container(
        &conn,
        "ok",
        &rootfs,
        &spec(&["sh", "-c", "ls -l /dev/mynull"], false, "ok"),
        vec![dev("dev1", "/dev/mynull")],
        false,
    )
    .await
    .unwrap();
    conn.start_container(&creq("ok")).await.unwrap();
    let out = String::from_utf8_lossy(&read_all(&conn, "ok", "", false).await).into_owned();
    assert!(out.starts_with("crw"), "{out}");
    assert!(out.contains("1,") && out.contains("3"), "{out}");
    assert_eq!(wait(&conn, "ok", "").await, 0);
    let e = conn.start_container(&creq("ok")).await.unwrap_err();
    assert_eq!(code(&e), Some(Code::FAILED_PRECONDITION));
    let e = create_container(&conn, "ok", &rootfs, &s, vec![], false)
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(Code::ALREADY_EXISTS));
    remove(&conn, "ok").await.unwrap();

    // Start of a missing binary fails at StartContainer with the path.
    create_container(
        &conn,
        "nobin",
        &rootfs,
        &spec(&["no-such-command"], false, "x"),
        vec![],
        false,
    )
    .await
    .unwrap();
    let e = conn.start_container(&creq("nobin")).await.unwrap_err();
    assert!(e.to_string().contains("no-such-command"), "{e}");
    assert_eq!(code(&e), Some(Code::INVALID_ARGUMENT), "{e}");
    remove(&conn, "nobin").await.unwrap();
    eprintln!("--- console ---\n{}", vm.console());
    vm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_reconnects_mid_session() {
    let _g = vm_lock();
    let vm = Vm::boot(VmOptions::default()).await;
    let mut conn = vm.connect().await;
    create_sandbox(&conn, "").await.unwrap();
    vm.busybox_container(&conn, "r1", &["sleep", "1000"], false)
        .await;

    // A pending WaitProcess, and a request cut in the middle of a frame.
    exec(
        &conn,
        "r1",
        "w1",
        &["sh", "-c", "sleep 2; exit 4"],
        false,
        false,
    )
    .await
    .unwrap();
    let pending = {
        let c = conn.client().clone();
        let req = preq("r1", "w1");
        tokio::spawn(async move {
            c.wait_process(ttrpc::context::Context::default(), &req)
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The host side goes away with a request pending (a shim crash): the
    // last handle of the old client is dropped, then a new connection opens.
    pending.abort();
    assert!(pending.await.unwrap_err().is_cancelled());
    conn.reconnect().await.unwrap();
    // ...and the new session works, while the old wait's reply (at exit) is
    // never delivered to it.
    assert!(conn.health(&HealthRequest::new()).await.unwrap().serving);
    assert_eq!(wait(&conn, "r1", "w1").await, 4);

    // A raw client that sends HELLO and half a frame, then disappears.
    {
        use tokio::io::AsyncWriteExt;
        drop(conn);
        let mut s = tokio::net::UnixStream::connect(&vm.agent_socket)
            .await
            .unwrap();
        let mut hello = capsule_agent_protocol::client::HELLO_MAGIC.to_vec();
        hello.extend_from_slice(b"0123456789abcdef");
        s.write_all(&hello).await.unwrap();
        s.write_all(&[0, 0, 0, 50, 0, 0, 0, 1, 1, 0, 1, 2, 3])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let conn = AgentConn::connect(&vm.agent_socket, opts()).await.unwrap();
    assert!(conn.health(&HealthRequest::new()).await.unwrap().serving);
    let (st, out, _) = run(&conn, "r1", "after", &["echo", "still serving"]).await;
    assert_eq!((st, out.as_str()), (0, "still serving\n"));

    // Several quick reconnects in a row.
    let mut conn = conn;
    for i in 0..3 {
        conn.reconnect().await.unwrap();
        let (st, out, _) = run(&conn, "r1", &format!("again{i}"), &["echo", "ok"]).await;
        assert_eq!((st, out.as_str()), (0, "ok\n"));
    }

    // A real gap: the guest sees EOF (host gone), polls for POLLHUP to clear,
    // and serves the next client.
    drop(conn);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let conn = AgentConn::connect(&vm.agent_socket, opts()).await.unwrap();
    let (st, out, _) = run(&conn, "r1", "after-gap", &["echo", "back"]).await;
    assert_eq!((st, out.as_str()), (0, "back\n"));
    let console = vm.console();
    assert!(
        console.contains("host disconnected"),
        "the agent saw the disconnect:\n{console}"
    );
    remove(&conn, "r1").await.unwrap();
    eprintln!("--- console ---\n{console}");
    vm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rootfs_on_a_block_storage() {
    let _g = vm_lock();
    let tmp = tempfile::tempdir().unwrap();
    busybox_rootfs(&tmp.path().join("content/rootfs"));
    let image = tmp.path().join("disk.img");
    ext4_image(&tmp.path().join("content"), &image, 32);
    // The disk is cold-plugged by the device manager (virtio-blk): the
    // guest finds it at the address the manager returned.
    let vm = Vm::boot(VmOptions {
        coldplug: vec![capsule_devmgr::HostDevice {
            info: None,
            host_path: image.clone(),
            kind: capsule_devmgr::DeviceKind::Block,
        }],
        ..Default::default()
    })
    .await;
    let (disk_id, disk_addr) = vm.coldplugged[0].clone();
    let capsule_devmgr::GuestAddress::Pci(disk_path) = &disk_addr else {
        panic!("a virtio-blk disk at {disk_addr:?}")
    };
    let disk_path = disk_path.to_string();
    let conn = vm.connect().await;
    create_sandbox(&conn, "").await.unwrap();
    let mut st = Storage::new();
    st.driver = "blk-pci".into();
    st.source = disk_path.clone();
    st.fstype = "ext4".into();
    st.mount_point = "/run/capsule/storage/d1".into();
    let mut req = CreateContainerRequest::new();
    req.container_id = "blk".into();
    req.oci_spec = serde_json::to_vec(&spec(
        &[
            "sh",
            "-c",
            "grep -c ext4 /proc/mounts; echo blk-ok > /root/written; cat /root/written",
        ],
        false,
        "blk",
    ))
    .unwrap();
    req.rootfs = "/run/capsule/storage/d1/rootfs".into();
    req.storages.push(st);
    conn.create_container(&req)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.console()));
    conn.start_container(&creq("blk")).await.unwrap();
    let out = String::from_utf8_lossy(&read_all(&conn, "blk", "", false).await).into_owned();
    assert_eq!(wait(&conn, "blk", "").await, 0, "{out}");
    assert!(out.ends_with("blk-ok\n"), "{out}");
    remove(&conn, "blk").await.unwrap();
    // The storage is unmounted with its container: the same address mounts again.
    req.container_id = "blk2".into();
    req.oci_spec = serde_json::to_vec(&spec(&["cat", "/root/written"], false, "blk2")).unwrap();
    conn.create_container(&req).await.unwrap();
    conn.start_container(&creq("blk2")).await.unwrap();
    assert_eq!(read_all(&conn, "blk2", "", false).await, b"blk-ok\n");
    assert_eq!(wait(&conn, "blk2", "").await, 0);
    remove(&conn, "blk2").await.unwrap();

    // AddDevice on a running container: the disk by PCI path at /dev/xvdb.
    vm.busybox_container(&conn, "holder", &["sleep", "1000"], false)
        .await;
    let mut d = Device::new();
    d.id = disk_id.to_string();
    d.kind = DeviceKind::DEVICE_KIND_BLK_PCI.into();
    d.guest_address = disk_path.clone();
    d.container_path = "/dev/xvdb".into();
    d.dev_type = "b".into();
    d.host_major = 8;
    d.host_minor = 16;
    let mut add = AddDeviceRequest::new();
    add.container_id = "holder".into();
    add.device = protobuf::MessageField::some(d);
    let r = conn
        .add_device(&add)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.console()));
    assert_eq!(r.guest_major, 254, "virtio-blk major in the guest");
    let (st, out, _) = run(&conn, "holder", "ls", &["ls", "-l", "/dev/xvdb"]).await;
    assert_eq!(st, 0, "{out}");
    assert!(
        out.starts_with('b') && out.contains(&format!("{}, ", r.guest_major)),
        "{out}"
    );
    let e = conn.add_device(&add).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::ALREADY_EXISTS), "{e}");
    let mut rm = RemoveDeviceRequest::new();
    rm.container_id = "holder".into();
    rm.container_path = "/dev/xvdb".into();
    conn.remove_device(&rm).await.unwrap();
    let (st, _, _) = run(&conn, "holder", "ls2", &["test", "-e", "/dev/xvdb"]).await;
    assert_eq!(st, 1, "node removed");
    assert_eq!(
        conn.remove_device(&rm).await.unwrap_err().code(),
        Some(Code::NOT_FOUND)
    );
    remove(&conn, "holder").await.unwrap();
    vm.shutdown().await;
}
