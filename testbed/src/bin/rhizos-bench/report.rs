//! What every benchmark reports: a typed report per benchmark (`Serialize` for `--json`,
//! `Display` for people), built from the latency summaries here.

use serde::Serialize;
use std::fmt;
use std::time::Duration;

/// `release` or `debug`: figures from a debug build are not comparable.
pub fn build() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

/// Median, extremes and 90th percentile of a set of durations, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub p90: f64,
    pub max: f64,
}

impl Summary {
    /// `None` without samples.
    pub fn of(samples: &mut [Duration]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort();
        let at = |q: f64| ms(samples[((samples.len() - 1) as f64 * q).round() as usize]);
        Some(Self {
            median: at(0.5),
            min: at(0.0),
            p90: at(0.9),
            max: at(1.0),
        })
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "median {:>8.3}  min {:>8.3}  p90 {:>8.3}  max {:>8.3}",
            self.median, self.min, self.p90, self.max
        )
    }
}

/// The tail of a latency distribution, in milliseconds, and how many samples it is from.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Tail {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub samples: usize,
}

impl Tail {
    /// NaN quantiles without samples.
    pub fn of(samples: &mut [Duration]) -> Self {
        samples.sort();
        let pick = |q: f64| {
            samples
                .get(((samples.len().max(1) - 1) as f64 * q).round() as usize)
                .map_or(f64::NAN, |d| ms(*d))
        };
        Self {
            p50: pick(0.5),
            p99: pick(0.99),
            max: pick(1.0),
            samples: samples.len(),
        }
    }
}

impl fmt::Display for Tail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.p50, self.p99, self.max
        )
    }
}

/// A summary that may be missing, for printing.
pub struct Maybe<'a>(pub &'a Option<Summary>);

impl fmt::Display for Maybe<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(summary) => summary.fmt(f),
            None => f.write_str("no samples"),
        }
    }
}

pub fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Prints `report` as one JSON object or as text.
pub fn print<R: Serialize + fmt::Display>(report: &R, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}
