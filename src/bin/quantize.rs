//! `quantize`: a quantized checkpoint a serving engine loads, from a manifest (see `qsens::quantize`).
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use qsens::cli::{self, CommonArgs};
use qsens::quantize::{self, Layout, QuantizeArgs};

#[derive(Debug, Parser)]
#[command(
    name = "quantize",
    version,
    max_term_width = 98,
    about = "Write the quantized checkpoint of a qsens manifest (FP8, NVFP4 and W4A16_NVFP4 layers, static scales)",
    after_help = "Layouts: `modelopt` is ModelOpt's own export format, for every format (vLLM reads its \
                  hf_quant_config.json: FP8, NVFP4, or MIXED_PRECISION when a recipe mixes formats); \
                  `compressed-tensors` is llm-compressor's, FP8 only (vLLM and HF transformers load it). vLLM's \
                  single-format ModelOpt loaders treat every layer named `visual` as unquantized (its \
                  MIXED_PRECISION loader does not), so an FP8-only recipe with FP8 vision layers is only served \
                  correctly from compressed-tensors: `auto` (the default) picks compressed-tensors for that \
                  case and modelopt otherwise. NVFP4 shards of a fused layer (q/k/v, gate/up) always share \
                  their largest amax, as ModelOpt writes them. AWQ formats are refused (their smoothing is not \
                  exported yet). See docs/quantize.md."
)]
struct Args {
    /// The unquantized HF checkpoint directory the scores were made from.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// The `qsens.manifest` written by `search` (`-` for stdin).
    #[arg(long, value_name = "FILE")]
    manifest: String,
    /// The `qsens.scores` the manifest was made from: checked against the manifest's digest and
    /// amax (the manifest carries both, so this is optional).
    #[arg(long, value_name = "FILE")]
    scores: Option<String>,
    /// The checkpoint directory to write.
    #[arg(short, long, value_name = "DIR")]
    output: PathBuf,
    /// Checkpoint layout.
    #[arg(long, value_enum, default_value_t = Layout::Auto)]
    layout: Layout,
    /// Give the FP8 shards of a fused layer (q/k/v, gate/up) their largest weight and input
    /// scale, as vLLM serves them, so the checkpoint holds exactly what is served (NVFP4 shards
    /// always share theirs).
    #[arg(long)]
    fuse_scales: bool,
    /// Largest safetensors file (HF's spelling: 5GB, 500MB, 2GiB).
    #[arg(long, value_name = "SIZE", default_value = "5GB")]
    max_shard_size: String,
    /// Replace the output directory if it exists.
    #[arg(long)]
    force: bool,
    /// Write vision layers in a single-format modelopt layout although vLLM loads them wrongly.
    #[arg(long, hide_short_help = true)]
    skip_vllm_checks: bool,
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let reporter = a.common.reporter();
    cli::run_main(quantize::TOOL, || {
        let args = QuantizeArgs {
            model_dir: a.model,
            manifest: a.manifest.as_str().into(),
            scores: a.scores.as_deref().map(Into::into),
            output: a.output,
            layout: a.layout,
            fuse_scales: a.fuse_scales,
            max_shard_size: quantize::shards::parse_size(&a.max_shard_size)?,
            force: a.force,
            skip_vllm_checks: a.skip_vllm_checks,
        };
        quantize::run(&args, &reporter)
    })
}
