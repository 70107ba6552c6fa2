//! Hand-written SVG strip plots: one row per series, a dot per sample, a
//! bar from min to max and a tick at the median.
use std::fmt::Write;

use crate::report::Figure;
use crate::stats::Summary;

const W: f64 = 820.0;
const LEFT: f64 = 260.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 48.0;
const ROW: f64 = 30.0;
const BOTTOM: f64 = 46.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" step (1, 2 or 5 × 10^k) giving about `n` ticks over `span`.
fn nice_step(span: f64, n: f64) -> f64 {
    let raw = (span / n).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let m = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

fn fmt_num(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// The x-axis: maps a value to a pixel, and its ticks.
struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
}

impl Axis {
    fn new(values: &[f64], log: bool) -> Self {
        let pos: Vec<f64> = values
            .iter()
            .copied()
            .filter(|v| v.is_finite() && (!log || *v > 0.0))
            .collect();
        let max = pos.iter().copied().fold(f64::MIN, f64::max);
        let min = pos.iter().copied().fold(f64::MAX, f64::min);
        if pos.is_empty() {
            return Self {
                lo: 0.0,
                hi: 1.0,
                log: false,
            };
        }
        if log {
            let lo = 10f64.powf(min.log10().floor());
            let hi = 10f64.powf(max.log10().ceil().max(lo.log10() + 1.0));
            return Self { lo, hi, log };
        }
        let lo = min.min(0.0);
        let step = nice_step((max - lo).max(1e-9), 5.0);
        let hi = (max / step).ceil() * step;
        Self {
            lo,
            hi: if hi > lo { hi } else { lo + 1.0 },
            log,
        }
    }

    fn x(&self, v: f64) -> f64 {
        let f = if self.log {
            (v.max(self.lo).log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        };
        LEFT + f.clamp(0.0, 1.0) * (W - LEFT - RIGHT)
    }

    fn ticks(&self) -> Vec<f64> {
        if self.log {
            let (a, b) = (self.lo.log10() as i32, self.hi.log10() as i32);
            return (a..=b).map(|e| 10f64.powi(e)).collect();
        }
        let step = nice_step(self.hi - self.lo, 5.0);
        let mut v = Vec::new();
        let mut t = (self.lo / step).ceil() * step;
        while t <= self.hi + step * 1e-6 && v.len() < 50 {
            v.push(t);
            t += step;
        }
        v
    }
}

/// The figure's samples as an SVG document (log x-axis when `log`).
pub fn strip_plot(fig: &Figure, log: bool) -> String {
    let all: Vec<f64> = fig
        .series
        .iter()
        .flat_map(|s| s.samples.iter().copied())
        .collect();
    let axis = Axis::new(&all, log);
    let h = TOP + ROW * fig.series.len() as f64 + BOTTOM;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="22" font-size="15" font-weight="bold">{}</text>"#,
        esc(&fig.title)
    );
    let _ = writeln!(
        s,
        r##"<text x="10" y="38" font-size="11" fill="#555">dots: samples; grey bar: min to max; red tick: median</text>"##
    );
    let bottom = TOP + ROW * fig.series.len() as f64;
    for t in axis.ticks() {
        let x = axis.x(t);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{bottom}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" fill="#444">{}</text>"##,
            bottom + 16.0,
            fmt_num(t)
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#444">{}{}</text>"##,
        (LEFT + W - RIGHT) / 2.0,
        bottom + 36.0,
        esc(&fig.unit),
        if log { " (log scale)" } else { "" }
    );
    for (i, series) in fig.series.iter().enumerate() {
        let y = TOP + ROW * i as f64 + ROW / 2.0;
        let sm = Summary::of(&series.samples);
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 8.0,
            y + 4.0,
            esc(&series.name)
        );
        if sm.n == 0 {
            continue;
        }
        let (x0, x1, xm) = (axis.x(sm.min), axis.x(sm.max), axis.x(sm.median));
        let _ = writeln!(
            s,
            r##"<line x1="{x0:.1}" y1="{y:.1}" x2="{x1:.1}" y2="{y:.1}" stroke="#999" stroke-width="2"/><line x1="{xm:.1}" y1="{:.1}" x2="{xm:.1}" y2="{:.1}" stroke="#c00" stroke-width="3"/>"##,
            y - 10.0,
            y + 10.0
        );
        for v in &series.samples {
            let _ = writeln!(
                s,
                r##"<circle cx="{:.1}" cy="{y:.1}" r="3.5" fill="#1f77b4" fill-opacity="0.6"/>"##,
                axis.x(*v)
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_and_ticks() {
        assert_eq!(nice_step(100.0, 5.0), 20.0);
        let a = Axis::new(&[3.0, 97.0], false);
        assert_eq!((a.lo, a.hi), (0.0, 100.0));
        assert_eq!(a.x(0.0), LEFT);
        let l = Axis::new(&[50.0, 20000.0], true);
        assert_eq!((l.lo, l.hi), (10.0, 100000.0));
        assert_eq!(l.ticks().len(), 5);
    }
}
