//! The operator description: what to compute, independent of where it runs.

use crate::error::{Error, Result};

/// Which end of the scores is selected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Direction {
    /// The k largest scores (the default). −∞ marks an excluded entry.
    #[default]
    Largest,
    /// The k smallest scores. +∞ marks an excluded entry.
    Smallest,
}

impl Direction {
    /// +1 for largest, −1 for smallest: smallest-k of x is largest-k of −x, with the gradient
    /// negated (the cost scale is always taken on the raw scores).
    pub fn sign(self) -> f64 {
        match self {
            Direction::Largest => 1.0,
            Direction::Smallest => -1.0,
        }
    }
}

/// The two operators of the paper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Variant {
    /// Two anchors: a soft mask in [0, 1] that sums to k.
    #[default]
    TopK,
    /// k + 1 anchors: one soft one-hot per rank (`ranks[j]` for the (j+1)-th selected item), and
    /// the mask as their sum.
    Sorted,
}

/// The cost scale s of the cost (x − y)² / s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scale {
    /// s = 1: ε is in score units, the operator is shift-invariant and homogeneous.
    #[default]
    None,
    /// s = the row's largest (x − y)² over valid scores and anchors, as in the paper's code, but
    /// per row. Held constant in the backward pass.
    Max,
}

/// How the transport problem is solved.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Solver {
    /// The exact threshold solve for top-k, dual Newton for sorted.
    #[default]
    Auto,
    /// Top-k only: bracketed safeguarded Newton on the scalar threshold, to machine precision.
    Exact,
    /// Log-domain Sinkhorn: stops when the marginal error (the largest |column sum − ν_j| of
    /// the plan, in units of 1/n) falls to `tolerance`, or after `max_iterations` sweeps.
    /// A tolerance of 0 runs exactly `max_iterations` sweeps, as the paper's code does; the
    /// report's `converged` then says whether they reached [`DEFAULT_TOLERANCE`] — on the GPU
    /// backend, which solves in f32, whether they reached
    /// [`GPU_AUTO_TOLERANCE`](crate::gpu::GPU_AUTO_TOLERANCE) (1e-5), so it may count rows
    /// converged that an f64 solve does not.
    Sinkhorn { tolerance: f64, max_iterations: u32 },
    /// Sorted only: Newton's method on the k anchor potentials, each step a k×k solve, with a
    /// backtracking line search; stops like Sinkhorn.
    Newton { tolerance: f64, max_iterations: u32 },
}

impl Solver {
    /// The paper's setting: 200 log-domain Sinkhorn sweeps, no stopping rule.
    pub const PAPER: Solver = Solver::Sinkhorn {
        tolerance: 0.0,
        max_iterations: 200,
    };

    /// Sinkhorn run to a marginal error of `tolerance`, at most `max_iterations` sweeps.
    pub fn sinkhorn(tolerance: f64, max_iterations: u32) -> Solver {
        Solver::Sinkhorn {
            tolerance,
            max_iterations,
        }
    }
}

/// Default stopping tolerance of the iterative solvers (marginal error in units of 1/n).
pub const DEFAULT_TOLERANCE: f64 = 1e-6;
/// Default iteration cap of dual Newton.
pub const DEFAULT_NEWTON_ITERATIONS: u32 = 200;

/// k for every row, or one k per row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum K {
    All(usize),
    PerRow(Vec<usize>),
}

/// The SOFT top-k operator: k, ε, direction, variant, cost scale and solver.
///
/// ```
/// use soft_topk::{SoftTopK, Direction};
/// let op = SoftTopK::new(3, 0.05).direction(Direction::Smallest);
/// assert!(op.check(1).is_ok());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct SoftTopK {
    pub k: K,
    pub epsilon: f64,
    pub direction: Direction,
    pub variant: Variant,
    pub scale: Scale,
    pub solver: Solver,
}

impl SoftTopK {
    /// Top-k of the largest scores with one k for all rows, scale `none`, the default solver.
    pub fn new(k: usize, epsilon: f64) -> Self {
        SoftTopK {
            k: K::All(k),
            epsilon,
            direction: Direction::Largest,
            variant: Variant::TopK,
            scale: Scale::None,
            solver: Solver::Auto,
        }
    }

    /// One k per row (its length must equal the batch's rows).
    pub fn per_row_k(mut self, ks: Vec<usize>) -> Self {
        self.k = K::PerRow(ks);
        self
    }

    pub fn direction(mut self, direction: Direction) -> Self {
        self.direction = direction;
        self
    }

    pub fn smallest(self) -> Self {
        self.direction(Direction::Smallest)
    }

    pub fn variant(mut self, variant: Variant) -> Self {
        self.variant = variant;
        self
    }

    pub fn sorted(self) -> Self {
        self.variant(Variant::Sorted)
    }

    pub fn scale(mut self, scale: Scale) -> Self {
        self.scale = scale;
        self
    }

    pub fn solver(mut self, solver: Solver) -> Self {
        self.solver = solver;
        self
    }

    /// k of one row.
    pub fn k_of(&self, row: usize) -> usize {
        match &self.k {
            K::All(k) => *k,
            K::PerRow(ks) => ks.get(row).copied().unwrap_or(0),
        }
    }

    /// The largest k over `rows` rows: the number of rank slots of the sorted output.
    pub fn k_max(&self, rows: usize) -> usize {
        match &self.k {
            K::All(k) => *k,
            K::PerRow(ks) => ks.iter().take(rows).copied().max().unwrap_or(0),
        }
    }

    /// The rank slots per row of a sorted output over `rows` rows of `n`: the largest k, but
    /// never more than n. A row whose k passes n is an input error with no ranks, so a huge k
    /// must not size the output (k = 2⁴⁰ on a row of 4 tried to allocate 16 TiB).
    pub fn rank_slots(&self, rows: usize, n: usize) -> usize {
        self.k_max(rows).min(n)
    }

    /// Checks what can be checked without the scores: ε, the per-row k list against `rows`,
    /// and that the solver fits the variant.
    pub fn check(&self, rows: usize) -> Result<()> {
        if let K::PerRow(ks) = &self.k {
            if ks.len() != rows {
                return Err(Error::ShapeMismatch {
                    what: "per-row k",
                    expected: rows,
                    actual: ks.len(),
                });
            }
        }
        self.check_settings()
    }

    /// [`SoftTopK::check`] without the batch: ε, and that the solver fits the variant.
    pub fn check_settings(&self) -> Result<()> {
        if !(self.epsilon.is_finite() && self.epsilon > 0.0) {
            return Err(Error::EpsNotPositive {
                epsilon: self.epsilon,
            });
        }
        match (self.variant, self.solver) {
            (Variant::Sorted, Solver::Exact) => Err(Error::InvalidOption(
                "the exact threshold solve is for top-k; the sorted variant uses Newton or \
                 Sinkhorn"
                    .into(),
            )),
            (Variant::TopK, Solver::Newton { .. }) => Err(Error::InvalidOption(
                "dual Newton is for the sorted variant; top-k is solved exactly".into(),
            )),
            (_, Solver::Sinkhorn { tolerance, .. } | Solver::Newton { tolerance, .. })
                if !(tolerance >= 0.0) =>
            {
                Err(Error::InvalidOption(format!(
                    "solver tolerance {tolerance} must be >= 0"
                )))
            }
            _ => Ok(()),
        }
    }
}
