//! The property-based layer of the fuzzing (the cargo-fuzz targets live in `fuzz/`): random
//! and mutated inputs through the JSON-lines reader, the `.npy` reader and the batch
//! constructors, in the normal `cargo test`, bounded in time. Every file of the fuzz seed
//! corpus (`fuzz/corpus/<target>/`) is replayed through the same checks.
//!
//! What is asserted: no panic; a result or a typed error. For JSON lines every output line is
//! either a solution whose numbers are finite and of the problem's lengths, or an error object
//! of a documented kind. For `.npy`, an array's values fill its shape and never outnumber the
//! file's bytes, and a header claiming 10¹² elements is refused at once.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use serde_json::Value;
use soft_topk::cpu::CpuBackend;
use soft_topk::io::npy::{read_array_from, Values};
use soft_topk::io::{jsonl, Runner};
use soft_topk::reference::Reference;
use soft_topk::{
    Backend, BackendKind, Batch, Cotangent, Direction, Scale, SoftTopK, Solver, Variant,
};

/// The error kinds the module docs of `soft_topk::io::jsonl` promise (`no_adapter` is the
/// library's device kind).
const JSONL_KINDS: [&str; 9] = [
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
const MAX_WORK: usize = 1 << 20;

/// Above this 2/(s·ε) a gradient may pass f32::MAX for real on the f32 backends and is then
/// ±inf, the right f32 answer; below it every gradient must be finite.
const GRAD_MAY_OVERFLOW: f64 = 1e36;

/// f32 top-k against the f64 reference on arbitrary bit patterns: tests/extremes.rs holds
/// 1e-4 on chosen extremes; fuzzed rows mix them, so one more decade of room.
const MASK_TOLERANCE: f32 = 1e-3;

/// Proptest cases per property: enough to reach the parsers' corners, small enough that the
/// whole file runs in well under 20 s in debug mode.
const CASES: u32 = 256;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&folder)
        .unwrap_or_else(|e| panic!("cannot list the seed corpus {}: {e}", folder.display()))
        .map(|entry| {
            let path = entry.expect("a directory entry").path();
            let bytes = std::fs::read(&path).expect("a corpus file reads");
            (path, bytes)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in {}", folder.display());
    files
}

fn seeds(target: &'static str) -> &'static [Vec<u8>] {
    static JSONL: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    static NPY: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    static BATCH: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    let cell = match target {
        "jsonl_line" => &JSONL,
        "npy_reader" => &NPY,
        _ => &BATCH,
    };
    cell.get_or_init(|| corpus(target).into_iter().map(|(_, b)| b).collect())
}

fn runners() -> &'static [Runner; 2] {
    static RUNNERS: OnceLock<[Runner; 2]> = OnceLock::new();
    RUNNERS.get_or_init(|| {
        [BackendKind::Reference, BackendKind::Cpu]
            .map(|kind| Runner::new(kind).expect("the reference and cpu always exist"))
    })
}

// ---------------------------------------------------------------------------------------------
// JSON lines

fn affordable(p: &jsonl::Problem) -> bool {
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

fn check_numbers(v: &Value, len: usize, what: &str, may_overflow: bool, line: &str) {
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
fn check_jsonl(bytes: &[u8]) {
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

/// A JSON number token, hostile values included, or something else in its place.
fn number_token() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (-1000i32..1000).prop_map(|i| format!("{}", i as f64 / 100.0)),
        2 => any::<f32>().prop_filter_map("finite", |x| x.is_finite().then(|| format!("{x:e}"))),
        1 => any::<f64>().prop_filter_map("finite", |x| x.is_finite().then(|| format!("{x:e}"))),
        3 => prop::sample::select(vec![
            "1e308", "-1e308", "1e400", "-1e400", "-0.0", "0", "5e-324", "1e-310", "3.4e38",
            "-3.5e38", "1e-45", "\"nan\"", "\"inf\"", "\"-inf\"", "\"Infinity\"", "\"+inf\"",
            "\"NaN\"", "\"x\"", "null", "true", "[1]", "[]", "{}", "1e", "01", "+1", ".5",
            "0x10", "\"1\"",
        ])
        .prop_map(str::to_string),
    ]
}

fn array_of(item: impl Strategy<Value = String>, max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(item, 0..max).prop_map(|v| format!("[{}]", v.join(", ")))
}

/// A line of the right shape with hostile values: scores, k, ε and the optional fields.
fn json_line() -> impl Strategy<Value = String> {
    (1usize..10).prop_flat_map(json_line_of)
}

fn exactly(item: impl Strategy<Value = String>, n: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(item, n..=n).prop_map(|v| format!("[{}]", v.join(", ")))
}

fn word(words: Vec<&'static str>) -> impl Strategy<Value = String> + Clone {
    prop::sample::select(words).prop_map(str::to_string)
}

/// A line for a row of n, its arrays mostly of length n so that a fair share of lines gets
/// through to the solvers (see json_line_generator_reaches_the_solvers), with hostile values,
/// lengths and types mixed in.
fn json_line_of(n: usize) -> impl Strategy<Value = String> {
    let benign = || (-1000i32..1000).prop_map(|i| format!("{}", i as f64 / 100.0));
    let k = prop_oneof![
        8 => (0..=n).prop_map(|k| k.to_string()),
        1 => word(vec![
            "2.0", "-1", "-0", "1.5", "1e300", "1e20", "18446744073709551616", "\"2\"", "null",
            "[1]", "\"nan\"", "\"inf\"", "12",
        ]),
    ];
    let eps = prop_oneof![
        6 => word(vec!["0.1", "1", "0.01"]),
        2 => word(vec![
            "0", "-0.0", "-1", "\"nan\"", "\"inf\"", "1e-30", "1e-10", "1e10", "1e30", "1e308",
            "1e400", "5e-324", "\"0.1\"", "null",
        ]),
        1 => number_token(),
    ];
    let scores = prop_oneof![
        6 => exactly(benign(), n),
        3 => exactly(number_token(), n),
        1 => array_of(number_token(), 12),
        1 => array_of(array_of(number_token(), 3), 3),
        1 => number_token(),
    ];
    let valid = prop_oneof![
        3 => exactly(word(vec!["true", "false", "1", "0"]), n),
        1 => array_of(word(vec!["true", "false", "2", "null", "\"yes\"", "-1"]), 12),
    ];
    let cotangent = prop_oneof![
        4 => exactly(benign(), n),
        1 => exactly(exactly(benign(), n), 1),
        1 => array_of(array_of(benign(), 6), 6),
        1 => array_of(number_token(), 12),
    ];
    let extras = (
        prop::option::weighted(0.5, word(vec!["\"topk\"", "\"sorted\"", "\"sorted\"", "1"])),
        prop::option::weighted(0.3, word(vec!["\"none\"", "\"max\"", "\"max\"", "\"min\""])),
        prop::option::weighted(0.3, word(vec!["true", "false", "false", "0"])),
        prop::option::weighted(0.3, valid),
        prop::option::weighted(0.5, cotangent),
        prop::option::weighted(
            0.3,
            word(vec![
                "\"auto\"",
                "\"exact\"",
                "\"sinkhorn\"",
                "\"newton\"",
                "\"magic\"",
            ]),
        ),
        prop::option::weighted(0.1, number_token()),
        prop::option::weighted(
            0.1,
            word(vec!["10", "0", "200", "-1", "1.5", "1e20", "1e10"]),
        ),
    );
    let names = prop::sample::select(vec![("scores", "eps"), ("x", "epsilon"), ("x", "eps")]);
    (names, scores, k, eps, extras).prop_map(
        |((s_key, e_key), scores, k, eps, (var, scale, largest, valid, cot, solver, tol, it))| {
            let mut fields = vec![
                format!("\"{s_key}\": {scores}"),
                format!("\"k\": {k}"),
                format!("\"{e_key}\": {eps}"),
            ];
            let optional = [
                ("variant", var),
                ("scale", scale),
                ("largest", largest),
                ("valid", valid),
                ("cotangent", cot),
                ("solver", solver),
                ("tolerance", tol),
                ("max_iterations", it),
            ];
            for (key, value) in optional {
                if let Some(v) = value {
                    fields.push(format!("\"{key}\": {v}"));
                }
            }
            format!("{{{}}}", fields.join(", "))
        },
    )
}

/// A seed with byte flips, truncations and splices of other seeds.
#[derive(Debug, Clone)]
enum Mutation {
    Flip {
        at: usize,
        bits: u8,
    },
    Truncate {
        at: usize,
    },
    Splice {
        at: usize,
        from: usize,
        start: usize,
        len: usize,
    },
    Delete {
        at: usize,
        len: usize,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 1u8..=255).prop_map(|(at, bits)| Mutation::Flip { at, bits }),
        1 => any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        2 => (any::<usize>(), any::<usize>(), any::<usize>(), 0usize..32)
            .prop_map(|(at, from, start, len)| Mutation::Splice { at, from, start, len }),
        1 => (any::<usize>(), 0usize..16).prop_map(|(at, len)| Mutation::Delete { at, len }),
    ]
}

fn mutate(seeds: &[Vec<u8>], pick: usize, mutations: &[Mutation]) -> Vec<u8> {
    let mut bytes = seeds[pick % seeds.len()].clone();
    for m in mutations {
        let len = bytes.len();
        match *m {
            Mutation::Flip { at, bits } if len > 0 => bytes[at % len] ^= bits,
            Mutation::Truncate { at } => bytes.truncate(at % (len + 1)),
            Mutation::Splice {
                at,
                from,
                start,
                len: take,
            } => {
                let donor = &seeds[from % seeds.len()];
                let start = start % (donor.len() + 1);
                let end = (start + take).min(donor.len());
                let at = at % (len + 1);
                bytes.splice(at..at, donor[start..end].iter().copied());
            }
            Mutation::Delete { at, len: cut } if len > 0 => {
                let at = at % len;
                bytes.drain(at..(at + cut).min(len));
            }
            _ => {}
        }
    }
    bytes
}

// ---------------------------------------------------------------------------------------------
// .npy

fn check_npy(bytes: &[u8]) {
    let Ok(array) = read_array_from(Cursor::new(bytes), bytes.len() as u64, Path::new("t.npy"))
    else {
        return;
    };
    let count: usize = array.shape.iter().product();
    let len = match &array.values {
        Values::F32(v) => v.len(),
        Values::F64(v) => v.len(),
        Values::Bool(v) => v.len(),
    };
    assert_eq!(count, len, "shape {:?} and values disagree", array.shape);
    assert!(
        len <= bytes.len(),
        "{len} values from {} bytes",
        bytes.len()
    );
}

/// A v1 `.npy` file of `descr` and `shape` (text as numpy writes it) followed by `payload`.
fn npy_file(descr: &str, shape: &str, payload: &[u8]) -> Vec<u8> {
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(payload);
    out
}

fn vm_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// Batches from bytes (the layout of fuzz/fuzz_targets/batch.rs)

/// A cursor over bytes that reads zeros once they run out.
struct Bytes<'a>(&'a [u8]);

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
fn check_batch(data: &[u8]) {
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

// ---------------------------------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    #[test]
    fn jsonl_random_lines(line in json_line()) {
        check_jsonl(line.as_bytes());
    }

    #[test]
    fn jsonl_mutated_seeds(pick in any::<usize>(), m in prop::collection::vec(mutation(), 1..6)) {
        check_jsonl(&mutate(seeds("jsonl_line"), pick, &m));
    }

    #[test]
    fn jsonl_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        check_jsonl(&bytes);
    }

    #[test]
    fn npy_mutated_seeds(pick in any::<usize>(), m in prop::collection::vec(mutation(), 1..6)) {
        check_npy(&mutate(seeds("npy_reader"), pick, &m));
    }

    #[test]
    fn npy_random_shapes(
        descr in prop::sample::select(vec!["<f4", "<f8", "|b1", "|u1", ">f4", "<i8", "<c8"]),
        dims in prop::collection::vec(0u64..1 << 20, 0..4),
        big in any::<bool>(),
        payload in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let dims: Vec<String> = dims
            .iter()
            .map(|&d| if big { (d << 24).to_string() } else { (d % 9).to_string() })
            .collect();
        let shape = if dims.len() == 1 {
            format!("({},)", dims[0])
        } else {
            format!("({})", dims.join(", "))
        };
        check_npy(&npy_file(descr, &shape, &payload));
    }

    #[test]
    fn batch_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        check_batch(&bytes);
    }

    #[test]
    fn batch_mutated_seeds(pick in any::<usize>(), m in prop::collection::vec(mutation(), 1..6)) {
        check_batch(&mutate(seeds("batch"), pick, &m));
    }
}

/// Every seed of the fuzz corpus, replayed: the inputs that libFuzzer starts from (and any
/// crash it found, once added there) stay fixed.
#[test]
fn fuzz_corpus_replays() {
    type Check = fn(&[u8]);
    let checks: [(&str, Check); 3] = [
        ("jsonl_line", check_jsonl),
        ("npy_reader", check_npy),
        ("batch", check_batch),
    ];
    for (target, check) in checks {
        for (path, bytes) in corpus(target) {
            let outcome = std::panic::catch_unwind(|| check(&bytes));
            assert!(outcome.is_ok(), "seed {} fails its checks", path.display());
        }
    }
}

/// The public cases run as JSON lines give answers, not errors, except the ones they expect.
#[test]
fn public_case_seeds_solve() {
    for (path, bytes) in corpus("jsonl_line") {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let Some(id) = name.strip_prefix("case_") else {
            continue;
        };
        let out = jsonl::process_line(&bytes, 1, &runners()[0]);
        let v: Value = serde_json::from_str(&out).expect("JSON");
        assert_eq!(
            v.get("error").is_some(),
            id.starts_with("err_"),
            "case {id}: {out}"
        );
    }
}

/// A header claiming 10¹² elements over a few bytes of data is refused before any allocation:
/// quickly, and without the process growing.
#[test]
fn npy_huge_claims_fail_fast() {
    /// The refusal is a comparison of two numbers; a second allows any machine and debug mode.
    const FAST: Duration = Duration::from_secs(1);
    /// Growth of the process across the calls; 10¹² f32 would be 4 TB.
    const RSS_GROWTH_KIB: u64 = 64 * 1024;
    let before = vm_rss_kib();
    for (descr, shape) in [
        ("<f4", "(1000000, 1000000)"),
        ("<f8", "(1000000000000,)"),
        ("|b1", "(1000000, 1000000)"),
        ("<f4", "(18446744073709551615, 2)"),
        ("<f4", "(4294967296, 4294967296)"),
    ] {
        let file = npy_file(descr, shape, &[0u8; 8]);
        let start = Instant::now();
        let result = read_array_from(Cursor::new(&file), file.len() as u64, Path::new("big.npy"));
        assert!(
            result.is_err(),
            "{shape}: accepted a header claiming more than the file"
        );
        assert!(
            start.elapsed() < FAST,
            "{shape}: took {:?}",
            start.elapsed()
        );
    }
    if let (Some(before), Some(after)) = (before, vm_rss_kib()) {
        assert!(
            after.saturating_sub(before) < RSS_GROWTH_KIB,
            "RSS grew from {before} KiB to {after} KiB"
        );
    }
}

/// The line generator must reach the solvers, not only the parser's refusals: of a sample of
/// generated lines, a fair share must solve, and several error kinds must appear.
#[test]
fn json_line_generator_reaches_the_solvers() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    /// Below this share of solved lines the generator would exercise mostly the parser.
    const MIN_SOLVED_SHARE: f64 = 0.1;
    let mut runner = TestRunner::deterministic();
    let strategy = json_line();
    let (mut solved, mut kinds) = (0usize, std::collections::BTreeSet::new());
    let samples = 400;
    for _ in 0..samples {
        let line = strategy.new_tree(&mut runner).expect("a line").current();
        let out = jsonl::process_line(line.as_bytes(), 1, &runners()[1]);
        let v: Value = serde_json::from_str(&out).expect("JSON");
        match v.get("error") {
            Some(e) => {
                kinds.insert(e["kind"].as_str().unwrap_or("").to_string());
            }
            None => solved += 1,
        }
    }
    eprintln!("generated lines: {solved}/{samples} solved; error kinds {kinds:?}");
    assert!(
        solved as f64 >= MIN_SOLVED_SHARE * samples as f64,
        "only {solved} of {samples} generated lines solved"
    );
    assert!(kinds.len() >= 5, "only the error kinds {kinds:?} appeared");
}

/// Regression: npyz's header parser backtracks on unclosed brackets, its time doubling with
/// each: a 180-byte file with 37 of them (found by cargo fuzz, npy_reader) never finished, and
/// 20 took 8 s. Deeply nested headers are now refused before npyz sees them.
#[test]
fn regression_npy_nested_brackets_fail_fast() {
    /// The refusal is one pass over at most 1 MiB of header; a second allows debug mode.
    const FAST: Duration = Duration::from_secs(1);
    let patterns = ["[", "(", "{", "[(", "[)", "(]", "{'a': ["];
    for pattern in patterns {
        for repeats in [9usize, 20, 37, 200] {
            let filler = pattern.repeat(repeats);
            let header =
                format!("{{'descr': '<f4', {filler} 'fortran_order': False, 'shape': (3,), }}");
            let mut file = b"\x93NUMPY\x02\x00".to_vec();
            file.extend((header.len() as u32 + 1).to_le_bytes());
            file.extend(header.as_bytes());
            file.push(b'\n');
            file.extend([0u8; 12]);
            let start = Instant::now();
            let result = read_array_from(Cursor::new(&file), file.len() as u64, Path::new("x"));
            assert!(
                start.elapsed() < FAST,
                "{pattern:?} × {repeats}: took {:?} ({:?})",
                start.elapsed(),
                result.map(|a| a.shape)
            );
        }
    }
    let found = include_bytes!("../fuzz/corpus/npy_reader/regression_nested_brackets");
    let start = Instant::now();
    let result = read_array_from(Cursor::new(found), found.len() as u64, Path::new("x"));
    assert!(
        result.is_err() && start.elapsed() < FAST,
        "{:?}",
        start.elapsed()
    );
}
