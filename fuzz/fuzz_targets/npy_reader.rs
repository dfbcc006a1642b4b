//! Arbitrary bytes as a `.npy` file: an array whose values fill its shape, or a typed error,
//! with no allocation beyond what the bytes can hold. A small float array read this way is
//! also run through the CPU backend, as the tool's npy mode would.
#![no_main]

#[path = "../checks.rs"]
mod checks;

use libfuzzer_sys::fuzz_target;
use soft_topk::cpu::CpuBackend;
use soft_topk::io::npy::Values;
use soft_topk::{Backend, Batch, SoftTopK};

/// Arrays up to this many values are also solved.
const MAX_SOLVED: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some(array) = checks::check_npy(data) else {
        return;
    };

    let Values::F32(scores) = &array.values else {
        return;
    };
    let n = array.shape.last().copied().unwrap_or(1);
    if n == 0 || scores.len() > MAX_SOLVED {
        return;
    }
    let rows = scores.len() / n;
    let batch = Batch::new(scores, rows, n).expect("the shape fits the values");
    let op = SoftTopK::new(n / 2, 0.1);
    let fwd = CpuBackend::new().forward(&op, &batch).expect("a valid op");
    for (r, report) in fwd.reports.iter().enumerate() {
        let mask = fwd.mask_row(r);
        assert!(
            mask.iter().all(|m| (0.0..=1.0).contains(m)),
            "row {r}: mask leaves [0, 1] ({report:?})"
        );
    }
});
