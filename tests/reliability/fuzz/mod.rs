//! Fuzzing of every artifact reader and of the config parsers, with proptest strategies (stable
//! Rust, no extra tooling), time-boxed.
//!
//! Each target mutates good seeds from the demo pipeline (byte-level and structured, see
//! [`mutate`]) and feeds them to the reader *and to what consumes its result* (the model, the
//! solver, the renderer, ...), since the panics hide behind a successful parse. An error is
//! fine; a crash (panic, abort, stack overflow) fails the test, after proptest-style shrinking,
//! with the minimal mutation plan (reproducible: the seeds are deterministic) and the seed.
//!
//! Budget per target: `QSENS_FUZZ_SECS` seconds (default 60, what `make test` runs; `make fuzz`
//! runs 600). `QSENS_FUZZ_SEED` sets the RNG seed: a number, or `random` (what `make fuzz` uses);
//! by default each target has a fixed seed, so that `make test` is reproducible. The seed is printed.

mod mutate;
mod targets;

use std::cell::RefCell;
use std::fmt::Debug;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// Default seconds per target when `QSENS_FUZZ_SECS` is unset.
pub const DEFAULT_SECS: f64 = 60.0;

fn budget() -> Duration {
    let secs = std::env::var("QSENS_FUZZ_SECS").ok().and_then(|s| s.parse::<f64>().ok()).unwrap_or(DEFAULT_SECS);
    Duration::from_secs_f64(secs.max(0.0))
}

/// The RNG seed of a target: `QSENS_FUZZ_SEED` (a number, or `random` for a fresh one per run, what
/// `make fuzz` uses); by default a fixed seed per target, so that `make test` and CI explore the
/// same inputs on every run and a failure there reproduces exactly.
fn seed_for(name: &str) -> u64 {
    let by_name = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    match std::env::var("QSENS_FUZZ_SEED").ok().as_deref() {
        Some("random") => {
            let nanos =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
            nanos ^ by_name
        }
        Some(s) => s.parse().unwrap_or_else(|_| panic!("QSENS_FUZZ_SEED must be a number or `random`, got {s:?}")),
        None => by_name,
    }
}

thread_local! {
    /// While `Some`, panics on this thread are recorded here instead of printed.
    static CAPTURE: RefCell<Option<String>> = const { RefCell::new(None) };
    /// Also record where the panic came from (qsens frames of a backtrace).
    static WITH_BACKTRACE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The qsens source lines of the current backtrace (the panic site and its callers).
fn qsens_frames() -> String {
    let bt = std::backtrace::Backtrace::force_capture().to_string();
    let lines: Vec<&str> = bt.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if l.contains("at ./src/") || l.contains("at src/") {
            let func = i.checked_sub(1).map_or("", |j| lines[j].trim());
            out.push(format!("    {func}\n      {}", l.trim()));
        }
    }
    out.join("\n")
}

fn install_panic_capture() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let captured = CAPTURE.with(|c| match c.try_borrow_mut() {
                Ok(mut slot) if slot.is_some() => {
                    let mut msg = info.to_string();
                    if WITH_BACKTRACE.with(|b| b.get()) {
                        msg.push_str("\n  in:\n");
                        msg.push_str(&qsens_frames());
                    }
                    *slot = Some(msg);
                    true
                }
                _ => false,
            });
            if !captured {
                default(info);
            }
        }));
    });
}

/// Runs one case: `Ok(accepted)` or `Err(panic message)`.
fn run_case<V>(target: &dyn Fn(&V) -> bool, value: &V) -> Result<bool, String> {
    CAPTURE.with(|c| *c.borrow_mut() = Some(String::new()));
    let r = std::panic::catch_unwind(AssertUnwindSafe(|| target(value)));
    let msg = CAPTURE.with(|c| c.borrow_mut().take()).unwrap_or_default();
    r.map_err(|_| if msg.is_empty() { "panic".to_string() } else { msg })
}

/// Fuzzes `target` with values of `strategy` for the time budget. `target` returns whether the
/// input was accepted (for the statistics); it must not panic.
pub fn fuzz<S>(name: &str, strategy: S, target: impl Fn(&S::Value) -> bool)
where
    S: Strategy,
    S::Value: Debug,
{
    install_panic_capture();
    let seed = seed_for(name);
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config { failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes));
    let start = Instant::now();
    let deadline = start + budget();
    let (mut cases, mut accepted) = (0u64, 0u64);
    let mut slowest = Duration::ZERO;
    loop {
        let mut tree = strategy.new_tree(&mut runner).expect("strategy");
        let t0 = Instant::now();
        match run_case(&target, &tree.current()) {
            Ok(a) => {
                cases += 1;
                accepted += a as u64;
            }
            Err(msg) => {
                let (value, mut msg, steps) = shrink(&target, &mut tree, msg);
                WITH_BACKTRACE.with(|b| b.set(true));
                if let Err(m) = run_case(&target, &value) {
                    msg = m;
                }
                WITH_BACKTRACE.with(|b| b.set(false));
                let mut shown = format!("{value:#?}");
                if shown.len() > 20_000 {
                    shown.truncate(20_000);
                    shown.push_str("\n... (truncated)");
                }
                panic!(
                    "fuzz {name}: crash after {cases} cases (QSENS_FUZZ_SEED={seed}); minimal input after {steps} \
                     shrink steps:\n{shown}\npanic: {msg}"
                );
            }
        }
        slowest = slowest.max(t0.elapsed());
        if Instant::now() >= deadline {
            break;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "fuzz {name:<20} {cases:>7} cases in {secs:>5.1} s ({:>6.0}/s), {accepted:>6} accepted, slowest {:>6.3} s, \
         seed {seed}: no crash",
        cases as f64 / secs.max(1e-9),
        slowest.as_secs_f64()
    );
    assert!(cases > 0, "fuzz {name}: no case ran");
}

/// proptest's shrinking loop: simplify while the case still crashes, complicate when a
/// simplification passes.
fn shrink<T: ValueTree>(target: &dyn Fn(&T::Value) -> bool, tree: &mut T, msg: String) -> (T::Value, String, usize) {
    let mut last = (tree.current(), msg);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut passed = false;
    let mut steps = 0;
    while steps < 4096 && Instant::now() < deadline {
        let moved = if passed { tree.complicate() } else { tree.simplify() };
        if !moved {
            break;
        }
        steps += 1;
        match run_case(target, &tree.current()) {
            Ok(_) => passed = true,
            Err(m) => {
                passed = false;
                last = (tree.current(), m);
            }
        }
    }
    (last.0, last.1, steps)
}
