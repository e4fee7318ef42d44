//! `demo-assets`: writes the generated demo set that `make demo` runs the pipeline on
//! (`demo-assets OUT_DIR`; docs/demo.md). Not a pipeline stage: a binary rather than an example
//! so that `cargo build --bins` builds it with the stages' own dependency features (an example
//! also enables the dev-dependencies' features, which compiled the library a second time).
//!
//! Prints one line per file (`written` or `unchanged`, size, path) on stderr; `-q` prints nothing.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut quiet = false;
    let mut out_dir = None;
    for arg in std::env::args_os().skip(1) {
        match arg.to_str() {
            Some("-q" | "--quiet") => quiet = true,
            Some("-h" | "--help") => {
                println!("usage: demo-assets [-q] OUT_DIR\n\nWrites the qsens demo set (images, captions.json, model/) to OUT_DIR.");
                return ExitCode::SUCCESS;
            }
            _ if out_dir.is_none() => out_dir = Some(PathBuf::from(arg)),
            _ => {
                eprintln!("demo-assets: unexpected argument {arg:?} (usage: demo-assets [-q] OUT_DIR)");
                return ExitCode::from(2);
            }
        }
    }
    let Some(out_dir) = out_dir else {
        eprintln!("demo-assets: missing OUT_DIR (usage: demo-assets [-q] OUT_DIR)");
        return ExitCode::from(2);
    };
    qsens::cli::run_main("demo-assets", || {
        let written = qsens::demo::write_demo_set(&out_dir)?;
        if !quiet {
            for w in &written {
                let what = if w.changed { "written" } else { "unchanged" };
                eprintln!("{what:>9} {:>9} {}", w.len, out_dir.join(&w.path).display());
            }
        }
        Ok(())
    })
}
