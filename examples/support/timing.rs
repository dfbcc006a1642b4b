//! The timing rule the examples share: one warm-up call, then the median of warm runs.

use std::time::Instant;

/// Median wall-clock seconds of `repeats` calls of `run`, after one call to warm up
/// pipelines, buffers and caches.
pub fn median_seconds(repeats: usize, mut run: impl FnMut()) -> f64 {
    run();
    let mut times: Vec<f64> = (0..repeats.max(1))
        .map(|_| {
            let start = Instant::now();
            run();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}
