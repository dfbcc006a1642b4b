// Top-k with two anchors: the exact threshold solve (MATH.md §1) and its closed-form
// backward, dispatched by src/gpu/mod.rs.
//
// Rows of up to ROW_IN_REGISTERS entries take one workgroup each, in one dispatch: the row is
// read from global memory once into registers and the whole root search runs there. Longer
// rows are cut into chunks of ROW_IN_REGISTERS entries, one workgroup each, and every
// root-search step is two short dispatches (`topk_long_pass` sums each chunk, `topk_long_step`
// adds a row's chunks and moves its threshold) recorded by the host a block at a time. That
// spreads one row of 10^6 entries over 245 workgroups instead of one, and keeps every
// invocation's loops short (llvmpipe silently ends an invocation's loops after 65,535
// iterations in all, which a streamed row of 10^6 passes within 20 steps).

// Entries per thread held in registers: a workgroup holds ROW_IN_REGISTERS = WG·PER_THREAD.
// Must equal `PER_THREAD` in src/gpu/kernels.rs.
const PER_THREAD: u32 = 16u;
const ROW_IN_REGISTERS: u32 = 4096u;
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

// A row's root search. The threshold and the bracket ends are f32 hi/lo pairs so that
// v − tau keeps full precision for the scores near the threshold, which are the ones whose σ
// matters.
struct Search {
    tau: vec2<f32>,
    lo: vec2<f32>,
    hi: vec2<f32>,
    state: u32,
    steps: u32,
}

// The search before its first step: tau in the middle of the host's bracket.
fn search_start(p: RowParams) -> Search {
    let lo = vec2<f32>(p.lo_hi, p.lo_lo);
    let hi = vec2<f32>(p.hi_hi, p.hi_lo);
    return Search(pair_add(lo, 0.5 * pair_diff(hi, lo)), lo, hi, STATE_RUN, 0u);
}

// One safeguarded Newton step from the row's sums at s.tau: `total` is (count of z ≥ 0,
// Σ_{z<0} σ(z), Σ_{z≥0} σ(−z), Σ σ'(z)), so Σ A = total.x − total.z + total.y.
fn search_step(s: Search, p: RowParams, total: vec4<f32>) -> Search {
    var next = s;
    next.steps += 1u;
    // (count − k) is exact; the two small sums carry a few roundings each.
    let excess = (total.x - f32(p.k)) + (total.y - total.z);
    let noise = 8.0 * ROUNDOFF * (total.y + total.z);
    let slope = total.w;
    if (abs(excess) <= max(noise, STEP_FLOOR * slope)) {
        next.state = STATE_DONE;
        return next;
    }
    // Σ A falls as tau rises: too much mass means tau is too low.
    if (excess > 0.0) {
        next.lo = s.tau;
    } else {
        next.hi = s.tau;
    }
    let width = pair_diff(next.hi, next.lo);
    let newton = pair_add(s.tau, excess / (slope * p.factor));
    let inside = slope > 0.0 && pair_diff(newton, next.lo) > 0.0
        && pair_diff(next.hi, newton) > 0.0;
    next.tau = pair_add(next.lo, 0.5 * width);
    if (inside) {
        next.tau = newton;
    }
    if (width * p.factor <= WIDTH_FLOOR || pair_diff(next.tau, s.tau) == 0.0) {
        next.state = STATE_DONE;
    } else if (next.steps >= MAX_STEPS) {
        next.state = STATE_GAVE_UP;
    }
    return next;
}

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

// A block of up to ROW_IN_REGISTERS entries of one row held in registers: entry
// first + j·WG + t lives in xs[j] of thread t, and bit j of `held` says it takes part.
struct Held {
    xs: array<f32, PER_THREAD>,
    held: u32,
}

fn hold(row: u32, p: RowParams, first: u32, t: u32) -> Held {
    var h: Held;
    h.held = 0u;
    for (var j = 0u; j < PER_THREAD; j++) {
        let i = first + j * WG + t;
        if (i < p.n && is_valid(row, p.n, i)) {
            h.xs[j] = p.sign * in_a[row * p.n + i];
            h.held |= 1u << j;
        }
    }
    return h;
}

// The workgroup's sums over its held entries at threshold th, to thread 0 (see `wg_sum`).
fn held_sums(h: Held, th: vec2<f32>, factor: f32, t: u32) -> vec4<f32> {
    var acc = Partial(0.0, vec2<f32>(0.0), vec2<f32>(0.0), 0.0);
    for (var j = 0u; j < PER_THREAD; j++) {
        if ((h.held & (1u << j)) != 0u) {
            add_term(&acc, h.xs[j], th, factor);
        }
    }
    let below = acc.below.x - acc.below.y;
    let tails = acc.tails.x - acc.tails.y;
    return wg_sum(t, vec4<f32>(acc.above, below, tails, acc.slope));
}

// Writes A = σ((v − th)·factor) for the block starting at `first` (0 off the valid entries).
fn write_mask(row: u32, p: RowParams, first: u32, th: vec2<f32>, t: u32) {
    let end = min(p.n, first + ROW_IN_REGISTERS);
    for (var i = first + t; i < end; i += WG) {
        var a = 0.0;
        if (is_valid(row, p.n, i)) {
            a = sigmoid(((p.sign * in_a[row * p.n + i] - th.x) - th.y) * p.factor);
        }
        out_a[row * p.n + i] = a;
    }
}

// Rows that need no solve: 0 everywhere, or 1 on the valid entries (k = n_valid), over the
// block starting at `first`.
fn write_plain(row: u32, p: RowParams, first: u32, t: u32) {
    let end = min(p.n, first + ROW_IN_REGISTERS);
    for (var i = first + t; i < end; i += WG) {
        let one = p.mode == MODE_ONES && is_valid(row, p.n, i);
        out_a[row * p.n + i] = select(0.0, 1.0, one);
    }
}

fn write_report(row: u32, s: Search) {
    report[row * 4u] = s.steps;
    report[row * 4u + 1u] = select(0u, 1u, s.state == STATE_DONE);
    report[row * 4u + 3u] = select(0u, 1u, s.state == STATE_RUN);
}

// The search state of thread 0, read by all after a barrier.
var<workgroup> search: Search;
var<workgroup> running: u32;

// topk_forward: the soft mask A_i = σ((v_i − tau)·factor) with Σ A_i = k, for rows of up to
// ROW_IN_REGISTERS entries.
//   params:     [rows] RowParams (mode, n, k, sign, factor, bracket)
//   valid_bits: [rows, ceil(n/32)]
//   in_a:       scores [rows, n] row-major (raw, any direction)
//   out_a:      mask [rows, n]
//   report:     [rows, 4]: root-search steps, converged
// Dispatched as (rows in the part, 1, 1). The whole bracketed safeguarded-Newton search runs
// inside the workgroup: each step is one pass over the registers and one workgroup sum, and
// thread 0 moves the threshold.
@compute @workgroup_size(WG)
fn topk_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let row = wid.x;
    let p = params[row];
    if (p.mode != MODE_SOLVE) {
        write_plain(row, p, 0u, t);
        return;
    }
    let h = hold(row, p, 0u, t);
    if (t == 0u) {
        search = search_start(p);
        running = 1u;
    }

    loop {
        // Thread 0's search of the previous step is written before anyone reads it (the
        // uniform load is a barrier).
        if (workgroupUniformLoad(&running) == 0u) {
            break;
        }
        let total = held_sums(h, search.tau, p.factor, t);
        if (t == 0u) {
            search = search_step(search, p, total);
            running = select(0u, 1u, search.state == STATE_RUN);
        }
    }

    // The final threshold was published by the uniform load that ended the loop.
    write_mask(row, p, 0u, search.tau, t);
    if (t == 0u) {
        write_report(row, search);
    }
}

// Long rows. `work` holds, per row, LONG_STATE floats of search state (the Search fields, u32
// ones as bits) and then LONG_PARTIAL floats per chunk: that chunk's sums at the current tau.
// Must equal `LONG_STATE` and `LONG_PARTIAL` in src/gpu/kernels.rs.
const LONG_STATE: u32 = 8u;
const LONG_PARTIAL: u32 = 4u;

fn long_chunks(n: u32) -> u32 {
    return max(1u, (n + ROW_IN_REGISTERS - 1u) / ROW_IN_REGISTERS);
}

fn long_base(row: u32, n: u32) -> u32 {
    return row * (LONG_STATE + long_chunks(n) * LONG_PARTIAL);
}

fn load_search(base: u32) -> Search {
    return Search(
        vec2<f32>(work[base], work[base + 1u]),
        vec2<f32>(work[base + 2u], work[base + 3u]),
        vec2<f32>(work[base + 4u], work[base + 5u]),
        bitcast<u32>(work[base + 6u]),
        bitcast<u32>(work[base + 7u]),
    );
}

fn store_search(base: u32, s: Search) {
    work[base] = s.tau.x;
    work[base + 1u] = s.tau.y;
    work[base + 2u] = s.lo.x;
    work[base + 3u] = s.lo.y;
    work[base + 4u] = s.hi.x;
    work[base + 5u] = s.hi.y;
    work[base + 6u] = bitcast<f32>(s.state);
    work[base + 7u] = bitcast<f32>(s.steps);
}

// The sums of row `row`'s chunks, to thread 0: each thread adds a stride of chunks.
fn long_total(row: u32, n: u32, t: u32) -> vec4<f32> {
    let at = long_base(row, n) + LONG_STATE;
    var acc = vec4<f32>(0.0);
    for (var c = t; c < long_chunks(n); c += WG) {
        let q = at + c * LONG_PARTIAL;
        acc += vec4<f32>(work[q], work[q + 1u], work[q + 2u], work[q + 3u]);
    }
    return wg_sum(t, acc);
}

// topk_long_start: every long row's search before its first step.
//   params, report as topk_forward; work: [rows, LONG_STATE + chunks · LONG_PARTIAL]
// Dispatched as (1, rows in the part, 1); thread 0 alone works.
@compute @workgroup_size(WG)
fn topk_long_start(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let row = wid.y;
    let p = params[row];
    if (t != 0u || p.mode != MODE_SOLVE) {
        return;
    }
    let s = search_start(p);
    store_search(long_base(row, p.n), s);
    write_report(row, s);
}

// topk_long_pass: chunk `wid.x` of row `wid.y` writes its sums at the row's current tau.
// Dispatched as (chunks, rows in the part, 1), alternating with topk_long_step.
@compute @workgroup_size(WG)
fn topk_long_pass(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let row = wid.y;
    let p = params[row];
    if (p.mode != MODE_SOLVE) {
        return;
    }
    let base = long_base(row, p.n);
    let s = load_search(base);
    if (s.state != STATE_RUN) {
        return;
    }
    let h = hold(row, p, wid.x * ROW_IN_REGISTERS, t);
    let total = held_sums(h, s.tau, p.factor, t);
    if (t == 0u) {
        let q = base + LONG_STATE + wid.x * LONG_PARTIAL;
        work[q] = total.x;
        work[q + 1u] = total.y;
        work[q + 2u] = total.z;
        work[q + 3u] = total.w;
    }
}

// topk_long_step: row `wid.y` adds up its chunks' sums and takes one root-search step.
// Dispatched as (1, rows in the part, 1).
@compute @workgroup_size(WG)
fn topk_long_step(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let row = wid.y;
    let p = params[row];
    if (p.mode != MODE_SOLVE) {
        return;
    }
    let base = long_base(row, p.n);
    if (t == 0u) {
        search = load_search(base);
        running = select(0u, 1u, search.state == STATE_RUN);
    }
    // Thread 0's load is in place before anyone decides on it (the uniform load is a barrier).
    if (workgroupUniformLoad(&running) == 0u) {
        return;
    }
    let total = long_total(row, p.n, t);
    if (t == 0u) {
        let s = search_step(search, p, total);
        store_search(base, s);
        write_report(row, s);
    }
}

// topk_long_finish: chunk `wid.x` of row `wid.y` writes its mask at the final tau (or the
// plain 0/1 of a row that needed no solve). Dispatched as (chunks, rows in the part, 1).
@compute @workgroup_size(WG)
fn topk_long_finish(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let row = wid.y;
    let p = params[row];
    let first = wid.x * ROW_IN_REGISTERS;
    if (p.mode != MODE_SOLVE) {
        write_plain(row, p, first, t);
        return;
    }
    write_mask(row, p, first, load_search(long_base(row, p.n)).tau, t);
}

// The backward: grad_scores_j = sign·factor·A'_j·(g_j − ḡ), A' = A(1 − A), ḡ the
// A'-weighted mean of g (MATH.md §1); 0 for a saturated row (Σ A' = 0). Its bindings:
//   params:     [rows] RowParams (mode SOLVE unless the gradient is 0, n, sign, factor)
//   valid_bits: [rows, ceil(n/32)]
//   in_a:       mask [rows, n] (the forward output)
//   in_b:       grad_mask [rows, n]
//   out_a:      grad_scores [rows, n]
//   work:       long rows: [rows, LONG_STATE + chunks · LONG_PARTIAL], chunk sums

// (Σ A', Σ A'·g, 0, 0) over entries [first, end) of the row, to thread 0 (see `wg_sum`).
fn backward_sums(row: u32, p: RowParams, first: u32, end: u32, t: u32) -> vec4<f32> {
    var acc = vec4<f32>(0.0);
    for (var i = first + t; i < end; i += WG) {
        if (is_valid(row, p.n, i)) {
            let a = in_a[row * p.n + i];
            let slope = a * (1.0 - a);
            acc += vec4<f32>(slope, slope * in_b[row * p.n + i], 0.0, 0.0);
        }
    }
    return wg_sum(t, acc);
}

var<workgroup> grad_mean: f32;
var<workgroup> grad_ok: u32;

// Thread 0 publishes ḡ from the row's (Σ A', Σ A'·g); every thread then writes the gradient
// of entries [first, end). Must be called in workgroup-uniform control flow.
fn write_grad(row: u32, p: RowParams, first: u32, end: u32, total: vec4<f32>, t: u32) {
    if (t == 0u) {
        grad_ok = select(0u, 1u, total.x > 0.0);
        grad_mean = select(0.0, total.y / total.x, total.x > 0.0);
    }
    // grad_mean is written by thread 0 before anyone reads it.
    let ok = workgroupUniformLoad(&grad_ok) == 1u;
    let mean = grad_mean;
    for (var i = first + t; i < end; i += WG) {
        var d = 0.0;
        if (ok && is_valid(row, p.n, i)) {
            let a = in_a[row * p.n + i];
            d = p.sign * p.factor * a * (1.0 - a) * (in_b[row * p.n + i] - mean);
        }
        out_a[row * p.n + i] = d;
    }
}

fn write_zeros(row: u32, n: u32, first: u32, end: u32, t: u32) {
    for (var i = first + t; i < end; i += WG) {
        out_a[row * n + i] = 0.0;
    }
}

// topk_backward: one workgroup per row of up to ROW_IN_REGISTERS entries, dispatched as
// (rows in the part, 1, 1).
@compute @workgroup_size(WG)
fn topk_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let row = wid.x;
    let p = params[row];
    if (p.mode != MODE_SOLVE) {
        write_zeros(row, p.n, 0u, p.n, t);
        return;
    }
    write_grad(row, p, 0u, p.n, backward_sums(row, p, 0u, p.n, t), t);
}

// topk_long_backward_pass: chunk `wid.x` of row `wid.y` writes its (Σ A', Σ A'·g).
// Dispatched as (chunks, rows in the part, 1), then topk_long_backward_finish.
@compute @workgroup_size(WG)
fn topk_long_backward_pass(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let row = wid.y;
    let p = params[row];
    if (p.mode != MODE_SOLVE) {
        return;
    }
    let first = wid.x * ROW_IN_REGISTERS;
    let total = backward_sums(row, p, first, min(p.n, first + ROW_IN_REGISTERS), t);
    if (t == 0u) {
        let q = long_base(row, p.n) + LONG_STATE + wid.x * LONG_PARTIAL;
        work[q] = total.x;
        work[q + 1u] = total.y;
        work[q + 2u] = 0.0;
        work[q + 3u] = 0.0;
    }
}

// topk_long_backward_finish: chunk `wid.x` of row `wid.y` adds up the row's chunk sums (every
// chunk of a row in the same order, so all see the same ḡ) and writes its gradient.
// Dispatched as (chunks, rows in the part, 1).
@compute @workgroup_size(WG)
fn topk_long_backward_finish(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let row = wid.y;
    let p = params[row];
    let first = wid.x * ROW_IN_REGISTERS;
    let end = min(p.n, first + ROW_IN_REGISTERS);
    if (p.mode != MODE_SOLVE) {
        write_zeros(row, p.n, first, end, t);
        return;
    }
    write_grad(row, p, first, end, long_total(row, p.n, t), t);
}
