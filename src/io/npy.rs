//! `.npy` arrays in and out, and the batch job of the tool's `npy` mode.
//!
//! Reading checks the header against the file before allocating anything for the data: the
//! header itself may be at most [`MAX_HEADER_BYTES`], its shape's element count must not
//! overflow, and the data it describes must be exactly the bytes the file has after the
//! header. A tiny file claiming 10¹² elements is an error, never an allocation.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use npyz::{DType, NpyFile, NpyHeader, Order, TypeChar, WriterBuilder};

use super::atomic::AtomicFile;
use super::Runner;
use crate::error::Error;
use crate::op::{SoftTopK, Variant};
use crate::output::RowReport;
use crate::reference::{backward_row, forward_row, RowCotangent};
use crate::{Batch, Cotangent};

/// The largest header accepted. numpy writes a few hundred bytes; anything near this is not an
/// array file, and reading it would only waste memory.
pub const MAX_HEADER_BYTES: usize = 1 << 20;

const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// Why an array could not be read or written, or a job not run. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    /// The file system refused (missing file, no permission, full disk...).
    // The source is printed by whoever prints the error chain, so it is not repeated here.
    #[error("{}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// The file is not a `.npy` file this tool can use, or does not fit the other inputs.
    #[error("{}: {why}", path.display())]
    Invalid { path: PathBuf, why: String },
    /// The operator refused the whole job (ε, k against n, the device).
    #[error(transparent)]
    Operator(#[from] Error),
}

impl NpyError {
    fn invalid(path: &Path, why: impl Into<String>) -> Self {
        NpyError::Invalid {
            path: path.to_path_buf(),
            why: why.into(),
        }
    }

    fn io(path: &Path, source: io::Error) -> Self {
        NpyError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The values of an array, in the types this tool reads.
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
}

/// An array in C (row-major) order, whatever the file's order was.
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub values: Values,
}

impl Array {
    /// The values as f64 (floats only).
    pub fn to_f64(&self) -> Option<Vec<f64>> {
        match &self.values {
            Values::F32(v) => Some(v.iter().map(|&x| f64::from(x)).collect()),
            Values::F64(v) => Some(v.clone()),
            Values::Bool(_) => None,
        }
    }

    /// The dtype, as a word for messages.
    pub fn dtype_name(&self) -> &'static str {
        match self.values {
            Values::F32(_) => "float32",
            Values::F64(_) => "float64",
            Values::Bool(_) => "bool",
        }
    }
}

/// Reads an f32, f64, bool, int8 or uint8 array (the integers as flags: nonzero is true).
pub fn read_array(path: &Path) -> Result<Array, NpyError> {
    let file = File::open(path).map_err(|e| NpyError::io(path, e))?;
    let size = file.metadata().map_err(|e| NpyError::io(path, e))?.len();
    read_array_from(BufReader::new(file), size, path)
}

/// [`read_array`] from any reader holding `size` bytes; `path` names it in errors.
pub fn read_array_from<R: Read>(mut reader: R, size: u64, path: &Path) -> Result<Array, NpyError> {
    let invalid = |why: String| NpyError::invalid(path, why);
    let (header, header_bytes) = read_header(&mut reader, size).map_err(invalid)?;

    let DType::Plain(ty) = header.dtype() else {
        return Err(invalid(format!(
            "structured dtype {} is not supported (expected float32 or float64)",
            header.dtype().descr()
        )));
    };
    let item = match (ty.type_char(), ty.size_field()) {
        (TypeChar::Float, 4 | 8) | (TypeChar::Bool, 1) | (TypeChar::Int | TypeChar::Uint, 1) => {
            ty.size_field()
        }
        _ => {
            return Err(invalid(format!(
                "dtype '{ty}' is not supported (expected float32 or float64, or bool for a \
                 validity mask)"
            )))
        }
    };

    // The shape was checked for overflow in `read_header`; now it must match the file.
    let count = header.len();
    let needed = count.checked_mul(item).ok_or_else(|| {
        invalid(format!(
            "the header's shape {:?} describes more data than any file holds",
            header.shape()
        ))
    })?;
    let present = size - header_bytes;
    if needed != present {
        let what = if needed > present {
            "the file is truncated"
        } else {
            "the file has bytes after the data"
        };
        return Err(invalid(format!(
            "{what}: the header's shape {:?} of '{ty}' needs {needed} bytes of data, the file \
             has {present}",
            header.shape()
        )));
    }
    let shape: Vec<usize> = header
        .shape()
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<_, _>>()
        .map_err(|_| invalid(format!("shape {:?} does not fit in memory", header.shape())))?;
    let order = header.order();

    let file = NpyFile::with_header(header, reader);
    let read_err = |e: io::Error| NpyError::invalid(path, format!("reading the data: {e}"));
    let values = match (ty.type_char(), item) {
        (TypeChar::Float, 4) => Values::F32(file.into_vec::<f32>().map_err(read_err)?),
        (TypeChar::Float, _) => Values::F64(file.into_vec::<f64>().map_err(read_err)?),
        (TypeChar::Bool, _) => Values::Bool(file.into_vec::<bool>().map_err(read_err)?),
        (TypeChar::Int, _) => {
            let v = file.into_vec::<i8>().map_err(read_err)?;
            Values::Bool(v.into_iter().map(|x| x != 0).collect())
        }
        _ => {
            let v = file.into_vec::<u8>().map_err(read_err)?;
            Values::Bool(v.into_iter().map(|x| x != 0).collect())
        }
    };
    let values = match order {
        Order::C => values,
        Order::Fortran => match values {
            Values::F32(v) => Values::F32(fortran_to_c(&v, &shape)),
            Values::F64(v) => Values::F64(fortran_to_c(&v, &shape)),
            Values::Bool(v) => Values::Bool(fortran_to_c(&v, &shape)),
        },
    };
    Ok(Array { shape, values })
}

/// Reads the magic, the version, the header length and the header, checking each against the
/// file size; returns the parsed header and the bytes it took.
fn read_header<R: Read>(reader: &mut R, size: u64) -> Result<(NpyHeader, u64), String> {
    let mut prefix = [0u8; 12];
    let short = |e: io::Error| format!("cannot read the .npy header: {e}");
    if size < 10 {
        return Err(format!(
            "the file has {size} bytes, too few for a .npy header"
        ));
    }
    reader.read_exact(&mut prefix[..10]).map_err(short)?;
    if &prefix[..6] != MAGIC {
        return Err("not a .npy file (the magic string \\x93NUMPY is missing)".into());
    }
    let (prefix_len, header_len) = match prefix[6] {
        1 => (10, usize::from(u16::from_le_bytes([prefix[8], prefix[9]]))),
        2 | 3 => {
            reader.read_exact(&mut prefix[10..12]).map_err(short)?;
            let len = u32::from_le_bytes([prefix[8], prefix[9], prefix[10], prefix[11]]);
            (12, usize::try_from(len).unwrap_or(usize::MAX))
        }
        v => return Err(format!("unsupported .npy format version {v}.{}", prefix[7])),
    };
    if header_len > MAX_HEADER_BYTES {
        return Err(format!(
            "the header claims {header_len} bytes, more than the {MAX_HEADER_BYTES} accepted"
        ));
    }
    let header_end = (prefix_len + header_len) as u64;
    if header_end > size {
        return Err(format!(
            "the file is truncated: its header claims {header_len} bytes, the file has {size} \
             in all"
        ));
    }
    let mut bytes = prefix[..prefix_len].to_vec();
    bytes.resize(prefix_len + header_len, 0);
    reader.read_exact(&mut bytes[prefix_len..]).map_err(short)?;

    // npyz multiplies the shape's dimensions without an overflow check; check them first.
    let text = String::from_utf8_lossy(&bytes[prefix_len..]);
    shape_element_count(&text)?;
    check_nesting(&text)?;
    let header = NpyHeader::from_reader(&bytes[..]).map_err(|e| format!("bad header: {e}"))?;
    Ok((header, header_end))
}

/// The deepest bracket nesting accepted in a header. numpy writes a dict holding a tuple
/// (depth 2); structured dtypes, refused later anyway, nest a few levels more.
const MAX_HEADER_NESTING: usize = 8;

/// Refuses headers nested deeper than [`MAX_HEADER_NESTING`] before npyz parses them: its
/// header parser backtracks, and its time doubles with each unclosed bracket (20 took 8 s,
/// 25 four minutes), so a 200-byte file could hang the tool.
fn check_nesting(text: &str) -> Result<(), String> {
    let mut depth = 0usize;
    for c in text.chars() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            _ => continue,
        }
        if depth > MAX_HEADER_NESTING {
            return Err(format!(
                "the header nests brackets deeper than {MAX_HEADER_NESTING} levels"
            ));
        }
    }
    Ok(())
}

/// The element count of the header's `'shape': (…)`, refusing a header with no shape, two
/// shapes, or dimensions whose product overflows.
fn shape_element_count(text: &str) -> Result<u64, String> {
    let keys: Vec<usize> = ["'shape'", "\"shape\""]
        .iter()
        .flat_map(|key| text.match_indices(key).map(|(at, key)| at + key.len()))
        .collect();
    let [after_key] = keys[..] else {
        return Err(format!(
            "the header must name one shape, it names {}",
            keys.len()
        ));
    };
    let rest = text[after_key..].trim_start();
    let rest = rest
        .strip_prefix(':')
        .map(str::trim_start)
        .ok_or("the header's shape has no value")?;
    let close = match rest.chars().next() {
        Some('(') => ')',
        Some('[') => ']',
        _ => return Err("the header's shape is not a tuple".into()),
    };
    let end = rest
        .find(close)
        .ok_or("the header's shape tuple is not closed")?;
    let mut count: u64 = 1;
    for part in rest[1..end]
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let digits = part.strip_suffix('L').unwrap_or(part);
        let dim: u64 = digits
            .parse()
            .map_err(|_| format!("the header's shape has a bad dimension '{part}'"))?;
        count = count
            .checked_mul(dim)
            .ok_or_else(|| format!("the header's shape {} overflows", &rest[..=end]))?;
    }
    Ok(count)
}

/// Column-major values of `shape` in row-major order.
fn fortran_to_c<T: Copy>(values: &[T], shape: &[usize]) -> Vec<T> {
    if shape.len() < 2 {
        return values.to_vec();
    }
    // Fortran strides: the first axis moves fastest.
    let mut strides = vec![1usize; shape.len()];
    for a in 1..shape.len() {
        strides[a] = strides[a - 1] * shape[a - 1];
    }
    let mut index = vec![0usize; shape.len()];
    let mut out = Vec::with_capacity(values.len());
    for _ in 0..values.len() {
        let at: usize = index.iter().zip(&strides).map(|(i, s)| i * s).sum();
        out.push(values[at]);
        // Advance the row-major multi-index: the last axis moves fastest.
        for a in (0..shape.len()).rev() {
            index[a] += 1;
            if index[a] < shape[a] {
                break;
            }
            index[a] = 0;
        }
    }
    out
}

/// Writes an f32 array of `shape` as `.npy` to any writer.
pub fn write_f32_to<W: Write>(writer: W, shape: &[usize], data: &[f32]) -> io::Result<()> {
    let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let mut npy = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&shape)
        .writer(writer)
        .begin_nd()?;
    npy.extend(data.iter().copied())?;
    npy.finish()
}

/// Writes an f32 array to a temporary file beside `path`; it takes the name `path` only when
/// the returned file is committed.
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<AtomicFile, NpyError> {
    let mut file = AtomicFile::create(path).map_err(|e| NpyError::io(path, e))?;
    write_f32_to(&mut file, shape, data).map_err(|e| NpyError::io(path, e))?;
    Ok(file)
}

// ---------------------------------------------------------------------------------------------
// The batch job

/// One run of the `npy` mode: the operator, the input files and the outputs wanted.
#[derive(Debug, Clone)]
pub struct NpyJob {
    pub op: SoftTopK,
    /// Scores, f32 or f64, `rows × n` or `n` (one row).
    pub scores: PathBuf,
    /// Validity mask of the scores' shape (bool, or int8/uint8 with nonzero for true).
    pub valid: Option<PathBuf>,
    /// Upstream gradient: ∂L/∂mask of the scores' shape, or for the sorted variant also
    /// ∂L/∂ranks of shape `rows × k × n` (`k × n` for one-row input).
    pub cotangent: Option<PathBuf>,
    pub out_mask: PathBuf,
    pub out_ranks: Option<PathBuf>,
    pub out_grad: Option<PathBuf>,
    /// One JSON line per row: its report or its error.
    pub out_report: Option<PathBuf>,
}

impl NpyJob {
    /// Checks what can be checked before any file is read: the outputs asked for fit the
    /// variant, and no two paths name the same file (an output over an input, or two outputs
    /// over each other, would leave only the last one written).
    pub fn check(&self) -> Result<(), NpyError> {
        let sorted = self.op.variant == Variant::Sorted;
        if let (Some(path), false) = (&self.out_ranks, sorted) {
            return Err(NpyError::invalid(
                path,
                "ranks are an output of the sorted variant (add --sorted)",
            ));
        }
        if self.cotangent.is_some() != self.out_grad.is_some() {
            let path = self.cotangent.as_ref().or(self.out_grad.as_ref());
            return Err(NpyError::invalid(
                path.map_or(Path::new(""), |p| p.as_path()),
                "a gradient needs both a cotangent input and a gradient output",
            ));
        }
        let inputs = [
            Some(&self.scores),
            self.valid.as_ref(),
            self.cotangent.as_ref(),
        ];
        let outputs = [
            Some(&self.out_mask),
            self.out_ranks.as_ref(),
            self.out_grad.as_ref(),
            self.out_report.as_ref(),
        ];
        // Every path given, inputs first; each output is checked against all before it.
        let first_output = inputs.iter().flatten().count();
        let paths: Vec<&PathBuf> = inputs.into_iter().chain(outputs).flatten().collect();
        for (i, out) in paths.iter().enumerate().skip(first_output) {
            if let Some(other) = paths[..i].iter().find(|p| same_file(p, out)) {
                return Err(NpyError::invalid(
                    out,
                    format!(
                        "names the same file as {}; each output needs a path of its own",
                        other.display()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Whether two paths name one file: by their canonical forms where both exist, otherwise by
/// their absolute forms (an output usually does not exist yet).
fn same_file(a: &Path, b: &Path) -> bool {
    if let (Ok(a), Ok(b)) = (a.canonicalize(), b.canonicalize()) {
        return a == b;
    }
    match (std::path::absolute(a), std::path::absolute(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// What a job did: rows solved, and the rows refused with why (their outputs are 0).
#[derive(Debug, Clone, Default)]
pub struct JobSummary {
    pub rows: usize,
    pub n: usize,
    pub row_errors: Vec<(usize, Error)>,
}

/// The answers of a job, in f32 and C order.
struct Answers {
    mask: Vec<f32>,
    ranks: Option<Vec<f32>>,
    grad: Option<Vec<f32>>,
    reports: Vec<RowReport>,
}

enum JobCotangent {
    Mask(Vec<f64>),
    Ranks(Vec<f64>),
}

/// Runs a job: reads and checks every input, solves, then writes every output, each one
/// renamed into place only once all of them are written. On an error nothing is written.
pub fn run_job(job: &NpyJob, runner: &Runner) -> Result<JobSummary, NpyError> {
    job.check()?;
    let sorted = job.op.variant == Variant::Sorted;
    // Scores: one row or a matrix.
    let scores = read_array(&job.scores)?;
    let (rows, n) = match scores.shape[..] {
        [n] => (1, n),
        [rows, n] => (rows, n),
        _ => {
            return Err(NpyError::invalid(
                &job.scores,
                format!(
                    "scores must be 1-D (one row) or 2-D (rows × n), not shape {:?}",
                    scores.shape
                ),
            ))
        }
    };
    let one_row = scores.shape.len() == 1;
    let Some(x) = scores.to_f64() else {
        return Err(NpyError::invalid(
            &job.scores,
            format!(
                "scores must be float32 or float64, not {}",
                scores.dtype_name()
            ),
        ));
    };
    if n == 0 {
        return Err(Error::EmptyInput.into());
    }
    job.op.check(rows)?;
    let k = job.op.k_max(rows);
    if k > n {
        return Err(Error::KOutOfRange { row: 0, k, n }.into());
    }

    let valid = match &job.valid {
        Some(path) => Some(read_valid(path, &scores.shape)?),
        None => None,
    };
    let ranks_shape = if one_row {
        vec![k, n]
    } else {
        vec![rows, k, n]
    };
    let cotangent = match &job.cotangent {
        Some(path) => Some(read_cotangent(path, &scores.shape, &ranks_shape, sorted)?),
        None => None,
    };

    let answers = if runner.is_reference() {
        solve_reference(&job.op, &x, rows, n, valid.as_deref(), cotangent.as_ref())
    } else {
        solve_on_backend(
            runner,
            &job.op,
            &x,
            rows,
            n,
            valid.as_deref(),
            cotangent,
            job,
        )?
    };

    // Write everything under temporary names, then rename all of it.
    let mask_shape = if one_row { vec![n] } else { vec![rows, n] };
    let mut pending = vec![write_f32(&job.out_mask, &mask_shape, &answers.mask)?];
    if let (Some(path), Some(ranks)) = (&job.out_ranks, &answers.ranks) {
        pending.push(write_f32(path, &ranks_shape, ranks)?);
    }
    if let (Some(path), Some(grad)) = (&job.out_grad, &answers.grad) {
        pending.push(write_f32(path, &mask_shape, grad)?);
    }
    if let Some(path) = &job.out_report {
        pending.push(write_report(path, &answers.reports)?);
    }
    for file in pending {
        let path = file.target().to_path_buf();
        file.commit().map_err(|e| NpyError::io(&path, e))?;
    }

    let row_errors = answers
        .reports
        .iter()
        .enumerate()
        .filter_map(|(r, report)| report.error.clone().map(|e| (r, e)))
        .collect();
    Ok(JobSummary {
        rows,
        n,
        row_errors,
    })
}

fn read_valid(path: &Path, shape: &[usize]) -> Result<Vec<bool>, NpyError> {
    let array = read_array(path)?;
    if array.shape != shape {
        return Err(NpyError::invalid(
            path,
            format!(
                "the validity mask has shape {:?}, the scores {shape:?}",
                array.shape
            ),
        ));
    }
    match array.values {
        Values::Bool(v) => Ok(v),
        _ => Err(NpyError::invalid(
            path,
            format!(
                "the validity mask must be bool (or int8/uint8), not {}",
                array.dtype_name()
            ),
        )),
    }
}

fn read_cotangent(
    path: &Path,
    scores_shape: &[usize],
    ranks_shape: &[usize],
    sorted: bool,
) -> Result<JobCotangent, NpyError> {
    let array = read_array(path)?;
    let Some(values) = array.to_f64() else {
        return Err(NpyError::invalid(
            path,
            format!(
                "the cotangent must be float32 or float64, not {}",
                array.dtype_name()
            ),
        ));
    };
    if let Some(i) = values.iter().position(|g| !g.is_finite()) {
        return Err(NpyError::invalid(
            path,
            format!(
                "cotangent value {} at flat index {i} is not finite",
                values[i]
            ),
        ));
    }
    if array.shape == scores_shape {
        Ok(JobCotangent::Mask(values))
    } else if sorted && array.shape == ranks_shape {
        Ok(JobCotangent::Ranks(values))
    } else {
        let expected = if sorted {
            format!("{scores_shape:?} (∂L/∂mask) or {ranks_shape:?} (∂L/∂ranks)")
        } else {
            format!("{scores_shape:?}")
        };
        Err(NpyError::invalid(
            path,
            format!(
                "the cotangent has shape {:?}, expected {expected}",
                array.shape
            ),
        ))
    }
}

/// Why a finite f64 score is refused by the f32 backends.
const BEYOND_F32: &str = "beyond the f32 range of this backend; the reference backend takes it";

/// f64 scores as f32 for the f32 backends. A finite score beyond f32 becomes NaN, so that the
/// backend refuses its row alone (an infinity would even mean "excluded"), and is listed as
/// (row, column, value) for the row's error to name it; an excluded one is ignored like any.
fn narrow_scores(values: &[f64], n: usize) -> (Vec<f32>, Vec<(usize, usize, f64)>) {
    let mut beyond = Vec::new();
    let narrowed = values
        .iter()
        .enumerate()
        .map(|(at, &x)| {
            let y = x as f32;
            if x.is_finite() && !y.is_finite() {
                beyond.push((at / n, at % n, x));
                f32::NAN
            } else {
                y
            }
        })
        .collect();
    (narrowed, beyond)
}

/// f64 values (the cotangent) as f32 for the f32 backends; a finite value beyond f32 is an
/// error, not an infinity.
fn narrow(values: &[f64], path: &Path, n: usize) -> Result<Vec<f32>, NpyError> {
    values
        .iter()
        .enumerate()
        .map(|(at, &x)| {
            let y = x as f32;
            if x.is_finite() && !y.is_finite() {
                Err(NpyError::invalid(
                    path,
                    format!(
                        "row {}, column {}: {x} is beyond the f32 range of this backend (the \
                         reference backend takes it)",
                        at / n,
                        at % n
                    ),
                ))
            } else {
                Ok(y)
            }
        })
        .collect()
}

/// The f64 reference, row by row, on the f64 inputs.
fn solve_reference(
    op: &SoftTopK,
    x: &[f64],
    rows: usize,
    n: usize,
    valid: Option<&[bool]>,
    cotangent: Option<&JobCotangent>,
) -> Answers {
    let k = op.k_max(rows);
    let sorted = op.variant == Variant::Sorted;
    let mut answers = Answers {
        mask: vec![0.0; rows * n],
        ranks: sorted.then(|| vec![0.0; rows * k * n]),
        grad: cotangent.map(|_| vec![0.0; rows * n]),
        reports: Vec::with_capacity(rows),
    };
    for r in 0..rows {
        let span = r * n..(r + 1) * n;
        let (x_row, valid_row) = (&x[span.clone()], valid.map(|v| &v[span.clone()]));
        let out = forward_row(op, r, x_row, valid_row);
        fill(&mut answers.mask[span.clone()], &out.mask);
        if let Some(ranks) = answers.ranks.as_mut() {
            for (j, rank) in out.ranks.iter().enumerate() {
                let start = (r * k + j) * n;
                fill(&mut ranks[start..start + n], rank);
            }
        }
        if let (Some(grad), Some(c)) = (answers.grad.as_mut(), cotangent) {
            let g = match c {
                JobCotangent::Mask(g) => {
                    let g = &g[span.clone()];
                    backward_row(
                        op,
                        r,
                        x_row,
                        valid_row,
                        &out.mask,
                        &out.ranks,
                        RowCotangent {
                            mask: Some(g),
                            ranks: None,
                        },
                    )
                }
                JobCotangent::Ranks(g) => {
                    let g: Vec<Vec<f64>> = (0..k)
                        .map(|j| g[(r * k + j) * n..(r * k + j + 1) * n].to_vec())
                        .collect();
                    backward_row(
                        op,
                        r,
                        x_row,
                        valid_row,
                        &out.mask,
                        &out.ranks,
                        RowCotangent {
                            mask: None,
                            ranks: Some(&g),
                        },
                    )
                }
            };
            fill(&mut grad[span.clone()], &g);
        }
        answers.reports.push(out.report);
    }
    answers
}

fn fill(dst: &mut [f32], src: &[f64]) {
    dst.iter_mut().zip(src).for_each(|(d, &s)| *d = s as f32);
}

/// An f32 backend on the whole batch at once.
#[allow(clippy::too_many_arguments)]
fn solve_on_backend(
    runner: &Runner,
    op: &SoftTopK,
    x: &[f64],
    rows: usize,
    n: usize,
    valid: Option<&[bool]>,
    cotangent: Option<JobCotangent>,
    job: &NpyJob,
) -> Result<Answers, NpyError> {
    let (x, beyond) = narrow_scores(x, n);
    let mut batch = Batch::new(&x, rows, n)?;
    if let Some(v) = valid {
        batch = batch.with_valid(v)?;
    }
    let topk = runner.operator(op.clone())?;
    let mut forward = topk.run(&batch)?;
    // A row refused at a score that was too large for f32 says so, with the score as given.
    for (row, col, value) in beyond {
        let error = &mut forward.reports[row].error;
        if matches!(error, Some(Error::NonFiniteInput { col: c, .. }) if *c == col) {
            *error = Some(Error::NonFiniteInput {
                row,
                col,
                value,
                why: BEYOND_F32,
            });
        }
    }
    let grad = match cotangent {
        None => None,
        Some(c) => {
            let path = job.cotangent.as_deref().unwrap_or(Path::new(""));
            let (values, is_mask) = match c {
                JobCotangent::Mask(g) => (g, true),
                JobCotangent::Ranks(g) => (g, false),
            };
            let g = narrow(&values, path, n)?;
            let cotangent = if is_mask {
                Cotangent::Mask(&g)
            } else {
                Cotangent::Ranks(&g)
            };
            Some(topk.backward(&batch, &forward, cotangent)?)
        }
    };
    Ok(Answers {
        mask: forward.mask,
        ranks: forward.ranks,
        grad,
        reports: forward.reports,
    })
}

/// One JSON line per row: `{"row", "k", "n_valid", "converged", "iterations",
/// "marginal_error"}`, or `{"row", "error": {"kind", "message"}}`.
fn write_report(path: &Path, reports: &[RowReport]) -> Result<AtomicFile, NpyError> {
    let mut file = AtomicFile::create(path).map_err(|e| NpyError::io(path, e))?;
    for (row, report) in reports.iter().enumerate() {
        let line = match &report.error {
            Some(e) => serde_json::json!({
                "row": row,
                "error": {"kind": e.kind(), "message": e.to_string()},
            }),
            None => serde_json::json!({
                "row": row,
                "k": report.k,
                "n_valid": report.n_valid,
                "converged": report.converged,
                "iterations": report.iterations,
                "marginal_error": if report.marginal_error.is_finite() {
                    serde_json::json!(report.marginal_error)
                } else {
                    serde_json::json!(report.marginal_error.to_string())
                },
            }),
        };
        writeln!(file, "{line}").map_err(|e| NpyError::io(path, e))?;
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_bytes(dict: &str, version: u8) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&[version, 0]);
        if version == 1 {
            out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
        } else {
            out.extend_from_slice(&(dict.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(dict.as_bytes());
        out
    }

    fn read(bytes: &[u8]) -> Result<Array, NpyError> {
        read_array_from(bytes, bytes.len() as u64, Path::new("test.npy"))
    }

    #[test]
    fn round_trip_in_memory() {
        let mut bytes = Vec::new();
        write_f32_to(&mut bytes, &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).expect("writes");
        let array = read(&bytes).expect("reads back");
        assert_eq!(array.shape, [2, 3]);
        assert_eq!(
            array.values,
            Values::F32(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
        );
    }

    #[test]
    fn huge_shapes_and_headers_are_refused_before_allocating() {
        let dicts = [
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000), }\n",
            "{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, 4294967296, 4), }\n",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'shape': (99999999999,)}\n",
            "{'descr': '<f4', 'fortran_order': False}\n",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }\n",
        ];
        for dict in dicts {
            let e = read(&header_bytes(dict, 1)).expect_err(dict);
            assert!(matches!(e, NpyError::Invalid { .. }), "{dict}: {e}");
        }
        // A v2 header claiming 4 GiB of header text in a 20-byte file.
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&[2, 0]);
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(b"{'descr'");
        let e = read(&bytes).expect_err("huge header");
        assert!(e.to_string().contains("header claims"), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn mutated_files_read_without_panic(
            edits in proptest::collection::vec((0usize..200, proptest::prelude::any::<u8>()), 1..6),
            cut in 0usize..200,
        ) {
            let mut bytes = Vec::new();
            write_f32_to(&mut bytes, &[3, 4], &[0.5; 12]).expect("writes");
            for (at, value) in edits {
                let at = at % bytes.len();
                bytes[at] = value;
            }
            bytes.truncate(bytes.len() - cut % 8);
            let _ = read(&bytes);
        }
    }

    #[test]
    fn fortran_order_is_returned_in_c_order() {
        let dict = "{'descr': '<f8', 'fortran_order': True, 'shape': (2, 3), }\n";
        let mut bytes = header_bytes(dict, 1);
        // Column-major storage of [[1, 2, 3], [4, 5, 6]].
        for x in [1.0f64, 4.0, 2.0, 5.0, 3.0, 6.0] {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        let array = read(&bytes).expect("reads");
        assert_eq!(
            array.values,
            Values::F64(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
        );
    }

    #[test]
    fn wrong_dtype_and_extra_bytes_are_refused() {
        let dict = "{'descr': '<i8', 'fortran_order': False, 'shape': (1,), }\n";
        let mut bytes = header_bytes(dict, 1);
        bytes.extend_from_slice(&1i64.to_le_bytes());
        assert!(read(&bytes).is_err());

        let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }\n";
        let mut bytes = header_bytes(dict, 1);
        bytes.extend_from_slice(&[0u8; 8]);
        let e = read(&bytes).expect_err("extra bytes");
        assert!(e.to_string().contains("after the data"), "{e}");
    }
}
