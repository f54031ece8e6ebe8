//! The DINOv2 losses: DINO cross-entropy over crops, iBOT over masked patches, the KoLeo
//! regulariser, and the two ways of centering teacher outputs.

use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{Bool, Int, Tensor, TensorData};

use super::head::l2_normalize;

/// DINO loss. `student` `[C·B, K]` prototype scores of all crops (crop-major: crop 0 of every
/// sample, then crop 1, ...; the `globals` global crops first); `teacher` `[G·B, K]`
/// probabilities on the global crops. Cross-entropy of every (teacher crop i, student crop j)
/// pair except the same view (i = j), averaged over pairs and samples.
pub fn dino_loss(student: Tensor<2>, teacher: Tensor<2>, crops: usize, globals: usize, student_temp: f64) -> Tensor<1> {
    let [n, k] = student.dims();
    let b = n / crops;
    let log_p = log_softmax(student.div_scalar(student_temp), 1).reshape([crops, b, k]);
    let t = teacher.reshape([globals, b, k]);
    // Σ_{i,j} t_i·log p_j = (Σ_i t_i)·(Σ_j log p_j); the same-view pairs are subtracted.
    let all = (t.clone().sum_dim(0) * log_p.clone().sum_dim(0)).sum();
    let same = (t * log_p.narrow(0, 0, globals)).sum();
    let pairs = globals * crops - globals;
    (same - all).div_scalar((pairs * b) as f64)
}

/// iBOT loss on masked patches. `student`/`teacher` `[M, K]` (scores / probabilities) for the
/// gathered masked patches; `weights` `[M]` is 1/(masked patches of that image), 0 for
/// padding rows; normalised by the number of global-crop images, as DINOv2 does.
pub fn ibot_loss(student: Tensor<2>, teacher: Tensor<2>, weights: Tensor<1>, images: usize, student_temp: f64) -> Tensor<1> {
    let [m, _] = student.dims();
    let log_p = log_softmax(student.div_scalar(student_temp), 1);
    let per_patch = (teacher * log_p).sum_dim(1).reshape([m]);
    (per_patch * weights).sum().neg().div_scalar(images as f64)
}

/// KoLeo regulariser (Sablayrolles et al.) on `x` `[B, D]`: −mean log distance of each
/// L2-normalised row to its nearest neighbour — spreads features uniformly.
pub fn koleo(x: Tensor<2>) -> Tensor<1> {
    let [n, _] = x.dims();
    let device = x.device();
    let x = l2_normalize(x, 1);
    let dots = x.clone().detach().matmul(x.clone().detach().transpose());
    let diagonal = Tensor::<2, Bool>::diag_mask([n, n], 0, &device).bool_not();
    let nearest = dots.mask_fill(diagonal, -2.0).argmax(1).reshape([n]);
    let neighbours = x.clone().select(0, nearest);
    // torch.nn.PairwiseDistance(p=2, eps=1e-8): ‖x − y + eps‖.
    let distance = (x - neighbours).add_scalar(1e-8).powf_scalar(2.0).sum_dim(1).sqrt();
    distance.add_scalar(1e-8).log().mean().neg()
}

/// How teacher scores become targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Centering {
    /// Subtract an EMA of the teacher's mean output, then a sharp softmax (DINO; the ExPLoRA
    /// default).
    Softmax,
    /// Sinkhorn-Knopp normalisation (3 iterations), as DINOv2 ViT-L used upstream.
    SinkhornKnopp,
}

/// Softmax centering: `softmax((scores − center) / temp)`.
pub fn centered_softmax(scores: Tensor<2>, center: Tensor<2>, temp: f64) -> Tensor<2> {
    softmax((scores - center).div_scalar(temp), 1)
}

/// The new EMA center from `scores` `[N, K]`; rows with `valid` 0 (padding) are left out.
pub fn update_center(center: Tensor<2>, scores: Tensor<2>, valid: Option<Tensor<1>>, momentum: f64) -> Tensor<2> {
    let [n, _] = scores.dims();
    let mean = match valid {
        Some(valid) => {
            let count = valid.clone().sum().clamp_min(1.0).reshape([1, 1]);
            (scores * valid.reshape([n, 1])).sum_dim(0) / count
        }
        None => scores.mean_dim(0),
    };
    center.mul_scalar(momentum) + mean.mul_scalar(1.0 - momentum)
}

/// Sinkhorn-Knopp targets `[N, K]` (rows sum to 1, prototypes used equally) from teacher
/// `scores`; rows with `valid` 0 are padding, excluded and returned as zeros.
pub fn sinkhorn_knopp(scores: Tensor<2>, temp: f64, iterations: usize, valid: Option<Tensor<1>>) -> Tensor<2> {
    let [n, k] = scores.dims();
    // Scores are cosines (≤ 1): shifting by 1 keeps exp() in range and cancels in the normalisation.
    let mut q = scores.sub_scalar(1.0).div_scalar(temp).exp();
    let rows = match valid {
        Some(valid) => {
            q = q * valid.clone().reshape([n, 1]);
            valid.sum().clamp_min(1.0).reshape([1, 1])
        }
        None => Tensor::<2>::full([1, 1], n as f32, &q.device()),
    };
    q = q.clone() / q.sum().clamp_min(1e-30).reshape([1, 1]);
    for _ in 0..iterations {
        q = q.clone() / q.sum_dim(0).clamp_min(1e-30);
        q = q.div_scalar(k as f64);
        q = q.clone() / q.sum_dim(1).clamp_min(1e-30);
        q = q / rows.clone();
    }
    q * rows
}

/// Index and weight tensors that gather the masked patches of `masks` (`[images, patches]`,
/// row-major) into a fixed-size list of `capacity` rows (padding rows point at patch 0 with
/// weight 0), so every step has the same shapes.
pub struct MaskedPatches {
    /// `[capacity]` flat index into `images·patches`.
    pub index: Tensor<1, Int>,
    /// `[capacity]` 1/(masked patches in that image), 0 for padding.
    pub weight: Tensor<1>,
    /// `[capacity]` 1 for real rows, 0 for padding.
    pub valid: Tensor<1>,
    /// Masked patches actually present.
    pub count: usize,
}

impl MaskedPatches {
    pub fn new(masks: &[bool], patches: usize, capacity: usize, device: &burn::tensor::Device) -> Self {
        let mut index = Vec::with_capacity(capacity);
        let mut weight = Vec::with_capacity(capacity);
        for (image, row) in masks.chunks(patches).enumerate() {
            let masked = row.iter().filter(|m| **m).count();
            for (p, _) in row.iter().enumerate().filter(|(_, m)| **m) {
                index.push((image * patches + p) as i64);
                weight.push(1.0 / masked as f32);
            }
        }
        assert!(index.len() <= capacity, "{} masked patches exceed the capacity {capacity}", index.len());
        let count = index.len();
        let mut valid = vec![1.0f32; count];
        index.resize(capacity, 0);
        weight.resize(capacity, 0.0);
        valid.resize(capacity, 0.0);
        Self {
            index: Tensor::from_data(TensorData::new(index, [capacity]), device),
            weight: Tensor::from_data(TensorData::new(weight, [capacity]), device),
            valid: Tensor::from_data(TensorData::new(valid, [capacity]), device),
            count,
        }
    }
}
