//! The one integration-test crate (few test binaries keep CI's build short): modules by topic.
//! GPU tests run on whatever adapter wgpu picks; on CI that is Mesa's software Vulkan.

mod checkpoints;
mod cli;
mod common;
mod eval;
mod gui;
mod model;
mod parity;
mod peft;
mod pretrain;
mod real_checkpoint;
