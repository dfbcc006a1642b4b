//! f32 inner loops that the compiler turns into SIMD code: a branch-free exponential, the
//! stable sigmoid, and lane-wise sums.
//!
//! Each loop is written over fixed-width lanes (`LANES` independent accumulators) so that
//! LLVM can vectorise it without reassociating floating-point sums on its own.

/// Width of the explicit accumulator lanes (two SSE registers, one AVX register).
pub const LANES: usize = 8;

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

/// Runs `$body` compiled for AVX2 when the processor has it, and for the baseline otherwise:
/// the loops above are the same code either way, only twice as wide.
macro_rules! widest_simd {
    ($body:ident($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2")]
            unsafe fn wide<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: the processor supports AVX2, checked just above.
                return unsafe { wide(|| $body($($arg),*)) };
            }
        }
        $body($($arg),*)
    }};
}

/// Σ σ((x_i − θ)/T) and Σ σ'((x_i − θ)/T), with θ = hi + lo split so that scores near the
/// threshold keep every bit (x − hi is exact there), and `inv_t` = 1/T.
pub fn sums_at(x: &[f32], hi: f32, lo: f32, inv_t: f32) -> (f64, f64) {
    widest_simd!(sums_body(x, hi, lo, inv_t))
}

/// mask_i = σ((x_i − θ)/T), with θ split as in [`sums_at`]; returns Σ mask in f64.
pub fn mask_at(x: &[f32], hi: f32, lo: f32, inv_t: f32, mask: &mut [f32]) -> f64 {
    widest_simd!(mask_body(x, hi, lo, inv_t, mask))
}

#[inline(always)]
fn sums_body(x: &[f32], hi: f32, lo: f32, inv_t: f32) -> (f64, f64) {
    let mut sigma = [0.0f32; LANES];
    let mut slope = [0.0f32; LANES];
    let (mut total_sigma, mut total_slope) = (0.0f64, 0.0f64);
    // f32 lanes are flushed into f64 every block, so rounding grows with the block, not n.
    for block in x.chunks(64 * LANES) {
        let mut chunks = block.chunks_exact(LANES);
        for chunk in &mut chunks {
            for lane in 0..LANES {
                let (s, d) = sigmoid_and_slope(((chunk[lane] - hi) - lo) * inv_t);
                sigma[lane] += s;
                slope[lane] += d;
            }
        }
        for &v in chunks.remainder() {
            let (s, d) = sigmoid_and_slope(((v - hi) - lo) * inv_t);
            sigma[0] += s;
            slope[0] += d;
        }
        total_sigma += sigma.iter().map(|&v| v as f64).sum::<f64>();
        total_slope += slope.iter().map(|&v| v as f64).sum::<f64>();
        sigma = [0.0; LANES];
        slope = [0.0; LANES];
    }
    (total_sigma, total_slope)
}

#[inline(always)]
fn mask_body(x: &[f32], hi: f32, lo: f32, inv_t: f32, mask: &mut [f32]) -> f64 {
    for (m, &v) in mask.iter_mut().zip(x) {
        *m = sigmoid_and_slope(((v - hi) - lo) * inv_t).0;
    }
    mask.chunks(64 * LANES)
        .map(|block| block.iter().map(|&v| v as f64).sum::<f64>())
        .sum()
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
