//! Small dense linear algebra in f64: the k×k solves of the sorted variant.

/// Relative damping added to the diagonal by [`solve_psd`]: above the Cholesky pivot guard,
/// far below any curvature that carries information.
pub const RELATIVE_DAMPING: f64 = 1e-10;

/// Solves `(a + λ·I) · x = b` for a symmetric positive semi-definite `a`, λ =
/// [`RELATIVE_DAMPING`] times the largest diagonal entry; `false` when `a` is zero or the
/// factorisation still fails.
///
/// The sorted variant's k×k matrix is nearly singular when a block of anchors barely exchanges
/// mass with the rest (items far apart from each other at small ε): a near-gauge freedom of
/// that block. The damping gives that direction a bounded, harmless component instead of
/// rejecting the whole matrix, so the well-determined directions keep their exact solution (to
/// ~1e-10 relative) — the Newton step stays defined and the gradient stays right.
pub fn solve_psd(a: &mut [f64], b: &mut [f64], m: usize) -> bool {
    let scale = (0..m).map(|j| a[j * m + j]).fold(0.0, f64::max);
    (0..m).for_each(|j| a[j * m + j] += RELATIVE_DAMPING * scale);
    cholesky_solve(a, b, m)
}

/// Solves `a · x = b` for a symmetric positive (semi-)definite `a` (row-major, `m × m`) by
/// Cholesky factorisation, in place of `b`.
///
/// Returns `false`, leaving `b` unspecified, when a pivot is not clearly positive: the matrix is
/// singular or so ill-conditioned that the solve would amplify rounding into noise. A pivot
/// counts as clearly positive when it exceeds `RELATIVE_PIVOT` times the largest diagonal entry.
pub fn cholesky_solve(a: &mut [f64], b: &mut [f64], m: usize) -> bool {
    // Pivots below this fraction of the largest diagonal entry carry fewer than ~4 correct
    // digits after the elimination's cancellation, in f64.
    const RELATIVE_PIVOT: f64 = 1e-12;

    let scale = (0..m).map(|j| a[j * m + j]).fold(0.0, f64::max);
    if !(scale > 0.0 && scale.is_finite()) {
        return false;
    }

    // a = L Lᵀ, L stored in the lower triangle of a.
    for j in 0..m {
        let mut d = a[j * m + j];
        for p in 0..j {
            d -= a[j * m + p] * a[j * m + p];
        }
        if !(d > RELATIVE_PIVOT * scale) {
            return false;
        }
        let d = d.sqrt();
        a[j * m + j] = d;
        for i in j + 1..m {
            let mut v = a[i * m + j];
            for p in 0..j {
                v -= a[i * m + p] * a[j * m + p];
            }
            a[i * m + j] = v / d;
        }
    }

    // Forward substitution L z = b, then back substitution Lᵀ x = z.
    for i in 0..m {
        let mut v = b[i];
        for p in 0..i {
            v -= a[i * m + p] * b[p];
        }
        b[i] = v / a[i * m + i];
    }
    for i in (0..m).rev() {
        let mut v = b[i];
        for p in i + 1..m {
            v -= a[p * m + i] * b[p];
        }
        b[i] = v / a[i * m + i];
    }
    b.iter().all(|v| v.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solves_a_small_spd_system() {
        let mut a = vec![4.0, 1.0, 1.0, 3.0];
        let mut b = vec![1.0, 2.0];
        assert!(cholesky_solve(&mut a, &mut b, 2));
        // [4 1; 1 3] x = [1 2] → x = [1/11, 7/11]
        assert!((b[0] - 1.0 / 11.0).abs() < 1e-15 && (b[1] - 7.0 / 11.0).abs() < 1e-15);
    }

    #[test]
    fn refuses_a_singular_matrix() {
        let mut a = vec![1.0, 1.0, 1.0, 1.0];
        let mut b = vec![1.0, 2.0];
        assert!(!cholesky_solve(&mut a, &mut b, 2));
    }
}
