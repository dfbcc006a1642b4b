//! JSON lines: one problem per line in, one result line out, in order.
//!
//! # Input
//!
//! Each non-blank line is a JSON object:
//!
//! - `scores` (alias `x`): the row, an array of numbers; the strings `"inf"`, `"-inf"` and
//!   `"nan"` stand for the non-finite values;
//! - `k`: how many to select, an integer from 0 to n (`2.0` counts as 2);
//! - `epsilon` (alias `eps`): ε > 0;
//! - `largest`: `true` (default) for the largest k, `false` for the smallest;
//! - `variant`: `"topk"` (default) or `"sorted"`;
//! - `scale` (alias `normalize`): `"none"` (default) or `"max"`;
//! - `valid`: optional, n booleans (or 0/1); `false` leaves the entry out;
//! - `cotangent` (alias `v`): optional upstream gradient, see below;
//! - `solver`: `"auto"` (default), `"exact"`, `"sinkhorn"` or `"newton"`, with
//!   `tolerance` and `max_iterations` for the last two.
//!
//! Other keys are ignored, so the shared case files can be fed as they are.
//!
//! The cotangent is ∂L/∂mask, n numbers, for top-k. For the sorted variant it is ∂L/∂ranks,
//! either k arrays of n (entry `[j][i]` = `∂L/∂ranks[j][i]`, the layout of the output) or n
//! arrays of k (entry `[i][j]`, the layout of the shared cases' `v`); the shape decides, and
//! when n = k (both shapes fit) it is read as `[j][i]`. A flat array of n numbers is ∂L/∂mask
//! for the sorted variant too. Cotangent entries must be finite.
//!
//! # Output
//!
//! One line per input line. A solved line is
//! `{"mask": [n], "ranks": [k][n] (sorted only), "grad": [n] (with a cotangent), "converged",
//! "iterations", "marginal_error"}`; a bad line is `{"error": {"kind": …, "message": …}}`, and
//! the lines after it are still solved. Kinds: `invalid_json`, `invalid_option`,
//! `eps_not_positive`, `empty_input`, `k_out_of_range`, `shape_mismatch`, `non_finite_input`,
//! `too_large` (a line over the length cap), and the library's device kinds. Messages start
//! with `line L` (1-based); value errors add `column C`, the 0-based index into `scores`; JSON
//! syntax errors add `byte B`, the 1-based position in the line.
//!
//! A blank line (nothing but whitespace) is echoed as a blank line, so output line L always
//! answers input line L. Output numbers are JSON numbers (f32 results are widened to f64,
//! which prints them exactly and round-trips); a non-finite value would be written as the
//! string `"inf"`, `"-inf"` or `"nan"`, like the input.

use std::io::{self, BufRead, Write};

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};

use super::{parse_scale, parse_solver, parse_variant, Runner};
use crate::error::Error;
use crate::op::{Direction, SoftTopK, Variant};
use crate::reference::{backward_row, forward_row, RowCotangent};
use crate::{Batch, Cotangent};

/// The longest line read, in bytes (newline excluded). A longer line becomes a `too_large`
/// error line and is skipped without being held in memory.
pub const DEFAULT_MAX_LINE_BYTES: usize = 256 << 20;

/// The longest error message written, so that a hostile value quoted in a message cannot make
/// an output line as long as the input.
const MAX_MESSAGE_CHARS: usize = 400;

/// Why one line has no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// A stable name: `invalid_json`, `k_out_of_range`, … (see the module docs).
    pub kind: &'static str,
    /// A sentence that starts with the line number.
    pub message: String,
}

impl LineError {
    /// An error of `line` (1-based) with the details after the line number.
    pub fn new(kind: &'static str, line: usize, detail: impl std::fmt::Display) -> Self {
        LineError::capped(kind, format!("line {line}: {detail}"))
    }

    /// An error at a place within `line`: `column C` (an index into the scores) or `byte B`.
    pub fn at(
        kind: &'static str,
        line: usize,
        place: impl std::fmt::Display,
        detail: impl std::fmt::Display,
    ) -> Self {
        LineError::capped(kind, format!("line {line}, {place}: {detail}"))
    }

    fn capped(kind: &'static str, mut message: String) -> Self {
        if message.chars().count() > MAX_MESSAGE_CHARS {
            message = message.chars().take(MAX_MESSAGE_CHARS).collect();
            message.push('…');
        }
        LineError { kind, message }
    }

    /// A library error of the row on `line`, its message rebuilt around the line number (the
    /// library numbers rows of a batch, which here is always a single row).
    pub fn from_library(line: usize, error: &Error) -> Self {
        match error {
            Error::NonFiniteInput {
                col, value, why, ..
            } => LineError::at(
                error.kind(),
                line,
                format_args!("column {col}"),
                format_args!("score {value} is not allowed ({why})"),
            ),
            Error::KOutOfRange { k, n, .. } => LineError::new(
                error.kind(),
                line,
                format_args!("k = {k} is out of range for a row of n = {n} entries"),
            ),
            other => LineError::new(other.kind(), line, other),
        }
    }
}

/// The upstream gradient of one line.
#[derive(Debug, Clone, PartialEq)]
pub enum LineCotangent {
    /// ∂L/∂mask, n values.
    Mask(Vec<f64>),
    /// ∂L/∂ranks as k rows of n: `[j][i]`.
    Ranks(Vec<Vec<f64>>),
}

/// One parsed, checked line: everything but the score values themselves, which the solver
/// checks (NaN, the wrong infinity) so that its rules apply in one place.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub op: SoftTopK,
    pub scores: Vec<f64>,
    pub valid: Option<Vec<bool>>,
    pub cotangent: Option<LineCotangent>,
}

/// One line's answer, in f64 whatever the backend's precision.
#[derive(Debug, Clone, PartialEq)]
pub struct Solution {
    pub mask: Vec<f64>,
    /// Sorted variant: k rows of n (ranks beyond the number of valid entries are 0).
    pub ranks: Option<Vec<Vec<f64>>>,
    /// ∂L/∂scores, when the line had a cotangent.
    pub grad: Option<Vec<f64>>,
    pub converged: bool,
    pub iterations: u32,
    pub marginal_error: f64,
}

// ---------------------------------------------------------------------------------------------
// Parsing

/// A number, or one of the strings that stand for non-finite values.
struct Num(f64);

/// Reads `"inf"`, `"-inf"`, `"nan"` (any case, also `"+inf"`, `"infinity"`, `"-infinity"`).
fn special_number(s: &str) -> Option<f64> {
    match s.to_ascii_lowercase().as_str() {
        "inf" | "+inf" | "infinity" | "+infinity" => Some(f64::INFINITY),
        "-inf" | "-infinity" => Some(f64::NEG_INFINITY),
        "nan" | "+nan" | "-nan" => Some(f64::NAN),
        _ => None,
    }
}

const NUMBER_EXPECTED: &str = "a number or one of the strings \"inf\", \"-inf\", \"nan\"";

struct NumVisitor;

impl<'de> Visitor<'de> for NumVisitor {
    type Value = Num;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(NUMBER_EXPECTED)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Num, E> {
        Ok(Num(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Num, E> {
        Ok(Num(v as f64))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Num, E> {
        Ok(Num(v as f64))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Num, E> {
        special_number(v).map(Num).ok_or_else(|| {
            let shown: String = v.chars().take(20).collect();
            E::custom(format_args!(
                "invalid number string {shown:?}: expected {NUMBER_EXPECTED}"
            ))
        })
    }
}

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Num, D::Error> {
        d.deserialize_any(NumVisitor)
    }
}

/// An array of [`Num`] read straight into f64 (8 bytes a value, whatever the line holds).
struct Numbers(Vec<f64>);

struct NumbersVisitor;

impl<'de> Visitor<'de> for NumbersVisitor {
    type Value = Numbers;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "an array of numbers ({NUMBER_EXPECTED})")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Numbers, A::Error> {
        let mut values = Vec::new();
        while let Some(Num(x)) = seq.next_element()? {
            values.push(x);
        }
        Ok(Numbers(values))
    }
}

impl<'de> Deserialize<'de> for Numbers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Numbers, D::Error> {
        d.deserialize_seq(NumbersVisitor)
    }
}

/// A validity flag: `true`/`false`, or the numbers 1/0.
struct Flag(bool);

struct FlagVisitor;

impl<'de> Visitor<'de> for FlagVisitor {
    type Value = Flag;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("true, false, 1 or 0")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Flag, E> {
        Ok(Flag(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Flag, E> {
        match v {
            0 => Ok(Flag(false)),
            1 => Ok(Flag(true)),
            _ => Err(E::invalid_value(de::Unexpected::Unsigned(v), &self)),
        }
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Flag, E> {
        match u64::try_from(v) {
            Ok(u) => self.visit_u64(u),
            Err(_) => Err(E::invalid_value(de::Unexpected::Signed(v), &self)),
        }
    }
}

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Flag, D::Error> {
        d.deserialize_any(FlagVisitor)
    }
}

/// One entry of a cotangent array: a number (of a flat ∂L/∂mask) or an array (a row of
/// ∂L/∂ranks). Anything nested deeper is refused at the first extra level.
enum Entry {
    Number(f64),
    Row(Vec<f64>),
}

struct EntryVisitor;

impl<'de> Visitor<'de> for EntryVisitor {
    type Value = Entry;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{NUMBER_EXPECTED}, or an array of them")
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Entry, E> {
        Ok(Entry::Number(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Entry, E> {
        Ok(Entry::Number(v as f64))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Entry, E> {
        Ok(Entry::Number(v as f64))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Entry, E> {
        NumVisitor.visit_str(v).map(|Num(x)| Entry::Number(x))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Entry, A::Error> {
        NumbersVisitor
            .visit_seq(seq)
            .map(|Numbers(v)| Entry::Row(v))
    }
}

impl<'de> Deserialize<'de> for Entry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Entry, D::Error> {
        d.deserialize_any(EntryVisitor)
    }
}

/// A line as written, before any check beyond the JSON types.
#[derive(Deserialize)]
#[serde(expecting = "a JSON object with at least scores, k and epsilon")]
struct RawLine {
    #[serde(alias = "x")]
    scores: Option<Numbers>,
    k: Option<Num>,
    #[serde(alias = "eps")]
    epsilon: Option<Num>,
    largest: Option<bool>,
    variant: Option<String>,
    #[serde(alias = "normalize")]
    scale: Option<String>,
    valid: Option<Vec<Flag>>,
    #[serde(alias = "v")]
    cotangent: Option<Vec<Entry>>,
    solver: Option<String>,
    tolerance: Option<Num>,
    max_iterations: Option<Num>,
}

/// Parses and checks one line (without its newline); `line` is its 1-based number, for the
/// messages. Never panics, whatever the bytes: invalid UTF-8, deep nesting (serde_json stops
/// at 128 levels), numbers beyond f64, wrong types and wrong shapes are all [`LineError`]s.
pub fn parse_line(bytes: &[u8], line: usize) -> Result<Problem, LineError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        LineError::at(
            "invalid_json",
            line,
            format_args!("byte {}", e.valid_up_to() + 1),
            "the line is not valid UTF-8",
        )
    })?;
    let raw: RawLine = serde_json::from_str(text).map_err(|e| json_error(line, &e))?;
    let missing =
        |key: &str| LineError::new("invalid_json", line, format_args!("missing field `{key}`"));
    let scores = raw.scores.ok_or_else(|| missing("scores"))?.0;
    let k = raw.k.ok_or_else(|| missing("k"))?.0;
    let epsilon = raw.epsilon.ok_or_else(|| missing("epsilon"))?.0;

    // The options first: a misspelt name says more than any error it would cause later.
    let option = |e: Error| LineError::from_library(line, &e);
    let variant = parse_variant(raw.variant.as_deref().unwrap_or("topk")).map_err(option)?;
    let scale = parse_scale(raw.scale.as_deref().unwrap_or("none")).map_err(option)?;
    let max_iterations = match raw.max_iterations {
        Some(Num(m)) if m >= 0.0 && m.fract() == 0.0 && m <= u64::MAX as f64 => Some(m as u64),
        Some(Num(m)) => {
            return Err(LineError::new(
                "invalid_option",
                line,
                format_args!("max_iterations = {m} must be a non-negative integer"),
            ))
        }
        None => None,
    };
    let solver = parse_solver(
        raw.solver.as_deref().unwrap_or("auto"),
        raw.tolerance.map(|t| t.0),
        max_iterations,
    )
    .map_err(option)?;
    let direction = match raw.largest {
        Some(false) => Direction::Smallest,
        _ => Direction::Largest,
    };

    if !(epsilon.is_finite() && epsilon > 0.0) {
        return Err(option(Error::EpsNotPositive { epsilon }));
    }
    let n = scores.len();
    if n == 0 {
        return Err(option(Error::EmptyInput));
    }
    let k = checked_k(k, n, line)?;
    let op = SoftTopK::new(k, epsilon)
        .variant(variant)
        .scale(scale)
        .solver(solver)
        .direction(direction);
    op.check(1).map_err(option)?;

    let valid = match raw.valid {
        Some(flags) if flags.len() != n => {
            return Err(LineError::new(
                "shape_mismatch",
                line,
                format_args!("valid has {} entries, scores has {n}", flags.len()),
            ))
        }
        Some(flags) => Some(flags.into_iter().map(|f| f.0).collect()),
        None => None,
    };
    let cotangent = match raw.cotangent {
        Some(entries) => Some(shape_cotangent(entries, variant, n, k, line)?),
        None => None,
    };
    Ok(Problem {
        op,
        scores,
        valid,
        cotangent,
    })
}

/// A serde_json error as a line error, with the byte position in the line.
fn json_error(line: usize, e: &serde_json::Error) -> LineError {
    // serde_json appends " at line L column C" (always line 1 here); say it our way.
    let text = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let what = text.strip_suffix(&suffix).unwrap_or(&text);
    if e.column() == 0 {
        LineError::new("invalid_json", line, what)
    } else {
        LineError::at(
            "invalid_json",
            line,
            format_args!("byte {}", e.column()),
            what,
        )
    }
}

/// k as a count: a non-negative integer no larger than n.
fn checked_k(k: f64, n: usize, line: usize) -> Result<usize, LineError> {
    let fault = if k.is_nan() || k.fract() != 0.0 {
        Some("must be an integer")
    } else if k < 0.0 {
        Some("must not be negative")
    } else if k > n as f64 {
        Some("is larger than n")
    } else {
        None
    };
    match fault {
        Some(why) => Err(LineError::new(
            "k_out_of_range",
            line,
            format_args!("k = {k} {why} (n = {n})"),
        )),
        // k is integral and within 0..=n, so it converts exactly.
        None => Ok(k as usize),
    }
}

/// Reads a cotangent array as ∂L/∂mask or ∂L/∂ranks (see the module docs for the layouts).
fn shape_cotangent(
    entries: Vec<Entry>,
    variant: Variant,
    n: usize,
    k: usize,
    line: usize,
) -> Result<LineCotangent, LineError> {
    let mismatch = |detail: String| LineError::new("shape_mismatch", line, detail);
    let all_numbers = entries.iter().all(|e| matches!(e, Entry::Number(_)));
    let all_rows = entries.iter().all(|e| matches!(e, Entry::Row(_)));

    let cotangent = if all_numbers && !(entries.is_empty() && variant == Variant::Sorted) {
        if entries.len() != n {
            return Err(mismatch(format!(
                "cotangent has {} entries, scores has {n}",
                entries.len()
            )));
        }
        let values = entries
            .into_iter()
            .map(|e| match e {
                Entry::Number(x) => x,
                Entry::Row(_) => f64::NAN, // ruled out by `all_numbers`
            })
            .collect();
        LineCotangent::Mask(values)
    } else if all_rows && variant == Variant::Sorted {
        let rows: Vec<Vec<f64>> = entries
            .into_iter()
            .map(|e| match e {
                Entry::Row(r) => r,
                Entry::Number(_) => Vec::new(), // ruled out by `all_rows`
            })
            .collect();
        let fits = |outer: usize, inner: usize| {
            rows.len() == outer && rows.iter().all(|r| r.len() == inner)
        };
        if fits(k, n) {
            LineCotangent::Ranks(rows)
        } else if fits(n, k) {
            // The shared cases' n × k layout, entry [i][j]: transpose to [j][i].
            LineCotangent::Ranks(
                (0..k)
                    .map(|j| rows.iter().map(|r| r[j]).collect())
                    .collect(),
            )
        } else {
            let inner: Vec<usize> = rows.iter().map(Vec::len).take(4).collect();
            return Err(mismatch(format!(
                "cotangent has {} rows (first lengths {inner:?}); the sorted variant takes \
                 k = {k} rows of n = {n}, n rows of k, or n numbers",
                rows.len()
            )));
        }
    } else if all_rows {
        return Err(mismatch(format!(
            "cotangent is an array of arrays; top-k takes n = {n} numbers"
        )));
    } else {
        return Err(mismatch("cotangent mixes numbers and arrays".to_string()));
    };

    // A non-finite upstream gradient has no meaning here and would only turn into NaN.
    let bad = match &cotangent {
        LineCotangent::Mask(g) => g.iter().position(|x| !x.is_finite()).map(|i| (i, g[i])),
        LineCotangent::Ranks(g) => g
            .iter()
            .flat_map(|r| r.iter().enumerate())
            .find(|(_, x)| !x.is_finite())
            .map(|(i, &x)| (i, x)),
    };
    if let Some((col, value)) = bad {
        return Err(LineError::at(
            "non_finite_input",
            line,
            format_args!("column {col}"),
            format_args!("cotangent value {value} must be finite"),
        ));
    }
    Ok(cotangent)
}

// ---------------------------------------------------------------------------------------------
// Solving

/// Solves one parsed line on the run's backend.
///
/// On the reference the f64 scores go in as they are, so its answers carry f64 accuracy; the
/// other backends take f32, and a finite score beyond the f32 range is an error there rather
/// than a silent infinity (which would even mean "excluded").
pub fn solve(problem: &Problem, runner: &Runner, line: usize) -> Result<Solution, LineError> {
    if runner.is_reference() {
        Ok(solve_reference(problem, line)?)
    } else {
        solve_on_backend(problem, runner, line)
    }
}

fn solve_reference(p: &Problem, line: usize) -> Result<Solution, LineError> {
    let valid = p.valid.as_deref();
    let out = forward_row(&p.op, line, &p.scores, valid);
    if let Some(e) = &out.report.error {
        return Err(LineError::from_library(line, e));
    }
    let grad = p.cotangent.as_ref().map(|c| {
        let (g_mask, g_ranks) = match c {
            LineCotangent::Mask(g) => (Some(g.as_slice()), None),
            LineCotangent::Ranks(g) => (None, Some(g.as_slice())),
        };
        backward_row(
            &p.op,
            line,
            &p.scores,
            valid,
            &out.mask,
            &out.ranks,
            RowCotangent {
                mask: g_mask,
                ranks: g_ranks,
            },
        )
    });
    // The reference returns the ranks of k as solved; the output always has the requested k.
    let ranks = (p.op.variant == Variant::Sorted).then(|| {
        let mut ranks = out.ranks.clone();
        ranks.resize(p.op.k_of(0), vec![0.0; p.scores.len()]);
        ranks
    });
    Ok(Solution {
        mask: out.mask,
        ranks,
        grad,
        converged: out.report.converged,
        iterations: out.report.iterations,
        marginal_error: out.report.marginal_error,
    })
}

/// f64 values as f32, refusing finite values that f32 cannot hold.
fn narrow(what: &str, values: &[f64], line: usize) -> Result<Vec<f32>, LineError> {
    values
        .iter()
        .enumerate()
        .map(|(col, &x)| {
            let y = x as f32;
            if x.is_finite() && !y.is_finite() {
                Err(LineError::at(
                    "non_finite_input",
                    line,
                    format_args!("column {col}"),
                    format_args!(
                        "{what} {x} is beyond the f32 range of this backend (the reference \
                         backend takes it)"
                    ),
                ))
            } else {
                Ok(y)
            }
        })
        .collect()
}

fn solve_on_backend(p: &Problem, runner: &Runner, line: usize) -> Result<Solution, LineError> {
    let library = |e: Error| LineError::from_library(line, &e);
    let scores = narrow("score", &p.scores, line)?;
    let n = scores.len();
    let mut batch = Batch::single(&scores).map_err(library)?;
    if let Some(valid) = &p.valid {
        batch = batch.with_valid(valid).map_err(library)?;
    }
    let topk = runner.operator(p.op.clone()).map_err(library)?;
    let forward = topk.run(&batch).map_err(library)?;
    let Some(report) = forward.reports.first() else {
        return Err(LineError::new(
            "internal",
            line,
            "the backend returned no report for the row",
        ));
    };
    if let Some(e) = &report.error {
        return Err(library(e.clone()));
    }

    let widen = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
    let ranks = (p.op.variant == Variant::Sorted).then(|| {
        (0..forward.k_max)
            .map(|j| forward.rank_row(0, j).map_or(vec![0.0; n], widen))
            .collect()
    });
    let grad = match &p.cotangent {
        None => None,
        Some(LineCotangent::Mask(g)) => {
            let g = narrow("cotangent", g, line)?;
            Some(
                topk.backward(&batch, &forward, Cotangent::Mask(&g))
                    .map_err(library)?,
            )
        }
        Some(LineCotangent::Ranks(g)) => {
            let flat: Vec<f64> = g.iter().flatten().copied().collect();
            let flat = narrow("cotangent", &flat, line)?;
            Some(
                topk.backward(&batch, &forward, Cotangent::Ranks(&flat))
                    .map_err(library)?,
            )
        }
    };
    Ok(Solution {
        mask: widen(forward.mask_row(0)),
        ranks,
        grad: grad.as_deref().map(widen),
        converged: report.converged,
        iterations: report.iterations,
        marginal_error: report.marginal_error,
    })
}

// ---------------------------------------------------------------------------------------------
// Formatting

/// A number for the output: finite values as JSON numbers, the others as the strings the
/// input accepts.
struct OutNumber(f64);

impl Serialize for OutNumber {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let x = self.0;
        if x.is_finite() {
            s.serialize_f64(x)
        } else if x.is_nan() {
            s.serialize_str("nan")
        } else if x > 0.0 {
            s.serialize_str("inf")
        } else {
            s.serialize_str("-inf")
        }
    }
}

struct OutNumbers<'a>(&'a [f64]);

impl Serialize for OutNumbers<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for &x in self.0 {
            seq.serialize_element(&OutNumber(x))?;
        }
        seq.end()
    }
}

#[derive(Serialize)]
struct OutLine<'a> {
    mask: OutNumbers<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ranks: Option<Vec<OutNumbers<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grad: Option<OutNumbers<'a>>,
    converged: bool,
    iterations: u32,
    marginal_error: OutNumber,
}

#[derive(Serialize)]
struct OutError<'a> {
    error: OutErrorBody<'a>,
}

#[derive(Serialize)]
struct OutErrorBody<'a> {
    kind: &'a str,
    message: &'a str,
}

/// The output line of a solved problem (no newline).
pub fn format_solution(s: &Solution) -> String {
    let out = OutLine {
        mask: OutNumbers(&s.mask),
        ranks: s
            .ranks
            .as_ref()
            .map(|r| r.iter().map(|row| OutNumbers(row)).collect()),
        grad: s.grad.as_deref().map(OutNumbers),
        converged: s.converged,
        iterations: s.iterations,
        marginal_error: OutNumber(s.marginal_error),
    };
    serde_json::to_string(&out).expect("numbers, strings and bools always serialize")
}

/// The output line of a bad input line (no newline).
pub fn format_error(e: &LineError) -> String {
    let out = OutError {
        error: OutErrorBody {
            kind: e.kind,
            message: &e.message,
        },
    };
    serde_json::to_string(&out).expect("strings always serialize")
}

/// Whether a line holds nothing but whitespace (echoed as a blank line).
pub fn is_blank(bytes: &[u8]) -> bool {
    bytes.iter().all(u8::is_ascii_whitespace)
}

/// The output line for one input line (no newline): a result, an error, or "" for a blank.
pub fn process_line(bytes: &[u8], line: usize, runner: &Runner) -> String {
    if is_blank(bytes) {
        return String::new();
    }
    match parse_line(bytes, line).and_then(|p| solve(&p, runner, line)) {
        Ok(solution) => format_solution(&solution),
        Err(e) => format_error(&e),
    }
}

// ---------------------------------------------------------------------------------------------
// Streams

/// What [`read_line_capped`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineRead {
    /// A line is in the buffer (newline and a trailing `\r` removed).
    Line,
    /// The line had `bytes` bytes, more than the cap; it was read past and not kept.
    TooLong { bytes: u64 },
    /// The input has ended.
    End,
}

/// Reads one line into `buf`, holding at most `max_bytes` of it in memory. The last line
/// needs no newline; an empty input gives [`LineRead::End`] at once.
pub fn read_line_capped<R: BufRead>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max_bytes: usize,
) -> io::Result<LineRead> {
    buf.clear();
    let (mut total, mut seen_any, mut too_long) = (0u64, false, false);
    loop {
        let available = match reader.fill_buf() {
            Ok(chunk) => chunk,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            if !seen_any {
                return Ok(LineRead::End);
            }
            break;
        }
        seen_any = true;
        let newline = available.iter().position(|&b| b == b'\n');
        let part = &available[..newline.unwrap_or(available.len())];
        total += part.len() as u64;
        if !too_long {
            if buf.len() + part.len() > max_bytes {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(part);
            }
        }
        let used = part.len() + usize::from(newline.is_some());
        reader.consume(used);
        if newline.is_some() {
            break;
        }
    }
    if too_long {
        return Ok(LineRead::TooLong { bytes: total });
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(LineRead::Line)
}

/// How [`process_stream`] reads and writes.
#[derive(Debug, Clone, Copy)]
pub struct StreamOptions {
    /// The longest line read (see [`DEFAULT_MAX_LINE_BYTES`]).
    pub max_line_bytes: usize,
    /// Flush the output after every line (for a tool reading its answers as it writes).
    pub flush_each_line: bool,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            flush_each_line: false,
        }
    }
}

/// Why a stream stopped: its input or its output failed (bad lines never stop it).
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("reading the input: {0}")]
    Read(io::Error),
    #[error("writing the output: {0}")]
    Write(io::Error),
}

/// Counts of one stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamSummary {
    pub lines: usize,
    pub blank: usize,
    pub errors: usize,
}

/// Answers every line of `input` on `output`, one line each, in order. Only reading and
/// writing fail the stream; bad lines become error lines. A solver that panics (a bug) turns
/// its line into an `internal` error line, and the stream goes on.
pub fn process_stream<R: BufRead, W: Write>(
    mut input: R,
    mut output: W,
    runner: &Runner,
    options: StreamOptions,
) -> Result<StreamSummary, StreamError> {
    let mut summary = StreamSummary::default();
    let mut buf = Vec::new();
    loop {
        let read = read_line_capped(&mut input, &mut buf, options.max_line_bytes)
            .map_err(StreamError::Read)?;
        if read == LineRead::End {
            break;
        }
        summary.lines += 1;
        let line = summary.lines;
        let text = match read {
            LineRead::TooLong { bytes } => {
                summary.errors += 1;
                format_error(&LineError::new(
                    "too_large",
                    line,
                    format_args!(
                        "the line has {bytes} bytes, more than the limit of {}",
                        options.max_line_bytes
                    ),
                ))
            }
            _ if is_blank(&buf) => {
                summary.blank += 1;
                String::new()
            }
            _ => {
                let answer = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    parse_line(&buf, line).and_then(|p| solve(&p, runner, line))
                }));
                match answer {
                    Ok(Ok(solution)) => format_solution(&solution),
                    Ok(Err(e)) => {
                        summary.errors += 1;
                        format_error(&e)
                    }
                    Err(_) => {
                        summary.errors += 1;
                        format_error(&LineError::new(
                            "internal",
                            line,
                            "the solver panicked on this line (a bug in soft-topk)",
                        ))
                    }
                }
            }
        };
        let write = |output: &mut W| {
            output.write_all(text.as_bytes())?;
            output.write_all(b"\n")?;
            if options.flush_each_line {
                output.flush()?;
            }
            Ok(())
        };
        write(&mut output).map_err(StreamError::Write)?;
    }
    output.flush().map_err(StreamError::Write)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind_of(line: &str) -> &'static str {
        match parse_line(line.as_bytes(), 7) {
            Ok(_) => "ok",
            Err(e) => {
                assert!(e.message.starts_with("line 7"), "{}", e.message);
                e.kind
            }
        }
    }

    #[test]
    fn kinds_of_bad_lines() {
        let cases = [
            (r#"{"scores":[1,2],"k":1,"epsilon":0.1}"#, "ok"),
            (r#"{"x":[1,2],"k":1.0,"eps":0.1,"normalize":"max"}"#, "ok"),
            (r#"{"scores":[1,2],"k":1,"epsilon":0}"#, "eps_not_positive"),
            (
                r#"{"scores":[1,2],"k":1,"epsilon":"nan"}"#,
                "eps_not_positive",
            ),
            (r#"{"scores":[1,2],"k":1,"epsilon":-1}"#, "eps_not_positive"),
            (r#"{"scores":[1,2],"k":3,"epsilon":0.1}"#, "k_out_of_range"),
            (r#"{"scores":[1,2],"k":-1,"epsilon":0.1}"#, "k_out_of_range"),
            (
                r#"{"scores":[1,2],"k":0.5,"epsilon":0.1}"#,
                "k_out_of_range",
            ),
            (
                r#"{"scores":[1,2],"k":"inf","epsilon":0.1}"#,
                "k_out_of_range",
            ),
            (
                r#"{"scores":[1,2],"k":1e300,"epsilon":0.1}"#,
                "k_out_of_range",
            ),
            (r#"{"scores":[],"k":0,"epsilon":0.1}"#, "empty_input"),
            (
                r#"{"scores":[1,2],"k":1,"epsilon":0.1,"valid":[true]}"#,
                "shape_mismatch",
            ),
            (
                r#"{"scores":[1,2],"k":1,"epsilon":0.1,"cotangent":[1]}"#,
                "shape_mismatch",
            ),
            (
                r#"{"scores":[1,2],"k":1,"epsilon":0.1,"cotangent":[[1,2]]}"#,
                "shape_mismatch",
            ),
            (
                r#"{"scores":[1,2],"k":1,"epsilon":0.1,"cotangent":[1,"nan"]}"#,
                "non_finite_input",
            ),
            (
                r#"{"scores":[1,2],"k":1,"epsilon":0.1,"variant":"fast"}"#,
                "invalid_option",
            ),
            (
                r#"{"scores":[1,2],"k":1,"epsilon":0.1,"scale":"min"}"#,
                "invalid_option",
            ),
            (
                r#"{"scores":[1,2],"k":1,"epsilon":0.1,"solver":"newton"}"#,
                "invalid_option",
            ),
            (
                r#"{"scores":[1,2],"k":1,"epsilon":0.1,"tolerance":1e-3}"#,
                "invalid_option",
            ),
            (
                r#"{"scores":[1,2],"k":1,"epsilon":0.1,"solver":"sinkhorn","max_iterations":-2}"#,
                "invalid_option",
            ),
            (
                r#"{"scores":[1,2],"k":1,"epsilon":0.1,"variant":"sorted","solver":"exact"}"#,
                "invalid_option",
            ),
            (r#"{"scores":[1,2],"k":1}"#, "invalid_json"),
            (
                r#"{"scores":[1,"two"],"k":1,"epsilon":0.1}"#,
                "invalid_json",
            ),
            (r#"{"scores":[1,[2]],"k":1,"epsilon":0.1}"#, "invalid_json"),
            (
                r#"{"scores":[1,2],"k":1,"epsilon":0.1,"largest":"yes"}"#,
                "invalid_json",
            ),
            (
                r#"{"scores":[1,2],"x":[1,2],"k":1,"epsilon":0.1}"#,
                "invalid_json",
            ),
            (r#"{"scores":[1e999],"k":1,"epsilon":0.1}"#, "invalid_json"),
            (r#"[1,2,3]"#, "invalid_json"),
            (r#"{"scores":[1,2],"k":1,"epsilon":0.1"#, "invalid_json"),
            (
                r#"{"scores":[1,2],"k":1,"epsilon":0.1} trailing"#,
                "invalid_json",
            ),
        ];
        for (line, expected) in cases {
            assert_eq!(kind_of(line), expected, "{line}");
        }
    }

    #[test]
    fn sorted_cotangent_layouts() {
        let k_by_n = r#"{"scores":[1,2,3],"k":2,"epsilon":0.1,"variant":"sorted",
                         "cotangent":[[1,2,3],[4,5,6]]}"#;
        let n_by_k = r#"{"scores":[1,2,3],"k":2,"epsilon":0.1,"variant":"sorted",
                         "cotangent":[[1,4],[2,5],[3,6]]}"#;
        let a = parse_line(k_by_n.as_bytes(), 1).expect("k × n parses");
        let b = parse_line(n_by_k.as_bytes(), 1).expect("n × k parses");
        assert_eq!(a.cotangent, b.cotangent);
        let expected = vec![vec![1.0, 2.0, 3.0], vec![4.0, 5.0, 6.0]];
        assert_eq!(a.cotangent, Some(LineCotangent::Ranks(expected)));
    }

    #[test]
    fn hostile_bytes_do_not_panic() {
        let deep = "[".repeat(100_000);
        let deep_unknown = format!(r#"{{"other":{}}}"#, "[".repeat(100_000));
        let deep_scores = format!(r#"{{"scores":{}}}"#, "[".repeat(100_000));
        let inputs: Vec<Vec<u8>> = vec![
            vec![0xff, 0xfe, b'{'],
            b"{\"scores\":[\"\xc3\x28\"]}".to_vec(),
            deep.into_bytes(),
            deep_unknown.into_bytes(),
            deep_scores.into_bytes(),
            b"{\"scores\":[1],\"k\":18446744073709551616,\"epsilon\":1}".to_vec(),
            b"\0\0\0".to_vec(),
            b"{}".to_vec(),
            b"null".to_vec(),
        ];
        for input in inputs {
            let e = parse_line(&input, 3).expect_err("hostile input is refused");
            assert!(e.message.chars().count() <= MAX_MESSAGE_CHARS + 1);
        }
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_parse_without_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)
        ) {
            let _ = parse_line(&bytes, 1);
        }

        #[test]
        fn mutated_good_lines_parse_without_panic(
            edits in proptest::collection::vec((0usize..200, 0usize..24), 1..6)
        ) {
            // Replacing bytes of a good line by JSON-ish ones reaches the checks behind the
            // syntax: wrong types, wrong shapes, odd numbers.
            const ALPHABET: &[u8] = b"[]{}\",:-.e0159ntfaxk ";
            let mut line = concat!(
                r#"{"scores":[1,-2.5,"inf",3e2],"k":2,"eps":0.1,"variant":"sorted","#,
                r#""cotangent":[[1,2,3,4],[0,0,0,1]],"valid":[true,1,0,false]}"#
            )
            .as_bytes()
            .to_vec();
            for (at, pick) in edits {
                let at = at % line.len();
                line[at] = ALPHABET[pick % ALPHABET.len()];
            }
            if let Err(e) = parse_line(&line, 4) {
                proptest::prop_assert!(e.message.starts_with("line 4"), "{}", e.message);
            }
        }
    }

    #[test]
    fn capped_reader_skips_long_lines_and_keeps_count() {
        let input = b"short\nthis line is far too long\r\nok\r\nlast";
        let mut reader = io::BufReader::with_capacity(4, &input[..]);
        let mut buf = Vec::new();
        let mut seen = Vec::new();
        loop {
            match read_line_capped(&mut reader, &mut buf, 8).expect("reads from memory") {
                LineRead::End => break,
                LineRead::Line => seen.push(String::from_utf8_lossy(&buf).into_owned()),
                LineRead::TooLong { bytes } => seen.push(format!("<{bytes}>")),
            }
        }
        // The count is of the bytes before the newline, its `\r` included.
        assert_eq!(seen, ["short", "<26>", "ok", "last"]);
    }
}
