//! Samples, their summaries (median, min, max) and ratios of medians.
use serde_json::{json, Value};

/// One measured series: every sample, in the order taken.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub samples: Vec<f64>,
}

impl Series {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            samples: Vec::new(),
        }
    }

    pub fn summary(&self) -> Summary {
        Summary::of(&self.samples)
    }

    pub fn median(&self) -> f64 {
        self.summary().median
    }

    pub fn to_json(&self) -> Value {
        let s = self.summary();
        json!({"name": self.name, "samples": self.samples, "median": s.median,
               "min": s.min, "max": s.max, "n": s.n})
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Summary {
    /// NaN everywhere for no samples (reported as such, never invented).
    pub fn of(v: &[f64]) -> Self {
        let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n == 0 {
            return Self {
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
                n,
            };
        }
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Self {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        }
    }
}

/// A ratio of two medians, with its target (an upper or a lower bound) if
/// it has one.
#[derive(Debug, Clone)]
pub struct Ratio {
    pub name: String,
    pub value: f64,
    pub target_max: Option<f64>,
    pub target_min: Option<f64>,
    /// What the ratio means, in a few words.
    pub note: String,
}

impl Ratio {
    pub fn new(name: &str, num: f64, den: f64, target_max: Option<f64>, note: &str) -> Self {
        Self {
            name: name.into(),
            value: num / den,
            target_max,
            target_min: None,
            note: note.into(),
        }
    }

    /// A ratio that must be at least `target_min`.
    pub fn at_least(name: &str, num: f64, den: f64, target_min: f64, note: &str) -> Self {
        Self {
            target_min: Some(target_min),
            ..Self::new(name, num, den, None, note)
        }
    }

    /// `Some(met)` for a ratio with a target; a ratio that is not a
    /// positive number (a noisy difference gone negative) never meets it.
    pub fn met(&self) -> Option<bool> {
        let ok = self.value.is_finite() && self.value > 0.0;
        match (self.target_max, self.target_min) {
            (Some(t), _) => Some(ok && self.value <= t),
            (None, Some(t)) => Some(ok && self.value >= t),
            (None, None) => None,
        }
    }

    pub fn verdict(&self) -> &'static str {
        match self.met() {
            Some(true) => "met",
            Some(false) => "missed",
            None => "(no target)",
        }
    }

    pub fn to_json(&self) -> Value {
        json!({"name": self.name, "value": self.value, "target_max": self.target_max,
               "target_min": self.target_min, "met": self.met(), "note": self.note})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries() {
        let s = Summary::of(&[3.0, 1.0, 2.0, 10.0]);
        assert_eq!((s.median, s.min, s.max, s.n), (2.5, 1.0, 10.0, 4));
        assert_eq!(Summary::of(&[5.0, 1.0, 3.0]).median, 3.0);
        assert!(Summary::of(&[]).median.is_nan());
        let r = Ratio::new("r", 1.1, 1.0, Some(1.15), "");
        assert_eq!(r.met(), Some(true));
        assert_eq!(Ratio::new("r", 1.0, 0.0, Some(2.0), "").met(), Some(false));
        assert_eq!(Ratio::new("r", -1.0, 1.0, Some(2.0), "").met(), Some(false));
    }
}
