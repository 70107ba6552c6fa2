//! Figure 3, memory: the shim's RSS against containerd-shim-runc-v2's, and the
//! per-sandbox host memory (PSS of QEMU, virtiofsd, shim).
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use capsule_tests::{processes, Env, IMAGE, RUNTIME};

use crate::host::{pss_mib, pss_tree_mib, rss_mib};
use crate::report::Figure;
use crate::stats::{Ratio, Series};

/// Time a started container is left before its memory is read.
pub const SETTLE: Duration = Duration::from_secs(2);

const METHOD_RSS: &str = "VmRSS (/proc/PID/status) of the shim serving one running container (`sleep`), read 2 s after `ctr run -d` returned: capsule's `containerd-shim-capsule-v2` as `make install` ships it (shim/build-dist.sh: static glibc, fat LTO, opt-level s) serving one sandbox, against `containerd-shim-runc-v2` serving one container. Order per round: capsule, runc; each removed before the next.";

const METHOD_PSS: &str = "PSS (/proc/PID/smaps_rollup) of the processes serving the capsule sandbox of figure 3, same moment: QEMU (and any children), virtiofsd (and its children), the shim. Shared pages are split among their users, so the sum is the sandbox's share of host memory.";

/// PSS (MiB) of one capsule sandbox: (QEMU, virtiofsd, shim).
pub fn sandbox_pss(env: &Env, sandbox: &str) -> Result<(f64, f64, f64)> {
    let rec = env
        .sandbox_record(sandbox)
        .ok_or_else(|| anyhow!("no sandbox.json for {sandbox}"))?;
    let pid = |k: &str| {
        rec[k]["pid"]
            .as_u64()
            .map(|p| p as u32)
            .ok_or_else(|| anyhow!("sandbox.json of {sandbox}: no {k}.pid"))
    };
    Ok((
        pss_tree_mib(pid("qemu")?)?,
        pss_tree_mib(pid("virtiofsd")?)?,
        pss_mib(pid("shim")?)?,
    ))
}

/// The containerd-shim-runc-v2 of container `id` in `env`.
fn runc_shim(env: &Env, id: &str) -> Result<u32> {
    let sock = env.sock.display().to_string();
    processes()
        .into_iter()
        .find(|(_, a)| {
            a.first()
                .is_some_and(|a0| a0.ends_with("containerd-shim-runc-v2"))
                && a.iter().any(|x| x == &sock)
                && a.windows(2).any(|w| w[0] == "-id" && w[1] == id)
        })
        .map(|(p, _)| p)
        .ok_or_else(|| anyhow!("no containerd-shim-runc-v2 for {id}"))
}

pub fn run(env: &Env, rounds: usize) -> Result<Vec<Figure>> {
    let mut cap = Series::new("capsule shim VmRSS");
    let mut runc = Series::new("runc shim VmRSS");
    let mut qemu = Series::new("QEMU PSS");
    let mut vfs = Series::new("virtiofsd PSS");
    let mut shim = Series::new("capsule shim PSS");
    let mut total = Series::new("sandbox total PSS");
    for r in 0..rounds {
        let id = format!("mem-c-{r}");
        env.ctr_ok(&[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            IMAGE,
            &id,
            "sleep",
            "1000000",
        ])?;
        std::thread::sleep(SETTLE);
        let pid = env
            .shim_pid(&id)
            .ok_or_else(|| anyhow!("no shim pid for {id}"))?;
        cap.samples.push(rss_mib(pid)?);
        let (q, v, s) = sandbox_pss(env, &id)?;
        qemu.samples.push(q);
        vfs.samples.push(v);
        shim.samples.push(s);
        total.samples.push(q + v + s);
        env.remove(&id);

        let id = format!("mem-r-{r}");
        env.ctr_ok(&["run", "-d", IMAGE, &id, "sleep", "1000000"])?;
        std::thread::sleep(SETTLE);
        let pid = runc_shim(env, &id)?;
        runc.samples.push(rss_mib(pid).context("runc shim")?);
        env.remove(&id);
        eprintln!(
            "memory round {r}: shim RSS capsule {:.1} MiB, runc {:.1} MiB; PSS QEMU {q:.1}, virtiofsd {v:.1}, shim {s:.1}",
            cap.samples[r], runc.samples[r]
        );
    }
    env.assert_clean(Duration::from_secs(60))?;
    let mut f = Figure::new("memory-shim", "3. Shim memory (RSS)", "MiB", METHOD_RSS);
    f.series = vec![cap, runc];
    f.ratio(
        "capsule shim / runc shim (VmRSS)",
        "capsule shim VmRSS",
        "runc shim VmRSS",
        Some(0.5),
        "the shim's own footprint",
    );
    let mut p = Figure::new(
        "memory-sandbox",
        "3b. Per-sandbox host memory (PSS)",
        "MiB",
        METHOD_PSS,
    );
    p.ratios.push(Ratio::new(
        "shim share of the sandbox's PSS",
        shim.median(),
        total.median(),
        None,
        "capsule shim PSS / (QEMU + virtiofsd + shim)",
    ));
    p.series = vec![qemu, vfs, shim, total];
    Ok(vec![f, p])
}
