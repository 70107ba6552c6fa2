//! End-to-end: containerd + containerd-shim-capsule-v2 + QEMU (TCG) + the
//! guest agent. Each test runs its own private containerd, of the version
//! `CAPSULE_CONTAINERD` names (1.6 by default, 1.7, 2.1: `make test` runs
//! this suite on each, see the Makefile); tests run one at a time (they boot
//! VMs). They fail (never skip) when a prerequisite is missing, naming it,
//! and when containerd logged an error about capsule.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use capsule_tests::{mknod_block, sigkill, text, wait_for, CapsuleOptions, Env};

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

const CLEAN: Duration = Duration::from_secs(60);

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn wait_status(env: &Env, id: &str, want: &str) -> Result<()> {
    wait_for(
        &format!("task {id} {want}"),
        Duration::from_secs(60),
        || (env.task_status(id).as_deref() == Some(want)).then_some(()),
    )
}

fn contains(file: &Path, marker: &str) -> Result<bool> {
    let data = std::fs::read(file)?;
    Ok(data.windows(marker.len()).any(|w| w == marker.as_bytes()))
}

#[test]
fn run_rm_prints_output_and_returns_the_exit_code() -> Result<()> {
    let _s = serial();
    let env = Env::start()?;
    let o = env.run(
        &["--rm"],
        "c1",
        &["sh", "-c", "echo hello from capsule; exit 3"],
    )?;
    ensure!(
        o.status.code() == Some(3),
        "{}\n{}",
        text(&o),
        env.containerd_log_tail()
    );
    ensure!(stdout(&o).contains("hello from capsule"), "{}", text(&o));
    env.assert_clean(CLEAN)
}

#[test]
fn detached_run_exec_kill_delete() -> Result<()> {
    let _s = serial();
    let env = Env::start()?;
    let o = env.run(&["-d"], "c2", &["sleep", "1000"])?;
    ensure!(o.status.success(), "{}", text(&o));
    wait_status(&env, "c2", "RUNNING")?;
    let o = env.exec("c2", "e1", &["sh", "-c", "echo from exec; exit 5"])?;
    ensure!(o.status.code() == Some(5), "{}", text(&o));
    ensure!(stdout(&o).contains("from exec"), "{}", text(&o));
    env.ctr_ok(&["task", "kill", "-s", "SIGKILL", "c2"])?;
    wait_status(&env, "c2", "STOPPED")?;
    env.ctr_ok(&["task", "delete", "c2"])?;
    env.ctr_ok(&["container", "delete", "c2"])?;
    env.assert_clean(CLEAN)
}

#[test]
fn terminal_run() -> Result<()> {
    let _s = serial();
    let env = Env::start()?;
    let o = env.run_in_pty(&["--rm", "-t"], "c3", &["sh", "-c", "tty; echo tty-ok"])?;
    ensure!(o.status.success(), "{}", text(&o));
    let out = stdout(&o);
    ensure!(
        out.contains("tty-ok") && out.contains("/dev/pts/"),
        "{}",
        text(&o)
    );
    env.assert_clean(CLEAN)
}

#[test]
fn metrics_and_pause_resume() -> Result<()> {
    let _s = serial();
    let env = Env::start()?;
    let o = env.run(&["-d"], "c4", &["sleep", "1000"])?;
    ensure!(o.status.success(), "{}", text(&o));
    wait_status(&env, "c4", "RUNNING")?;
    let m = env.ctr_ok(&["task", "metrics", "c4"])?;
    ensure!(m.contains("pids") && m.contains("memory"), "metrics:\n{m}");
    // Update (ctr 1.6 has no `task update`: straight to the shim) reaches
    // the guest cgroup.
    let addr = env
        .sandbox_record("c4")
        .and_then(|v| v["shim_address"].as_str().map(String::from));
    let addr = addr.context("no shim address in sandbox.json")?;
    use capsule_shim::protos::protobuf::Message;
    let req = capsule_shim::protos::api::UpdateTaskRequest {
        id: "c4".into(),
        resources: Some(capsule_shim::protos::protobuf::well_known_types::any::Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into(),
            value: br#"{"memory":{"limit":123731968}}"#.to_vec(),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    let r = capsule_tests::shim_call(
        &addr,
        "containerd.task.v2.Task",
        "Update",
        req.write_to_bytes()?,
    )?;
    ensure!(r.is_ok(), "Update: {r:?}");
    let m = env.ctr_ok(&["task", "metrics", "c4"])?;
    ensure!(
        m.contains("123731968"),
        "the new memory limit is not in the metrics:\n{m}"
    );

    env.ctr_ok(&["task", "pause", "c4"])?;
    wait_status(&env, "c4", "PAUSED")?;
    env.ctr_ok(&["task", "resume", "c4"])?;
    wait_status(&env, "c4", "RUNNING")?;
    env.remove("c4");
    env.assert_clean(CLEAN)
}

fn device_roundtrip(driver: &str) -> Result<()> {
    let mut env = Env::start_with(CapsuleOptions {
        block_device_driver: driver.into(),
        ..Default::default()
    })?;
    let (dev, file) = env.loop_device("disk", 16 << 20)?;
    let marker = format!("capsule-data-{driver}");
    let script = format!(
        "echo {marker} | dd of={dev} bs=512 count=1 conv=sync,fsync 2>/dev/null && echo written"
    );
    let o = env.run(&["--rm", "--device", &dev], "d1", &["sh", "-c", &script])?;
    ensure!(
        o.status.success(),
        "{}\n{}",
        text(&o),
        env.containerd_log_tail()
    );
    ensure!(stdout(&o).contains("written"), "{}", text(&o));
    ensure!(
        contains(&file, &marker)?,
        "the data did not reach {}",
        file.display()
    );
    env.assert_clean(CLEAN)
}

#[test]
fn loop_device_through_virtio_blk() -> Result<()> {
    let _s = serial();
    device_roundtrip("virtio-blk")
}

#[test]
fn loop_device_through_virtio_scsi() -> Result<()> {
    let _s = serial();
    device_roundtrip("virtio-scsi")
}

struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn vhost_user_blk_from_the_store() -> Result<()> {
    let _s = serial();
    let env = Env::start()?;
    let (store, cfg) = env.vhost_store(&CapsuleOptions::default())?;
    let img = env.dir.path().join("vub.img");
    std::fs::File::create(&img)?.set_len(16 << 20)?;
    let sock = store.join("block/sockets/vub0");
    let _qsd = Daemon(
        Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f1,filename={}",
                img.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e1,node-name=f1,addr.type=unix,addr.path={},writable=on",
                sock.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting qemu-storage-daemon")?,
    );
    wait_for("the vhost-user socket", Duration::from_secs(10), || {
        sock.exists().then_some(())
    })?;
    let node = store.join("block/devices/vub0");
    mknod_block(&node, 241, 0)?;
    let node_s = node.display().to_string();
    let script = format!(
        "echo capsule-vhost-data | dd of={node_s} bs=512 count=1 conv=sync,fsync 2>/dev/null && echo written"
    );
    // The store is enabled through --runtime-config-path: the runtime
    // options' config path wins over $CAPSULE_CONFIG.
    let o = env.run(
        &[
            "--rm",
            "--runtime-config-path",
            &cfg.display().to_string(),
            "--device",
            &node_s,
        ],
        "v1",
        &["sh", "-c", &script],
    )?;
    ensure!(
        o.status.success(),
        "{}\n{}",
        text(&o),
        env.containerd_log_tail()
    );
    ensure!(
        contains(&img, "capsule-vhost-data")?,
        "the data did not reach {}",
        img.display()
    );
    env.assert_clean(CLEAN)
}

fn json_devices(env: &Env, sandbox: &str) -> Vec<serde_json::Value> {
    env.devices_record(sandbox)
        .and_then(|d| d["devices"].as_array().cloned())
        .unwrap_or_default()
}

fn qemu_count(env: &Env) -> usize {
    let needle = env.dir.path().display().to_string();
    capsule_tests::processes()
        .into_iter()
        .filter(|(_, a)| {
            a.first().is_some_and(|a0| a0.contains("qemu-system"))
                && a.iter().any(|x| x.contains(&needle))
        })
        .count()
}

#[test]
fn pod_containers_share_one_vm_and_one_device() -> Result<()> {
    let _s = serial();
    let mut env = Env::start()?;
    let (dev, file) = env.loop_device("shared", 16 << 20)?;
    let sandbox_ann = [
        "--annotation",
        "io.kubernetes.cri.container-type=sandbox",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=pod1",
    ];
    let app_ann = [
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=pod1",
    ];
    let mut opts = vec!["-d", "--device", &dev];
    opts.extend_from_slice(&sandbox_ann);
    let o = env.run(&opts, "pod1", &["sleep", "1000"])?;
    ensure!(
        o.status.success(),
        "{}\n{}",
        text(&o),
        env.containerd_log_tail()
    );
    let mut opts = vec!["-d", "--device", &dev];
    opts.extend_from_slice(&app_ann);
    let o = env.run(&opts, "app1", &["sleep", "1000"])?;
    ensure!(
        o.status.success(),
        "{}\n{}",
        text(&o),
        env.containerd_log_tail()
    );
    wait_status(&env, "app1", "RUNNING")?;

    ensure!(
        env.sandboxes() == ["pod1"],
        "sandboxes: {:?}",
        env.sandboxes()
    );
    ensure!(qemu_count(&env) == 1, "{} QEMU processes", qemu_count(&env));
    let devs = json_devices(&env, "pod1");
    let blk: Vec<&serde_json::Value> = devs
        .iter()
        .filter(|d| d["kind"]["kind"] == "block")
        .collect();
    ensure!(blk.len() == 1, "devices.json: {devs:#?}");
    ensure!(
        blk[0]["uses"].as_array().map(Vec::len) == Some(2),
        "{:#?}",
        blk[0]
    );
    ensure!(blk[0]["attach_count"] == 2, "{:#?}", blk[0]);
    let dev_id = blk[0]["id"].as_str().unwrap_or_default().to_string();

    // Data from the second container reaches the loop file.
    let script =
        format!("echo capsule-pod-data | dd of={dev} bs=512 count=1 conv=sync,fsync 2>/dev/null");
    let o = env.exec("app1", "w1", &["sh", "-c", &script])?;
    ensure!(o.status.success(), "{}", text(&o));
    ensure!(contains(&file, "capsule-pod-data")?);

    let vm_has = |env: &Env| -> Result<bool> {
        let o = env.capsule(&["inspect", "pod1", "--json"])?;
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)
            .with_context(|| format!("capsule inspect: {}", text(&o)))?;
        ensure!(
            v["drift"].as_array().is_some_and(|d| d.is_empty()),
            "drift: {:#}",
            v["drift"]
        );
        let ids = v["vm_devices"]["devices"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        Ok(ids.iter().any(|d| d["qdev_id"] == format!("cap-{dev_id}")))
    };
    ensure!(vm_has(&env)?, "the VM does not have cap-{dev_id}");

    // The first user goes: the device stays (one use, attached).
    env.remove("app1");
    let devs = json_devices(&env, "pod1");
    let d = devs
        .iter()
        .find(|d| d["id"] == dev_id.as_str())
        .context("device record gone")?;
    ensure!(
        d["uses"].as_array().map(Vec::len) == Some(1) && d["attach_count"] == 1,
        "{d:#?}"
    );
    ensure!(d["status"] == "attached", "{d:#?}");
    ensure!(
        vm_has(&env)?,
        "the device was unplugged while pod1 still uses it"
    );

    env.remove("pod1");
    env.assert_clean(CLEAN)
}

#[test]
fn sigkill_of_the_shim_during_a_run_is_cleaned_up() -> Result<()> {
    let _s = serial();
    let env = Env::start()?;
    let o = env.run(&["-d"], "k1", &["sleep", "1000"])?;
    ensure!(o.status.success(), "{}", text(&o));
    wait_status(&env, "k1", "RUNNING")?;
    let pid = env.shim_pid("k1").context("no shim pid in sandbox.json")?;
    sigkill(pid);
    // containerd notices the dead shim and runs `delete`.
    env.assert_clean(CLEAN)?;
    env.remove("k1");
    env.assert_clean(CLEAN)
}

#[test]
fn sigkill_of_the_shim_during_a_hotplug_is_cleaned_up() -> Result<()> {
    let _s = serial();
    let mut env = Env::start()?;
    let (dev, _file) = env.loop_device("hp", 16 << 20)?;
    let mut cmd = Command::new(env.ctr_path());
    cmd.arg("--address")
        .arg(&env.sock)
        .args([
            "--namespace",
            capsule_tests::NAMESPACE,
            "run",
            "--runtime",
            capsule_tests::RUNTIME,
        ])
        .args([
            "-d",
            "--device",
            &dev,
            capsule_tests::IMAGE,
            "h1",
            "sleep",
            "1000",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut ctr = cmd.spawn()?;
    // Kill the shim as soon as the device shows up in the device state,
    // while the container is still being created.
    // Polled every 5 ms: the window (device recorded, container not yet
    // created in the guest) lasts a few hundred milliseconds.
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    let killed = loop {
        let devs = json_devices(&env, "h1");
        let creating = std::fs::read_to_string(env.sandbox_dir("h1").join("sandbox.json"))
            .is_ok_and(|s| s.contains("\"creating\""));
        let ours = devs.iter().find(|d| d["host_path"] == dev.as_str());
        if let (true, Some(d)) = (creating, ours) {
            if let Some(pid) = env.shim_pid("h1") {
                eprintln!("killing the shim with the device {}", d["status"]);
                sigkill(pid);
                break Ok(pid);
            }
        }
        if ctr.try_wait()?.is_some() {
            break Err(anyhow::anyhow!(
                "ctr run finished before the shim could be killed mid-hotplug"
            ));
        }
        if std::time::Instant::now() >= deadline {
            break Err(anyhow::anyhow!(
                "the device never showed up in devices.json"
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = ctr.wait();
    killed?;
    env.assert_clean(CLEAN)?;
    env.remove("h1");
    env.assert_clean(CLEAN)
}

/// A spec from `ctr oci spec` with `devices` and rules allowing them.
fn spec_with_devices(env: &Env, devices: serde_json::Value) -> Result<PathBuf> {
    let o = Command::new(env.ctr_path())
        .args(["oci", "spec"])
        .output()?;
    let mut spec: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    spec["process"]["args"] = serde_json::json!(["true"]);
    spec["root"] = serde_json::json!({"path": env.ready.rootfs_dir, "readonly": true});
    spec["linux"]["devices"] = devices;
    spec["linux"]["resources"]["devices"] = serde_json::json!([
        {"allow": false, "access": "rwm"},
        {"allow": true, "access": "rwm"}
    ]);
    let p = env
        .dir
        .path()
        .join(format!("spec-{}.json", std::process::id()));
    std::fs::write(&p, serde_json::to_vec_pretty(&spec)?)?;
    Ok(p)
}

#[test]
fn bad_devices_fail_readably_and_leave_nothing() -> Result<()> {
    let _s = serial();
    let env = Env::start()?;
    let (store, cfg) = env.vhost_store(&CapsuleOptions::default())?;
    // A vhost-user node whose backend socket is missing.
    let orphan = store.join("block/devices/vub9");
    mknod_block(&orphan, 241, 9)?;
    // A node whose major no driver serves (a loop node would be created on
    // open): it resolves, the VM boots, and the hotplug fails in QEMU, so
    // that Create's whole rollback (devices, mounts, VM) runs.
    let dead = env.dir.path().join("dead-node");
    mknod_block(&dead, 200, 1)?;
    let cases = [
        (
            // Major 200 has no driver (a loop number would be created on
            // first open).
            serde_json::json!([{"path": "/dev/capsule-nonexistent", "type": "b", "major": 200, "minor": 250}]),
            "/dev/capsule-nonexistent (b 200:250)",
        ),
        (
            serde_json::json!([{"path": "/dev/qat_adf_ctl", "type": "c", "major": 241, "minor": 0}]),
            "/dev/qat_adf_ctl (c 241:0)",
        ),
        (
            serde_json::json!([{"path": orphan.display().to_string(), "type": "b", "major": 241, "minor": 9}]),
            "(b 241:9)",
        ),
        (
            serde_json::json!([{"path": dead.display().to_string(), "type": "b", "major": 200, "minor": 1}]),
            "dead-node (b 200:1)",
        ),
    ];
    for (i, (devices, expect)) in cases.into_iter().enumerate() {
        let spec = spec_with_devices(&env, devices)?;
        let id = format!("bad{i}");
        let o = env.ctr(&[
            "run",
            "--runtime",
            capsule_tests::RUNTIME,
            "--rm",
            "--runtime-config-path",
            &cfg.display().to_string(),
            "--config",
            &spec.display().to_string(),
            &id,
        ])?;
        ensure!(!o.status.success(), "case {i} succeeded: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        eprintln!("case {i}: {}", err.trim());
        ensure!(
            err.contains("capsule") && err.contains(expect),
            "case {i}: the error does not name {expect:?}: {}",
            text(&o)
        );
        env.assert_clean(CLEAN)?;
        let _ = env.ctr(&["container", "delete", &id]);
    }
    Ok(())
}

#[test]
fn capsule_check_list_and_cleanup() -> Result<()> {
    let _s = serial();
    let mut env = Env::start()?;
    let o = env.capsule(&["check"])?;
    ensure!(o.status.success(), "{}", text(&o));
    let o = env.run(&["-d"], "l1", &["sleep", "1000"])?;
    ensure!(o.status.success(), "{}", text(&o));
    wait_status(&env, "l1", "RUNNING")?;
    let o = env.capsule(&["list"])?;
    ensure!(
        stdout(&o).contains("l1") && stdout(&o).contains("alive"),
        "{}",
        text(&o)
    );
    // Refused while the shim runs.
    let o = env.capsule(&["cleanup", "l1"])?;
    ensure!(!o.status.success(), "{}", text(&o));
    let pid = env.shim_pid("l1").context("no shim pid")?;
    // containerd goes first, so that only `capsule cleanup` can clean up
    // after the shim.
    env.kill_containerd();
    sigkill(pid);
    // With the shim gone, inspect reconnects to QEMU itself (from sandbox.json).
    wait_for("the shim to exit", Duration::from_secs(10), || {
        (!capsule_tests::processes().iter().any(|(p, _)| *p == pid)).then_some(())
    })?;
    let o = env.capsule(&["inspect", "l1", "--json"])?;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).with_context(|| text(&o))?;
    ensure!(v["vm_error"].is_null(), "{}", text(&o));
    ensure!(
        v["vm_devices"]["devices"]
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d["qdev_id"] == "cap-dev0")),
        "{}",
        text(&o)
    );
    ensure!(
        v["drift"].as_array().is_some_and(|d| d.is_empty()),
        "{}",
        text(&o)
    );
    let o = env.capsule(&["cleanup", "l1"])?;
    if !o.status.success() {
        bail!("{}", text(&o));
    }
    env.assert_clean(CLEAN)
}

/// After a host reboot the state is there but its processes are not, and
/// their pids may belong to others now: `delete` (run as containerd runs
/// it) removes the state, touches no reused pid, and is idempotent.
#[test]
fn delete_after_a_reboot_leaves_reused_pids_alone() -> Result<()> {
    use capsule_shim::state::{
        self as st, BundleRecord, ManagerRecord, ProcRef, SandboxPaths, SandboxRecord,
    };
    let _s = serial();
    let ready = capsule_tests::require_ready();
    let dir = tempfile::Builder::new()
        .prefix("cap-rb-")
        .tempdir_in("/tmp")?;
    let state_dir = dir.path().join("run");
    let paths = SandboxPaths::new(&state_dir, "rb1");
    std::fs::create_dir_all(paths.shared_dir())?;
    // An unrelated process now holds the pid QEMU had before the reboot.
    let mut other = Command::new("sleep").arg("300").spawn()?;
    let pid = other.id();
    let start =
        capsule_shim::cleanup::ProcessTable::start_time(&capsule_shim::cleanup::RealProcesses, pid)
            .context("start time of the stand-in process")?;
    let stale = ProcRef {
        pid,
        start_time: start + 1,
    };
    let mut vm = SandboxRecord::new("rb1");
    vm.shim = Some(stale);
    vm.shared_mounted = true;
    vm.virtiofsd = Some(stale);
    vm.manager = Some(ManagerRecord {
        block_driver: capsule_devmgr::BlockDriver::VirtioScsi,
        pci_slots: (6, 32),
        pmem_slots: (0, 4),
    });
    st::save(&paths.sandbox_file(), &vm)?;
    let bundle = dir.path().join("bundle");
    std::fs::create_dir_all(bundle.join("rootfs"))?;
    st::save(
        &bundle.join(st::BUNDLE_FILE),
        &BundleRecord {
            version: st::STATE_VERSION,
            container_id: "rb1".into(),
            sandbox_id: "rb1".into(),
            state_dir: state_dir.clone(),
            config_path: None,
        },
    )?;
    for round in 0..2 {
        let o = Command::new(&ready.shim)
            .args([
                "-namespace",
                "ns",
                "-address",
                "/nowhere",
                "-id",
                "rb1",
                "-bundle",
            ])
            .arg(&bundle)
            .arg("delete")
            .output()?;
        ensure!(o.status.success(), "round {round}: {}", text(&o));
        use capsule_shim::protos::protobuf::Message;
        let r = capsule_shim::protos::api::DeleteResponse::parse_from_bytes(&o.stdout)
            .context("DeleteResponse")?;
        ensure!(r.exit_status == 137, "round {round}: {r:?}");
        ensure!(!paths.dir.exists(), "round {round}: state left");
        ensure!(
            other.try_wait()?.is_none(),
            "the unrelated process was killed"
        );
    }
    let _ = other.kill();
    let _ = other.wait();
    Ok(())
}

/// containerd restarts: it reconnects to the running shim (its `address`
/// file), the task keeps running and answers, and its exit still arrives.
#[test]
fn containerd_restart_keeps_the_sandbox() -> Result<()> {
    let _s = serial();
    let mut env = Env::start()?;
    let o = env.run(&["-d"], "r1", &["sleep", "1000"])?;
    ensure!(o.status.success(), "{}", text(&o));
    wait_status(&env, "r1", "RUNNING")?;
    env.restart_containerd()?;
    wait_status(&env, "r1", "RUNNING")?;
    let o = env.exec("r1", "e1", &["echo", "after restart"])?;
    ensure!(stdout(&o).contains("after restart"), "{}", text(&o));
    env.ctr_ok(&["task", "kill", "-s", "SIGKILL", "r1"])?;
    wait_status(&env, "r1", "STOPPED")?;
    env.ctr_ok(&["task", "delete", "r1"])?;
    env.ctr_ok(&["container", "delete", "r1"])?;
    env.assert_clean(CLEAN)
}

/// A host bind mount reaches the container through the share, and
/// `--log-uri file://` sends the output to a file.
#[test]
fn bind_mount_and_file_log_uri() -> Result<()> {
    let _s = serial();
    let env = Env::start()?;
    let host = env.dir.path().join("hostdir");
    std::fs::create_dir_all(&host)?;
    std::fs::write(host.join("greeting"), "hello through a bind mount\n")?;
    let log = env.dir.path().join("logs/b1.log");
    let mount = format!(
        "type=bind,src={},dst=/hostdir,options=rbind:ro",
        host.display()
    );
    let o = env.run(
        &[
            "--rm",
            "--mount",
            &mount,
            "--log-uri",
            &format!("file://{}", log.display()),
        ],
        "b1",
        &[
            "sh",
            "-c",
            "cat /hostdir/greeting; echo written > /hostdir/x 2>/dev/null || echo read-only",
        ],
    )?;
    ensure!(
        o.status.success(),
        "{}\n{}",
        text(&o),
        env.containerd_log_tail()
    );
    let got = std::fs::read_to_string(&log).with_context(|| format!("{}", log.display()))?;
    ensure!(
        got.contains("hello through a bind mount"),
        "log file: {got:?}"
    );
    ensure!(
        got.contains("read-only"),
        "the ro bind mount was writable: {got:?}"
    );
    ensure!(!host.join("x").exists());
    env.assert_clean(CLEAN)
}

/// The virtio-fs share caches failed lookups (capsule's virtiofsd,
/// `--negative-timeout=1`): 300 checks of a missing file in the rootfs make
/// (almost) no requests to virtiofsd, counted on the guest's virtio-fs
/// request queue interrupt; and a file the host creates after the guest
/// looked for it is still seen, within the timeout.
#[test]
fn missing_files_are_cached_lookups_and_host_changes_still_show() -> Result<()> {
    let _s = serial();
    let env = Env::start()?;
    let host = env.dir.path().join("negdir");
    std::fs::create_dir_all(&host)?;
    let mount = format!(
        "type=bind,src={},dst=/negdir,options=rbind:rw",
        host.display()
    );
    // Shell builtins only: an exec would open the busybox binary through
    // virtio-fs and count too.
    let script = r#"irqs() { n=0; while read -r name rest; do case "$rest" in *-requests*) for v in $rest; do case "$v" in *[!0-9]*) break;; esac; n=$((n+v)); done;; esac; done < /proc/interrupts; echo $n; }
a=$(irqs); i=0; while [ $i -lt 300 ]; do [ -e /no-such-file ] && exit 9; i=$((i+1)); done; b=$(irqs); echo "requests=$((b-a))"
[ -e /negdir/late ] && exit 8; echo > /negdir/looked
i=0; while [ ! -e /negdir/late ]; do sleep 0.1; i=$((i+1)); [ $i -gt 150 ] && exit 7; done; echo "seen-after=$i""#;
    // The file appears only after the guest has looked for it (and cached
    // that it is missing).
    let creator = {
        let host = host.clone();
        std::thread::spawn(move || -> Result<()> {
            wait_for("the container to look for /negdir/late", CLEAN, || {
                host.join("looked").exists().then_some(())
            })?;
            Ok(std::fs::write(host.join("late"), "late\n")?)
        })
    };
    let o = env.run(&["--rm", "--mount", &mount], "neg1", &["sh", "-c", script])?;
    creator
        .join()
        .map_err(|_| anyhow!("the thread creating /negdir/late panicked"))?
        .with_context(|| text(&o))?;
    ensure!(
        o.status.success(),
        "{}\n{}",
        text(&o),
        env.containerd_log_tail()
    );
    let out = stdout(&o);
    let requests: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("requests="))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no request count: {}", text(&o)))?;
    ensure!(
        requests < 30,
        "300 lookups of a missing file made {requests} virtio-fs requests: negative lookups are not cached ({})",
        text(&o)
    );
    ensure!(out.contains("seen-after="), "{}", text(&o));
    env.assert_clean(CLEAN)
}

/// `start` as containerd 1.6 runs it: whatever arrives on stdin (here
/// bytes containerd 2.3-style bootstrap could look like), stdout is the bare
/// socket address and stderr is empty; a CRI container of the same pod gets
/// the same, already running shim; Shutdown with no task ends the server.
#[test]
fn start_prints_only_the_address_and_groups_pods() -> Result<()> {
    use std::io::Write;
    let _s = serial();
    let ready = capsule_tests::require_ready();
    let dir = tempfile::Builder::new()
        .prefix("cap-st-")
        .tempdir_in("/tmp")?;
    let bundle = |id: &str, ann: serde_json::Value| -> Result<PathBuf> {
        let b = dir.path().join(id);
        std::fs::create_dir_all(&b)?;
        let spec = serde_json::json!({"ociVersion": "1.0.2", "annotations": ann});
        std::fs::write(b.join("config.json"), serde_json::to_vec(&spec)?)?;
        Ok(b)
    };
    let start = |b: &Path, id: &str, stdin: &[u8]| -> Result<std::process::Output> {
        let mut child = Command::new(&ready.shim)
            .current_dir(b)
            .env("TTRPC_ADDRESS", dir.path().join("no-containerd.ttrpc"))
            .args(["-namespace", "st", "-address"])
            .arg(dir.path().join("containerd.sock"))
            .args(["-id", id, "start"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child.stdin.take().context("stdin")?.write_all(stdin)?;
        Ok(child.wait_with_output()?)
    };
    let b1 = bundle(
        "sb",
        serde_json::json!({"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "sb"}),
    )?;
    let o = start(&b1, "sb", b"\x0a\x03abc\x12\x02st\xff\xfe garbage")?;
    ensure!(o.status.success(), "{}", text(&o));
    ensure!(o.stderr.is_empty(), "stderr: {}", text(&o));
    let addr = String::from_utf8(o.stdout.clone())?;
    ensure!(
        addr.starts_with("unix:///run/containerd/s/") && !addr.contains('\n'),
        "{addr:?}"
    );
    ensure!(std::fs::read_to_string(b1.join("address"))? == addr);
    let b2 = bundle(
        "app",
        serde_json::json!({"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "sb"}),
    )?;
    let o = start(&b2, "app", b"")?;
    ensure!(o.status.success() && o.stderr.is_empty(), "{}", text(&o));
    ensure!(
        String::from_utf8(o.stdout.clone())? == addr,
        "the pod got another shim: {}",
        text(&o)
    );
    let b3 = bundle("lone", serde_json::json!({}))?;
    let o = start(&b3, "lone", b"")?;
    let other = String::from_utf8(o.stdout.clone())?;
    ensure!(o.status.success() && other != addr, "{}", text(&o));

    // Shutdown (no tasks): both servers exit and remove their sockets.
    for a in [&addr, &other] {
        let path = PathBuf::from(a.trim_start_matches("unix://"));
        ensure!(path.exists());
        use capsule_shim::protos::protobuf::Message;
        let req = capsule_shim::protos::api::ShutdownRequest {
            id: "x".into(),
            ..Default::default()
        };
        // The reply may not come: the server exits right after it.
        let _ = capsule_tests::shim_call(
            a,
            "containerd.task.v2.Task",
            "Shutdown",
            req.write_to_bytes()?,
        );
        wait_for("the shim server to exit", Duration::from_secs(10), || {
            (!path.exists()).then_some(())
        })?;
    }
    Ok(())
}

/// `start` as each containerd generation runs it, and `-info`: containerd
/// 1.7 and 2.0–2.2 (`MAX_SHIM_VERSION=2`, runtime options on stdin) get JSON
/// with version 2; containerd 2.3 (bootstrap params on stdin, TTRPC address
/// and socket directory only there) gets a `BootstrapResult` and a socket in
/// that directory; `-info` prints the runtime info protobuf.
#[test]
fn start_answers_each_daemon_in_its_form() -> Result<()> {
    use capsule_shim::protos::bootstrap_api::{BootstrapParams, BootstrapResult, Extension};
    use capsule_shim::protos::protobuf::well_known_types::any::Any;
    use capsule_shim::protos::protobuf::Message;
    use capsule_shim::protos::types::introspection::RuntimeInfo;
    use std::io::Write;
    let _s = serial();
    let ready = capsule_tests::require_ready();
    let dir = tempfile::Builder::new()
        .prefix("cap-sd-")
        .tempdir_in("/tmp")?;
    let sock = dir.path().join("containerd.sock");
    let ttrpc = dir.path().join("no-containerd.ttrpc");
    let options = capsule_shim::service::options::encode("/etc/capsule/nowhere.toml");
    let shim = |b: &Path, args: &[&str], env: &[(&str, &Path)], stdin: &[u8]| -> Result<_> {
        let mut child = Command::new(&ready.shim)
            .current_dir(b)
            .env_remove("TTRPC_ADDRESS")
            .envs(env.iter().copied())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child.stdin.take().context("stdin")?.write_all(stdin)?;
        Ok(child.wait_with_output()?)
    };
    let shutdown = |address: &str| -> Result<()> {
        let path = PathBuf::from(address.trim_start_matches("unix://"));
        let req = capsule_shim::protos::api::ShutdownRequest {
            id: "x".into(),
            ..Default::default()
        };
        let _ = capsule_tests::shim_call(
            address,
            "containerd.task.v3.Task",
            "Shutdown",
            req.write_to_bytes()?,
        );
        wait_for("the shim server to exit", Duration::from_secs(10), || {
            (!path.exists()).then_some(())
        })
    };
    let sock_s = sock.display().to_string();

    // containerd 1.7 / 2.0–2.2.
    let b = dir.path().join("j1");
    std::fs::create_dir_all(&b)?;
    let o = shim(
        &b,
        &[
            "-namespace",
            "sd",
            "-address",
            &sock_s,
            "-id",
            "j1",
            "start",
        ],
        &[
            ("TTRPC_ADDRESS", &ttrpc),
            ("MAX_SHIM_VERSION", Path::new("2")),
        ],
        &options.write_to_bytes()?,
    )?;
    ensure!(o.status.success() && o.stderr.is_empty(), "{}", text(&o));
    let reply: serde_json::Value = serde_json::from_slice(&o.stdout).with_context(|| text(&o))?;
    ensure!(
        reply["version"] == 2 && reply["protocol"] == "ttrpc",
        "{reply}"
    );
    let address = reply["address"].as_str().context("no address")?.to_string();
    ensure!(address.starts_with("unix:///run/containerd/s/"), "{reply}");
    ensure!(std::fs::read_to_string(b.join("address"))? == address);
    shutdown(&address)?;

    // containerd 2.3: everything in the bootstrap params.
    let b = dir.path().join("p1");
    let socket_dir = dir.path().join("s");
    std::fs::create_dir_all(&b)?;
    let params = BootstrapParams {
        instance_id: "p1".into(),
        namespace: "sd".into(),
        containerd_version: "2.3.0".into(),
        containerd_ttrpc_address: ttrpc.display().to_string(),
        containerd_grpc_address: sock_s.clone(),
        containerd_binary: "/usr/bin/containerd".into(),
        socket_dir: Some(socket_dir.display().to_string()),
        extensions: vec![Extension {
            value: Some(options.clone()).into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let o = shim(
        &b,
        &[
            "-namespace",
            "sd",
            "-address",
            &sock_s,
            "-id",
            "p1",
            "start",
        ],
        &[("MAX_SHIM_VERSION", Path::new("2"))],
        &params.write_to_bytes()?,
    )?;
    ensure!(o.status.success() && o.stderr.is_empty(), "{}", text(&o));
    let reply = BootstrapResult::parse_from_bytes(&o.stdout).with_context(|| text(&o))?;
    ensure!(reply.version == 2 && reply.protocol == "ttrpc", "{reply:?}");
    ensure!(
        reply
            .address
            .starts_with(&format!("unix://{}/", socket_dir.display())),
        "the socket is not in the requested directory: {reply:?}"
    );
    shutdown(&reply.address)?;

    // -info, with and without options.
    for stdin in [options.write_to_bytes()?, Vec::new()] {
        let o = shim(dir.path(), &["-info"], &[], &stdin)?;
        ensure!(o.status.success() && o.stderr.is_empty(), "{}", text(&o));
        let info = RuntimeInfo::parse_from_bytes(&o.stdout).with_context(|| text(&o))?;
        ensure!(info.name == capsule_tests::RUNTIME, "{info:?}");
        ensure!(!info.version.version.is_empty(), "{info:?}");
        ensure!(
            info.features
                .type_url
                .ends_with("runtime-spec/1/features/Features"),
            "{info:?}"
        );
        // The options are echoed when given, as runc's shim does.
        let echoed: Option<&Any> = info.options.as_ref();
        ensure!(echoed.is_some() != stdin.is_empty(), "{info:?}");
    }
    Ok(())
}

/// containerd 2.x asks the shim for its runtime info (`<shim> -info`) through
/// its introspection service, which `ctr plugins inspect-runtime` calls.
#[test]
fn containerd_reads_the_runtime_info() -> Result<()> {
    let _s = serial();
    let version = capsule_tests::Containerd::selected()?.version;
    if !version.is_2x() {
        eprintln!(
            "not applicable: containerd {} has no runtime introspection (`ctr plugins \
             inspect-runtime` came with 2.0); start_answers_each_daemon_in_its_form runs `-info`",
            version.as_str()
        );
        return Ok(());
    }
    let env = Env::start()?;
    let cfg = env.config_path.display().to_string();
    let out = env.ctr_ok(&[
        "plugins",
        "inspect-runtime",
        "--runtime",
        capsule_tests::RUNTIME,
        "--runtime-config-path",
        &cfg,
    ])?;
    eprintln!("{out}");
    let v: serde_json::Value = serde_json::from_str(&out).context(out.clone())?;
    ensure!(v["Name"] == capsule_tests::RUNTIME, "{out}");
    ensure!(v["Features"]["ociVersionMin"] == "1.0.0", "{out}");
    ensure!(out.contains(&cfg), "the options are not echoed: {out}");
    env.assert_clean(CLEAN)
}
