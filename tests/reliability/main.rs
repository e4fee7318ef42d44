//! Reliability of the whole pipeline (issue 7): the bad-input corpus every stage is run
//! against, fuzzing of the artifact readers and config parsers, kill-and-resume, and
//! determinism. One test binary, so that the stage binaries and the demo set are shared.

mod support;

mod corpus;
mod fuzz;
mod pipeline;
