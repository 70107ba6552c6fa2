//! Figure 1b, where capsule's cold start goes: each timed `ctr run --rm`
//! of figure 1 split at the shim's own log lines (logrus `time=` stamps,
//! copied by containerd into its log) and at the wall clock around `ctr`.
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

use crate::report::Figure;
use crate::stats::Series;

/// One timed run: the container id and the wall clock around `ctr`.
pub struct Run {
    pub id: String,
    pub start: SystemTime,
    pub end: SystemTime,
}

/// The shim's log lines that bound the phases, in order.
const MARKS: [&str; 4] = [
    "msg=\"create\"",
    "msg=\"QEMU is up; waiting for the guest agent\"",
    "msg=\"sandbox ready\"",
    "msg=\"exited\"",
];

/// The phases, each between two marks (the first from `ctr`'s start, the
/// last to `ctr`'s return).
const PHASES: [&str; 5] = [
    "ctr and containerd to the shim's Create",
    "Create to QEMU up: state, virtiofsd, QEMU spawn, QMP",
    "QEMU up to sandbox ready: guest boot, agent, virtio-fs mount",
    "sandbox ready to exited: container create, start, `true`",
    "exited to ctr's return: delete, VM stop, teardown",
];

const METHOD: &str = "The timed `ctr run --rm … true` runs of figure 1 (A), each split at the shim's own log lines (their logrus `time=` stamps, which containerd copies into its log): `create` (the shim's Create arrives), `QEMU is up; waiting for the guest agent` (virtiofsd and QEMU are running, QMP is connected), `sandbox ready` (the agent answered and mounted the virtio-fs share) and `exited` (`true` has exited and the shim has its status); the first phase starts when the bench spawns `ctr`, the last ends when `ctr` returns. The third phase is what figure 1's bare floor (B) measures without capsule.";

/// Seconds since the epoch of an RFC 3339 UTC stamp as the shim writes it
/// (`2026-12-07T11:00:00.123456789Z`).
fn parse_stamp(s: &str) -> Option<f64> {
    let (date, time) = s.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (hh, mm) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let ss: f64 = t.next()?.parse().ok()?;
    // Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hh * 3600 + mm * 60) as f64 + ss)
}

fn stamp_of(line: &str) -> Option<f64> {
    let rest = line.split_once("time=\"")?.1;
    parse_stamp(rest.split_once('"')?.0)
}

fn secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The phase durations (ms) of `run` in the log's `lines`: the marks after
/// the shim's `create` of `run.id`, each the first of its kind.
fn split(lines: &[&str], run: &Run) -> Result<[f64; 5]> {
    let create = format!("id={}", run.id);
    let first = lines
        .iter()
        .position(|l| l.contains(MARKS[0]) && l.split_whitespace().any(|w| w == create))
        .with_context(|| format!("{}: no shim `create` line in containerd's log", run.id))?;
    let mut at = [0.0; 4];
    let mut from = first;
    for (i, mark) in MARKS.iter().enumerate() {
        let n = lines[from..]
            .iter()
            .position(|l| l.contains(mark))
            .with_context(|| format!("{}: no shim line {mark} after its create", run.id))?;
        from += n;
        at[i] = stamp_of(lines[from])
            .with_context(|| format!("{}: no time stamp in {:?}", run.id, lines[from]))?;
    }
    let (t0, t1) = (secs(run.start), secs(run.end));
    let bounds = [t0, at[0], at[1], at[2], at[3], t1];
    let mut phases = [0.0; 5];
    for i in 0..5 {
        phases[i] = (bounds[i + 1] - bounds[i]) * 1e3;
        if phases[i] < 0.0 {
            bail!(
                "{}: phase {:?} is negative ({:.1} ms): clocks disagree",
                run.id,
                PHASES[i],
                phases[i]
            );
        }
    }
    Ok(phases)
}

/// Figure 1b from the runs of figure 1 and containerd's log.
pub fn figure(log: &str, runs: &[Run]) -> Result<Figure> {
    let lines: Vec<&str> = log.lines().collect();
    let mut series: Vec<Series> = PHASES.iter().map(|p| Series::new(*p)).collect();
    for run in runs {
        let phases = split(&lines, run)?;
        eprintln!(
            "cold start {}: {}",
            run.id,
            phases
                .iter()
                .map(|p| format!("{p:.0}"))
                .collect::<Vec<_>>()
                .join(" + ")
        );
        for (s, p) in series.iter_mut().zip(phases) {
            s.samples.push(p);
        }
    }
    let mut f = Figure::new(
        "coldstart-phases",
        "1b. Where capsule's cold start goes",
        "ms",
        METHOD,
    );
    f.series = series;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stamps_parse_as_the_shim_writes_them() {
        let t = UNIX_EPOCH + Duration::new(1_709_251_199, 500_000_000);
        let s = capsule_shim::logging::rfc3339(t);
        assert_eq!(parse_stamp(&s), Some(1_709_251_199.5));
        assert_eq!(parse_stamp("2026-13-01"), None);
        assert_eq!(parse_stamp("garbage"), None);
    }

    #[test]
    fn a_run_splits_at_its_own_marks() -> Result<()> {
        let at = |s: f64| capsule_shim::logging::rfc3339(UNIX_EPOCH + Duration::from_secs_f64(s));
        let log = format!(
            "time=\"{}\" level=info msg=\"create\" id=other\n\
             time=\"{}\" level=info msg=\"create\" id=cs-1 bundle=/b\n\
             time=\"{}\" level=info msg=\"QEMU is up; waiting for the guest agent\" pid=7\n\
             time=\"{}\" level=info msg=\"sandbox ready\" sandbox=cs-1\n\
             time=\"{}\" level=info msg=\"exited\" process=cs-1 status=0\n",
            at(99.0),
            at(100.1),
            at(100.3),
            at(101.3),
            at(101.8)
        );
        let run = Run {
            id: "cs-1".into(),
            start: UNIX_EPOCH + Duration::from_secs(100),
            end: UNIX_EPOCH + Duration::from_secs_f64(102.0),
        };
        let lines: Vec<&str> = log.lines().collect();
        let p = split(&lines, &run)?;
        let want = [100.0, 200.0, 1000.0, 500.0, 200.0];
        for (got, want) in p.iter().zip(want) {
            assert!((got - want).abs() < 1e-3, "{p:?}");
        }
        let missing = Run {
            id: "cs-2".into(),
            ..run
        };
        match split(&lines, &missing) {
            Ok(p) => panic!("a run with no create line was split: {p:?}"),
            Err(e) => assert!(e.to_string().contains("cs-2"), "{e}"),
        }
        Ok(())
    }
}
