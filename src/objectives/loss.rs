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

#[cfg(test)]
mod tests {
    //! Each loss against a case worked out by hand (natural logs; temperatures 1 unless said).
    use super::*;
    use burn::tensor::Device;

    fn t2(rows: &[&[f32]]) -> Tensor<2> {
        let k = rows[0].len();
        let data: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_data(TensorData::new(data, [rows.len(), k]), &Device::flex())
    }

    fn t1(values: &[f32]) -> Tensor<1> {
        Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]), &Device::flex())
    }

    fn scalar(t: Tensor<1>) -> f64 {
        t.into_scalar::<f32>() as f64
    }

    fn close(actual: Tensor<2>, expected: &[f32]) {
        let got = actual.into_data().try_into_vec::<f32>().unwrap();
        assert_eq!(got.len(), expected.len());
        for (g, e) in got.iter().zip(expected) {
            assert!((g - e).abs() < 1e-5, "{got:?} vs {expected:?}");
        }
    }

    #[test]
    fn dino_loss_skips_the_same_view_pairs() {
        // Two global crops of one image. Student crop 0 scores (0, 0) → p = (½, ½); crop 1
        // scores (ln 3, 0) → p = (¾, ¼). Teacher crop 0 = (1, 0), crop 1 = (½, ½).
        // Pairs (teacher 0, student 1): −ln ¾; (teacher 1, student 0): ln 2. Mean of 2 pairs.
        let student = t2(&[&[0.0, 0.0], &[3f32.ln(), 0.0]]);
        let teacher = t2(&[&[1.0, 0.0], &[0.5, 0.5]]);
        let expected = (-(0.75f64).ln() + 2f64.ln()) / 2.0;
        let got = scalar(dino_loss(student.clone(), teacher.clone(), 2, 2, 1.0));
        assert!((got - expected).abs() < 1e-6, "{got} vs {expected}");
        // The student temperature divides the scores: T = 0.5 doubles them.
        let sharper = scalar(dino_loss(student.mul_scalar(0.5), teacher, 2, 2, 0.5));
        assert!((sharper - expected).abs() < 1e-6);
    }

    #[test]
    fn ibot_loss_weights_patches_and_divides_by_images() {
        // Patch 0: p = (½, ½), target (1, 0) → ln ½, weight 1. Patch 1: p = (¾, ¼), target
        // (0, 1) → ln ¼, weight ½. −(ln ½ + ½ ln ¼) / 2 images = ln 2.
        let student = t2(&[&[0.0, 0.0], &[3f32.ln(), 0.0]]);
        let teacher = t2(&[&[1.0, 0.0], &[0.0, 1.0]]);
        let got = scalar(ibot_loss(student, teacher, t1(&[1.0, 0.5]), 2, 1.0));
        assert!((got - 2f64.ln()).abs() < 1e-6, "{got}");
    }

    #[test]
    fn koleo_is_minus_the_mean_log_nearest_neighbour_distance() {
        // (1, 0), (0, 1), (−1, 0) scaled: normalised first; every nearest neighbour is √2 away.
        let x = t2(&[&[2.0, 0.0], &[0.0, 1.0], &[-3.0, 0.0]]);
        let got = scalar(koleo(x));
        assert!((got + 2f64.sqrt().ln()).abs() < 1e-5, "{got}");
        // Closer neighbours give a larger loss (KoLeo pushes them apart).
        let crowded = scalar(koleo(t2(&[&[1.0, 0.0], &[1.0, 0.1], &[-1.0, 0.0]])));
        assert!(crowded > got);
    }

    #[test]
    fn sinkhorn_knopp_balances_prototypes() {
        // exp(scores − 1) ∝ [[1, 1], [3, 1]]. One iteration: total-normalise → columns to 1/K
        // → rows to 1/N, ×N: [[1/3, 2/3], [3/5, 2/5]].
        let scores = t2(&[&[0.0, 0.0], &[3f32.ln(), 0.0]]);
        close(sinkhorn_knopp(scores.clone(), 1.0, 1, None), &[1.0 / 3.0, 2.0 / 3.0, 0.6, 0.4]);
        // Many iterations: rows sum to 1, prototypes are used equally (columns sum to N/K).
        let q = sinkhorn_knopp(scores.clone(), 1.0, 50, None);
        close(q.clone().sum_dim(1), &[1.0, 1.0]);
        close(q.sum_dim(0), &[1.0, 1.0]);
        // A padding row (valid 0) comes back as zeros and does not count.
        let padded = t2(&[&[0.0, 0.0], &[3f32.ln(), 0.0], &[5.0, -5.0]]);
        let q = sinkhorn_knopp(padded, 1.0, 1, Some(t1(&[1.0, 1.0, 0.0])));
        close(q, &[1.0 / 3.0, 2.0 / 3.0, 0.6, 0.4, 0.0, 0.0]);
    }

    #[test]
    fn softmax_centering_and_its_ema_center() {
        // (scores − center) / T = (0, −2) → (1, e⁻²) / (1 + e⁻²).
        let p = centered_softmax(t2(&[&[1.0, 0.0]]), t2(&[&[1.0, 1.0]]), 0.5);
        let e = (-2f32).exp();
        close(p, &[1.0 / (1.0 + e), e / (1.0 + e)]);
        // The center moves 10 % of the way to the batch mean of the valid rows.
        let c = update_center(t2(&[&[0.0, 10.0]]), t2(&[&[2.0, 0.0], &[4.0, 4.0]]), Some(t1(&[1.0, 0.0])), 0.9);
        close(c, &[0.2, 9.0]);
        let c = update_center(t2(&[&[0.0, 10.0]]), t2(&[&[2.0, 0.0], &[4.0, 4.0]]), None, 0.9);
        close(c, &[0.3, 9.2]);
    }
}
