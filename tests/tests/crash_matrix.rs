//! The crash matrix: the shim is SIGKILLed at every fault point
//! (`capsule_shim::fault::PHASES`) of Create, Start, device attach, Exec,
//! Delete, detach and Shutdown, armed through `CAPSULE_FAULT` in
//! containerd's environment. After each kill containerd's own cleanup runs
//! (it notices the dead shim and runs `shim delete`), then the containers
//! are removed; every case must end with no QEMU or virtiofsd process, no
//! mount, no sandbox state, no dead shim socket, and every loop device still
//! attached to its file with its data unchanged.
//!
//! Short mode (default, `make test`): every phase once (virtio-scsi, a lone
//! container with one device). `CAPSULE_CRASH_MATRIX=full` (`make soak`):
//! every phase x {virtio-scsi, virtio-blk} x {a lone container, the second
//! container of a pod whose sandbox container holds another device}. All
//! cases run (sequentially); the test fails at the end listing the failing
//! ones. `CAPSULE_CRASH_PHASES=a,b` restricts either mode to some phases.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use capsule_shim::fault::PHASES;
use capsule_tests::{processes, text, wait_for, CapsuleOptions, Env};

/// containerd's cleanup after a dead shim, and the removal afterwards.
const CLEAN: Duration = Duration::from_secs(120);
const POD: &str = "cm-pod";
const APP: &str = "cm-app";
const LONE: &str = "cm-lone";
const LOOP_SIZE: usize = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// One container, its own sandbox, one device.
    Lone,
    /// The second container of a pod; the pod's sandbox container holds
    /// another device.
    PodApp,
}

#[derive(Debug, Clone)]
struct Case {
    phase: &'static str,
    driver: &'static str,
    shape: Shape,
}

impl Case {
    fn name(&self) -> String {
        let shape = match self.shape {
            Shape::Lone => "lone",
            Shape::PodApp => "pod-app",
        };
        format!("{} / {} / {shape}", self.phase, self.driver)
    }
}

fn cases() -> Result<Vec<Case>> {
    let full = match std::env::var("CAPSULE_CRASH_MATRIX").as_deref() {
        Err(_) | Ok("") | Ok("short") => false,
        Ok("full") => true,
        Ok(other) => bail!("CAPSULE_CRASH_MATRIX={other:?}: expected `short` or `full`"),
    };
    let (drivers, shapes): (&[&str], &[Shape]) = if full {
        (
            &["virtio-scsi", "virtio-blk"],
            &[Shape::Lone, Shape::PodApp],
        )
    } else {
        (&["virtio-scsi"], &[Shape::Lone])
    };
    // CAPSULE_CRASH_PHASES=a,b: only these phases (debugging one case).
    let only: Vec<String> = std::env::var("CAPSULE_CRASH_PHASES")
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    for o in &only {
        ensure!(
            PHASES.contains(&o.as_str()),
            "CAPSULE_CRASH_PHASES names {o:?}, which is no fault point"
        );
    }
    if !only.is_empty() {
        eprintln!("crash matrix: only the phases {only:?} (CAPSULE_CRASH_PHASES)");
    }
    let mut v = Vec::new();
    for &driver in drivers {
        for &shape in shapes {
            for &phase in PHASES {
                if !only.is_empty() && !only.iter().any(|o| o == phase) {
                    continue;
                }
                if NETWORK_ONLY.contains(&phase) {
                    continue;
                }
                v.push(Case {
                    phase,
                    driver,
                    shape,
                });
            }
        }
    }
    Ok(v)
}

/// Fault points reached only with a pod network (an L2 link in the pod's
/// namespace), which these scenarios have not: tests/tests/network.rs kills
/// the shim at each of them with a CNI bridge and checks the same cleanup.
const NETWORK_ONLY: &[&str] = &["net.recorded", "net.plumbed"];

/// One ctr step of a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// `ctr run -d` of the pod's sandbox container (device A).
    RunPod,
    /// `ctr run -d` of the container under test (device B).
    Run,
    Exec,
    Kill,
    Delete,
    /// Kill and delete of the pod's sandbox container: the last container,
    /// so containerd shuts the shim down.
    DeletePod,
}

fn steps(shape: Shape) -> &'static [Step] {
    match shape {
        Shape::Lone => &[Step::Run, Step::Exec, Step::Kill, Step::Delete],
        Shape::PodApp => &[
            Step::RunPod,
            Step::Run,
            Step::Exec,
            Step::Kill,
            Step::Delete,
            Step::DeletePod,
        ],
    }
}

/// The step whose RPCs reach `phase`.
fn step_of(phase: &str, shape: Shape) -> Result<Step> {
    let group = phase.split('.').next().unwrap_or_default();
    let sandbox_start = matches!(
        phase,
        "boot.coldplug" | "boot.vm-started" | "create.sandbox-started"
    );
    Ok(match (group, shape) {
        _ if sandbox_start && shape == Shape::PodApp => Step::RunPod,
        ("create" | "boot" | "attach" | "start", _) => Step::Run,
        ("exec", _) => Step::Exec,
        ("delete" | "detach", _) => Step::Delete,
        ("shutdown", Shape::Lone) => Step::Delete,
        ("shutdown", Shape::PodApp) => Step::DeletePod,
        _ => bail!("no scenario step reaches fault point {phase}: add it to step_of"),
    })
}

/// Whether the ctr command of the step the shim dies in must fail: yes
/// unless the shim dies in Shutdown, after Delete has replied.
fn interrupts_the_command(phase: &str) -> bool {
    !phase.starts_with("shutdown.")
}

/// A loop device holding a recognisable, offset-dependent pattern.
struct Disk {
    dev: String,
    file: PathBuf,
    sha: String,
}

fn sha256(path: &Path) -> Result<String> {
    let o = Command::new("sha256sum").arg(path).output()?;
    ensure!(
        o.status.success(),
        "sha256sum {}: {}",
        path.display(),
        text(&o)
    );
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .map(String::from)
        .with_context(|| format!("sha256sum {}: no output", path.display()))
}

fn pattern(name: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(LOOP_SIZE);
    for block in 0..LOOP_SIZE / 4096 {
        let header = format!("capsule crash matrix {name} block {block}\n");
        let mut b: Vec<u8> = header.into_bytes();
        let start = b.len();
        b.extend((start..4096).map(|i| (i * 7 + block * 13) as u8));
        data.extend_from_slice(&b);
    }
    data
}

/// Writes the pattern through the device node (a udev probe may already
/// have cached the zeroes of the new device), so the node and the file
/// agree.
fn new_disk(env: &mut Env, name: &str) -> Result<Disk> {
    let (dev, file) = env.loop_device(name, LOOP_SIZE as u64)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&dev)
        .with_context(|| format!("opening {dev}"))?;
    f.write_all(&pattern(name))
        .with_context(|| format!("writing {dev}"))?;
    f.sync_all().with_context(|| format!("fsync of {dev}"))?;
    drop(f);
    let sha = sha256(&file)?;
    ensure!(
        sha256(Path::new(&dev))? == sha,
        "{dev} and {} differ right after writing",
        file.display()
    );
    Ok(Disk { dev, file, sha })
}

/// The loop device is still attached to its file and both hold the data.
fn check_disk(d: &Disk) -> Result<()> {
    let o = Command::new("losetup")
        .args(["--list", "--json", "--output", "NAME,BACK-FILE"])
        .arg(&d.dev)
        .output()?;
    ensure!(o.status.success(), "losetup --list {}: {}", d.dev, text(&o));
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).with_context(|| format!("losetup: {}", text(&o)))?;
    let back = v["loopdevices"][0]["back-file"]
        .as_str()
        .unwrap_or_default();
    let want = d.file.canonicalize()?;
    ensure!(
        Path::new(back.trim_end_matches(" (deleted)")) == want && !back.ends_with("(deleted)"),
        "{} is now backed by {back:?}, not {}",
        d.dev,
        want.display()
    );
    // Read the node itself, not what the host cached of it.
    let o = Command::new("blockdev")
        .args(["--flushbufs", &d.dev])
        .output()?;
    ensure!(
        o.status.success(),
        "blockdev --flushbufs {}: {}",
        d.dev,
        text(&o)
    );
    let through_dev = sha256(Path::new(&d.dev))?;
    ensure!(
        through_dev == d.sha,
        "{}: content changed (sha256 {through_dev}, was {})",
        d.dev,
        d.sha
    );
    let file = sha256(&d.file)?;
    ensure!(
        file == d.sha,
        "{}: content changed (sha256 {file}, was {})",
        d.file.display(),
        d.sha
    );
    Ok(())
}

fn annotations(kind: &str) -> [String; 4] {
    [
        "--annotation".into(),
        format!("io.kubernetes.cri.container-type={kind}"),
        "--annotation".into(),
        format!("io.kubernetes.cri.sandbox-id={POD}"),
    ]
}

fn run_detached(env: &Env, id: &str, dev: &str, ann: Option<[String; 4]>) -> Result<Output> {
    let mut opts: Vec<&str> = vec!["-d", "--device", dev];
    if let Some(a) = &ann {
        opts.extend(a.iter().map(String::as_str));
    }
    env.run(&opts, id, &["sleep", "1000"])
}

fn kill_and_wait(env: &Env, id: &str) -> Result<Output> {
    let o = env.ctr(&["task", "kill", "-s", "SIGKILL", id])?;
    if o.status.success() {
        wait_for(
            &format!("task {id} to stop"),
            Duration::from_secs(120),
            || (env.task_status(id).as_deref() == Some("STOPPED")).then_some(()),
        )?;
    }
    Ok(o)
}

/// Runs `step`; returns the output of the ctr command that reaches its
/// fault points.
fn run_step(env: &Env, step: Step, id: &str, disks: &[Disk]) -> Result<Output> {
    let last = disks.last().context("no disk")?;
    match step {
        Step::RunPod => run_detached(env, POD, &disks[0].dev, Some(annotations("sandbox"))),
        Step::Run => {
            let ann = (id == APP).then(|| annotations("container"));
            run_detached(env, id, &last.dev, ann)
        }
        Step::Exec => env.exec(id, "e1", &["sh", "-c", "echo exec-ok"]),
        Step::Kill => kill_and_wait(env, id),
        Step::Delete => env.ctr(&["task", "delete", id]),
        Step::DeletePod => {
            let o = kill_and_wait(env, POD)?;
            if !o.status.success() {
                return Ok(o);
            }
            env.ctr(&["task", "delete", POD])
        }
    }
}

/// The pids the fault log says were killed at `phase`.
fn fault_hits(log: &Path, phase: &str) -> Vec<u32> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (p, pid) = l.split_once(' ')?;
            (p == phase).then(|| pid.trim().parse().ok())?
        })
        .collect()
}

fn run_case(case: &Case) -> Result<()> {
    let work = tempfile::Builder::new()
        .prefix("cap-fault-")
        .tempdir_in("/tmp")?;
    let log = work.path().join("fault.log");
    let gate = work.path().join("armed");
    let mut fault_env = vec![
        ("CAPSULE_FAULT".to_string(), case.phase.to_string()),
        ("CAPSULE_FAULT_LOG".to_string(), log.display().to_string()),
    ];
    // A pod's shim serves every container: arm it only for the step under
    // test (the gate file appears right before it).
    if case.shape == Shape::PodApp {
        fault_env.push(("CAPSULE_FAULT_GATE".into(), gate.display().to_string()));
    }
    let mut env = Env::start_with(CapsuleOptions {
        block_device_driver: case.driver.into(),
        containerd_env: fault_env,
        ..Default::default()
    })?;
    let mut disks = Vec::new();
    if case.shape == Shape::PodApp {
        disks.push(new_disk(&mut env, "pod")?);
    }
    disks.push(new_disk(&mut env, "app")?);
    let (id, ids, sandbox): (&str, &[&str], &str) = match case.shape {
        Shape::Lone => (LONE, &[LONE], LONE),
        Shape::PodApp => (APP, &[APP, POD], POD),
    };

    let target = step_of(case.phase, case.shape)?;
    let mut hit: Option<Output> = None;
    for &step in steps(case.shape) {
        if step == target {
            std::fs::write(&gate, b"")?;
        }
        let o = run_step(&env, step, id, &disks)?;
        if step == target {
            hit = Some(o);
            break;
        }
        ensure!(
            o.status.success(),
            "step {step:?} before the fault failed: {}\n{}",
            text(&o),
            env.containerd_log_tail()
        );
    }
    let o = hit.with_context(|| format!("the scenario has no step {target:?}"))?;

    let mut problems = Vec::new();
    let pids = fault_hits(&log, case.phase);
    if pids.is_empty() {
        problems.push(format!(
            "the fault point was not hit (fault log {:?}); step {target:?}: {}",
            std::fs::read_to_string(&log).unwrap_or_default(),
            text(&o)
        ));
    }
    for pid in &pids {
        let gone = wait_for("the killed shim to go", Duration::from_secs(30), || {
            (!processes().iter().any(|(p, _)| p == pid)).then_some(())
        });
        if gone.is_err() {
            problems.push(format!("shim pid {pid} still runs after the fault"));
        }
    }
    if interrupts_the_command(case.phase) && o.status.success() {
        problems.push(format!(
            "step {target:?} succeeded although the shim died in it: {}",
            text(&o)
        ));
    }
    if !interrupts_the_command(case.phase) && !o.status.success() {
        problems.push(format!(
            "step {target:?} failed although the shim died only in Shutdown: {}",
            text(&o)
        ));
    }
    // containerd's own cleanup (shim delete after the dead shim).
    if let Err(e) = env.assert_clean(CLEAN) {
        problems.push(format!("after containerd's cleanup: {e:#}"));
    }
    for c in ids {
        env.remove(c);
    }
    if let Err(e) = env.assert_clean(CLEAN) {
        problems.push(format!("after removing the containers: {e:#}"));
    }
    let left = env.sandbox_dir(sandbox);
    if left.exists() {
        problems.push(format!("sandbox state {} remains", left.display()));
    }
    let containers = env.ctr_ok(&["container", "ls", "-q"]).unwrap_or_default();
    if !containers.trim().is_empty() {
        problems.push(format!("containers remain: {containers}"));
    }
    for d in &disks {
        if let Err(e) = check_disk(d) {
            problems.push(format!("{e:#}"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("{}", problems.join("\n  "))
    }
}

#[test]
fn crash_matrix() -> Result<()> {
    let cases = cases()?;
    // Every phase must map to a step before any VM boots.
    for c in &cases {
        step_of(c.phase, c.shape)?;
    }
    let total = Instant::now();
    let mut failed = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let t = Instant::now();
        let r = run_case(case);
        let secs = t.elapsed().as_secs_f64();
        match &r {
            Ok(()) => eprintln!(
                "crash matrix [{}/{}] {}: clean ({secs:.1} s)",
                i + 1,
                cases.len(),
                case.name()
            ),
            Err(e) => {
                eprintln!(
                    "crash matrix [{}/{}] {}: FAILED ({secs:.1} s)\n  {e:#}",
                    i + 1,
                    cases.len(),
                    case.name()
                );
                failed.push(format!("{}: {e:#}", case.name()));
            }
        }
    }
    let secs = total.elapsed().as_secs_f64();
    if failed.is_empty() {
        eprintln!(
            "crash matrix: {} cases, all clean ({secs:.0} s, {:.1} s per case)",
            cases.len(),
            secs / cases.len() as f64
        );
        Ok(())
    } else {
        bail!(
            "crash matrix: {} of {} cases failed:\n{}",
            failed.len(),
            cases.len(),
            failed.join("\n")
        )
    }
}
