//! `score-layers`: checkpoint + model inputs → per-layer, per-format sensitivity scores.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use qsens::artifact::Location;
use qsens::cli::{run_main, CommonArgs};
use qsens::score::{self, CostModel, Method, ScoreOptions};

/// Scores how sensitive every quantizable layer is to each quantization format, as ModelOpt's
/// auto_quantize does (gradient or kl_div method), and writes a `qsens.scores` artifact.
#[derive(Parser)]
#[command(
    version,
    max_term_width = 98,
    after_long_help = "Artifacts: see docs/artifacts.md. Exit status: 0 ok, 2 error."
)]
struct Args {
    /// HF checkpoint directory (config.json + *.safetensors).
    #[arg(long, value_name = "DIR", required_unless_present = "merge")]
    model: Option<PathBuf>,
    /// Model-inputs artifact from `preprocess` (`-` = stdin).
    #[arg(long, value_name = "FILE", required_unless_present = "merge")]
    inputs: Option<String>,
    /// Output scores artifact (`-` = stdout; `.json` = JSON).
    #[arg(short, long, value_name = "FILE", default_value = "-")]
    output: String,
    /// Scoring method.
    #[arg(long, value_enum, default_value_t = Method::Gradient)]
    method: Method,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype of the model: f32, bf16 or f16 (fake quantization and scores are f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Quantization format to score (repeatable; all are searched together): FP8,
    /// FP8_PER_CHANNEL_PER_TOKEN, FP8_2D_BLOCKWISE_WEIGHT_ONLY, INT8, INT4_BLOCKWISE_WEIGHT_ONLY,
    /// INT4_AWQ, W4A8_AWQ_BETA, NVFP4, W4A16_NVFP4, NVFP4_AWQ_LITE, MXFP8, MXFP4, or ModelOpt's
    /// config name (FP8_DEFAULT_CFG, NVFP4_AWQ_LITE_CFG, ...). See docs/formats.md.
    #[arg(long = "format", value_name = "NAME", default_value = "FP8")]
    formats: Vec<String>,
    /// Count the scales' storage in each format's cost (INT4 block-128 with 16-bit scales 4.125
    /// bits, MXFP8 8.25, ...) instead of ModelOpt's effective bits (INT4 4, MXFP8 8).
    #[arg(long)]
    true_cost: bool,
    /// How a group's cost counts in the budget: `weight` (every weight, ModelOpt's default) or
    /// `active_moe` (a sparse layer's experts weigh top_k / experts, the weights one token reads).
    #[arg(long, value_enum, default_value_t = CostModel::Weight)]
    cost_model: CostModel,
    /// Keep groups matching this fnmatch pattern unquantized (still counted in the budget).
    #[arg(long, value_name = "GLOB")]
    disable: Vec<String>,
    /// Leave groups matching this pattern out of the budget (e.g. '*lm_head*').
    #[arg(long, value_name = "GLOB")]
    exclude_cost: Vec<String>,
    /// Grouping regex with the group key as capture group 1 (repeatable; replaces ModelOpt's
    /// default q/k/v and gate/up rules).
    #[arg(long = "group-rule", value_name = "REGEX")]
    group_rules: Vec<String>,
    /// Calibrate on the first N samples only (default: all).
    #[arg(long, value_name = "N")]
    calib_samples: Option<usize>,
    /// Score the first N samples only (default: all).
    #[arg(long, value_name = "N")]
    num_samples: Option<usize>,
    /// Score only the samples with index ≡ i (mod n); merge the shards with --merge.
    #[arg(long, value_name = "i/n")]
    shard: Option<String>,
    /// Continue an interrupted run from its state file.
    #[arg(long)]
    resume: bool,
    /// State file for --resume (default: <output>.partial).
    #[arg(long, value_name = "FILE")]
    state: Option<PathBuf>,
    /// Write wall time per phase as JSON to FILE (not part of the artifact); on a GPU also the
    /// memory the run's tensors held: the model, each phase's peak, and what one sample's forward
    /// keeps for its backward.
    #[arg(long, value_name = "FILE")]
    timings: Option<PathBuf>,
    /// Use at most this much GPU memory (GiB, every process on the card together, as nvidia-smi
    /// counts it): the rest is held back when the run starts, so a sample that needs more fails
    /// as on a smaller card — with one line naming it; --resume then continues from it.
    #[arg(long, value_name = "GIB")]
    gpu_memory_limit: Option<String>,
    /// Pack consecutive samples into one forward up to this many tokens, so the GPU works on
    /// several at once (each sample still attends only to itself and is scored on its own
    /// rows); 1 runs one sample per forward. A longer sample runs alone. Lower it if a run
    /// fails out of memory.
    #[arg(long, value_name = "TOKENS", default_value_t = score::DEFAULT_BATCH_TOKENS)]
    batch_tokens: usize,
    /// Merge shard artifacts into one (instead of scoring).
    #[arg(long, value_name = "SHARD", num_args = 1.., conflicts_with_all = ["model", "inputs", "shard", "resume"])]
    merge: Vec<String>,
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    run_main("score-layers", || {
        let reporter = args.common.reporter();
        let output = Location::from(args.output.as_str());
        if !args.merge.is_empty() {
            let shards: Vec<Location> = args.merge.iter().map(|s| Location::from(s.as_str())).collect();
            return score::merge(&shards, &output, &reporter);
        }
        let opts = ScoreOptions {
            model_dir: args.model.clone().expect("clap requires --model"),
            inputs: Location::from(args.inputs.as_deref().expect("clap requires --inputs")),
            output,
            method: args.method,
            device: args.device.clone(),
            dtype: score::parse_dtype(&args.dtype)?,
            formats: args.formats.clone(),
            true_cost: args.true_cost,
            cost_model: args.cost_model,
            disable: args.disable.clone(),
            exclude_cost: args.exclude_cost.clone(),
            group_rules: (!args.group_rules.is_empty()).then(|| args.group_rules.clone()),
            calib_samples: args.calib_samples,
            num_samples: args.num_samples,
            // Parsed here, not by clap, so a bad value is the one-line error of every fault.
            shard: args.shard.as_deref().map(score::parse_shard).transpose()?,
            resume: args.resume,
            state: args.state.clone(),
            timings: args.timings.clone(),
            gpu_memory_limit: args.gpu_memory_limit.as_deref().map(qsens::device::parse_gib).transpose()?,
            batch_tokens: args.batch_tokens,
        };
        score::run(&opts, &reporter)
    })
}
