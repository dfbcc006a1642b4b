//! One JSON line through the tool's parser and solver, on the reference and the CPU backend.
//!
//! Every input must give one output line: a solution whose numbers are finite and of the
//! problem's lengths, or an error object of a documented kind. Problems whose solve would
//! take seconds (large sorted rows, huge iteration caps) are parsed but not solved.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use soft_topk::io::{jsonl, Runner};
use soft_topk::{BackendKind, Solver, Variant};

/// The error kinds the module docs of `soft_topk::io::jsonl` promise.
const KINDS: [&str; 9] = [
    "invalid_json",
    "invalid_option",
    "eps_not_positive",
    "empty_input",
    "k_out_of_range",
    "shape_mismatch",
    "non_finite_input",
    "too_large",
    "no_adapter",
];

/// Above this many plan entries per solver step the fuzzer would wait on arithmetic, not on
/// parsing: such problems are only parsed.
const MAX_WORK: usize = 1 << 14;

fn runners() -> &'static [Runner; 2] {
    static RUNNERS: OnceLock<[Runner; 2]> = OnceLock::new();
    RUNNERS.get_or_init(|| {
        [BackendKind::Reference, BackendKind::Cpu]
            .map(|kind| Runner::new(kind).expect("the reference and cpu always exist"))
    })
}

fn affordable(p: &jsonl::Problem) -> bool {
    let n = p.scores.len();
    let k = p.op.k_of(0);
    let iterations = match p.op.solver {
        Solver::Sinkhorn { max_iterations, .. } | Solver::Newton { max_iterations, .. } => {
            max_iterations as usize
        }
        _ => 1,
    };
    let per_step = match p.op.variant {
        Variant::TopK => n,
        Variant::Sorted => n * (k + 1) + k * k * k,
    };
    per_step.saturating_mul(iterations.min(1 << 20)) <= MAX_WORK * 64 && per_step <= MAX_WORK
}

fn check_numbers(v: &Value, len: usize, what: &str) {
    let a = v.as_array().unwrap_or_else(|| panic!("{what} is not an array: {v}"));
    assert_eq!(a.len(), len, "{what} has the wrong length");
    for x in a {
        let x = x.as_f64().unwrap_or_else(|| panic!("{what} holds a non-number {x}"));
        assert!(x.is_finite(), "{what} holds {x}");
    }
}

fuzz_target!(|data: &[u8]| {
    let parsed = jsonl::parse_line(data, 1);
    let problem = match parsed {
        Err(e) => {
            assert!(KINDS.contains(&e.kind), "undocumented kind {}", e.kind);
            return;
        }
        Ok(p) => p,
    };
    if !affordable(&problem) {
        return;
    }
    let n = problem.scores.len();
    for runner in runners() {
        let out = match jsonl::solve(&problem, runner, 1) {
            Ok(s) => jsonl::format_solution(&s),
            Err(e) => jsonl::format_error(&e),
        };
        let v: Value = serde_json::from_str(&out).expect("every output line is JSON");
        if let Some(err) = v.get("error") {
            let kind = err["kind"].as_str().expect("an error has a kind");
            assert!(KINDS.contains(&kind), "undocumented kind {kind}");
            continue;
        }
        check_numbers(&v["mask"], n, "mask");
        if problem.cotangent.is_some() {
            check_numbers(&v["grad"], n, "grad");
        }
        if problem.op.variant == Variant::Sorted {
            let ranks = v["ranks"].as_array().expect("sorted output has ranks");
            assert_eq!(ranks.len(), problem.op.k_of(0), "one rank per k");
            for r in ranks {
                check_numbers(r, n, "rank");
            }
        }
    }
});
