//! Recipes: whole jobs a user starts from either face, built on training and evaluation — the
//! built-in default run and the benchmark against the PyTorch reference.

pub mod bench;
pub mod default_run;
pub mod pipeline;
pub mod run;
