//! explora: adapt pre-trained Vision Transformers to a new image domain with ExPLoRA, on any
//! wgpu GPU. The CLI (`cli/`) and the desktop app are thin faces over one engine (`engine/`)
//! that runs jobs on their own thread, takes commands and reports progress as events.

// `!(x > 0.0)` is how the validators say "not a positive number, NaN included".
#![allow(clippy::neg_cmp_op_on_partial_ord)]

pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod device;
pub mod engine;
pub mod eval;
pub mod fields;
pub mod gui;
pub mod inspect;
pub mod model;
pub mod objectives;
pub mod optim;
pub mod peft;
pub mod recipes;
pub mod train;
