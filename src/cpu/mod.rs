//! The fast CPU backend: f32 storage, rows in parallel on every core.
//!
//! Top-k with the exact solve runs in f32 SIMD-friendly loops (see [`kernels`]), with the
//! threshold and all scalar bookkeeping in f64. Everything else — the sorted variant and the
//! Sinkhorn solver — runs the f64 reference row by row, in parallel: its cost sits in k×k
//! solves and log-sum-exps over k + 1 anchors, where f64 costs little over f32.

pub mod kernels;
pub(crate) mod topk;

use rayon::prelude::*;

use crate::error::Result;
use crate::op::{Solver, Variant};
use crate::reference::{backward_into, cotangent_row, forward_into};
use crate::{check_backward_args, Backend, Batch, Cotangent, Forward, SoftTopK};

/// The fast CPU backend. Cheap to create; uses rayon's global thread pool.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend
    }
}

/// Whether a problem takes the f32 top-k path rather than the reference.
fn fast_topk(op: &SoftTopK) -> bool {
    op.variant == Variant::TopK && matches!(op.solver, Solver::Auto | Solver::Exact)
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        "cpu".into()
    }

    fn forward(&self, op: &SoftTopK, batch: &Batch) -> Result<Forward> {
        op.check(batch.rows())?;
        let (rows, n) = (batch.rows(), batch.n());
        let sorted = op.variant == Variant::Sorted;
        let k_max = if sorted { op.rank_slots(rows, n) } else { 0 };
        let mut fwd = Forward::zeros(rows, n, k_max, sorted);

        // One rank slot block per row; top-k rows get an empty block (chunks must not be 0).
        let slot_len = (k_max * n).max(1);
        let mut no_ranks = vec![0.0f32; rows];
        let ranks = fwd.ranks.as_deref_mut().filter(|p| !p.is_empty());
        let ranks = ranks.unwrap_or(&mut no_ranks[..]);
        fwd.reports = fwd
            .mask
            .par_chunks_mut(n)
            .zip(ranks.par_chunks_mut(slot_len))
            .enumerate()
            .map(|(r, (mask, ranks))| {
                let ranks = &mut ranks[..k_max * n];
                if fast_topk(op) {
                    topk::forward_row(op, batch, r, mask)
                } else {
                    forward_into(op, batch, r, mask, ranks)
                }
            })
            .collect();
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
        grad.par_chunks_mut(n)
            .enumerate()
            .for_each(|(r, grad_row)| {
                let mask = forward.mask_row(r);
                let cot = cotangent_row(cotangent, r, n, k_max);
                match (op.variant, cot) {
                    (Variant::TopK, Cotangent::Mask(g)) => {
                        topk::backward_row(op, batch, r, mask, g, grad_row)
                    }
                    _ => {
                        let ranks = forward
                            .ranks
                            .as_deref()
                            .map_or(&[][..], |p| &p[r * k_max * n..(r + 1) * k_max * n]);
                        backward_into(op, batch, r, mask, ranks, cot, grad_row)
                    }
                }
            });
        Ok(grad)
    }
}
