//! Evaluation-side jobs on a backbone: feature extraction (`explora embed`) and CLS-attention
//! maps (`explora attention`); linear probe, k-NN and the report come later.

pub mod attention;
pub mod embed;

use burn::tensor::{Device, Tensor, TensorData};

/// Uploads `n` preprocessed CHW images (concatenated) as a `[n, 3, size, size]` tensor.
pub fn images_tensor(data: Vec<f32>, n: usize, size: usize, device: &Device) -> Tensor<4> {
    Tensor::from_data(TensorData::new(data, [n, 3, size, size]), device)
}

pub use crate::train::state::to_vec;
