//! `soft-topk`: the SOFT top-k operator from the command line.
//!
//! A thin shell: the parsing, solving and formatting live in `soft_topk::io`, where the tests
//! and fuzz targets reach them too.

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::builder::PossibleValuesParser;
use clap::{Args, Parser, Subcommand};
use soft_topk::io::atomic::AtomicFile;
use soft_topk::io::jsonl::{self, StreamOptions, DEFAULT_MAX_LINE_BYTES};
use soft_topk::io::npy::{self, NpyJob};
use soft_topk::io::{parse_scale, parse_solver, Runner};
use soft_topk::{BackendKind, Direction, SoftTopK, Variant};

/// Row errors printed on stderr in `npy` mode before the rest are only counted.
const ROW_ERRORS_SHOWN: usize = 10;

/// Exit status of an `npy` run that wrote its outputs but refused some rows.
const EXIT_ROW_ERRORS: u8 = 3;

#[derive(Parser)]
#[command(
    name = "soft-topk",
    version,
    about = "The SOFT differentiable top-k operator (Xie et al., NeurIPS 2020)",
    long_about = "The SOFT differentiable top-k operator (Xie et al., NeurIPS 2020): soft masks, \
                  sorted soft ranks and their gradients, from JSON lines or .npy arrays.\n\n\
                  Exit status: 0 on success (in jsonl mode bad lines are error lines, not \
                  failures); 1 when the run failed and wrote nothing; 2 for a usage error; 3 \
                  in npy mode when the outputs were written but some rows had input errors \
                  (their outputs are 0)."
)]
struct Cli {
    /// Where to solve: auto (the GPU when a hardware adapter exists, else the CPU; a software
    /// adapter such as lavapipe is slower than the CPU), gpu (any adapter), cpu (fast f32),
    /// or reference (f64, slow; exact to f64 on f64 input).
    #[arg(long, global = true, default_value = "auto", value_name = "BACKEND")]
    backend: BackendKind,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Solve one problem per JSON line, answering one line per input line, in order.
    ///
    /// Input keys: scores (alias x), k, epsilon (alias eps), largest, variant (topk|sorted),
    /// scale (alias normalize; none|max), valid, cotangent (alias v), solver
    /// (auto|exact|sinkhorn|newton), tolerance, max_iterations. Output keys: mask, ranks
    /// (sorted), grad (with a cotangent), converged, iterations, marginal_error; or
    /// {"error": {"kind", "message"}} for a bad line. Blank lines are echoed as blank lines.
    Jsonl(JsonlArgs),
    /// Solve a batch of rows stored as .npy arrays.
    Npy(Box<NpyArgs>),
}

#[derive(Args)]
struct JsonlArgs {
    /// Input file; standard input when absent or "-".
    input: Option<PathBuf>,

    /// Output file, renamed into place only when complete; standard output when absent or "-".
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,

    /// Longest line read, in bytes; a longer line gets a too_large error line.
    #[arg(long, default_value_t = DEFAULT_MAX_LINE_BYTES, value_name = "BYTES")]
    max_line_bytes: usize,
}

#[derive(Args)]
struct NpyArgs {
    /// Scores, float32 or float64, rows × n (a 1-D array is one row).
    #[arg(long, value_name = "FILE")]
    scores: PathBuf,

    /// How many entries each row selects (0 to n).
    #[arg(long)]
    k: usize,

    /// Entropic regularisation ε > 0.
    #[arg(long, visible_alias = "eps", allow_negative_numbers = true)]
    epsilon: f64,

    /// Select the k smallest scores instead of the largest.
    #[arg(long)]
    smallest: bool,

    /// The sorted variant: one soft one-hot per rank (see --out-ranks).
    #[arg(long)]
    sorted: bool,

    /// Cost scale: none (s = 1) or max (the row's largest cost, as in the paper's code).
    #[arg(long, default_value = "none", value_parser = PossibleValuesParser::new(["none", "max"]))]
    scale: String,

    /// Solver: auto, exact (top-k), sinkhorn, or newton (sorted).
    #[arg(
        long,
        default_value = "auto",
        value_parser = PossibleValuesParser::new(["auto", "exact", "sinkhorn", "newton"])
    )]
    solver: String,

    /// Stopping tolerance of sinkhorn and newton (marginal error, in units of 1/n).
    // Negative numbers reach the operator's own check, which says what is wrong.
    #[arg(long, allow_negative_numbers = true)]
    tolerance: Option<f64>,

    /// Iteration cap of sinkhorn and newton.
    #[arg(long)]
    max_iterations: Option<u64>,

    /// Validity mask of the scores' shape: bool, or int8/uint8 with nonzero for valid.
    #[arg(long, value_name = "FILE")]
    valid: Option<PathBuf>,

    /// Upstream gradient: ∂L/∂mask (the scores' shape) or, with --sorted, ∂L/∂ranks
    /// (rows × k × n). Needs --out-grad.
    #[arg(long, value_name = "FILE")]
    cotangent: Option<PathBuf>,

    /// Where to write the soft mask, float32, the scores' shape.
    #[arg(long, value_name = "FILE")]
    out_mask: PathBuf,

    /// Where to write the ranks (--sorted), float32, rows × k × n (k × n for 1-D scores).
    #[arg(long, value_name = "FILE")]
    out_ranks: Option<PathBuf>,

    /// Where to write ∂L/∂scores, float32, the scores' shape. Needs --cotangent.
    #[arg(long, value_name = "FILE")]
    out_grad: Option<PathBuf>,

    /// Where to write one JSON line per row: its solver report or its error.
    #[arg(long, value_name = "FILE")]
    out_report: Option<PathBuf>,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Jsonl(args) => run_jsonl(cli.backend, args),
        Command::Npy(args) => run_npy(cli.backend, *args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("soft-topk: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn start(kind: BackendKind) -> Result<Runner> {
    Runner::new(kind).with_context(|| format!("cannot start the {kind:?} backend"))
}

/// `None` for standard input/output ("-" or nothing), else the path.
fn named(path: Option<PathBuf>) -> Option<PathBuf> {
    path.filter(|p| p.as_os_str() != "-")
}

fn open_input(path: &Path) -> Result<BufReader<File>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("cannot read {}", path.display()))?;
    if meta.is_dir() {
        bail!("cannot read {}: it is a directory", path.display());
    }
    Ok(BufReader::new(file))
}

fn run_jsonl(kind: BackendKind, args: JsonlArgs) -> Result<ExitCode> {
    let (input_path, output_path) = (named(args.input), named(args.output));
    // Open the input before starting a device, so that a wrong path fails fast.
    let input: Box<dyn BufRead> = match &input_path {
        Some(path) => Box::new(open_input(path)?),
        None => Box::new(io::stdin().lock()),
    };
    let runner = start(kind)?;
    if args.max_line_bytes == 0 {
        bail!("--max-line-bytes must be at least 1");
    }
    let options = StreamOptions {
        max_line_bytes: args.max_line_bytes,
        // Someone feeding lines by hand (or a program waiting for each answer) sees each
        // answer at once; a file-to-file run keeps its buffered writes.
        flush_each_line: input_path.is_none() && output_path.is_none(),
    };
    let input_name = input_path
        .as_ref()
        .map_or("standard input".to_string(), |p| p.display().to_string());

    let summary = match &output_path {
        Some(path) => {
            let mut file = AtomicFile::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            let summary = jsonl::process_stream(input, &mut file, &runner, options)
                .with_context(|| format!("{input_name} → {}", path.display()))?;
            file.commit()
                .with_context(|| format!("cannot write {}", path.display()))?;
            summary
        }
        None => {
            let out = BufWriter::new(io::stdout().lock());
            jsonl::process_stream(input, out, &runner, options)
                .with_context(|| format!("{input_name} → standard output"))?
        }
    };
    log::info!(
        "soft-topk: {} lines on {} ({} blank, {} errors)",
        summary.lines,
        runner.name(),
        summary.blank,
        summary.errors
    );
    Ok(ExitCode::SUCCESS)
}

fn run_npy(kind: BackendKind, args: NpyArgs) -> Result<ExitCode> {
    let variant = if args.sorted {
        Variant::Sorted
    } else {
        Variant::TopK
    };
    let direction = if args.smallest {
        Direction::Smallest
    } else {
        Direction::Largest
    };
    let op = SoftTopK::new(args.k, args.epsilon)
        .variant(variant)
        .direction(direction)
        .scale(parse_scale(&args.scale)?)
        .solver(parse_solver(
            &args.solver,
            args.tolerance,
            args.max_iterations,
        )?);
    op.check(1)?;
    let job = NpyJob {
        op,
        scores: args.scores,
        valid: args.valid,
        cotangent: args.cotangent,
        out_mask: args.out_mask,
        out_ranks: args.out_ranks,
        out_grad: args.out_grad,
        out_report: args.out_report,
    };
    // Before the adapter is probed, so that a mistyped command fails at once.
    job.check()?;
    let runner = start(kind)?;
    let summary = npy::run_job(&job, &runner)?;

    if summary.row_errors.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    for (_, e) in summary.row_errors.iter().take(ROW_ERRORS_SHOWN) {
        eprintln!("soft-topk: {} ({})", e, e.kind());
    }
    eprintln!(
        "soft-topk: {} of {} rows had input errors; their outputs are 0 (see --out-report)",
        summary.row_errors.len(),
        summary.rows
    );
    Ok(ExitCode::from(EXIT_ROW_ERRORS))
}
