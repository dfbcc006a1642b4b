//! Shared test helpers: the public cases, seeded inputs, comparisons with named tolerances.
#![allow(dead_code)]

use serde::Deserialize;
use soft_topk::{Scale, SoftTopK, Variant};

/// One line of `../shared/cases/public.jsonl` (format in its README).
#[derive(Debug, Clone, Deserialize)]
pub struct Case {
    pub id: String,
    pub variant: String,
    pub normalize: String,
    pub n: usize,
    pub k: i64,
    pub eps: f64,
    pub x: Vec<serde_json::Value>,
    pub v: serde_json::Value,
    pub expect_error: Option<String>,
    pub expected: Option<Expected>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Expected {
    #[serde(rename = "A")]
    pub a: serde_json::Value,
    pub grad_x: Vec<f64>,
}

/// Where the shared cases live: `SOFT_TOPK_CASES` or `../shared/cases/public.jsonl`.
pub fn cases_path() -> std::path::PathBuf {
    std::env::var_os("SOFT_TOPK_CASES")
        .map(Into::into)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/cases/public.jsonl")
        })
}

pub fn load_cases() -> Vec<Case> {
    let path = cases_path();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read the public cases at {}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("a public case parses"))
        .collect()
}

/// A JSON number, or one of the strings "inf", "-inf", "nan".
pub fn number(v: &serde_json::Value) -> f64 {
    match v {
        serde_json::Value::Number(x) => x.as_f64().expect("finite number"),
        serde_json::Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "inf" | "+inf" | "infinity" => f64::INFINITY,
            "-inf" | "-infinity" => f64::NEG_INFINITY,
            _ => f64::NAN,
        },
        other => panic!("not a number: {other}"),
    }
}

impl Case {
    pub fn op(&self) -> SoftTopK {
        let variant = if self.variant == "sorted" {
            Variant::Sorted
        } else {
            Variant::TopK
        };
        let scale = if self.normalize == "max" {
            Scale::Max
        } else {
            Scale::None
        };
        SoftTopK::new(self.k.max(0) as usize, self.eps)
            .variant(variant)
            .scale(scale)
    }

    pub fn scores(&self) -> Vec<f64> {
        self.x.iter().map(number).collect()
    }

    /// The cotangent as ∂L/∂mask (top-k) or as ranks[j][i] (sorted).
    pub fn cotangent_mask(&self) -> Vec<f64> {
        self.v.as_array().unwrap().iter().map(number).collect()
    }

    pub fn cotangent_ranks(&self) -> Vec<Vec<f64>> {
        transpose(&self.v)
    }

    pub fn expected_mask(&self) -> Vec<f64> {
        self.expected
            .as_ref()
            .unwrap()
            .a
            .as_array()
            .unwrap()
            .iter()
            .map(number)
            .collect()
    }

    pub fn expected_ranks(&self) -> Vec<Vec<f64>> {
        transpose(&self.expected.as_ref().unwrap().a)
    }
}

/// An n × k JSON array [i][j] as k rows of n: [j][i].
fn transpose(v: &serde_json::Value) -> Vec<Vec<f64>> {
    let rows: Vec<Vec<f64>> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(number).collect())
        .collect();
    let k = rows.first().map_or(0, Vec::len);
    (0..k)
        .map(|j| rows.iter().map(|r| r[j]).collect())
        .collect()
}

/// Largest |a − b| / max(1, |b|), and where it is.
pub fn worst_error(actual: &[f64], expected: &[f64]) -> (f64, usize) {
    assert_eq!(actual.len(), expected.len(), "lengths differ");
    actual
        .iter()
        .zip(expected)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
        .enumerate()
        .fold(
            (0.0, 0),
            |(w, wi), (i, e)| if e > w || e.is_nan() { (e, i) } else { (w, wi) },
        )
}

pub fn assert_close(what: &str, actual: &[f64], expected: &[f64], tolerance: f64) {
    let (err, at) = worst_error(actual, expected);
    assert!(
        err <= tolerance,
        "{what}: error {err:.3e} > {tolerance:.1e} at index {at}: got {}, expected {}",
        actual[at],
        expected[at]
    );
}

/// A seeded batch of uniform scores in [lo, hi).
pub fn uniform_scores(rows: usize, n: usize, lo: f32, hi: f32, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..rows * n).map(|_| rng.random_range(lo..hi)).collect()
}

/// Largest |a − b| over two f32 slices, its index, and the largest |b|.
pub fn worst_abs(actual: &[f32], expected: &[f32]) -> (f32, usize, f32) {
    assert_eq!(actual.len(), expected.len(), "lengths differ");
    let mut worst = (0.0f32, 0usize, 0.0f32);
    for (i, (a, b)) in actual.iter().zip(expected).enumerate() {
        let e = (a - b).abs();
        if e > worst.0 || e.is_nan() {
            worst = (e, i, worst.2);
        }
        worst.2 = worst.2.max(b.abs());
    }
    worst
}

/// Every backend of this build: the reference, the CPU and, when an adapter exists, the GPU.
/// Under CI (CI=true) lavapipe is installed, so a missing adapter fails instead of skipping;
/// elsewhere the skip is said loudly, naming `what` ran without it.
pub fn all_backends(what: &str) -> Vec<std::sync::Arc<dyn soft_topk::Backend>> {
    use soft_topk::{cpu::CpuBackend, gpu::GpuBackend, reference::Reference};
    let mut list: Vec<std::sync::Arc<dyn soft_topk::Backend>> = vec![
        std::sync::Arc::new(Reference),
        std::sync::Arc::new(CpuBackend::new()),
    ];
    match GpuBackend::shared() {
        Ok(gpu) => list.push(gpu),
        Err(why) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("CI=true but no GPU adapter: {why}")
        }
        Err(why) => eprintln!("SKIPPED on GPU: {what} ran on reference and cpu only ({why})"),
    }
    list
}
