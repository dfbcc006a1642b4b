// Shared by every soft-topk kernel; prepended to each family's file when its pipeline is
// built. It holds the workgroup size, the per-row parameters, the bindings (one layout for
// every pipeline), stable σ, the accurate expm1/log1p pieces, validity bits and the
// workgroup sum.
//
// Glossary (as in the Rust code): rows, n, k, epsilon, scale s, `factor` = 2/(s·ε), scores in
// largest orientation v = sign·x, threshold tau (top-k), potentials f (scores side) and g
// (anchor side), mask, ranks, grad_mask, grad_scores.

// Threads per workgroup, for every kernel. Must equal `WORKGROUP_SIZE` in src/gpu/kernels.rs
// (a test checks the two agree).
const WG: u32 = 256u;
// `wg_sum` adds WG partials in two levels of SUM_FAN: WG = SUM_FAN * SUM_FAN.
const SUM_FAN: u32 = 16u;
// A finite stand-in for infinity: WGSL constants cannot be infinite.
const HUGE: f32 = 3.0e38;

// What a workgroup does with its row.
const MODE_ZEROS: u32 = 0u; // bad row, k = 0 or no valid entry: every output 0
const MODE_ONES: u32 = 1u; // top-k with k = n_valid: 1 on the valid entries, 0 elsewhere
const MODE_SOLVE: u32 = 2u; // solve the row

// One row's parameters; mirrors `RowParams` in src/gpu/rows.rs field for field.
struct RowParams {
    mode: u32,
    // Row length: all entries, valid or not.
    n: u32,
    n_valid: u32,
    // k as solved (lowered to n_valid).
    k: u32,
    // Transport: the number of anchors m, and how many of them are ranked anchors (their
    // column is an output: 1 for top-k, k for sorted). Anchor j sits at y_j = ranked − j.
    anchors: u32,
    ranked: u32,
    // Rank slots per row of the ranks buffers (the batch's largest k).
    k_max: u32,
    // Transport: SOLVER_SINKHORN or SOLVER_NEWTON. Sorted backward: COTANGENT_*.
    solver: u32,
    max_iterations: u32,
    // +1 largest, −1 smallest: kernels work on v = sign·x.
    sign: f32,
    // 2/(s·ε): score differences to temperature units.
    factor: f32,
    // Mid-range of the valid v, subtracted before scaling.
    centre: f32,
    // Transport: stop when the marginal error (units of 1/n) is at most this.
    tolerance: f32,
    // Exact top-k: the bracket [lo, hi] of the threshold tau, each an f32 hi/lo pair.
    lo_hi: f32,
    lo_lo: f32,
    hi_hi: f32,
    hi_lo: f32,
    // Transport: weight (units of 1/n) of each ranked anchor and of the last anchor.
    w_top: f32,
    w_last: f32,
    // Both 1.0; see `opaque_a`.
    one_a: f32,
    one_b: f32,
}

// Bindings, shared by every pipeline (each entry point uses the ones its header names).
// params: [rows] RowParams
@group(0) @binding(0) var<storage, read> params: array<RowParams>;
// valid_bits: [rows, ceil(n / 32)] u32, bit i % 32 of word i / 32 set when entry i takes part
@group(0) @binding(1) var<storage, read> valid_bits: array<u32>;
@group(0) @binding(2) var<storage, read> in_a: array<f32>;
@group(0) @binding(3) var<storage, read> in_b: array<f32>;
@group(0) @binding(4) var<storage, read_write> out_a: array<f32>;
@group(0) @binding(5) var<storage, read_write> out_b: array<f32>;
// report: [rows, 4] u32: iterations, converged (0/1), marginal error (f32 bits), running
// (0/1, the chunked solves)
@group(0) @binding(6) var<storage, read_write> report: array<u32>;
// work: scratch that stays on the device between the dispatches of one solve; each family
// that uses it lays it out per row (topk.wgsl's long rows, plan.wgsl's chunks).
@group(0) @binding(7) var<storage, read_write> work: array<f32>;

// Whether entry i of row `row` takes part (the host folds the validity mask and the
// excluding infinity into these bits).
fn is_valid(row: u32, n: u32, i: u32) -> bool {
    let words = (n + 31u) / 32u;
    return ((valid_bits[row * words + i / 32u] >> (i % 32u)) & 1u) == 1u;
}

// σ(z) = 1/(1 + e^(−z)), never overflowing: e^(−|z|) is at most 1.
fn sigmoid(z: f32) -> f32 {
    let e = exp(-abs(z));
    let s = 1.0 / (1.0 + e);
    return select(e * s, s, z >= 0.0);
}

// σ'(z) = σ(z)·σ(−z) = e^(−|z|)/(1 + e^(−|z|))², without cancellation.
fn sigmoid_slope(z: f32) -> f32 {
    let e = exp(-abs(z));
    let d = 1.0 + e;
    return e / (d * d);
}

// e^x − 1, accurate for small |x| (WGSL has no expm1): the rounding of e^x is undone by
// dividing by its own logarithm.
fn expm1_accurate(x: f32) -> f32 {
    let e = exp(x);
    if (e == 1.0) {
        return x;
    }
    let em1 = e - 1.0;
    if (em1 == -1.0) {
        return -1.0;
    }
    // `opaque_a` keeps log(exp(x)) from being folded to x (see below).
    return em1 * x / log(opaque_a(e));
}

// log(1 + x), accurate for small |x| (WGSL has no log1p), by the same trick.
fn log1p_accurate(x: f32) -> f32 {
    let u = 1.0 + x;
    if (u == 1.0) {
        return x;
    }
    // `opaque_a` keeps (1 + x) − 1 from being folded to x (see below).
    return log(u) * x / (opaque_a(u) - 1.0);
}

// N.B. Shader compilers may treat float arithmetic as reassociable (WGSL cannot mark an
// expression exact), and Mesa's does: it rewrites (a + b) − a to b, which turns the rounding
// error that two-sum and Kahan summation recover into 0, and with it the hi/lo threshold
// into a plain f32 (an error of 0.01 in σ's argument was seen on lavapipe). Multiplying by
// 1.0 read from the parameters hides the identities from the compiler and changes no value;
// two different ones keep common-subexpression elimination from merging the two uses.
fn opaque_a(x: f32) -> f32 {
    return x * params[0].one_a;
}

fn opaque_b(x: f32) -> f32 {
    return x * params[0].one_b;
}

// The exact sum of a and b as a rounded sum and its rounding error (Knuth's two-sum).
fn two_sum(a: f32, b: f32) -> vec2<f32> {
    let s = a + b;
    let bb = opaque_a(s) - a;
    let err = (a - (opaque_b(s) - bb)) + (b - bb);
    return vec2<f32>(s, err);
}

// A hi/lo pair (hi + lo, |lo| ≤ ulp(hi)/2) plus an f32 d, renormalised.
fn pair_add(p: vec2<f32>, d: f32) -> vec2<f32> {
    let s = two_sum(p.x, d);
    return two_sum(s.x, s.y + p.y);
}

// a − b for two hi/lo pairs, rounded to f32: exact in the leading terms when a ≈ b.
fn pair_diff(a: vec2<f32>, b: vec2<f32>) -> f32 {
    return (a.x - b.x) + (a.y - b.y);
}

var<workgroup> sum_lanes: array<vec4<f32>, WG>;
var<workgroup> sum_groups: array<vec4<f32>, SUM_FAN>;

// Sums v over the workgroup in a two-level tree; the total is returned to thread 0 only
// (the others get 0). Must be called in workgroup-uniform control flow. Callers publish
// what thread 0 decides through workgroup memory and a barrier of their own.
fn wg_sum(t: u32, v: vec4<f32>) -> vec4<f32> {
    sum_lanes[t] = v;
    // Every lane's partial is in `sum_lanes` before the group leaders read them.
    workgroupBarrier();
    if (t < SUM_FAN) {
        var s = vec4<f32>(0.0);
        for (var j = 0u; j < SUM_FAN; j++) {
            s += sum_lanes[t * SUM_FAN + j];
        }
        sum_groups[t] = s;
    }
    // The group sums are in `sum_groups` before thread 0 adds them.
    workgroupBarrier();
    var total = vec4<f32>(0.0);
    if (t == 0u) {
        for (var j = 0u; j < SUM_FAN; j++) {
            total += sum_groups[j];
        }
    }
    return total;
}

// One Kahan-compensated step: (sum, carry) + x, the carry being the rounding still owed.
fn kahan_add(acc: vec2<f32>, x: f32) -> vec2<f32> {
    let y = x - acc.y;
    let s = acc.x + y;
    return vec2<f32>(s, (opaque_a(s) - acc.x) - y);
}
