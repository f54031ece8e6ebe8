//! Checkpoints: layout detection and key maps (Meta DINOv2, Hugging Face, MAE, explora's own),
//! loading with a key-level report that refuses partial loads, and saving/exporting.

mod adapter;
pub mod builtin;
mod decoder;
mod layout;
mod load;
mod raw;

use std::path::PathBuf;

pub use adapter::{ADAPTER_FORMAT, load_adapter, save_adapter};
pub use decoder::{LoadedDecoder, load_mae_decoder, mae_decoder_tensors};
pub use layout::{Canonical, Layout, canonical_to_hf, detect, strip_wrappers, to_canonical};
pub use load::{
    EXPLORA_FORMAT, LoadReport, canonical_from_model, infer_config, load_backbone, load_backbone_with, save_backbone, save_backbone_hf,
    save_backbone_meta,
};
pub use raw::{
    Metadata, RawTensor, TensorMap, atomic_write, fault, is_disk_full, read_any, read_pytorch, read_safetensors, write_safetensors,
};

/// Why a checkpoint could not be used. Every variant names the file or keys at fault.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {0} does not exist")]
    NotFound(PathBuf),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a readable checkpoint (safetensors or PyTorch .pth): {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{0}")]
    Unsupported(String),
    #[error(
        "{path}: unknown checkpoint layout (expected Meta DINOv2, Hugging Face Dinov2Model, MAE or explora keys); first keys: {sample}"
    )]
    UnknownLayout { path: PathBuf, sample: String },
    #[error("{path}: cannot determine the architecture: {reason}. Pass --arch with a preset (e.g. vits14, vitl14, mae-vitb16)")]
    Architecture { path: PathBuf, reason: String },
    #[error("{0}")]
    Mismatch(Box<LoadReport>),
}
