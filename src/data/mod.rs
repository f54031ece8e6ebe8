//! Image input: folder scanning and decoding, preprocessing into normalised CHW tensors, and a
//! procedurally generated satellite-like domain. This module knows nothing about the model.

pub mod folder;
pub mod labelled;
pub mod multicrop;
pub mod preprocess;
pub mod procedural;
pub mod rng;
pub mod table;

use std::path::PathBuf;

pub use folder::{ImageItem, ImageList, SkipReport, decode_rgb};
pub use labelled::{LabelledSet, Split, Splits};
pub use multicrop::{
    BatchSpec, CropBatch, CropLoader, Crops, FolderSource, ImageSource, MaskConfig, MultiCropConfig, ProceduralSource, augment, block_mask,
    build_batch, contact_sheet, masked_crops, max_masked, train_view,
};
pub use preprocess::{Preprocess, denormalize_chw_to_rgb, load_batch, normalize_chw};
pub use procedural::{
    ProceduralDomain, SceneClass, Shift, ensure_shifted_image_folder, generate_image_folder, generate_shifted_image_folder, generate_tile,
};

/// Per-channel (RGB) mean used to normalise inputs, as in ImageNet-pretrained models.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// Per-channel (RGB) standard deviation used to normalise inputs.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// File extensions (lower case) recognised as images.
pub const IMAGE_EXTENSIONS: [&str; 5] = ["jpg", "jpeg", "png", "tif", "tiff"];

/// Errors of the data layer; messages are meant to be shown to the user as they are.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("image folder {} does not exist", path.display())]
    NotFound { path: PathBuf },
    #[error("no images (.jpg .jpeg .png .tif .tiff) found under {}", path.display())]
    NoImages { path: PathBuf },
    #[error("cannot decode image {}: {reason}", path.display())]
    Decode { path: PathBuf, reason: String },
    #[error("cannot write image {}: {reason}", path.display())]
    Encode { path: PathBuf, reason: String },
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Invalid settings or a data stream that cannot go on (e.g. too many unreadable files).
    #[error("{reason}")]
    Invalid { reason: String },
}

impl DataError {
    /// Builds an [`DataError::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io { path: path.into(), source }
    }

    /// The cause without the path, e.g. for a [`SkipReport`] entry.
    pub fn reason(&self) -> String {
        match self {
            DataError::NotFound { .. } => "does not exist".to_string(),
            DataError::NoImages { .. } => "no images".to_string(),
            DataError::Decode { reason, .. } | DataError::Encode { reason, .. } | DataError::Invalid { reason } => reason.clone(),
            DataError::Io { source, .. } => source.to_string(),
        }
    }
}
