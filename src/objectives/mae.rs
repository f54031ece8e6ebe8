//! The MAE objective's parts that do not depend on the decoder (issue 15, first step): random
//! patch masking with an exact count per image (so every image of a batch keeps the same
//! number of visible patches and shapes stay fixed), patchifying images into per-patch pixel
//! targets, and the reconstruction loss on the masked patches with per-patch normalised
//! pixels (`norm_pix_loss`), as in the MAE reference code.

use burn::tensor::{Tensor, TensorData};
use rand::rngs::Xoshiro256PlusPlus;

use crate::data::rng::shuffle;

/// Which patches of each image the encoder sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchMask {
    /// Patches per image.
    pub patches: usize,
    /// Per image, the visible patch indices in ascending order (`visible` of each).
    pub keep: Vec<Vec<usize>>,
    /// `[B·N]` row-major: true = masked (to be reconstructed).
    pub masked: Vec<bool>,
}

impl PatchMask {
    /// Visible patches per image for `ratio`: MAE's `int(N · (1 − ratio))`, at least one.
    pub fn visible(patches: usize, ratio: f64) -> usize {
        ((patches as f64 * (1.0 - ratio)) as usize).clamp(1, patches)
    }

    /// A uniformly random mask of exactly `N − visible(N, ratio)` patches per image.
    pub fn random(batch: usize, patches: usize, ratio: f64, rng: &mut Xoshiro256PlusPlus) -> Self {
        let visible = Self::visible(patches, ratio);
        let mut keep = Vec::with_capacity(batch);
        let mut masked = vec![true; batch * patches];
        for b in 0..batch {
            let mut order: Vec<usize> = (0..patches).collect();
            shuffle(&mut order, rng);
            let mut kept = order[..visible].to_vec();
            kept.sort_unstable();
            for &p in &kept {
                masked[b * patches + p] = false;
            }
            keep.push(kept);
        }
        Self { patches, keep, masked }
    }

    /// The mask as a `[B, N]` float tensor (1 = masked), for weighting the loss.
    pub fn weights(&self, device: &burn::tensor::Device) -> Tensor<2> {
        let values: Vec<f32> = self.masked.iter().map(|&m| if m { 1.0 } else { 0.0 }).collect();
        Tensor::from_data(TensorData::new(values, [self.keep.len(), self.patches]), device)
    }
}

/// `[B, 3, H, W]` images → `[B, (H/p)·(W/p), p·p·3]` patches, row-major over the grid, each
/// patch's pixels in (row, column, channel) order as MAE's `patchify`.
pub fn patchify(images: Tensor<4>, patch: usize) -> Tensor<3> {
    let [b, c, h, w] = images.dims();
    let (gh, gw) = (h / patch, w / patch);
    images.reshape([b, c, gh, patch, gw, patch]).permute([0, 2, 4, 3, 5, 1]).reshape([b, gh * gw, patch * patch * c])
}

/// Mean squared error of `pred` against `target` (`[B, N, P]`) over the masked patches only
/// (`mask` `[B, N]`, 1 = masked); with `norm_pix` the target of every patch is first normalised
/// to zero mean and unit variance over its pixels (MAE's default).
pub fn mae_loss(pred: Tensor<3>, target: Tensor<3>, mask: Tensor<2>, norm_pix: bool) -> Tensor<1> {
    let target = if norm_pix {
        let mean = target.clone().mean_dim(2);
        let var = target.clone().var(2);
        (target - mean).div(var.add_scalar(1e-6).sqrt())
    } else {
        target
    };
    let [b, n, _] = pred.dims();
    let per_patch = (pred - target).powf_scalar(2.0).mean_dim(2).reshape([b, n]);
    (per_patch * mask.clone()).sum().div(mask.sum())
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;
    use rand::SeedableRng;

    #[test]
    fn masks_hide_exactly_the_ratio_of_every_image() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(3);
        for (patches, ratio, visible) in [(196, 0.75, 49), (256, 0.75, 64), (16, 0.5, 8), (10, 0.99, 1), (10, 0.0, 10)] {
            let mask = PatchMask::random(5, patches, ratio, &mut rng);
            assert_eq!(PatchMask::visible(patches, ratio), visible);
            for (b, keep) in mask.keep.iter().enumerate() {
                assert_eq!(keep.len(), visible);
                assert!(keep.windows(2).all(|w| w[0] < w[1]));
                let hidden = mask.masked[b * patches..(b + 1) * patches].iter().filter(|&&m| m).count();
                assert_eq!(hidden, patches - visible, "image {b}, {patches} patches at {ratio}");
                assert!(keep.iter().all(|&p| !mask.masked[b * patches + p]));
            }
        }
        // Different images get different masks; the same seed gives the same masks.
        let a = PatchMask::random(2, 64, 0.75, &mut Xoshiro256PlusPlus::seed_from_u64(9));
        assert_ne!(a.keep[0], a.keep[1]);
        assert_eq!(a, PatchMask::random(2, 64, 0.75, &mut Xoshiro256PlusPlus::seed_from_u64(9)));
    }

    #[test]
    fn patchify_orders_pixels_like_mae_and_the_loss_counts_masked_patches_only() {
        let device = Device::flex();
        // One 3-channel 4×4 image, patch 2: four patches of 2·2·3 values.
        let values: Vec<f32> = (0..48).map(|v| v as f32).collect();
        let images = Tensor::<4>::from_data(TensorData::new(values.clone(), [1, 3, 4, 4]), &device);
        let patches = patchify(images, 2);
        assert_eq!(patches.dims(), [1, 4, 12]);
        let p = crate::model::to_vec(patches);
        // Patch 1 (top-right), pixel (0, 1), channel 2: image[2][0][3] = 2·16 + 3.
        assert_eq!(p[12 + 3 * 1 + 2], 35.0);
        // Patch 2 (bottom-left), pixel (1, 0), channel 0: image[0][3][0] = 12.
        assert_eq!(p[24 + 3 * 2], 12.0);

        // A prediction that is right on the masked patch and wrong on the visible one: loss 0.
        let target = Tensor::<3>::from_data(TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], [1, 2, 3]), &device);
        let pred = Tensor::<3>::from_data(TensorData::new(vec![9.0f32, 9.0, 9.0, 4.0, 5.0, 6.0], [1, 2, 3]), &device);
        let mask = Tensor::<2>::from_data(TensorData::new(vec![0.0f32, 1.0], [1, 2]), &device);
        let read = |t: Tensor<1>| t.into_scalar::<f32>();
        assert_eq!(read(mae_loss(pred.clone(), target.clone(), mask.clone(), false)), 0.0);
        // Masking the wrong one instead: mean of (8², 7², 6²) over the patch's pixels.
        let other = Tensor::<2>::from_data(TensorData::new(vec![1.0f32, 0.0], [1, 2]), &device);
        assert!((read(mae_loss(pred, target.clone(), other, false)) - (64.0 + 49.0 + 36.0) / 3.0).abs() < 1e-4);
        // norm_pix (unbiased variance, as torch's `var`): the standardised patch (−1, 0, 1) is exact.
        let standard = Tensor::<3>::from_data(TensorData::new(vec![-1.0f32, 0.0, 1.0, -1.0, 0.0, 1.0], [1, 2, 3]), &device);
        assert!(read(mae_loss(standard, target, mask, true)) < 1e-4);
    }
}
