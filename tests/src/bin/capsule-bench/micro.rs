//! Figure 5, devmgr micro-benchmarks: criterion's raw samples
//! (`target/criterion/**/new/{benchmark,sample}.json`) of
//! `cargo bench -p capsule-devmgr --bench devmgr`, run by scripts/bench.sh.
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::report::Figure;
use crate::stats::{Ratio, Series};

const METHOD: &str = "`cargo bench -p capsule-devmgr --bench devmgr` (criterion; see devmgr/benches/devmgr.rs): `lifecycle/N` is new + attach + detach + remove of one device with N devices attached, `state_write/100` one persisted state write of a sandbox with 100 devices, `encode/100` its serialisation alone. Each sample is one criterion measurement (time / iterations); median, min and max are over criterion's samples.";

/// `new` result directories under `root`.
fn results(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n == "new") {
                    out.push(p);
                } else {
                    stack.push(p);
                }
            }
        }
    }
    out.sort();
    out
}

fn read(p: &Path) -> Result<Value> {
    let b = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
    Ok(serde_json::from_slice(&b)?)
}

/// One benchmark's id and per-iteration times (µs).
fn series(dir: &Path) -> Result<(Value, Series)> {
    let bench = read(&dir.join("benchmark.json"))?;
    let sample = read(&dir.join("sample.json"))?;
    let name = bench["full_id"].as_str().unwrap_or("?").to_string();
    let (Some(iters), Some(times)) = (sample["iters"].as_array(), sample["times"].as_array())
    else {
        bail!("{}: no iters/times", dir.display());
    };
    let mut s = Series::new(name);
    for (i, t) in iters.iter().zip(times) {
        if let (Some(i), Some(t)) = (i.as_f64(), t.as_f64()) {
            if i > 0.0 {
                s.samples.push(t / i / 1e3);
            }
        }
    }
    Ok((bench, s))
}

/// The figure, from results written after `since` (all results when None).
pub fn run(criterion: &Path, since: Option<SystemTime>) -> Result<Option<Figure>> {
    let mut found: Vec<(Value, Series)> = Vec::new();
    for dir in results(criterion) {
        let fresh = std::fs::metadata(dir.join("sample.json"))
            .and_then(|m| m.modified())
            .is_ok_and(|m| since.is_none_or(|s| m >= s));
        if fresh {
            found.push(series(&dir)?);
        }
    }
    if found.is_empty() {
        if since.is_some() {
            bail!(
                "no criterion results under {} from this run",
                criterion.display()
            );
        }
        return Ok(None);
    }
    found.sort_by(|a, b| a.1.name.cmp(&b.1.name));
    let mut f = Figure::new(
        "devmgr",
        "5. devmgr micro-benchmarks",
        "µs per operation",
        METHOD,
    );
    f.log = true;
    // lifecycle/N: the growth from the smallest to the largest N.
    let mut life: Vec<(u64, f64)> = found
        .iter()
        .filter(|(b, _)| b["group_id"] == "lifecycle")
        .filter_map(|(b, s)| Some((b["value_str"].as_str()?.parse().ok()?, s.median())))
        .collect();
    life.sort_by_key(|(n, _)| *n);
    if let (Some(a), Some(b)) = (life.first(), life.last()) {
        if a.0 != b.0 {
            f.ratios.push(Ratio::new(
                &format!("lifecycle/{} / lifecycle/{}", b.0, a.0),
                b.1,
                a.1,
                None,
                "per-operation cost growth with the number of attached devices",
            ));
        }
    }
    f.series = found.into_iter().map(|(_, s)| s).collect();
    if since.is_none() {
        f.method
            .push_str("\n\n(Results of an earlier criterion run: this report was not written by scripts/bench.sh.)");
    }
    Ok(Some(f))
}
