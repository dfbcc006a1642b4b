//! Batches built from arbitrary bytes: shapes that may not fit, arbitrary f32 bit patterns,
//! per-row k, a validity mask, any ε; the forward and backward on the CPU backend and the
//! reference. Each call is a result or a typed error; every result keeps the invariants, and
//! top-k on the CPU matches the reference.
#![no_main]

use libfuzzer_sys::fuzz_target;
use soft_topk::cpu::CpuBackend;
use soft_topk::reference::Reference;
use soft_topk::{Backend, Batch, Cotangent, Direction, Scale, SoftTopK, Variant};

/// Rows are solved whole; larger problems only go through the constructors.
const MAX_VALUES: usize = 256;
/// f32 top-k against the f64 reference (see tests/extremes.rs, with room for fuzzed inputs).
const MASK_TOLERANCE: f32 = 1e-3;

/// A cursor over the fuzzer's bytes that reads zeros once they run out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let m = N.min(self.0.len());
        out[..m].copy_from_slice(&self.0[..m]);
        self.0 = &self.0[m..];
        out
    }

    fn byte(&mut self) -> u8 {
        self.take::<1>()[0]
    }
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let rows = usize::from(b.byte() % 6);
    let n = usize::from(b.byte() % 20);
    let flags = b.byte();
    let k = usize::from(b.byte() % 24);
    let epsilon = match flags & 3 {
        0 => f64::from_le_bytes(b.take::<8>()),
        1 => f64::from(f32::from_le_bytes(b.take::<4>())).abs(),
        _ => [1e-30, 1e-3, 0.1, 1.0, 1e30][usize::from(b.byte() % 5)],
    };
    let variant = if flags & 4 != 0 {
        Variant::Sorted
    } else {
        Variant::TopK
    };
    let direction = if flags & 8 != 0 {
        Direction::Smallest
    } else {
        Direction::Largest
    };
    let scale = if flags & 16 != 0 {
        Scale::Max
    } else {
        Scale::None
    };
    // Lengths off by one on purpose now and then.
    let fudge = |len: usize, bit: u8| if flags & bit != 0 { len + 1 } else { len };
    let ks: Vec<usize> = (0..fudge(rows, 32))
        .map(|_| usize::from(b.byte() % 24))
        .collect();
    let scores: Vec<f32> =
        b.0.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .take(MAX_VALUES)
            .collect();
    let valid: Vec<bool> = scores.iter().map(|x| x.to_bits() & 0x10 == 0).collect();

    let mut op = SoftTopK::new(k, epsilon)
        .variant(variant)
        .direction(direction)
        .scale(scale);
    if flags & 64 != 0 {
        op = op.per_row_k(ks);
    }
    let Ok(mut batch) = Batch::new(&scores, rows, n) else {
        return;
    };
    if flags & 128 != 0 {
        batch = match batch.with_valid(&valid) {
            Ok(b) => b,
            Err(_) => return,
        };
    }

    let reference = Reference.forward(&op, &batch);
    let cpu = CpuBackend::new().forward(&op, &batch);
    let (reference, cpu) = match (reference, cpu) {
        (Err(a), Err(b)) => {
            assert_eq!(a.kind(), b.kind());
            return;
        }
        (Ok(a), Ok(b)) => (a, b),
        (a, b) => panic!("backends disagree on the call: {a:?} vs {b:?}"),
    };
    for r in 0..rows {
        let (mask, want) = (cpu.mask_row(r), reference.mask_row(r));
        assert_eq!(
            cpu.reports[r].error.is_some(),
            reference.reports[r].error.is_some()
        );
        assert!(
            mask.iter().all(|m| (0.0..=1.0).contains(m)),
            "row {r}: {mask:?}"
        );
        let worst = mask
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            worst <= MASK_TOLERANCE,
            "row {r}: {mask:?} vs reference {want:?}"
        );
    }

    let g: Vec<f32> = scores
        .iter()
        .map(|x| {
            if x.is_finite() {
                x.clamp(-1.0, 1.0)
            } else {
                0.5
            }
        })
        .collect();
    let grad = CpuBackend::new().backward(&op, &batch, &cpu, Cotangent::Mask(&g));
    let grad = grad.expect("a fitting backward call");
    assert!(grad.iter().all(|d| !d.is_nan()), "NaN gradient: {grad:?}");
});
