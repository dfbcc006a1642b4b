//! # soft-topk
//!
//! The SOFT top-k operator of Xie et al., "Differentiable Top-k Operator with Optimal
//! Transport" (NeurIPS 2020), batched, exact, on any GPU through wgpu, with CPU backends that
//! give the same answers.
//!
//! ## The operator in brief
//!
//! Top-k of a row x ∈ Rⁿ is an entropic optimal-transport problem from the n scores (weight
//! 1/n each) to two anchors y = 0 and y = 1 (weights (n − k)/n and k/n), with cost
//! (x − y)² / s and entropy ε. The soft mask A_i = n · Γ_{i,1} lies in [0, 1], sums to k, and
//! tends to the hard top-k indicator as ε → 0. With two anchors the solution is exact:
//!
//! ```text
//! A_i = σ((2·x_i − τ) / (s·ε)),   τ the unique root of Σ_i A_i(τ) = k,
//! ```
//!
//! so top-k is a scalar root search, not an iteration to convergence. Its gradient is closed
//! form: ∂L/∂x_j = (2/(s·ε)) · A_j(1 − A_j) · (g_j − ḡ), with ḡ the mean of the
//! upstream gradient g weighted by A(1 − A).
//!
//! The sorted variant uses k + 1 anchors (k, k − 1, …, 0) and returns one soft one-hot per
//! rank. It is solved iteratively (dual Newton or log-domain Sinkhorn) and differentiated
//! implicitly through a k×k linear solve.
//!
//! Conventions: the largest k by default (smallest on request); cost scale s = 1 by default
//! (`Scale::Max` takes the paper's per-row maximum cost); −∞ (+∞ in smallest mode) or a false
//! validity flag excludes an entry; a row with fewer valid entries than k gets 1 on all of them.
//!
//! ## Backends
//!
//! - [`reference`](mod@reference): plain f64 loops. It defines correctness; every other path
//!   is tested against it.
//! - [`cpu::CpuBackend`]: f32 storage, rows in parallel on all cores.
//! - [`gpu::GpuBackend`]: WGSL compute shaders through wgpu (Vulkan, Metal, DX12): both
//!   variants and every solver, forward and backward; the sorted variant with k above
//!   [`gpu::SORTED_K_MAX`] and rows f32 cannot carry are handed to the CPU (logged once).
//! - [`GpuSoftTopK`]: an operator bound to a backend; by default the GPU when a hardware
//!   adapter exists and the CPU otherwise, said once in the log.
//!
//! ```
//! use soft_topk::{Batch, Cotangent, GpuSoftTopK, SoftTopK};
//!
//! let scores = [0.1f32, 0.9, 0.5, 0.3, 2.0, -1.0, 0.0, 0.2];
//! let batch = Batch::new(&scores, 2, 4)?;
//! let topk = GpuSoftTopK::new(SoftTopK::new(2, 0.01))?;
//! let out = topk.run(&batch)?;
//! assert!((out.mask_row(0).iter().sum::<f32>() - 2.0).abs() < 1e-4);
//!
//! let upstream = [1.0f32, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0];
//! let grad = topk.backward(&batch, &out, Cotangent::Mask(&upstream))?;
//! assert_eq!(grad.len(), 8);
//! # Ok::<(), soft_topk::Error>(())
//! ```

// Comparisons such as `!(x > 0.0)` are meant to be true for NaN as well: they guard the
// divisions and square roots that follow.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

pub mod batch;
pub mod cpu;
mod engine;
pub mod error;
pub mod gpu;
pub mod io;
mod linalg;
pub mod op;
pub mod output;
pub mod reference;

pub use batch::{check_row, Batch, RowSpec};
pub use engine::{BackendKind, GpuSoftTopK};
pub use error::{Error, GpuErrorKind, Result};
pub use op::{Direction, Scale, SoftTopK, Solver, Variant, K};
pub use output::{Cotangent, Forward, RowReport};

/// A place the operator runs. Every backend gives the same answers within its precision.
pub trait Backend: Send + Sync {
    /// A short name for logs and reports (`"reference"`, `"cpu"`, `"gpu (<adapter>)"`).
    fn name(&self) -> String;

    /// The forward pass. Input errors of a row are reported in its [`RowReport`]; `Err` is
    /// for errors of the call itself (ε, shapes, the device).
    fn forward(&self, op: &SoftTopK, batch: &Batch) -> Result<Forward>;

    /// The backward pass: the gradient of the scores, `rows × n`, from the upstream gradient
    /// of the mask or of the ranks. Stateless: `forward` must be this backend's (or any
    /// backend's) forward output for the same `op` and `batch`.
    fn backward(
        &self,
        op: &SoftTopK,
        batch: &Batch,
        forward: &Forward,
        cotangent: Cotangent,
    ) -> Result<Vec<f32>>;
}

/// Checks that a backward call's pieces fit together; shared by every backend.
pub(crate) fn check_backward_args(
    op: &SoftTopK,
    batch: &Batch,
    forward: &Forward,
    cotangent: Cotangent,
) -> Result<()> {
    op.check(batch.rows())?;
    let mismatch = |what, expected, actual| Error::ShapeMismatch {
        what,
        expected,
        actual,
    };
    let (rows, n) = (batch.rows(), batch.n());
    if forward.rows != rows || forward.n != n || forward.mask.len() != rows * n {
        return Err(mismatch(
            "forward output rows × n",
            rows * n,
            forward.mask.len(),
        ));
    }
    // The forward must be this op's: its rank slots are what the backward reads, and slots
    // of another k (or a top-k forward given to a sorted backward) would be read past their
    // end or silently give the gradient of another problem.
    let k_max = match op.variant {
        Variant::TopK => 0,
        Variant::Sorted => op.rank_slots(rows, n),
    };
    let ranks_len = forward.ranks.as_ref().map(Vec::len);
    let expected_ranks = (op.variant == Variant::Sorted).then_some(rows * k_max * n);
    if forward.k_max != k_max || ranks_len != expected_ranks {
        return Err(mismatch(
            "forward output ranks (rows × k × n; none for top-k)",
            rows * k_max * n,
            ranks_len.unwrap_or(0),
        ));
    }
    match cotangent {
        Cotangent::Mask(g) if g.len() != batch.rows() * batch.n() => Err(mismatch(
            "mask cotangent",
            batch.rows() * batch.n(),
            g.len(),
        )),
        Cotangent::Ranks(g) => {
            if op.variant != Variant::Sorted || forward.ranks.is_none() {
                return Err(Error::InvalidOption(
                    "a ranks cotangent needs the sorted variant's forward output".into(),
                ));
            }
            let expected = batch.rows() * forward.k_max * batch.n();
            if g.len() != expected {
                return Err(mismatch("ranks cotangent", expected, g.len()));
            }
            Ok(())
        }
        Cotangent::Mask(_) => Ok(()),
    }
}
