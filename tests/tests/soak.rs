//! Soak: one long-lived pod runs N sequential containers (default 20;
//! `make soak` sets `CAPSULE_SOAK_CONTAINERS=200`), each hot-plugging two
//! loop devices and unplugging them on delete. After every create and every
//! delete the device state file must equal the VM's real device list; block
//! indexes, PCI slots and guest disk names must be reused; the shim's (and
//! QEMU's) fd count must not grow and the shim's RSS must stay flat. The
//! summary is printed and written to `target/soak/soak.json`.
//!
//! `CAPSULE_SOAK_DRIVER=virtio-scsi` runs it over virtio-scsi (block indexes
//! only; the disks take no PCI slots). The default is virtio-blk.
//!
//! Devices: four loop devices, container `i` uses `i % 4` and `(i + 1) % 4`.
//! Every device comes back with a different partner and in a different
//! plug order, so a slot or index tied to a device, or not freed on unplug,
//! shows up as an extra one; with the same two devices every time a stale
//! mapping could hide. Each container reads the marker the previous user of
//! a device wrote and writes its own, which must reach the backing file.
use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use capsule_tests::{text, wait_for, CapsuleOptions, Env};
use serde_json::{json, Value};

const POD: &str = "soak-pod";
const LOOPS: usize = 4;
const DEFAULT_CONTAINERS: usize = 20;
/// Containers before the fd and RSS baselines are taken (lazy
/// initialisation, allocator arenas, the first QMP and agent buffers).
const WARMUP: usize = 2;
/// RSS slack over the baseline: max(4 MiB, 10 %). The debug-build shim's
/// allocator keeps freed memory and grows its heap in steps, so RSS creeps
/// up early and then levels off; a leak keeps growing with every container.
const RSS_SLACK_KIB: f64 = 4096.0;
/// Containers after the warm-up from which the settled growth rate is
/// checked too: enough that one allocator step (a few hundred KiB) spread
/// over the second half stays well below the limit.
const LONG_RUN: usize = 40;
/// RSS growth allowed per container once settled (two pages). The 50-run
/// here settles near 2 KiB per container; a per-container leak of a buffer
/// or a record is larger.
const SETTLED_KIB_PER_CONTAINER: f64 = 8.0;
const STEP: Duration = Duration::from_secs(120);

fn containers() -> Result<usize> {
    match std::env::var("CAPSULE_SOAK_CONTAINERS") {
        Err(_) => Ok(DEFAULT_CONTAINERS),
        Ok(v) => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| *n > WARMUP)
            .with_context(|| {
                format!("CAPSULE_SOAK_CONTAINERS={v:?}: expected a number above {WARMUP}")
            }),
    }
}

fn annotations(kind: &str) -> Vec<String> {
    vec![
        "--annotation".into(),
        format!("io.kubernetes.cri.container-type={kind}"),
        "--annotation".into(),
        format!("io.kubernetes.cri.sandbox-id={POD}"),
    ]
}

/// A number field of `/proc/<pid>/status` (`VmRSS` in KiB, `Threads`).
fn proc_status(pid: u32, key: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let s = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("{path}: no {key}"))
}

fn fd_count(pid: u32) -> Result<usize> {
    let path = format!("/proc/{pid}/fd");
    Ok(std::fs::read_dir(&path)
        .with_context(|| format!("listing {path}"))?
        .count())
}

#[derive(Debug, Clone, Copy)]
struct Usage {
    rss_kib: u64,
    fds: usize,
    threads: u64,
    qemu_fds: usize,
}

/// The shim's and QEMU's processes.
#[derive(Debug, Clone, Copy)]
struct Pids {
    shim: u32,
    qemu: u32,
}

fn usage(p: Pids) -> Result<Usage> {
    Ok(Usage {
        rss_kib: proc_status(p.shim, "VmRSS")?,
        fds: fd_count(p.shim)?,
        threads: proc_status(p.shim, "Threads")?,
        qemu_fds: fd_count(p.qemu)?,
    })
}

/// One attached device as devices.json records it.
#[derive(Debug, Clone)]
struct Plugged {
    id: String,
    kind: String,
    host_path: String,
    block_index: Option<u64>,
    pci_slots: Vec<u64>,
    /// `pci:07`, `scsi:0:1`.
    guest_address: String,
}

fn ints(v: &Value) -> Vec<u64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

fn device_count(env: &Env) -> Result<usize> {
    env.devices_record(POD)
        .and_then(|v| v["devices"].as_array().map(Vec::len))
        .with_context(|| format!("{POD}: devices.json missing or unreadable"))
}

/// Checks that the pod's device state equals the VM's real device list
/// (with `capsule inspect`'s drift and by comparing devices.json with the
/// VM's list here), that exactly `expect` (host paths) are attached as block
/// devices, and that the pod's own devices (`pod`, the virtio-fs share;
/// unchecked when `None`) are unchanged. Returns every attached device.
fn check_state(env: &Env, pod: Option<&[String]>, expect: &[&str]) -> Result<Vec<Plugged>> {
    let o = env.capsule(&["inspect", POD, "--json"])?;
    let v: Value = serde_json::from_slice(&o.stdout)
        .with_context(|| format!("capsule inspect {POD} --json: {}", text(&o)))?;
    let drift = v["drift"].as_array().context("inspect: no drift list")?;
    ensure!(
        drift.is_empty(),
        "capsule inspect reports drift: {drift:#?}"
    );
    ensure!(o.status.success(), "capsule inspect: {}", text(&o));
    let vm = v["vm_devices"]["devices"]
        .as_array()
        .with_context(|| format!("inspect: no VM device list ({})", v["vm_error"]))?;
    let state = env
        .devices_record(POD)
        .with_context(|| format!("{POD}: devices.json missing or unreadable"))?;
    let records = state["devices"]
        .as_array()
        .context("devices.json: no devices")?;

    let mut plugged = Vec::new();
    for r in records {
        let id = r["id"]
            .as_str()
            .context("devices.json: record without id")?;
        let res = &r["resources"];
        match r["status"].as_str() {
            Some("attached") => {}
            Some("detached") if res.as_object().is_none_or(|m| m.is_empty()) => continue,
            _ => bail!("{id} in a quiescent pod: {r:#}"),
        }
        let addr = &r["guest_address"];
        let in_vm: Vec<&Value> = vm
            .iter()
            .filter(|d| d["capsule_id"].as_str() == Some(id))
            .collect();
        ensure!(
            in_vm.len() == 1,
            "{id} is recorded attached; the VM has {} devices of it: {vm:#?}",
            in_vm.len()
        );
        ensure!(
            addr["type"] != "pci" || in_vm[0]["pci_path"] == addr["address"],
            "{id}: recorded at PCI {}, the VM has it at {}",
            addr["address"],
            in_vm[0]["pci_path"]
        );
        plugged.push(Plugged {
            id: id.into(),
            kind: r["kind"]["kind"].as_str().unwrap_or_default().into(),
            host_path: r["host_path"].as_str().unwrap_or_default().into(),
            block_index: res["block_index"].as_u64(),
            pci_slots: ints(&res["pci_slots"]),
            guest_address: format!("{}:{}", addr["type"], addr["address"]).replace('"', ""),
        });
    }
    // Every capsule device in the VM is a recorded, attached one.
    for d in vm.iter().filter(|d| !d["capsule_id"].is_null()) {
        ensure!(
            plugged.iter().any(|p| d["capsule_id"] == p.id.as_str()),
            "the VM has {} ({}), which devices.json does not record attached",
            d["qdev_id"],
            d["driver"]
        );
    }
    let (blk, own): (Vec<&Plugged>, Vec<&Plugged>) =
        plugged.iter().partition(|p| p.kind == "block");
    let got: BTreeSet<&str> = blk.iter().map(|p| p.host_path.as_str()).collect();
    let want: BTreeSet<&str> = expect.iter().copied().collect();
    ensure!(got == want, "attached {got:?}, expected {want:?}");
    let own: Vec<&String> = own.iter().map(|p| &p.id).collect();
    if let Some(pod) = pod {
        ensure!(
            own.iter().copied().eq(pod.iter()),
            "the pod's own devices changed: {own:?}, were {pod:?}"
        );
    }
    // The allocators hold exactly what attached devices use.
    let held = |space: &str| -> BTreeSet<u64> {
        ints(&state["allocators"][space]["held"])
            .into_iter()
            .collect()
    };
    let used_blk: BTreeSet<u64> = plugged.iter().filter_map(|p| p.block_index).collect();
    let used_pci: BTreeSet<u64> = plugged.iter().flat_map(|p| p.pci_slots.clone()).collect();
    ensure!(
        held("block") == used_blk,
        "block indexes held {:?}, used by attached devices {used_blk:?}",
        held("block")
    );
    ensure!(
        held("pci") == used_pci,
        "PCI slots held {:?}, used by attached devices {used_pci:?}",
        held("pci")
    );
    Ok(plugged)
}

/// Writes `marker` at offset 0 of `dev` (host side, through the loop device).
fn write_marker(dev: &str, marker: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_SYNC)
        .open(dev)
        .with_context(|| format!("opening {dev}"))?;
    let mut block = vec![0u8; 512];
    block[..marker.len()].copy_from_slice(marker.as_bytes());
    f.write_all(&block)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {dev}"))
}

fn file_has(file: &Path, marker: &str) -> Result<bool> {
    let data = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    Ok(data.windows(marker.len()).any(|w| w == marker.as_bytes()))
}

fn wait_status(env: &Env, id: &str, want: &str) -> Result<()> {
    wait_for(&format!("task {id} {want}"), STEP, || {
        (env.task_status(id).as_deref() == Some(want)).then_some(())
    })
}

/// Kills and deletes `id`, every step checked.
fn delete(env: &Env, id: &str) -> Result<()> {
    env.ctr_ok(&["task", "kill", "-s", "SIGKILL", id])?;
    wait_status(env, id, "STOPPED")?;
    env.ctr_ok(&["task", "delete", id])?;
    env.ctr_ok(&["container", "delete", id])?;
    Ok(())
}

struct Loop {
    dev: String,
    file: PathBuf,
    /// What offset 0 holds now.
    marker: String,
}

/// Inside container `id` (the `i`th): both nodes are block devices holding
/// what their last user wrote; writes this container's markers and checks
/// they reach the backing files. Returns the guest's disks (`vda`, `sdb`).
fn check_inside(
    env: &Env,
    id: &str,
    i: usize,
    loops: &mut [Loop],
    pair: [usize; 2],
) -> Result<Vec<String>> {
    let mut script = String::from("set -e\necho \"disks=$(ls /sys/block | tr '\\n' ' ')\"\n");
    for (k, l) in pair.iter().map(|&p| &loops[p]).enumerate() {
        script.push_str(&format!(
            "test -b {dev}\n\
             echo \"{dev}=$(dd if={dev} bs=32 count=1 2>/dev/null | tr -cd 'a-z0-9-')\"\n\
             echo soak-{i}-{k} | dd of={dev} bs=512 count=1 conv=sync,fsync 2>/dev/null\n",
            dev = l.dev
        ));
    }
    let o = env.exec(id, &format!("check-{i}"), &["sh", "-c", &script])?;
    ensure!(o.status.success(), "{id}: device check: {}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for (k, &p) in pair.iter().enumerate() {
        let l = &mut loops[p];
        let line = format!("{}={}", l.dev, l.marker);
        ensure!(
            out.lines().any(|x| x.trim() == line),
            "{id}: expected {line:?} from inside the container, got:\n{out}"
        );
        l.marker = format!("soak-{i}-{k}");
        ensure!(
            file_has(&l.file, &l.marker)?,
            "{id}: {} did not reach {}",
            l.marker,
            l.file.display()
        );
    }
    let disks = out
        .lines()
        .find_map(|l| l.strip_prefix("disks="))
        .with_context(|| format!("{id}: no /sys/block listing in:\n{out}"))?;
    Ok(disks
        .split_whitespace()
        .filter(|d| d.starts_with("vd") || d.starts_with("sd"))
        .map(String::from)
        .collect())
}

/// One container's record.
struct Sample {
    secs: f64,
    /// devices.json records with the container, and after its delete.
    records: (usize, usize),
    attached: Usage,
    after: Usage,
    devices: Vec<Plugged>,
    guest_disks: Vec<String>,
}

/// Container `i`: run it with two devices, check the state, check the
/// devices from inside, delete it, check the state again.
fn iteration(
    env: &Env,
    i: usize,
    loops: &mut [Loop],
    pod: &[String],
    pids: Pids,
) -> Result<Sample> {
    let t0 = Instant::now();
    let id = format!("soak-{i}");
    let pair = [i % LOOPS, (i + 1) % LOOPS];
    let devs = pair.map(|k| loops[k].dev.clone());
    let mut opts: Vec<String> = vec!["-d".into()];
    for d in &devs {
        opts.extend(["--device".into(), d.clone()]);
    }
    opts.extend(annotations("container"));
    let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
    let o = env.run(&opts, &id, &["sleep", "100000"])?;
    ensure!(o.status.success(), "{id}: {}", text(&o));
    wait_status(env, &id, "RUNNING")?;
    let devices = check_state(env, Some(pod), &[&devs[0], &devs[1]])
        .with_context(|| format!("{id} created"))?;
    for d in devices.iter().filter(|d| d.kind == "block") {
        let pci = d.pci_slots.len() == 1 && d.guest_address.starts_with("pci:");
        let scsi = d.pci_slots.is_empty() && d.guest_address.starts_with("scsi:");
        ensure!(
            d.block_index.is_some() && (pci || scsi),
            "{id}: {} has neither a block index and one PCI slot (virtio-blk) nor a SCSI address: {d:?}",
            d.host_path
        );
    }
    let guest_disks = check_inside(env, &id, i, loops, pair)?;
    ensure!(
        guest_disks.len() == 2,
        "{id}: the guest has disks {guest_disks:?}, expected the container's two"
    );
    let records = device_count(env)?;
    let attached = usage(pids)?;

    delete(env, &id).with_context(|| format!("deleting {id}"))?;
    check_state(env, Some(pod), &[]).with_context(|| format!("{id} deleted"))?;
    let file = env.sandbox_dir(POD).join("sandbox.json");
    let c: Value = serde_json::from_slice(&std::fs::read(&file)?)
        .with_context(|| format!("parsing {}", file.display()))?;
    let ids: Vec<&String> = c["containers"]
        .as_object()
        .map(|m| m.keys().collect())
        .unwrap_or_default();
    ensure!(
        ids == [POD],
        "{} after deleting {id}: {ids:?}",
        file.display()
    );
    Ok(Sample {
        secs: t0.elapsed().as_secs_f64(),
        records: (records, device_count(env)?),
        attached,
        after: usage(pids)?,
        devices,
        guest_disks,
    })
}

/// Least-squares slope of `ys` per step.
fn slope(ys: &[f64]) -> f64 {
    if ys.len() < 2 {
        return 0.0;
    }
    let n = ys.len() as f64;
    let (mx, my) = ((n - 1.0) / 2.0, ys.iter().sum::<f64>() / n);
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in ys.iter().enumerate() {
        num += (x as f64 - mx) * (y - my);
        den += (x as f64 - mx).powi(2);
    }
    num / den
}

/// first/last/max/baseline of a series taken after each delete.
fn stat(v: &[f64]) -> Value {
    json!({"first": v[0], "last": v[v.len() - 1], "baseline": v[WARMUP - 1],
           "max": v.iter().cloned().fold(f64::MIN, f64::max)})
}

/// Everything seen over the run.
#[derive(Default)]
struct Seen {
    pci_slots: BTreeSet<u64>,
    block_indexes: BTreeSet<u64>,
    guest_disks: BTreeSet<String>,
    device_ids: BTreeSet<String>,
}

/// Prints the summary and writes it (with every container) to
/// `target/soak/soak.json`.
fn summarise(n: usize, driver: &str, total: f64, samples: &[Sample], seen: &Seen) -> Result<()> {
    let series = |f: &dyn Fn(&Sample) -> f64| -> Vec<f64> { samples.iter().map(f).collect() };
    let rss = series(&|s| s.after.rss_kib as f64);
    let per_container: Vec<Value> = samples
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({
                "i": i, "secs": s.secs, "rss_kib": s.after.rss_kib, "fds": s.after.fds,
                "threads": s.after.threads, "qemu_fds": s.after.qemu_fds,
                "rss_kib_attached": s.attached.rss_kib, "fds_attached": s.attached.fds,
                "records": s.records.0, "records_after_delete": s.records.1,
                "guest_disks": s.guest_disks,
                "devices": s.devices.iter().map(|d| json!({
                    "id": d.id, "host": d.host_path, "block_index": d.block_index,
                    "pci_slots": d.pci_slots, "guest": d.guest_address})).collect::<Vec<_>>(),
            })
        })
        .collect();
    let mut summary = json!({
        "containers": n, "driver": driver, "devices_per_container": 2, "loop_devices": LOOPS,
        "total_secs": total, "secs_per_container": total / n as f64,
        "rss_kib": stat(&rss),
        "rss_kib_max_with_container": samples.iter().map(|s| s.attached.rss_kib).max(),
        "rss_slope_kib_per_container": slope(&rss[WARMUP - 1..]),
        "fds": stat(&series(&|s| s.after.fds as f64)),
        "fds_max_with_container": samples.iter().map(|s| s.attached.fds).max(),
        "threads": stat(&series(&|s| s.after.threads as f64)),
        "qemu_fds": stat(&series(&|s| s.after.qemu_fds as f64)),
        "pci_slots_seen": seen.pci_slots, "block_indexes_seen": seen.block_indexes,
        "guest_disks_seen": seen.guest_disks, "device_ids_seen": seen.device_ids.len(),
    });
    println!("soak summary: {}", serde_json::to_string_pretty(&summary)?);
    summary["per_container"] = json!(per_container);
    let out = capsule_tests::target_dir().join("soak");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let file = out.join("soak.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&summary)?)
        .with_context(|| format!("writing {}", file.display()))?;
    println!("soak: wrote {}", file.display());
    Ok(())
}

/// Reuse: never more slots, indexes or guest disks than are held at once.
fn assert_reused(samples: &[Sample], seen: &Seen) -> Result<()> {
    let at_once = |f: &dyn Fn(&Sample) -> usize| samples.iter().map(f).max().unwrap_or(0);
    let pci = at_once(&|s| s.devices.iter().map(|d| d.pci_slots.len()).sum());
    let blk = at_once(&|s| s.devices.iter().filter(|d| d.block_index.is_some()).count());
    let disks = at_once(&|s| s.guest_disks.len());
    let n = samples.len();
    ensure!(
        seen.block_indexes.len() <= blk,
        "block indexes not reused: {:?} over {n} containers, at most {blk} held at once",
        seen.block_indexes
    );
    ensure!(
        seen.pci_slots.len() <= pci,
        "PCI slots not reused: {:?} over {n} containers, at most {pci} held at once",
        seen.pci_slots
    );
    ensure!(
        seen.guest_disks.len() <= disks,
        "guest disk names not reused: {:?} over {n} containers, at most {disks} at once",
        seen.guest_disks
    );
    for (i, s) in samples.iter().enumerate() {
        ensure!(
            s.records.0 <= samples[0].records.0 && s.records.1 <= samples[0].records.1,
            "devices.json grows: {:?} records (with the container, after its delete) at container {i}, {:?} at container 0",
            s.records,
            samples[0].records
        );
    }
    Ok(())
}

/// fds never above their post-warm-up baseline. RSS within the slack of its
/// baseline at the end and along the fitted trend (a leak grows linearly;
/// one noisy sample does not move the fit); in long runs (at least
/// [`LONG_RUN`] containers after the warm-up) the second half, past the
/// early creep, also grows at most [`SETTLED_KIB_PER_CONTAINER`].
fn assert_flat(samples: &[Sample]) -> Result<()> {
    let fds = |f: &dyn Fn(&Usage) -> usize, what: &str| -> Result<()> {
        let v: Vec<usize> = samples.iter().map(|s| f(&s.after)).collect();
        let base = v[WARMUP - 1];
        if let Some((i, x)) = v.iter().enumerate().skip(WARMUP).find(|(_, x)| **x > base) {
            bail!("{what} fds grew: {x} after container {i}, {base} after warm-up ({v:?})");
        }
        Ok(())
    };
    fds(&|u| u.fds, "shim")?;
    fds(&|u| u.qemu_fds, "QEMU")?;
    let rss: Vec<f64> = samples.iter().map(|s| s.after.rss_kib as f64).collect();
    let post = &rss[WARMUP - 1..];
    let (base, last) = (post[0], post[post.len() - 1]);
    let slack = RSS_SLACK_KIB.max(base / 10.0);
    ensure!(
        last <= base + slack,
        "shim RSS grew: {last} KiB at the end, {base} KiB after warm-up (slack {slack}; {rss:?})"
    );
    let trend = slope(post) * post.len() as f64;
    ensure!(
        trend <= slack,
        "shim RSS trends up {trend:.0} KiB over {} containers (slack {slack}; {rss:?})",
        post.len()
    );
    if post.len() >= LONG_RUN {
        let settled = slope(&post[post.len() / 2..]);
        ensure!(
            settled <= SETTLED_KIB_PER_CONTAINER,
            "shim RSS still grows {settled:.1} KiB per container in the second half of the run ({rss:?})"
        );
    }
    Ok(())
}

#[test]
fn flatness_criteria_accept_a_levelling_off_and_catch_leaks() {
    let run = |rss: &dyn Fn(u64) -> u64, fds: &dyn Fn(usize) -> usize| {
        let samples: Vec<Sample> = (0..200)
            .map(|i| {
                let u = Usage {
                    rss_kib: rss(i as u64),
                    fds: fds(i),
                    threads: 4,
                    qemu_fds: 90,
                };
                Sample {
                    secs: 2.0,
                    records: (3, 1),
                    attached: u,
                    after: u,
                    devices: Vec::new(),
                    guest_disks: Vec::new(),
                }
            })
            .collect();
        assert_flat(&samples[..20]).and(assert_flat(&samples))
    };
    // What a healthy shim does: early creep in page steps, then flat.
    let healthy = |i: u64| 19_700 + (i * 12).min(450) / 4 * 4;
    run(&healthy, &|_| 25).unwrap();
    // A leak of 12 KiB per container; one fd per 50 containers.
    assert!(run(&|i| healthy(i) + 12 * i, &|_| 25).is_err());
    assert!(run(&healthy, &|i| 25 + i / 50).is_err());
}

#[test]
fn soak_one_pod_many_containers_with_devices() -> Result<()> {
    let n = containers()?;
    let driver = std::env::var("CAPSULE_SOAK_DRIVER").unwrap_or_else(|_| "virtio-blk".into());
    let mut env = Env::start_with(CapsuleOptions {
        block_device_driver: driver.clone(),
        ..Default::default()
    })?;
    let mut loops = Vec::new();
    for k in 0..LOOPS {
        let (dev, file) = env.loop_device(&format!("soak{k}"), 8 << 20)?;
        let marker = format!("soak-init-{k}");
        write_marker(&dev, &marker)?;
        ensure!(
            file_has(&file, &marker)?,
            "{marker} not in {}",
            file.display()
        );
        loops.push(Loop { dev, file, marker });
    }
    let t0 = Instant::now();
    let mut opts = vec!["-d".to_string()];
    opts.extend(annotations("sandbox"));
    let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
    let o = env.run(&opts, POD, &["sleep", "100000"])?;
    ensure!(
        o.status.success(),
        "{}\n{}",
        text(&o),
        env.containerd_log_tail()
    );
    wait_status(&env, POD, "RUNNING")?;
    let shim = env.shim_pid(POD).context("no shim pid in sandbox.json")?;
    let qemu = env
        .sandbox_record(POD)
        .and_then(|v| v["qemu"]["pid"].as_u64())
        .context("no QEMU pid in sandbox.json")? as u32;
    let pids = Pids { shim, qemu };
    let pod: Vec<String> = check_state(&env, None, &[])
        .context("the pod before any container")?
        .into_iter()
        .map(|p| p.id)
        .collect();
    println!(
        "soak: {n} containers, {driver}, {pids:?}, pod devices {pod:?}, {:?}",
        usage(pids)?
    );

    let mut samples = Vec::new();
    let mut seen = Seen::default();
    for i in 0..n {
        let s = iteration(&env, i, &mut loops, &pod, pids)
            .with_context(|| format!("container {i} of {n}\n{}", env.containerd_log_tail()))?;
        ensure!(
            env.shim_pid(POD) == Some(shim),
            "the pod's shim changed after container {i}"
        );
        for d in &s.devices {
            seen.pci_slots.extend(d.pci_slots.iter().copied());
            seen.block_indexes.extend(d.block_index);
            seen.device_ids.insert(d.id.clone());
        }
        seen.guest_disks.extend(s.guest_disks.iter().cloned());
        println!(
            "soak {i:>4}: {:4.1}s rss {} KiB fds {} qemu fds {} threads {} records {}/{} guest {:?} {}",
            s.secs,
            s.after.rss_kib,
            s.after.fds,
            s.after.qemu_fds,
            s.after.threads,
            s.records.0,
            s.records.1,
            s.guest_disks,
            s.devices
                .iter()
                .map(|d| format!("{}@{}", d.id, d.guest_address))
                .collect::<Vec<_>>()
                .join(" ")
        );
        samples.push(s);
    }
    summarise(n, &driver, t0.elapsed().as_secs_f64(), &samples, &seen)?;
    assert_reused(&samples, &seen)?;
    assert_flat(&samples)?;

    delete(&env, POD)?;
    env.assert_clean(Duration::from_secs(120))
}
