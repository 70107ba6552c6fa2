//! Figure 4, density: 1, 2, 4 and 8 sandboxes started concurrently.
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use capsule_tests::{Env, IMAGE, RUNTIME};

use crate::host::{ctr, timed_ok};
use crate::memory::{sandbox_memory, BUDGET_MIB, SETTLE};
use crate::report::Figure;
use crate::stats::{Ratio, Series};

pub const COUNTS: [usize; 4] = [1, 2, 4, 8];

const METHOD_START: &str = "N `ctr run -d --runtime io.containerd.capsule.v2 IMAGE id sleep 1000000` started at once (one thread each); timed from the first spawn until the last `ctr run -d` returned (the task is started then; every task is checked RUNNING afterwards, untimed). Order per round: N = 1, 2, 4, 8; all removed and the host checked clean between.";

const METHOD_MEM: &str = "Sum over the N sandboxes of the PSS of QEMU, virtiofsd and the shim, read 10 s after they all started.";

/// Starts `n` sandboxes at once; returns (ms until all started, total PSS MiB).
fn sample(env: &Env, tag: &str, n: usize) -> Result<(f64, f64)> {
    let ids: Vec<String> = (0..n).map(|i| format!("dn-{tag}-{i}")).collect();
    let t0 = Instant::now();
    let results: Vec<Result<Duration>> = std::thread::scope(|s| {
        let hs: Vec<_> = ids
            .iter()
            .map(|id| {
                let cmd = ctr(
                    env,
                    &[
                        "run",
                        "-d",
                        "--runtime",
                        RUNTIME,
                        IMAGE,
                        id,
                        "sleep",
                        "1000000",
                    ],
                );
                s.spawn(move || timed_ok(cmd, Duration::from_secs(300)))
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("starter thread panicked"))?)
            .collect()
    });
    let took = t0.elapsed();
    let check = (|| {
        for r in results {
            r?;
        }
        for id in &ids {
            let st = env.task_status(id);
            if st.as_deref() != Some("RUNNING") {
                bail!("{id} is {st:?}, not RUNNING");
            }
        }
        std::thread::sleep(SETTLE);
        let mut pss = 0.0;
        for id in &ids {
            pss += sandbox_memory(env, id)?.total();
        }
        Ok(pss)
    })();
    for id in &ids {
        env.remove(id);
    }
    env.assert_clean(Duration::from_secs(60))?;
    Ok((took.as_secs_f64() * 1e3, check?))
}

pub fn run(env: &Env, rounds: usize) -> Result<Vec<Figure>> {
    let mut start: Vec<Series> = COUNTS
        .iter()
        .map(|n| Series::new(format!("{n} concurrent")))
        .collect();
    let mut mem: Vec<Series> = COUNTS
        .iter()
        .map(|n| Series::new(format!("{n} sandboxes")))
        .collect();
    for r in 0..rounds {
        for (k, &n) in COUNTS.iter().enumerate() {
            let (t, m) = sample(env, &format!("{r}-{n}"), n)?;
            start[k].samples.push(t);
            mem[k].samples.push(m);
            eprintln!("density round {r} N={n}: all started in {t:.0} ms, PSS {m:.1} MiB");
        }
    }
    let mut fs = Figure::new(
        "density-start",
        "4. Density: start time",
        "ms",
        METHOD_START,
    );
    let mut fm = Figure::new(
        "density-memory",
        "4b. Density: host memory (PSS)",
        "MiB",
        METHOD_MEM,
    );
    let (t1, m1) = (start[0].median(), mem[0].median());
    for (k, &n) in COUNTS.iter().enumerate().skip(1) {
        fs.ratios.push(Ratio::new(
            &format!("start time, {n} / 1 concurrent"),
            start[k].median(),
            t1,
            None,
            "1.0 would be perfect parallelism",
        ));
        fm.ratios.push(Ratio::new(
            &format!("PSS of {n} / ({n} × PSS of 1)"),
            mem[k].median(),
            n as f64 * m1,
            None,
            "below 1.0: sandboxes share pages",
        ));
    }
    let last = COUNTS.len() - 1;
    let n = COUNTS[last];
    fm.ratios.push(Ratio::new(
        &format!("per-sandbox PSS at {n} / 64 MiB budget"),
        mem[last].median() / n as f64,
        BUDGET_MIB,
        Some(1.0),
        "total PSS of N sandboxes / N",
    ));
    fs.series = start;
    fm.series = mem;
    Ok(vec![fs, fm])
}
