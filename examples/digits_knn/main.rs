//! The paper's kNN experiment at laptop scale: learn a linear embedding of the UCI handwritten
//! digits end to end through the SOFT top-k, then compare hard-kNN test accuracy in the learned
//! space with the first principal components and the raw pixels.
//!
//! ```text
//! cargo run --release --example digits_knn -- --dim 8 --k 3 --epsilon 0.05 --seed 0
//! ```
//!
//! Pictures (the loss curve, the test set in the learned space) go to `--out` (default `out/`).

mod plot;
mod train;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use soft_topk::BackendKind;

use train::{Config, Dataset, Embedding, Event, Pca, Standardiser};

/// Fraction of each class held out for testing.
const TEST_FRACTION: f64 = 0.2;

/// Learn a kNN embedding of the UCI digits through the SOFT top-k.
#[derive(Debug, Parser)]
struct Args {
    /// k of the soft top-k in training and of the hard kNN vote in testing.
    #[arg(long, default_value_t = Config::default().k)]
    k: usize,
    /// ε of the soft top-k, as a fraction of each query's mean squared distance to its
    /// candidates (the temperature is ε/2 of that).
    #[arg(long, alias = "eps", default_value_t = Config::default().epsilon)]
    epsilon: f64,
    /// Size of the learned embedding.
    #[arg(long, default_value_t = Config::default().dim)]
    dim: usize,
    #[arg(long, default_value_t = Config::default().epochs)]
    epochs: usize,
    /// Seeds the train/test split, W's start and the minibatches.
    #[arg(long, default_value_t = Config::default().seed)]
    seed: u64,
    /// Where the operator runs: auto, gpu, cpu or reference.
    #[arg(long, default_value = "auto")]
    backend: BackendKind,
    /// Queries per training step (rows of each soft top-k batch).
    #[arg(long, default_value_t = Config::default().batch_size)]
    batch_size: usize,
    /// Random training candidates per step (n of each soft top-k batch).
    #[arg(long, default_value_t = Config::default().candidates)]
    candidates: usize,
    /// Adam's initial step size.
    #[arg(long, default_value_t = Config::default().learning_rate)]
    learning_rate: f64,
    /// Directory for the PNG pictures.
    #[arg(long, default_value = "out")]
    out: PathBuf,
    /// The digits CSV (gzipped); defaults to the copy shipped in data/.
    #[arg(long)]
    data: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    let started = Instant::now();
    let cfg = Config {
        k: args.k,
        epsilon: args.epsilon,
        dim: args.dim,
        epochs: args.epochs,
        batch_size: args.batch_size,
        candidates: args.candidates,
        learning_rate: args.learning_rate,
        seed: args.seed,
        backend: args.backend,
    };

    // The data: a stratified 80/20 split, pixels standardised with the training statistics.
    let path = args.data.clone().unwrap_or_else(train::default_data_path);
    let digits = train::load_digits(&path)?;
    let (train_raw, test_raw) = train::split(&digits, TEST_FRACTION, cfg.seed);
    let standardiser = Standardiser::fit(&train_raw);
    let (train_set, test_set) = (
        standardiser.apply(&train_raw),
        standardiser.apply(&test_raw),
    );
    println!(
        "digits: {} train / {} test images of {} pixels; k = {}, ε = {}, dim = {}, \
         {} epochs of {} steps ({} queries × {} candidates), seed {}",
        train_set.len(),
        test_set.len(),
        train::PIXELS,
        cfg.k,
        cfg.epsilon,
        cfg.dim,
        cfg.epochs,
        train::steps_per_epoch(&cfg, train_set.len()),
        cfg.batch_size,
        cfg.candidates,
        cfg.seed
    );

    // Training, with a progress bar on stderr (drawn only when stderr is a terminal).
    let total_steps = (train::steps_per_epoch(&cfg, train_set.len()) * cfg.epochs) as u64;
    let bar = ProgressBar::with_draw_target(Some(total_steps), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} steps, {elapsed} (eta {eta}) {msg}")
            .context("progress bar template")?,
    );
    let train_started = Instant::now();
    let trained = train::train(&cfg, &train_set, &mut |event| match event {
        Event::Step { loss, .. } => {
            bar.set_message(format!("loss {loss:.4}"));
            bar.inc(1);
        }
        Event::Epoch { epoch, mean_loss } => bar.suspend(|| {
            println!(
                "epoch {:>3}/{}: loss {mean_loss:.4} ({:.1} s)",
                epoch + 1,
                cfg.epochs,
                train_started.elapsed().as_secs_f64()
            )
        }),
    })?;
    bar.finish_and_clear();
    let train_seconds = train_started.elapsed().as_secs_f64();
    println!("operator backend: {}", trained.backend_name);

    // Hard kNN in three spaces: the learned one, the training set's first principal
    // components (fitted on the raw pixels, the stronger PCA baseline for digits), the pixels.
    let accuracy = |tr: &[f64], te: &[f64], d: usize| {
        train::knn_accuracy(tr, &train_set.labels, te, &test_set.labels, d, cfg.k)
    };
    let embedded = |e: &Embedding, d: &Dataset| e.embed_all(d);
    let learned = accuracy(
        &embedded(&trained.embedding, &train_set),
        &embedded(&trained.embedding, &test_set),
        cfg.dim,
    );
    let initial = accuracy(
        &embedded(&trained.initial, &train_set),
        &embedded(&trained.initial, &test_set),
        cfg.dim,
    );
    let pca = Pca::fit(&train_raw.x, train::PIXELS);
    let pca_count = cfg.dim.min(train::PIXELS);
    let pca_acc = accuracy(
        &pca.project(&train_raw.x, pca_count),
        &pca.project(&test_raw.x, pca_count),
        pca_count,
    );
    let raw_acc = accuracy(&train_raw.x, &test_raw.x, train::PIXELS);

    println!();
    println!(
        "hard {}-NN test accuracy ({} test images, train set as memory)",
        cfg.k,
        test_set.len()
    );
    println!("  {:<38} {:>8}", "space", "accuracy");
    let row = |name: String, acc: f64| println!("  {name:<38} {:>7.2}%", 100.0 * acc);
    row(format!("learned W, {} dims (SOFT top-k)", cfg.dim), learned);
    row(format!("random W at start, {} dims", cfg.dim), initial);
    row(format!("PCA, first {pca_count} components"), pca_acc);
    row("raw pixels, 64 dims".into(), raw_acc);
    println!(
        "  seed {}, backend {}, training {:.1} s (soft top-k forward + backward {:.1} s), \
         total {:.1} s",
        cfg.seed,
        trained.backend_name,
        train_seconds,
        trained.operator_seconds,
        started.elapsed().as_secs_f64()
    );

    // Pictures: the loss curve, and the test set in the learned space (its own two principal
    // axes when dim > 2).
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let loss_png = args.out.join("digits_loss.png");
    plot::loss_curve(
        &loss_png,
        &trained.step_losses,
        &trained.epoch_losses,
        trained.steps_per_epoch,
    )?;
    let test_z = embedded(&trained.embedding, &test_set);
    let (points, title) = match cfg.dim {
        2 => (test_z, "TEST SET IN THE LEARNED 2-D EMBEDDING".to_string()),
        1 => (
            test_z.iter().flat_map(|&z| [z, 0.0]).collect(),
            "TEST SET IN THE LEARNED 1-D EMBEDDING".to_string(),
        ),
        d => {
            // Principal axes of the learned training embedding, so the picture is fixed by
            // the training set alone.
            let train_z = embedded(&trained.embedding, &train_set);
            let axes = Pca::fit(&train_z, d);
            (
                axes.project(&test_z, 2),
                format!("TEST SET, LEARNED {d}-D EMBEDDING, FIRST 2 PRINCIPAL AXES"),
            )
        }
    };
    let scatter_png = args.out.join("digits_embedding.png");
    plot::embedding_scatter(&scatter_png, &points, &test_set.labels, &title)?;
    println!("wrote {} and {}", loss_png.display(), scatter_png.display());
    Ok(())
}
