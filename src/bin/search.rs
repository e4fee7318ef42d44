//! `search`: per-layer formats under an effective-bits budget, proved optimal (see `qsens::search`).
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use qsens::cli::{self, CommonArgs};
use qsens::search::{self, confidence::Bootstrap, frontier::FrontierOptions, solver::Limits, Overrides, Settings};

#[derive(Debug, Parser)]
#[command(name = "search", version, max_term_width = 98, about = "Choose per-layer formats under a bit budget")]
struct Args {
    /// The `qsens.scores` artifact (`-` for stdin).
    #[arg(long, value_name = "FILE")]
    scores: String,
    /// Where to write the `qsens.manifest` (JSON; `-` for stdout).
    #[arg(short, long, value_name = "FILE", default_value = "-")]
    output: String,
    /// Budget: effective bits per weight, ModelOpt's `effective_bits` (16 = unquantized).
    #[arg(long, value_name = "BITS")]
    effective_bits: f64,
    /// Keep groups unquantized: fnmatch pattern on group or member names (repeatable).
    #[arg(long, value_name = "GLOB")]
    disable: Vec<String>,
    /// Leave groups out of the budget (cost weight 0), e.g. '*lm_head*' (repeatable).
    #[arg(long, value_name = "GLOB")]
    exclude_cost: Vec<String>,
    /// Exhaustive frontier: also enumerate every Pareto-optimal point, and print the frontier.
    #[arg(long)]
    sweep: bool,
    /// Frontier grid step in bits.
    #[arg(long, value_name = "BITS", default_value_t = 0.05)]
    sweep_step: f64,
    /// Also write the ModelOpt, compressed-tensors and llama.cpp recipes into DIR.
    #[arg(long, value_name = "DIR")]
    export_dir: Option<PathBuf>,
    /// Bootstrap resamples for the confidence intervals.
    #[arg(long, value_name = "N", default_value_t = 1000, hide_short_help = true)]
    bootstrap: usize,
    /// Seed of the bootstrap.
    #[arg(long, value_name = "N", default_value_t = 0, hide_short_help = true)]
    seed: u64,
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let settings = Settings {
        effective_bits: a.effective_bits,
        overrides: Overrides { disable: a.disable, exclude_cost: a.exclude_cost },
        frontier: FrontierOptions { step: a.sweep_step, exhaustive: a.sweep, ..FrontierOptions::default() },
        bootstrap: Bootstrap { resamples: a.bootstrap, seed: a.seed },
        limits: Limits::default(),
    };
    let args = search::SearchArgs {
        scores: a.scores.as_str().into(),
        output: a.output.as_str().into(),
        export_dir: a.export_dir,
        settings,
    };
    cli::run_main(search::TOOL, || search::run(&args, a.common.reporter()))
}
