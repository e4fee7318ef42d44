//! `manifest-to-md`: a Markdown report with SVG plots from a `qsens.manifest` (see `qsens::report`).
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use qsens::cli::{self, CommonArgs};
use qsens::report::{self, ReportArgs};

#[derive(Debug, Parser)]
#[command(
    name = "manifest-to-md",
    version,
    max_term_width = 98,
    about = "Render a qsens manifest as a Markdown report"
)]
struct Args {
    /// The `qsens.manifest` written by `search` (`-` for stdin).
    #[arg(long, value_name = "FILE")]
    manifest: String,
    /// The report; its plots are written beside it (`report.md` → `report-sensitivity.svg`, ...).
    #[arg(short, long, value_name = "FILE")]
    output: PathBuf,
    /// A minijinja template to use instead of the default (context: docs/manifest.md).
    #[arg(long, value_name = "FILE")]
    template: Option<PathBuf>,
    /// A `qsens.evaluation` of the same model (written by `evaluate`): adds a "Predicted vs
    /// measured" section and `<report>-predicted-vs-measured.svg`.
    #[arg(long, value_name = "FILE")]
    evaluation: Option<String>,
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let args = ReportArgs {
        manifest: a.manifest.as_str().into(),
        output: a.output,
        template: a.template,
        evaluation: a.evaluation.as_deref().map(Into::into),
    };
    cli::run_main(report::TOOL, || report::run(&args, a.common.reporter()))
}
