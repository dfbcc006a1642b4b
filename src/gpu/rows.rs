//! The host side of a batch: per-row checks and parameters, validity bits, and the split of a
//! batch into parts that fit the device's bindings and dispatch limits.

use std::ops::Range;

use bytemuck::{Pod, Zeroable};

use crate::batch::{check_row, RowSpec};
use crate::error::{Error, Result};
use crate::op::{Solver, Variant, DEFAULT_NEWTON_ITERATIONS};
use crate::output::RowReport;
use crate::{Batch, SoftTopK};

/// What a workgroup does with its row; mirrors `MODE_*` in shaders/common.wgsl.
pub const MODE_ZEROS: u32 = 0;
pub const MODE_ONES: u32 = 1;
pub const MODE_SOLVE: u32 = 2;

/// Transport solvers; mirror `SOLVER_*` in shaders/transport.wgsl.
pub const SOLVER_SINKHORN: u32 = 0;
pub const SOLVER_NEWTON: u32 = 1;

/// Sorted backward cotangents; mirror `COTANGENT_*` in shaders/sorted_backward.wgsl.
pub const COTANGENT_MASK: u32 = 0;
pub const COTANGENT_RANKS: u32 = 1;

/// The stopping tolerance of the GPU's default sorted solve (dual Newton), as a marginal error
/// in units of 1/n. The f64 reference runs to 1e-12; an f32 plan's column sums carry rounding
/// of a few 1e-7 per unit of weight, so 1e-5 is the tightest target it reaches reliably.
/// Rows with a wide scaled range get [`GPU_AUTO_RANGE_ROUNDINGS`] more (see there).
pub const GPU_AUTO_TOLERANCE: f64 = 1e-5;

/// The default sorted solve's tolerance also covers this many f32 roundings (2^-24 relative)
/// of the scaled spread of the scores that decide the plan, the k + 1 largest, (v_max −
/// v_(k+1))·2/(s·ε): every logit carries such a rounding, which moves the plan's column sums
/// by as much and puts a floor under the marginal error f32 can reach (about 2.4e-5 at a
/// scaled spread of 200, i.e. ε = 0.01 on scores in [−1, 1]). Scores further down sit deep in
/// the last anchor, where their rounding moves nothing.
pub const GPU_AUTO_RANGE_ROUNDINGS: f64 = 16.0;

/// One row's parameters. Mirrors `RowParams` in shaders/common.wgsl field for field (all
/// 4-byte scalars, so the WGSL array stride is the Rust size).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub(crate) struct RowParams {
    pub mode: u32,
    pub n: u32,
    pub n_valid: u32,
    pub k: u32,
    pub anchors: u32,
    pub ranked: u32,
    pub k_max: u32,
    pub solver: u32,
    pub max_iterations: u32,
    pub sign: f32,
    pub factor: f32,
    pub centre: f32,
    pub tolerance: f32,
    pub lo_hi: f32,
    pub lo_lo: f32,
    pub hi_hi: f32,
    pub hi_lo: f32,
    pub w_top: f32,
    pub w_last: f32,
    /// 1.0, read at run time to keep compensated sums from being simplified away.
    pub one_a: f32,
    pub one_b: f32,
}

impl Default for RowParams {
    fn default() -> Self {
        RowParams {
            one_a: 1.0,
            one_b: 1.0,
            ..Zeroable::zeroed()
        }
    }
}

/// x as an f32 pair hi + lo carrying about 48 bits.
fn split(x: f64) -> (f32, f32) {
    let hi = x as f32;
    (hi, (x - hi as f64) as f32)
}

/// A batch checked row by row: the rows' parameters, validity bits and initial reports.
pub(crate) struct Prepared {
    pub params: Vec<RowParams>,
    pub specs: Vec<Option<RowSpec>>,
    /// `rows × words` validity bits (see `words`).
    pub bits: Vec<u32>,
    /// Validity words per row: ceil(n / 32).
    pub words: usize,
    pub reports: Vec<RowReport>,
}

/// What the parameters are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pass {
    Forward,
    Backward { ranks_cotangent: bool },
}

/// Checks every row with [`check_row`] and builds its parameters; a bad row gets
/// `MODE_ZEROS` and a failed report, and never touches the other rows.
pub(crate) fn prepare(op: &SoftTopK, batch: &Batch, k_max: usize, pass: Pass) -> Prepared {
    let (rows, n) = (batch.rows(), batch.n());
    let words = n.div_ceil(32);
    let mut out = Prepared {
        params: Vec::with_capacity(rows),
        specs: Vec::with_capacity(rows),
        bits: vec![0; rows * words],
        words,
        reports: Vec::with_capacity(rows),
    };
    for r in 0..rows {
        match check_row(op, batch, r) {
            Ok(spec) => {
                let bits = &mut out.bits[r * words..(r + 1) * words];
                for col in 0..n {
                    if batch.is_valid(r, col, op.direction) {
                        bits[col / 32] |= 1 << (col % 32);
                    }
                }
                out.params.push(row_params(op, &spec, n, k_max, pass));
                out.reports.push(RowReport::exact(spec.k, spec.n_valid));
                out.specs.push(Some(spec));
            }
            Err(e) => {
                out.params.push(RowParams {
                    mode: MODE_ZEROS,
                    n: n as u32,
                    k_max: k_max as u32,
                    ..RowParams::default()
                });
                out.reports.push(RowReport::failed(e));
                out.specs.push(None);
            }
        }
    }
    out
}

fn row_params(op: &SoftTopK, spec: &RowSpec, n: usize, k_max: usize, pass: Pass) -> RowParams {
    let sign = op.direction.sign();
    let (v_min, v_max) = if sign > 0.0 {
        (spec.x_min, spec.x_max)
    } else {
        (-spec.x_max, -spec.x_min)
    };
    let (k, n_valid) = (spec.k, spec.n_valid);
    let sorted = op.variant == Variant::Sorted;
    let mut p = RowParams {
        mode: MODE_SOLVE,
        n: n as u32,
        n_valid: n_valid as u32,
        k: k as u32,
        k_max: k_max as u32,
        sign: sign as f32,
        factor: (2.0 / (spec.scale * op.epsilon)) as f32,
        centre: (0.5 * v_min + 0.5 * v_max) as f32,
        ..RowParams::default()
    };

    // Rows whose answer needs no solve (MATH.md §4 and §1).
    if k == 0 || (!sorted && spec.is_trivial(op.variant)) {
        p.mode = if k > 0 && pass == Pass::Forward {
            MODE_ONES
        } else {
            MODE_ZEROS
        };
        return p;
    }

    // Transport anchors: y_j = ranked − j; the last anchor (y = 0) takes the leftover weight
    // and is dropped when there is none (sorted with k = n_valid).
    if sorted {
        p.ranked = k as u32;
        p.anchors = if k < n_valid { k as u32 + 1 } else { k as u32 };
        p.w_top = 1.0;
    } else {
        p.ranked = 1;
        p.anchors = 2;
        p.w_top = k as f32;
    }
    p.w_last = (n_valid - k) as f32;

    match pass {
        Pass::Backward { ranks_cotangent } => {
            p.solver = if ranks_cotangent {
                COTANGENT_RANKS
            } else {
                COTANGENT_MASK
            };
        }
        Pass::Forward => {
            let (solver, tolerance, iterations) = match op.solver {
                Solver::Sinkhorn {
                    tolerance,
                    max_iterations,
                } => (SOLVER_SINKHORN, tolerance, max_iterations),
                Solver::Newton {
                    tolerance,
                    max_iterations,
                } => (SOLVER_NEWTON, tolerance, max_iterations),
                // The transport host raises the tolerance to its f32 floor (see
                // GPU_AUTO_RANGE_ROUNDINGS), which needs the row's order statistics.
                Solver::Auto | Solver::Exact => {
                    (SOLVER_NEWTON, GPU_AUTO_TOLERANCE, DEFAULT_NEWTON_ITERATIONS)
                }
            };
            p.solver = solver;
            p.tolerance = tolerance as f32;
            p.max_iterations = iterations;

            // The exact top-k bracket of tau (MATH.md §1, in v units): Σ σ((v − tau)·factor)
            // equals k at tau = v − T·logit(k/n) when every v is equal, T = s·ε/2.
            let temperature = 0.5 * spec.scale * op.epsilon;
            let logit = (k as f64 / (n_valid - k) as f64).ln();
            (p.lo_hi, p.lo_lo) = split(v_min - temperature * logit);
            (p.hi_hi, p.hi_lo) = split(v_max - temperature * logit);
        }
    }
    p
}

/// How many rows one dispatch takes: as many as fit one binding of `binding_limit` bytes
/// (`row_bytes` each), at most one workgroup per row along one dispatch dimension.
pub(crate) fn rows_per_part(
    n: usize,
    row_bytes: u64,
    binding_limit: u64,
    max_workgroups: u32,
) -> Result<usize> {
    if row_bytes > binding_limit {
        return Err(Error::TooLarge(format!(
            "one row of n = {n} needs a {row_bytes}-byte binding; the device allows \
             {binding_limit} bytes per binding"
        )));
    }
    Ok(((binding_limit / row_bytes.max(1)) as usize)
        .min(max_workgroups as usize)
        .max(1))
}

/// The batch's rows cut into consecutive parts of `per_part` rows.
pub(crate) fn parts(rows: usize, per_part: usize) -> Vec<Range<usize>> {
    (0..rows)
        .step_by(per_part.max(1))
        .map(|start| start..(start + per_part).min(rows))
        .collect()
}
