//! `evaluate`: measured loss, KL and top-1 agreement of quantization recipes (see `qsens::evaluate`).
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use qsens::cli::{self, CommonArgs};
use qsens::evaluate::{self, EvaluateArgs};
use qsens::search::confidence::Bootstrap;

/// Measures what quantization recipes do to the model's outputs on held-out samples: loss,
/// KL(unquantized ‖ recipe) and top-1 agreement per sample and overall, with bootstrap intervals,
/// beside the objective `search` predicted. The unquantized model and, with a manifest, every
/// searchable group at its fewest-bits format are always measured.
#[derive(Debug, Parser)]
#[command(
    name = "evaluate",
    version,
    max_term_width = 98,
    after_long_help = "Each recipe runs as the checkpoint `quantize` writes for it computes: FP8 weights \
                       dequantized from E4M3 with their scale, inputs quantized with their static scale. \
                       Artifacts: see docs/artifacts.md. Exit status: 0 ok, 2 error."
)]
struct Args {
    /// The unquantized HF checkpoint directory.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Held-out `qsens.model-inputs` (e.g. from `calib-extract --exclude <calibration>`; `-` = stdin).
    #[arg(long, value_name = "FILE")]
    inputs: String,
    /// A `qsens.manifest`: its chosen recipe is measured (repeatable; the first one also gives the
    /// all-quantized baseline and --frontier).
    #[arg(long = "manifest", value_name = "FILE")]
    manifests: Vec<String>,
    /// A quantized checkpoint directory written by `quantize`, measured as it is (repeatable).
    #[arg(long = "checkpoint", value_name = "DIR")]
    checkpoints: Vec<PathBuf>,
    /// Also measure K recipes re-solved at budgets spread evenly along the first manifest's frontier.
    #[arg(long, value_name = "K", default_value_t = 0)]
    frontier: usize,
    /// Measure the first N samples only (default: all).
    #[arg(long, value_name = "N")]
    num_samples: Option<usize>,
    /// Run the manifests' recipes as scored, not as served: every layer they name quantized (the
    /// patch embedding and a tied lm_head too), each fused shard with its own scales, as
    /// `score-layers` and ModelOpt's `mtq.quantize` fake quantization compute them.
    #[arg(long)]
    as_scored: bool,
    /// Where to write the `qsens.evaluation` artifact (`-` = stdout; `.json` = JSON).
    #[arg(short, long, value_name = "FILE", default_value = "-")]
    output: String,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype of the model: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Bootstrap resamples for the intervals.
    #[arg(long, value_name = "N", default_value_t = 1000, hide_short_help = true)]
    bootstrap: usize,
    /// Seed of the bootstrap.
    #[arg(long, value_name = "N", default_value_t = 0, hide_short_help = true)]
    seed: u64,
    /// Write wall times (load, measurement) as JSON here.
    #[arg(long, value_name = "FILE", hide_short_help = true)]
    timings: Option<PathBuf>,
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let reporter = a.common.reporter();
    cli::run_main(evaluate::TOOL, || {
        let args = EvaluateArgs {
            model_dir: a.model,
            inputs: a.inputs.as_str().into(),
            manifests: a.manifests.iter().map(|m| m.as_str().into()).collect(),
            checkpoints: a.checkpoints,
            frontier: a.frontier,
            num_samples: a.num_samples,
            as_scored: a.as_scored,
            output: a.output.as_str().into(),
            device: a.device,
            dtype: qsens::score::parse_dtype(&a.dtype)?,
            bootstrap: Bootstrap { resamples: a.bootstrap, seed: a.seed },
            timings: a.timings,
        };
        evaluate::run(&args, &reporter)
    })
}
