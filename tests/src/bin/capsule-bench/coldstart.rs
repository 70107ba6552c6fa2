//! Figure 1, sandbox cold start: capsule vs bare QEMU vs runc.
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use capsule_tests::{Env, IMAGE, RUNTIME};

use crate::bare::{BareLaunch, READY};
use crate::host::{ctr, timed, timed_ok};
use crate::phases::Run;
use crate::report::Figure;
use crate::stats::Series;

const T: Duration = Duration::from_secs(300);

const METHOD: &str = "A **capsule**: wall time of `ctr run --rm --runtime io.containerd.capsule.v2 IMAGE id true` (the shim as `make install` ships it: shim/build-dist.sh, static, size-optimised): containerd, the shim, virtiofsd, QEMU boot, agent, container start, `true`, teardown.\n\
B **bare QEMU**: wall time from spawning QEMU to its exit, with capsule's own QEMU command line for the same configuration (the shim's `vm_config` through the hypervisor's `build_argv`: same machine, accel, memory, vCPUs, kernel, initramfs and kernel command line, without the virtio-fs share) plus `capsule.bench=ready-poweroff`: the agent does its normal early init (mounts, console, modules, cgroups, loopback), writes `capsule-bench: ready` on the console and powers off. The ready line is checked after every run.\n\
C **runc**: wall time of `ctr run --rm IMAGE id true` with containerd's default runtime (io.containerd.runc.v2).\n\
Order per round: A, B, C; one untimed warm-up of each first.";

fn capsule(env: &Env, id: &str) -> Result<(f64, Run)> {
    let cmd = ctr(
        env,
        &["run", "--rm", "--runtime", RUNTIME, IMAGE, id, "true"],
    );
    let start = SystemTime::now();
    let took = timed_ok(cmd, T)?.as_secs_f64() * 1e3;
    let run = Run {
        id: id.to_string(),
        start,
        end: SystemTime::now(),
    };
    Ok((took, run))
}

fn runc(env: &Env, id: &str) -> Result<f64> {
    let cmd = ctr(env, &["run", "--rm", IMAGE, id, "true"]);
    Ok(timed_ok(cmd, T)?.as_secs_f64() * 1e3)
}

fn bare(launch: &BareLaunch) -> Result<f64> {
    let (took, out) = timed(launch.command(), T)?;
    let console = launch.console();
    if !out.status.success() || !console.lines().any(|l| l.trim_end() == READY) {
        bail!(
            "bare QEMU boot failed ({}): {}\nconsole:\n{console}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(took.as_secs_f64() * 1e3)
}

/// Figure 1 and its split, figure 1b.
pub fn run(env: &Env, rounds: usize) -> Result<Vec<Figure>> {
    let dir = env.dir.path().join("bare-boot");
    let launch = BareLaunch::new(env, &dir, "ready-poweroff")?;
    eprintln!(
        "bare QEMU: {} {}",
        launch.qemu.display(),
        launch.args.join(" ")
    );
    let (mut a, mut b, mut c) = (
        Series::new("capsule ctr run --rm"),
        Series::new("bare QEMU boot"),
        Series::new("runc ctr run --rm"),
    );
    capsule(env, "cs-warm")?;
    bare(&launch)?;
    runc(env, "rc-warm")?;
    let mut runs = Vec::new();
    for r in 0..rounds {
        let (took, run) = capsule(env, &format!("cs-{r}"))?;
        a.samples.push(took);
        runs.push(run);
        b.samples.push(bare(&launch)?);
        c.samples.push(runc(env, &format!("rc-{r}"))?);
        eprintln!(
            "cold start round {r}: capsule {:.0} ms, bare {:.0} ms, runc {:.0} ms",
            a.samples[r], b.samples[r], c.samples[r]
        );
    }
    env.assert_clean(Duration::from_secs(60))?;
    let mut f = Figure::new("coldstart", "1. Sandbox cold start", "ms", METHOD);
    f.series = vec![a, b, c];
    f.ratio(
        "capsule / bare QEMU",
        "capsule ctr run --rm",
        "bare QEMU boot",
        Some(1.10),
        "the shim's overhead over booting the same VM",
    );
    f.ratio(
        "capsule / runc",
        "capsule ctr run --rm",
        "runc ctr run --rm",
        Some(12.0),
        "the price of isolation, for users",
    );
    let log = std::fs::read_to_string(env.dir.path().join("containerd.log"))
        .context("reading containerd's log for figure 1b")?;
    let phases = crate::phases::figure(&log, &runs)?;
    Ok(vec![f, phases])
}
