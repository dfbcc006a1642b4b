//! The exact two-anchor top-k in f32, one row at a time.

use super::kernels::{mask_at, scaled_slopes, slope_sums, sums_at};
use crate::batch::check_row;
use crate::op::{Direction, SoftTopK};
use crate::output::RowReport;
use crate::reference::forward_into;
use crate::Batch;

/// Newton steps before the solve reports non-convergence (ordinary rows need a handful).
const MAX_STEPS: u32 = 100;
/// A Newton step this small in units of the temperature T ends the search without another
/// pass: in those units |Σσ''| ≤ |Σσ'|, so the step leaves θ within δ²/2 = 5e-7·T of the
/// root, which moves no mask entry by more than 1.3e-7, about one f32 rounding.
const STEP_TOLERANCE: f64 = 1e-3;
/// The finest step in units of T: a bisection step this small ends the search, and θ must be
/// able to take it in f64 at the bracket.
const RESOLUTION: f64 = 1e-6;
/// |Σ mask − k| below this many f32 ulps per √n is rounding noise of the f32 sum.
const SUM_NOISE_ULPS: f64 = 0.5;

/// A row's valid scores in largest orientation and their columns, for rows with exclusions.
fn gather(op: &SoftTopK, batch: &Batch, r: usize) -> (Vec<f32>, Vec<usize>) {
    let sign = op.direction.sign() as f32;
    let row = batch.row(r);
    let cols: Vec<usize> = (0..row.len())
        .filter(|&c| batch.is_valid(r, c, op.direction))
        .collect();
    (cols.iter().map(|&c| sign * row[c]).collect(), cols)
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
    // A full row is read in place with its sign applied in the loops; a row with exclusions
    // is gathered once, already in largest orientation.
    let row = batch.row(r);
    let gathered = (spec.n_valid < row.len()).then(|| gather(op, batch, r));
    let (x, sign) = match &gathered {
        Some((x, _)) => (&x[..], 1.0),
        None => (row, op.direction.sign() as f32),
    };
    if spec.k == spec.n_valid {
        match &gathered {
            Some((_, cols)) => cols.iter().for_each(|&c| mask[c] = 1.0),
            None => mask.fill(1.0),
        }
        return report;
    }

    // The range of the valid scores in largest orientation.
    let (x_min, x_max) = match op.direction {
        Direction::Largest => (spec.x_min, spec.x_max),
        Direction::Smallest => (-spec.x_max, -spec.x_min),
    };
    let t = spec.scale * op.epsilon / 2.0;
    let Some(solve) = Threshold::new(x, sign, x_min, x_max, spec.k, t) else {
        // Temperatures or score ranges outside what f32 can carry: the f64 reference.
        return forward_into(op, batch, r, mask, &mut []);
    };
    let inv_t = solve.inv_t as f32;
    let (theta, steps, converged) = solve.run(x, sign);
    let (hi, lo) = split(theta);
    let total = match &gathered {
        Some((_, cols)) => {
            let mut values = vec![0.0f32; x.len()];
            let total = mask_at(x, sign, hi, lo, inv_t, &mut values);
            cols.iter().zip(&values).for_each(|(&c, &v)| mask[c] = v);
            total
        }
        None => mask_at(x, sign, hi, lo, inv_t, mask),
    };
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
    // θ lives in f64 in score units: a step of RESOLUTION·T must still move it, or the
    // search cannot place θ between scores closer than their f64 spacing (equal scores near 1
    // at ε = 1e-30 came out as σ(0) = 1/2 each, Σ mask ≠ k).
    let resolvable = t * RESOLUTION > lo.abs().max(hi.abs()) * f64::EPSILON;
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
    /// Sets up the bracket and the start for the scores s·x, which lie in [x_min, x_max];
    /// `None` when f32 cannot represent the problem (1/T outside the normal f32 range, the
    /// bracket beyond ±1e37, or T below what f64 can resolve at the bracket).
    fn new(x: &[f32], sign: f32, x_min: f64, x_max: f64, k: usize, t: f64) -> Option<Self> {
        let n = x.len();
        let (lo, hi) = f32_bracket(x_min, x_max, n, k, t)?;

        // Start between the k-th and (k+1)-th largest score, the hard threshold: on sharp
        // rows it is already the answer, on soft rows Newton takes it from there.
        let (kth, below) = kth_largest_pair(x, sign, k);
        let start = (0.5 * kth as f64 + 0.5 * below as f64).clamp(lo, hi);
        Some(Threshold {
            k: k as f64,
            t,
            inv_t: 1.0 / t,
            lo,
            hi,
            start,
            noise: SUM_NOISE_ULPS * f32::EPSILON as f64 * (n as f64).sqrt(),
        })
    }

    /// Safeguarded Newton: returns θ, the steps taken and whether it converged.
    fn run(mut self, x: &[f32], sign: f32) -> (f64, u32, bool) {
        let mut theta = self.start;
        for step in 1..=MAX_STEPS {
            let (hi, lo) = split(theta);
            let (sum, slope) = sums_at(x, sign, hi, lo, self.inv_t as f32);
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
            // A Newton step converges quadratically, so a small one may end the search; a
            // bisection step only halves the bracket, so it must be as small as θ can resolve.
            let newton = theta + self.t * excess / slope;
            let (next, tolerance) = if slope > 0.0 && newton > self.lo && newton < self.hi {
                (newton, STEP_TOLERANCE)
            } else {
                (0.5 * self.lo + 0.5 * self.hi, RESOLUTION)
            };
            let settled = (next - theta).abs() <= tolerance * self.t;
            if settled || next <= self.lo || next >= self.hi {
                return (next.clamp(self.lo, self.hi), step, true);
            }
            theta = next;
        }
        (theta, MAX_STEPS, false)
    }
}

/// The k-th and (k + 1)-th largest of s·x_i, for 0 < k < n and finite x.
fn kth_largest_pair(x: &[f32], sign: f32, k: usize) -> (f32, f32) {
    // Finite floats order as their bits do once negative ones are flipped to below the
    // positive ones: an integer selection, cheaper than comparing floats.
    let key = |v: f32| {
        let bits = (sign * v).to_bits() as i32;
        bits ^ (((bits >> 31) as u32) >> 1) as i32
    };
    let value = |key: i32| f32::from_bits((key ^ (((key >> 31) as u32) >> 1) as i32) as u32);
    let mut keys: Vec<i32> = x.iter().map(|&v| key(v)).collect();
    let (_, kth, rest) = keys.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
    let below = rest.iter().copied().max().unwrap_or(i32::MIN);
    (value(*kth), value(below))
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
    let (total, weighted) = slope_sums(mask, grad_mask);
    if !(total > 0.0) {
        return;
    }
    let mean = weighted / total;
    let factor = op.direction.sign() * 2.0 / (spec.scale * op.epsilon);
    if factor.abs() < f32::MAX as f64 {
        return scaled_slopes(mask, grad_mask, mean as f32, factor as f32, grad);
    }
    // 2/(s·ε) past f32's range while A' may be small enough to bring it back: in f64.
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The pair by a full sort, for comparison.
    fn sorted_pair(x: &[f32], sign: f32, k: usize) -> (f32, f32) {
        let mut all: Vec<f32> = x.iter().map(|&v| sign * v).collect();
        all.sort_unstable_by(|a, b| b.total_cmp(a));
        (all[k - 1], all[k])
    }

    proptest! {
        #[test]
        fn selection_matches_a_sort(
            n in 1usize..6000,
            k_frac in 0.0f64..1.0,
            // Few distinct values make ties; many make a spread.
            levels in prop_oneof![Just(3u32), Just(1000u32), Just(u32::MAX)],
            shape in 0u8..3,
            descending in any::<bool>(),
            seed in any::<u64>(),
        ) {
            prop_assume!(n >= 2);
            let k = 1 + ((n - 2) as f64 * k_frac) as usize;
            let mut state = seed | 1;
            let mut x: Vec<f32> = (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    ((state >> 32) as u32 % levels) as f32
                })
                .collect();
            match shape {
                0 => {}
                1 => x.sort_unstable_by(f32::total_cmp),
                _ => x[n / 2] = 1e30,
            }
            let sign = if descending { -1.0 } else { 1.0 };
            prop_assert_eq!(kth_largest_pair(&x, sign, k), sorted_pair(&x, sign, k));
        }
    }
}
