//! A batch of score rows, its exclusions, and the per-row checks every backend shares.

use crate::error::{Error, Result};
use crate::op::{Direction, Scale, SoftTopK, Variant};

/// `rows × n` f32 scores, row-major, with an optional validity mask of the same shape.
///
/// An entry takes part in its row when its mask value is `true` (or there is no mask) and it is
/// not −∞ in largest mode (+∞ in smallest mode). Excluded entries are never read otherwise,
/// so a masked-out NaN is harmless; they get output 0 and gradient 0.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    scores: &'a [f32],
    valid: Option<&'a [bool]>,
    rows: usize,
    n: usize,
}

impl<'a> Batch<'a> {
    /// A batch of `rows` rows of `n` scores each; `scores.len()` must be `rows * n`, n ≥ 1.
    pub fn new(scores: &'a [f32], rows: usize, n: usize) -> Result<Self> {
        if n == 0 {
            return Err(Error::EmptyInput);
        }
        let expected = rows.checked_mul(n).ok_or(Error::ShapeMismatch {
            what: "scores (rows × n overflows)",
            expected: usize::MAX,
            actual: scores.len(),
        })?;
        if scores.len() != expected {
            return Err(Error::ShapeMismatch {
                what: "scores",
                expected,
                actual: scores.len(),
            });
        }
        Ok(Batch {
            scores,
            valid: None,
            rows,
            n,
        })
    }

    /// One row of `n` scores.
    pub fn single(scores: &'a [f32]) -> Result<Self> {
        Batch::new(scores, 1, scores.len())
    }

    /// Adds a validity mask, `rows × n`, row-major.
    pub fn with_valid(mut self, valid: &'a [bool]) -> Result<Self> {
        if valid.len() != self.scores.len() {
            return Err(Error::ShapeMismatch {
                what: "validity mask",
                expected: self.scores.len(),
                actual: valid.len(),
            });
        }
        self.valid = Some(valid);
        Ok(self)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn scores(&self) -> &'a [f32] {
        self.scores
    }

    pub fn valid(&self) -> Option<&'a [bool]> {
        self.valid
    }

    /// The scores of row `r`.
    pub fn row(&self, r: usize) -> &'a [f32] {
        &self.scores[r * self.n..(r + 1) * self.n]
    }

    /// The validity mask of row `r`, if there is a mask.
    pub fn valid_row(&self, r: usize) -> Option<&'a [bool]> {
        self.valid.map(|v| &v[r * self.n..(r + 1) * self.n])
    }

    /// Whether entry `col` of row `r` takes part (see the type's docs).
    pub fn is_valid(&self, r: usize, col: usize, direction: Direction) -> bool {
        let masked_in = self.valid.is_none_or(|v| v[r * self.n + col]);
        masked_in && !is_excluded_infinity(self.scores[r * self.n + col], direction)
    }
}

/// −∞ in largest mode, +∞ in smallest mode: the values that mean "leave this entry out".
pub fn is_excluded_infinity(x: f32, direction: Direction) -> bool {
    match direction {
        Direction::Largest => x == f32::NEG_INFINITY,
        Direction::Smallest => x == f32::INFINITY,
    }
}

/// What a checked row looks like to a solver.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowSpec {
    /// Number of valid entries.
    pub n_valid: usize,
    /// k after lowering it to `n_valid` (MATH.md §4).
    pub k: usize,
    /// The cost scale s (1 for scale `none`).
    pub scale: f64,
    /// Smallest and largest valid score (0 when the row has no valid entry).
    pub x_min: f64,
    pub x_max: f64,
}

impl RowSpec {
    /// Whether the output is exact and the gradient 0, whatever the solver: k = 0, or for top-k
    /// k = n_valid (all 1), or for sorted a single valid entry. (Sorted with k = n_valid > 1 is
    /// a soft permutation, not trivial.)
    pub fn is_trivial(&self, variant: Variant) -> bool {
        match variant {
            Variant::TopK => self.k == 0 || self.k == self.n_valid,
            Variant::Sorted => self.k == 0 || self.n_valid <= 1,
        }
    }
}

/// Checks row `r` of `batch` for `op` and measures it: NaN, the wrong infinity, k > n.
///
/// The op itself (ε, per-row k length) is checked once per call by [`SoftTopK::check`].
pub fn check_row(op: &SoftTopK, batch: &Batch, r: usize) -> Result<RowSpec> {
    let (row, valid) = (batch.row(r), batch.valid_row(r));
    if valid.is_none() && op.k_of(r) <= row.len() {
        // The common row, every entry finite, in one vectorised pass; a row with an exclusion
        // or a bad value takes the full loop below, which says which entry and why.
        if let Some((x_min, x_max)) = crate::cpu::kernels::finite_range(row) {
            return row_spec(op, r, row.len(), x_min as f64, x_max as f64);
        }
    }
    check_row_values(op, r, row, valid)
}

/// [`check_row`] for one row given as values (f32 or f64) and an optional validity mask.
pub fn check_row_values<T: Copy + Into<f64>>(
    op: &SoftTopK,
    r: usize,
    scores: &[T],
    valid: Option<&[bool]>,
) -> Result<RowSpec> {
    let n = scores.len();
    let k_requested = op.k_of(r);
    if k_requested > n {
        return Err(Error::KOutOfRange {
            row: r,
            k: k_requested,
            n,
        });
    }

    let excluded = match op.direction {
        Direction::Largest => f64::NEG_INFINITY,
        Direction::Smallest => f64::INFINITY,
    };
    let (mut n_valid, mut x_min, mut x_max) = (0usize, f64::INFINITY, f64::NEG_INFINITY);
    for (col, x) in scores.iter().map(|&x| x.into()).enumerate() {
        if x == excluded || valid.is_some_and(|v| !v[col]) {
            continue;
        }
        if !x.is_finite() {
            let why = if x.is_nan() {
                "NaN"
            } else if op.direction == Direction::Largest {
                "+inf in largest mode; -inf excludes an entry"
            } else {
                "-inf in smallest mode; +inf excludes an entry"
            };
            return Err(Error::NonFiniteInput {
                row: r,
                col,
                value: x,
                why,
            });
        }
        n_valid += 1;
        x_min = x_min.min(x);
        x_max = x_max.max(x);
    }
    if n_valid == 0 {
        (x_min, x_max) = (0.0, 0.0);
    }
    row_spec(op, r, n_valid, x_min, x_max)
}

/// The spec of row `r` with `n_valid` valid entries in [x_min, x_max]; k ≤ n already checked.
fn row_spec(op: &SoftTopK, r: usize, n_valid: usize, x_min: f64, x_max: f64) -> Result<RowSpec> {
    let k = op.k_of(r).min(n_valid);
    let scale = match op.scale {
        Scale::None => 1.0,
        Scale::Max => {
            // (x − y)² is convex in x and in y, so its maximum over the row and the anchor set
            // sits at a corner: x ∈ {x_min, x_max}, y ∈ {0, y_top}.
            let y_top = match op.variant {
                Variant::TopK => 1.0,
                Variant::Sorted => k as f64,
            };
            [x_min, x_max]
                .into_iter()
                .flat_map(|x| [x * x, (x - y_top) * (x - y_top)])
                .fold(0.0, f64::max)
        }
    };
    Ok(RowSpec {
        n_valid,
        k,
        scale,
        x_min,
        x_max,
    })
}
