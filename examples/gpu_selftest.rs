//! GPU self-test of the fused model kernels (`kernels/{attention,norm,act}.cu`) and the
//! quantization kernels (`kernels/quant.cu`: FP8 and NVFP4 fake quantization, bit for bit against
//! the CPU, specials included; `--only quant` runs only those): every fused op on
//! CUDA against the same op on the CPU (same inputs, copied), in f32 and bf16, at the Qwen3-VL-4B
//! sizes (text L = 274, 32 query / 8 kv heads, d = 128, hidden 2560, MLP 9728; vision N = 784,
//! 16 heads, d = 64, hidden 1024, MLP 4096) plus long chunked cases; then the fused op against the
//! op chain it replaces, both on the GPU (median of 20 synchronized runs after warm-up).
//!
//! Correctness runs with every fused output poisoned (NaN bytes) before its kernel and a device
//! synchronization after every launch (a failing kernel is named). Prints one PASS/FAIL line per
//! output with max |Δ| and ‖Δ‖/‖ref‖ and the tolerance; exits 1 if anything failed.
//!
//! cargo run --release --features cuda --example gpu_selftest [-- --no-timing] [--only NAME] [--f16]
//! (`--f16` adds an f16 correctness pass, untimed; `--skip NAME` leaves out cases whose name contains
//! NAME; `--cpu-dry-run` runs the harness with the CPU standing in for the GPU, to check the cases
//! themselves on a machine without one.)
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use qsens::model::qwen3_vl::fused::{self, ScoreRows};
use qsens::model::qwen3_vl::ops::{self, AttnSpec, CausalMask};
use rand::SeedableRng;
use rand_distr::Distribution;

type Outs = candle_core::Result<Vec<Tensor>>;
type Op<'a> = Box<dyn Fn(&[Tensor]) -> Outs + 'a>;

/// The dtype an input takes in a case: the model dtype under test, or the accumulation dtype
/// (f32; lse, delta, vision cos/sin).
#[derive(Clone, Copy)]
enum In {
    Model,
    Acc,
}

/// Allowed error of CUDA vs CPU, per model dtype: `rel` bounds ‖Δ‖/‖ref‖, `max` bounds
/// max |Δ| / max |ref|.
#[derive(Clone, Copy)]
struct Tol {
    rel: f64,
    max: f64,
}

fn tol(dt: DType, attention: bool) -> Tol {
    match (dt, attention) {
        // f32: summation order only (the CPU sums in f64, the GPU in f32 lane trees) and, for the
        // attention cases, cuBLAS vs CPU-gemm accumulation over up to 4096 terms.
        (DType::F32, false) => Tol { rel: 1e-5, max: 1e-4 },
        (DType::F32, true) => Tol { rel: 3e-5, max: 3e-4 },
        // f16 stores 3 more mantissa bits than bf16: the bf16 bounds hold with room to spare.
        // bf16: one rounding flip of a stored value is 2^-8 relative; with cuBLAS vs CPU-gemm
        // score rounding in between for the attention cases.
        (_, false) => Tol { rel: 4e-3, max: 1.6e-2 },
        (_, true) => Tol { rel: 1e-2, max: 3e-2 },
    }
}

struct Case<'a> {
    name: String,
    inputs: Vec<(Tensor, In)>,
    outputs: Vec<&'static str>,
    attention: bool,
    fused: Op<'a>,
    chain: Op<'a>,
}

#[derive(Default)]
struct Report {
    pass: usize,
    fail: Vec<String>,
    timings: Vec<(String, f64, f64)>,
}

fn randn(shape: &[usize], seed: u64, std: f64, mean: f64) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| {
            let z: f64 = rand_distr::StandardNormal.sample(&mut rng);
            mean + std * z
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// (max |a − b|, ‖a − b‖ / ‖b‖, max |b|, non-finite count of a)
fn diff(a: &Tensor, b: &Tensor) -> Result<(f64, f64, f64, usize)> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let (mut mx, mut d2, mut b2, mut bmax, mut bad) = (0f64, 0f64, 0f64, 0f64, 0usize);
    for (x, y) in a.iter().zip(&b) {
        if !x.is_finite() {
            bad += 1;
            continue;
        }
        mx = mx.max((x - y).abs());
        d2 += (x - y) * (x - y);
        b2 += y * y;
        bmax = bmax.max(y.abs());
    }
    Ok((mx, (d2 / b2.max(1e-300)).sqrt(), bmax, bad))
}

fn median_ms(dev: &Device, reps: usize, f: &dyn Fn() -> Outs) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    dev.synchronize()?;
    let mut ts = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        let out = f()?;
        dev.synchronize()?;
        ts.push(t.elapsed().as_secs_f64() * 1e3);
        drop(out);
    }
    ts.sort_by(f64::total_cmp);
    Ok(ts[reps / 2])
}

fn run_case(gpu: &Device, case: &Case, dt: DType, timing: bool, rep: &mut Report) -> Result<()> {
    let label = format!("{} {:?}", case.name, dt);
    let to = |dev: &Device| -> Result<Vec<Tensor>> {
        case.inputs
            .iter()
            .map(|(t, k)| {
                let d = match k {
                    In::Model => dt,
                    In::Acc => DType::F32,
                };
                Ok(t.to_dtype(d)?.to_device(dev)?)
            })
            .collect()
    };
    let cpu_in = to(&Device::Cpu)?;
    let gpu_in = to(gpu)?;
    // Correctness: poisoned outputs, a sync + error check after every kernel.
    fused::set_debug(true, true);
    let got = (case.fused)(&gpu_in).and_then(|o| gpu.synchronize().map(|_| o));
    fused::set_debug(false, false);
    let got = match got {
        Ok(o) => o,
        Err(e) => {
            println!("[FAIL] {label}: CUDA error: {e}");
            rep.fail.push(format!("{label}: {e}"));
            return Ok(());
        }
    };
    let want = (case.fused)(&cpu_in)?;
    let t = tol(dt, case.attention);
    for ((g, w), name) in got.iter().zip(&want).zip(&case.outputs) {
        if g.dims() != w.dims() {
            println!("[FAIL] {label} {name}: shape {:?} vs CPU {:?}", g.dims(), w.dims());
            rep.fail.push(format!("{label} {name}: shape"));
            continue;
        }
        let (mx, rel, bmax, bad) = diff(g, w)?;
        let ok = bad == 0 && rel <= t.rel && mx <= t.max * bmax.max(1e-30);
        println!(
            "[{}] {label:44} {name:6} max|Δ| {mx:9.2e} (≤ {:8.2e})  rel {rel:9.2e} (≤ {:7.1e}){}",
            if ok { "PASS" } else { "FAIL" },
            t.max * bmax,
            t.rel,
            if bad > 0 { format!("  {bad} non-finite (unwritten?)") } else { String::new() },
        );
        if ok {
            rep.pass += 1;
        } else {
            rep.fail.push(format!("{label} {name}"));
        }
    }
    if timing {
        let fused_ms = median_ms(gpu, 20, &|| (case.fused)(&gpu_in))?;
        let chain_ms = median_ms(gpu, 20, &|| (case.chain)(&gpu_in))?;
        println!(
            "[time] {label:44} fused {fused_ms:8.3} ms   chain {chain_ms:8.3} ms   ({:.1}x)",
            chain_ms / fused_ms.max(1e-9)
        );
        rep.timings.push((label, fused_ms, chain_ms));
    }
    Ok(())
}

/// Per-device causal masks (acc dtype f32), built once so the timed chains don't upload them.
struct Masks {
    cpu: CausalMask,
    gpu: CausalMask,
}

impl Masks {
    fn new(heads: usize, len: usize, gpu: &Device) -> Result<Self> {
        Ok(Masks {
            cpu: CausalMask::new(heads, len, DType::F32, &Device::Cpu)?,
            gpu: CausalMask::new(heads, len, DType::F32, gpu)?,
        })
    }

    fn on(&self, t: &Tensor) -> &CausalMask {
        if t.device().is_cuda() {
            &self.gpu
        } else {
            &self.cpu
        }
    }
}

/// An attention shape; causal ones come with their masks.
struct Attn {
    name: &'static str,
    h: usize,
    hkv: usize,
    l: usize,
    d: usize,
    causal: bool,
}

/// Attention forward + backward around the fused softmax (inputs q, k, v, dO).
fn attention_case<'a>(a: &'a Attn, masks: Option<&'a Masks>, seed: u64) -> Case<'a> {
    let (h, hkv, l, d) = (a.h, a.hkv, a.l, a.d);
    let masks = if a.causal { masks } else { None };
    let spec = move |t: &Tensor| match masks {
        Some(m) => AttnSpec::causal(h / hkv, 1.0 / (d as f64).sqrt(), m.on(t)),
        None => AttnSpec::full(h / hkv, 1.0 / (d as f64).sqrt(), h, l),
    };
    let chunks = l.div_ceil(spec(&Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap()).rows);
    Case {
        name: format!(
            "attention {} L={l} H={h}/{hkv} d={d} ({chunks} chunk{})",
            a.name,
            if chunks > 1 { "s" } else { "" }
        ),
        inputs: vec![
            (randn(&[h, l, d], seed, 1.0, 0.0), In::Model),
            (randn(&[hkv, l, d], seed + 1, 1.0, 0.0), In::Model),
            (randn(&[hkv, l, d], seed + 2, 1.0, 0.0), In::Model),
            (randn(&[h, l, d], seed + 3, 1.0, 0.0), In::Model),
        ],
        outputs: vec!["o", "lse", "dq", "dk", "dv"],
        attention: true,
        fused: Box::new(move |x| {
            let sp = spec(&x[0]);
            let (o, lse) = fused::attention_forward(&x[0], &x[1], &x[2], &sp)?;
            let delta = fused::row_dot(&x[3], &o)?;
            let (dq, dk, dv) = fused::attention_backward(&x[0], &x[1], &x[2], &lse, &delta, &x[3], &sp)?;
            Ok(vec![o, lse, dq, dk, dv])
        }),
        chain: Box::new(move |x| {
            let sp = spec(&x[0]);
            let (o, lse) = ops::attention_forward(&x[0], &x[1], &x[2], &sp)?;
            let (dq, dk, dv) = ops::attention_backward(&x[0], &x[1], &x[2], &o, &lse, &x[3], &sp)?;
            Ok(vec![o, lse, dq, dk, dv])
        }),
    }
}

/// Values whose bits differ between two tensors of one shape (NaN equals NaN), after widening
/// both to f32 on the host (exact for bf16 and f16).
fn differing_bits(a: &Tensor, b: &Tensor) -> Result<usize> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(a.iter().zip(&b).filter(|(x, y)| x.to_bits() != y.to_bits() && !(x.is_nan() && y.is_nan())).count())
}

/// The quantization kernels against their CPU reference, bit for bit: normal values at three
/// magnitudes, ties and specials (±0, subnormals, ±max, ±inf, NaN) sprinkled in, rows of 2560 and
/// of 37 (a short last NVFP4 block), in f32, bf16 and f16.
fn quant_checks(gpu: &Device, rep: &mut Report) -> Result<()> {
    use qsens::quant::{fp8, nvfp4};
    let specials = [
        0.0f32,
        -0.0,
        0.25,
        -0.25,
        0.75,
        1.25,
        -1.75,
        2.5,
        3.5,
        -5.0,
        6.0,
        448.0,
        -448.0,
        1e-5,
        2e-9,
        1e-30,
        -1e-38,
        1e-45,
        f32::MAX,
        -f32::MAX,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
    ];
    for (rows, cols) in [(274usize, 2560usize), (53, 37)] {
        for (m, magnitude) in [1e-6f64, 1.0, 1e4].into_iter().enumerate() {
            let mut v = randn(&[rows, cols], 11 + m as u64, magnitude, 0.0)
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for (i, x) in specials.iter().enumerate() {
                let at = (i * 7919) % v.len();
                v[at] = *x;
            }
            let x = Tensor::from_vec(v, (rows, cols), &Device::Cpu)?;
            let amax = (3.0 * magnitude) as f32;
            for dt in [DType::F32, DType::BF16, DType::F16] {
                let xc = x.to_dtype(dt)?;
                let xg = xc.to_device(gpu)?;
                let mut check = |what: String, cpu: Tensor, cuda: Tensor| -> Result<()> {
                    let n = differing_bits(&cuda, &cpu)?;
                    if n == 0 {
                        rep.pass += 1;
                        println!("[PASS] {what}: bit-identical ({} values)", cpu.elem_count());
                    } else {
                        println!("[FAIL] {what}: {n} of {} values differ", cpu.elem_count());
                        rep.fail.push(what);
                    }
                    Ok(())
                };
                let tag = format!("[{rows}x{cols}] ~{magnitude:e} {dt:?}");
                for (name, gs) in [
                    ("amax 3·σ", nvfp4::global_scale(amax)),
                    ("amax 1e-30", nvfp4::global_scale(1e-30)),
                    ("scale 0", 0.0),
                    ("scale NaN", f32::NAN),
                ] {
                    check(
                        format!("quant nvfp4 {name} {tag}"),
                        nvfp4::fake_quant_tensor_with_global_scale(&xc, gs)?,
                        nvfp4::fake_quant_tensor_with_global_scale(&xg, gs)?,
                    )?;
                }
                check(
                    format!("quant fp8 amax 3·σ {tag}"),
                    fp8::fake_quant_tensor(&xc, amax)?,
                    fp8::fake_quant_tensor(&xg, amax)?,
                )?;
                let scale = fp8::checkpoint_scale(amax);
                check(
                    format!("quant served fp8 {tag}"),
                    fp8::fake_quant_with_scale(&xc, scale)?,
                    fp8::fake_quant_with_scale(&xg, scale)?,
                )?;
            }
        }
    }
    Ok(())
}

/// evaluate's metrics: the one-kernel CUDA path against the candle-op path on the CPU (f64 on
/// both; sums in another order, so within 1e-10 relative), counts and top-1 agreement exact;
/// identical logits give a KL of exactly 0; ties at the row maximum go to the lowest index.
fn metrics_checks(gpu: &Device, rep: &mut Report) -> Result<()> {
    use qsens::evaluate::metrics::{sample_metrics, Reference, IGNORE_INDEX};
    let (rows, vocab) = (61usize, 151_936usize);
    let mut base = randn(&[rows, vocab], 21, 3.0, 0.0).to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    // Ties at the maximum in a few rows (the lowest index must win on both paths).
    for r in [0usize, 7, 30] {
        let row = &mut base[r * vocab..(r + 1) * vocab];
        let top = row.iter().fold(f32::MIN, |m, &v| m.max(v)) + 1.0;
        row[vocab - 5] = top;
        row[1234] = top;
    }
    let noise = randn(&[rows, vocab], 22, 0.05, 0.0).to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut recipe: Vec<f32> = base.iter().zip(&noise).map(|(b, n)| b + n).collect();
    for r in [0usize, 7, 30] {
        // The same tie in the recipe: its top-1 is the lowest index too, so the rows agree.
        for i in [r * vocab + 1234, r * vocab + vocab - 5] {
            recipe[i] = base[i];
        }
    }
    let base = Tensor::from_vec(base, (rows, vocab), &Device::Cpu)?;
    let recipe = Tensor::from_vec(recipe, (rows, vocab), &Device::Cpu)?;
    let labels: Vec<i32> =
        (0..rows).map(|i| if i % 3 == 0 { IGNORE_INDEX } else { ((i * 7919) % vocab) as i32 }).collect();
    let reference = Reference::new(&base.to_device(gpu)?, &labels)?;
    let mut check = |what: &str, ok: bool, detail: String| {
        if ok {
            rep.pass += 1;
            println!("[PASS] metrics {what}: {detail}");
        } else {
            println!("[FAIL] metrics {what}: {detail}");
            rep.fail.push(format!("metrics {what}"));
        }
    };
    let cpu = sample_metrics(&base, &recipe, &labels)?;
    let gpu_m = reference.metrics(&recipe.to_device(gpu)?)?;
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-300);
    let worst = rel(gpu_m.kl_sum_all, cpu.kl_sum_all)
        .max(rel(gpu_m.kl_sum_label, cpu.kl_sum_label))
        .max(rel(gpu_m.nll_sum, cpu.nll_sum));
    let counts_equal = (gpu_m.label_tokens, gpu_m.positions, gpu_m.top1_agree_all, gpu_m.top1_agree_label)
        == (cpu.label_tokens, cpu.positions, cpu.top1_agree_all, cpu.top1_agree_label);
    check(
        "recipe vs unquantized",
        worst <= 1e-10 && counts_equal,
        format!(
            "KL {:.6e} vs {:.6e}, NLL {:.6e} vs {:.6e}, top-1 {} vs {} of {rows}, worst relative difference {worst:.1e}",
            gpu_m.kl_sum_all, cpu.kl_sum_all, gpu_m.nll_sum, cpu.nll_sum, gpu_m.top1_agree_all, cpu.top1_agree_all
        ),
    );
    let same = reference.metrics(&base.to_device(gpu)?)?;
    let cpu_same = sample_metrics(&base, &base, &labels)?;
    check(
        "identical logits",
        same.kl_sum_all == 0.0 && same.top1_agree_all == rows && rel(same.nll_sum, cpu_same.nll_sum) <= 1e-12,
        format!(
            "KL {:e}, top-1 {} of {rows}, NLL {:.12e} vs {:.12e}",
            same.kl_sum_all, same.top1_agree_all, same.nll_sum, cpu_same.nll_sum
        ),
    );
    // A recipe whose maximum moves to the other tied index of the reference's row 0 disagrees
    // there only if the lowest-index rule is kept on one side and not the other.
    let mut moved = recipe.flatten_all()?.to_vec1::<f32>()?;
    let row0_top = base.get(0)?.get(1234)?.to_scalar::<f32>()?;
    moved[vocab - 5] = row0_top + 0.5;
    let moved = Tensor::from_vec(moved, (rows, vocab), &Device::Cpu)?;
    let (g, c) = (reference.metrics(&moved.to_device(gpu)?)?, sample_metrics(&base, &moved, &labels)?);
    check(
        "top-1 ties",
        g.top1_agree_all == c.top1_agree_all && c.top1_agree_all + 1 == cpu.top1_agree_all,
        format!(
            "agreement {} (GPU) vs {} (CPU), {} before the move",
            g.top1_agree_all, c.top1_agree_all, cpu.top1_agree_all
        ),
    );

    // score-layers' kl_div (kl_fused): per packed sample, the CUDA kernel against the same op on
    // the CPU, bf16 recipe logits as the model makes them, and exactly 0 for the unquantized logits.
    // Both sum f32 exponentials in f64; they differ only by CUDA's expf (≤ 2 ulp, 1.2e-7) and the
    // order of the sums: each row's two log-sum-exps, ≤ 2.5e-7 per row.
    use qsens::score::kl::KlBase;
    let samples = vec![(0usize, 20usize), (20, 1), (21, rows - 21)];
    let base_bf16 = base.to_dtype(DType::BF16)?;
    let base_f32 = base_bf16.to_dtype(DType::F32)?;
    let recipe_bf16 = recipe.to_dtype(DType::BF16)?;
    let on_cpu = KlBase::fused(&base_f32, samples.clone())?.sample_kls(&recipe_bf16)?.to_vec1::<f64>()?;
    let on_gpu = KlBase::fused(&base_f32.to_device(gpu)?, samples.clone())?;
    let got = on_gpu.sample_kls(&recipe_bf16.to_device(gpu)?)?.to_vec1::<f64>()?;
    let worst = got.iter().zip(&on_cpu).zip(&samples).map(|((&g, &c), &(_, len))| (g - c).abs() / len as f64);
    let worst = worst.fold(0.0, f64::max);
    check(
        "kl_div fused KL per packed sample",
        worst <= 2.5e-7 && on_cpu.iter().all(|&v| v > 0.0),
        format!("{got:.6?} vs CPU {on_cpu:.6?}, worst difference per row {worst:.1e}"),
    );
    let zero = on_gpu.sample_kls(&base_bf16.to_device(gpu)?)?.to_vec1::<f64>()?;
    check("kl_div fused KL of unchanged logits", zero.iter().all(|&v| v == 0.0), format!("{zero:?}"));
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let timing = !args.iter().any(|a| a == "--no-timing");
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).cloned();
    let mut dtypes = vec![DType::F32, DType::BF16];
    if args.iter().any(|a| a == "--f16") {
        dtypes.push(DType::F16);
    }
    let skip = args.iter().position(|a| a == "--skip").and_then(|i| args.get(i + 1)).cloned();
    let gpu = if args.iter().any(|a| a == "--cpu-dry-run") {
        println!("gpu_selftest: DRY RUN, the CPU stands in for the GPU (checks the harness, not the kernels)");
        Device::Cpu
    } else {
        match Device::new_cuda(0) {
            Ok(d) => d,
            Err(e) => bail!("gpu_selftest needs a CUDA build and device (cargo ... --features cuda): {e}"),
        }
    };
    if gpu.is_cuda() {
        println!(
            "gpu_selftest: CUDA device 0; outputs poisoned with NaN before each fused kernel, sync-checked after each."
        );
    }
    println!(
        "tolerances (CUDA vs CPU, ‖Δ‖/‖ref‖ and max|Δ|/max|ref|): f32 1e-5 / 1e-4 (ops), 3e-5 / 3e-4 (attention); \
         bf16 and f16 4e-3 / 1.6e-2 (ops), 1e-2 / 3e-2 (attention)"
    );
    let mut rep = Report::default();

    // Text 4B: L = 274, 32/8 heads, d = 128, hidden 2560, MLP 9728; vision 4B: N = 784, 16 heads,
    // d = 64, hidden 1024, MLP 4096, merger 4096.
    let (tl, th, tkv, td, thid, tmlp) = (274usize, 32usize, 8usize, 128usize, 2560usize, 9728usize);
    let (vn, vh, vd, vhid, vmlp) = (784usize, 16usize, 64usize, 1024usize, 4096usize);
    let text_masks = Masks::new(th, tl, &gpu)?;
    let long_text_masks = Masks::new(th, 2048, &gpu)?;
    let odd_masks = Masks::new(4, 37, &gpu)?;
    let attn_shapes = [
        (Attn { name: "text", h: th, hkv: tkv, l: tl, d: td, causal: true }, Some(&text_masks)),
        (Attn { name: "vision", h: vh, hkv: vh, l: vn, d: vd, causal: false }, None),
        (Attn { name: "vision-long", h: vh, hkv: vh, l: 4096, d: vd, causal: false }, None),
        (Attn { name: "text-long", h: th, hkv: tkv, l: 2048, d: td, causal: true }, Some(&long_text_masks)),
        (Attn { name: "odd", h: 4, hkv: 1, l: 37, d: 32, causal: true }, Some(&odd_masks)),
    ];

    let mut cases: Vec<Case> = Vec::new();
    for (i, (a, masks)) in attn_shapes.iter().enumerate() {
        cases.push(attention_case(a, *masks, 100 + 10 * i as u64));
    }

    // Softmax forward/backward alone, on raw scores [Hkv, G·n, K] (incl. a chunk with q0 > 0).
    for (name, hkv, g, rows, k, seed) in [
        ("text", tkv, th / tkv, ScoreRows { n: tl, q0: 0, causal: true }, tl, 300u64),
        ("vision", vh, 1, ScoreRows { n: vn, q0: 0, causal: false }, vn, 310),
        ("chunk q0=256", tkv, th / tkv, ScoreRows { n: 128, q0: 256, causal: true }, 384, 320),
        ("odd", 3, 2, ScoreRows { n: 5, q0: 2, causal: true }, 7, 330),
    ] {
        let heads = hkv * g;
        let width = rows.q0 + rows.n + 3;
        let shape = [hkv, g * rows.n, k];
        let scale = 1.0 / (td as f64).sqrt();
        cases.push(Case {
            name: format!("softmax_lse {name} {shape:?}"),
            inputs: vec![(randn(&shape, seed, 8.0, 0.0), In::Model)],
            outputs: vec!["P", "lse"],
            attention: false,
            fused: Box::new(move |x| {
                let (p, l) = fused::softmax_lse(&x[0], scale, rows)?;
                Ok(vec![p, l])
            }),
            chain: Box::new(move |x| {
                let (p, l) = fused::softmax_lse_chain(&x[0], scale, rows)?;
                Ok(vec![p, l])
            }),
        });
        cases.push(Case {
            name: format!("softmax_backward {name} {shape:?}"),
            inputs: vec![
                (randn(&shape, seed + 1, 8.0, 0.0), In::Model),
                (randn(&shape, seed + 2, 1.0, 0.0), In::Model),
                (randn(&[heads, width], seed + 3, 1.0, 12.0), In::Acc),
                (randn(&[heads, width], seed + 4, 1.0, 0.0), In::Acc),
            ],
            outputs: vec!["P", "dS"],
            attention: false,
            fused: Box::new(move |x| {
                // lse/delta as narrowed [H, L] views: the kernel reads them with their row stride.
                let (l, d) = (x[2].narrow(1, 1, width - 1)?, x[3].narrow(1, 1, width - 1)?);
                let (p, ds) = fused::softmax_backward(&x[0], &x[1], &l, &d, scale, rows)?;
                Ok(vec![p, ds])
            }),
            chain: Box::new(move |x| {
                let (l, d) = (x[2].narrow(1, 1, width - 1)?, x[3].narrow(1, 1, width - 1)?);
                let (p, ds) = fused::softmax_backward_chain(&x[0], &x[1], &l, &d, scale, rows)?;
                Ok(vec![p, ds])
            }),
        });
    }

    // delta = rowsum(dO∘O) with O a transposed view, as the model passes it.
    cases.push(Case {
        name: format!("row_dot text [{th}, {tl}, {td}] (strided)"),
        inputs: vec![
            (randn(&[th, tl, td], 400, 1.0, 0.0), In::Model),
            (randn(&[tl, th, td], 401, 1.0, 0.0), In::Model),
        ],
        outputs: vec!["delta"],
        attention: false,
        fused: Box::new(|x| Ok(vec![fused::row_dot(&x[0], &x[1].transpose(0, 1)?)?])),
        chain: Box::new(|x| Ok(vec![fused::row_dot_chain(&x[0], &x[1].transpose(0, 1)?)?])),
    });

    // dO to head-major + delta in one pass, at both towers' sizes.
    for (l, heads, d, seed) in [(tl, th, td, 410u64), (vn, vh, vd, 420)] {
        cases.push(Case {
            name: format!("attention_bwd_prep [{l}, {heads}·{d}]"),
            inputs: vec![
                (randn(&[l, heads * d], seed, 1.0, 0.0), In::Model),
                (randn(&[l, heads * d], seed + 1, 1.0, 0.0), In::Model),
            ],
            outputs: vec!["dO", "delta"],
            attention: false,
            fused: Box::new(move |x| {
                let (a, b) = fused::attention_bwd_prep(&x[0], &x[1], heads)?;
                Ok(vec![a, b])
            }),
            chain: Box::new(move |x| {
                let (a, b) = fused::attention_bwd_prep_chain(&x[0], &x[1], heads)?;
                Ok(vec![a, b])
            }),
        });
    }

    // Text q/k: per-head RMSNorm + MRoPE + [H, L, d], and its backward.
    for (heads, seed) in [(th, 500u64), (tkv, 510)] {
        let ang = randn(&[tl, td / 2], seed + 9, 40.0, 0.0);
        let (c, s) = (ang.cos()?, ang.sin()?);
        cases.push(Case {
            name: format!("qk_norm_rope L={tl} H={heads} d={td}"),
            inputs: vec![
                (randn(&[tl, heads * td], seed, 3.0, 0.0), In::Model),
                (randn(&[td], seed + 1, 0.3, 1.0), In::Model),
                (c, In::Model),
                (s, In::Model),
                (randn(&[heads, tl, td], seed + 2, 1.0, 0.0), In::Model),
            ],
            outputs: vec!["out", "rstd", "dx"],
            attention: false,
            fused: Box::new(move |x| {
                let (y, r) = fused::qk_norm_rope(&x[0], &x[1], &x[2], &x[3], heads, 1e-6)?;
                let dx = fused::qk_norm_rope_backward(&x[4], &x[0], &r, &x[1], &x[2], &x[3])?;
                Ok(vec![y, r, dx])
            }),
            chain: Box::new(move |x| {
                let (y, r) = fused::qk_norm_rope_chain(&x[0], &x[1], &x[2], &x[3], heads, 1e-6)?;
                let dx = fused::qk_norm_rope_backward_chain(&x[4], &x[0], &r, &x[1], &x[2], &x[3])?;
                Ok(vec![y, r, dx])
            }),
        });
    }

    // Vision qkv split + rotary (f32 cos/sin) + [3, H, N, d], and its backward.
    for (n, seed) in [(vn, 600u64), (4096, 610)] {
        let ang = randn(&[n, vd / 2], seed + 9, 20.0, 0.0);
        let (c, s) = (ang.cos()?, ang.sin()?);
        cases.push(Case {
            name: format!("vision_qkv_rope N={n} H={vh} d={vd}"),
            inputs: vec![
                (randn(&[n, 3 * vhid], seed, 1.0, 0.0), In::Model),
                (c, In::Acc),
                (s, In::Acc),
                (randn(&[vh, n, vd], seed + 1, 1.0, 0.0), In::Model),
                (randn(&[vh, n, vd], seed + 2, 1.0, 0.0), In::Model),
                (randn(&[vh, n, vd], seed + 3, 1.0, 0.0), In::Model),
            ],
            outputs: vec!["qkv_h", "dqkv"],
            attention: false,
            fused: Box::new(move |x| {
                let y = fused::vision_qkv_rope(&x[0], &x[1], &x[2], vh)?;
                let d = fused::vision_qkv_rope_backward(&x[3], &x[4], &x[5], &x[1], &x[2])?;
                Ok(vec![y, d])
            }),
            chain: Box::new(move |x| {
                let y = fused::vision_qkv_rope_chain(&x[0], &x[1], &x[2], vh)?;
                let d = fused::vision_qkv_rope_backward_chain(&x[3], &x[4], &x[5], &x[1], &x[2])?;
                Ok(vec![y, d])
            }),
        });
    }

    // Norms: text RMSNorm rows of 2560 (block per row), vision LayerNorm 1024 and merger 4096,
    // short odd rows (warp per row); each with and without the folded residual.
    for (rows, dd, seed) in [(tl, thid, 700u64), (1000, 100, 710)] {
        for with_res in [false, true] {
            cases.push(Case {
                name: format!("rms_norm [{rows}, {dd}]{}", if with_res { " +res" } else { "" }),
                inputs: vec![
                    (randn(&[rows, dd], seed, 2.0, 0.5), In::Model),
                    (randn(&[rows, dd], seed + 1, 1.0, 0.0), In::Model),
                    (randn(&[dd], seed + 2, 0.2, 1.0), In::Model),
                    (randn(&[rows, dd], seed + 3, 1.0, 0.0), In::Model),
                ],
                outputs: if with_res {
                    vec!["y", "rstd", "dx", "dx(Σ3)", "h"]
                } else {
                    vec!["y", "rstd", "dx", "dx(Σ3)"]
                },
                attention: false,
                fused: Box::new(move |x| {
                    let res = with_res.then_some(&x[1]);
                    let (y, r, h) = fused::rms_norm(&x[0], res, &x[2], 1e-6)?;
                    let hx = h.as_ref().unwrap_or(&x[0]);
                    let dx = fused::rms_norm_backward(hx, &r, &x[2], &[&x[3]], res)?;
                    let dx3 = fused::rms_norm_backward(hx, &r, &x[2], &[&x[3], &x[1], &x[0]], res)?;
                    let mut o = vec![y, r, dx, dx3];
                    o.extend(h);
                    Ok(o)
                }),
                chain: Box::new(move |x| {
                    let res = with_res.then_some(&x[1]);
                    let (y, r, h) = fused::rms_norm_chain(&x[0], res, &x[2], 1e-6)?;
                    let hx = h.as_ref().unwrap_or(&x[0]);
                    let dx = fused::rms_norm_backward_chain(hx, &r, &x[2], &[&x[3]], res)?;
                    let dx3 = fused::rms_norm_backward_chain(hx, &r, &x[2], &[&x[3], &x[1], &x[0]], res)?;
                    let mut o = vec![y, r, dx, dx3];
                    o.extend(h);
                    Ok(o)
                }),
            });
        }
    }
    for (rows, dd, seed) in [(vn, vhid, 800u64), (vn / 4, vmlp, 810), (50, 72, 820)] {
        for with_res in [false, true] {
            cases.push(Case {
                name: format!("layer_norm [{rows}, {dd}]{}", if with_res { " +res" } else { "" }),
                inputs: vec![
                    (randn(&[rows, dd], seed, 2.0, 0.5), In::Model),
                    (randn(&[rows, dd], seed + 1, 1.0, 0.0), In::Model),
                    (randn(&[dd], seed + 2, 0.2, 1.0), In::Model),
                    (randn(&[dd], seed + 3, 0.2, 0.0), In::Model),
                    (randn(&[rows, dd], seed + 4, 1.0, 0.0), In::Model),
                ],
                outputs: if with_res { vec!["y", "mean", "rstd", "dx", "h"] } else { vec!["y", "mean", "rstd", "dx"] },
                attention: false,
                fused: Box::new(move |x| {
                    let res = with_res.then_some(&x[1]);
                    let (y, m, r, h) = fused::layer_norm(&x[0], res, &x[2], &x[3], 1e-6)?;
                    let dx = fused::layer_norm_backward(h.as_ref().unwrap_or(&x[0]), &m, &r, &x[2], &x[4], res)?;
                    let mut o = vec![y, m, r, dx];
                    o.extend(h);
                    Ok(o)
                }),
                chain: Box::new(move |x| {
                    let res = with_res.then_some(&x[1]);
                    let (y, m, r, h) = fused::layer_norm_chain(&x[0], res, &x[2], &x[3], 1e-6)?;
                    let dx = fused::layer_norm_backward_chain(h.as_ref().unwrap_or(&x[0]), &m, &r, &x[2], &x[4], res)?;
                    let mut o = vec![y, m, r, dx];
                    o.extend(h);
                    Ok(o)
                }),
            });
        }
    }

    // Activations at the MLP sizes.
    cases.push(Case {
        name: format!("gelu_tanh_backward [{vn}, {vmlp}]"),
        inputs: vec![(randn(&[vn, vmlp], 900, 2.0, 0.0), In::Model), (randn(&[vn, vmlp], 901, 1.0, 0.0), In::Model)],
        outputs: vec!["dx"],
        attention: false,
        fused: Box::new(|x| Ok(vec![fused::gelu_tanh_backward(&x[0], &x[1])?])),
        chain: Box::new(|x| Ok(vec![ops::gelu_tanh_backward(&x[0], &x[1])?])),
    });
    cases.push(Case {
        name: format!("gelu_erf_backward [{}, {vmlp}]", vn / 4),
        inputs: vec![
            (randn(&[vn / 4, vmlp], 910, 2.0, 0.0), In::Model),
            (randn(&[vn / 4, vmlp], 911, 1.0, 0.0), In::Model),
        ],
        outputs: vec!["dx"],
        attention: false,
        fused: Box::new(|x| Ok(vec![fused::gelu_erf_backward(&x[0], &x[1])?])),
        chain: Box::new(|x| Ok(vec![ops::gelu_erf_backward(&x[0], &x[1])?])),
    });
    cases.push(Case {
        name: format!("swiglu fwd+bwd [{tl}, {tmlp}]"),
        inputs: vec![
            (randn(&[tl, tmlp], 920, 2.0, 0.0), In::Model),
            (randn(&[tl, tmlp], 921, 1.0, 0.0), In::Model),
            (randn(&[tl, tmlp], 922, 1.0, 0.0), In::Model),
        ],
        outputs: vec!["out", "dg", "du"],
        attention: false,
        fused: Box::new(|x| {
            let (dg, du) = fused::swiglu_backward(&x[0], &x[1], &x[2])?;
            Ok(vec![fused::swiglu(&x[0], &x[1])?, dg, du])
        }),
        chain: Box::new(|x| {
            let (dg, du) = ops::swiglu_backward(&x[0], &x[1], &x[2])?;
            Ok(vec![ops::swiglu(&x[0], &x[1])?, dg, du])
        }),
    });

    // Whole attention cores as the model runs them per layer (projection outputs → o_proj input
    // and back), the units of profile_scoring's "attention" segments.
    let tang = randn(&[tl, td / 2], 1001, 40.0, 0.0);
    let (tc, ts) = (tang.cos()?, tang.sin()?);
    let tm = &text_masks;
    let text_core = move |x: &[Tensor], fuse: bool| -> Outs {
        // x: q [L, H·d], k, v [L, Hkv·d], q/k norm weights, cos, sin, dattn [L, H·d]
        let spec = AttnSpec::causal(th / tkv, 1.0 / (td as f64).sqrt(), tm.on(&x[0]));
        let v_h = x[2].reshape((tl, tkv, td))?.transpose(0, 1)?.contiguous()?;
        let (qr, qs, kr, ks, o, lse);
        if fuse {
            (qr, qs) = fused::qk_norm_rope(&x[0], &x[3], &x[5], &x[6], th, 1e-6)?;
            (kr, ks) = fused::qk_norm_rope(&x[1], &x[4], &x[5], &x[6], tkv, 1e-6)?;
            (o, lse) = fused::attention_forward(&qr, &kr, &v_h, &spec)?;
        } else {
            (qr, qs) = fused::qk_norm_rope_chain(&x[0], &x[3], &x[5], &x[6], th, 1e-6)?;
            (kr, ks) = fused::qk_norm_rope_chain(&x[1], &x[4], &x[5], &x[6], tkv, 1e-6)?;
            (o, lse) = ops::attention_forward(&qr, &kr, &v_h, &spec)?;
        }
        let attn = o.transpose(0, 1)?.contiguous()?.reshape((tl, th * td))?;
        let (dq, dk, dv) = if fuse {
            let (do_, delta) = fused::attention_bwd_prep(&x[7], &attn, th)?;
            let (dq, dk, dv) = fused::attention_backward(&qr, &kr, &v_h, &lse, &delta, &do_, &spec)?;
            let dq = fused::qk_norm_rope_backward(&dq, &x[0], &qs, &x[3], &x[5], &x[6])?;
            let dk = fused::qk_norm_rope_backward(&dk, &x[1], &ks, &x[4], &x[5], &x[6])?;
            (dq, dk, dv)
        } else {
            let do_ = x[7].reshape((tl, th, td))?.transpose(0, 1)?.contiguous()?;
            let o = attn.reshape((tl, th, td))?.transpose(0, 1)?.contiguous()?;
            let (dq, dk, dv) = ops::attention_backward(&qr, &kr, &v_h, &o, &lse, &do_, &spec)?;
            let dq = fused::qk_norm_rope_backward_chain(&dq, &x[0], &qs, &x[3], &x[5], &x[6])?;
            let dk = fused::qk_norm_rope_backward_chain(&dk, &x[1], &ks, &x[4], &x[5], &x[6])?;
            (dq, dk, dv)
        };
        let dv = dv.transpose(0, 1)?.contiguous()?.reshape((tl, tkv * td))?;
        Ok(vec![attn, dq, dk, dv])
    };
    let text_core_inputs = vec![
        (randn(&[tl, th * td], 1002, 3.0, 0.0), In::Model),
        (randn(&[tl, tkv * td], 1003, 3.0, 0.0), In::Model),
        (randn(&[tl, tkv * td], 1004, 1.0, 0.0), In::Model),
        (randn(&[td], 1005, 0.3, 1.0), In::Model),
        (randn(&[td], 1006, 0.3, 1.0), In::Model),
        (tc, In::Model),
        (ts, In::Model),
        (randn(&[tl, th * td], 1007, 1.0, 0.0), In::Model),
    ];
    // Forward-only and forward+backward variants, to split the estimate.
    cases.push(Case {
        name: format!("text attention core fwd (L={tl})"),
        inputs: text_core_inputs.clone(),
        outputs: vec!["attn"],
        attention: true,
        fused: Box::new(move |x| Ok(vec![text_core(x, true)?.swap_remove(0)])),
        chain: Box::new(move |x| Ok(vec![text_core(x, false)?.swap_remove(0)])),
    });
    cases.push(Case {
        name: format!("text attention core fwd+bwd (L={tl})"),
        inputs: text_core_inputs,
        outputs: vec!["attn", "dq", "dk", "dv"],
        attention: true,
        fused: Box::new(move |x| text_core(x, true)),
        chain: Box::new(move |x| text_core(x, false)),
    });
    let vang = randn(&[vn, vd / 4], 1101, 20.0, 0.0);
    let vang = Tensor::cat(&[&vang, &vang.affine(0.5, 0.0)?], 1)?; // [N, d/2] like the 2-D table
    let (vc, vs) = (vang.cos()?, vang.sin()?);
    let vision_core = move |x: &[Tensor], fuse: bool| -> Outs {
        // x: qkv [N, 3·hidden], cos, sin (acc), dattn [N, hidden]
        let spec = AttnSpec::full(1, 1.0 / (vd as f64).sqrt(), vh, vn);
        let qkv_h = if fuse {
            fused::vision_qkv_rope(&x[0], &x[1], &x[2], vh)?
        } else {
            fused::vision_qkv_rope_chain(&x[0], &x[1], &x[2], vh)?
        };
        let (q, k, v) = (qkv_h.get(0)?, qkv_h.get(1)?, qkv_h.get(2)?);
        let (o, lse) = if fuse {
            fused::attention_forward(&q, &k, &v, &spec)?
        } else {
            ops::attention_forward(&q, &k, &v, &spec)?
        };
        let attn = o.transpose(0, 1)?.contiguous()?.reshape((vn, vhid))?;
        let dqkv = if fuse {
            let (do_, delta) = fused::attention_bwd_prep(&x[3], &attn, vh)?;
            let (dq, dk, dv) = fused::attention_backward(&q, &k, &v, &lse, &delta, &do_, &spec)?;
            fused::vision_qkv_rope_backward(&dq, &dk, &dv, &x[1], &x[2])?
        } else {
            let do_ = x[3].reshape((vn, vh, vd))?.transpose(0, 1)?.contiguous()?;
            let o = attn.reshape((vn, vh, vd))?.transpose(0, 1)?.contiguous()?;
            let (dq, dk, dv) = ops::attention_backward(&q, &k, &v, &o, &lse, &do_, &spec)?;
            fused::vision_qkv_rope_backward_chain(&dq, &dk, &dv, &x[1], &x[2])?
        };
        Ok(vec![attn, dqkv])
    };
    let vision_core_inputs = vec![
        (randn(&[vn, 3 * vhid], 1102, 1.0, 0.0), In::Model),
        (vc, In::Acc),
        (vs, In::Acc),
        (randn(&[vn, vhid], 1103, 1.0, 0.0), In::Model),
    ];
    cases.push(Case {
        name: format!("vision attention core fwd (N={vn})"),
        inputs: vision_core_inputs.clone(),
        outputs: vec!["attn"],
        attention: true,
        fused: Box::new(move |x| Ok(vec![vision_core(x, true)?.swap_remove(0)])),
        chain: Box::new(move |x| Ok(vec![vision_core(x, false)?.swap_remove(0)])),
    });
    cases.push(Case {
        name: format!("vision attention core fwd+bwd (N={vn})"),
        inputs: vision_core_inputs,
        outputs: vec!["attn", "dqkv"],
        attention: true,
        fused: Box::new(move |x| vision_core(x, true)),
        chain: Box::new(move |x| vision_core(x, false)),
    });

    for case in &cases {
        if only.as_ref().is_some_and(|o| !case.name.contains(o.as_str()))
            || skip.as_ref().is_some_and(|k| case.name.contains(k.as_str()))
        {
            continue;
        }
        for dt in dtypes.iter().copied() {
            // Timings in f32 and bf16 only.
            let timed = timing && dt != DType::F16;
            if let Err(e) = run_case(&gpu, case, dt, timed, &mut rep) {
                println!("[FAIL] {} {dt:?}: {e}", case.name);
                rep.fail.push(format!("{} {dt:?}: {e}", case.name));
            }
        }
    }

    if only.as_ref().is_none_or(|o| "quant".contains(o.as_str())) && skip.as_deref() != Some("quant") {
        quant_checks(&gpu, &mut rep)?;
    }
    if only.as_ref().is_none_or(|o| "metrics".contains(o.as_str())) && skip.as_deref() != Some("metrics") {
        metrics_checks(&gpu, &mut rep)?;
    }

    if timing && !rep.timings.is_empty() {
        println!("\ntimings (GPU, median of 20, ms): fused vs the op chain it replaces");
        for (name, f, c) in &rep.timings {
            println!("  {name:48} {f:8.3} {c:8.3}  {:6.1}x", c / f.max(1e-9));
        }
        // Per-model estimate from the per-layer cores (36 text layers, 24 vision blocks).
        let find = |k: &str| rep.timings.iter().find(|(n, _, _)| n.starts_with(k) && n.ends_with("BF16"));
        if let (Some(tf), Some(tb), Some(vf), Some(vb)) = (
            find("text attention core fwd (L"),
            find("text attention core fwd+bwd"),
            find("vision attention core fwd (N"),
            find("vision attention core fwd+bwd"),
        ) {
            println!(
                "\nbf16 attention cores per sample (36 text layers, 24 vision blocks): forward {:.1} → {:.1} ms, \
                 forward+backward {:.1} → {:.1} ms",
                36.0 * tf.2 + 24.0 * vf.2,
                36.0 * tf.1 + 24.0 * vf.1,
                36.0 * tb.2 + 24.0 * vb.2,
                36.0 * tb.1 + 24.0 * vb.1,
            );
        }
    }
    println!("\n{} checks passed, {} failed", rep.pass, rep.fail.len());
    for f in &rep.fail {
        println!("  FAILED: {f}");
    }
    if !rep.fail.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
