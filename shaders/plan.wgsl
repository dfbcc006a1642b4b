// Shared by the transport solve (transport.wgsl) and the sorted backward
// (sorted_backward.wgsl), prepended after common.wgsl: the sizes of the k×k systems, the
// layout of the scratch buffer `work`, a tile of plan rows in workgroup memory with the
// column Jacobian's sums over it, and the damped Cholesky solve.
//
// Why chunks. Both families are sequences of short dispatches recorded by the host
// (src/gpu/transport.rs), never one long loop in one dispatch: a long row is cut into chunks
// of CHUNK scores, one workgroup each, so that few long rows still fill a GPU; and llvmpipe
// (lavapipe) silently leaves any invocation's loops once 65,535 loop iterations are spent in
// all, which a whole solve in one dispatch exceeds from n ≈ 1000 on. A chunk kernel writes
// per-chunk partial sums to `work`; a row kernel (one workgroup per row) adds them up and does
// the row's small dense algebra.
//
// The Jacobian. For a plan whose rows each sum to 1 (p_ij, anchors j < m), the column
// Jacobian over the free anchors j, l < m − 1 is J_jl = Σ_i p_ij·(δ_jl − p_il): the matrix
// of Newton on the anchor potentials and the K of MATH.md §5 (in units of μ_i). Its diagonal
// is formed as Σ_i p_ij·Σ_{l≠j} p_il so that nearly hard rows keep their digits.

// The largest k: the k×k systems live in workgroup memory. Must equal `SORTED_K_MAX` in
// src/gpu/kernels.rs.
const K_MAX: u32 = 32u;
const M_MAX: u32 = 33u;
// Entries of the packed lower triangle of a K_MAX × K_MAX matrix, and per thread.
const ENTRIES: u32 = 528u;
const ENTRIES_PER_THREAD: u32 = 3u;
// Plan rows per tile; TILE_CELLS = TILE · M_MAX.
const TILE: u32 = 32u;
const TILE_CELLS: u32 = 1056u;
// Scores per workgroup of a chunk kernel. Must equal `CHUNK` in src/gpu/kernels.rs.
const CHUNK: u32 = 1024u;
// Relative damping added to the Jacobian's diagonal before the Cholesky solve (the
// reference's `solve_psd` adds 1e-10 in f64): a nearly decoupled block of anchors keeps a
// bounded solution instead of a breakdown. In f32 the entries themselves carry relative
// rounding of a few 1e-7, so damping at 1e-6 changes no well-determined direction.
const RELATIVE_DAMPING: f32 = 1e-6;

// The layout of `work` (common.wgsl) for these families: [rows, STATE_STRIDE +
// chunk_count(n) · PARTIAL_STRIDE] f32. Per row, STATE_STRIDE floats of row state (each
// family names its own fields), then one block of PARTIAL_STRIDE floats per chunk: P_COLUMNS
// (2·M_MAX floats, per anchor), P_JACOBIAN (ENTRIES floats, packed), P_EXTRA (two floats).
// Must equal the strides in src/gpu/kernels.rs.
const STATE_STRIDE: u32 = 160u;
const PARTIAL_STRIDE: u32 = 596u;
const P_COLUMNS: u32 = 0u;
const P_JACOBIAN: u32 = 66u;
const P_EXTRA: u32 = 594u;

fn chunk_count(n: u32) -> u32 {
    return max(1u, (n + CHUNK - 1u) / CHUNK);
}

// Where row `row`'s state starts in `work`.
fn row_base(row: u32, n: u32) -> u32 {
    return row * (STATE_STRIDE + chunk_count(n) * PARTIAL_STRIDE);
}

// Where chunk `chunk`'s partial block of row `row` starts in `work`.
fn partial_base(row: u32, n: u32, chunk: u32) -> u32 {
    return row_base(row, n) + STATE_STRIDE + chunk * PARTIAL_STRIDE;
}

// One tile of plan rows: log p and p for TILE scores × m anchors, whether each score takes
// part, its largest anchor and the mass on its other anchors.
var<workgroup> tile_logp: array<f32, TILE_CELLS>;
var<workgroup> tile_p: array<f32, TILE_CELLS>;
var<workgroup> tile_ok: array<u32, TILE>;
var<workgroup> tile_big: array<u32, TILE>;
var<workgroup> tile_rest: array<f32, TILE>;
// A row's packed Jacobian over the free anchors (then its Cholesky factor), and the right
// side of a solve (then its solution).
var<workgroup> jac: array<f32, ENTRIES>;
var<workgroup> rhs: array<f32, M_MAX>;

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

// Fills tile slot `slot` from a plan row given as log p (`lp`, m entries summing to 1 in
// exp), or marks it unused.
fn tile_put(slot: u32, ok: bool, lp: array<f32, M_MAX>, m: u32) {
    tile_ok[slot] = select(0u, 1u, ok);
    if (!ok) {
        return;
    }
    var big = 0u;
    for (var j = 1u; j < m; j++) {
        if (lp[j] > lp[big]) {
            big = j;
        }
    }
    var rest = 0.0;
    for (var j = 0u; j < m; j++) {
        let pj = exp(lp[j]);
        tile_logp[slot * M_MAX + j] = lp[j];
        tile_p[slot * M_MAX + j] = pj;
        if (j != big) {
            rest += pj;
        }
    }
    tile_big[slot] = big;
    tile_rest[slot] = rest;
}

// One thread's share of the packed Jacobian entries: entry t + q·WG for q < ENTRIES_PER_THREAD.
struct JacobianShare {
    acc: array<f32, ENTRIES_PER_THREAD>,
    at: array<vec2<u32>, ENTRIES_PER_THREAD>,
}

fn jacobian_share(t: u32) -> JacobianShare {
    var share: JacobianShare;
    for (var q = 0u; q < ENTRIES_PER_THREAD; q++) {
        share.acc[q] = 0.0;
        share.at[q] = unpacked(min(t + q * WG, ENTRIES - 1u));
    }
    return share;
}

// Adds the first `count` tile rows to thread t's Jacobian entries over `free` anchors.
fn jacobian_tile(share: ptr<function, JacobianShare>, t: u32, free: u32, count: u32) {
    let entries = free * (free + 1u) / 2u;
    for (var q = 0u; q < ENTRIES_PER_THREAD; q++) {
        if (t + q * WG < entries) {
            let j = (*share).at[q].x;
            let l = (*share).at[q].y;
            var s = 0.0;
            for (var i = 0u; i < count; i++) {
                if (tile_ok[i] == 1u) {
                    let pj = tile_p[i * M_MAX + j];
                    if (j == l) {
                        // Σ_{l≠j} p_il without forming 1 − p_ij when p_ij is near 1.
                        s += pj * select(1.0 - pj, tile_rest[i], tile_big[i] == j);
                    } else {
                        s -= pj * tile_p[i * M_MAX + l];
                    }
                }
            }
            (*share).acc[q] += s;
        }
    }
}

// Writes thread t's Jacobian entries to a partial block at `at` (P_JACOBIAN onward).
fn jacobian_store(share: JacobianShare, t: u32, free: u32, at: u32) {
    let entries = free * (free + 1u) / 2u;
    for (var q = 0u; q < ENTRIES_PER_THREAD; q++) {
        if (t + q * WG < entries) {
            work[at + P_JACOBIAN + t + q * WG] = share.acc[q];
        }
    }
}

// Adds row `row`'s partial Jacobians over its chunks into `jac`. The caller barriers before
// reading `jac`.
fn jacobian_gather(t: u32, free: u32, row: u32, n: u32) {
    let entries = free * (free + 1u) / 2u;
    let chunks = chunk_count(n);
    for (var q = 0u; q < ENTRIES_PER_THREAD; q++) {
        let e = t + q * WG;
        if (e < entries) {
            var s = 0.0;
            for (var c = 0u; c < chunks; c++) {
                s += work[partial_base(row, n, c) + P_JACOBIAN + e];
            }
            jac[e] = s;
        }
    }
}

// Thread 0: solves (J + λI) x = rhs over the `free` anchors in place (x into `rhs`), λ =
// RELATIVE_DAMPING × the largest diagonal entry, by Cholesky on the packed `jac` (which it
// overwrites with the factor). False when J is zero or not finite, the damped factorisation
// still fails, or the solution is not finite.
fn damped_solve(free: u32) -> bool {
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
    factor_solve(free);
    for (var j = 0u; j < free; j++) {
        if (!(abs(rhs[j]) < HUGE)) {
            return false;
        }
    }
    return true;
}

// Thread 0: solves L Lᵀ x = rhs in place (x into `rhs`) with the Cholesky factor L that
// `damped_solve` left in `jac`: L z = rhs, then Lᵀ x = z.
fn factor_solve(free: u32) {
    for (var i = 0u; i < free; i++) {
        var v = rhs[i];
        for (var q = 0u; q < i; q++) {
            v -= jac[packed(i, q)] * rhs[q];
        }
        rhs[i] = v / jac[packed(i, i)];
    }
    for (var ii = 0u; ii < free; ii++) {
        let i = free - 1u - ii;
        var v = rhs[i];
        for (var q = i + 1u; q < free; q++) {
            v -= jac[packed(q, i)] * rhs[q];
        }
        rhs[i] = v / jac[packed(i, i)];
    }
}
