//! The f64 reference: the specification in code.
//!
//! Plain loops in f64, written to be read against MATH.md rather than to be fast. Every other
//! backend is tested against these functions; where they disagree, this module is right.
//!
//! All solvers work on a row's valid entries in "largest" orientation: smallest-k of x is
//! largest-k of −x with the gradient negated, and the cost scale s is taken on the raw scores
//! first. Scores are centred at the hard threshold and the cost is the shift-equivalent
//! C_ij = −2·x_i·y_j / s, so every solver sees u_i = 2·(x_i − c)/(s·ε) and a plan
//! n·Γ_ij = exp(f_i + g_j + u_i·y_j) with potentials f, g in units of ε.

mod backward;
mod solve;

pub use backward::{sorted_backward, topk_backward, ROUNDED_PLAN_DAMPING};
pub use solve::{exact_threshold, sinkhorn, sorted_newton, Plan};

use crate::batch::check_row_values;
use crate::error::Result;
use crate::op::{Direction, Solver, Variant};
use crate::output::RowReport;
use crate::{check_backward_args, Backend, Batch, Cotangent, Forward, SoftTopK};

/// The marginal error the reference's default sorted solve runs to: near f64 rounding of the
/// column sums, far below anything an f32 backend can see.
pub const AUTO_TOLERANCE: f64 = 1e-12;

/// One row's answer in f64, over the full row (excluded entries hold 0).
#[derive(Debug, Clone, PartialEq)]
pub struct RowOutput {
    pub mask: Vec<f64>,
    /// Sorted variant: `k` ranks (the row's k as solved), each of length n.
    pub ranks: Vec<Vec<f64>>,
    pub report: RowReport,
}

/// A row's valid entries in largest orientation, with where they came from.
struct Compact {
    cols: Vec<usize>,
    x: Vec<f64>,
}

fn compact<T: Copy + Into<f64>>(op: &SoftTopK, scores: &[T], valid: Option<&[bool]>) -> Compact {
    let sign = op.direction.sign();
    let excluded = match op.direction {
        Direction::Largest => f64::NEG_INFINITY,
        Direction::Smallest => f64::INFINITY,
    };
    let (mut cols, mut x) = (Vec::new(), Vec::new());
    for (col, v) in scores.iter().map(|&v| v.into()).enumerate() {
        if v != excluded && valid.is_none_or(|m| m[col]) {
            cols.push(col);
            x.push(sign * v);
        }
    }
    Compact { cols, x }
}

/// The largest |u| the solvers are given: u·y and sums of a few such terms stay far inside
/// the f64 range for any anchor y = k below 1e50.
const MAX_SCALED: f64 = 1e250;

/// u_i = 2·(x_i − c)/(s·ε): the scores in units of the temperature, centred at the hard
/// threshold c, halfway between the k-th and (k+1)-th largest score.
///
/// Centring at the threshold rather than at the mid-range keeps every bit of the scores that
/// decide the answer: with one score at −1e20 the mid-range is −5e19, and 2, 2.5 and 3 minus it
/// are the same f64 (their mask came out [1, 1, 1] for k = 2). Scores far from c lose precision
/// instead, but they sit deep in σ's saturation.
///
/// N.B. When 2/(s·ε) or the largest |u| passes f64's range (ε = 5e-324, or a spread of 1e300
/// at ε = 1e-10), the row is in the hard limit: u is scaled down to |u| ≤ MAX_SCALED, which
/// keeps the order and leaves every gap beyond the reach of σ. Without this, 0·∞ made tied
/// scores NaN and the sorted plan NaN (masks of 1 that summed to n, not k).
fn scaled_scores(x: &[f64], k: usize, scale: f64, epsilon: f64) -> Vec<f64> {
    let mut order = x.to_vec();
    order.sort_by(|a, b| b.total_cmp(a));
    let centre = 0.5 * order[k - 1] + 0.5 * order[k.min(order.len() - 1)];
    // Halves throughout: x − c can pass f64's range (x = ±1e308), x/2 − c/2 cannot.
    let half = |v: f64| 0.5 * v - 0.5 * centre;
    let widest = half(order[0]).max(-half(order[order.len() - 1]));
    let mut factor = 4.0 / (scale * epsilon);
    if !(widest * factor <= MAX_SCALED) {
        factor = if widest > 0.0 {
            MAX_SCALED / widest
        } else {
            1.0
        };
    }
    x.iter().map(|&v| half(v) * factor).collect()
}

/// The forward pass on one row (any float type), with its report; input errors land in the
/// report and leave the outputs at 0.
pub fn forward_row<T: Copy + Into<f64>>(
    op: &SoftTopK,
    row: usize,
    scores: &[T],
    valid: Option<&[bool]>,
) -> RowOutput {
    let n = scores.len();
    let mut out = RowOutput {
        mask: vec![0.0; n],
        ranks: Vec::new(),
        report: RowReport::exact(0, 0),
    };
    let spec = match op
        .check_settings()
        .and_then(|_| check_row_values(op, row, scores, valid))
    {
        Ok(spec) => spec,
        Err(e) => {
            out.report = RowReport::failed(e);
            return out;
        }
    };
    let Compact { cols, x } = compact(op, scores, valid);
    let k = spec.k;
    out.report = RowReport::exact(k, spec.n_valid);
    if op.variant == Variant::Sorted {
        out.ranks = vec![vec![0.0; n]; k];
    }
    if k == 0 {
        return out;
    }

    let u = scaled_scores(&x, k, spec.scale, op.epsilon);
    let plan = match (op.variant, op.solver) {
        (Variant::TopK, _) if k == x.len() => Plan::ones_column(x.len()),
        (Variant::TopK, Solver::Auto | Solver::Exact) => solve::exact_topk(&u, k),
        (
            Variant::TopK,
            Solver::Sinkhorn {
                tolerance,
                max_iterations,
            },
        ) => {
            let (anchors, weights) = topk_anchors(x.len(), k);
            sinkhorn(&u, &anchors, &weights, tolerance, max_iterations)
        }
        (
            Variant::Sorted,
            Solver::Sinkhorn {
                tolerance,
                max_iterations,
            },
        ) => {
            let (anchors, weights) = sorted_anchors(x.len(), k);
            sinkhorn(&u, &anchors, &weights, tolerance, max_iterations)
        }
        (Variant::Sorted, solver) => {
            let (tolerance, max_iterations) = match solver {
                Solver::Newton {
                    tolerance,
                    max_iterations,
                } => (tolerance, max_iterations),
                _ => (AUTO_TOLERANCE, crate::op::DEFAULT_NEWTON_ITERATIONS),
            };
            let (anchors, weights) = sorted_anchors(x.len(), k);
            sorted_newton(&u, &anchors, &weights, tolerance, max_iterations)
        }
        // `op.check` refuses Newton for top-k.
        (Variant::TopK, Solver::Newton { .. }) => unreachable!("checked by SoftTopK::check"),
    };

    // Scatter the plan's columns back to the row: column 0 is the top anchor (the mask for
    // top-k, rank 0 for sorted).
    let ranked = if op.variant == Variant::Sorted { k } else { 1 };
    for (i, &col) in cols.iter().enumerate() {
        let p = &plan.p[i * plan.m..(i + 1) * plan.m];
        // Row sums are 1 up to rounding; the mask never leaves [0, 1].
        out.mask[col] = p[..ranked].iter().sum::<f64>().min(1.0);
        for (j, rank) in out.ranks.iter_mut().enumerate() {
            rank[col] = p[j];
        }
    }
    out.report.converged = plan.converged;
    out.report.iterations = plan.iterations;
    out.report.marginal_error = plan.marginal_error;
    out
}

/// Top-k anchors in plan order: y = 1 (weight k, in units of 1/n) first, then y = 0.
pub(crate) fn topk_anchors(n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
    (vec![1.0, 0.0], vec![k as f64, (n - k) as f64])
}

/// Sorted anchors y_j = k − j, weight 1 each (units of 1/n), and y = 0 with the leftover
/// weight n − k unless k = n, where that anchor would carry nothing and is dropped.
pub(crate) fn sorted_anchors(n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
    let mut anchors: Vec<f64> = (0..k).map(|j| (k - j) as f64).collect();
    let mut weights = vec![1.0; k];
    if k < n {
        anchors.push(0.0);
        weights.push((n - k) as f64);
    }
    (anchors, weights)
}

/// One row's upstream gradient in f64: of the mask, of the ranks (k rows of n), or both.
#[derive(Debug, Clone, Copy, Default)]
pub struct RowCotangent<'a> {
    pub mask: Option<&'a [f64]>,
    pub ranks: Option<&'a [Vec<f64>]>,
}

/// The backward pass on one row: the gradient of the scores from the upstream gradient of the
/// mask and/or of the ranks, given this row's forward output (from any backend).
pub fn backward_row<T: Copy + Into<f64>>(
    op: &SoftTopK,
    row: usize,
    scores: &[T],
    valid: Option<&[bool]>,
    mask: &[f64],
    ranks: &[Vec<f64>],
    cotangent: RowCotangent,
) -> Vec<f64> {
    backward_row_damped(op, row, scores, valid, mask, ranks, cotangent, 0.0)
}

/// [`backward_row`] with `floor` added to the sorted backward's k×k diagonal (see
/// [`ROUNDED_PLAN_DAMPING`]).
#[allow(clippy::too_many_arguments)]
fn backward_row_damped<T: Copy + Into<f64>>(
    op: &SoftTopK,
    row: usize,
    scores: &[T],
    valid: Option<&[bool]>,
    mask: &[f64],
    ranks: &[Vec<f64>],
    cotangent: RowCotangent,
    floor: f64,
) -> Vec<f64> {
    let RowCotangent {
        mask: grad_mask,
        ranks: grad_ranks,
    } = cotangent;
    let n = scores.len();
    let mut grad = vec![0.0; n];
    let Ok(spec) = op
        .check_settings()
        .and_then(|_| check_row_values(op, row, scores, valid))
    else {
        return grad;
    };
    if spec.is_trivial(op.variant) {
        return grad;
    }
    let factor = 2.0 / (spec.scale * op.epsilon);
    if !factor.is_finite() {
        // A temperature of 0 in f64: the hard top-k, whose gradient is 0.
        return grad;
    }
    let Compact { cols, x } = compact(op, scores, valid);
    let pick = |v: &[f64]| cols.iter().map(|&c| v[c]).collect::<Vec<f64>>();

    let compact_grad = match op.variant {
        Variant::TopK => {
            let g = grad_mask.map(pick).unwrap_or_else(|| vec![0.0; x.len()]);
            topk_backward(&pick(mask), &g, factor)
        }
        Variant::Sorted => {
            let k = spec.k;
            let (anchors, _) = sorted_anchors(x.len(), k);
            let p: Vec<Vec<f64>> = ranks.iter().take(k).map(|r| pick(r)).collect();
            let g_mask = grad_mask.map(pick);
            let g: Vec<Vec<f64>> = (0..k)
                .map(|j| {
                    let mut gj = grad_ranks.map_or(vec![0.0; x.len()], |gr| pick(&gr[j]));
                    if let Some(gm) = &g_mask {
                        gj.iter_mut().zip(gm).for_each(|(a, b)| *a += b);
                    }
                    gj
                })
                .collect();
            sorted_backward(&p, &g, &anchors, factor, floor)
        }
    };
    let sign = op.direction.sign();
    for (&col, g) in cols.iter().zip(compact_grad) {
        grad[col] = sign * g;
    }
    grad
}

/// The reference forward on row `r` of a batch, written as f32 into the row's mask and its
/// `k_max` rank slots (empty for top-k).
pub(crate) fn forward_into(
    op: &SoftTopK,
    batch: &Batch,
    r: usize,
    mask: &mut [f32],
    ranks: &mut [f32],
) -> RowReport {
    let out = forward_row(op, r, batch.row(r), batch.valid_row(r));
    narrow(mask, &out.mask);
    for (slot, rank) in ranks.chunks_exact_mut(batch.n()).zip(&out.ranks) {
        narrow(slot, rank);
    }
    out.report
}

/// The reference backward on row `r` of a batch, from f32 forward output and cotangent slices
/// of this row (`ranks` and a ranks cotangent hold `k_max` slots of n).
pub(crate) fn backward_into(
    op: &SoftTopK,
    batch: &Batch,
    r: usize,
    mask: &[f32],
    ranks: &[f32],
    cotangent: Cotangent,
    grad: &mut [f32],
) {
    let n = batch.n();
    let widen = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let ranks: Vec<Vec<f64>> = ranks.chunks_exact(n).map(widen).collect();
    let (g_mask, g_ranks) = match cotangent {
        Cotangent::Mask(g) => (Some(widen(g)), None),
        Cotangent::Ranks(g) => (None, Some(g.chunks_exact(n).map(widen).collect::<Vec<_>>())),
    };
    let g = backward_row_damped(
        op,
        r,
        batch.row(r),
        batch.valid_row(r),
        &widen(mask),
        &ranks,
        RowCotangent {
            mask: g_mask.as_deref(),
            ranks: g_ranks.as_deref(),
        },
        ROUNDED_PLAN_DAMPING,
    );
    narrow(grad, &g);
}

fn narrow(dst: &mut [f32], src: &[f64]) {
    dst.iter_mut().zip(src).for_each(|(d, s)| *d = *s as f32);
}

/// This row's part of a cotangent: its n mask entries or its `k_max · n` rank entries.
pub(crate) fn cotangent_row<'a>(
    cotangent: Cotangent<'a>,
    r: usize,
    n: usize,
    k_max: usize,
) -> Cotangent<'a> {
    match cotangent {
        Cotangent::Mask(g) => Cotangent::Mask(&g[r * n..(r + 1) * n]),
        Cotangent::Ranks(g) => Cotangent::Ranks(&g[r * k_max * n..(r + 1) * k_max * n]),
    }
}

/// The reference as a [`Backend`]: f32 in and out, f64 inside, one row at a time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reference;

impl Backend for Reference {
    fn name(&self) -> String {
        "reference".into()
    }

    fn forward(&self, op: &SoftTopK, batch: &Batch) -> Result<Forward> {
        op.check(batch.rows())?;
        let (rows, n) = (batch.rows(), batch.n());
        let sorted = op.variant == Variant::Sorted;
        let k_max = if sorted { op.rank_slots(rows, n) } else { 0 };
        let mut fwd = Forward::zeros(rows, n, k_max, sorted);
        let mut no_ranks = Vec::new();
        for r in 0..rows {
            let mask = &mut fwd.mask[r * n..(r + 1) * n];
            let ranks = match fwd.ranks.as_mut() {
                Some(p) => &mut p[r * k_max * n..(r + 1) * k_max * n],
                None => &mut no_ranks[..],
            };
            let report = forward_into(op, batch, r, mask, ranks);
            fwd.reports.push(report);
        }
        Ok(fwd)
    }

    fn backward(
        &self,
        op: &SoftTopK,
        batch: &Batch,
        forward: &Forward,
        cotangent: Cotangent,
    ) -> Result<Vec<f32>> {
        check_backward_args(op, batch, forward, cotangent)?;
        let (rows, n, k_max) = (batch.rows(), batch.n(), forward.k_max);
        let mut grad = vec![0.0f32; rows * n];
        for (r, grad_row) in grad.chunks_exact_mut(n).enumerate() {
            let ranks = forward
                .ranks
                .as_deref()
                .map_or(&[][..], |p| &p[r * k_max * n..(r + 1) * k_max * n]);
            let cot = cotangent_row(cotangent, r, n, k_max);
            backward_into(op, batch, r, forward.mask_row(r), ranks, cot, grad_row);
        }
        Ok(grad)
    }
}
