//! The `soft-topk` command-line tool, run as a user would: the real binary, real files.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{assert_close, load_cases, worst_error, Case};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use soft_topk::cpu::CpuBackend;
use soft_topk::reference::{backward_row, forward_row, RowCotangent};
use soft_topk::{
    Backend, BackendKind, Batch, Cotangent, Direction, GpuSoftTopK, Scale, SoftTopK, Variant,
};

/// The public cases' expected values are f64 and the reference agrees with them to 1e-9
/// (tests/public_cases.rs); through the tool it runs on the same f64 values, so the same bound.
const REFERENCE_TOLERANCE: f64 = 1e-9;

/// f32 backends see the scores rounded to f32 (relative error 2⁻²⁴) and compute in f32; the
/// error of A and of the gradient grows with the scores' spread in units of the temperature,
/// (range of x)/(s·ε) (cases/README.md). 64 ulps per unit of that spread leaves room for the
/// fast backend's reductions while still catching any real mistake (those are ≥ 1e-3).
const F32_ULPS_PER_SPREAD: f64 = 64.0;

/// The same backend on the same input must give the same numbers: the tool adds only parsing
/// and printing, and f32/f64 values print in a form that reads back exactly.
const SAME_BACKEND_TOLERANCE: f64 = 0.0;

fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_soft-topk")
}

/// Runs the tool with `args`, feeding `stdin` from a thread so that large inputs cannot
/// deadlock against a full output pipe.
fn run(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(binary())
        .args(args)
        .env("RUST_LOG", "error")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the soft-topk binary starts");
    let mut pipe = child.stdin.take().expect("stdin is piped");
    let input = stdin.to_vec();
    let feeder = std::thread::spawn(move || pipe.write_all(&input));
    let output = child
        .wait_with_output()
        .expect("the binary runs to the end");
    feeder
        .join()
        .expect("the feeder thread ends")
        .expect("stdin accepts the input");
    output
}

/// Runs `jsonl` on `lines`; returns one value per output line (`Null` for a blank line).
fn run_jsonl(backend: &str, lines: &[String]) -> Vec<Value> {
    let input = lines.iter().map(|l| format!("{l}\n")).collect::<String>();
    let out = run(&["--backend", backend, "jsonl"], input.as_bytes());
    assert!(
        out.status.success(),
        "soft-topk jsonl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("the output is UTF-8");
    text.lines()
        .map(|l| {
            if l.is_empty() {
                Value::Null
            } else {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("bad output line {l}: {e}"))
            }
        })
        .collect()
}

/// A JSON number or one of "inf", "-inf", "nan".
fn number(v: &Value) -> f64 {
    common::number(v)
}

fn numbers(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(number)
        .collect()
}

fn matrix(v: &Value) -> Vec<Vec<f64>> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(numbers)
        .collect()
}

fn error_kind(v: &Value) -> Option<&str> {
    v.get("error").and_then(|e| e["kind"].as_str())
}

/// A case written with the tool's own key names and the `[j][i]` ranks layout.
fn canonical_line(case: &Case) -> String {
    let cotangent = match case.variant.as_str() {
        "sorted" => json!(case.cotangent_ranks()),
        _ => case.v.clone(),
    };
    json!({
        "scores": case.x,
        "k": case.k,
        "epsilon": case.eps,
        "variant": case.variant,
        "scale": case.normalize,
        "cotangent": cotangent,
    })
    .to_string()
}

/// The cost scale s of a case (MATH.md §3), for the f32 tolerance.
fn cost_scale(case: &Case) -> f64 {
    if case.normalize != "max" {
        return 1.0;
    }
    let x = case.scores();
    let lo = x.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let top = if case.variant == "sorted" {
        case.k as f64
    } else {
        1.0
    };
    [lo, hi]
        .iter()
        .flat_map(|&v| [v * v, (v - top) * (v - top)])
        .fold(0.0, f64::max)
}

fn f32_tolerance(case: &Case) -> f64 {
    let x = case.scores();
    let lo = x.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let spread = (hi - lo) / (cost_scale(case) * case.eps);
    F32_ULPS_PER_SPREAD * f64::from(f32::EPSILON) * (1.0 + spread)
}

/// Checks the tool's answers against every public case.
fn check_cases(cases: &[Case], outputs: &[Value], tolerance: impl Fn(&Case) -> f64) {
    assert_eq!(outputs.len(), cases.len(), "one output line per case");
    for (case, out) in cases.iter().zip(outputs) {
        if let Some(kind) = &case.expect_error {
            assert_eq!(
                error_kind(out),
                Some(kind.as_str()),
                "case {}: {out}",
                case.id
            );
            continue;
        }
        assert!(error_kind(out).is_none(), "case {}: {out}", case.id);
        let tol = tolerance(case);
        if case.variant == "sorted" {
            let ranks = matrix(&out["ranks"]);
            let expected = case.expected_ranks();
            assert_eq!(ranks.len(), expected.len(), "case {}: rank count", case.id);
            for (j, (got, want)) in ranks.iter().zip(&expected).enumerate() {
                assert_close(&format!("{} rank {j}", case.id), got, want, tol);
            }
        } else {
            assert_close(
                &format!("{} mask", case.id),
                &numbers(&out["mask"]),
                &case.expected_mask(),
                tol,
            );
        }
        let expected_grad = &case.expected.as_ref().expect("expected values").grad_x;
        assert_close(
            &format!("{} grad", case.id),
            &numbers(&out["grad"]),
            expected_grad,
            tol,
        );
    }
}

#[test]
fn public_cases_on_the_reference() {
    let cases = load_cases();
    assert!(!cases.is_empty(), "no public cases");
    let lines: Vec<String> = cases.iter().map(canonical_line).collect();
    let outputs = run_jsonl("reference", &lines);
    check_cases(&cases, &outputs, |_| REFERENCE_TOLERANCE);
}

#[test]
fn public_case_file_as_it_is() {
    // The case file's own names (x, eps, normalize, v in the n × k layout) are aliases.
    let text = std::fs::read_to_string(common::cases_path()).expect("the case file reads");
    let lines: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(String::from)
        .collect();
    let outputs = run_jsonl("reference", &lines);
    check_cases(&load_cases(), &outputs, |_| REFERENCE_TOLERANCE);
}

#[test]
fn public_cases_on_the_cpu_backend() {
    let cases = load_cases();
    let lines: Vec<String> = cases.iter().map(canonical_line).collect();
    let outputs = run_jsonl("cpu", &lines);
    check_cases(&cases, &outputs, f32_tolerance);
}

#[test]
fn public_cases_on_the_gpu_backend() {
    // The tool reports a missing adapter as an error line per case; say so loudly instead,
    // and fail under CI, where lavapipe must be there.
    if let Err(why) = soft_topk::gpu::GpuBackend::shared() {
        assert!(
            std::env::var("CI").is_err(),
            "CI=true but no GPU adapter: {why}"
        );
        eprintln!("SKIPPED public_cases_on_the_gpu_backend: no GPU adapter ({why})");
        return;
    }
    let cases = load_cases();
    let lines: Vec<String> = cases.iter().map(canonical_line).collect();
    let outputs = run_jsonl("gpu", &lines);
    check_cases(&cases, &outputs, f32_tolerance);
}

/// A seeded problem for the library comparisons.
struct Problem {
    op: SoftTopK,
    x: Vec<f64>,
    valid: Option<Vec<bool>>,
    /// ∂L/∂mask (top-k) or ∂L/∂ranks as [j][i] (sorted).
    g_mask: Option<Vec<f64>>,
    g_ranks: Option<Vec<Vec<f64>>>,
}

impl Problem {
    fn line(&self) -> String {
        let mut v = json!({
            "scores": self.x,
            "k": self.op.k_of(0),
            "epsilon": self.op.epsilon,
            "largest": self.op.direction == Direction::Largest,
            "variant": if self.op.variant == Variant::Sorted { "sorted" } else { "topk" },
            "scale": if self.op.scale == Scale::Max { "max" } else { "none" },
        });
        if let Some(valid) = &self.valid {
            v["valid"] = json!(valid);
        }
        if let Some(g) = &self.g_mask {
            v["cotangent"] = json!(g);
        }
        if let Some(g) = &self.g_ranks {
            v["cotangent"] = json!(g);
        }
        v.to_string()
    }
}

fn random_problems(count: usize, seed: u64) -> Vec<Problem> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..count)
        .map(|i| {
            let n = rng.random_range(1..40usize);
            let k = rng.random_range(0..=n.min(5));
            let sorted = i % 3 == 2;
            let mut op = SoftTopK::new(k, [0.01, 0.1, 1.0][i % 3]).scale(if i % 4 == 1 {
                Scale::Max
            } else {
                Scale::None
            });
            if sorted {
                op = op.sorted();
            }
            if i % 5 == 3 {
                op = op.smallest();
            }
            let x: Vec<f64> = (0..n).map(|_| rng.random_range(-3.0..3.0)).collect();
            let valid = (i % 4 == 0).then(|| (0..n).map(|_| rng.random_bool(0.8)).collect());
            let (g_mask, g_ranks) = if sorted {
                let g = (0..k)
                    .map(|_| (0..n).map(|_| rng.random_range(-1.0..1.0)).collect())
                    .collect();
                (None, Some(g))
            } else {
                (
                    Some((0..n).map(|_| rng.random_range(-1.0..1.0)).collect()),
                    None,
                )
            };
            Problem {
                op,
                x,
                valid,
                g_mask,
                g_ranks,
            }
        })
        .collect()
}

fn assert_same(what: &str, got: &[f64], want: &[f64], tolerance: f64) {
    let (err, at) = worst_error(got, want);
    assert!(
        err <= tolerance,
        "{what}: the tool and the library differ by {err:.3e} at index {at}: {} vs {}",
        got[at],
        want[at]
    );
}

#[test]
fn the_tool_gives_the_library_numbers() {
    let problems = random_problems(60, 7);
    let lines: Vec<String> = problems.iter().map(Problem::line).collect();

    // The reference, straight on the f64 scores.
    let outputs = run_jsonl("reference", &lines);
    assert_eq!(outputs.len(), problems.len());
    for (i, (p, out)) in problems.iter().zip(&outputs).enumerate() {
        let valid = p.valid.as_deref();
        let fwd = forward_row(&p.op, 0, &p.x, valid);
        assert!(fwd.report.error.is_none(), "problem {i}: {:?}", fwd.report);
        assert_same(&format!("{i} mask"), &numbers(&out["mask"]), &fwd.mask, 0.0);
        if p.op.variant == Variant::Sorted {
            let ranks = matrix(&out["ranks"]);
            assert_eq!(ranks.len(), p.op.k_of(0), "problem {i}: one rank per k");
            for (j, rank) in fwd.ranks.iter().enumerate() {
                assert_same(&format!("{i} rank {j}"), &ranks[j], rank, 0.0);
            }
        }
        let grad = backward_row(
            &p.op,
            0,
            &p.x,
            valid,
            &fwd.mask,
            &fwd.ranks,
            RowCotangent {
                mask: p.g_mask.as_deref(),
                ranks: p.g_ranks.as_deref(),
            },
        );
        assert_same(&format!("{i} grad"), &numbers(&out["grad"]), &grad, 0.0);
        assert_eq!(
            out["iterations"],
            json!(fwd.report.iterations),
            "problem {i}"
        );
        assert_eq!(out["converged"], json!(fwd.report.converged), "problem {i}");
    }

    // The CPU backend, on the f32 scores.
    let outputs = run_jsonl("cpu", &lines);
    for (i, (p, out)) in problems.iter().zip(&outputs).enumerate() {
        let x: Vec<f32> = p.x.iter().map(|&v| v as f32).collect();
        let mut batch = Batch::single(&x).expect("a non-empty row");
        if let Some(valid) = &p.valid {
            batch = batch.with_valid(valid).expect("the mask fits");
        }
        let topk = GpuSoftTopK::with_backend(p.op.clone(), BackendKind::Cpu).expect("cpu");
        let fwd = topk.run(&batch).expect("forward");
        let widen = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
        let tol = SAME_BACKEND_TOLERANCE;
        assert_same(
            &format!("cpu {i} mask"),
            &numbers(&out["mask"]),
            &widen(&fwd.mask),
            tol,
        );
        let grad = match (&p.g_mask, &p.g_ranks) {
            (Some(g), _) => {
                let g: Vec<f32> = g.iter().map(|&v| v as f32).collect();
                topk.backward(&batch, &fwd, Cotangent::Mask(&g))
            }
            (_, Some(g)) => {
                let g: Vec<f32> = g.iter().flatten().map(|&v| v as f32).collect();
                let ranks = fwd.ranks.as_ref().expect("sorted output has ranks");
                let got: Vec<f64> = matrix(&out["ranks"]).concat();
                assert_same(&format!("cpu {i} ranks"), &got, &widen(ranks), tol);
                topk.backward(&batch, &fwd, Cotangent::Ranks(&g))
            }
            _ => unreachable!("every problem has a cotangent"),
        }
        .expect("backward");
        assert_same(
            &format!("cpu {i} grad"),
            &numbers(&out["grad"]),
            &widen(&grad),
            tol,
        );
    }
}

#[test]
fn bad_lines_get_error_lines_and_the_stream_goes_on() {
    let good = [
        r#"{"scores":[0.3,-1.2,2.5,0.9],"k":2,"epsilon":0.1,"cotangent":[1,0,0,-1]}"#,
        r#"{"scores":[5,2,3,4,1,6],"k":3,"eps":0.05,"largest":false,"scale":"max"}"#,
        r#"{"scores":[1,2,3],"k":2,"epsilon":0.5,"variant":"sorted"}"#,
    ];
    let lines: Vec<&str> = vec![
        good[0],
        r#"{"scores":[1,"nan",3],"k":1,"epsilon":0.1}"#,
        r#"{"scores":[1,2],"k":3,"epsilon":0.1}"#,
        good[1],
        r#"{"scores":[1,2],"k":1,"epsilon":0}"#,
        r#"{"scores":[],"k":0,"epsilon":0.1}"#,
        r#"{"scores":[1,2],"k":1,"epsilon":0.1"#,
        "",
        r#"{"scores":[1,2],"k":1,"epsilon":0.1,"valid":[true,false,true]}"#,
        r#"{"scores":[1,2],"k":1,"epsilon":0.1,"cotangent":[1,2,3]}"#,
        r#"{"scores":[1,2],"k":-1,"epsilon":0.1}"#,
        r#"{"scores":[1,2],"k":1.5,"epsilon":0.1}"#,
        r#"{"scores":[1,2],"k":1,"epsilon":0.1,"variant":"sorted","cotangent":[[1],[2],[3]]}"#,
        r#"{"scores":[1,2],"k":1,"epsilon":0.1,"solver":"magic"}"#,
        good[2],
    ];
    let expected = [
        None,
        Some("non_finite_input"),
        Some("k_out_of_range"),
        None,
        Some("eps_not_positive"),
        Some("empty_input"),
        Some("invalid_json"),
        None, // blank, echoed
        Some("shape_mismatch"),
        Some("shape_mismatch"),
        Some("k_out_of_range"),
        Some("k_out_of_range"),
        Some("shape_mismatch"),
        Some("invalid_option"),
        None,
    ];
    let input: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    let outputs = run_jsonl("reference", &input);
    assert_eq!(outputs.len(), lines.len(), "one output line per input line");
    for (i, (out, kind)) in outputs.iter().zip(expected).enumerate() {
        assert_eq!(error_kind(out), kind, "line {}: {out}", i + 1);
        if kind.is_some() {
            let message = out["error"]["message"].as_str().expect("a message");
            assert!(
                message.starts_with(&format!("line {}", i + 1)),
                "the message names the line: {message}"
            );
        }
    }
    assert_eq!(outputs[7], Value::Null, "a blank line is echoed blank");
    let nan_message = outputs[1]["error"]["message"].as_str().unwrap_or_default();
    assert!(nan_message.contains("column 1"), "{nan_message}");

    // The good lines after the bad ones give what they give alone.
    let alone = run_jsonl("reference", &good.map(String::from));
    for (at, want) in [(0, &alone[0]), (3, &alone[1]), (14, &alone[2])] {
        assert_eq!(&outputs[at], want, "line {}", at + 1);
        assert!(want.get("mask").is_some(), "line {}: {want}", at + 1);
    }
}

#[test]
fn hostile_lines_do_not_stop_the_stream() {
    let mut input: Vec<u8> = Vec::new();
    input.extend_from_slice(b"\xff\xfe not utf-8\n");
    input.extend_from_slice("[".repeat(50_000).as_bytes());
    input.push(b'\n');
    input.extend_from_slice(br#"{"scores":[1e400],"k":1,"epsilon":1}"#);
    input.push(b'\n');
    input.extend_from_slice(br#"{"scores":[1,2],"k":1,"epsilon":0.1}"#); // no final newline
    let out = run(&["--backend", "reference", "jsonl", "-"], &input);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("UTF-8 output");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    for line in &lines[..3] {
        assert!(line.contains("invalid_json"), "{line}");
    }
    assert!(lines[3].starts_with(r#"{"mask":"#), "{}", lines[3]);

    // A line over the cap is an error line, and the next line is still answered.
    let long = format!(
        "{{\"scores\":[{}],\"k\":1,\"epsilon\":0.1}}\n{{\"scores\":[1],\"k\":1,\"epsilon\":1}}\n",
        vec!["0.5"; 1000].join(",")
    );
    let out = run(
        &["--backend", "reference", "jsonl", "--max-line-bytes", "100"],
        long.as_bytes(),
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8 output");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].contains("too_large"), "{}", lines[0]);
    assert!(lines[1].starts_with(r#"{"mask":[1.0]"#), "{}", lines[1]);
}

// ---------------------------------------------------------------------------------------------
// .npy

/// A fresh directory for one test's files.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("the scratch directory is created");
    dir
}

fn write_npy<T: npyz::AutoSerialize + Copy>(path: &Path, shape: &[u64], data: &[T]) {
    use npyz::WriterBuilder;
    let file = std::io::BufWriter::new(std::fs::File::create(path).expect("creates"));
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(shape)
        .writer(file)
        .begin_nd()
        .expect("starts");
    w.extend(data.iter().copied()).expect("writes");
    w.finish().expect("finishes");
}

fn read_npy_f32(path: &Path) -> (Vec<u64>, Vec<f32>) {
    let file =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let npy = npyz::NpyFile::new(std::io::BufReader::new(file)).expect("a .npy header");
    let shape = npy.shape().to_vec();
    (shape, npy.into_vec().expect("f32 data"))
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("lists")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn run_ok(args: &[&str]) -> Output {
    let out = run(args, b"");
    assert!(
        out.status.success(),
        "soft-topk {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

#[test]
fn npy_round_trip_matches_the_library() {
    let dir = scratch("npy-round-trip");
    let (rows, n, k) = (5usize, 17usize, 4usize);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let x: Vec<f32> = (0..rows * n).map(|_| rng.random_range(-2.0..2.0)).collect();
    let g: Vec<f32> = (0..rows * k * n)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let valid: Vec<bool> = (0..rows * n).map(|i| i % 7 != 3).collect();
    let p = |name: &str| dir.join(name);
    write_npy(&p("x.npy"), &[rows as u64, n as u64], &x);
    write_npy(&p("g.npy"), &[rows as u64, k as u64, n as u64], &g);
    write_npy(&p("valid.npy"), &[rows as u64, n as u64], &valid);
    let s = |name: &str| p(name).to_string_lossy().into_owned();
    run_ok(&[
        "--backend",
        "cpu",
        "npy",
        "--scores",
        &s("x.npy"),
        "--k",
        "4",
        "--epsilon",
        "0.1",
        "--sorted",
        "--smallest",
        "--valid",
        &s("valid.npy"),
        "--cotangent",
        &s("g.npy"),
        "--out-mask",
        &s("mask.npy"),
        "--out-ranks",
        &s("ranks.npy"),
        "--out-grad",
        &s("grad.npy"),
        "--out-report",
        &s("report.jsonl"),
    ]);

    let op = SoftTopK::new(k, 0.1).sorted().smallest();
    let batch = Batch::new(&x, rows, n)
        .expect("batch")
        .with_valid(&valid)
        .expect("mask");
    let topk = GpuSoftTopK::with_backend(op, BackendKind::Cpu).expect("cpu");
    let fwd = topk.run(&batch).expect("forward");
    let grad = topk
        .backward(&batch, &fwd, Cotangent::Ranks(&g))
        .expect("backward");

    let (shape, mask) = read_npy_f32(&p("mask.npy"));
    assert_eq!(shape, [rows as u64, n as u64]);
    let tol = SAME_BACKEND_TOLERANCE;
    assert_same("npy mask", &widen(&mask), &widen(&fwd.mask), tol);
    let (shape, ranks) = read_npy_f32(&p("ranks.npy"));
    assert_eq!(shape, [rows as u64, k as u64, n as u64]);
    let want_ranks = fwd.ranks.as_deref().expect("sorted ranks");
    assert_same("npy ranks", &widen(&ranks), &widen(want_ranks), tol);
    let (shape, got_grad) = read_npy_f32(&p("grad.npy"));
    assert_eq!(shape, [rows as u64, n as u64]);
    assert_same("npy grad", &widen(&got_grad), &widen(&grad), tol);

    let report = std::fs::read_to_string(p("report.jsonl")).expect("the report is written");
    assert_eq!(report.lines().count(), rows, "one report line per row");
    let first: Value = serde_json::from_str(report.lines().next().unwrap_or("")).expect("JSON");
    assert_eq!(first["k"], json!(k));
    assert_eq!(first["converged"], json!(fwd.reports[0].converged));
}

#[test]
fn npy_f64_input_on_the_reference_and_one_row() {
    let dir = scratch("npy-f64");
    let x: Vec<f64> = vec![0.25, -1.5, 3.0, 0.125, 2.0, -0.75, 1.0];
    let path = dir.join("x.npy");
    write_npy(&path, &[x.len() as u64], &x);
    let mask_path = dir.join("mask.npy");
    run_ok(&[
        "--backend",
        "reference",
        "npy",
        "--scores",
        path.to_str().expect("UTF-8 path"),
        "--k",
        "3",
        "--eps",
        "0.05",
        "--scale",
        "max",
        "--out-mask",
        mask_path.to_str().expect("UTF-8 path"),
    ]);
    let (shape, mask) = read_npy_f32(&mask_path);
    assert_eq!(shape, [x.len() as u64], "a 1-D input gives a 1-D mask");
    let op = SoftTopK::new(3, 0.05).scale(Scale::Max);
    let want = forward_row(&op, 0, &x, None);
    let want32: Vec<f64> = want.mask.iter().map(|&a| f64::from(a as f32)).collect();
    // The reference ran on the f64 scores; only the output was rounded to f32.
    assert_same("f64 mask", &widen(&mask), &want32, 0.0);

    // The f32 backend reads f64 input too.
    let cpu_mask = dir.join("cpu-mask.npy");
    run_ok(&[
        "--backend",
        "cpu",
        "npy",
        "--scores",
        path.to_str().expect("UTF-8 path"),
        "--k",
        "3",
        "--eps",
        "0.05",
        "--scale",
        "max",
        "--out-mask",
        cpu_mask.to_str().expect("UTF-8 path"),
    ]);
    let (_, cpu) = read_npy_f32(&cpu_mask);
    assert_close("cpu f64 mask", &widen(&cpu), &want.mask, 1e-5);
}

/// An f64 score too large for f32 refuses its own row on an f32 backend, naming the score as
/// given; the other rows are solved as if alone, and in a row where that entry is excluded it
/// is ignored like any excluded entry.
#[test]
fn npy_score_beyond_f32_spoils_only_its_row() {
    let dir = scratch("npy-beyond-f32");
    let (rows, n) = (3usize, 5usize);
    let mut x: Vec<f64> = (0..rows * n).map(|i| (i % 7) as f64 * 0.25).collect();
    x[n + 2] = 1e39;
    x[2 * n + 4] = -1e39;
    let valid: Vec<bool> = (0..rows * n).map(|i| i != 2 * n + 4).collect();
    let g: Vec<f64> = (0..rows * n).map(|i| (i % 3) as f64 - 1.0).collect();
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    write_npy(&dir.join("x.npy"), &[rows as u64, n as u64], &x);
    write_npy(&dir.join("valid.npy"), &[rows as u64, n as u64], &valid);
    write_npy(&dir.join("g.npy"), &[rows as u64, n as u64], &g);
    let out = run(
        &[
            "--backend",
            "cpu",
            "npy",
            "--scores",
            &p("x.npy"),
            "--valid",
            &p("valid.npy"),
            "--cotangent",
            &p("g.npy"),
            "--k",
            "2",
            "--epsilon",
            "0.1",
            "--out-mask",
            &p("mask.npy"),
            "--out-grad",
            &p("grad.npy"),
            "--out-report",
            &p("report.jsonl"),
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(3), "some rows had input errors");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("row 1, column 2") && err.contains("beyond the f32"),
        "{err}"
    );

    let report = std::fs::read_to_string(dir.join("report.jsonl")).expect("reads the report");
    let lines: Vec<Value> = report
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    assert_eq!(lines[1]["error"]["kind"], json!("non_finite_input"));
    let message = lines[1]["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("beyond the f32 range"), "{message}");
    assert!(lines[0].get("error").is_none() && lines[2].get("error").is_none());

    let (_, mask) = read_npy_f32(&dir.join("mask.npy"));
    let (_, grad) = read_npy_f32(&dir.join("grad.npy"));
    let op = SoftTopK::new(2, 0.1);
    for row in [0, 2] {
        let span = row * n..(row + 1) * n;
        let scores: Vec<f32> = x[span.clone()].iter().map(|&v| v as f32).collect();
        let ok = valid[span.clone()].to_vec();
        let batch = Batch::single(&scores)
            .and_then(|b| b.with_valid(&ok))
            .expect("the row alone");
        let g32: Vec<f32> = g[span.clone()].iter().map(|&v| v as f32).collect();
        let fwd = CpuBackend::new().forward(&op, &batch).expect("forward");
        let want_grad = CpuBackend::new()
            .backward(&op, &batch, &fwd, Cotangent::Mask(&g32))
            .expect("backward");
        // The same backend on the same row: bit for bit.
        assert_same(
            &format!("row {row} mask"),
            &widen(&mask[span.clone()]),
            &widen(&fwd.mask),
            0.0,
        );
        assert_same(
            &format!("row {row} grad"),
            &widen(&grad[span]),
            &widen(&want_grad),
            0.0,
        );
    }
    let refused = n..2 * n;
    assert!(mask[refused.clone()]
        .iter()
        .chain(&grad[refused])
        .all(|&v| v == 0.0));
}

/// Runs an `npy` job that must fail; returns its stderr after checking that no output (or
/// temporary file) was left in `dir` beyond `inputs`.
fn npy_must_fail(dir: &Path, scores: &Path, inputs: &[&str]) -> String {
    let out = run(
        &[
            "--backend",
            "cpu",
            "npy",
            "--scores",
            scores.to_str().expect("UTF-8 path"),
            "--k",
            "1",
            "--epsilon",
            "0.1",
            "--out-mask",
            dir.join("mask.npy").to_str().expect("UTF-8 path"),
        ],
        b"",
    );
    assert!(!out.status.success(), "the job must fail");
    let mut expected: Vec<String> = inputs.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(files_in(dir), expected, "no output file is left behind");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn npy_bad_files_fail_cleanly() {
    let dir = scratch("npy-bad");

    // Truncated: a valid header for 4 × 4 f32, then half the data.
    let full = dir.join("full.npy");
    write_npy(&full, &[4, 4], &[0.5f32; 16]);
    let bytes = std::fs::read(&full).expect("reads");
    std::fs::remove_file(&full).expect("removes");
    let truncated = dir.join("truncated.npy");
    std::fs::write(&truncated, &bytes[..bytes.len() - 32]).expect("writes");
    let err = npy_must_fail(&dir, &truncated, &["truncated.npy"]);
    assert!(err.contains("truncated"), "{err}");

    // A small file whose header claims 10¹² elements.
    let huge = dir.join("huge.npy");
    let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000), }\n";
    let mut header = b"\x93NUMPY\x01\x00".to_vec();
    header.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    header.extend_from_slice(dict.as_bytes());
    header.extend_from_slice(&[0u8; 64]);
    std::fs::write(&huge, &header).expect("writes");
    let err = npy_must_fail(&dir, &huge, &["huge.npy", "truncated.npy"]);
    assert!(
        err.contains("huge.npy") && err.contains("truncated"),
        "{err}"
    );

    // Wrong dtype and wrong rank.
    let ints = dir.join("ints.npy");
    write_npy(&ints, &[3], &[1i64, 2, 3]);
    let err = npy_must_fail(&dir, &ints, &["huge.npy", "ints.npy", "truncated.npy"]);
    assert!(err.contains("dtype"), "{err}");
    let cube = dir.join("cube.npy");
    write_npy(&cube, &[2, 2, 2], &[0.0f32; 8]);
    let err = npy_must_fail(
        &dir,
        &cube,
        &["cube.npy", "huge.npy", "ints.npy", "truncated.npy"],
    );
    assert!(err.contains("1-D") && err.contains("2-D"), "{err}");
}

/// Two paths naming one file: an output over the scores, and the gradient over the mask
/// (once through another spelling of the same path). Each job fails before writing anything,
/// and the scores are left as they were.
#[test]
fn npy_outputs_need_paths_of_their_own() {
    let dir = scratch("npy-same-path");
    let scores = dir.join("x.npy");
    let cot = dir.join("cot.npy");
    write_npy(&scores, &[2, 3], &[0.1f32, 0.5, 0.9, 0.3, 0.2, 0.8]);
    write_npy(&cot, &[2, 3], &[1.0f32; 6]);
    let before = std::fs::read(&scores).expect("reads");
    let path = |p: &Path| p.to_str().expect("UTF-8 path").to_string();
    let mask = dir.join("mask.npy");
    let mask_again = dir.join(".").join("mask.npy");
    for (out_mask, out_grad, clash) in [
        (path(&scores), path(&dir.join("grad.npy")), "x.npy"),
        (path(&mask), path(&mask_again), "mask.npy"),
        (path(&mask), path(&cot), "cot.npy"),
    ] {
        let out = run(
            &[
                "--backend",
                "cpu",
                "npy",
                "--scores",
                &path(&scores),
                "--k",
                "1",
                "--epsilon",
                "0.1",
                "--cotangent",
                &path(&cot),
                "--out-mask",
                &out_mask,
                "--out-grad",
                &out_grad,
            ],
            b"",
        );
        assert!(
            !out.status.success(),
            "{out_mask} and {out_grad} must be refused"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("same file") && err.contains(clash), "{err}");
        assert_eq!(files_in(&dir), ["cot.npy", "x.npy"], "nothing written");
    }
    assert_eq!(
        std::fs::read(&scores).expect("reads"),
        before,
        "the scores are untouched"
    );
}

#[test]
fn unreadable_inputs_fail_with_a_message() {
    let dir = scratch("unreadable");
    let missing = dir.join("no-such-file.jsonl");
    let missing = missing.to_str().expect("UTF-8 path");
    let out = run(&["--backend", "reference", "jsonl", missing], b"");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-file.jsonl"), "{err}");

    let out = run(
        &[
            "--backend",
            "reference",
            "jsonl",
            dir.to_str().expect("UTF-8"),
        ],
        b"",
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("directory"));

    let mask = dir.join("mask.npy");
    let out = run(
        &[
            "npy",
            "--scores",
            missing,
            "--k",
            "1",
            "--epsilon",
            "1",
            "--out-mask",
            mask.to_str().expect("UTF-8"),
        ],
        b"",
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-file.jsonl"), "{err}");
    assert!(
        files_in(&dir).is_empty(),
        "nothing written: {:?}",
        files_in(&dir)
    );
}

#[test]
fn jsonl_output_file_is_written_whole() {
    let dir = scratch("jsonl-out");
    let out_path = dir.join("answers.jsonl");
    let input = "{\"scores\":[1,2,3],\"k\":1,\"epsilon\":0.1}\n\n{\"scores\":[]}\n";
    let out = run(
        &[
            "--backend",
            "reference",
            "jsonl",
            "-o",
            out_path.to_str().expect("UTF-8"),
        ],
        input.as_bytes(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    let text = std::fs::read_to_string(&out_path).expect("the output exists");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3);
    assert!(lines[0].starts_with("{\"mask\""));
    assert_eq!(lines[1], "");
    assert!(lines[2].contains("invalid_json"), "{}", lines[2]);
    assert_eq!(
        files_in(&dir),
        ["answers.jsonl"],
        "no temporary file is left"
    );
}
