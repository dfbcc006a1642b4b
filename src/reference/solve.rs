//! The forward solvers of the reference: the exact threshold, log-domain Sinkhorn, dual Newton.
//!
//! Each works on scaled scores u (see the module above) and returns the plan scaled by n, so
//! that each row of the plan sums to 1 and column j sums to its weight w_j = n·ν_j.

use crate::linalg::solve_psd;

/// A solved plan, scaled by n: `p[i * m + j] = n · Γ_ij`.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub p: Vec<f64>,
    pub m: usize,
    pub converged: bool,
    pub iterations: u32,
    /// max_j |Σ_i p_ij − w_j|, or for the exact top-k solve |Σ_i A_i − k|.
    pub marginal_error: f64,
}

impl Plan {
    /// Every entry selected (top-k with k = n).
    pub fn ones_column(n: usize) -> Plan {
        Plan {
            p: vec![1.0; n],
            m: 1,
            converged: true,
            iterations: 0,
            marginal_error: 0.0,
        }
    }
}

/// σ(z) = 1/(1 + e^(−z)), without overflow for either sign.
pub fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// σ'(z) = σ(z)·σ(−z), without cancellation: e^(−|z|) / (1 + e^(−|z|))².
pub fn sigmoid_slope(z: f64) -> f64 {
    let e = (-z.abs()).exp();
    e / ((1.0 + e) * (1.0 + e))
}

/// log Σ exp(v), shifted by the maximum so that nothing overflows.
pub fn log_sum_exp(v: impl Iterator<Item = f64> + Clone) -> f64 {
    let top = v.clone().fold(f64::NEG_INFINITY, f64::max);
    if top == f64::NEG_INFINITY {
        return top;
    }
    top + v.map(|x| (x - top).exp()).sum::<f64>().ln()
}

/// Neumaier's compensated sum: the reference's sums carry no rounding worth mentioning.
fn accurate_sum(v: impl Iterator<Item = f64>) -> f64 {
    let (mut sum, mut carry) = (0.0f64, 0.0f64);
    for x in v {
        let t = sum + x;
        carry += if sum.abs() >= x.abs() {
            (sum - t) + x
        } else {
            (x - t) + sum
        };
        sum = t;
    }
    sum + carry
}

/// Root-search steps before the exact solve gives up (it needs about 10 on ordinary rows;
/// bisection alone from the widest f64 bracket needs under 2,100).
const MAX_THRESHOLD_STEPS: u32 = 2_200;

/// The threshold t with Σ_i σ(u_i − t) = k, for 0 < k < n, by safeguarded Newton.
///
/// Σ σ(u_i − t) falls monotonically in t, so the root lies in the bracket
/// [u_min − logit(k/n), u_max − logit(k/n)]; a Newton step that leaves the bracket, or a flat
/// slope, is replaced by bisection. Returns the threshold, the steps taken, and whether the
/// root was reached to machine precision.
pub fn exact_threshold(u: &[f64], k: usize) -> (f64, u32, bool) {
    let n = u.len();
    let logit = (k as f64 / (n - k) as f64).ln();
    let u_min = u.iter().copied().fold(f64::INFINITY, f64::min);
    let u_max = u.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (mut lo, mut hi) = (u_min - logit, u_max - logit);

    // Start between the k-th and (k+1)-th largest score: the hard threshold, often already
    // within reach of Newton's quadratic convergence.
    let mut sorted = u.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let mut t = (0.5 * sorted[k - 1] + 0.5 * sorted[k]).clamp(lo, hi);

    // Σ σ carries a rounding error of a few ulps per term.
    let tolerance = 4.0 * n as f64 * f64::EPSILON;
    for step in 1..=MAX_THRESHOLD_STEPS {
        let excess = accurate_sum(u.iter().map(|&v| sigmoid(v - t))) - k as f64;
        if excess.abs() <= tolerance {
            return (t, step, true);
        }
        if excess > 0.0 {
            lo = t;
        } else {
            hi = t;
        }
        let slope = accurate_sum(u.iter().map(|&v| sigmoid_slope(v - t)));
        let newton = t + excess / slope;
        let next = if slope > 0.0 && newton > lo && newton < hi {
            newton
        } else {
            0.5 * lo + 0.5 * hi
        };
        if next <= lo || next >= hi {
            // The bracket holds no float strictly inside: t is as exact as f64 allows.
            return (t, step, true);
        }
        t = next;
    }
    (t, MAX_THRESHOLD_STEPS, false)
}

/// The exact two-anchor top-k: the mask as a one-column plan.
pub(crate) fn exact_topk(u: &[f64], k: usize) -> Plan {
    if u.iter().any(|v| !v.is_finite()) {
        return hard_topk(u, k);
    }
    let (t, iterations, converged) = exact_threshold(u, k);
    let p: Vec<f64> = u.iter().map(|&v| sigmoid(v - t)).collect();
    let marginal_error = (accurate_sum(p.iter().copied()) - k as f64).abs();
    Plan {
        p,
        m: 1,
        converged,
        iterations,
        marginal_error,
    }
}

/// The ε → 0 limit, for temperatures so small that the scaled scores overflow: 1 above the
/// k-th largest score, 0 below, and ties at the k-th largest share what is left.
fn hard_topk(u: &[f64], k: usize) -> Plan {
    let mut sorted = u.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let cut = sorted[k - 1];
    let above = u.iter().filter(|&&v| v > cut).count();
    let tied = u.iter().filter(|&&v| v == cut).count();
    let share = (k - above) as f64 / tied as f64;
    let p = u
        .iter()
        .map(|&v| {
            if v > cut {
                1.0
            } else if v == cut {
                share
            } else {
                0.0
            }
        })
        .collect();
    Plan {
        p,
        m: 1,
        converged: true,
        iterations: 0,
        marginal_error: 0.0,
    }
}

/// The plan n·Γ_ij = exp(f_i + g_j + u_i·y_j) for row potentials that make every row sum
/// to 1: f_i = −LSE_j(g_j + u_i·y_j). Returns the plan and f.
fn plan_from_column_potentials(u: &[f64], anchors: &[f64], g: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let m = anchors.len();
    let mut p = vec![0.0; u.len() * m];
    let mut f = vec![0.0; u.len()];
    for (i, &ui) in u.iter().enumerate() {
        let logits = anchors.iter().zip(g).map(|(&y, &gj)| gj + ui * y);
        f[i] = -log_sum_exp(logits.clone());
        for (j, l) in logits.enumerate() {
            p[i * m + j] = (f[i] + l).exp();
        }
    }
    (p, f)
}

/// Column sums of a plan with m columns.
fn column_sums(p: &[f64], m: usize) -> Vec<f64> {
    (0..m)
        .map(|j| accurate_sum(p.iter().skip(j).step_by(m).copied()))
        .collect()
}

fn largest_gap(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Log-domain Sinkhorn from the scores u to the anchors with weights w (units of 1/n).
///
/// Each sweep makes the columns exact (g_j = log w_j − LSE_i(f_i + u_i·y_j)), then the rows
/// (f_i = −LSE_j(g_j + u_i·y_j)); the plan returned is the one after the row update, so its
/// rows sum to 1 and its marginal error is the columns' largest violation. It stops when that
/// error is at most `tolerance`, or after `max_iterations` sweeps (tolerance 0: exactly that
/// many, as the paper's code runs).
pub fn sinkhorn(
    u: &[f64],
    anchors: &[f64],
    weights: &[f64],
    tolerance: f64,
    max_iterations: u32,
) -> Plan {
    let m = anchors.len();
    let mut g = vec![0.0; m];
    let (mut p, mut f) = plan_from_column_potentials(u, anchors, &g);
    let mut error = largest_gap(&column_sums(&p, m), weights);
    let mut sweeps = 0;
    while sweeps < max_iterations && !(error <= tolerance && tolerance > 0.0) {
        for j in 0..m {
            let lse = log_sum_exp(u.iter().zip(&f).map(|(&ui, &fi)| fi + ui * anchors[j]));
            g[j] = weights[j].ln() - lse;
        }
        (p, f) = plan_from_column_potentials(u, anchors, &g);
        error = largest_gap(&column_sums(&p, m), weights);
        sweeps += 1;
    }
    // With no stopping rule (tolerance 0) the sweeps count as converged when they reach the
    // default tolerance.
    let target = if tolerance > 0.0 {
        tolerance
    } else {
        crate::op::DEFAULT_TOLERANCE
    };
    Plan {
        p,
        m,
        converged: error <= target,
        iterations: sweeps,
        marginal_error: error,
    }
}

/// The semi-dual objective Σ_j w_j g_j + Σ_i f_i(g): concave in g, maximal at the solution.
fn semi_dual(f: &[f64], g: &[f64], weights: &[f64]) -> f64 {
    accurate_sum(weights.iter().zip(g).map(|(w, g)| w * g)) + accurate_sum(f.iter().copied())
}

/// The Jacobian of the column sums with respect to the column potentials, without its last
/// row and column (the gauge g_last = 0): J_jl = Σ_i p_ij·(δ_jl − p_il), written so that no
/// entry is a difference of nearly equal sums (J_jj = Σ_i p_ij·Σ_{l≠j} p_il).
pub(crate) fn column_jacobian(p: &[f64], m: usize) -> Vec<f64> {
    let free = m - 1;
    let mut jac = vec![0.0; free * free];
    for row in p.chunks_exact(m) {
        for j in 0..free {
            let others: f64 = row
                .iter()
                .enumerate()
                .filter(|&(l, _)| l != j)
                .map(|(_, v)| v)
                .sum();
            jac[j * free + j] += row[j] * others;
            for l in 0..free {
                if l != j {
                    jac[j * free + l] -= row[j] * row[l];
                }
            }
        }
    }
    jac
}

/// Column potentials whose plan, as ε → 0, is the hard sorted assignment: the item with the
/// (j+1)-th largest score to anchor j, the rest to the last anchor.
///
/// Anchors are consecutive integers (y_j − y_{j+1} = 1), so an item with scaled score u
/// prefers anchor j to anchor j + 1 exactly when u > g_{j+1} − g_j. Placing each such boundary
/// halfway between the neighbouring sorted scores starts Newton where the soft solution is
/// close, instead of at g = 0 where one anchor takes nearly everything.
fn hard_assignment_potentials(u: &[f64], anchors: &[f64]) -> Vec<f64> {
    let m = anchors.len();
    let mut g = vec![0.0; m];
    if m < 2 || u.len() < 2 {
        return g;
    }
    let mut sorted = u.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    for j in (0..m - 1).rev() {
        let boundary = 0.5 * sorted[j] + 0.5 * sorted[(j + 1).min(u.len() - 1)];
        g[j] = g[j + 1] - boundary;
    }
    g
}

/// Newton's method on the column potentials of the sorted problem (any number of anchors).
///
/// The rows are made exact in closed form for every g (f = f(g)), which leaves the concave
/// semi-dual in the m − 1 free potentials; its Hessian is the column Jacobian above, the same
/// k×k matrix the backward pass solves with. Each step is damped by a backtracking line search
/// on the semi-dual; when the Jacobian is too ill-conditioned for a step, a Sinkhorn column
/// update is taken instead, so the iteration never stalls.
pub fn sorted_newton(
    u: &[f64],
    anchors: &[f64],
    weights: &[f64],
    tolerance: f64,
    max_iterations: u32,
) -> Plan {
    let m = anchors.len();
    let mut g = hard_assignment_potentials(u, anchors);
    let (mut p, mut f) = plan_from_column_potentials(u, anchors, &g);
    if m == 1 {
        // One anchor takes everything: nothing to solve.
        return Plan {
            p,
            m,
            converged: true,
            iterations: 0,
            marginal_error: 0.0,
        };
    }
    let mut sums = column_sums(&p, m);
    let mut error = largest_gap(&sums, weights);
    let mut steps = 0;
    while error > tolerance && steps < max_iterations {
        steps += 1;
        let free = m - 1;
        let residual: Vec<f64> = (0..free).map(|j| sums[j] - weights[j]).collect();
        let mut direction: Vec<f64> = residual.iter().map(|r| -r).collect();
        let mut jac = column_jacobian(&p, m);
        let mut accepted = false;
        if solve_psd(&mut jac, &mut direction, free) {
            let value = semi_dual(&f, &g, weights);
            // The semi-dual's directional derivative along the step: −rᵀ·J⁻¹·(−r) > 0.
            let ascent: f64 = residual.iter().zip(&direction).map(|(r, d)| -r * d).sum();
            let mut t = 1.0;
            for _ in 0..40 {
                let trial: Vec<f64> = (0..m)
                    .map(|j| {
                        if j < free {
                            g[j] + t * direction[j]
                        } else {
                            g[j]
                        }
                    })
                    .collect();
                let (tp, tf) = plan_from_column_potentials(u, anchors, &trial);
                // Far from the solution the semi-dual must rise (Armijo); near it the rise is
                // below the objective's rounding, and a falling marginal error is the test.
                let rises = semi_dual(&tf, &trial, weights) >= value + 1e-4 * t * ascent;
                let closer = largest_gap(&column_sums(&tp, m), weights) <= (1.0 - 1e-4 * t) * error;
                if rises || closer {
                    (g, p, f) = (trial, tp, tf);
                    accepted = true;
                    break;
                }
                t *= 0.5;
            }
        }
        if !accepted {
            for j in 0..m {
                let lse = log_sum_exp(u.iter().zip(&f).map(|(&ui, &fi)| fi + ui * anchors[j]));
                g[j] = weights[j].ln() - lse;
            }
            let last = g[m - 1];
            g.iter_mut().for_each(|v| *v -= last);
            (p, f) = plan_from_column_potentials(u, anchors, &g);
        }
        sums = column_sums(&p, m);
        error = largest_gap(&sums, weights);
    }
    Plan {
        p,
        m,
        converged: error <= tolerance,
        iterations: steps,
        marginal_error: error,
    }
}
