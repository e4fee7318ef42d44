//! Writes the demo set: `cargo run --release --example demo_assets -- OUT_DIR`.
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
                println!("usage: demo_assets [-q] OUT_DIR\n\nWrites the qsens demo set (images, captions.json, model/) to OUT_DIR.");
                return ExitCode::SUCCESS;
            }
            _ if out_dir.is_none() => out_dir = Some(PathBuf::from(arg)),
            _ => {
                eprintln!("demo_assets: unexpected argument {arg:?} (usage: demo_assets [-q] OUT_DIR)");
                return ExitCode::from(2);
            }
        }
    }
    let Some(out_dir) = out_dir else {
        eprintln!("demo_assets: missing OUT_DIR (usage: demo_assets [-q] OUT_DIR)");
        return ExitCode::from(2);
    };
    qsens::cli::run_main("demo_assets", || {
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
