//! The checks the fuzzing runs on each input, shared by the cargo-fuzz targets (fuzz_targets/)
//! and the property-based layer in the main crate's `cargo test` (tests/fuzz_parsers.rs), so
//! that both assert exactly the same things.
//!
//! What is asserted: no panic; a result or a typed error. For JSON lines every output line is
//! either a solution whose numbers are finite and of the problem's lengths, or an error object
//! of a documented kind. For `.npy`, an array's values fill its shape and never outnumber the
//! file's bytes. For batches decoded from bytes, the CPU backend agrees with the reference.
#![allow(dead_code)]

use std::io::Cursor;
use std::path::Path;
use std::sync::OnceLock;

use serde_json::Value;
use soft_topk::cpu::CpuBackend;
use soft_topk::io::npy::{read_array_from, Array, Values};
use soft_topk::io::{jsonl, Runner};
use soft_topk::reference::Reference;
use soft_topk::{
    Backend, BackendKind, Batch, Cotangent, Direction, Scale, SoftTopK, Solver, Variant,
};

/// The error kinds the module docs of `soft_topk::io::jsonl` promise (`no_adapter` is the
/// library's device kind).
pub const JSONL_KINDS: [&str; 9] = [
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

/// Problems costlier than this many plan entries per step (times the iteration cap) are
/// parsed but not solved: the property is about parsing, and a sorted row of 10⁴ would spend
/// the whole time budget on arithmetic.
pub const MAX_WORK: usize = 1 << 20;

/// Above this 2/(s·ε) a gradient may pass f32::MAX for real on the f32 backends and is then
/// ±inf, the right f32 answer; below it every gradient must be finite.
pub const GRAD_MAY_OVERFLOW: f64 = 1e36;

/// f32 top-k against the f64 reference on arbitrary bit patterns: tests/extremes.rs holds
/// 1e-4 on chosen extremes; fuzzed rows mix them, so one more decade of room.
pub const MASK_TOLERANCE: f32 = 1e-3;

pub fn runners() -> &'static [Runner; 2] {
    static RUNNERS: OnceLock<[Runner; 2]> = OnceLock::new();
    RUNNERS.get_or_init(|| {
        [BackendKind::Reference, BackendKind::Cpu]
            .map(|kind| Runner::new(kind).expect("the reference and cpu always exist"))
    })
}

pub fn affordable(p: &jsonl::Problem) -> bool {
    let n = p.scores.len();
    let k = p.op.k_of(0);
    let iterations = match p.op.solver {
        Solver::Sinkhorn { max_iterations, .. } | Solver::Newton { max_iterations, .. } => {
            max_iterations as usize
        }
        _ => 64,
    };
    let per_step = match p.op.variant {
        Variant::TopK => n,
        Variant::Sorted => n * (k + 1) + k * k * k,
    };
    per_step.saturating_mul(iterations) <= MAX_WORK
}

pub fn check_numbers(v: &Value, len: usize, what: &str, may_overflow: bool, line: &str) {
    let a = v
        .as_array()
        .unwrap_or_else(|| panic!("{what} is not an array in {line}"));
    assert_eq!(a.len(), len, "{what} has the wrong length in {line}");
    for (i, x) in a.iter().enumerate() {
        let ok = match x {
            Value::Number(_) => true,
            Value::String(s) => may_overflow && (s == "inf" || s == "-inf"),
            _ => false,
        };
        assert!(ok, "{what}[{i}] = {x} in {line}");
    }
}

/// One line through the parser and both solvers, with the output line checked.
pub fn check_jsonl(bytes: &[u8]) {
    let problem = match jsonl::parse_line(bytes, 1) {
        Err(e) => {
            assert!(
                JSONL_KINDS.contains(&e.kind),
                "undocumented kind {}",
                e.kind
            );
            assert!(e.message.starts_with("line 1"), "message {:?}", e.message);
            return;
        }
        Ok(p) => p,
    };
    assert!(
        problem.op.check(1).is_ok(),
        "a parsed problem has a valid op"
    );
    if !affordable(&problem) {
        return;
    }
    let n = problem.scores.len();
    let may_overflow =
        2.0 / problem.op.epsilon > GRAD_MAY_OVERFLOW || problem.op.scale == Scale::Max;
    for runner in runners() {
        let out = match jsonl::solve(&problem, runner, 1) {
            Ok(s) => jsonl::format_solution(&s),
            Err(e) => jsonl::format_error(&e),
        };
        let v: Value = serde_json::from_str(&out).expect("every output line is JSON");
        if let Some(err) = v.get("error") {
            let kind = err["kind"].as_str().expect("an error has a kind");
            assert!(
                JSONL_KINDS.contains(&kind),
                "undocumented kind {kind} in {out}"
            );
            continue;
        }
        check_numbers(&v["mask"], n, "mask", false, &out);
        for (i, m) in v["mask"].as_array().expect("mask").iter().enumerate() {
            let m = m.as_f64().expect("a number");
            assert!((0.0..=1.0).contains(&m), "mask[{i}] = {m} in {out}");
        }
        if problem.cotangent.is_some() {
            check_numbers(&v["grad"], n, "grad", may_overflow, &out);
        } else {
            assert!(
                v.get("grad").is_none(),
                "a gradient without a cotangent: {out}"
            );
        }
        if problem.op.variant == Variant::Sorted {
            let ranks = v["ranks"].as_array().expect("sorted output has ranks");
            assert_eq!(ranks.len(), problem.op.k_of(0), "one rank per k in {out}");
            for r in ranks {
                check_numbers(r, n, "rank", false, &out);
            }
        }
    }
}

/// One byte string read as a `.npy` file; returns the array when it parsed.
pub fn check_npy(bytes: &[u8]) -> Option<Array> {
    let array = read_array_from(Cursor::new(bytes), bytes.len() as u64, Path::new("t.npy")).ok()?;
    let count: usize = array.shape.iter().product();
    let len = match &array.values {
        Values::F32(v) => v.len(),
        Values::F64(v) => v.len(),
        Values::Bool(v) => v.len(),
    };
    assert_eq!(count, len, "shape {:?} and values disagree", array.shape);
    // The values came from the file: they cannot outnumber its bytes.
    assert!(
        len <= bytes.len(),
        "{len} values from {} bytes",
        bytes.len()
    );
    Some(array)
}

/// A cursor over bytes that reads zeros once they run out.
pub struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let m = N.min(self.0.len());
        out[..m].copy_from_slice(&self.0[..m]);
        self.0 = &self.0[m..];
        out
    }

    fn byte(&mut self) -> u8 {
        self.take::<1>()[0]
    }
}

/// Decodes a batch problem from bytes and checks the CPU against the reference: the same
/// call errors, masks in [0, 1] and within MASK_TOLERANCE, no NaN gradient.
pub fn check_batch(data: &[u8]) {
    let mut b = Bytes(data);
    let rows = usize::from(b.byte() % 6);
    let n = usize::from(b.byte() % 20);
    let flags = b.byte();
    let k = usize::from(b.byte() % 24);
    let epsilon = match flags & 3 {
        0 => f64::from_le_bytes(b.take::<8>()),
        1 => f64::from(f32::from_le_bytes(b.take::<4>())).abs(),
        _ => [1e-30, 1e-3, 0.1, 1.0, 1e30][usize::from(b.byte() % 5)],
    };
    let variant = if flags & 4 != 0 {
        Variant::Sorted
    } else {
        Variant::TopK
    };
    let direction = if flags & 8 != 0 {
        Direction::Smallest
    } else {
        Direction::Largest
    };
    let scale = if flags & 16 != 0 {
        Scale::Max
    } else {
        Scale::None
    };
    let fudge = |len: usize, bit: u8| if flags & bit != 0 { len + 1 } else { len };
    let ks: Vec<usize> = (0..fudge(rows, 32))
        .map(|_| usize::from(b.byte() % 24))
        .collect();
    let scores: Vec<f32> =
        b.0.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .take(256)
            .collect();
    let valid: Vec<bool> = scores.iter().map(|x| x.to_bits() & 0x10 == 0).collect();

    let mut op = SoftTopK::new(k, epsilon)
        .variant(variant)
        .direction(direction)
        .scale(scale);
    if flags & 64 != 0 {
        op = op.per_row_k(ks);
    }
    let Ok(mut batch) = Batch::new(&scores, rows, n) else {
        return;
    };
    if flags & 128 != 0 {
        let Ok(masked) = batch.with_valid(&valid) else {
            return;
        };
        batch = masked;
    }

    let (reference, cpu) = match (
        Reference.forward(&op, &batch),
        CpuBackend::new().forward(&op, &batch),
    ) {
        (Err(a), Err(b)) => {
            assert_eq!(a.kind(), b.kind(), "backends refuse the call differently");
            return;
        }
        (Ok(a), Ok(b)) => (a, b),
        (a, b) => panic!("backends disagree on the call: {a:?} vs {b:?}"),
    };
    for r in 0..rows {
        let (mask, want) = (cpu.mask_row(r), reference.mask_row(r));
        assert_eq!(
            cpu.reports[r].error.as_ref().map(|e| e.kind()),
            reference.reports[r].error.as_ref().map(|e| e.kind()),
            "row {r}: row errors differ"
        );
        assert!(
            mask.iter().all(|m| (0.0..=1.0).contains(m)),
            "row {r}: {mask:?}"
        );
        let worst = mask
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            worst <= MASK_TOLERANCE,
            "row {r} ({op:?}): cpu {mask:?} vs reference {want:?}, scores {:?}",
            batch.row(r)
        );
    }
    let g: Vec<f32> = scores
        .iter()
        .map(|x| {
            if x.is_finite() {
                x.clamp(-1.0, 1.0)
            } else {
                0.5
            }
        })
        .collect();
    let grad = CpuBackend::new()
        .backward(&op, &batch, &cpu, Cotangent::Mask(&g))
        .expect("a fitting backward call");
    assert!(grad.iter().all(|d| !d.is_nan()), "NaN gradient: {grad:?}");
}
