//! Reliability of the whole pipeline (issue 7): the bad-input corpus every stage is run
//! against, fuzzing of the artifact readers and config parsers, kill-and-resume, and
//! determinism. One test binary, so that the stage binaries and the demo set are shared.

// `args![...]` builds a Vec on purpose (cases extend it); clippy flags the `&args![..]` calls.
#![allow(clippy::useless_vec)]

mod heap;
mod support;

#[global_allocator]
static HEAP: heap::Guarded = heap::Guarded;

mod corpus;
mod fuzz;
mod pipeline;
