//! Vision Transformer backbones (DINOv2 and MAE families) as burn modules.
//!
//! `model/` reads no files: checkpoints are turned into module weights by `checkpoint/`.

mod config;
mod convpass;
mod cpu;
mod lora;
mod memory;
pub mod params;
mod pos_embed;
mod vit;

pub use config::{Family, VitConfig, VitConfigError};
pub use convpass::Convpass;
pub use cpu::{backward_friendly_layout, gelu, linear as cpu_linear};
pub use lora::Lora;
pub use memory::{MemoryTask, memory_mask};
pub use params::to_vec;
pub use pos_embed::bicubic_weights;
pub use vit::{Block, ForwardOptions, LayerMemory, TokenLayout, Vit, VitOutput, init_linear};
