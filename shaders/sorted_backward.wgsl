// The sorted variant's backward: implicit differentiation of the converged plan (MATH.md §5),
// in the units of the reference's `sorted_backward` where each plan row sums to 1 (p = n·Γ).
// For the ranked anchors j < k, p_ij is the forward's ranks[j][i]; a leftover anchor (when
// k < n_valid) takes p_ik = max(0, 1 − Σ_j ranks[j][i]). With g_ij the cotangent of p_ij (0 on
// the leftover anchor) and β_{m−1} = 0 fixing the gauge:
//
//   r_i = Σ_j p_ij g_ij,   J β = Σ_i p_ij (g_ij − r_i)  (free anchors j < m − 1)
//   ∂L/∂x_i = sign · (−factor) · Σ_j p_ij (α_i + β_j − g_ij) y_j,
//   α_i = r_i − Σ_j p_ij β_j
//
// with J the column Jacobian of plan.wgsl and anchors y_j = k − j.
//
// Dispatches (src/gpu/sorted_backward.rs records them, one submission; plan.wgsl says why the
// work is cut up):
//   sorted_backward_pass    chunks × rows   the chunk's share of the right side and of J
//   sorted_backward_solve   1 × rows        β from the row's sums, and whether it exists
//   sorted_backward_finish  chunks × rows   the gradient of the chunk's scores
//
// Accuracy. Every quantity the formulas subtract is of the form h_j − Σ_l p_il h_l (with
// h = g on the right side, h = β − g in the gradient), which loses all its digits in f32 when
// item i sits nearly entirely on one anchor b: the sum is then h_b to within a small amount,
// and that small amount is the answer. `deviations` forms it from differences h_b − h_l
// instead, weighted by the small p_il. The plan's entries are used as the forward gave them,
// never through their logarithms.
//
// Rows of the plan are made to sum to 1 (the defect 1 − Σ_j p_ij, a few f32 roundings of the
// forward's ranks, is added to the largest entry), as the reference does: where J is
// (nearly) singular (a block of exactly tied items that exchange mass with no other anchor,
// or a nearly hard row whose exchanges are as small as the defect), only the damping holds β
// along that direction, and a defect would move it there by defect/damping.

// Mirrors `reference::ROUNDED_PLAN_DAMPING` (src/reference/backward.rs): added to J's diagonal
// because an f32 plan knows a nearly hard item's leftover mass only to its rounding, which
// would otherwise move β along J's near-null directions by that noise over the damping.
const ROUNDED_PLAN_DAMPING: f32 = 1e-6;

// Which cotangent in_b holds; mirrors `COTANGENT_*` in src/gpu/rows.rs.
const COTANGENT_MASK: u32 = 0u;
const COTANGENT_RANKS: u32 = 1u;

// The row state at the start of each row's `work` (offsets in floats): β over the free
// anchors, then 1.0 when the solve succeeded (else 0.0, and the row's gradient is 0).
const S_BETA: u32 = 0u;
const S_SOLVED: u32 = 33u;
// In a chunk's partial block, P_COLUMNS holds the chunk's share of the right side of J β,
// one float per free anchor.

// Refinement steps after the damped solve: each solves (J + λI) d = rhs − J β and adds d to β,
// which shrinks the damping's error in a direction of curvature μ by λ/(μ + λ) (see
// `sorted_backward_solve`).
const REFINEMENTS: u32 = 2u;

// The tile's terms p_ij (g_ij − r_i) over the free anchors, for the column threads to add.
var<workgroup> tile_w: array<f32, TILE_CELLS>;
// The solve kernel's copies of J (packed) and of the right side, for the refinement.
var<workgroup> jac_kept: array<f32, ENTRIES>;
var<workgroup> rhs_kept: array<f32, M_MAX>;
// The row's β (0 on the last anchor) and whether it exists, in the finishing kernel.
var<workgroup> beta: array<f32, M_MAX>;
var<workgroup> solved: u32;

// Item i's plan row and cotangent, read from the forward's ranks and from in_b.
struct PlanRow {
    p: array<f32, M_MAX>,
    g: array<f32, M_MAX>,
    // The anchor with the largest p, and Σ_{l≠big} p_l.
    big: u32,
    rest: f32,
}

// Whether row p has a gradient to compute: a solved row with at least one free anchor (a
// single valid entry has none: its plan does not move). The host answers rows whose factor
// passes the f32 range on the CPU; an infinite one here would only make NaN.
fn has_gradient(p: RowParams) -> bool {
    return p.mode == MODE_SOLVE && p.anchors >= 2u && abs(p.factor) <= 3.40282347e38;
}

fn plan_row(p: RowParams, row: u32, i: u32) -> PlanRow {
    var e: PlanRow;
    let k = p.ranked;
    let m = p.anchors;
    // Σ_j ranks[j][i] as an f32 pair: the leftover entry 1 − Σ is nearly 0 for items in the
    // top k, and must be the rounding of the exact difference, as in the f64 reference.
    var total = vec2<f32>(0.0);
    for (var j = 0u; j < k; j++) {
        let pj = in_a[(row * p.k_max + j) * p.n + i];
        e.p[j] = pj;
        total = pair_add(total, pj);
        if (p.solver == COTANGENT_RANKS) {
            e.g[j] = in_b[(row * p.k_max + j) * p.n + i];
        } else {
            e.g[j] = in_b[row * p.n + i];
        }
    }
    // 1 − total.x is exact whenever the sum is at least 1/2 (Sterbenz), where it matters.
    let left = (1.0 - total.x) - total.y;
    var defect = left;
    if (m > k) {
        e.p[k] = max(0.0, left);
        e.g[k] = 0.0;
        defect = left - e.p[k];
    }
    var big = 0u;
    for (var j = 1u; j < m; j++) {
        if (e.p[j] > e.p[big]) {
            big = j;
        }
    }
    var rest = 0.0;
    for (var j = 0u; j < m; j++) {
        if (j != big) {
            rest += e.p[j];
        }
    }
    // The row sums to 1 (see the header's N.B.).
    e.p[big] += defect;
    e.big = big;
    e.rest = rest;
    return e;
}

// h_j − Σ_l p_l h_l for j < m, as (h_j − h_b) + Σ_l p_l (h_b − h_l), b the largest anchor:
// the second part is a sum of small weights times differences, so it keeps its digits when
// the row is nearly hard (see the header).
fn deviations(e: PlanRow, h: array<f32, M_MAX>, m: u32) -> array<f32, M_MAX> {
    let hb = h[e.big];
    var c = 0.0;
    for (var l = 0u; l < m; l++) {
        c += e.p[l] * (hb - h[l]);
    }
    var dev: array<f32, M_MAX>;
    for (var j = 0u; j < m; j++) {
        dev[j] = (h[j] - hb) + c;
    }
    return dev;
}

// sorted_backward_pass: chunk `wid.x` of row `wid.y` writes its share of the right side
// Σ_i p_ij (g_ij − r_i) and of the Jacobian J, over the free anchors. Items go through
// workgroup memory a tile at a time: TILE threads form the plan rows and their terms, then
// column threads add the terms down their column and entry threads their Jacobian entries.
//   params:     [rows] RowParams (mode, n, anchors, ranked, k_max, solver = COTANGENT_*,
//               sign, factor)
//   valid_bits: [rows, ceil(n/32)]
//   in_a:       ranks [rows, k_max, n] (the forward output)
//   in_b:       grad_mask [rows, n] or grad_ranks [rows, k_max, n], by params.solver
//   work:       [rows, ...] (plan.wgsl): P_COLUMNS and P_JACOBIAN of the chunk's block
@compute @workgroup_size(WG)
fn sorted_backward_pass(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let row = wid.y;
    let p = params[row];
    if (!has_gradient(p)) {
        return;
    }
    let m = p.anchors;
    let free = m - 1u;
    let start = wid.x * CHUNK;
    let end = min(p.n, start + CHUNK);

    // Kahan: a column's terms have both signs and a chunk has up to CHUNK of them.
    var column = vec2<f32>(0.0);
    var share = jacobian_share(t);
    for (var first = start; first < end; first += TILE) {
        if (t < TILE) {
            let i = first + t;
            let ok = i < end && is_valid(row, p.n, i);
            tile_ok[t] = select(0u, 1u, ok);
            if (ok) {
                let e = plan_row(p, row, i);
                let dev = deviations(e, e.g, m);
                for (var j = 0u; j < m; j++) {
                    tile_p[t * M_MAX + j] = e.p[j];
                    tile_w[t * M_MAX + j] = e.p[j] * dev[j];
                }
                tile_big[t] = e.big;
                tile_rest[t] = e.rest;
            }
        }
        // The tile's plan rows and terms are written before column and entry threads read them.
        workgroupBarrier();
        let count = min(TILE, end - first);
        if (t < free) {
            for (var i = 0u; i < count; i++) {
                if (tile_ok[i] == 1u) {
                    column = kahan_add(column, tile_w[i * M_MAX + t]);
                }
            }
        }
        jacobian_tile(&share, t, free, count);
        // Everyone is done with this tile before the next one overwrites it.
        workgroupBarrier();
    }

    let at = partial_base(row, p.n, wid.x);
    if (t < free) {
        work[at + P_COLUMNS + t] = column.x - column.y;
    }
    jacobian_store(share, t, free, at);
}

// sorted_backward_solve: row `wid.y` adds up its chunks' sums and solves J β = (right side)
// with the damped Cholesky of plan.wgsl, refined (see `refined_solve`). A row whose J is zero
// or whose solve fails (a saturated row: no anchor exchanges mass with another) gets the flag
// 0: a zero gradient.
//   work: [rows, ...] (plan.wgsl): reads every chunk's block, writes S_BETA and S_SOLVED
@compute @workgroup_size(WG)
fn sorted_backward_solve(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let row = wid.y;
    let p = params[row];
    if (!has_gradient(p)) {
        return;
    }
    let free = p.anchors - 1u;
    let chunks = chunk_count(p.n);
    if (t < free) {
        var s = vec2<f32>(0.0);
        for (var c = 0u; c < chunks; c++) {
            s = kahan_add(s, work[partial_base(row, p.n, c) + P_COLUMNS + t]);
        }
        rhs[t] = s.x - s.y;
    }
    jacobian_gather(t, free, row, p.n);
    // The row's sums are complete before thread 0 solves with them.
    workgroupBarrier();
    if (t == 0u) {
        // The plan came rounded to f32, as the reference's does in its backward: the same
        // damping at the plan's noise level (see ROUNDED_PLAN_DAMPING), refined towards.
        for (var j = 0u; j < free; j++) {
            jac[packed(j, j)] += ROUNDED_PLAN_DAMPING;
        }
        let ok = refined_solve(free);
        let base = row_base(row, p.n);
        for (var j = 0u; j < M_MAX; j++) {
            work[base + S_BETA + j] = select(0.0, rhs[j], ok && j < free);
        }
        work[base + S_SOLVED] = select(0.0, 1.0, ok);
    }
}

// Thread 0: β = J⁻¹ rhs over the `free` anchors into `rhs`, from `jac` and `rhs`; false when
// the damped solve fails or β is not finite.
//
// f32 needs the damping λ = 1e-6 of the largest curvature (plan.wgsl) for the factorisation
// to succeed on nearly hard rows, where the reference damps by 1e-10; left alone, it moved
// gradients by up to 1.5e-6 per unit of factor on the tests' grid, five times what is left
// after refinement. Refining against the undamped J restores the
// well-determined directions to f32 accuracy. A direction J does not determine (a block of
// exactly tied items, see the header) grows by its share of rhs/λ per step: a bounded
// amount, which no gradient depends on.
fn refined_solve(free: u32) -> bool {
    let entries = free * (free + 1u) / 2u;
    for (var e = 0u; e < entries; e++) {
        jac_kept[e] = jac[e];
    }
    for (var j = 0u; j < free; j++) {
        rhs_kept[j] = rhs[j];
    }
    if (!damped_solve(free)) {
        return false;
    }
    var x: array<f32, M_MAX>;
    for (var j = 0u; j < free; j++) {
        x[j] = rhs[j];
    }
    for (var step = 0u; step < REFINEMENTS; step++) {
        for (var j = 0u; j < free; j++) {
            var v = rhs_kept[j];
            for (var l = 0u; l < free; l++) {
                v -= jac_kept[packed(max(j, l), min(j, l))] * x[l];
            }
            rhs[j] = v;
        }
        factor_solve(free);
        for (var j = 0u; j < free; j++) {
            x[j] += rhs[j];
        }
    }
    for (var j = 0u; j < free; j++) {
        rhs[j] = x[j];
        if (!(abs(x[j]) < HUGE)) {
            return false;
        }
    }
    return true;
}

// sorted_backward_finish: chunk `wid.x` of row `wid.y` writes the gradient of its scores,
// sign · (−factor) · Σ_j p_ij (α_i + β_j − g_ij) y_j; 0 for excluded entries, for rows
// without a gradient and for rows whose solve failed.
//   params, valid_bits, in_a, in_b: as for sorted_backward_pass
//   work:       [rows, ...] (plan.wgsl): S_BETA and S_SOLVED of the row
//   out_a:      grad_scores [rows, n]
@compute @workgroup_size(WG)
fn sorted_backward_finish(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let row = wid.y;
    let p = params[row];
    let start = wid.x * CHUNK;
    let end = min(p.n, start + CHUNK);
    let out = row * p.n;
    // A row without a gradient has no row state: its `work` holds whatever was there.
    let live = has_gradient(p);
    let base = row_base(row, p.n);
    if (live && t < M_MAX) {
        beta[t] = work[base + S_BETA + t];
    }
    if (t == 0u) {
        solved = select(0u, 1u, live && work[base + S_SOLVED] == 1.0);
    }
    // β and the flag are in place before anyone reads them (the load is a barrier).
    let go = workgroupUniformLoad(&solved) == 1u;

    let m = p.anchors;
    for (var i = start + t; i < end; i += WG) {
        var grad = 0.0;
        if (go && is_valid(row, p.n, i)) {
            let e = plan_row(p, row, i);
            // h = β − g, so that α_i + β_j − g_ij = h_j − Σ_l p_il h_l.
            var h: array<f32, M_MAX>;
            for (var j = 0u; j < m; j++) {
                h[j] = select(0.0, beta[j], j + 1u < m) - e.g[j];
            }
            let dev = deviations(e, h, m);
            // Σ_j p_j dev_j y_j with y_j = k − j, measured from y_b (Σ_j p_j dev_j = 0): the
            // nearly hard item's large weight then multiplies 0.
            var s = 0.0;
            for (var j = 0u; j < m; j++) {
                s += e.p[j] * dev[j] * (f32(e.big) - f32(j));
            }
            grad = -p.sign * p.factor * s;
        }
        out_a[out + i] = grad;
    }
}
