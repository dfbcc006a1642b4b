//! The `digits_knn` example's training logic: a short run must lower the loss, and the
//! hand-written gradient through the distances must match central differences.

#[path = "../examples/digits_knn/train.rs"]
mod train;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use soft_topk::BackendKind;
use train::{Config, Dataset, Embedding, OperatorMask, ReferenceMask, SoftMask};

/// How much a short training must lower the held-out minibatch loss (which lies in [−1, 0]):
/// with the settings below a random 8-D map scores about −0.35 and three epochs reach about
/// −0.79, so a run that learns nothing, or climbs, fails by a wide margin.
const MIN_LOSS_DROP: f64 = 0.05;

/// Central differences of an f64 loss with step 1e-5 carry truncation error ~1e-10 relative
/// and rounding ~1e-11; 1e-6 leaves room and still catches any wrong term.
const GRAD_REL_TOL: f64 = 1e-6;

/// The f32 operator path against the f64 one on the same problem: f32 rounding of scores and
/// masks (~1e-7 relative) amplified by the operator's 2/ε factor and the sums into W.
const F32_REL_TOL: f64 = 1e-3;

/// The standardised training set of the default split.
fn digits_train_set(seed: u64) -> Dataset {
    let digits = train::load_digits(&train::default_data_path()).expect("shipped digits load");
    let (train_raw, _) = train::split(&digits, 0.2, seed);
    train::Standardiser::fit(&train_raw).apply(&train_raw)
}

#[test]
fn digits_data_has_the_documented_shape() {
    let digits = train::load_digits(&train::default_data_path()).expect("shipped digits load");
    assert_eq!(digits.len(), 1797, "1,797 images");
    assert_eq!(digits.x.len(), 1797 * 64, "64 pixels each");
    let mut counts = [0usize; train::CLASSES];
    digits.labels.iter().for_each(|&l| counts[l] += 1);
    assert!(
        counts.iter().all(|&c| c > 150),
        "every class present: {counts:?}"
    );

    // The split is stratified, disjoint and complete.
    let (tr, te) = train::split(&digits, 0.2, 7);
    assert_eq!(tr.len() + te.len(), digits.len());
    assert!(
        (te.len() as f64 - 0.2 * 1797.0).abs() < 10.0,
        "test size {}",
        te.len()
    );
}

#[test]
fn short_training_lowers_the_loss() {
    let seed = 3;
    let train_set = digits_train_set(seed);
    let cfg = Config {
        k: 5,
        epsilon: 0.2,
        epochs: 3,
        candidates: 64,
        batch_size: 64,
        seed,
        backend: BackendKind::Cpu,
        ..Config::default()
    };

    // A fixed held-out minibatch: 200 queries against 128 candidates, scored on the f64
    // reference so both losses are measured the same way.
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let queries: Vec<usize> = (0..200)
        .map(|_| rng.random_range(0..train_set.len()))
        .collect();
    let candidates = rand::seq::index::sample(&mut rng, train_set.len(), 128).into_vec();
    let eval = |emb: &Embedding| {
        let mut soft = ReferenceMask::new(cfg.k, cfg.epsilon);
        train::loss_and_grad(
            emb,
            &train_set,
            &queries,
            &candidates,
            cfg.k,
            &mut soft,
            false,
        )
        .expect("evaluation loss")
        .0
    };

    let mut steps = 0;
    let trained = train::train(&cfg, &train_set, &mut |e| {
        if let train::Event::Step { .. } = e {
            steps += 1
        }
    })
    .expect("training runs");
    assert_eq!(
        steps,
        cfg.epochs * train::steps_per_epoch(&cfg, train_set.len())
    );

    let (before, after) = (eval(&trained.initial), eval(&trained.embedding));
    println!(
        "held-out loss {before:.4} -> {after:.4}; epochs {:?}",
        trained.epoch_losses
    );
    assert!(
        after < before - MIN_LOSS_DROP,
        "loss went from {before:.4} to {after:.4}, wanted a drop of at least {MIN_LOSS_DROP}"
    );
    let (first, last) = (
        trained.epoch_losses[0],
        trained.epoch_losses[cfg.epochs - 1],
    );
    assert!(last < first, "epoch loss went from {first:.4} to {last:.4}");
}

/// A tiny problem with overlapping query and candidate sets, so the self-exclusion is on
/// the path: 10 points of 5 features in 3 classes, a 3-D embedding.
fn tiny_problem() -> (Dataset, Embedding, Vec<usize>, Vec<usize>) {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (n, features, dim) = (10, 5, 3);
    let data = Dataset {
        features,
        x: (0..n * features)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect(),
        labels: (0..n).map(|i| i % 3).collect(),
    };
    let emb = Embedding::random(dim, features, &mut rng);
    (data, emb, vec![0, 1, 2, 3, 4], vec![2, 3, 4, 5, 6, 7, 8, 9])
}

const TINY_K: usize = 3;
/// Soft enough that no mask entry saturates, so every entry of W has a visible gradient.
const TINY_EPSILON: f64 = 0.5;

fn tiny_loss(data: &Dataset, emb: &Embedding, q: &[usize], c: &[usize]) -> f64 {
    let mut soft = ReferenceMask::new(TINY_K, TINY_EPSILON);
    train::loss_and_grad(emb, data, q, c, TINY_K, &mut soft, false)
        .expect("tiny loss")
        .0
}

#[test]
fn gradient_through_distances_matches_central_differences() {
    let (data, emb, queries, candidates) = tiny_problem();
    let mut soft = ReferenceMask::new(TINY_K, TINY_EPSILON);
    let (_, grad) =
        train::loss_and_grad(&emb, &data, &queries, &candidates, TINY_K, &mut soft, true)
            .expect("tiny gradient");
    let grad = grad.expect("asked for the gradient");

    // Every entry of W, then a random direction through all of them at once.
    const STEP: f64 = 1e-5;
    let scale = grad.iter().fold(0.0f64, |m, g| m.max(g.abs()));
    assert!(scale > 1e-4, "gradient too small to test: {scale:e}");
    let (mut worst, mut worst_at) = (0.0f64, 0usize);
    for (i, &analytic) in grad.iter().enumerate() {
        let (mut plus, mut minus) = (emb.clone(), emb.clone());
        plus.w[i] += STEP;
        minus.w[i] -= STEP;
        let numeric = (tiny_loss(&data, &plus, &queries, &candidates)
            - tiny_loss(&data, &minus, &queries, &candidates))
            / (2.0 * STEP);
        let err = (numeric - analytic).abs() / scale;
        if err > worst {
            (worst, worst_at) = (err, i);
        }
    }
    assert!(
        worst < GRAD_REL_TOL,
        "worst entry W[{worst_at}]: relative error {worst:e} (analytic {})",
        grad[worst_at]
    );

    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let direction: Vec<f64> = (0..emb.w.len())
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let moved = |t: f64| {
        let mut e = emb.clone();
        e.w.iter_mut()
            .zip(&direction)
            .for_each(|(w, d)| *w += t * d);
        e
    };
    let numeric = (tiny_loss(&data, &moved(STEP), &queries, &candidates)
        - tiny_loss(&data, &moved(-STEP), &queries, &candidates))
        / (2.0 * STEP);
    let analytic: f64 = grad.iter().zip(&direction).map(|(g, d)| g * d).sum();
    let err = (numeric - analytic).abs() / analytic.abs().max(scale);
    assert!(
        err < GRAD_REL_TOL,
        "directional derivative: numeric {numeric:e}, analytic {analytic:e}, rel error {err:e}"
    );
}

#[test]
fn operator_path_matches_the_f64_reference_path() {
    let (data, emb, queries, candidates) = tiny_problem();
    let run = |soft: &mut dyn SoftMask| {
        train::loss_and_grad(&emb, &data, &queries, &candidates, TINY_K, soft, true)
            .expect("tiny gradient")
    };
    let (loss64, grad64) = run(&mut ReferenceMask::new(TINY_K, TINY_EPSILON));
    let mut op = OperatorMask::new(TINY_K, TINY_EPSILON, BackendKind::Cpu).expect("cpu backend");
    let (loss32, grad32) = run(&mut op);
    let (grad64, grad32) = (grad64.expect("gradient"), grad32.expect("gradient"));

    assert!(
        (loss64 - loss32).abs() < F32_REL_TOL * loss64.abs(),
        "loss: f64 {loss64}, operator {loss32}"
    );
    let scale = grad64.iter().fold(0.0f64, |m, g| m.max(g.abs()));
    let (worst_at, worst) = grad64
        .iter()
        .zip(&grad32)
        .map(|(a, b)| (a - b).abs() / scale)
        .enumerate()
        .fold(
            (0, 0.0f64),
            |best, (i, e)| if e > best.1 { (i, e) } else { best },
        );
    assert!(
        worst < F32_REL_TOL,
        "worst entry W[{worst_at}]: f64 {}, operator {}, relative error {worst:e}",
        grad64[worst_at],
        grad32[worst_at]
    );
}

#[test]
fn jacobi_eigen_decomposition_reconstructs_its_matrix() {
    // A v = λ v for every pair, on a random symmetric matrix; f64 rounding of a 12 × 12
    // problem stays near 1e-14 relative.
    const EIGEN_TOL: f64 = 1e-10;
    let m = 12;
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut a = vec![0.0; m * m];
    for i in 0..m {
        for j in 0..=i {
            let v: f64 = rng.random_range(-1.0..1.0);
            a[i * m + j] = v;
            a[j * m + i] = v;
        }
    }
    let (values, vectors) = train::symmetric_eigen(&a, m);
    for (c, &lambda) in values.iter().enumerate() {
        for i in 0..m {
            let av: f64 = (0..m).map(|j| a[i * m + j] * vectors[j * m + c]).sum();
            let err = (av - lambda * vectors[i * m + c]).abs();
            assert!(err < EIGEN_TOL, "pair {c}, row {i}: |Av − λv| = {err:e}");
        }
    }
}

#[test]
fn knn_vote_takes_the_majority_and_breaks_ties_by_the_nearest() {
    // 1-D memory: class 0 at 0, 0.1; class 1 at 1, 1.1, 1.2.
    let memory = [0.0, 0.1, 1.0, 1.1, 1.2];
    let labels = [0, 0, 1, 1, 1];
    // k = 3 at 0.2: neighbours 0.1, 0.0 (class 0) and 1.0 (class 1): majority 0.
    // k = 2 at 0.6: neighbours 1.0 (class 1, nearer) and 0.1 (class 0): a tie goes to 1.
    assert_eq!(
        train::knn_accuracy(&memory, &labels, &[0.2], &[0], 1, 3),
        1.0
    );
    assert_eq!(
        train::knn_accuracy(&memory, &labels, &[0.6], &[1], 1, 2),
        1.0
    );
    assert_eq!(
        train::knn_accuracy(&memory, &labels, &[0.6], &[0], 1, 2),
        0.0
    );
}
