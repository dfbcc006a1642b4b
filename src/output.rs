//! What a forward pass returns, and the upstream gradient a backward pass takes.

use crate::error::{Error, Result};

/// How one row's solve went.
#[derive(Debug, Clone, PartialEq)]
pub struct RowReport {
    /// k as solved: the requested k lowered to the number of valid entries.
    pub k: usize,
    /// Number of valid entries.
    pub n_valid: usize,
    /// Whether the solver met its tolerance. Non-convergence is a report, not an error.
    pub converged: bool,
    /// Solver iterations used (root-search steps, Sinkhorn sweeps or Newton steps).
    pub iterations: u32,
    /// The largest violation of the plan's marginals, in units of 1/n:
    /// max_j |n · Σ_i Γ_ij − n · ν_j|. For top-k this is |Σ mask − k|.
    pub marginal_error: f64,
    /// The row's input error, if it had one. Its outputs are then 0 and its gradient 0.
    pub error: Option<Error>,
}

impl RowReport {
    /// The report of a row whose answer needs no iteration (k = 0, k = n, no valid entry).
    pub fn exact(k: usize, n_valid: usize) -> Self {
        RowReport {
            k,
            n_valid,
            converged: true,
            iterations: 0,
            marginal_error: 0.0,
            error: None,
        }
    }

    /// The report of a row that could not be solved.
    pub fn failed(error: Error) -> Self {
        RowReport {
            k: 0,
            n_valid: 0,
            converged: false,
            iterations: 0,
            marginal_error: 0.0,
            error: Some(error),
        }
    }
}

/// The forward output for a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Forward {
    pub rows: usize,
    pub n: usize,
    /// Rank slots per row of `ranks` (the largest k of the batch, at most n; 0 for top-k).
    pub k_max: usize,
    /// The soft mask, `rows × n`, row-major.
    pub mask: Vec<f32>,
    /// Sorted variant only: `rows × k_max × n`; `ranks[(r * k_max + j) * n + i]` is the
    /// weight of item i in rank j of row r. Ranks beyond a row's k are 0.
    pub ranks: Option<Vec<f32>>,
    /// One report per row.
    pub reports: Vec<RowReport>,
}

impl Forward {
    /// All zeros, for a batch of the given shape (rows with errors keep these zeros).
    pub fn zeros(rows: usize, n: usize, k_max: usize, sorted: bool) -> Self {
        Forward {
            rows,
            n,
            k_max,
            mask: vec![0.0; rows * n],
            ranks: sorted.then(|| vec![0.0; rows * k_max * n]),
            reports: Vec::with_capacity(rows),
        }
    }

    /// The mask of row `r`.
    pub fn mask_row(&self, r: usize) -> &[f32] {
        &self.mask[r * self.n..(r + 1) * self.n]
    }

    /// Rank `j` of row `r` (sorted variant).
    pub fn rank_row(&self, r: usize, j: usize) -> Option<&[f32]> {
        let start = (r * self.k_max + j) * self.n;
        self.ranks.as_ref().map(|p| &p[start..start + self.n])
    }

    /// The first row error, if any row had one.
    pub fn first_error(&self) -> Option<&Error> {
        self.reports.iter().find_map(|r| r.error.as_ref())
    }

    /// `Ok(self)` when no row had an input error, else the first row's error.
    pub fn into_result(self) -> Result<Self> {
        match self.first_error() {
            Some(e) => Err(e.clone()),
            None => Ok(self),
        }
    }
}

/// The upstream gradient of a backward pass.
#[derive(Debug, Clone, Copy)]
pub enum Cotangent<'a> {
    /// ∂L/∂mask, `rows × n`. For the sorted variant this counts for every rank, since
    /// `mask = Σ_j ranks[j]`.
    Mask(&'a [f32]),
    /// Sorted variant only: ∂L/∂ranks, `rows × k_max × n`, laid out as [`Forward::ranks`].
    Ranks(&'a [f32]),
}
