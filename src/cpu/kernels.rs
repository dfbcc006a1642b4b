//! f32 inner loops that the compiler turns into SIMD code: a branch-free exponential, the
//! stable sigmoid, and lane-wise sums.
//!
//! Each loop is written over fixed-width lanes (`LANES` independent accumulators) so that
//! LLVM can vectorise it without reassociating floating-point sums on its own.

/// Width of the explicit accumulator lanes (one AVX-512 register, two AVX, four SSE).
pub const LANES: usize = 16;

/// e^x for x ≤ 0, to about 2 ulp, 0 below −87 (where f32 leaves the normal range).
///
/// Cody–Waite range reduction x = n·ln 2 + r with |r| ≤ ln 2 / 2, a degree-6 Taylor
/// polynomial for e^r (truncation error below 2e-7 relative on that interval), and 2^n built
/// from its exponent bits. No branches, no calls: it vectorises.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 · 2²³: adding it rounds to an integer held in the low mantissa bits.
    const ROUNDER: f32 = 12_582_912.0;

    let clamped = x.max(-87.0);
    let shifted = clamped * LOG2_E + ROUNDER;
    let n = shifted - ROUNDER;
    let n_bits = shifted.to_bits().wrapping_sub(ROUNDER.to_bits()) as i32;
    let r = (clamped - n * LN2_HI) - n * LN2_LO;
    let poly = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let two_to_n = f32::from_bits(((n_bits + 127) as u32) << 23);
    let value = poly * two_to_n;
    if x < -87.0 {
        0.0
    } else {
        value
    }
}

/// σ(z) and σ'(z) = σ(z)·σ(−z), stable for either sign and for z = ±∞.
#[inline(always)]
pub fn sigmoid_and_slope(z: f32) -> (f32, f32) {
    let e = exp_nonpositive(-z.abs());
    let inv = 1.0 / (1.0 + e);
    let sigma = if z >= 0.0 { inv } else { e * inv };
    (sigma, e * inv * inv)
}

/// Runs `$body` compiled for the widest of AVX-512F and AVX2 that the processor has, and for
/// the baseline otherwise: the loops above are the same code either way, only wider.
macro_rules! widest_simd {
    ($body:ident($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f")]
            unsafe fn widest<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            #[target_feature(enable = "avx2")]
            unsafe fn wide<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            if std::is_x86_feature_detected!("avx512f") {
                // SAFETY: the processor supports AVX-512F, checked just above.
                return unsafe { widest(|| $body($($arg),*)) };
            }
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: the processor supports AVX2, checked just above.
                return unsafe { wide(|| $body($($arg),*)) };
            }
        }
        $body($($arg),*)
    }};
}

/// The smallest and largest entry of `x` when it has entries and all are finite.
pub fn finite_range(x: &[f32]) -> Option<(f32, f32)> {
    widest_simd!(finite_range_body(x))
}

/// Σ σ((s·x_i − θ)/T) and Σ σ'((s·x_i − θ)/T) for a sign s = ±1, with θ = hi + lo
/// split so that scores near the threshold keep every bit (s·x − hi is exact there), and
/// `inv_t` = 1/T.
pub fn sums_at(x: &[f32], sign: f32, hi: f32, lo: f32, inv_t: f32) -> (f64, f64) {
    widest_simd!(sums_body(x, sign, hi, lo, inv_t))
}

/// mask_i = σ((s·x_i − θ)/T), with s and θ as in [`sums_at`]; returns Σ mask in f64.
pub fn mask_at(x: &[f32], sign: f32, hi: f32, lo: f32, inv_t: f32, mask: &mut [f32]) -> f64 {
    widest_simd!(mask_body(x, sign, hi, lo, inv_t, mask))
}

/// Σ a_i(1 − a_i) and Σ a_i(1 − a_i)·g_i over a mask a and its upstream gradient g.
pub fn slope_sums(mask: &[f32], g: &[f32]) -> (f64, f64) {
    widest_simd!(slope_sums_body(mask, g))
}

/// grad_i = factor · a_i(1 − a_i) · (g_i − mean), and 0 where a_i(1 − a_i) = 0.
pub fn scaled_slopes(mask: &[f32], g: &[f32], mean: f32, factor: f32, grad: &mut [f32]) {
    widest_simd!(scaled_slopes_body(mask, g, mean, factor, grad))
}

/// Entries per block of f32 lane sums; each block's lanes are added into f64, so rounding grows
/// with the block, not with n.
const BLOCK: usize = 64 * LANES;

/// Sums the pair `terms(a_i, b_i)` over two equally long slices in f32 lanes, flushed to f64
/// every block.
#[inline(always)]
fn lane_sums(a: &[f32], b: &[f32], terms: impl Fn(f32, f32) -> (f32, f32)) -> (f64, f64) {
    let (mut total_u, mut total_v) = (0.0f64, 0.0f64);
    for (a, b) in a.chunks(BLOCK).zip(b.chunks(BLOCK)) {
        let (mut u, mut v) = ([0.0f32; LANES], [0.0f32; LANES]);
        let (mut a_lanes, mut b_lanes) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
        for (a, b) in (&mut a_lanes).zip(&mut b_lanes) {
            for lane in 0..LANES {
                let (du, dv) = terms(a[lane], b[lane]);
                u[lane] += du;
                v[lane] += dv;
            }
        }
        for (&a, &b) in a_lanes.remainder().iter().zip(b_lanes.remainder()) {
            let (du, dv) = terms(a, b);
            u[0] += du;
            v[0] += dv;
        }
        total_u += u.iter().map(|&v| v as f64).sum::<f64>();
        total_v += v.iter().map(|&v| v as f64).sum::<f64>();
    }
    (total_u, total_v)
}

#[inline(always)]
fn finite_range_body(x: &[f32]) -> Option<(f32, f32)> {
    let mut low = [f32::INFINITY; LANES];
    let mut high = [f32::NEG_INFINITY; LANES];
    // v·0 is 0 for finite v and NaN for ±∞ or NaN, and NaN sticks in a sum.
    let mut poison = [0.0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for chunk in &mut chunks {
        for lane in 0..LANES {
            let v = chunk[lane];
            low[lane] = if v < low[lane] { v } else { low[lane] };
            high[lane] = if v > high[lane] { v } else { high[lane] };
            poison[lane] += v * 0.0;
        }
    }
    for &v in chunks.remainder() {
        low[0] = low[0].min(v);
        high[0] = high[0].max(v);
        poison[0] += v * 0.0;
    }
    if x.is_empty() || poison.iter().any(|&p| p != 0.0) {
        return None;
    }
    let x_min = low.into_iter().fold(f32::INFINITY, f32::min);
    let x_max = high.into_iter().fold(f32::NEG_INFINITY, f32::max);
    Some((x_min, x_max))
}

#[inline(always)]
fn sums_body(x: &[f32], sign: f32, hi: f32, lo: f32, inv_t: f32) -> (f64, f64) {
    lane_sums(x, x, |v, _| {
        sigmoid_and_slope(((sign * v - hi) - lo) * inv_t)
    })
}

#[inline(always)]
fn mask_body(x: &[f32], sign: f32, hi: f32, lo: f32, inv_t: f32, mask: &mut [f32]) -> f64 {
    for (m, &v) in mask.iter_mut().zip(x) {
        *m = sigmoid_and_slope(((sign * v - hi) - lo) * inv_t).0;
    }
    // A second pass, over a row that is still in cache, keeps both loops simple to vectorise.
    let mask = &mask[..x.len()];
    lane_sums(mask, mask, |m, _| (m, 0.0)).0
}

#[inline(always)]
fn slope_sums_body(mask: &[f32], g: &[f32]) -> (f64, f64) {
    lane_sums(mask, g, |a, g| {
        let slope = a * (1.0 - a);
        (slope, slope * g)
    })
}

#[inline(always)]
fn scaled_slopes_body(mask: &[f32], g: &[f32], mean: f32, factor: f32, grad: &mut [f32]) {
    for ((d, &a), &g) in grad.iter_mut().zip(mask).zip(g) {
        let slope = a * (1.0 - a);
        let value = factor * slope * (g - mean);
        *d = if slope > 0.0 { value } else { 0.0 };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The polynomial and reduction give about 2 ulp; 4 ulp leaves room for the rounding of
    /// the final product.
    const EXP_RELATIVE_TOLERANCE: f64 = 4.0 * f32::EPSILON as f64;

    #[test]
    fn exp_matches_std_over_its_range() {
        let mut worst = (0.0f64, 0.0f32);
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            let err = ((exp_nonpositive(x) as f64) - want).abs() / want;
            if err > worst.0 {
                worst = (err, x);
            }
        }
        assert!(
            worst.0 <= EXP_RELATIVE_TOLERANCE,
            "worst {:e} at x = {}",
            worst.0,
            worst.1
        );
        assert_eq!(exp_nonpositive(-1000.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }

    #[test]
    fn sigmoid_saturates_cleanly() {
        assert_eq!(sigmoid_and_slope(f32::INFINITY), (1.0, 0.0));
        assert_eq!(sigmoid_and_slope(f32::NEG_INFINITY), (0.0, 0.0));
        let (s, d) = sigmoid_and_slope(0.0);
        assert_eq!((s, d), (0.5, 0.25));
    }
}
