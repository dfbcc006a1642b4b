// Top-k with two anchors: the exact threshold solve (MATH.md §1) and its closed-form
// backward. One workgroup per row; dispatched by src/gpu/topk.rs as (rows in the part, 1, 1).

// Rows of up to WG·PER_THREAD entries are read from global memory once into registers and
// solved there; longer rows stream from global memory on every root-search step (see
// `topk_forward`).
const PER_THREAD: u32 = 16u;
// Root-search steps before giving up. Bisection alone halves a bracket of 2^100 temperature
// units to 2^-20 in 120 steps; safeguarded Newton needs about ten on ordinary rows.
const MAX_STEPS: u32 = 200u;
// Stop when the next Newton step would move every z = (v − tau)·factor by less than this
// (2^-21): no σ(z) would change by more than an f32 rounding.
const STEP_FLOOR: f32 = 4.76837158e-7;
// Stop when the bracket is narrower than this many temperature units (2^-20).
const WIDTH_FLOOR: f32 = 9.53674316e-7;
// f32 unit roundoff, 2^-24.
const ROUNDOFF: f32 = 5.96046448e-8;

const STATE_RUN: u32 = 0u;
const STATE_DONE: u32 = 1u;
const STATE_GAVE_UP: u32 = 2u;

// The search state, owned by thread 0 and read by all after a barrier. The threshold and the
// bracket ends are f32 hi/lo pairs so that v − tau keeps full precision for the scores near
// the threshold, which are the ones whose σ matters.
var<workgroup> tau: vec2<f32>;
var<workgroup> bracket_lo: vec2<f32>;
var<workgroup> bracket_hi: vec2<f32>;
var<workgroup> state: u32;
var<workgroup> steps: u32;
var<workgroup> grad_mean: f32;
var<workgroup> grad_ok: u32;

// One thread's share of Σ A_i and Σ σ'(z_i). Σ A is split as (entries with z ≥ 0) −
// Σ_{z≥0} σ(−z) + Σ_{z<0} σ(z): the count is exact and the two sums are of small positive
// terms, so the excess Σ A − k keeps its relative precision even when the row is nearly
// saturated and every A_i is within an f32 rounding of 0 or 1. That is what pins the
// threshold, and with it A(1 − A) for the backward, on such rows.
struct Partial {
    above: f32,
    // Kahan (sum, carry) pairs.
    below: vec2<f32>,
    tails: vec2<f32>,
    slope: f32,
}

fn add_term(acc: ptr<function, Partial>, v: f32, th: vec2<f32>, factor: f32) {
    let z = ((v - th.x) - th.y) * factor;
    if (z >= 0.0) {
        (*acc).above += 1.0;
        (*acc).tails = kahan_add((*acc).tails, sigmoid(-z));
    } else {
        (*acc).below = kahan_add((*acc).below, sigmoid(z));
    }
    (*acc).slope += sigmoid_slope(z);
}

// Rows that need no solve: 0 everywhere, or 1 on the valid entries (k = n_valid).
fn write_plain(row: u32, p: RowParams, t: u32) {
    let base = row * p.n;
    for (var i = t; i < p.n; i += WG) {
        let one = p.mode == MODE_ONES && is_valid(row, p.n, i);
        out_a[base + i] = select(0.0, 1.0, one);
    }
}

// topk_forward: the soft mask A_i = σ((v_i − tau)·factor) with Σ A_i = k.
//   params:     [rows] RowParams (mode, n, k, sign, factor, bracket)
//   valid_bits: [rows, ceil(n/32)]
//   in_a:       scores [rows, n] row-major (raw, any direction)
//   out_a:      mask [rows, n]
//   report:     [rows, 4]: root-search steps, converged
// The whole bracketed safeguarded-Newton search runs inside the workgroup: each step is one
// pass over the row and one workgroup sum, and thread 0 updates the bracket. Long rows take
// the same steps streaming from global memory: one persistent workgroup per row keeps the
// solve free of host round trips and of extra dispatches per step, and a batch of rows fills
// the device; a single row of 10^6 entries then runs on one compute unit, which is the cost.
@compute @workgroup_size(WG)
fn topk_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let row = wid.x;
    let p = params[row];
    if (p.mode != MODE_SOLVE) {
        write_plain(row, p, t);
        return;
    }
    let base = row * p.n;
    let cached = p.n <= WG * PER_THREAD;

    // Read a short row once: entry j·WG + t lives in xs[j] of thread t.
    var xs: array<f32, PER_THREAD>;
    var held = 0u;
    if (cached) {
        for (var j = 0u; j < PER_THREAD; j++) {
            let i = j * WG + t;
            if (i < p.n && is_valid(row, p.n, i)) {
                xs[j] = p.sign * in_a[base + i];
                held |= 1u << j;
            }
        }
    }

    if (t == 0u) {
        bracket_lo = vec2<f32>(p.lo_hi, p.lo_lo);
        bracket_hi = vec2<f32>(p.hi_hi, p.hi_lo);
        tau = pair_add(bracket_lo, 0.5 * pair_diff(bracket_hi, bracket_lo));
        state = STATE_RUN;
        steps = 0u;
    }

    loop {
        // Thread 0's state and threshold of the previous step are written before anyone
        // reads them (the uniform load is a barrier).
        if (workgroupUniformLoad(&state) != STATE_RUN) {
            break;
        }
        let th = tau;

        var acc = Partial(0.0, vec2<f32>(0.0), vec2<f32>(0.0), 0.0);
        if (cached) {
            for (var j = 0u; j < PER_THREAD; j++) {
                if ((held & (1u << j)) != 0u) {
                    add_term(&acc, xs[j], th, p.factor);
                }
            }
        } else {
            for (var i = t; i < p.n; i += WG) {
                if (is_valid(row, p.n, i)) {
                    add_term(&acc, p.sign * in_a[base + i], th, p.factor);
                }
            }
        }
        let below = acc.below.x - acc.below.y;
        let tails = acc.tails.x - acc.tails.y;
        let total = wg_sum(t, vec4<f32>(acc.above, below, tails, acc.slope));

        if (t == 0u) {
            // (count − k) is exact; the two small sums carry a few roundings each.
            let excess = (total.x - f32(p.k)) + (total.y - total.z);
            let noise = 8.0 * ROUNDOFF * (total.y + total.z);
            let slope = total.w;
            steps += 1u;
            if (abs(excess) <= max(noise, STEP_FLOOR * slope)) {
                state = STATE_DONE;
            } else {
                // Σ A falls as tau rises: too much mass means tau is too low.
                if (excess > 0.0) {
                    bracket_lo = th;
                } else {
                    bracket_hi = th;
                }
                let width = pair_diff(bracket_hi, bracket_lo);
                let newton = pair_add(th, excess / (slope * p.factor));
                let inside = slope > 0.0 && pair_diff(newton, bracket_lo) > 0.0
                    && pair_diff(bracket_hi, newton) > 0.0;
                var next = pair_add(bracket_lo, 0.5 * width);
                if (inside) {
                    next = newton;
                }
                if (width * p.factor <= WIDTH_FLOOR || pair_diff(next, th) == 0.0) {
                    state = STATE_DONE;
                } else if (steps >= MAX_STEPS) {
                    state = STATE_GAVE_UP;
                }
                tau = next;
            }
        }
    }

    // The final threshold was published by the uniform load that ended the loop.
    let th = tau;
    for (var i = t; i < p.n; i += WG) {
        var a = 0.0;
        if (is_valid(row, p.n, i)) {
            let z = ((p.sign * in_a[base + i] - th.x) - th.y) * p.factor;
            a = sigmoid(z);
        }
        out_a[base + i] = a;
    }
    if (t == 0u) {
        report[row * 4u] = steps;
        report[row * 4u + 1u] = select(0u, 1u, state == STATE_DONE);
    }
}

// topk_backward: grad_scores_j = sign·factor·A'_j·(g_j − ḡ), A' = A(1 − A), ḡ the
// A'-weighted mean of g (MATH.md §1); 0 for a saturated row (Σ A' = 0).
//   params:     [rows] RowParams (mode SOLVE unless the gradient is 0, n, sign, factor)
//   valid_bits: [rows, ceil(n/32)]
//   in_a:       mask [rows, n] (the forward output)
//   in_b:       grad_mask [rows, n]
//   out_a:      grad_scores [rows, n]
@compute @workgroup_size(WG)
fn topk_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let row = wid.x;
    let p = params[row];
    let base = row * p.n;
    if (p.mode != MODE_SOLVE) {
        for (var i = t; i < p.n; i += WG) {
            out_a[base + i] = 0.0;
        }
        return;
    }

    var acc = vec4<f32>(0.0);
    for (var i = t; i < p.n; i += WG) {
        if (is_valid(row, p.n, i)) {
            let a = in_a[base + i];
            let slope = a * (1.0 - a);
            acc += vec4<f32>(slope, slope * in_b[base + i], 0.0, 0.0);
        }
    }
    let total = wg_sum(t, acc);
    if (t == 0u) {
        grad_ok = select(0u, 1u, total.x > 0.0);
        grad_mean = select(0.0, total.y / total.x, total.x > 0.0);
    }
    // grad_mean is written by thread 0 before anyone reads it.
    let ok = workgroupUniformLoad(&grad_ok) == 1u;
    let mean = grad_mean;

    for (var i = t; i < p.n; i += WG) {
        var d = 0.0;
        if (ok && is_valid(row, p.n, i)) {
            let a = in_a[base + i];
            d = p.sign * p.factor * a * (1.0 - a) * (in_b[base + i] - mean);
        }
        out_a[base + i] = d;
    }
}
