//! Machine-readable figures. Every benchmark binary takes `--json <file>`
//! and writes there what it printed: each figure with its unit, the
//! baseline measured in the same run, the ratio, and the design's target
//! when there is one. `scripts/loadtest.sh` assembles `loadtest/RESULTS.md`
//! from these files, so no prose is ever scraped.
//!
//! Format (one document per run):
//!
//! ```json
//! {"bench": "fleet", "command": "fleet --agents 1000", "figures": [
//!   {"name": "...", "value": 1.0, "unit": "events/s", "better": "higher",
//!    "baseline_name": "...", "baseline": 2.0, "ratio": 0.5, "target": "≥ 100k/s"}]}
//! ```

use std::path::Path;

use anyhow::Context as _;
use serde_json::{json, Value};

/// Which way a figure improves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    /// Rates: more is better.
    Higher,
    /// Latencies, sizes: less is better.
    Lower,
}

/// One measured figure and its same-run baseline.
#[derive(Debug, Clone)]
pub struct Figure {
    /// What was measured.
    pub name: String,
    /// The figure.
    pub value: f64,
    /// Its unit (`events/s`, `ms`, `ns`, ...).
    pub unit: String,
    /// Which way it improves.
    pub better: Better,
    /// The baseline's name and value, in the same unit.
    pub baseline: Option<(String, f64)>,
    /// The design's target, as written there.
    pub target: Option<String>,
}

impl Figure {
    /// A figure that is better when higher (a rate).
    pub fn higher(name: impl Into<String>, value: f64, unit: impl Into<String>) -> Self {
        Self::new(name, value, unit, Better::Higher)
    }

    /// A figure that is better when lower (a latency).
    pub fn lower(name: impl Into<String>, value: f64, unit: impl Into<String>) -> Self {
        Self::new(name, value, unit, Better::Lower)
    }

    fn new(name: impl Into<String>, value: f64, unit: impl Into<String>, better: Better) -> Self {
        Self {
            name: name.into(),
            value,
            unit: unit.into(),
            better,
            baseline: None,
            target: None,
        }
    }

    /// With the baseline measured in the same run.
    pub fn baseline(mut self, name: impl Into<String>, value: f64) -> Self {
        self.baseline = Some((name.into(), value));
        self
    }

    /// With the design's target.
    pub fn target(mut self, target: impl Into<String>) -> Self {
        self.target = Some(target.into());
        self
    }

    /// Value over baseline, when there is a non-zero baseline.
    pub fn ratio(&self) -> Option<f64> {
        match &self.baseline {
            Some((_, baseline)) if *baseline != 0.0 && baseline.is_finite() => Some(self.value / baseline),
            _ => None,
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "value": finite(self.value),
            "unit": self.unit,
            "better": match self.better { Better::Higher => "higher", Better::Lower => "lower" },
            "baseline_name": self.baseline.as_ref().map(|(name, _)| name.clone()),
            "baseline": self.baseline.as_ref().and_then(|(_, value)| finite(*value)),
            "ratio": self.ratio().and_then(finite),
            "target": self.target,
        })
    }
}

/// JSON has no NaN or infinity: those become null.
fn finite(value: f64) -> Option<f64> {
    value.is_finite().then_some(value)
}

/// The figures of one benchmark run.
#[derive(Debug, Clone)]
pub struct Results {
    bench: String,
    figures: Vec<Figure>,
}

impl Results {
    /// No figures yet, for benchmark `bench` (the binary's name).
    pub fn new(bench: impl Into<String>) -> Self {
        Self {
            bench: bench.into(),
            figures: Vec::new(),
        }
    }

    /// Adds a figure.
    pub fn push(&mut self, figure: Figure) {
        self.figures.push(figure);
    }

    /// The figures so far.
    pub fn figures(&self) -> &[Figure] {
        &self.figures
    }

    /// The document, with this process's command line as the command.
    pub fn to_json(&self) -> Value {
        let command: Vec<String> = std::env::args().collect();
        json!({
            "bench": self.bench,
            "command": command.join(" "),
            "figures": self.figures.iter().map(Figure::to_json).collect::<Vec<_>>(),
        })
    }

    /// Writes the document to `path`, when one was given.
    pub fn write(&self, path: Option<&Path>) -> anyhow::Result<()> {
        let Some(path) = path else {
            return Ok(());
        };
        let text = serde_json::to_string_pretty(&self.to_json())?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing the results to {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_carry_ratio_baseline_and_target_and_nan_becomes_null() {
        let mut results = Results::new("demo");
        results.push(
            Figure::higher("publish", 50.0, "events/s")
                .baseline("plain", 100.0)
                .target("≥ 1"),
        );
        results.push(Figure::lower("lag p99", f64::NAN, "ms").baseline("plain", 0.0));
        let document = results.to_json();
        assert_eq!(document["bench"], "demo");
        let figures = document["figures"].as_array().unwrap();
        assert_eq!(figures[0]["ratio"], 0.5);
        assert_eq!(figures[0]["better"], "higher");
        assert_eq!(figures[0]["baseline_name"], "plain");
        assert_eq!(figures[0]["target"], "≥ 1");
        assert!(figures[1]["value"].is_null());
        assert!(figures[1]["ratio"].is_null(), "a zero baseline has no ratio");
        assert_eq!(figures[1]["better"], "lower");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.json");
        results.write(Some(&path)).unwrap();
        let read: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(read["figures"][0]["value"], 50.0);
    }
}
