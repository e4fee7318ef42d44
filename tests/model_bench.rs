//! Speed of forward + backward on the tiny checkpoint (a benchmark, not a test: `#[ignore]`d, run
//! by `scripts/bench_model.sh` in release mode). Prints per-sample medians.

mod common;

use std::time::Instant;

use candle_core::{DType, Device};
use qsens::model::qwen3_vl::{ForwardOptions, Keep, LogitsMode, Qwen3VL};
use qsens::model::NoTap;

use common::qwen::{input_from_reference, reference, SAMPLES, TINY};

#[test]
#[ignore = "benchmark: run scripts/bench_model.sh"]
fn bench_tiny_forward_backward() {
    let fx = fixtures_or_skip!();
    let reps: usize = std::env::var("QSENS_BENCH_REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let model = Qwen3VL::load(&fx.join(TINY), DType::F32, &Device::Cpu).unwrap();
    let opts = ForwardOptions { logits: LogitsMode::LabelPositions, keep: Keep::Backward, trace: false };
    println!("threads: {}", candle_core::utils::get_num_threads());
    for k in 0..SAMPLES {
        let input = input_from_reference(&reference(&fx, k));
        let (mut fw, mut total) = (Vec::new(), Vec::new());
        for _ in 0..reps + 1 {
            let t0 = Instant::now();
            let fwd = model.forward(&input, &mut NoTap, &opts).unwrap();
            let t1 = Instant::now();
            model.backward(&fwd, &mut NoTap).unwrap();
            let t2 = Instant::now();
            fw.push((t1 - t0).as_secs_f64());
            total.push((t2 - t0).as_secs_f64());
        }
        // Drop the warm-up run, report medians.
        let med = |v: &mut Vec<f64>| {
            v.remove(0);
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            v[v.len() / 2]
        };
        let (f, t) = (med(&mut fw), med(&mut total));
        println!(
            "sample {k}: L={} patches={} forward {:.1} ms, forward+backward {:.1} ms",
            input.input_ids.len(),
            input.pixel_values.dim(0).unwrap(),
            f * 1e3,
            t * 1e3
        );
    }
}
