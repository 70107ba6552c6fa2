//! Figure 3, memory: the shim's RSS against containerd-shim-runc-v2's, and the
//! per-sandbox host memory (PSS of QEMU, virtiofsd, shim), split by kind.
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use capsule_tests::{processes, Env, IMAGE, RUNTIME};

use crate::host::{pss_mib, pss_split_tree, rss_mib};
use crate::report::Figure;
use crate::stats::{Ratio, Series};

/// Time a started container is left before its memory is read.
pub const SETTLE: Duration = Duration::from_secs(10);

/// The most host memory (PSS, MiB) one sandbox with one idle container may
/// take.
pub const BUDGET_MIB: f64 = 64.0;

const METHOD_RSS: &str = "VmRSS (/proc/PID/status) of the shim serving one running container (`sleep`), read 10 s after `ctr run -d` returned: capsule's `containerd-shim-capsule-v2` as `make install` ships it (shim/build-dist.sh: static glibc, fat LTO, opt-level s) serving one sandbox, against `containerd-shim-runc-v2` serving one container. Order per round: capsule, runc; each removed before the next.";

const METHOD_PSS: &str = "PSS (/proc/PID/smaps_rollup) of the processes serving the capsule sandbox of figure 3 (one idle `sleep` container, 256 MiB guest), same moment, 10 s after start: QEMU (and any children), virtiofsd (and its children), the shim. Shared pages are split among their users, so the sum is the sandbox's share of host memory. Split: *guest RAM* is the shared-memory PSS (the memfd backing guest RAM, mapped by QEMU and virtiofsd), *QEMU anon* QEMU's private anonymous memory (heap, TCG's translation cache), *QEMU files* its binary and libraries, *virtiofsd* and *shim* the rest of each.";

/// Host memory (PSS, MiB) of one capsule sandbox, by where it goes.
#[derive(Debug, Clone, Copy)]
pub struct SandboxMemory {
    pub guest_ram: f64,
    pub qemu_anon: f64,
    pub qemu_files: f64,
    pub virtiofsd: f64,
    pub shim: f64,
}

impl SandboxMemory {
    pub fn total(&self) -> f64 {
        self.guest_ram + self.qemu_anon + self.qemu_files + self.virtiofsd + self.shim
    }
}

/// The host memory of sandbox `sandbox` (its processes from sandbox.json).
pub fn sandbox_memory(env: &Env, sandbox: &str) -> Result<SandboxMemory> {
    let rec = env
        .sandbox_record(sandbox)
        .ok_or_else(|| anyhow!("no sandbox.json for {sandbox}"))?;
    let pid = |k: &str| {
        rec[k]["pid"]
            .as_u64()
            .map(|p| p as u32)
            .ok_or_else(|| anyhow!("sandbox.json of {sandbox}: no {k}.pid"))
    };
    let qemu = pss_split_tree(pid("qemu")?)?;
    let vfs = pss_split_tree(pid("virtiofsd")?)?;
    Ok(SandboxMemory {
        guest_ram: qemu.shmem + vfs.shmem,
        qemu_anon: qemu.anon,
        qemu_files: qemu.file,
        virtiofsd: vfs.anon + vfs.file,
        shim: pss_mib(pid("shim")?)?,
    })
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
    let mut ram = Series::new("guest RAM");
    let mut anon = Series::new("QEMU anon");
    let mut files = Series::new("QEMU files");
    let mut vfs = Series::new("virtiofsd");
    let mut shim = Series::new("shim");
    let mut total = Series::new("sandbox total");
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
        let m = sandbox_memory(env, &id)?;
        ram.samples.push(m.guest_ram);
        anon.samples.push(m.qemu_anon);
        files.samples.push(m.qemu_files);
        vfs.samples.push(m.virtiofsd);
        shim.samples.push(m.shim);
        total.samples.push(m.total());
        env.remove(&id);

        let id = format!("mem-r-{r}");
        env.ctr_ok(&["run", "-d", IMAGE, &id, "sleep", "1000000"])?;
        std::thread::sleep(SETTLE);
        let pid = runc_shim(env, &id)?;
        runc.samples.push(rss_mib(pid).context("runc shim")?);
        env.remove(&id);
        eprintln!(
            "memory round {r}: shim RSS capsule {:.1} MiB, runc {:.1} MiB; sandbox PSS {:.1} MiB = guest RAM {:.1} + QEMU anon {:.1} + QEMU files {:.1} + virtiofsd {:.1} + shim {:.1}",
            cap.samples[r], runc.samples[r], m.total(), m.guest_ram, m.qemu_anon, m.qemu_files, m.virtiofsd, m.shim
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
        "sandbox PSS / 64 MiB budget",
        total.median(),
        BUDGET_MIB,
        Some(1.0),
        "QEMU + virtiofsd + shim, one idle container, 10 s after start",
    ));
    p.ratios.push(Ratio::new(
        "shim share of the sandbox's PSS",
        shim.median(),
        total.median(),
        None,
        "capsule shim PSS / (QEMU + virtiofsd + shim)",
    ));
    p.series = vec![ram, anon, files, vfs, shim, total];
    Ok(vec![f, p])
}
