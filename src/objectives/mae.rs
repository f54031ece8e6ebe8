//! The MAE objective (issue 15): random patch masking with an exact count per image (so every
//! image of a batch keeps the same number of visible patches and shapes stay fixed),
//! patchifying images into per-patch pixel targets, the reconstruction loss on the masked
//! patches with per-patch normalised pixels (`norm_pix_loss`), MAE's light decoder, and
//! [`MaeModel`] (encoder + decoder) that the pre-training step trains, as in the MAE reference
//! code.

use burn::module::{Module, Param};
use burn::nn::{Initializer, LayerNorm, LayerNormConfig, Linear};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::rngs::Xoshiro256PlusPlus;

use crate::data::rng::{mix64, shuffle};
use crate::model::{Block, Lora, TokenLayout, Vit};

/// The MAE decoder's shape (the reference defaults: width 512, 8 blocks, 16 heads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecoderConfig {
    pub width: usize,
    pub depth: usize,
    pub heads: usize,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        Self { width: 512, depth: 8, heads: 16 }
    }
}

/// MAE's lightweight decoder: the encoder's visible tokens projected to the decoder width,
/// mask tokens put back at the masked positions, fixed 2-D sine-cosine position embeddings,
/// transformer blocks, and a linear prediction of each patch's pixels.
#[derive(Module, Debug)]
pub struct MaeDecoder {
    pub embed: Linear,
    /// `[1, 1, width]`
    pub mask_token: Param<Tensor<3>>,
    pub blocks: Vec<Block>,
    pub norm: LayerNorm,
    pub pred: Linear,
    /// Patches per side of the grid the position embeddings are built for.
    grid: usize,
}

impl DecoderConfig {
    /// A fresh decoder after an encoder of width `encoder_width` on a `grid × grid` patch grid
    /// of `patch`-pixel patches.
    pub fn init(&self, encoder_width: usize, grid: usize, patch: usize, device: &Device) -> MaeDecoder {
        // Xavier-uniform weights and zero biases, as the MAE reference initialises its linears.
        let linear = |i, o| crate::model::init_linear(i, o, Initializer::XavierUniform { gain: 1.0 }, device);
        MaeDecoder {
            embed: linear(encoder_width, self.width),
            mask_token: Initializer::Normal { mean: 0.0, std: 0.02 }.init([1, 1, self.width], device),
            blocks: (0..self.depth).map(|_| Block::new(self.width, self.heads, 4 * self.width, false, None, 1e-6, device)).collect(),
            norm: LayerNormConfig::new(self.width).with_epsilon(1e-6).init(device),
            pred: linear(self.width, patch * patch * 3),
            grid,
        }
    }
}

impl DecoderConfig {
    /// Parameters of a fresh decoder after an encoder of width `encoder_width` with
    /// `patch`-pixel patches (all of them train).
    pub fn num_params(&self, encoder_width: usize, patch: usize) -> usize {
        let w = self.width;
        let out = patch * patch * 3;
        let block = 2 * w + (3 * w * w + 3 * w) + (w * w + w) + 2 * w + (4 * w * w + 4 * w) + (4 * w * w + w);
        (encoder_width * w + w) + w + self.depth * block + 2 * w + (w * out + out)
    }

    /// Trainable parameters of a decoder of this shape loaded from a checkpoint and adapted
    /// with [`MaeDecoder::adapt`]: LoRA of rank `rank` on Q and V of every block, and the norms.
    pub fn adapted_params(&self, rank: usize) -> usize {
        let w = self.width;
        self.depth * (2 * rank * (w + w) + 4 * w) + 2 * w
    }
}

/// MAE's fixed 2-D sine-cosine position embeddings `[(1 + grid²) · dim]` (a zero row for CLS
/// first): half the channels encode the column, half the row, each as sin/cos pairs at
/// frequencies 1/10000^(2i/(dim/2)).
pub fn sincos_2d(dim: usize, grid: usize) -> Vec<f32> {
    let quarter = dim / 4;
    let mut out = vec![0f32; (1 + grid * grid) * dim];
    for r in 0..grid {
        for c in 0..grid {
            let row = &mut out[(1 + r * grid + c) * dim..][..dim];
            for (half, pos) in [(0, c), (1, r)] {
                for i in 0..quarter {
                    let omega = 1.0 / 10_000f64.powf(i as f64 / quarter as f64);
                    let angle = pos as f64 * omega;
                    row[half * 2 * quarter + i] = angle.sin() as f32;
                    row[half * 2 * quarter + quarter + i] = angle.cos() as f32;
                }
            }
        }
    }
    out
}

impl MaeDecoder {
    /// `latent` `[B, 1 + K, D]` (the encoder's CLS then the visible patches, no registers) and
    /// the mask that chose them → predicted pixels of every patch `[B, N, p·p·3]`.
    pub fn forward(&self, latent: Tensor<3>, mask: &PatchMask) -> Tensor<3> {
        let device = latent.device();
        let x = self.embed.forward(latent);
        let [b, one_plus_k, w] = x.dims();
        let n = mask.patches;
        let k = one_plus_k - 1;
        // Visible tokens then mask tokens, unshuffled into patch order by `restore`.
        let tokens = Tensor::cat(vec![x.clone().narrow(1, 1, k), self.mask_token.val().expand([b, n - k, w])], 1);
        let restore = Tensor::<2, Int>::from_data(TensorData::new(mask.restore_indices(), [b, n]), &device);
        let patches = tokens.gather(1, restore.unsqueeze_dim::<3>(2).expand([b, n, w]));
        let pos = Tensor::<3>::from_data(TensorData::new(sincos_2d(w, self.grid), [1, 1 + n, w]), &device);
        let mut x = Tensor::cat(vec![x.narrow(1, 0, 1), patches], 1) + pos;
        let layout = TokenLayout { prefix: 1, grid: (self.grid, self.grid) };
        for block in &self.blocks {
            x = block.forward(x, false, layout, None).0;
        }
        let x = self.norm.forward(x);
        self.pred.forward(x.narrow(1, 1, n))
    }
}

impl MaeDecoder {
    pub fn width(&self) -> usize {
        self.mask_token.dims()[2]
    }

    pub fn depth(&self) -> usize {
        self.blocks.len()
    }

    /// Patches per side of the grid the position embeddings are built for.
    pub fn grid(&self) -> usize {
        self.grid
    }

    /// ExPLoRA's treatment of a decoder that came with the checkpoint: LoRA (rank `rank`,
    /// `alpha`) on Q and V of every block; the LoRA factors and the LayerNorms train, the rest
    /// (embedding, mask token, block weights, prediction) stays frozen.
    pub fn adapt(mut self, rank: usize, alpha: f64) -> Self {
        let device = self.mask_token.val().device();
        let w = self.width();
        for block in self.blocks.iter_mut() {
            block.attn.lora_q = Some(Lora::new(w, w, rank, alpha, 0.0, &device));
            block.attn.lora_v = Some(Lora::new(w, w, rank, alpha, 0.0, &device));
        }
        let group = burn::module::ParamGroup::from_any_regexes(vec![r"\.lora_[qv]\.(a|b)$", r"(^|\.)norm[12]?\.(gamma|beta)$"])
            .expect("valid patterns");
        self.no_grad().set_require_grad_group(group, true)
    }
}

/// The MAE objective's model: the adapted encoder and the decoder. Parameter paths are
/// `backbone.*` (as the DINOv2 student's, so the optimizer's layer-wise rules apply) and
/// `decoder.*`.
#[derive(Module, Debug)]
pub struct MaeModel {
    pub backbone: Vit,
    pub decoder: MaeDecoder,
}

impl MaeModel {
    /// Predicted pixels of every patch `[B, N, p·p·3]` for `images` under `mask`.
    pub fn forward(&self, images: Tensor<4>, mask: &PatchMask) -> Tensor<3> {
        let device = images.device();
        let latent = self.backbone.forward_visible(images, mask.keep_tensor(&device));
        // The decoder reads CLS and the visible patches; register tokens stay in the encoder.
        let r = self.backbone.config().num_registers;
        let latent = if r > 0 {
            let [_, t, _] = latent.dims();
            Tensor::cat(vec![latent.clone().narrow(1, 0, 1), latent.narrow(1, 1 + r, t - 1 - r)], 1)
        } else {
            latent
        };
        self.decoder.forward(latent, mask)
    }

    /// The reconstruction loss of `images` (ImageNet-normalised, the targets too, as MAE)
    /// under `mask`, and the prediction.
    pub fn loss(&self, images: Tensor<4>, mask: &PatchMask, norm_pix: bool) -> (Tensor<1>, Tensor<3>) {
        let device = images.device();
        let patch = self.backbone.config().patch_size;
        let pred = self.forward(images.clone(), mask);
        (mae_loss(pred.clone(), patchify(images, patch), mask.weights(&device), norm_pix), pred)
    }
}

/// The mask of micro-batch `micro` of optimizer step `step` of a run seeded `seed`: a pure
/// function of the three, so a resumed run draws the masks of the uninterrupted one.
pub fn step_mask(seed: u64, step: u64, micro: u64, batch: usize, patches: usize, ratio: f64) -> PatchMask {
    use rand::SeedableRng;
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(mix64(mix64(seed ^ 0x4D41_4500) ^ step.wrapping_mul(0x1_0000) ^ micro));
    PatchMask::random(batch, patches, ratio, &mut rng)
}

/// Predictions back in image space (`[B, N, p·p·3]` → `[B, 3, g·p, g·p]`): with `norm_pix`
/// each predicted patch is un-normalised with its target patch's own mean and variance (what
/// the loss normalised away), as MAE's visualisation does.
pub fn reconstruct(pred: Tensor<3>, images: Tensor<4>, patch: usize, norm_pix: bool) -> Tensor<4> {
    let [b, _, h, w] = images.dims();
    let pred = if norm_pix {
        let target = patchify(images, patch);
        let mean = target.clone().mean_dim(2);
        let var = target.var(2);
        pred * var.add_scalar(1e-6).sqrt() + mean
    } else {
        pred
    };
    let (gh, gw) = (h / patch, w / patch);
    pred.reshape([b, gh, gw, patch, patch, 3]).permute([0, 5, 1, 3, 2, 4]).reshape([b, 3, h, w])
}

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

    /// The visible indices as a `[B, K]` tensor (what [`crate::model::Vit::forward_visible`] takes).
    pub fn keep_tensor(&self, device: &Device) -> Tensor<2, Int> {
        let k = self.keep.first().map_or(0, Vec::len);
        let values: Vec<i64> = self.keep.iter().flatten().map(|&p| p as i64).collect();
        Tensor::from_data(TensorData::new(values, [self.keep.len(), k]), device)
    }

    /// For each image and patch position, where that patch sits in "visible patches, then the
    /// masked ones in ascending order" (MAE's `ids_restore`), `[B·N]` row-major.
    pub fn restore_indices(&self) -> Vec<i64> {
        let n = self.patches;
        let mut out = vec![0i64; self.keep.len() * n];
        for (b, keep) in self.keep.iter().enumerate() {
            let masked = (0..n).filter(|p| self.masked[b * n + p]);
            for (slot, p) in keep.iter().copied().chain(masked).enumerate() {
                out[b * n + p] = slot as i64;
            }
        }
        out
    }

    /// The mask as a `[B, N]` float tensor (1 = masked), for weighting the loss.
    pub fn weights(&self, device: &Device) -> Tensor<2> {
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
        assert_eq!(p[12 + 3 + 2], 35.0); // patch 1 starts at 12; pixel (0, 1) at 3; channel 2
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

    #[test]
    fn decoder_budgets_match_the_modules_and_reconstruct_inverts_patchify() {
        use crate::model::params::for_each_param;
        let device = Device::flex();
        let shape = DecoderConfig { width: 32, depth: 2, heads: 4 };
        let count = |d: &MaeDecoder| {
            let mut n = 0;
            for_each_param(d, |_, t, trainable| n += if trainable { t.dims()[0] } else { 0 });
            n
        };
        let fresh = shape.init(64, 4, 8, &device.clone().autodiff());
        assert_eq!(count(&fresh), shape.num_params(64, 8));
        assert_eq!(count(&fresh.adapt(8, 1.0)), shape.adapted_params(8));

        // Patch targets back to images: exact without norm_pix; with it, the normalised target
        // un-normalises to the image.
        let images = Tensor::<4>::random([2, 3, 16, 16], burn::tensor::Distribution::Normal(0.0, 1.0), &device);
        let patches = patchify(images.clone(), 8);
        let read = |t: Tensor<4>| crate::model::to_vec(t);
        assert_eq!(read(reconstruct(patches.clone(), images.clone(), 8, false)), read(images.clone()));
        let mean = patches.clone().mean_dim(2);
        let var = patches.clone().var(2);
        let normalised = (patches - mean).div(var.add_scalar(1e-6).sqrt());
        let back = read(reconstruct(normalised, images.clone(), 8, true));
        let diff = back.iter().zip(read(images)).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(diff < 1e-4, "{diff}");
    }

    #[test]
    fn register_tokens_stay_in_the_encoder() {
        let device = Device::flex();
        let encoder = crate::model::VitConfig { num_registers: 2, ..crate::model::VitConfig::tiny() }.init(&device);
        let model = MaeModel { backbone: encoder, decoder: DecoderConfig { width: 32, depth: 1, heads: 2 }.init(64, 4, 8, &device) };
        let images = Tensor::<4>::random([3, 3, 32, 32], burn::tensor::Distribution::Normal(0.0, 1.0), &device);
        let mask = step_mask(1, 2, 0, 3, 16, 0.75);
        assert_eq!(mask, step_mask(1, 2, 0, 3, 16, 0.75), "masks are a function of seed, step and micro-batch");
        assert_ne!(mask, step_mask(1, 3, 0, 3, 16, 0.75));
        let (loss, pred) = model.loss(images, &mask, true);
        assert_eq!(pred.dims(), [3, 16, 8 * 8 * 3]);
        assert!(loss.into_scalar::<f32>().is_finite());
    }

    #[derive(Module, Debug)]
    struct Mae {
        encoder: crate::model::Vit,
        decoder: MaeDecoder,
    }

    /// Reconstruction loss of `model` on `images` under `mask` (registers: the tiny ViT has none).
    fn loss_of(model: &Mae, images: Tensor<4>, mask: &PatchMask) -> Tensor<1> {
        let device = images.device();
        let latent = model.encoder.forward_visible(images.clone(), mask.keep_tensor(&device));
        let pred = model.decoder.forward(latent, mask);
        mae_loss(pred, patchify(images, 8), mask.weights(&device), true)
    }

    #[test]
    fn the_mae_loss_falls_and_held_out_reconstructions_improve() {
        use crate::data::{Preprocess, ProceduralDomain, Shift};
        use crate::model::params::{accumulate_grads, sign_descent};
        let device = Device::flex();
        let ad = device.clone().autodiff();
        device.seed(5);
        ad.seed(5);
        let domain = ProceduralDomain { size: 32, seed: 11, shift: Shift::Source };
        let pre = Preprocess::new(32);
        let tensor = |start: u64, n: usize, device: &Device| {
            let data: Vec<f32> = domain.batch(start, n).iter().flat_map(|(img, _)| pre.to_tensor_data(img)).collect();
            Tensor::<4>::from_data(TensorData::new(data, [n, 3, 32, 32]), device)
        };
        let (train, held_out) = (tensor(0, 16, &ad), tensor(10_000, 16, &device));
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(2);
        let held_out_mask = PatchMask::random(16, 16, 0.75, &mut Xoshiro256PlusPlus::seed_from_u64(99));
        let mut model = Mae {
            encoder: crate::model::VitConfig::tiny().init(&ad),
            decoder: DecoderConfig { width: 32, depth: 1, heads: 2 }.init(64, 4, 8, &ad),
        };
        let read = |t: Tensor<1>| t.into_scalar::<f32>();
        let before = read(loss_of(&model.valid(), held_out.clone(), &held_out_mask));
        let mut losses = Vec::new();
        for _ in 0..60 {
            let mask = PatchMask::random(16, 16, 0.75, &mut rng);
            let loss = loss_of(&model, train.clone(), &mask);
            losses.push(read(loss.clone()));
            let mut grads = std::collections::HashMap::new();
            accumulate_grads(&model, &loss.backward(), &mut grads);
            model = sign_descent(model, &grads, 2e-3);
        }
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
        let (first, last) = (mean(&losses[..5]), mean(&losses[losses.len() - 5..]));
        assert!(last < 0.8 * first, "training loss {first} → {last}");
        let after = read(loss_of(&model.valid(), held_out, &held_out_mask));
        eprintln!("MAE on 16 tiles, 60 steps: train loss {first:.3} → {last:.3}; held-out {before:.3} → {after:.3}");
        assert!(after < 0.9 * before, "held-out reconstruction error {before} → {after}");
    }
}
