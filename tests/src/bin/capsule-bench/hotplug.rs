//! Figure 2, device hotplug through the whole stack, against bare QMP.
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use capsule_devmgr::device::ScsiAddr;
use capsule_hypervisor::testkit::BareQmp;
use capsule_tests::{Env, IMAGE, RUNTIME};
use serde_json::{json, Value};

use crate::bare::{BareLaunch, BareVm, READY};
use crate::host::{ctr, timed_ok};
use crate::report::Figure;
use crate::stats::Series;

pub const COUNTS: [usize; 3] = [1, 8, 32];
/// Samples per round at each count: more where the difference is small
/// against the noise of a whole `ctr run`.
const REPEATS: [usize; 3] = [3, 2, 1];
const POD: &str = "hp-pod";
const T: Duration = Duration::from_secs(300);
const QMP_T: Duration = Duration::from_secs(30);

const METHOD: &str = "Block driver: virtio-scsi (the bench configuration's `block_device_driver`), on both sides the same loop devices (16 MiB each).\n\
A **capsule** (Δ): in a running pod (sandbox container `sleep`), wall time of `ctr run --rm --runtime io.containerd.capsule.v2` of a pod container running `true` with N `--device /dev/loopX`, minus the same `ctr run --rm` with no device, run right before it in the same round. The difference is the whole stack's cost of N devices: spec resolution, device manager (state writes), QMP hotplug (blockdev-add + device_add per disk), the agent waiting until the guest has every disk, the nodes in the container, and on `--rm` the unplug (device_del, blockdev-del) of all N.\n\
B **bare QMP**: a bare VM (capsule's QEMU command line, see figure 1, without the share; agent in `capsule.bench=count-disks`: it prints `capsule-bench: disks=K` on the console whenever the number of disks with a /dev node changes, woken by uevents). One minimal QMP client (`BareQmp`) sends blockdev-add (raw over host_device, aio=threads) + device_add (scsi-hd on scsi0.0, serial) for each of the N disks, the clock runs until the console says `disks=N`, then for each disk device_del, the DEVICE_DELETED event (virtio-scsi unplug completes asynchronously) and blockdev-del. Timed: first blockdev-add to the last blockdev-del returning. The guest is then let to settle to `disks=0`, untimed.\n\
Order per round: for N in 1, 8, 32, repeated 3, 2 and 1 times (the smaller the difference, the more samples): A's 0-device run, A's N-device run, B. One untimed warm-up first. Per-device cost = total / N.";

fn opts(id: &str, kind: &str) -> Vec<String> {
    vec![
        "--annotation".into(),
        format!("io.kubernetes.cri.container-type={kind}"),
        "--annotation".into(),
        format!("io.kubernetes.cri.sandbox-id={id}"),
    ]
}

fn capsule_run(env: &Env, id: &str, devs: &[String]) -> Result<f64> {
    let mut args: Vec<String> = vec![
        "run".into(),
        "--rm".into(),
        "--runtime".into(),
        RUNTIME.into(),
    ];
    args.extend(opts(POD, "container"));
    for d in devs {
        args.push("--device".into());
        args.push(d.clone());
    }
    args.extend([IMAGE.to_string(), id.to_string(), "true".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Ok(timed_ok(ctr(env, &args), T)?.as_secs_f64() * 1e3)
}

async fn qmp(q: &mut BareQmp, cmd: &str, args: Value) -> Result<Value> {
    tokio::time::timeout(QMP_T, q.cmd(cmd, args))
        .await
        .map_err(|_| anyhow!("QMP {cmd}: no reply within {QMP_T:?}"))?
}

/// Plugs `devs`, waits for the guest to count them all, unplugs them.
/// Returns (total, until the guest saw all) in ms.
async fn bare_cycle(q: &mut BareQmp, vm: &mut BareVm, devs: &[String]) -> Result<(f64, f64)> {
    let t0 = Instant::now();
    for (i, dev) in devs.iter().enumerate() {
        let addr = ScsiAddr::from_index(i as u32).ok_or_else(|| anyhow!("index {i}"))?;
        qmp(q, "blockdev-add", json!({"driver": "raw", "node-name": format!("b{i}-node"),
            "read-only": false, "file": {"driver": "host_device", "filename": dev, "aio": "threads"}}))
        .await?;
        qmp(
            q,
            "device_add",
            json!({"driver": "scsi-hd", "id": format!("b{i}"), "bus": "scsi0.0",
            "drive": format!("b{i}-node"), "channel": 0, "scsi-id": addr.id, "lun": addr.lun,
            "serial": format!("b{i}")}),
        )
        .await?;
    }
    vm.wait_line(&format!("capsule-bench: disks={}", devs.len()), T)?;
    let seen = t0.elapsed();
    for i in 0..devs.len() {
        let id = format!("b{i}");
        qmp(q, "device_del", json!({ "id": id })).await?;
        tokio::time::timeout(QMP_T, q.wait_deleted(&id))
            .await
            .map_err(|_| anyhow!("no DEVICE_DELETED for {id} within {QMP_T:?}"))??;
        qmp(
            q,
            "blockdev-del",
            json!({"node-name": format!("b{i}-node")}),
        )
        .await?;
    }
    let total = t0.elapsed();
    vm.wait_line("capsule-bench: disks=0", T)?;
    Ok((total.as_secs_f64() * 1e3, seen.as_secs_f64() * 1e3))
}

pub fn run(env: &Env, rounds: usize, loops: &[String]) -> Result<Vec<Figure>> {
    let max = COUNTS.iter().copied().max().unwrap_or(0);
    anyhow::ensure!(loops.len() >= max, "{max} loop devices needed");
    let mut pod_args: Vec<String> = vec![
        "run".into(),
        "-d".into(),
        "--runtime".into(),
        RUNTIME.into(),
    ];
    pod_args.extend(opts(POD, "sandbox"));
    pod_args.extend([IMAGE.into(), POD.into(), "sleep".into(), "1000000".into()]);
    let pod_args: Vec<&str> = pod_args.iter().map(String::as_str).collect();
    env.ctr_ok(&pod_args)?;

    let launch = BareLaunch::new(env, &env.dir.path().join("bare-hotplug"), "count-disks")?;
    let mut vm = BareVm::start(launch)?;
    vm.wait_line(READY, T)?;
    vm.wait_line("capsule-bench: disks=0", T)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut q = rt
        .block_on(BareQmp::connect(&vm.launch.qmp_socket))
        .context("bare QMP client")?;

    let mut cap: Vec<Series> = COUNTS
        .iter()
        .map(|n| Series::new(format!("capsule N={n} (Δ)")))
        .collect();
    let mut bare: Vec<Series> = COUNTS
        .iter()
        .map(|n| Series::new(format!("bare QMP N={n}")))
        .collect();
    let mut seen: Vec<Series> = COUNTS
        .iter()
        .map(|n| Series::new(format!("bare QMP N={n}, plug until seen")))
        .collect();
    let mut zero = Series::new("capsule 0 devices (ctr run --rm)");
    capsule_run(env, "hp-warm0", &[])?;
    capsule_run(env, "hp-warm1", &loops[..1])?;
    rt.block_on(bare_cycle(&mut q, &mut vm, &loops[..1]))?;
    for r in 0..rounds {
        for (k, &n) in COUNTS.iter().enumerate() {
            for j in 0..REPEATS[k] {
                let t0 = capsule_run(env, &format!("hp-{r}-{n}-{j}-0"), &[])?;
                let tn = capsule_run(env, &format!("hp-{r}-{n}-{j}"), &loops[..n])?;
                let (tb, ts) = rt.block_on(bare_cycle(&mut q, &mut vm, &loops[..n]))?;
                zero.samples.push(t0);
                cap[k].samples.push(tn - t0);
                bare[k].samples.push(tb);
                seen[k].samples.push(ts);
                eprintln!(
                    "hotplug round {r} N={n}: capsule {tn:.0} - {t0:.0} = {:.0} ms, bare {tb:.0} ms (seen {ts:.0})",
                    tn - t0
                );
            }
        }
    }
    drop(q);
    drop(vm);
    env.remove(POD);
    env.assert_clean(Duration::from_secs(60))?;
    Ok(figures(cap, bare, seen, zero))
}

fn figures(cap: Vec<Series>, bare: Vec<Series>, seen: Vec<Series>, zero: Series) -> Vec<Figure> {
    let mut total = Figure::new(
        "hotplug",
        "2. Device hotplug through the whole stack",
        "ms",
        METHOD,
    );
    let mut per = Figure::new(
        "hotplug-per-device",
        "2b. Device hotplug, cost per device",
        "ms per device",
        "The samples of figure 2 divided by N.",
    );
    for (k, n) in COUNTS.iter().enumerate() {
        total.series.push(cap[k].clone());
        total.series.push(bare[k].clone());
        for s in [&cap[k], &bare[k]] {
            let mut d = Series::new(format!("{} per device", s.name));
            d.samples = s.samples.iter().map(|v| v / *n as f64).collect();
            per.series.push(d);
        }
        total.ratio(
            &format!("capsule / bare, N={n}"),
            &cap[k].name,
            &bare[k].name,
            Some(1.10),
            "whole-stack hotplug against bare QMP",
        );
    }
    total.series.extend(seen);
    total.series.push(zero);
    let (first, last) = (0, COUNTS.len() - 1);
    for (who, s) in [("capsule", &cap), ("bare QMP", &bare)] {
        let a = s[first].median() / COUNTS[first] as f64;
        let b = s[last].median() / COUNTS[last] as f64;
        per.ratios.push(crate::stats::Ratio::new(
            &format!(
                "{who} per-device cost growth, N={} / N={}",
                COUNTS[last], COUNTS[first]
            ),
            b,
            a,
            (who == "capsule").then_some(1.0),
            "per-device cost must not grow with the count",
        ));
    }
    vec![total, per]
}
