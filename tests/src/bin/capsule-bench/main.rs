//! `make bench`: capsule against bare QEMU, runc and bare QMP, measured
//! interleaved in one run, written to target/bench/report.{md,json} and one
//! SVG per figure.
//!
//!   CAPSULE_BENCH_ROUNDS=N     rounds per comparison (default 5)
//!   CAPSULE_BENCH_ONLY=a,b     only these scenarios (coldstart, hotplug,
//!                              memory, density, network, devmgr)
//!   CAPSULE_BENCH_CRITERION_SINCE=FILE  devmgr results newer than FILE
//!                              (scripts/bench.sh sets it; without it, any)
//!
//! A missed target is reported as missed; a broken measurement fails.
mod bare;
mod coldstart;
mod density;
mod host;
mod hotplug;
mod memory;
mod micro;
mod network;
mod phases;
mod report;
mod stats;
mod svg;

use std::time::Instant;

use anyhow::{Context, Result};
use capsule_tests::{target_dir, CapsuleOptions, Env};

use report::Report;

fn main() -> Result<()> {
    let t0 = Instant::now();
    let rounds: usize = match std::env::var("CAPSULE_BENCH_ROUNDS") {
        Ok(v) => v.parse().context("CAPSULE_BENCH_ROUNDS")?,
        Err(_) => 5,
    };
    anyhow::ensure!(rounds >= 1, "CAPSULE_BENCH_ROUNDS must be at least 1");
    let only = std::env::var("CAPSULE_BENCH_ONLY").unwrap_or_default();
    let want = |s: &str| only.is_empty() || only.split(',').any(|o| o.trim() == s);
    let since = match std::env::var_os("CAPSULE_BENCH_CRITERION_SINCE") {
        Some(p) => Some(
            std::fs::metadata(&p)
                .and_then(|m| m.modified())
                .with_context(|| format!("CAPSULE_BENCH_CRITERION_SINCE {p:?}"))?,
        ),
        None => None,
    };
    let out = target_dir().join("bench");

    let mut env = Env::start_with(CapsuleOptions {
        release: true,
        ..CapsuleOptions::default()
    })?;
    let probe = bare::BareLaunch::new(&env, &env.dir.path().join("bare-probe"), "ready-poweroff")?;
    let machine = host::machine_facts(&probe.accel, &env.ready.kernel.with_file_name(""));
    let mut figures = Vec::new();
    if want("coldstart") {
        figures.extend(coldstart::run(&env, rounds)?);
    }
    if want("hotplug") {
        let max = hotplug::COUNTS.iter().copied().max().unwrap_or(0);
        let mut loops = Vec::new();
        for i in 0..max {
            loops.push(env.loop_device(&format!("hp{i}"), 16 << 20)?.0);
        }
        figures.extend(hotplug::run(&env, rounds, &loops)?);
    }
    if want("memory") {
        figures.extend(memory::run(&env, rounds)?);
    }
    if want("density") {
        figures.extend(density::run(&env, rounds)?);
    }
    if want("network") {
        figures.extend(network::run(&env, rounds)?);
    }
    if want("devmgr") {
        figures.extend(micro::run(&target_dir().join("criterion"), since)?);
    }
    drop(env);
    let mut machine = machine;
    machine.push(("load average at end".into(), host::load_average()));
    let report = Report {
        machine,
        rounds,
        figures,
        wall_secs: t0.elapsed().as_secs_f64(),
    };
    report.write(&out)?;
    println!(
        "capsule-bench: wrote {}/report.md, report.json and SVGs",
        out.display()
    );
    for f in &report.figures {
        for r in &f.ratios {
            println!("  {:<55} {:>8.3}  {}", r.name, r.value, r.verdict());
        }
    }
    Ok(())
}
