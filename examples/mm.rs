use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() -> candle_core::Result<()> {
    let d = Device::Cpu;
    for (n, k, o) in [
        (128usize, 576usize, 1536usize),
        (128, 1536, 576),
        (128, 576, 576),
        (1, 576, 1536),
        (8, 576, 1536),
    ] {
        let x = Tensor::randn(0f32, 1., (n, k), &d)?;
        let w = Tensor::randn(0f32, 1., (o, k), &d)?;
        let wt = w.t()?.contiguous()?;
        let reps = if n == 1 { 2000 } else { 50 };
        for (name, f) in [("x@w.t()", 0), ("x@wt", 1)] {
            let t = Instant::now();
            for _ in 0..reps {
                let _ = if f == 0 {
                    x.matmul(&w.t()?)?
                } else {
                    x.matmul(&wt)?
                };
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "{n}x{k}x{o} {name}: {:.3} ms  {:.1} GFLOP/s",
                s * 1e3,
                2.0 * (n * k * o) as f64 / s / 1e9
            );
        }
    }
    Ok(())
}
