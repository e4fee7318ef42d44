//! What every binary shares: common flags, progress reporting and the one error exit.
//!
//! Exit codes (documented in the README): 0 success, 2 error. An error is printed once, as
//! `<tool>: <cause chain on one line>`. A broken pipe on stdout (`... | head`) counts as success.

use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Flags shared by all stages.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CommonArgs {
    /// Print nothing but errors (no progress bars).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Print more about what is being done (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

impl CommonArgs {
    pub fn reporter(&self) -> Reporter {
        Reporter { quiet: self.quiet, verbose: self.verbose }
    }
}

/// Where a stage reports progress and notes: stderr, never stdout (stdout may carry an artifact).
#[derive(Debug, Clone, Copy, Default)]
pub struct Reporter {
    pub quiet: bool,
    pub verbose: u8,
}

impl Reporter {
    /// A reporter that prints nothing (tests, library use).
    pub fn silent() -> Self {
        Reporter { quiet: true, verbose: 0 }
    }

    /// A progress bar with ETA on stderr; hidden when quiet or when stderr is not a terminal
    /// (indicatif's stderr target hides itself then).
    pub fn bar(&self, len: u64, label: &str) -> ProgressBar {
        if self.quiet {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg} ({elapsed}, ETA {eta})")
                .expect("static progress template")
                .progress_chars("=> "),
        );
        bar.set_prefix(label.to_string());
        bar
    }

    /// A one-line note on stderr (suppressed by `-q`).
    pub fn note(&self, msg: impl AsRef<str>) {
        if !self.quiet {
            eprintln!("{}", msg.as_ref());
        }
    }

    /// Detail shown only with `-v`.
    pub fn detail(&self, msg: impl AsRef<str>) {
        if self.verbose > 0 && !self.quiet {
            eprintln!("{}", msg.as_ref());
        }
    }
}

/// Runs a stage and maps its result to the process exit code.
pub fn run_main(tool: &str, body: impl FnOnce() -> anyhow::Result<()>) -> ExitCode {
    match body() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{tool}: {}", one_line(&err));
            ExitCode::from(2)
        }
    }
}

/// anyhow's `{:#}` cause chain, with any embedded newlines folded so the error is one line.
pub fn one_line(err: &anyhow::Error) -> String {
    format!("{err:#}").split_whitespace().collect::<Vec<_>>().join(" ")
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain()
        .any(|cause| cause.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe))
}
