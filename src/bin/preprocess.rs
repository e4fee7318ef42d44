//! `preprocess`: calibration samples + HF Qwen3-VL checkpoint → `qsens.model-inputs` artifact,
//! token for token and pixel for pixel what HF's processor produces.
//!
//! `preprocess --calibration calib.msgpack --model Qwen3-VL-2B-Instruct/ -o inputs.msgpack`.
//! Exit codes: 0 success, 2 error (one line on stderr).

use std::process::ExitCode;

use clap::Parser;
use qsens::cli::{self, CommonArgs};
use qsens::preprocess::{self, PreprocessArgs};

#[derive(Debug, Parser)]
#[command(name = "preprocess", version, max_term_width = 98)]
#[command(about = "Turn calibration samples into Qwen3-VL model inputs exactly as HF's processor does")]
struct Cli {
    #[command(flatten)]
    args: PreprocessArgs,
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::run_main(preprocess::TOOL, || preprocess::run(&cli.args, cli.common.reporter()))
}
