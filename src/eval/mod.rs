//! Evaluation on a backbone: feature extraction with a cache (`explora embed`), CLS-attention
//! maps (`explora attention`), k-NN and linear probing on frozen features, supervised
//! fine-tuning, classification metrics and figures, and the before/after comparison
//! (`explora pipeline`).

pub mod attention;
pub mod embed;
pub mod figure;
pub mod finetune;
pub mod knn;
pub mod linear;
pub mod metrics;
pub mod pipeline;

use burn::tensor::{Device, Tensor, TensorData};

pub use metrics::Metrics;
pub use pipeline::{PipelineConfig, PipelineSummary, run_pipeline};

/// Uploads `n` preprocessed CHW images (concatenated) as a `[n, 3, size, size]` tensor.
pub fn images_tensor(data: Vec<f32>, n: usize, size: usize, device: &Device) -> Tensor<4> {
    Tensor::from_data(TensorData::new(data, [n, 3, size, size]), device)
}

pub use crate::train::state::to_vec;
