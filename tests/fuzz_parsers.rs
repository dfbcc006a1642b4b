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

#[path = "../fuzz/checks.rs"]
mod checks;

use checks::{check_batch, check_jsonl, check_npy, runners};
use proptest::prelude::*;
use serde_json::Value;
use soft_topk::io::jsonl;
use soft_topk::io::npy::read_array_from;

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

// ---------------------------------------------------------------------------------------------
// JSON lines

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
        ("npy_reader", |bytes| drop(check_npy(bytes))),
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
