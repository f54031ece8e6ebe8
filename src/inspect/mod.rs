//! What a backbone sees, shared by training (the k-NN monitor, attention between steps) and
//! evaluation (k-NN probes, `explora attention`): CLS-attention maps and the weighted k-NN vote.

pub mod attention;
pub mod knn;

use burn::tensor::{Device, Tensor, TensorData};

pub use attention::{cls_attention, overlay};
pub use knn::{KnnConfig, knn_scores, leave_one_out_scores, top1};

/// Uploads `n` preprocessed CHW images (concatenated) as a `[n, 3, size, size]` tensor.
pub fn images_tensor(data: Vec<f32>, n: usize, size: usize, device: &Device) -> Tensor<4> {
    Tensor::from_data(TensorData::new(data, [n, 3, size, size]), device)
}
