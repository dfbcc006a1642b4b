//! Reading problems and writing answers for the `soft-topk` command-line tool.
//!
//! The parsing and formatting live here, in the library, so that the binary stays a thin shell
//! over them and fuzz targets can call the parsers directly:
//!
//! - [`jsonl`]: one problem per JSON line in, one result (or error) line out, in order;
//! - [`npy`]: `.npy` arrays in and out, with headers checked against the file size before any
//!   allocation;
//! - [`atomic`]: output files written beside their target and renamed into place when complete;
//! - [`Runner`]: the backend chosen once per run, shared by every line or batch.
//!
//! Nothing here panics on bad input: every problem with a line or a file comes back as a typed
//! error that names where it is.

pub mod atomic;
pub mod jsonl;
pub mod npy;
mod runner;

pub use runner::Runner;

use crate::error::{Error, Result};
use crate::op::{Scale, Solver, Variant, DEFAULT_NEWTON_ITERATIONS, DEFAULT_TOLERANCE};

/// Sinkhorn sweeps allowed when a caller picks `sinkhorn` without `max_iterations`: MATH.md §1
/// counts about 300 sweeps at ε = 1e-2 on uniform scores and tens of thousands at ε = 1e-3, so
/// this covers the common range and reports non-convergence beyond it.
pub const DEFAULT_SINKHORN_ITERATIONS: u32 = 10_000;

/// `"topk"` or `"sorted"`.
pub fn parse_variant(name: &str) -> Result<Variant> {
    match name {
        "topk" => Ok(Variant::TopK),
        "sorted" => Ok(Variant::Sorted),
        other => Err(Error::InvalidOption(format!(
            "unknown variant '{}' (expected topk or sorted)",
            printable(other)
        ))),
    }
}

/// `"none"` or `"max"`.
pub fn parse_scale(name: &str) -> Result<Scale> {
    match name {
        "none" => Ok(Scale::None),
        "max" => Ok(Scale::Max),
        other => Err(Error::InvalidOption(format!(
            "unknown scale '{}' (expected none or max)",
            printable(other)
        ))),
    }
}

/// A solver from its name (`auto`, `exact`, `sinkhorn`, `newton`) and the optional stopping
/// rule. `tolerance` and `max_iterations` belong to the iterative solvers only; giving them to
/// `auto` or `exact` is an error rather than silently ignored.
pub fn parse_solver(
    name: &str,
    tolerance: Option<f64>,
    max_iterations: Option<u64>,
) -> Result<Solver> {
    let tolerance_value = match tolerance {
        Some(t) if !(t.is_finite() && t >= 0.0) => {
            return Err(Error::InvalidOption(format!(
                "tolerance = {t} must be finite and >= 0"
            )))
        }
        Some(t) => Some(t),
        None => None,
    };
    let iterations = match max_iterations {
        Some(m) => Some(u32::try_from(m).map_err(|_| {
            Error::InvalidOption(format!(
                "max_iterations = {m} is larger than the largest allowed, {}",
                u32::MAX
            ))
        })?),
        None => None,
    };
    let stopping_rule_given = tolerance.is_some() || max_iterations.is_some();
    match name {
        "auto" | "exact" if stopping_rule_given => Err(Error::InvalidOption(format!(
            "tolerance and max_iterations apply to the sinkhorn and newton solvers, not '{name}'"
        ))),
        "auto" => Ok(Solver::Auto),
        "exact" => Ok(Solver::Exact),
        "sinkhorn" => Ok(Solver::Sinkhorn {
            tolerance: tolerance_value.unwrap_or(DEFAULT_TOLERANCE),
            max_iterations: iterations.unwrap_or(DEFAULT_SINKHORN_ITERATIONS),
        }),
        "newton" => Ok(Solver::Newton {
            tolerance: tolerance_value.unwrap_or(DEFAULT_TOLERANCE),
            max_iterations: iterations.unwrap_or(DEFAULT_NEWTON_ITERATIONS),
        }),
        other => Err(Error::InvalidOption(format!(
            "unknown solver '{}' (expected auto, exact, sinkhorn or newton)",
            printable(other)
        ))),
    }
}

/// A user-given name cut to a length that keeps an error message readable.
fn printable(name: &str) -> String {
    const SHOWN: usize = 40;
    let mut shown: String = name.chars().take(SHOWN).collect();
    if name.chars().nth(SHOWN).is_some() {
        shown.push('…');
    }
    shown.escape_debug().to_string()
}
