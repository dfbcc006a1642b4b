// Entropic transport from a row's scores to m anchors y_j = ranked − j (MATH.md §1 with two
// anchors for top-k Sinkhorn, §2 with k + 1 anchors for sorted): log-domain Sinkhorn, or
// Newton on the anchor potentials with a line search (the reference's `sorted_newton`).
// One workgroup per row; dispatched by src/gpu/mod.rs as (rows in the part, 1, 1).
//
// Newton starts from the potentials of the hard sorted assignment (the reference's
// `hard_assignment_potentials`), solves its k×k systems with a small relative damping (the
// reference's `solve_psd`), and accepts a step when the semi-dual rises or the marginal error
// shrinks, as the reference does.
//
// Potentials. The rows of the plan are made exact in closed form for any anchor potentials
// g, so only g is iterated, with the gauge g_{m−1} = 0. It is stored as the increments
// h_j = g_j − g_{j+1}: the logit gap between neighbouring anchors for the score u is then
// u + h_j, which is small exactly where it matters (for the scores between two ranks), while
// g itself and u·y_j grow to |u|·k and would cost f32 all its digits there.

// The largest k: the k×k Jacobian lives in workgroup memory. Must equal `SORTED_K_MAX` in
// src/gpu/kernels.rs.
const K_MAX: u32 = 32u;
const M_MAX: u32 = 33u;
// Entries of the packed lower triangle of a K_MAX × K_MAX matrix, and per thread.
const ENTRIES: u32 = 528u;
const ENTRIES_PER_THREAD: u32 = 3u;
// Scores per tile of the evaluation pass; TILE_CELLS = TILE · M_MAX.
const TILE: u32 = 32u;
const TILE_CELLS: u32 = 1056u;

const SOLVER_SINKHORN: u32 = 0u;
const SOLVER_NEWTON: u32 = 1u;
// Mirrors `GPU_AUTO_TOLERANCE` in src/gpu/rows.rs: what "converged" means for the paper's
// fixed sweep count (tolerance 0).
const AUTO_TOLERANCE: f32 = 1e-5;
// Relative damping added to the Jacobian's diagonal before the Cholesky solve (the
// reference's `solve_psd` adds 1e-10 in f64): a nearly decoupled block of anchors keeps a
// bounded step instead of stopping Newton. In f32 the entries themselves carry relative
// rounding of a few 1e-7, so damping at 1e-6 changes no well-determined direction.
const RELATIVE_DAMPING: f32 = 1e-6;
// Halvings of a Newton step before falling back to a Sinkhorn update.
const LINE_SEARCH_STEPS: u32 = 30u;
// Newton stops when the marginal error has not improved for this many steps: the f32 floor.
const STALL_STEPS: u32 = 6u;

const STATE_RUN: u32 = 0u;
const STATE_DONE: u32 = 1u;
const SEARCH_TRYING: u32 = 0u;
const SEARCH_ACCEPTED: u32 = 1u;
const SEARCH_FAILED: u32 = 2u;

// One tile of log-plan rows (TILE scores × m anchors), which of them are valid, each row's
// largest anchor and the mass on its other anchors (Σ_{l≠big} p_il, for the Jacobian's
// diagonal without cancellation).
var<workgroup> tile_logp: array<f32, TILE_CELLS>;
var<workgroup> tile_ok: array<u32, TILE>;
var<workgroup> tile_big: array<u32, TILE>;
var<workgroup> tile_rest: array<f32, TILE>;
// The potentials' increments, the Newton direction in g (0 on the last anchor), the log
// column sums of the last evaluation, and the packed Jacobian (then its Cholesky factor).
var<workgroup> h: array<f32, M_MAX>;
var<workgroup> dg: array<f32, M_MAX>;
var<workgroup> log_col: array<f32, M_MAX>;
var<workgroup> jac: array<f32, ENTRIES>;
// Control, owned by thread 0.
var<workgroup> state: u32;
var<workgroup> search: u32;
var<workgroup> step_length: f32;
var<workgroup> ascent: f32;
var<workgroup> tries: u32;
var<workgroup> steps: u32;
var<workgroup> error: f32;
var<workgroup> best_error: f32;
var<workgroup> best_step: u32;
var<workgroup> use_newton: u32;
var<workgroup> use_sinkhorn: u32;
var<workgroup> trial_change: f32;
// The potentials' increments before the step being tried.
var<workgroup> h_old: array<f32, M_MAX>;
// Warm start: the m largest valid scaled scores in decreasing order, ties repeated.
var<workgroup> top_u: array<f32, M_MAX>;
var<workgroup> top_filled: u32;
var<workgroup> top_below: f32;
var<workgroup> lane_max: array<f32, WG>;
var<workgroup> lane_count: array<u32, WG>;

// A score's log-plan row and its largest anchor.
struct LogRow {
    lp: array<f32, M_MAX>,
    big: u32,
}

fn packed(i: u32, j: u32) -> u32 {
    return i * (i + 1u) / 2u + j;
}

// The (row, column) of packed entry e, column ≤ row.
fn unpacked(e: u32) -> vec2<u32> {
    var i = 0u;
    loop {
        if (packed(i + 1u, 0u) > e) {
            break;
        }
        i += 1u;
    }
    return vec2<u32>(i, e - packed(i, 0u));
}

fn weight(p: RowParams, j: u32) -> f32 {
    return select(p.w_last, p.w_top, j < p.ranked);
}

// log p_ij of the score u under the current potentials, into `lp`; returns the anchor with the
// largest logit. The logits are summed outward from that anchor, so the ones that matter are
// sums of small gaps.
fn element_logp(u: f32, m: u32) -> LogRow {
    var out: LogRow;
    var big = m - 1u;
    var run = 0.0;
    var top = 0.0;
    for (var j = i32(m) - 2; j >= 0; j--) {
        run += u + h[j];
        if (run > top) {
            top = run;
            big = u32(j);
        }
    }
    out.big = big;
    out.lp[big] = 0.0;
    for (var j = i32(big) - 1; j >= 0; j--) {
        out.lp[j] = out.lp[j + 1] + (u + h[j]);
    }
    for (var j = big + 1u; j < m; j++) {
        out.lp[j] = out.lp[j - 1u] - (u + h[j - 1u]);
    }
    // The recomputed logits can exceed the one at `big` by a rounding; shift by their maximum.
    var most = 0.0;
    for (var j = 0u; j < m; j++) {
        most = max(most, out.lp[j]);
    }
    var s = 0.0;
    for (var j = 0u; j < m; j++) {
        s += exp(out.lp[j] - most);
    }
    let lse = most + log(s);
    for (var j = 0u; j < m; j++) {
        out.lp[j] -= lse;
    }
    return out;
}

fn scaled(p: RowParams, base: u32, i: u32) -> f32 {
    return (p.sign * in_a[base + i] - p.centre) * p.factor;
}

// One pass over the row at the current potentials: the log column sums into `log_col` and,
// when asked, the column Jacobian J_jl = Σ_i p_ij·(δ_jl − p_il) over the free anchors into
// `jac`. Scores go through workgroup memory a tile at a time: TILE threads form the log-plan
// rows, then column threads run an online log-sum-exp down their column and entry threads
// accumulate their Jacobian entries. Workgroup-uniform; the caller barriers before reading.
fn eval_pass(row: u32, p: RowParams, t: u32, with_jacobian: bool) {
    let m = p.anchors;
    let free = m - 1u;
    let entries = free * (free + 1u) / 2u;
    let base = row * p.n;
    var col_max = -HUGE;
    var col_sum = 0.0;
    var acc: array<f32, ENTRIES_PER_THREAD>;
    var at: array<vec2<u32>, ENTRIES_PER_THREAD>;
    for (var q = 0u; q < ENTRIES_PER_THREAD; q++) {
        acc[q] = 0.0;
        at[q] = unpacked(min(t + q * WG, ENTRIES - 1u));
    }

    for (var start = 0u; start < p.n; start += TILE) {
        if (t < TILE) {
            let i = start + t;
            var ok = 0u;
            if (i < p.n && is_valid(row, p.n, i)) {
                ok = 1u;
                let r = element_logp(scaled(p, base, i), m);
                var rest = 0.0;
                for (var l = 0u; l < m; l++) {
                    tile_logp[t * M_MAX + l] = r.lp[l];
                    if (l != r.big) {
                        rest += exp(r.lp[l]);
                    }
                }
                tile_big[t] = r.big;
                tile_rest[t] = rest;
            }
            tile_ok[t] = ok;
        }
        // The tile's log-plan rows are written before column and entry threads read them.
        workgroupBarrier();

        let count = min(TILE, p.n - start);
        if (t < m) {
            for (var i = 0u; i < count; i++) {
                if (tile_ok[i] == 1u) {
                    let v = tile_logp[i * M_MAX + t];
                    if (v > col_max) {
                        col_sum = col_sum * exp(col_max - v) + 1.0;
                        col_max = v;
                    } else {
                        col_sum += exp(v - col_max);
                    }
                }
            }
        }
        if (with_jacobian) {
            for (var q = 0u; q < ENTRIES_PER_THREAD; q++) {
                if (t + q * WG < entries) {
                    let j = at[q].x;
                    let l = at[q].y;
                    var s = 0.0;
                    for (var i = 0u; i < count; i++) {
                        if (tile_ok[i] == 1u) {
                            let lj = tile_logp[i * M_MAX + j];
                            if (j == l) {
                                // Σ_{l≠j} p_il without forming 1 − p_ij when p_ij is near 1.
                                let pj = exp(lj);
                                let others = select(1.0 - pj, tile_rest[i], tile_big[i] == j);
                                s += pj * others;
                            } else {
                                s -= exp(lj + tile_logp[i * M_MAX + l]);
                            }
                        }
                    }
                    acc[q] += s;
                }
            }
        }
        // Everyone is done with this tile before the next one overwrites it.
        workgroupBarrier();
    }

    if (t < m) {
        log_col[t] = col_max + log(col_sum);
    }
    if (with_jacobian) {
        for (var q = 0u; q < ENTRIES_PER_THREAD; q++) {
            if (t + q * WG < entries) {
                jac[t + q * WG] = acc[q];
            }
        }
    }
}

// Thread 0: the marginal error of the last evaluation, in units of 1/n. The ranked columns
// are measured directly; the last column's error is minus their sum, because every row of the
// plan sums to 1 by construction (and its own sum, of n − k terms near 1, is the noisiest).
fn marginal_error(p: RowParams) -> f32 {
    var worst = 0.0;
    var total = 0.0;
    for (var j = 0u; j < p.ranked; j++) {
        let e = exp(log_col[j]) - weight(p, j);
        worst = max(worst, abs(e));
        total += e;
    }
    if (p.anchors > p.ranked) {
        worst = max(worst, abs(total));
    }
    return worst;
}

// Thread 0: the Newton direction dg solving (J + λI) dg = −r over the free anchors, λ =
// RELATIVE_DAMPING × the largest diagonal entry, by Cholesky in place on the packed `jac`;
// false when J is zero or the damped factorisation still fails. Also sets `ascent` = −rᵀdg.
fn newton_direction(p: RowParams) -> bool {
    let free = p.anchors - 1u;
    var scale = 0.0;
    for (var j = 0u; j < free; j++) {
        scale = max(scale, jac[packed(j, j)]);
    }
    if (!(scale > 0.0) || scale > HUGE) {
        return false;
    }
    for (var j = 0u; j < free; j++) {
        jac[packed(j, j)] += RELATIVE_DAMPING * scale;
    }
    for (var j = 0u; j < free; j++) {
        var d = jac[packed(j, j)];
        for (var q = 0u; q < j; q++) {
            d -= jac[packed(j, q)] * jac[packed(j, q)];
        }
        if (!(d > 0.0)) {
            return false;
        }
        d = sqrt(d);
        jac[packed(j, j)] = d;
        for (var i = j + 1u; i < free; i++) {
            var v = jac[packed(i, j)];
            for (var q = 0u; q < j; q++) {
                v -= jac[packed(i, q)] * jac[packed(j, q)];
            }
            jac[packed(i, j)] = v / d;
        }
    }
    // L z = −r, then Lᵀ dg = z.
    for (var i = 0u; i < free; i++) {
        var v = weight(p, i) - exp(log_col[i]);
        for (var q = 0u; q < i; q++) {
            v -= jac[packed(i, q)] * dg[q];
        }
        dg[i] = v / jac[packed(i, i)];
    }
    for (var ii = 0u; ii < free; ii++) {
        let i = free - 1u - ii;
        var v = dg[i];
        for (var q = i + 1u; q < free; q++) {
            v -= jac[packed(q, i)] * dg[q];
        }
        dg[i] = v / jac[packed(i, i)];
    }
    dg[free] = 0.0;
    var slope = 0.0;
    for (var j = 0u; j < free; j++) {
        if (!(abs(dg[j]) < HUGE)) {
            return false;
        }
        slope += (weight(p, j) - exp(log_col[j])) * dg[j];
    }
    ascent = slope;
    return slope > 0.0;
}

// Thread 0: one Sinkhorn column update from the last evaluation, g_j += log w_j − log col_j,
// re-gauged so that g_{m−1} stays 0, applied to the increments.
fn sinkhorn_update(p: RowParams) {
    let m = p.anchors;
    let last = log(weight(p, m - 1u)) - log_col[m - 1u];
    var next = 0.0;
    for (var jj = 0u; jj + 1u < m; jj++) {
        let j = m - 2u - jj;
        var shift = log(weight(p, j)) - log_col[j] - last;
        // A column whose mass underflowed to 0 would get an infinite potential: leave it.
        if (!(abs(shift) < HUGE)) {
            shift = next;
        }
        h[j] += shift - next;
        next = shift;
    }
}

// The change of the semi-dual Σ_j w_j g_j + Σ_i f_i(g) along step·dg, less its first-order
// part step·ascent: Σ_i [step·Σ_j p_ij dg_j − log Σ_j p_ij e^(step·dg_j)], each term a small
// second-order quantity formed without cancellation. Thread 0 gets the total.
fn trial_pass(row: u32, p: RowParams, t: u32, step: f32) -> f32 {
    let m = p.anchors;
    let base = row * p.n;
    var acc = vec2<f32>(0.0);
    for (var i = t; i < p.n; i += WG) {
        if (is_valid(row, p.n, i)) {
            let r = element_logp(scaled(p, base, i), m);
            var first = 0.0;
            var grown = 0.0;
            for (var j = 0u; j + 1u < m; j++) {
                let pj = exp(r.lp[j]);
                first += pj * step * dg[j];
                grown += pj * expm1_accurate(step * dg[j]);
            }
            acc = kahan_add(acc, first - log1p_accurate(grown));
        }
    }
    return wg_sum(t, vec4<f32>(acc.x - acc.y, 0.0, 0.0, 0.0)).x;
}

// Thread 0, after each evaluation: measure it, stop or set up the next step (a Newton
// direction when one exists, else a Sinkhorn update).
fn decide(p: RowParams, newton: bool) {
    let err = marginal_error(p);
    error = err;
    if (newton) {
        if (err < 0.999 * best_error) {
            best_error = err;
            best_step = steps;
        }
        let stalled = steps - best_step >= STALL_STEPS;
        if (err <= p.tolerance || steps >= p.max_iterations || stalled) {
            state = STATE_DONE;
        }
    } else if (p.anchors < 2u || steps >= p.max_iterations
        || (p.tolerance > 0.0 && err <= p.tolerance)) {
        state = STATE_DONE;
    }
    if (state == STATE_RUN) {
        steps += 1u;
        use_newton = select(0u, 1u, newton && newton_direction(p));
        use_sinkhorn = 1u - use_newton;
        for (var j = 0u; j < M_MAX; j++) {
            h_old[j] = h[j];
        }
        step_length = 1.0;
        tries = 0u;
        search = SEARCH_TRYING;
    }
}

// Thread 0, after evaluating a trial step: accept it when the semi-dual rises (Armijo) or,
// near the solution where the rise is below the objective's rounding, when the marginal
// error shrinks; else restore the potentials and halve the step.
fn judge_trial(p: RowParams, step: f32) {
    let err = marginal_error(p);
    let rises = trial_change >= -(1.0 - 1e-4) * step * ascent;
    let closer = err <= (1.0 - 1e-4 * step) * error;
    // A trial whose plan overflowed (a non-finite error) is never taken.
    if ((rises || closer) && err < HUGE) {
        search = SEARCH_ACCEPTED;
    } else {
        for (var j = 0u; j < M_MAX; j++) {
            h[j] = h_old[j];
        }
        tries += 1u;
        step_length = 0.5 * step;
        if (tries >= LINE_SEARCH_STEPS) {
            search = SEARCH_FAILED;
        }
    }
}

// The potentials of the hard sorted assignment (the reference's `hard_assignment_potentials`):
// the boundary between anchors j and j + 1 halfway between the (j+1)-th and (j+2)-th largest
// scores, h_j = −boundary. The m largest scores are found by m rounds of a workgroup maximum
// over the scores below the last round's, ties counted. Workgroup-uniform.
fn warm_start(row: u32, p: RowParams, t: u32) {
    let m = p.anchors;
    let base = row * p.n;
    if (t == 0u) {
        top_filled = 0u;
        top_below = HUGE;
    }
    // The round state is set before anyone reads it.
    workgroupBarrier();
    if (p.n_valid < 2u || m < 2u) {
        return;
    }
    loop {
        let below = top_below;
        let first = top_filled == 0u;
        var best = -HUGE;
        var count = 0u;
        for (var i = t; i < p.n; i += WG) {
            if (is_valid(row, p.n, i)) {
                let u = scaled(p, base, i);
                if (first || u < below) {
                    if (u > best) {
                        best = u;
                        count = 1u;
                    } else if (u == best) {
                        count += 1u;
                    }
                }
            }
        }
        lane_max[t] = best;
        lane_count[t] = count;
        // Every lane's candidate is in place before thread 0 merges them.
        workgroupBarrier();
        if (t == 0u) {
            var most = -HUGE;
            for (var l = 0u; l < WG; l++) {
                if (lane_count[l] > 0u) {
                    most = max(most, lane_max[l]);
                }
            }
            var ties = 0u;
            for (var l = 0u; l < WG; l++) {
                if (lane_count[l] > 0u && lane_max[l] == most) {
                    ties += lane_count[l];
                }
            }
            if (ties == 0u) {
                // Fewer distinct scores than anchors cannot happen (m ≤ n_valid); stop anyway.
                top_filled = m;
            }
            for (var c = 0u; c < ties && top_filled < m; c++) {
                top_u[top_filled] = most;
                top_filled += 1u;
            }
            top_below = most;
        }
        if (workgroupUniformLoad(&top_filled) >= m) {
            break;
        }
    }
    if (t == 0u) {
        let last = min(m, p.n_valid) - 1u;
        for (var j = 0u; j + 1u < m; j++) {
            h[j] = -(0.5 * top_u[j] + 0.5 * top_u[min(j + 1u, last)]);
        }
    }
}

// transport_forward: the plan's ranked columns as the mask (their sum) and, for sorted, the
// ranks.
//   params:     [rows] RowParams (mode, n, anchors, ranked, k_max, solver, max_iterations,
//               sign, factor, centre, tolerance, w_top, w_last)
//   valid_bits: [rows, ceil(n/32)]
//   in_a:       scores [rows, n]
//   out_a:      mask [rows, n]
//   out_b:      ranks [rows, k_max, n] (sorted only: k_max > 0)
//   report:     [rows, 4]: iterations, converged, marginal error (f32 bits)
@compute @workgroup_size(WG)
fn transport_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let row = wid.x;
    let p = params[row];
    let base = row * p.n;
    if (p.mode != MODE_SOLVE) {
        for (var i = t; i < p.n; i += WG) {
            out_a[base + i] = select(0.0, 1.0, p.mode == MODE_ONES && is_valid(row, p.n, i));
            for (var j = 0u; j < p.k_max; j++) {
                out_b[(row * p.k_max + j) * p.n + i] = 0.0;
            }
        }
        return;
    }
    let m = p.anchors;
    let newton = p.solver == SOLVER_NEWTON && m > 1u;

    if (t < M_MAX) {
        h[t] = 0.0;
        dg[t] = 0.0;
    }
    if (t == 0u) {
        state = STATE_RUN;
        steps = 0u;
        best_error = HUGE;
        best_step = 0u;
    }
    // The potentials and the control block are set before the warm start and first pass.
    workgroupBarrier();
    if (newton) {
        warm_start(row, p, t);
    }
    // The starting potentials are written before the first pass reads them.
    workgroupBarrier();
    eval_pass(row, p, t, newton);
    // The first pass's column sums (and Jacobian) are complete before thread 0 reads them.
    workgroupBarrier();
    if (t == 0u) {
        decide(p, newton);
    }

    loop {
        // Thread 0's decision is written before anyone reads it (the load is a barrier).
        if (workgroupUniformLoad(&state) != STATE_RUN) {
            break;
        }
        let newton_step = workgroupUniformLoad(&use_newton) == 1u;
        if (newton_step) {
            loop {
                // step_length and dg were written by thread 0 before the last uniform load.
                let step = step_length;
                let change = trial_pass(row, p, t, step);
                if (t == 0u) {
                    trial_change = change;
                    for (var j = 0u; j + 1u < m; j++) {
                        h[j] = h_old[j] + step * (dg[j] - dg[j + 1u]);
                    }
                }
                // The trial potentials are written before the pass reads them.
                workgroupBarrier();
                eval_pass(row, p, t, true);
                // The trial's column sums are complete before thread 0 judges them.
                workgroupBarrier();
                if (t == 0u) {
                    judge_trial(p, step);
                    if (search == SEARCH_FAILED) {
                        use_sinkhorn = 1u;
                    }
                }
                if (workgroupUniformLoad(&search) != SEARCH_TRYING) {
                    break;
                }
            }
        }
        if (workgroupUniformLoad(&use_sinkhorn) == 1u) {
            if (newton_step) {
                // The failed search left the column sums of its last trial: measure the
                // restored potentials again for the Sinkhorn update.
                eval_pass(row, p, t, false);
                // The column sums are complete before thread 0 reads them.
                workgroupBarrier();
            }
            if (t == 0u) {
                sinkhorn_update(p);
            }
            // The new potentials are written before the next pass reads them.
            workgroupBarrier();
            eval_pass(row, p, t, newton);
            // The pass's column sums (and Jacobian) are complete before thread 0 reads them.
            workgroupBarrier();
        }
        // After an accepted trial, `log_col` and `jac` already describe the new potentials.
        if (t == 0u) {
            decide(p, newton);
        }
    }

    // The final potentials are in place (the uniform load that ended the loop is a barrier).
    for (var i = t; i < p.n; i += WG) {
        var mask = 0.0;
        let ok = is_valid(row, p.n, i);
        var r: LogRow;
        if (ok) {
            r = element_logp(scaled(p, base, i), m);
            for (var j = 0u; j < p.ranked; j++) {
                mask += exp(r.lp[j]);
            }
        }
        out_a[base + i] = mask;
        for (var j = 0u; j < p.k_max; j++) {
            var v = 0.0;
            if (ok && j < p.ranked) {
                v = exp(r.lp[j]);
            }
            out_b[(row * p.k_max + j) * p.n + i] = v;
        }
    }
    if (t == 0u) {
        let goal = select(AUTO_TOLERANCE, p.tolerance, p.tolerance > 0.0);
        report[row * 4u] = steps;
        report[row * 4u + 1u] = select(0u, 1u, error <= goal);
        report[row * 4u + 2u] = bitcast<u32>(error);
    }
}
