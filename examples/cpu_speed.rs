//! Timing of the fast CPU backend's exact top-k (largest, k = n/10, ε = 0.01, uniform scores):
//! the median forward, backward alone, and forward + backward over warm runs, the worst mask
//! error against the f64 reference, and the count of non-finite gradient entries. A quicker
//! loop than the bench report for work on the CPU kernels.
//!
//! ```text
//! cargo run --release --example cpu_speed                     # the four sizes of the report
//! cargo run --release --example cpu_speed -- 256 4096 50      # rows, n, repeats
//! ```

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use soft_topk::cpu::CpuBackend;
use soft_topk::reference::Reference;
use soft_topk::{Backend, Batch, Cotangent, SoftTopK};

#[path = "support/timing.rs"]
mod timing;

fn measure(rows: usize, n: usize, repeats: usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(2020);
    let x: Vec<f32> = (0..rows * n).map(|_| rng.random::<f32>()).collect();
    let g: Vec<f32> = (0..rows * n).map(|_| rng.random::<f32>() - 0.5).collect();
    let batch = Batch::new(&x, rows, n).expect("batch");
    let op = SoftTopK::new(n / 10, 0.01);
    let cpu = CpuBackend::new();
    let exact = Reference.forward(&op, &batch).expect("reference forward");
    let fwd_s =
        timing::median_seconds(repeats, || drop(cpu.forward(&op, &batch).expect("forward")));
    let fwd_bwd_s = timing::median_seconds(repeats, || {
        let out = cpu.forward(&op, &batch).expect("forward");
        drop(
            cpu.backward(&op, &batch, &out, Cotangent::Mask(&g))
                .expect("backward"),
        );
    });
    let out = cpu.forward(&op, &batch).expect("forward");
    let bwd_s = timing::median_seconds(repeats, || {
        drop(
            cpu.backward(&op, &batch, &out, Cotangent::Mask(&g))
                .expect("backward"),
        );
    });
    let grad = cpu
        .backward(&op, &batch, &out, Cotangent::Mask(&g))
        .expect("backward");
    let mask_error = out
        .mask
        .iter()
        .zip(&exact.mask)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let non_finite = grad.iter().filter(|v| !v.is_finite()).count();
    let steps: u32 = out.reports.iter().map(|r| r.iterations).max().unwrap_or(0);
    println!(
        "{rows:>4} x {n:>6}: forward {:7.3} ms  backward {:7.3} ms  fwd+bwd {:7.3} ms  \
         mask err {mask_error:.2e}  non-finite {non_finite}  max steps {steps}",
        fwd_s * 1e3,
        bwd_s * 1e3,
        fwd_bwd_s * 1e3
    );
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("rows n repeats"))
        .collect();
    if let [rows, n, repeats] = args[..] {
        measure(rows, n, repeats);
        return;
    }
    for (rows, n, repeats) in [
        (1, 1000, 201),
        (64, 1000, 101),
        (256, 4096, 31),
        (16, 65536, 31),
    ] {
        measure(rows, n, repeats);
    }
}
