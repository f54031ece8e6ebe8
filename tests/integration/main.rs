//! The one integration-test crate (few test binaries keep CI's build short): modules by topic.
//! Most tests compute on the CPU backend; `wgsl` (and the app tests' rendering) cover the wgpu path.

mod checkpoints;
mod cli;
mod common;
mod eval;
mod gui;
mod mae;
mod model;
mod parity;
mod peft;
mod pretrain;
mod real_checkpoint;
mod upstep;
mod wgsl;
