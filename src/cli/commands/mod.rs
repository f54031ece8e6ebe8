//! One file per command: each turns its arguments into an engine job (or a quick answer)
//! and prints what the job reports.

pub mod attention;
pub mod bench;
pub mod default;
pub mod embed;
pub mod export;
pub mod info;
pub mod pipeline;
pub mod plan;
pub mod pretrain;
