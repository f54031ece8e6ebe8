//! Training: the run config, checkpoints with exact resume, the k-NN monitor,
//! and the ExPLoRA pre-training job that the CLI and the app start through the engine.

pub mod config;
pub mod mae_step;
pub mod monitor;
pub mod objective;
pub mod pretrain;
pub mod state;
pub mod step;
pub mod upstep_step;

pub use config::{Objective, PretrainConfig};
pub use pretrain::{PretrainJob, PretrainSummary, pretrain};
