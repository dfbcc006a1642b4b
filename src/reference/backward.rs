//! The backward passes of the reference: the closed form for top-k, implicit differentiation
//! (MATH.md §5) for the sorted variant.

use super::solve::column_jacobian;
use crate::linalg::solve_psd;

/// Top-k: ∂L/∂x_j = factor · A'_j · (g_j − ḡ), with A' = A(1 − A), ḡ the A'-weighted
/// mean of g and factor = 2/(s·ε). A saturated row (Σ A' = 0) gets a zero gradient.
pub fn topk_backward(mask: &[f64], grad_mask: &[f64], factor: f64) -> Vec<f64> {
    let slope: Vec<f64> = mask.iter().map(|&a| a * (1.0 - a)).collect();
    let total: f64 = slope.iter().sum();
    if !(total > 0.0) {
        return vec![0.0; mask.len()];
    }
    let mean = slope.iter().zip(grad_mask).map(|(s, g)| s * g).sum::<f64>() / total;
    slope
        .iter()
        .zip(grad_mask)
        .map(|(s, g)| factor * s * (g - mean))
        .collect()
}

/// The damping a sorted backward adds to J's diagonal when its plan was rounded to f32 (the
/// forward output of every backend). Such a plan keeps a nearly hard item's leftover mass
/// 1 − Σ_j P\[j\]\[i\] only to the f32 rounding of the ranks' sum (~k·6e-8 where f64 would
/// hold, say, 1e-90), which gives c a component along J's near-null directions (a block of
/// anchors that barely exchanges mass with the rest); 1e-10 relative damping then turned 6e-8
/// of noise into gradients of 10 on rows whose true gradient is 1e-12. J's entries are at most
/// 1 (a ranked column sums to 1), so damping at the plan's own noise level leaves those
/// directions O(g) and moves a well-determined direction (eigenvalue ≳ 0.01) by ≲ 1e-4 of
/// itself.
pub const ROUNDED_PLAN_DAMPING: f64 = 1e-6;

/// Sorted: implicit differentiation of the optimality conditions (MATH.md §5).
///
/// `ranks[j][i]` is the forward output `P[j][i]` on the valid entries, `grad_ranks[j][i]` is
/// `∂L/∂P[j][i]`, `anchors` are the k (k = n) or k + 1 anchor positions, factor = 2/(s·ε).
/// Everything is in units where the plan's rows sum to 1 (P = n·Γ), which turns §5 into:
///
/// ```text
/// W = g ⊙ P,  r = W·1,  c = (Wᵀ·1)[:m−1]
/// J β = c − P̃ᵀ r     (J the cancellation-free column Jacobian, β_last = 0)
/// α = r − P̃ β
/// ∂L/∂x_i = −factor · Σ_j P_ij · (α_i + β_j − g_ij) · y_j
/// ```
///
/// A singular or ill-conditioned J (a saturated row) gives a zero gradient.
///
/// `floor` is added to J's diagonal before the solve: 0 for a plan known to f64, and
/// [`ROUNDED_PLAN_DAMPING`] for a plan rounded to f32 (see there).
pub fn sorted_backward(
    ranks: &[Vec<f64>],
    grad_ranks: &[Vec<f64>],
    anchors: &[f64],
    factor: f64,
    floor: f64,
) -> Vec<f64> {
    let k = ranks.len();
    let n = ranks.first().map_or(0, Vec::len);
    let m = anchors.len();
    if k == 0 || n == 0 || m < 2 {
        return vec![0.0; n];
    }

    // The full plan, its leftover column (anchor 0) rebuilt from the row sums.
    let mut p = vec![0.0; n * m];
    let mut g = vec![0.0; n * m];
    for i in 0..n {
        for j in 0..k {
            p[i * m + j] = ranks[j][i];
            g[i * m + j] = grad_ranks[j][i];
        }
        if m > k {
            p[i * m + k] = (1.0 - (0..k).map(|j| ranks[j][i]).sum::<f64>()).max(0.0);
        }
    }
    // Each plan row sums to 1, up to the rounding of ranks given in f32 (~1e-7). J is singular
    // along a block of exactly tied items (nearly so on a nearly hard row), where only the
    // damping holds β and that defect alone moves it, by defect/damping: gradients of 1e4
    // where the exact plan's is ~0. Adding the defect to the row's largest entry removes it.
    for row in p.chunks_exact_mut(m) {
        let defect = 1.0 - row.iter().sum::<f64>();
        let big = (0..m).fold(0, |b, j| if row[j] > row[b] { j } else { b });
        row[big] += defect;
    }

    // Step 1: W = g ⊙ P, its row sums r and its first m − 1 column sums c.
    let free = m - 1;
    let w: Vec<f64> = p.iter().zip(&g).map(|(p, g)| p * g).collect();
    let r: Vec<f64> = w.chunks_exact(m).map(|row| row.iter().sum()).collect();
    let mut beta: Vec<f64> = (0..free)
        .map(|j| (0..n).map(|i| w[i * m + j] - p[i * m + j] * r[i]).sum())
        .collect();

    // Steps 2–3: β = J⁻¹ (c − P̃ᵀ r), then α.
    let mut jac = column_jacobian(&p, m);
    (0..free).for_each(|j| jac[j * free + j] += floor);
    if !solve_psd(&mut jac, &mut beta, free) {
        return vec![0.0; n];
    }
    beta.push(0.0);
    let alpha: Vec<f64> = (0..n)
        .map(|i| r[i] - (0..free).map(|j| p[i * m + j] * beta[j]).sum::<f64>())
        .collect();

    // Steps 4–5: through the cost C_ij = −2·x_i·y_j/s to the scores.
    (0..n)
        .map(|i| {
            let through_cost: f64 = (0..m)
                .map(|j| p[i * m + j] * (alpha[i] + beta[j] - g[i * m + j]) * anchors[j])
                .sum();
            -factor * through_cost
        })
        .collect()
}
