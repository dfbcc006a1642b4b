//! Shared GPU test helpers: the backend or a loud reason why not, seeded inputs, comparisons.
#![allow(dead_code)]

use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use soft_topk::gpu::GpuBackend;
use soft_topk::reference::Reference;
use soft_topk::{Backend, Batch, Cotangent, Forward, SoftTopK};

/// The shared GPU backend. Without an adapter: under `CI=true` the test fails; otherwise it
/// prints a loud SKIPPED line to stderr and the caller returns.
pub fn gpu() -> Option<Arc<GpuBackend>> {
    match GpuBackend::shared() {
        Ok(backend) => Some(backend),
        Err(why) if why.kind() != "no_adapter" => {
            panic!("the GPU backend failed to build (a bug, not a missing adapter): {why}")
        }
        Err(why) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("CI=true and no GPU adapter: {why}");
            }
            eprintln!("\n!!!!!!!! SKIPPED: no GPU adapter ({why}) !!!!!!!!\n");
            None
        }
    }
}

/// Gets the backend or returns from the test (after the loud message above).
#[macro_export]
macro_rules! gpu_or_skip {
    () => {
        match gpu_support::gpu() {
            Some(backend) => backend,
            None => return,
        }
    };
}

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// How a generated row looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowKind {
    /// Uniform in [−1, 1].
    Uniform,
    /// Values on a coarse grid: many ties.
    Ties,
    /// 1000 + 10·uniform: centring matters in f32.
    Offset,
    /// Uniform, with some entries masked out and some set to the excluding infinity.
    Excluded,
}

pub const KINDS: [RowKind; 4] = [
    RowKind::Uniform,
    RowKind::Ties,
    RowKind::Offset,
    RowKind::Excluded,
];

/// Scores and validity for `rows × n`, row r of kind `KINDS[r % 4]` rotated by `shift`.
pub fn make_batch(
    rng: &mut ChaCha8Rng,
    rows: usize,
    n: usize,
    largest: bool,
    shift: usize,
) -> (Vec<f32>, Vec<bool>) {
    let mut scores = Vec::with_capacity(rows * n);
    let mut valid = Vec::with_capacity(rows * n);
    let excluding = if largest {
        f32::NEG_INFINITY
    } else {
        f32::INFINITY
    };
    for r in 0..rows {
        let kind = KINDS[(r + shift) % KINDS.len()];
        for _ in 0..n {
            let u: f32 = rng.random_range(-1.0..1.0);
            let (x, ok) = match kind {
                RowKind::Uniform => (u, true),
                RowKind::Ties => ((u * 4.0).round() / 4.0, true),
                RowKind::Offset => (1000.0 + 10.0 * u, true),
                RowKind::Excluded => {
                    let roll: f32 = rng.random();
                    if roll < 0.1 {
                        (f32::NAN, false)
                    } else if roll < 0.2 {
                        (excluding, true)
                    } else {
                        (u, true)
                    }
                }
            };
            scores.push(x);
            valid.push(ok);
        }
    }
    (scores, valid)
}

/// Uniform values in [−1, 1].
pub fn uniform(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// Largest |a − b|, where, and the values there.
pub fn worst_abs(actual: &[f32], expected: &[f32]) -> (f64, usize) {
    assert_eq!(actual.len(), expected.len());
    let mut worst = (0.0f64, 0usize);
    for (i, (&a, &b)) in actual.iter().zip(expected).enumerate() {
        let e = (a as f64 - b as f64).abs();
        if e > worst.0 || e.is_nan() {
            worst = (e, i);
            if e.is_nan() {
                break;
            }
        }
    }
    worst
}

/// Asserts max |a − b| ≤ tolerance, naming the worst index.
pub fn assert_abs(what: &str, actual: &[f32], expected: &[f32], tolerance: f64) {
    let (err, at) = worst_abs(actual, expected);
    assert!(
        err <= tolerance,
        "{what}: error {err:.3e} > {tolerance:.1e} at index {at}: got {}, expected {}",
        actual[at],
        expected[at]
    );
}

/// Asserts max |a − b| ≤ tolerance · max(max |b|, floor): gradients compared relative to
/// their own scale.
pub fn assert_scaled(what: &str, actual: &[f32], expected: &[f32], tolerance: f64, floor: f64) {
    let scale = expected
        .iter()
        .fold(0.0f64, |m, &b| m.max((b as f64).abs()))
        .max(floor);
    let (err, at) = worst_abs(actual, expected);
    assert!(
        err <= tolerance * scale,
        "{what}: error {err:.3e} > {tolerance:.1e} × scale {scale:.3e} at index {at}: got {}, \
         expected {}",
        actual[at],
        expected[at]
    );
}

/// The f64 reference's forward (f32 out), for comparisons.
pub fn reference_forward(op: &SoftTopK, batch: &Batch) -> Forward {
    Reference.forward(op, batch).expect("reference forward")
}

/// The f64 reference's backward (f32 out), for comparisons.
pub fn reference_backward(op: &SoftTopK, batch: &Batch, fwd: &Forward, cot: Cotangent) -> Vec<f32> {
    Reference
        .backward(op, batch, fwd, cot)
        .expect("reference backward")
}
