//! The report: figures (series + ratios) as report.json, report.md and one
//! SVG per figure.
use std::fmt::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::stats::{Ratio, Series};

/// One figure of the report.
#[derive(Debug, Clone)]
pub struct Figure {
    /// File stem of its SVG, key in the JSON.
    pub id: String,
    pub title: String,
    pub unit: String,
    /// What exactly is timed or measured (markdown).
    pub method: String,
    pub series: Vec<Series>,
    pub ratios: Vec<Ratio>,
    /// Plot on a log axis (values spanning decades).
    pub log: bool,
}

impl Figure {
    pub fn new(id: &str, title: &str, unit: &str, method: &str) -> Self {
        Self {
            id: id.into(),
            title: title.into(),
            unit: unit.into(),
            method: method.into(),
            series: Vec::new(),
            ratios: Vec::new(),
            log: false,
        }
    }

    /// The median of series `name` (NaN when absent).
    pub fn median(&self, name: &str) -> f64 {
        self.series
            .iter()
            .find(|s| s.name == name)
            .map(Series::median)
            .unwrap_or(f64::NAN)
    }

    /// Adds the ratio of the medians of series `num` and `den`.
    pub fn ratio(&mut self, name: &str, num: &str, den: &str, target: Option<f64>, note: &str) {
        let r = Ratio::new(name, self.median(num), self.median(den), target, note);
        self.ratios.push(r);
    }

    /// Adds the ratio of the medians of `num` and `den`, which must be at
    /// least `target_min`.
    pub fn ratio_at_least(
        &mut self,
        name: &str,
        num: &str,
        den: &str,
        target_min: f64,
        note: &str,
    ) {
        let r = Ratio::at_least(name, self.median(num), self.median(den), target_min, note);
        self.ratios.push(r);
    }

    fn to_json(&self) -> Value {
        json!({"id": self.id, "title": self.title, "unit": self.unit, "method": self.method,
               "svg": format!("{}.svg", self.id),
               "series": self.series.iter().map(Series::to_json).collect::<Vec<_>>(),
               "ratios": self.ratios.iter().map(Ratio::to_json).collect::<Vec<_>>()})
    }
}

pub struct Report {
    /// (fact, value): cores, accel, kernel, QEMU version, date...
    pub machine: Vec<(String, String)>,
    pub rounds: usize,
    pub figures: Vec<Figure>,
    pub wall_secs: f64,
}

fn num(v: f64) -> String {
    if !v.is_finite() {
        "n/a".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

impl Report {
    pub fn to_json(&self) -> Value {
        let targets: Vec<Value> = self
            .figures
            .iter()
            .flat_map(|f| {
                f.ratios.iter().filter(|r| r.met().is_some()).map(|r| {
                    json!({"figure": f.id, "ratio": r.name, "value": r.value,
                           "target_max": r.target_max, "target_min": r.target_min,
                           "met": r.met()})
                })
            })
            .collect();
        let machine: serde_json::Map<String, Value> = self
            .machine
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        json!({"machine": machine, "rounds": self.rounds, "wall_secs": self.wall_secs,
               "targets": targets,
               "figures": self.figures.iter().map(Figure::to_json).collect::<Vec<_>>()})
    }

    pub fn to_markdown(&self) -> String {
        let mut s = String::from("# capsule benchmark report\n\n");
        let _ = writeln!(
            s,
            "Each figure is the median of {} rounds (min and max beside it); every comparison was measured in the same run, interleaved A B A B. The bench program ran for {:.0} s.\n",
            self.rounds, self.wall_secs
        );
        s.push_str("## Machine\n\n| | |\n|---|---|\n");
        for (k, v) in &self.machine {
            let _ = writeln!(s, "| {k} | {v} |");
        }
        s.push_str("\n## Headline\n\n| figure | ratio | value | target | verdict |\n|---|---|---|---|---|\n");
        for f in &self.figures {
            for r in &f.ratios {
                let target = match (r.target_max, r.target_min) {
                    (Some(t), _) => format!("≤ {t}"),
                    (None, Some(t)) => format!("≥ {t}"),
                    (None, None) => String::new(),
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} |",
                    f.title,
                    r.name,
                    num(r.value),
                    target,
                    r.verdict()
                );
            }
        }
        for f in &self.figures {
            let _ = writeln!(s, "\n## {}\n", f.title);
            let lines: Vec<&str> = f.method.lines().filter(|l| !l.trim().is_empty()).collect();
            for l in &lines {
                let bullet = if lines.len() > 1 { "- " } else { "" };
                let _ = writeln!(s, "{bullet}{l}");
            }
            s.push('\n');
            let _ = writeln!(
                s,
                "| series | median ({u}) | min | max | n |\n|---|---|---|---|---|",
                u = f.unit
            );
            for series in &f.series {
                let m = series.summary();
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} |",
                    series.name,
                    num(m.median),
                    num(m.min),
                    num(m.max),
                    m.n
                );
            }
            if !f.ratios.is_empty() {
                s.push_str(
                    "\n| ratio | value | target | verdict | meaning |\n|---|---|---|---|---|\n",
                );
                for r in &f.ratios {
                    let target = match (r.target_max, r.target_min) {
                        (Some(t), _) => format!("≤ {t}"),
                        (None, Some(t)) => format!("≥ {t}"),
                        (None, None) => String::new(),
                    };
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} | {} | {} |",
                        r.name,
                        num(r.value),
                        target,
                        r.verdict(),
                        r.note
                    );
                }
            }
            let _ = writeln!(s, "\n![{}]({}.svg)", f.title, f.id);
        }
        s
    }

    /// Writes report.json, report.md and the SVGs into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for f in &self.figures {
            let p = dir.join(format!("{}.svg", f.id));
            std::fs::write(&p, crate::svg::strip_plot(f, f.log))
                .with_context(|| format!("writing {}", p.display()))?;
        }
        std::fs::write(
            dir.join("report.json"),
            serde_json::to_string_pretty(&self.to_json())?,
        )?;
        std::fs::write(dir.join("report.md"), self.to_markdown())?;
        Ok(())
    }
}
