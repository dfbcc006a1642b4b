// Entropic transport from a row's scores to m anchors y_j = ranked − j (MATH.md §1 with two
// anchors for top-k Sinkhorn, §2 with k + 1 anchors for sorted): log-domain Sinkhorn, or
// Newton on the anchor potentials with a line search (the reference's `sorted_newton`).
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
//
// Dispatches (src/gpu/transport.rs records them; plan.wgsl says why a solve is cut up):
//   transport_init    chunks × rows   each chunk's m largest scores (Newton's warm start)
//   transport_start   1 × rows        the starting potentials and the row's state
//   transport_pass    chunks × rows   ┐ one evaluation: the chunk's log column sums, its
//   transport_step    1 × rows        ┘ Jacobian and line-search term; then the row's
//                                       decision (stop, Newton step, trial, Sinkhorn update)
//   transport_finish  chunks × rows   the mask, the ranks and the report
// The host records pass + step pairs a block at a time and reads the reports' running flags
// between blocks; a row that has stopped makes every later dispatch return at once. The
// marginal error is measured on the GPU after every evaluation.

const SOLVER_SINKHORN: u32 = 0u;
const SOLVER_NEWTON: u32 = 1u;
// Mirrors `GPU_AUTO_TOLERANCE` in src/gpu/rows.rs: what "converged" means for the paper's
// fixed sweep count (tolerance 0).
const AUTO_TOLERANCE: f32 = 1e-5;
// Halvings of a Newton step before falling back to a Sinkhorn update.
const LINE_SEARCH_STEPS: u32 = 30u;
// Newton stops when the marginal error has not improved for this many steps: the f32 floor.
const STALL_STEPS: u32 = 6u;
// Within its tolerance, Newton takes another step while the last one divided the marginal
// error by at least FAST_GAIN, down to TIGHTENED × the tolerance (see `decide`).
const FAST_GAIN: f32 = 4.0;
const TIGHTENED: f32 = 0.01;

// What the last evaluation measured: new potentials (decide what next), a trial step of
// Newton (judge it), or nothing any more.
const PHASE_MEASURE: u32 = 0u;
const PHASE_TRIAL: u32 = 1u;
const PHASE_DONE: u32 = 2u;

// The row state at the start of each row's `work` (offsets in floats; counts are stored as
// f32, exact below 2^24): the potentials' increments, those before the step being tried, the
// Newton direction in g (0 on the last anchor), the log column sums at the accepted
// potentials, then the control scalars.
const S_H: u32 = 0u;
const S_H_OLD: u32 = 33u;
const S_DG: u32 = 66u;
const S_LOG_COL: u32 = 99u;
const S_PHASE: u32 = 132u;
const S_STEPS: u32 = 133u;
const S_BEST_STEP: u32 = 134u;
const S_TRIES: u32 = 135u;
const S_ERROR: u32 = 136u;
const S_BEST_ERROR: u32 = 137u;
const S_STEP_LENGTH: u32 = 138u;
const S_ASCENT: u32 = 139u;
// In a chunk's partial block: P_COLUMNS holds each anchor's log-sum-exp as (max, sum) pairs,
// the maxima first; P_EXTRA the line-search term. transport_init reuses P_COLUMNS for the
// chunk's m largest scores and P_EXTRA for how many there are.

// The row state while a kernel runs; the control scalars are thread 0's.
var<workgroup> h: array<f32, M_MAX>;
var<workgroup> h_old: array<f32, M_MAX>;
var<workgroup> dg: array<f32, M_MAX>;
var<workgroup> log_col: array<f32, M_MAX>;
var<workgroup> log_col_old: array<f32, M_MAX>;
var<workgroup> phase: u32;
var<workgroup> steps: u32;
var<workgroup> best_step: u32;
var<workgroup> tries: u32;
var<workgroup> error: f32;
var<workgroup> best_error: f32;
var<workgroup> step_length: f32;
var<workgroup> ascent: f32;
var<workgroup> trial_change: f32;
// The line-search term of each element thread, for thread 0 to add.
var<workgroup> trial_lanes: array<f32, TILE>;
// Warm start: the m largest scaled scores so far in decreasing order, ties repeated, and each
// lane's candidate of the current round.
var<workgroup> top_u: array<f32, M_MAX>;
var<workgroup> top_filled: u32;
var<workgroup> top_below: f32;
// Set once the list is full or nothing is left to offer.
var<workgroup> top_stop: u32;
var<workgroup> lane_max: array<f32, WG>;
var<workgroup> lane_count: array<u32, WG>;

fn weight(p: RowParams, j: u32) -> f32 {
    return select(p.w_last, p.w_top, j < p.ranked);
}

fn scaled(p: RowParams, row: u32, i: u32) -> f32 {
    return (p.sign * in_a[row * p.n + i] - p.centre) * p.factor;
}

// log p_j of the score u for j < m, under the potentials `h` (or `h_old`). The logits are
// summed outward from the anchor with the largest one, so the ones that matter are sums of
// small gaps.
fn element_logp(u: f32, m: u32, old: bool) -> array<f32, M_MAX> {
    var lp: array<f32, M_MAX>;
    var big = m - 1u;
    var run = 0.0;
    var top = 0.0;
    for (var j = i32(m) - 2; j >= 0; j--) {
        run += u + select(h[j], h_old[j], old);
        if (run > top) {
            top = run;
            big = u32(j);
        }
    }
    lp[big] = 0.0;
    for (var j = i32(big) - 1; j >= 0; j--) {
        lp[j] = lp[j + 1] + (u + select(h[j], h_old[j], old));
    }
    for (var j = big + 1u; j < m; j++) {
        lp[j] = lp[j - 1u] - (u + select(h[j - 1u], h_old[j - 1u], old));
    }
    // The recomputed logits can exceed the one at `big` by a rounding; shift by their maximum.
    var most = 0.0;
    for (var j = 0u; j < m; j++) {
        most = max(most, lp[j]);
    }
    var s = 0.0;
    for (var j = 0u; j < m; j++) {
        s += exp(lp[j] - most);
    }
    let lse = most + log(s);
    for (var j = 0u; j < m; j++) {
        lp[j] -= lse;
    }
    return lp;
}

// The score u's share of the change of the semi-dual Σ_j w_j g_j + Σ_i f_i(g) along step·dg
// from `h_old`, less its first-order part: step·Σ_j p_j dg_j − log Σ_j p_j e^(step·dg_j), a
// small second-order quantity formed without cancellation.
fn trial_term(u: f32, m: u32, step: f32) -> f32 {
    let lp = element_logp(u, m, true);
    var first = 0.0;
    var grown = 0.0;
    for (var j = 0u; j + 1u < m; j++) {
        let pj = exp(lp[j]);
        first += pj * step * dg[j];
        grown += pj * expm1_accurate(step * dg[j]);
    }
    return first - log1p_accurate(grown);
}

// Thread 0: the marginal error of `log_col`, in units of 1/n. Every column is measured
// directly but the heaviest, whose error is minus the others' sum: every row of the plan sums
// to 1 by construction, and the heaviest column's own sum (of up to n terms near 1) carries
// the most rounding.
fn marginal_error(p: RowParams) -> f32 {
    let heaviest = select(0u, p.anchors - 1u, p.w_last >= p.w_top && p.anchors > p.ranked);
    var worst = 0.0;
    var total = 0.0;
    for (var j = 0u; j < p.anchors; j++) {
        if (j != heaviest) {
            let e = exp(log_col[j]) - weight(p, j);
            worst = max(worst, abs(e));
            total += e;
        }
    }
    return max(worst, abs(total));
}

// Thread 0: the Newton direction dg solving (J + λI) dg = −r over the free anchors (see
// `damped_solve`); false when there is none or it does not ascend. Sets `ascent` = −rᵀdg.
fn newton_direction(p: RowParams) -> bool {
    let free = p.anchors - 1u;
    for (var j = 0u; j < free; j++) {
        rhs[j] = weight(p, j) - exp(log_col[j]);
    }
    if (!damped_solve(free)) {
        return false;
    }
    var slope = 0.0;
    for (var j = 0u; j < free; j++) {
        dg[j] = rhs[j];
        slope += (weight(p, j) - exp(log_col[j])) * dg[j];
    }
    dg[free] = 0.0;
    ascent = slope;
    return slope > 0.0;
}

// Thread 0: one Sinkhorn column update from `log_col`, g_j += log w_j − log col_j, re-gauged
// so that g_{m−1} stays 0, applied to the increments.
fn sinkhorn_update(p: RowParams) {
    let m = p.anchors;
    let last = log(weight(p, m - 1u)) - log_col[m - 1u];
    var next = 0.0;
    for (var jj = 0u; jj + 1u < m; jj++) {
        let j = m - 2u - jj;
        var shift = log(weight(p, j)) - log_col[j] - last;
        // A column whose mass underflowed would get an infinite potential: leave it.
        if (!(abs(shift) < HUGE)) {
            shift = next;
        }
        h[j] += shift - next;
        next = shift;
    }
}

// Thread 0: the potentials h_old + step·dg, as increments.
fn set_trial(m: u32, step: f32) {
    for (var j = 0u; j + 1u < m; j++) {
        h[j] = h_old[j] + step * (dg[j] - dg[j + 1u]);
    }
}

// Thread 0, after an evaluation of new potentials: stop, or set up the next evaluation (a
// Newton trial when a direction exists, else a Sinkhorn update).
fn decide(p: RowParams, newton: bool) {
    let err = marginal_error(p);
    let before = error;
    error = err;
    var stop = false;
    if (newton) {
        if (err < 0.999 * best_error) {
            best_error = err;
            best_step = steps;
        }
        // Within the tolerance, Newton goes on while its steps still gain a factor of
        // FAST_GAIN, towards TIGHTENED × the tolerance: near the solution a step costs one
        // evaluation and buys digits the f32 floor still allows.
        let fast = err <= before / FAST_GAIN && err > TIGHTENED * p.tolerance;
        let within = err <= p.tolerance && !fast;
        stop = within || steps >= p.max_iterations || steps - best_step >= STALL_STEPS;
    } else {
        stop = p.anchors < 2u || steps >= p.max_iterations
            || (p.tolerance > 0.0 && err <= p.tolerance);
    }
    if (stop) {
        phase = PHASE_DONE;
        return;
    }
    steps += 1u;
    for (var j = 0u; j < M_MAX; j++) {
        log_col_old[j] = log_col[j];
    }
    if (newton && newton_direction(p)) {
        for (var j = 0u; j < M_MAX; j++) {
            h_old[j] = h[j];
        }
        step_length = 1.0;
        tries = 0u;
        set_trial(p.anchors, 1.0);
        phase = PHASE_TRIAL;
    } else {
        sinkhorn_update(p);
        phase = PHASE_MEASURE;
    }
}

// Thread 0, after evaluating a trial step: accept it when the semi-dual rises (Armijo) or,
// near the solution where the rise is below the objective's rounding, when the marginal
// error shrinks; else halve the step, or after LINE_SEARCH_STEPS halvings go back to the
// accepted potentials and take a Sinkhorn update from there.
fn judge_trial(p: RowParams, newton: bool) {
    let step = step_length;
    let err = marginal_error(p);
    let rises = trial_change >= -(1.0 - 1e-4) * step * ascent;
    let closer = err <= (1.0 - 1e-4 * step) * error;
    // A trial whose plan overflowed (a non-finite error) is never taken.
    if ((rises || closer) && err < HUGE) {
        decide(p, newton);
        return;
    }
    tries += 1u;
    if (tries < LINE_SEARCH_STEPS) {
        step_length = 0.5 * step;
        set_trial(p.anchors, step_length);
        return;
    }
    for (var j = 0u; j < M_MAX; j++) {
        h[j] = h_old[j];
        log_col[j] = log_col_old[j];
    }
    sinkhorn_update(p);
    phase = PHASE_MEASURE;
}

// Reads the row state from `work` into workgroup memory: threads below M_MAX the arrays,
// thread 0 the scalars. The caller's uniform load of `phase` is the barrier after it.
fn load_state(base: u32, t: u32) {
    if (t < M_MAX) {
        h[t] = work[base + S_H + t];
        h_old[t] = work[base + S_H_OLD + t];
        dg[t] = work[base + S_DG + t];
        log_col_old[t] = work[base + S_LOG_COL + t];
    }
    if (t == 0u) {
        phase = u32(work[base + S_PHASE]);
        steps = u32(work[base + S_STEPS]);
        best_step = u32(work[base + S_BEST_STEP]);
        tries = u32(work[base + S_TRIES]);
        error = work[base + S_ERROR];
        best_error = work[base + S_BEST_ERROR];
        step_length = work[base + S_STEP_LENGTH];
        ascent = work[base + S_ASCENT];
    }
}

// Thread 0: writes the row state back, and the running flag to the row's report.
fn save_state(row: u32, base: u32) {
    for (var j = 0u; j < M_MAX; j++) {
        work[base + S_H + j] = h[j];
        work[base + S_H_OLD + j] = h_old[j];
        work[base + S_DG + j] = dg[j];
        work[base + S_LOG_COL + j] = log_col_old[j];
    }
    work[base + S_PHASE] = f32(phase);
    work[base + S_STEPS] = f32(steps);
    work[base + S_BEST_STEP] = f32(best_step);
    work[base + S_TRIES] = f32(tries);
    work[base + S_ERROR] = error;
    work[base + S_BEST_ERROR] = best_error;
    work[base + S_STEP_LENGTH] = step_length;
    work[base + S_ASCENT] = ascent;
    report[row * 4u + 3u] = select(1u, 0u, phase == PHASE_DONE);
}

// A lane's offer in one round of the search for the m largest values: its largest value
// below the last round's, and how often it saw it.
struct Offer {
    best: f32,
    count: u32,
}

// The offer after seeing u, in a round that takes values below `below` (any in the first).
fn consider(o: Offer, u: f32, filled: u32, below: f32) -> Offer {
    if ((filled > 0u && u >= below) || u < o.best) {
        return o;
    }
    return Offer(u, select(1u, o.count + 1u, u == o.best));
}

// One round of a workgroup's search for the m largest values: thread 0 appends the largest
// lane offer to `top_u` as often as it occurs, up to m in all. Workgroup-uniform; the caller's
// uniform load of `top_stop` is the barrier after it.
fn top_round(t: u32, lane: Offer, m: u32) {
    lane_max[t] = lane.best;
    lane_count[t] = lane.count;
    // Every lane's offer is in place before thread 0 merges them.
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
        for (var c = 0u; c < ties && top_filled < m; c++) {
            top_u[top_filled] = most;
            top_filled += 1u;
        }
        top_below = most;
        // With no offer left, the list is as long as it gets.
        top_stop = select(0u, 1u, ties == 0u || top_filled >= m);
    }
}

// Thread 0: an empty list, before the first round.
fn top_reset() {
    top_filled = 0u;
    top_below = HUGE;
    top_stop = 0u;
}

// Whether the row runs Newton (else Sinkhorn).
fn uses_newton(p: RowParams) -> bool {
    return p.solver == SOLVER_NEWTON && p.anchors > 1u;
}

// transport_init: chunk `wid.x` of row `wid.y` writes its m largest valid scaled scores (ties
// repeated) and how many it has, for transport_start's warm start. Newton rows only.
@compute @workgroup_size(WG)
fn transport_init(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let row = wid.y;
    let p = params[row];
    if (p.mode != MODE_SOLVE || !uses_newton(p)) {
        return;
    }
    let m = p.anchors;
    let start = wid.x * CHUNK;
    let end = min(p.n, start + CHUNK);
    if (t == 0u) {
        top_reset();
    }
    loop {
        // The last round's result is in place before anyone reads it (the load is a barrier).
        if (workgroupUniformLoad(&top_stop) == 1u) {
            break;
        }
        let filled = top_filled;
        let below = top_below;
        var lane = Offer(-HUGE, 0u);
        for (var i = start + t; i < end; i += WG) {
            if (is_valid(row, p.n, i)) {
                lane = consider(lane, scaled(p, row, i), filled, below);
            }
        }
        top_round(t, lane, m);
    }
    if (t == 0u) {
        let at = partial_base(row, p.n, wid.x);
        for (var j = 0u; j < top_filled; j++) {
            work[at + P_COLUMNS + j] = top_u[j];
        }
        work[at + P_EXTRA] = f32(top_filled);
    }
}

// transport_start: row `wid.y`'s starting potentials, the hard sorted assignment's for
// Newton (the boundary between anchors j and j + 1 halfway between the (j+1)-th and (j+2)-th
// largest scores, h_j = −boundary, merged from the chunks' lists), 0 for Sinkhorn.
@compute @workgroup_size(WG)
fn transport_start(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let row = wid.y;
    let p = params[row];
    if (p.mode != MODE_SOLVE) {
        if (t == 0u) {
            report[row * 4u + 3u] = 0u;
        }
        return;
    }
    let m = p.anchors;
    if (t < M_MAX) {
        h[t] = 0.0;
        h_old[t] = 0.0;
        dg[t] = 0.0;
        log_col_old[t] = 0.0;
        top_u[t] = -HUGE;
    }
    if (t == 0u) {
        top_reset();
    }
    if (uses_newton(p) && p.n_valid >= 2u) {
        let chunks = chunk_count(p.n);
        loop {
            // The last round's result is in place before anyone reads it.
            if (workgroupUniformLoad(&top_stop) == 1u) {
                break;
            }
            let filled = top_filled;
            let below = top_below;
            var lane = Offer(-HUGE, 0u);
            for (var e = t; e < chunks * m; e += WG) {
                let at = partial_base(row, p.n, e / m);
                if (f32(e % m) < work[at + P_EXTRA]) {
                    lane = consider(lane, work[at + P_COLUMNS + e % m], filled, below);
                }
            }
            top_round(t, lane, m);
        }
        if (t == 0u) {
            let last = min(m, p.n_valid) - 1u;
            for (var j = 0u; j + 1u < m; j++) {
                h[j] = -(0.5 * top_u[j] + 0.5 * top_u[min(j + 1u, last)]);
            }
        }
    }
    // The starting potentials are in place before thread 0 saves them.
    workgroupBarrier();
    if (t == 0u) {
        phase = PHASE_MEASURE;
        steps = 0u;
        best_step = 0u;
        tries = 0u;
        error = HUGE;
        best_error = HUGE;
        step_length = 1.0;
        ascent = 0.0;
        save_state(row, row_base(row, p.n));
    }
}

// transport_pass: chunk `wid.x` of row `wid.y` under the potentials to measure: each anchor's
// log column sum as (max, sum), the Jacobian over the free anchors (Newton), and for a trial
// step the line-search term. Scores go through workgroup memory a tile at a time: TILE
// threads form the plan rows, then column threads run an online log-sum-exp down their
// column and entry threads add up their Jacobian entries.
@compute @workgroup_size(WG)
fn transport_pass(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let row = wid.y;
    let p = params[row];
    if (p.mode != MODE_SOLVE) {
        return;
    }
    load_state(row_base(row, p.n), t);
    // The state is in place before anyone reads it (the load is a barrier).
    let now = workgroupUniformLoad(&phase);
    if (now == PHASE_DONE) {
        return;
    }
    let trial = now == PHASE_TRIAL;
    let step = step_length;
    let newton = uses_newton(p);
    let m = p.anchors;
    let free = m - 1u;
    let start = wid.x * CHUNK;
    let end = min(p.n, start + CHUNK);

    var col_max = -HUGE;
    var col_sum = 0.0;
    var share = jacobian_share(t);
    var trial_acc = vec2<f32>(0.0);
    for (var first = start; first < end; first += TILE) {
        if (t < TILE) {
            let i = first + t;
            let ok = i < end && is_valid(row, p.n, i);
            var lp: array<f32, M_MAX>;
            if (ok) {
                let u = scaled(p, row, i);
                lp = element_logp(u, m, false);
                if (trial) {
                    trial_acc = kahan_add(trial_acc, trial_term(u, m, step));
                }
            }
            tile_put(t, ok, lp, m);
        }
        // The tile's plan rows are written before column and entry threads read them.
        workgroupBarrier();
        let count = min(TILE, end - first);
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
        if (newton) {
            jacobian_tile(&share, t, free, count);
        }
        // Everyone is done with this tile before the next one overwrites it.
        workgroupBarrier();
    }

    let at = partial_base(row, p.n, wid.x);
    if (t < m) {
        work[at + P_COLUMNS + t] = col_max;
        work[at + P_COLUMNS + M_MAX + t] = col_sum;
    }
    if (newton) {
        jacobian_store(share, t, free, at);
    }
    if (t < TILE) {
        trial_lanes[t] = trial_acc.x - trial_acc.y;
    }
    // Every element thread's term is in place before thread 0 adds them.
    workgroupBarrier();
    if (t == 0u) {
        var s = 0.0;
        for (var l = 0u; l < TILE; l++) {
            s += trial_lanes[l];
        }
        work[at + P_EXTRA] = s;
    }
}

// transport_step: row `wid.y` adds up its chunks' partial sums and decides: stop, a Newton
// trial, the verdict on a trial, or a Sinkhorn update.
@compute @workgroup_size(WG)
fn transport_step(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let row = wid.y;
    let p = params[row];
    if (p.mode != MODE_SOLVE) {
        return;
    }
    let base = row_base(row, p.n);
    load_state(base, t);
    // The state is in place before anyone reads it (the load is a barrier).
    let now = workgroupUniformLoad(&phase);
    if (now == PHASE_DONE) {
        return;
    }
    let newton = uses_newton(p);
    let m = p.anchors;
    let chunks = chunk_count(p.n);
    if (t < m) {
        var most = -HUGE;
        for (var c = 0u; c < chunks; c++) {
            most = max(most, work[partial_base(row, p.n, c) + P_COLUMNS + t]);
        }
        var s = 0.0;
        for (var c = 0u; c < chunks; c++) {
            let at = partial_base(row, p.n, c) + P_COLUMNS;
            s += work[at + M_MAX + t] * exp(work[at + t] - most);
        }
        log_col[t] = select(-HUGE, most + log(s), s > 0.0);
    }
    if (newton) {
        jacobian_gather(t, m - 1u, row, p.n);
    }
    if (t == 0u && now == PHASE_TRIAL) {
        var s = 0.0;
        for (var c = 0u; c < chunks; c++) {
            s += work[partial_base(row, p.n, c) + P_EXTRA];
        }
        trial_change = s;
    }
    // The row's sums are complete before thread 0 reads them.
    workgroupBarrier();
    if (t == 0u) {
        if (now == PHASE_TRIAL) {
            judge_trial(p, newton);
        } else {
            decide(p, newton);
        }
        save_state(row, base);
    }
}

// transport_finish: chunk `wid.x` of row `wid.y` writes its mask (the plan's ranked columns'
// sum) and, for sorted, its ranks, under the last accepted potentials; chunk 0 writes the
// row's report.
//   params:     [rows] RowParams (mode, n, anchors, ranked, k_max, solver, max_iterations,
//               sign, factor, centre, tolerance, w_top, w_last)
//   valid_bits: [rows, ceil(n/32)]
//   in_a:       scores [rows, n]
//   out_a:      mask [rows, n]
//   out_b:      ranks [rows, k_max, n] (sorted only: k_max > 0)
//   report:     [rows, 4]: iterations, converged, marginal error (f32 bits), running (0)
@compute @workgroup_size(WG)
fn transport_finish(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let row = wid.y;
    let p = params[row];
    let start = wid.x * CHUNK;
    let end = min(p.n, start + CHUNK);
    let out = row * p.n;
    if (p.mode != MODE_SOLVE) {
        for (var i = start + t; i < end; i += WG) {
            out_a[out + i] = select(0.0, 1.0, p.mode == MODE_ONES && is_valid(row, p.n, i));
            for (var j = 0u; j < p.k_max; j++) {
                out_b[(row * p.k_max + j) * p.n + i] = 0.0;
            }
        }
        return;
    }
    let base = row_base(row, p.n);
    load_state(base, t);
    // The state is in place before anyone reads it (the load is a barrier).
    let now = workgroupUniformLoad(&phase);
    // A row cut off by the host's cap in the middle of a trial keeps its accepted potentials.
    let old = now == PHASE_TRIAL;
    let m = p.anchors;
    for (var i = start + t; i < end; i += WG) {
        let ok = is_valid(row, p.n, i);
        var lp: array<f32, M_MAX>;
        var mask = 0.0;
        if (ok) {
            lp = element_logp(scaled(p, row, i), m, old);
            for (var j = 0u; j < p.ranked; j++) {
                mask += exp(lp[j]);
            }
        }
        // The ranked entries sum to at most 1 but their rounded sum can pass it by an ulp.
        out_a[out + i] = min(mask, 1.0);
        for (var j = 0u; j < p.k_max; j++) {
            out_b[(row * p.k_max + j) * p.n + i] = select(0.0, exp(lp[j]), ok && j < p.ranked);
        }
    }
    if (wid.x == 0u && t == 0u) {
        let goal = select(AUTO_TOLERANCE, p.tolerance, p.tolerance > 0.0);
        report[row * 4u] = steps;
        report[row * 4u + 1u] = select(0u, 1u, error <= goal);
        report[row * 4u + 2u] = bitcast<u32>(error);
        report[row * 4u + 3u] = 0u;
    }
}
