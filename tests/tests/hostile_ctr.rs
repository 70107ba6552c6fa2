//! Hostile OCI specs through ctr (`ctr run --config`, and `--device` where
//! JSON cannot say it): each is refused with an error that names capsule
//! and the offending device, and nothing is left attached. Every case runs
//! twice: as a standalone container (then nothing at all may be left), and
//! as a container of a running pod whose sandbox container holds a loop
//! device (then the pod's devices, its VM's devices and its state must be
//! exactly as before).
//!
//! Non-UTF-8 paths: JSON cannot carry raw bytes, and ctr is Go: a host node
//! whose path holds a 0xff byte given with `--device`, or a `--config` file
//! with a raw 0xff byte in a path, reaches the bundle's config.json with
//! the byte replaced by U+FFFD (Go's encoding/json). The shim therefore
//! sees a valid UTF-8 path that names no host node, and must say so.
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use capsule_tests::{mknod, text, wait_for, CapsuleOptions, Env};
use nix::sys::stat::SFlag;
use serde_json::{json, Value};

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

const CLEAN: Duration = Duration::from_secs(60);
const POD: &str = "hpod";

/// How a case reaches ctr.
enum Input {
    /// `linux.devices` of a spec given with `--config`.
    Devices(Value),
    /// A `--config` file whose text is this (raw bytes allowed).
    RawSpec(Vec<u8>),
    /// `--device <host path>` with the test image.
    HostDevice(PathBuf),
}

struct Case {
    name: &'static str,
    input: Input,
    /// Substrings the error must contain (besides "capsule").
    expect: Vec<String>,
}

fn case(name: &'static str, devices: Value, expect: &[&str]) -> Case {
    Case {
        name,
        input: Input::Devices(devices),
        expect: expect.iter().map(|s| s.to_string()).collect(),
    }
}

/// /dev/vfio with a node of a bad group name and one of a group that does
/// not exist; removed again on drop (the directory only if we made it).
struct VfioNodes {
    made_dir: bool,
    nodes: Vec<PathBuf>,
}

impl VfioNodes {
    fn create(names: &[&str]) -> Result<(VfioNodes, u64)> {
        let major = vfio_major()?;
        let dir = Path::new("/dev/vfio");
        let made_dir = !dir.exists();
        std::fs::create_dir_all(dir)?;
        let mut v = VfioNodes {
            made_dir,
            nodes: Vec::new(),
        };
        for (i, n) in names.iter().enumerate() {
            let p = dir.join(n);
            let _ = std::fs::remove_file(&p);
            mknod(&p, SFlag::S_IFCHR, major, 200 + i as u64)?;
            v.nodes.push(p);
        }
        Ok((v, major))
    }
}

impl Drop for VfioNodes {
    fn drop(&mut self) {
        for n in &self.nodes {
            let _ = std::fs::remove_file(n);
        }
        if self.made_dir {
            let _ = std::fs::remove_dir("/dev/vfio");
        }
    }
}

/// The vfio char major from /proc/devices; without the module loaded, a
/// char major no driver registered (the node is never opened).
fn vfio_major() -> Result<u64> {
    let devs = std::fs::read_to_string("/proc/devices")?;
    let chars: Vec<(u64, String)> = devs
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.parse().ok()?, w.next()?.to_string()))
        })
        .collect();
    if let Some((m, _)) = chars.iter().find(|(_, n)| n == "vfio") {
        return Ok(*m);
    }
    (230..=254)
        .rev()
        .find(|m| *m != 241 && *m != 242 && !chars.iter().any(|(c, _)| c == m))
        .context("no free char major for the VFIO test node")
}

/// Everything the cases need on the host: a vhost-user store with bad
/// entries, nodes outside it, a non-UTF-8 node, VFIO nodes.
struct Fixture {
    cfg: PathBuf,
    cases: Vec<Case>,
    _vfio: VfioNodes,
    _sockets: Vec<std::os::unix::net::UnixListener>,
}

/// `disk`: the loop device the pod's sandbox container holds.
fn fixture(env: &Env, disk: &str) -> Result<Fixture> {
    let d = env.dir.path();
    let (store, cfg) = env.vhost_store(&CapsuleOptions::default())?;
    let outside = d.join("outside");
    std::fs::create_dir_all(&outside)?;
    let mut sockets = Vec::new();
    // A store entry that is a symlink to a node out of the store (with a
    // real socket of the same name).
    mknod(&outside.join("evil"), SFlag::S_IFBLK, 241, 5)?;
    std::os::unix::fs::symlink(outside.join("evil"), store.join("block/devices/evil"))?;
    sockets.push(std::os::unix::net::UnixListener::bind(
        store.join("block/sockets/evil"),
    )?);
    // A socket that is a symlink out of the store.
    mknod(&store.join("block/devices/evil2"), SFlag::S_IFBLK, 241, 6)?;
    sockets.push(std::os::unix::net::UnixListener::bind(
        outside.join("evil2.sock"),
    )?);
    std::os::unix::fs::symlink(
        outside.join("evil2.sock"),
        store.join("block/sockets/evil2"),
    )?;
    // A socket replaced by a regular file.
    mknod(&store.join("block/devices/vubf"), SFlag::S_IFBLK, 241, 7)?;
    std::fs::write(store.join("block/sockets/vubf"), b"not a socket")?;
    // A node whose path holds a 0xff byte (major 200: no driver, no sysfs
    // entry, so the container path itself must name it).
    let raw = d.join(OsStr::from_bytes(b"bad\xffname"));
    mknod(&raw, SFlag::S_IFBLK, 200, 7)?;
    let mangled = format!("{}/bad\u{fffd}name", d.display());
    let (vfio, vmaj) = VfioNodes::create(&["capsule-bad", "4242"])?;
    // A node that resolves but that QEMU cannot open (major 200 has no
    // driver), after a good disk: attached, then rolled back.
    let dead = d.join("dead-node");
    mknod(&dead, SFlag::S_IFBLK, 200, 1)?;
    let rdev = nix::sys::stat::stat(disk)
        .with_context(|| format!("stat {disk}"))?
        .st_rdev;
    let (dmaj, dmin) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));

    let devnull = |p: &str| json!({"path": p, "type": "c", "major": 1, "minor": 3});
    let mut thousand: Vec<Value> = (0..999)
        .map(|i| devnull(&format!("/dev/capsule-null-{i}")))
        .collect();
    thousand.push(json!({"path": "/dev/capsule-last", "type": "b", "major": 200, "minor": 250}));
    let num = |major: i64, minor: i64| json!([{"path": "/dev/capsule-num", "type": "b", "major": major, "minor": minor}]);
    let store_dev = |name: &str, minor: u64| json!([{"path": store.join("block/devices").join(name), "type": "b", "major": 241, "minor": minor}]);
    let raw_spec = serde_json::to_vec_pretty(&spec_value(
        env,
        json!([{"path": "/dev/capsule-XRAW", "type": "b", "major": 200, "minor": 8}]),
    )?)?;
    // A raw 0xff byte in the path, in the file itself.
    let raw_spec = replace_bytes(&raw_spec, b"capsule-XRAW", b"capsule-\xffRAW");
    let cases = vec![
        case(
            "1,000 devices, the last one missing",
            Value::Array(thousand),
            &["/dev/capsule-last (b 200:250)"],
        ),
        case(
            "duplicate container paths",
            json!([devnull("/dev/capsule-dup"), {"path": "/dev/capsule-dup", "type": "c", "major": 1, "minor": 5}]),
            &["duplicate container path /dev/capsule-dup"],
        ),
        case(
            "`..` in a container path",
            json!([devnull("/dev/../etc/capsule-dotdot")]),
            &["/dev/../etc/capsule-dotdot"],
        ),
        case(
            "relative container path",
            json!([devnull("dev/capsule-relative")]),
            &["dev/capsule-relative"],
        ),
        Case {
            name: "non-UTF-8 host node path through --device",
            input: Input::HostDevice(raw),
            expect: vec![format!("{mangled} (b 200:7)")],
        },
        Case {
            name: "non-UTF-8 byte in a --config file",
            input: Input::RawSpec(raw_spec),
            expect: vec!["/dev/capsule-\u{fffd}RAW (b 200:8)".into()],
        },
        case("negative major", num(-1, 0), &["/dev/capsule-num", "-1"]),
        case("negative minor", num(8, -1), &["/dev/capsule-num", "-1"]),
        case(
            "major beyond 12 bits",
            num(4096, 0),
            &["/dev/capsule-num", "4096"],
        ),
        case(
            "minor beyond 20 bits",
            num(8, 1 << 20),
            &["/dev/capsule-num", "1048576"],
        ),
        case(
            "major i64::MAX",
            num(i64::MAX, 0),
            &["/dev/capsule-num", &i64::MAX.to_string()],
        ),
        case(
            "store entry symlinked out of the store",
            store_dev("evil", 5),
            &["(b 241:5)"],
        ),
        case(
            "store socket symlinked out of the store",
            store_dev("evil2", 6),
            &["(b 241:6)", "symlink"],
        ),
        case(
            "store socket replaced by a regular file",
            store_dev("vubf", 7),
            &["(b 241:7)", "regular file"],
        ),
        case(
            "a good disk, then a node QEMU cannot open",
            json!([
                {"path": disk, "type": "b", "major": dmaj, "minor": dmin},
                {"path": dead, "type": "b", "major": 200, "minor": 1}
            ]),
            &["dead-node (b 200:1)"],
        ),
        case(
            "char 241 (not vhost-user)",
            json!([{"path": "/dev/qat_adf_ctl", "type": "c", "major": 241, "minor": 0}]),
            &["/dev/qat_adf_ctl (c 241:0)"],
        ),
        case(
            "VFIO group with a bad name",
            json!([{"path": "/dev/vfio/capsule-bad", "type": "c", "major": vmaj, "minor": 200}]),
            &[
                "/dev/vfio/capsule-bad",
                "vfio/capsule-bad is neither a group",
            ],
        ),
        case(
            "VFIO group that does not exist",
            json!([{"path": "/dev/vfio/4242", "type": "c", "major": vmaj, "minor": 201}]),
            &["/dev/vfio/4242", "group 4242"],
        ),
    ];
    Ok(Fixture {
        cfg,
        cases,
        _vfio: vfio,
        _sockets: sockets,
    })
}

fn replace_bytes(hay: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
}

/// A spec from `ctr oci spec` running `true` on the image's rootfs with
/// `devices` and rules allowing them.
fn spec_value(env: &Env, devices: Value) -> Result<Value> {
    let o = Command::new("ctr").args(["oci", "spec"]).output()?;
    let mut spec: Value = serde_json::from_slice(&o.stdout)?;
    spec["process"]["args"] = json!(["true"]);
    spec["root"] = json!({"path": env.ready.rootfs_dir, "readonly": true});
    spec["linux"]["devices"] = devices;
    spec["linux"]["resources"]["devices"] = json!([
        {"allow": false, "access": "rwm"},
        {"allow": true, "access": "rwm"}
    ]);
    Ok(spec)
}

fn pod_annotations(spec: &mut Value) {
    spec["annotations"] = json!({
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.sandbox-id": POD,
    });
}

/// Runs `c` (as a container of the pod when `in_pod`); returns ctr's output.
fn run_case(
    env: &Env,
    fx: &Fixture,
    c: &Case,
    id: &str,
    in_pod: bool,
) -> Result<std::process::Output> {
    let spec_path = env.dir.path().join(format!("{id}.json"));
    let cfg = fx.cfg.display().to_string();
    let args: Vec<String> = vec![
        "run".into(),
        "--runtime".into(),
        capsule_tests::RUNTIME.into(),
        "--rm".into(),
        "--runtime-config-path".into(),
        cfg,
    ];
    match &c.input {
        Input::Devices(devices) => {
            let mut spec = spec_value(env, devices.clone())?;
            if in_pod {
                pod_annotations(&mut spec);
            }
            std::fs::write(&spec_path, serde_json::to_vec_pretty(&spec)?)?;
        }
        Input::RawSpec(bytes) => {
            let mut bytes = bytes.clone();
            if in_pod {
                // The annotations go in front of the first key.
                let ann = format!(
                    "{{\"annotations\": {{\"io.kubernetes.cri.container-type\": \"container\", \"io.kubernetes.cri.sandbox-id\": \"{POD}\"}},"
                );
                let at = bytes.iter().position(|b| *b == b'{').context("no '{'")?;
                bytes.splice(at..=at, ann.into_bytes());
            }
            std::fs::write(&spec_path, bytes)?;
        }
        Input::HostDevice(_) => {}
    }
    let mut a: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
    match &c.input {
        Input::HostDevice(p) => {
            a.push("--device".into());
            a.push(p.clone().into_os_string());
            if in_pod {
                for kv in [
                    "io.kubernetes.cri.container-type=container".to_string(),
                    format!("io.kubernetes.cri.sandbox-id={POD}"),
                ] {
                    a.push("--annotation".into());
                    a.push(kv.into());
                }
            }
            a.push(capsule_tests::IMAGE.into());
            a.push(id.into());
            a.push("true".into());
        }
        _ => {
            a.push("--config".into());
            a.push(spec_path.into_os_string());
            a.push(id.into());
        }
    }
    let mut cmd = Command::new("ctr");
    cmd.arg("--address")
        .arg(&env.sock)
        .args(["--namespace", capsule_tests::NAMESPACE])
        .args(&a);
    capsule_tests::run_with_timeout(cmd, Duration::from_secs(300))
}

fn check_refused(c: &Case, o: &std::process::Output, env: &Env) -> Result<()> {
    ensure!(!o.status.success(), "{}: succeeded: {}", c.name, text(o));
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(
        err.contains("capsule") && c.expect.iter().all(|e| err.contains(e.as_str())),
        "{}: the error does not name {:?}: {}\n{}",
        c.name,
        c.expect,
        text(o),
        env.containerd_log_tail()
    );
    Ok(())
}

/// What must not change in the pod: its device state (all but `next_id`:
/// device ids are never reused, so a refused device still used one), the
/// VM's devices, and no drift between them.
fn pod_view(env: &Env) -> Result<(Value, Vec<String>)> {
    let mut devices = env.devices_record(POD).context("no devices.json")?;
    if let Some(o) = devices.as_object_mut() {
        o.remove("next_id");
    }
    let o = env.capsule(&["inspect", POD, "--json"])?;
    let v: Value = serde_json::from_slice(&o.stdout)
        .with_context(|| format!("capsule inspect: {}", text(&o)))?;
    ensure!(
        v["drift"].as_array().is_some_and(|d| d.is_empty()),
        "drift: {:#}",
        v["drift"]
    );
    let mut ids: Vec<String> = v["vm_devices"]["devices"]
        .as_array()
        .context("no vm_devices in capsule inspect")?
        .iter()
        .filter_map(|d| d["qdev_id"].as_str().map(String::from))
        .collect();
    ids.sort();
    Ok((devices, ids))
}

/// The pod's sandbox container, with the store configuration (a pod's
/// containers get its sandbox's configuration).
fn start_pod(env: &Env, cfg: &Path, dev: &str) -> Result<()> {
    let o = env.run(
        &[
            "-d",
            "--runtime-config-path",
            &cfg.display().to_string(),
            "--device",
            dev,
            "--annotation",
            "io.kubernetes.cri.container-type=sandbox",
            "--annotation",
            &format!("io.kubernetes.cri.sandbox-id={POD}"),
        ],
        POD,
        &["sleep", "1000"],
    )?;
    ensure!(
        o.status.success(),
        "{}\n{}",
        text(&o),
        env.containerd_log_tail()
    );
    wait_for("the pod to run", Duration::from_secs(120), || {
        (env.task_status(POD).as_deref() == Some("RUNNING")).then_some(())
    })
}

#[test]
fn hostile_specs_through_ctr_are_refused_and_leave_nothing() -> Result<()> {
    let _s = serial();
    let mut env = Env::start()?;
    let (disk, _file) = env.loop_device("poddisk", 16 << 20)?;
    let fx = fixture(&env, &disk)?;
    let mut runs = 0;
    // Standalone: nothing at all may be left.
    for (i, c) in fx.cases.iter().enumerate() {
        let id = format!("hs{i}");
        let o = run_case(&env, &fx, c, &id, false)?;
        check_refused(c, &o, &env)?;
        eprintln!(
            "standalone {:?}: {}",
            c.name,
            String::from_utf8_lossy(&o.stderr).trim()
        );
        let _ = env.ctr(&["container", "delete", &id]);
        env.assert_clean(CLEAN)
            .with_context(|| format!("after {:?}", c.name))?;
        runs += 1;
    }
    // In a running pod whose sandbox container holds a loop device.
    start_pod(&env, &fx.cfg, &disk)?;
    let before = pod_view(&env)?;
    let disk = before.0["devices"]
        .as_array()
        .is_some_and(|d| d.iter().any(|d| d["host_path"] == disk.as_str()));
    ensure!(
        disk,
        "the pod's disk is not in devices.json: {:#}",
        before.0
    );
    for (i, c) in fx.cases.iter().enumerate() {
        let id = format!("hp{i}");
        let o = run_case(&env, &fx, c, &id, true)?;
        check_refused(c, &o, &env)?;
        let _ = env.ctr(&["container", "delete", &id]);
        let after = pod_view(&env).with_context(|| format!("after {:?}", c.name))?;
        if after != before {
            bail!(
                "{}: the pod changed:\nbefore {:#?}\nafter {:#?}",
                c.name,
                before,
                after
            );
        }
        ensure!(
            env.sandboxes() == [POD],
            "{}: sandboxes {:?}",
            c.name,
            env.sandboxes()
        );
        ensure!(
            env.task_status(POD).as_deref() == Some("RUNNING"),
            "{}: the pod is {:?}",
            c.name,
            env.task_status(POD)
        );
        runs += 1;
    }
    env.remove(POD);
    env.assert_clean(CLEAN)?;
    eprintln!(
        "hostile specs through ctr: {} cases ({runs} runs: standalone and in a pod)",
        fx.cases.len()
    );
    Ok(())
}
