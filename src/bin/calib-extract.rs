//! `calib-extract`: calibration database + image root → `qsens.calibration` artifact.
//!
//! `calib-extract --from-coco captions_train2017.json --db coco.db` builds the database;
//! `calib-extract --db coco.db --image-root train2017/ --num 128 --seed 0 -o calib.msgpack`
//! draws the samples. Exit codes: 0 success, 2 error (one line on stderr).

use std::process::ExitCode;

use clap::Parser;
use qsens::calib::{self, ExtractArgs};
use qsens::cli::{self, CommonArgs};

#[derive(Debug, Parser)]
#[command(name = "calib-extract", version, max_term_width = 98)]
#[command(about = "Draw image+caption calibration samples from an SQLite calibration database")]
#[command(after_long_help = "The database schema and the --query contract: docs/calibration-db.md")]
struct Cli {
    #[command(flatten)]
    args: ExtractArgs,
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::run_main(calib::TOOL, || calib::run(&cli.args, cli.common.reporter()))
}
