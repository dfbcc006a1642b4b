//! The exact two-anchor top-k in f32, one row at a time.

use super::kernels::{mask_at, sums_at};
use crate::batch::{check_row, RowSpec};
use crate::op::SoftTopK;
use crate::output::RowReport;
use crate::reference::forward_into;
use crate::Batch;

/// Newton steps before the solve reports non-convergence (ordinary rows need 2–6).
const MAX_STEPS: u32 = 100;
/// A Newton step this small in units of the temperature moves no mask entry by more than a
/// quarter of it: the threshold is then as good as f32 sums can make it.
const STEP_TOLERANCE: f64 = 1e-6;
/// |Σ mask − k| below this many f32 ulps per √n is rounding noise of the f32 sum.
const SUM_NOISE_ULPS: f64 = 0.5;

/// A row's valid scores in largest orientation, and their columns when some are excluded.
fn gather(
    op: &SoftTopK,
    batch: &Batch,
    r: usize,
    spec: &RowSpec,
) -> (Vec<f32>, Option<Vec<usize>>) {
    let sign = op.direction.sign() as f32;
    let row = batch.row(r);
    if spec.n_valid == row.len() {
        return (row.iter().map(|&v| sign * v).collect(), None);
    }
    let cols: Vec<usize> = (0..row.len())
        .filter(|&c| batch.is_valid(r, c, op.direction))
        .collect();
    (cols.iter().map(|&c| sign * row[c]).collect(), Some(cols))
}

/// The forward pass of one row into its mask; returns the row's report.
pub fn forward_row(op: &SoftTopK, batch: &Batch, r: usize, mask: &mut [f32]) -> RowReport {
    let spec = match check_row(op, batch, r) {
        Ok(spec) => spec,
        Err(e) => return RowReport::failed(e),
    };
    let mut report = RowReport::exact(spec.k, spec.n_valid);
    if spec.k == 0 {
        return report;
    }
    let (x, cols) = gather(op, batch, r, &spec);
    let scatter = |mask: &mut [f32], values: &[f32]| match &cols {
        Some(cols) => cols.iter().zip(values).for_each(|(&c, &v)| mask[c] = v),
        None => mask.copy_from_slice(values),
    };
    if spec.k == spec.n_valid {
        scatter(mask, &vec![1.0; x.len()]);
        return report;
    }

    let Some(solve) = Threshold::new(&x, spec.k, spec.scale * op.epsilon / 2.0) else {
        // Temperatures or score ranges outside what f32 can carry: the f64 reference.
        return forward_into(op, batch, r, mask, &mut []);
    };
    let inv_t = solve.inv_t as f32;
    let (theta, steps, converged) = solve.run(&x);
    let (hi, lo) = split(theta);
    let mut values = vec![0.0f32; x.len()];
    let total = mask_at(&x, hi, lo, inv_t, &mut values);
    scatter(mask, &values);
    report.converged = converged;
    report.iterations = steps;
    report.marginal_error = (total - spec.k as f64).abs();
    report
}

/// θ as an f32 pair hi + lo with hi = θ rounded to f32.
fn split(theta: f64) -> (f32, f32) {
    let hi = theta as f32;
    (hi, (theta - hi as f64) as f32)
}

/// The bracket of the threshold θ for mask_i = σ((x_i − θ)/T) on valid scores in
/// [x_min, x_max] (largest orientation), 0 < k < n; `None` when the f32 loops cannot carry the
/// row: 1/T outside the normal f32 range, the bracket beyond ±1e37, or T below what f64 can
/// resolve at the bracket. Such rows go to the f64 reference, on the CPU and GPU alike.
pub(crate) fn f32_bracket(
    x_min: f64,
    x_max: f64,
    n: usize,
    k: usize,
    t: f64,
) -> Option<(f64, f64)> {
    let inv_t = 1.0 / t;
    let logit = (k as f64 / (n - k) as f64).ln();
    let (lo, hi) = (x_min - t * logit, x_max - t * logit);
    // θ lives in f64 in score units: a step of STEP_TOLERANCE·T must still move it, or the
    // search cannot place θ between scores closer than their f64 spacing (equal scores near 1
    // at ε = 1e-30 came out as σ(0) = 1/2 each, Σ mask ≠ k).
    let resolvable = t * STEP_TOLERANCE > lo.abs().max(hi.abs()) * f64::EPSILON;
    let representable = (f32::MIN_POSITIVE as f64..=f32::MAX as f64).contains(&inv_t)
        && lo.abs() < 1e37
        && hi.abs() < 1e37;
    (representable && resolvable).then_some((lo, hi))
}

/// The threshold search for mask_i = σ((x_i − θ)/T) with Σ mask = k, in score units.
struct Threshold {
    k: f64,
    t: f64,
    inv_t: f64,
    lo: f64,
    hi: f64,
    start: f64,
    noise: f64,
}

impl Threshold {
    /// Sets up the bracket and the start; `None` when f32 cannot represent the problem
    /// (1/T outside the normal f32 range, the bracket beyond ±1e37, or T below what f64 can
    /// resolve at the bracket).
    fn new(x: &[f32], k: usize, t: f64) -> Option<Self> {
        let n = x.len();
        let inv_t = 1.0 / t;
        let x_min = x.iter().copied().fold(f32::INFINITY, f32::min) as f64;
        let x_max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let (lo, hi) = f32_bracket(x_min, x_max, n, k, t)?;

        // Start between the k-th and (k+1)-th largest score, the hard threshold: on sharp
        // rows it is already the answer, on soft rows Newton takes it from there.
        let mut order = x.to_vec();
        let (_, kth, rest) = order.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        let below = rest.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let start = (0.5 * (*kth as f64) + 0.5 * below as f64).clamp(lo, hi);
        Some(Threshold {
            k: k as f64,
            t,
            inv_t,
            lo,
            hi,
            start,
            noise: SUM_NOISE_ULPS * f32::EPSILON as f64 * (n as f64).sqrt(),
        })
    }

    /// Safeguarded Newton: returns θ, the steps taken and whether it converged.
    fn run(mut self, x: &[f32]) -> (f64, u32, bool) {
        let mut theta = self.start;
        for step in 1..=MAX_STEPS {
            let (hi, lo) = split(theta);
            let (sum, slope) = sums_at(x, hi, lo, self.inv_t as f32);
            let excess = sum - self.k;
            if excess.abs() <= self.noise {
                return (theta, step, true);
            }
            // Σ σ falls as θ rises: too much mass means θ is too low.
            if excess > 0.0 {
                self.lo = theta;
            } else {
                self.hi = theta;
            }
            let newton = theta + self.t * excess / slope;
            let next = if slope > 0.0 && newton > self.lo && newton < self.hi {
                newton
            } else {
                0.5 * self.lo + 0.5 * self.hi
            };
            let settled = (next - theta).abs() <= STEP_TOLERANCE * self.t;
            if settled || next <= self.lo || next >= self.hi {
                return (next.clamp(self.lo, self.hi), step, true);
            }
            theta = next;
        }
        (theta, MAX_STEPS, false)
    }
}

/// The closed-form backward of one row: grad = (2/(s·ε))·A'·(g − ḡ), negated for smallest.
pub fn backward_row(
    op: &SoftTopK,
    batch: &Batch,
    r: usize,
    mask: &[f32],
    grad_mask: &[f32],
    grad: &mut [f32],
) {
    let Ok(spec) = check_row(op, batch, r) else {
        return;
    };
    if spec.is_trivial(op.variant) {
        return;
    }
    // Excluded entries have mask 0, hence A' = 0 and gradient 0, with no test needed.
    let (mut total, mut weighted) = (0.0f64, 0.0f64);
    for (&a, &g) in mask.iter().zip(grad_mask) {
        let slope = (a * (1.0 - a)) as f64;
        total += slope;
        weighted += slope * g as f64;
    }
    if !(total > 0.0) {
        return;
    }
    let mean = weighted / total;
    // In f64: 2/(s·ε) can pass f32's range while A' is small enough to bring it back.
    let factor = op.direction.sign() * 2.0 / (spec.scale * op.epsilon);
    if !factor.is_finite() {
        return;
    }
    for ((d, &a), &g) in grad.iter_mut().zip(mask).zip(grad_mask) {
        let slope = (a * (1.0 - a)) as f64;
        *d = if slope > 0.0 {
            (factor * slope * (g as f64 - mean)) as f32
        } else {
            0.0
        };
    }
}
