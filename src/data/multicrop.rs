//! DINOv2 multi-crop augmentation and iBOT block masks for self-supervised (ExPLoRA)
//! pre-training, deterministic under a seed, with a prefetching loader.
//!
//! # The recipe
//!
//! Every image yields two *global* crops (224 px, covering 32–100 % of the image) and several
//! *local* crops (98 px, 5–32 %), as in DINOv2 (`DataAugmentationDINO`):
//!
//! 1. geometry: a torchvision-style `RandomResizedCrop` (area fraction uniform in the scale
//!    range, aspect ratio log-uniform in [3/4, 4/3], ten attempts then a centre crop; bicubic
//!    resampling) and a horizontal flip with probability 0.5. With
//!    [`MultiCropConfig::overhead`] each crop is also rotated by a random multiple of 90° and
//!    flipped vertically with probability 0.5: the symmetries of overhead (satellite/aerial)
//!    imagery, which has no "up";
//! 2. colour: with probability 0.8 a colour jitter (brightness 0.4, contrast 0.4, saturation
//!    0.2, hue 0.1, the four operations in a random order), then grayscale with probability
//!    0.2;
//! 3. blur and solarisation: a Gaussian blur with σ uniform in [0.1, 2.0] (at 224 px) with
//!    probability 1.0 on the first global crop, 0.1 on the second and 0.5 on local crops; the
//!    second global crop is also solarised (pixels ≥ 128 inverted) with probability 0.2.
//!
//! The student sees all crops, the teacher only the global ones. For iBOT, a fraction of the
//! global crops of a batch (0.5) get block-wise patch masks ([`block_mask`], BEiT's
//! `MaskingGenerator`) whose masking ratios are spread evenly over [0.1, 0.5], exactly like
//! DINOv2's `collate_data_and_cast`; [`max_masked`] bounds the masked patches of a batch.
//!
//! # Determinism
//!
//! A batch depends only on the source, the [`BatchSpec`] and its step number, never on thread
//! scheduling: sample `j` of step `s` sits at stream position `g = s·B + j`, which reads image
//! `perm_e[g mod len]` of a seeded shuffle of epoch `e = g / len`, and its crops are drawn from
//! a random generator seeded from `(seed, g)`. The masks of a batch are seeded from
//! `(seed, s)`. So training resumed at step `k` sees exactly the batches it would have seen,
//! and [`CropLoader`] yields exactly what [`build_batch`] returns.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, sync_channel};
use std::thread::JoinHandle;

use image::imageops::{self, FilterType};
use image::{Rgb, RgbImage};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use rayon::prelude::*;

use super::DataError;
use super::folder::{ImageList, decode_rgb};
use super::preprocess::normalize_chw;
use super::procedural::ProceduralDomain;
use super::rng::{mix64, shuffle};
use crate::fields::FieldError;

// ---------------------------------------------------------------------------------------------
// Configuration.

fn field_error(field: &str, reason: impl Into<String>) -> FieldError {
    FieldError::run(field, reason)
}

/// The multi-crop augmentation; `Default` is DINOv2's recipe. Probabilities are in [0, 1].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MultiCropConfig {
    /// Side of the two global crops in pixels (a multiple of the patch size).
    pub global_size: u32,
    /// Side of the local crops in pixels.
    pub local_size: u32,
    /// Number of local crops per image (may be 0).
    pub local_crops: usize,
    /// Range of the fraction of the image area covered by a global crop, in (0, 1].
    pub global_scale: [f32; 2],
    /// Range of the fraction of the image area covered by a local crop, in (0, 1].
    pub local_scale: [f32; 2],
    /// Probability of a horizontal flip.
    pub hflip: f32,
    /// Probability of applying the colour jitter.
    pub color_jitter: f32,
    /// Brightness jitter: a factor uniform in [max(0, 1 - b), 1 + b] multiplies the pixels.
    pub brightness: f32,
    /// Contrast jitter: blend with the mean gray by a factor in [max(0, 1 - c), 1 + c].
    pub contrast: f32,
    /// Saturation jitter: blend with each pixel's gray by a factor in [max(0, 1 - s), 1 + s].
    pub saturation: f32,
    /// Hue jitter: the hue is rotated by a shift uniform in [-hue, hue] turns; at most 0.5.
    pub hue: f32,
    /// Probability of converting to grayscale (ITU-R 601 luma, kept as 3 channels).
    pub grayscale: f32,
    /// Range of the Gaussian blur σ in pixels **for a 224 px crop**; a crop of side `s` uses
    /// σ·s/224, so a blur removes the same fraction of detail at any crop size.
    pub blur_sigma: [f32; 2],
    /// Blur probability of the first and of the second global crop.
    pub blur_global: [f32; 2],
    /// Blur probability of each local crop.
    pub blur_local: f32,
    /// Solarisation probability of the second global crop (the only one ever solarised).
    pub solarize: f32,
    /// Overhead imagery: also rotate each crop by a random multiple of 90° and flip it
    /// vertically with probability 0.5.
    pub overhead: bool,
}

impl Default for MultiCropConfig {
    fn default() -> Self {
        MultiCropConfig {
            global_size: 224,
            local_size: 98,
            local_crops: 8,
            global_scale: [0.32, 1.0],
            local_scale: [0.05, 0.32],
            hflip: 0.5,
            color_jitter: 0.8,
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.2,
            hue: 0.1,
            grayscale: 0.2,
            blur_sigma: [0.1, 2.0],
            blur_global: [1.0, 0.1],
            blur_local: 0.5,
            solarize: 0.2,
            overhead: false,
        }
    }
}

fn check_probability(field: &str, p: f32) -> Result<(), FieldError> {
    if (0.0..=1.0).contains(&p) { Ok(()) } else { Err(field_error(field, format!("must be a probability in [0, 1], got {p}"))) }
}

fn check_fraction_range(field: &str, r: [f32; 2], zero_ok: bool) -> Result<(), FieldError> {
    let lower_ok = |v: f32| if zero_ok { v >= 0.0 } else { v > 0.0 };
    let interval = if zero_ok { "[0, 1]" } else { "(0, 1]" };
    for v in r {
        if !(lower_ok(v) && v <= 1.0) {
            return Err(field_error(field, format!("values must lie in {interval}, got [{}, {}]", r[0], r[1])));
        }
    }
    if r[0] > r[1] {
        return Err(field_error(field, format!("minimum {} is larger than maximum {}", r[0], r[1])));
    }
    Ok(())
}

fn check_non_negative(field: &str, v: f32) -> Result<(), FieldError> {
    if v.is_finite() && v >= 0.0 { Ok(()) } else { Err(field_error(field, format!("must be a finite number ≥ 0, got {v}"))) }
}

impl MultiCropConfig {
    /// Checks every field; errors name the field as `crops.<name>`.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.global_size == 0 {
            return Err(field_error("crops.global_size", "must be at least 1 pixel"));
        }
        if self.local_size == 0 {
            return Err(field_error("crops.local_size", "must be at least 1 pixel"));
        }
        check_fraction_range("crops.global_scale", self.global_scale, false)?;
        check_fraction_range("crops.local_scale", self.local_scale, false)?;
        check_probability("crops.hflip", self.hflip)?;
        check_probability("crops.color_jitter", self.color_jitter)?;
        check_non_negative("crops.brightness", self.brightness)?;
        check_non_negative("crops.contrast", self.contrast)?;
        check_non_negative("crops.saturation", self.saturation)?;
        if !(0.0..=0.5).contains(&self.hue) {
            return Err(field_error("crops.hue", format!("must lie in [0, 0.5] (a fraction of a turn), got {}", self.hue)));
        }
        check_probability("crops.grayscale", self.grayscale)?;
        let [s0, s1] = self.blur_sigma;
        if !(s0.is_finite() && s1.is_finite() && s0 > 0.0 && s1 > 0.0) {
            return Err(field_error("crops.blur_sigma", format!("values must be finite and > 0, got [{s0}, {s1}]")));
        }
        if s0 > s1 {
            return Err(field_error("crops.blur_sigma", format!("minimum {s0} is larger than maximum {s1}")));
        }
        check_probability("crops.blur_global", self.blur_global[0])?;
        check_probability("crops.blur_global", self.blur_global[1])?;
        check_probability("crops.blur_local", self.blur_local)?;
        check_probability("crops.solarize", self.solarize)?;
        Ok(())
    }
}

/// iBOT masking of the global crops; `Default` is DINOv2's.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MaskConfig {
    /// Fraction of the global crops of a batch that are masked: exactly
    /// `floor(crops · probability)` of them (see [`masked_crops`]).
    pub probability: f32,
    /// Range of the masking ratio (fraction of the patches masked) of a masked crop; the
    /// masked crops of a batch spread their ratios evenly over it.
    pub ratio: [f32; 2],
}

impl Default for MaskConfig {
    fn default() -> Self {
        MaskConfig { probability: 0.5, ratio: [0.1, 0.5] }
    }
}

impl MaskConfig {
    /// Checks every field; errors name the field as `masks.<name>`.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_probability("masks.probability", self.probability)?;
        check_fraction_range("masks.ratio", self.ratio, true)
    }
}

/// Everything that determines the batches of a run (together with the image source).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchSpec {
    pub crops: MultiCropConfig,
    pub masks: MaskConfig,
    /// Patch size of the model in pixels; `crops.global_size` must be a multiple of it.
    pub patch_size: usize,
    /// Images per batch (B).
    pub batch: usize,
    /// Seed of the image order, the augmentations and the masks.
    pub seed: u64,
    /// Keep the un-normalised crops of sample 0 ([`CropBatch::preview`]) on steps that are a
    /// multiple of this; 0 never does.
    pub preview_every: u64,
}

impl Default for BatchSpec {
    /// DINOv2's crops and masks for a patch-14 model, batches of 32, seed 0, no previews.
    fn default() -> Self {
        BatchSpec { crops: MultiCropConfig::default(), masks: MaskConfig::default(), patch_size: 14, batch: 32, seed: 0, preview_every: 0 }
    }
}

impl BatchSpec {
    /// Checks the crop and mask configs, the batch size and that the global crops are a whole
    /// number of patches.
    pub fn validate(&self) -> Result<(), FieldError> {
        self.crops.validate()?;
        self.masks.validate()?;
        if self.patch_size == 0 {
            return Err(field_error("patch_size", "must be at least 1 pixel"));
        }
        if self.batch == 0 {
            return Err(field_error("batch", "must be at least 1"));
        }
        if !(self.crops.global_size as usize).is_multiple_of(self.patch_size) {
            return Err(field_error(
                "crops.global_size",
                format!("{} is not a multiple of the patch size {}", self.crops.global_size, self.patch_size),
            ));
        }
        Ok(())
    }

    /// Patches per side of a global crop.
    pub fn grid(&self) -> usize {
        self.crops.global_size as usize / self.patch_size.max(1)
    }

    /// Whether batches of `step` keep a preview.
    pub fn wants_preview(&self, step: u64) -> bool {
        self.preview_every > 0 && step.is_multiple_of(self.preview_every)
    }
}

// ---------------------------------------------------------------------------------------------
// Random helpers.

// Independent streams derived from the one seed.
const STREAM_ORDER: u64 = 0x0DE5_0F0E_90C8_5EED;
const STREAM_AUGMENT: u64 = 0xA5A5_C20B_5A11_0001;
const STREAM_MASKS: u64 = 0x1B07_3A5C_0000_0002;
const STREAM_SUPERVISED: u64 = 0x5EB7_1CED_0000_0003;

/// A generator for item `index` of stream `stream` under `seed`.
fn stream_rng(seed: u64, stream: u64, index: u64) -> Xoshiro256PlusPlus {
    Xoshiro256PlusPlus::seed_from_u64(mix64(mix64(seed ^ stream).wrapping_add(mix64(index))))
}

/// Uniform in [a, b) (or [b, a)), also for an empty range, where it returns `a`.
fn uniform(rng: &mut Xoshiro256PlusPlus, a: f64, b: f64) -> f64 {
    a + (b - a) * rng.random::<f64>()
}

/// Bernoulli trial; `p` ≥ 1 always succeeds, `p` ≤ 0 never does.
fn chance(rng: &mut Xoshiro256PlusPlus, p: f32) -> bool {
    rng.random::<f32>() < p
}

// ---------------------------------------------------------------------------------------------
// Augmentation.

/// The crops of one image: two global crops, then the local crops.
#[derive(Debug, Clone, PartialEq)]
pub struct Crops {
    /// The two global crops (`global_size`²).
    pub globals: Vec<RgbImage>,
    /// The local crops (`local_size`²).
    pub locals: Vec<RgbImage>,
}

/// Aspect-ratio range of `RandomResizedCrop`.
const CROP_RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);

/// torchvision's `RandomResizedCrop.get_params`: `(x, y, width, height)` of a crop of an
/// image of `width`×`height` covering an area fraction in `scale` with a log-uniform aspect
/// ratio in [3/4, 4/3]; after ten misses, the largest centred crop with a ratio in range.
fn crop_rect(width: u32, height: u32, scale: [f32; 2], rng: &mut Xoshiro256PlusPlus) -> (u32, u32, u32, u32) {
    let area = width as f64 * height as f64;
    let (log_lo, log_hi) = (CROP_RATIO.0.ln(), CROP_RATIO.1.ln());
    for _ in 0..10 {
        let target = area * uniform(rng, scale[0] as f64, scale[1] as f64);
        let ratio = uniform(rng, log_lo, log_hi).exp();
        let w = (target * ratio).sqrt().round();
        let h = (target / ratio).sqrt().round();
        if w >= 1.0 && h >= 1.0 && w <= width as f64 && h <= height as f64 {
            let (w, h) = (w as u32, h as u32);
            let y = rng.random_range(0..=height - h);
            let x = rng.random_range(0..=width - w);
            return (x, y, w, h);
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < CROP_RATIO.0 {
        (width, ((width as f64 / CROP_RATIO.0).round() as u32).clamp(1, height))
    } else if in_ratio > CROP_RATIO.1 {
        (((height as f64 * CROP_RATIO.1).round() as u32).clamp(1, width), height)
    } else {
        (width, height)
    };
    ((width - w) / 2, (height - h) / 2, w, h)
}

/// A random resized crop of side `size` (bicubic resampling, antialiased when shrinking).
fn random_resized_crop(image: &RgbImage, size: u32, scale: [f32; 2], rng: &mut Xoshiro256PlusPlus) -> RgbImage {
    let (width, height) = image.dimensions();
    if width == 0 || height == 0 {
        return RgbImage::new(size, size);
    }
    let (x, y, w, h) = crop_rect(width, height, scale, rng);
    let view = imageops::crop_imm(image, x, y, w, h);
    imageops::resize(&*view, size, size, FilterType::CatmullRom)
}

/// Flip, and for overhead imagery rotation and vertical flip.
fn geometric(crop: &mut RgbImage, cfg: &MultiCropConfig, rng: &mut Xoshiro256PlusPlus) {
    if chance(rng, cfg.hflip) {
        imageops::flip_horizontal_in_place(crop);
    }
    if cfg.overhead {
        match rng.random_range(0..4u32) {
            1 => *crop = imageops::rotate90(crop),
            2 => imageops::rotate180_in_place(crop),
            3 => *crop = imageops::rotate270(crop),
            _ => {}
        }
        if chance(rng, 0.5) {
            imageops::flip_vertical_in_place(crop);
        }
    }
}

/// A view of `image` for supervised training: a random resized crop of side `size` covering a
/// fraction `scale` of the area, a horizontal flip, and for overhead imagery random 90°
/// rotations and vertical flips. Seeded by `(seed, index)`, like the multi-crop views.
pub fn train_view(image: &RgbImage, size: u32, scale: [f32; 2], overhead: bool, seed: u64, index: u64) -> RgbImage {
    let mut rng = stream_rng(seed, STREAM_SUPERVISED, index);
    let mut crop = random_resized_crop(image, size.max(1), scale, &mut rng);
    let cfg = MultiCropConfig { hflip: 0.5, overhead, ..MultiCropConfig::default() };
    geometric(&mut crop, &cfg, &mut rng);
    crop
}

/// ITU-R 601 luma of an RGB triple (same scale as the input).
#[inline(always)]
fn luma(r: f32, g: f32, b: f32) -> f32 {
    0.299 * r + 0.587 * g + 0.114 * b
}

/// Rotates the hue of an RGB pixel (values in 0..=255) by `shift6` sixths of a turn,
/// `shift6` in [0, 6), through HSV; grays are unchanged.
#[inline]
fn rotate_hue(px: &mut [f32], shift6: f32) {
    let (r, g, b) = (px[0], px[1], px[2]);
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let c = max - min;
    if c <= 0.0 {
        return;
    }
    let mut h = if max == r {
        (g - b) / c
    } else if max == g {
        (b - r) / c + 2.0
    } else {
        (r - g) / c + 4.0
    };
    // h is in [-1, 5] and shift6 in [0, 6): one wrap brings the sum into [0, 6).
    h += shift6;
    if h < 0.0 {
        h += 6.0;
    } else if h >= 6.0 {
        h -= 6.0;
    }
    let sector = (h as u32).min(5);
    let f = h - sector as f32;
    // Within a sector one channel is max, one min and one moves linearly between them.
    let (rise, fall) = (min + c * f, max - c * f);
    let (nr, ng, nb) = match sector {
        0 => (max, rise, min),
        1 => (fall, max, min),
        2 => (min, max, rise),
        3 => (min, fall, max),
        4 => (rise, min, max),
        _ => (max, min, fall),
    };
    px[0] = nr;
    px[1] = ng;
    px[2] = nb;
}

/// Draws a jitter factor in [max(0, 1 - amount), 1 + amount]; `None` when `amount` is 0.
fn jitter_factor(rng: &mut Xoshiro256PlusPlus, amount: f32) -> Option<f32> {
    (amount > 0.0).then(|| uniform(rng, (1.0 - amount as f64).max(0.0), 1.0 + amount as f64) as f32)
}

/// torchvision's `ColorJitter`: brightness, contrast, saturation and hue in a random order,
/// each clamping to the valid range, computed in `f32` and rounded once at the end.
fn color_jitter(img: &mut RgbImage, cfg: &MultiCropConfig, rng: &mut Xoshiro256PlusPlus) {
    let mut order = [0u8, 1, 2, 3];
    shuffle(&mut order, rng);
    let brightness = jitter_factor(rng, cfg.brightness);
    let contrast = jitter_factor(rng, cfg.contrast);
    let saturation = jitter_factor(rng, cfg.saturation);
    let hue = (cfg.hue > 0.0).then(|| uniform(rng, -cfg.hue as f64, cfg.hue as f64) as f32);

    let mut buf: Vec<f32> = img.as_raw().iter().map(|&v| v as f32).collect();
    if buf.is_empty() {
        return;
    }
    for op in order {
        match op {
            0 => {
                if let Some(f) = brightness {
                    buf.iter_mut().for_each(|v| *v = (*v * f).min(255.0));
                }
            }
            1 => {
                if let Some(f) = contrast {
                    let sum: f64 = buf.chunks_exact(3).map(|p| luma(p[0], p[1], p[2]) as f64).sum();
                    let mean = (sum / (buf.len() / 3) as f64) as f32;
                    let base = mean * (1.0 - f);
                    buf.iter_mut().for_each(|v| *v = (base + f * *v).clamp(0.0, 255.0));
                }
            }
            2 => {
                if let Some(f) = saturation {
                    for p in buf.chunks_exact_mut(3) {
                        let base = luma(p[0], p[1], p[2]) * (1.0 - f);
                        for v in p {
                            *v = (base + f * *v).clamp(0.0, 255.0);
                        }
                    }
                }
            }
            _ => {
                if let Some(shift) = hue.filter(|&s| s != 0.0) {
                    let shift6 = (shift * 6.0).rem_euclid(6.0);
                    buf.chunks_exact_mut(3).for_each(|p| rotate_hue(p, shift6));
                }
            }
        }
    }
    for (out, v) in img.iter_mut().zip(&buf) {
        *out = (v + 0.5) as u8; // values are clamped to [0, 255]: this rounds
    }
}

/// Grayscale (ITU-R 601 luma, as PIL's `convert("L")`) kept as three equal channels.
fn grayscale(img: &mut RgbImage) {
    for p in img.pixels_mut() {
        let [r, g, b] = p.0.map(u32::from);
        let l = ((r * 299 + g * 587 + b * 114 + 500) / 1000) as u8;
        p.0 = [l; 3];
    }
}

/// Inverts every channel value ≥ 128 (torchvision's `RandomSolarize(threshold=128)`).
fn solarize(img: &mut RgbImage) {
    for v in img.iter_mut() {
        if *v >= 128 {
            *v = 255 - *v;
        }
    }
}

/// Colour jitter, grayscale, blur (probability `blur_p`) and solarisation (`solarize_p`).
fn photometric(crop: &mut RgbImage, cfg: &MultiCropConfig, blur_p: f32, solarize_p: f32, rng: &mut Xoshiro256PlusPlus) {
    if chance(rng, cfg.color_jitter) {
        color_jitter(crop, cfg, rng);
    }
    if chance(rng, cfg.grayscale) {
        grayscale(crop);
    }
    if chance(rng, blur_p) {
        let sigma = uniform(rng, cfg.blur_sigma[0] as f64, cfg.blur_sigma[1] as f64) as f32;
        // σ is defined for 224 px crops; scale it with the crop.
        let sigma = (sigma * crop.width() as f32 / 224.0).max(1e-3);
        if crop.width() > 0 && crop.height() > 0 && sigma.is_finite() {
            *crop = imageops::blur(crop, sigma);
        }
    }
    if solarize_p > 0.0 && chance(rng, solarize_p) {
        solarize(crop);
    }
}

/// The DINOv2 multi-crop augmentation of one image (see the module documentation); `cfg`
/// should be valid ([`MultiCropConfig::validate`]). Fully determined by the image, `cfg` and
/// the state of `rng`.
pub fn augment(image: &RgbImage, cfg: &MultiCropConfig, rng: &mut Xoshiro256PlusPlus) -> Crops {
    let global_size = cfg.global_size.max(1);
    let local_size = cfg.local_size.max(1);
    let globals = (0..2)
        .map(|k| {
            let mut crop = random_resized_crop(image, global_size, cfg.global_scale, rng);
            geometric(&mut crop, cfg, rng);
            let solarize_p = if k == 1 { cfg.solarize } else { 0.0 };
            photometric(&mut crop, cfg, cfg.blur_global[k], solarize_p, rng);
            crop
        })
        .collect();
    let locals = (0..cfg.local_crops)
        .map(|_| {
            let mut crop = random_resized_crop(image, local_size, cfg.local_scale, rng);
            geometric(&mut crop, cfg, rng);
            photometric(&mut crop, cfg, cfg.blur_local, 0.0, rng);
            crop
        })
        .collect();
    Crops { globals, locals }
}

// ---------------------------------------------------------------------------------------------
// iBOT masks.

/// Smallest block (in patches) [`block_mask`] aims for.
const MIN_BLOCK_PATCHES: f64 = 4.0;
/// Aspect-ratio range of a mask block: log-uniform in [0.3, 1/0.3].
const MIN_BLOCK_ASPECT: f64 = 0.3;
/// Misses in a row after which [`block_mask`] stops.
const BLOCK_ATTEMPTS: usize = 10;

/// Tries to mask one rectangle adding between 1 and `budget` new cells; returns how many.
fn place_block(mask: &mut [bool], rows: usize, cols: usize, budget: f64, rng: &mut Xoshiro256PlusPlus) -> usize {
    let (log_lo, log_hi) = (MIN_BLOCK_ASPECT.ln(), (1.0 / MIN_BLOCK_ASPECT).ln());
    for _ in 0..BLOCK_ATTEMPTS {
        // As Python's `random.uniform(4, budget)`, also when budget < 4.
        let area = uniform(rng, MIN_BLOCK_PATCHES, budget);
        let aspect = uniform(rng, log_lo, log_hi).exp();
        let h = (area * aspect).sqrt().round() as usize;
        let w = (area / aspect).sqrt().round() as usize;
        if h == 0 || w == 0 || h > rows || w > cols {
            continue;
        }
        let top = rng.random_range(0..=rows - h);
        let left = rng.random_range(0..=cols - w);
        let already: usize = (top..top + h).map(|r| mask[r * cols + left..r * cols + left + w].iter().filter(|&&m| m).count()).sum();
        let new = h * w - already;
        if new > 0 && new as f64 <= budget {
            for r in top..top + h {
                mask[r * cols + left..r * cols + left + w].fill(true);
            }
            return new;
        }
    }
    0
}

/// A block-wise mask of a `rows`×`cols` patch grid (row-major, `true` = masked) with at most
/// `num_masked` masked patches, as BEiT/DINOv2's `MaskingGenerator`: rectangles of at least 4
/// patches (fewer only to fill the last few), at most half the grid, with aspect ratio
/// log-uniform in [0.3, 1/0.3], are placed at random (overlaps allowed, only new cells count)
/// without exceeding `num_masked`, until 10 attempts in a row fail. Usually the count reaches
/// `num_masked` or comes close; if no rectangle fits at all, one random patch is masked so
/// that a positive target always masks something.
pub fn block_mask(rows: usize, cols: usize, num_masked: usize, rng: &mut Xoshiro256PlusPlus) -> Vec<bool> {
    let n = rows * cols;
    let mut mask = vec![false; n];
    let target = num_masked.min(n);
    if target == 0 {
        return mask;
    }
    let max_block = 0.5 * n as f64;
    let mut count = 0;
    while count < target {
        let budget = ((target - count) as f64).min(max_block);
        let added = place_block(&mut mask, rows, cols, budget, rng);
        if added == 0 {
            break;
        }
        count += added;
    }
    if count == 0 {
        mask[rng.random_range(0..n)] = true;
    }
    mask
}

/// How many of `num_global_crops` global crops are masked: `floor(num_global_crops · p)`
/// (with a tolerance of 1e-6 so that e.g. 10 · 0.7 gives 7 despite `f32` rounding).
pub fn masked_crops(num_global_crops: usize, cfg: &MaskConfig) -> usize {
    let p = (cfg.probability as f64).clamp(0.0, 1.0);
    ((num_global_crops as f64 * p + 1e-6).floor() as usize).min(num_global_crops)
}

/// `n + 1` evenly spaced masking ratios over `cfg.ratio` (`np.linspace(min, max, n + 1)`):
/// masked crop `k` draws its ratio uniformly between entries `k` and `k + 1`.
fn ratio_edges(n: usize, cfg: &MaskConfig) -> Vec<f64> {
    let (lo, hi) = (cfg.ratio[0] as f64, cfg.ratio[1] as f64);
    (0..=n).map(|i| if i == n { hi } else { lo + (hi - lo) * i as f64 / n as f64 }).collect()
}

/// An upper bound on the masked patches of a batch with `num_global_crops` global crops of
/// `patches` patches each (DINOv2's `upperbound`): the sum over masked crops of
/// `floor(patches · ratio_max_k)`, so a consumer can pad the masked positions to a fixed size.
pub fn max_masked(num_global_crops: usize, patches: usize, cfg: &MaskConfig) -> usize {
    let n = masked_crops(num_global_crops, cfg);
    ratio_edges(n, cfg)[1..].iter().map(|&r| ((patches as f64 * r).floor() as usize).min(patches)).sum()
}

/// The masks of `num_crops` global crops on a `grid`×`grid` patch grid, concatenated
/// (`num_crops · grid²`, crop `i` at `i · grid²`), as DINOv2's `collate_data_and_cast`.
fn batch_masks(num_crops: usize, grid: usize, cfg: &MaskConfig, rng: &mut Xoshiro256PlusPlus) -> Vec<bool> {
    let patches = grid * grid;
    let n = masked_crops(num_crops, cfg);
    let edges = ratio_edges(n, cfg);
    let mut order: Vec<usize> = (0..num_crops).collect();
    shuffle(&mut order, rng);
    let mut out = vec![false; num_crops * patches];
    for k in 0..n {
        let ratio = uniform(rng, edges[k], edges[k + 1]).min(edges[k + 1]);
        let count = ((patches as f64 * ratio).floor() as usize).min(patches);
        let mask = block_mask(grid, grid, count, rng);
        let crop = order[k];
        out[crop * patches..(crop + 1) * patches].copy_from_slice(&mask);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Image sources.

/// A finite, indexable collection of images (one epoch).
pub trait ImageSource: Send + Sync {
    /// Number of images in an epoch.
    fn len(&self) -> usize;
    /// Whether the source holds no image.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Decodes image `index` (< `len()`) to RGB8.
    fn load(&self, index: usize) -> Result<RgbImage, DataError>;
    /// A short description for the user, e.g. `image folder data/ (27000 images)`.
    fn describe(&self) -> String;
    /// The file behind image `index`, if there is one.
    fn path(&self, index: usize) -> Option<PathBuf>;
}

/// The images of a folder (labels ignored).
#[derive(Debug, Clone)]
pub struct FolderSource {
    pub list: ImageList,
}

impl ImageSource for FolderSource {
    fn len(&self) -> usize {
        self.list.len()
    }

    fn load(&self, index: usize) -> Result<RgbImage, DataError> {
        match self.list.items.get(index) {
            Some(item) => decode_rgb(&item.path),
            None => Err(DataError::Invalid { reason: format!("image index {index} is out of range ({} images)", self.list.len()) }),
        }
    }

    fn describe(&self) -> String {
        let n = self.list.len();
        format!("image folder {} ({n} image{})", self.list.root.display(), if n == 1 { "" } else { "s" })
    }

    fn path(&self, index: usize) -> Option<PathBuf> {
        self.list.items.get(index).map(|i| i.path.clone())
    }
}

/// The first `count` tiles of a procedural domain (labels ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProceduralSource {
    pub domain: ProceduralDomain,
    pub count: usize,
}

impl ImageSource for ProceduralSource {
    fn len(&self) -> usize {
        self.count
    }

    fn load(&self, index: usize) -> Result<RgbImage, DataError> {
        Ok(self.domain.sample(index as u64).0)
    }

    fn describe(&self) -> String {
        format!(
            "procedural {} domain (seed {}, {} tiles of {} px)",
            self.domain.shift.name(),
            self.domain.seed,
            self.count,
            self.domain.size
        )
    }

    fn path(&self, _index: usize) -> Option<PathBuf> {
        None
    }
}

// ---------------------------------------------------------------------------------------------
// Batches.

/// One training batch of multi-crop views with iBOT masks, in the layout of DINOv2's collate.
#[derive(Debug, Clone, PartialEq)]
pub struct CropBatch {
    /// The step this batch belongs to.
    pub step: u64,
    /// Images in the batch (B).
    pub batch: usize,
    pub global_size: u32,
    pub local_size: u32,
    pub local_crops: usize,
    /// Patch size the masks were made for.
    pub patch_size: usize,
    /// `[2·B, 3, G, G]`, ImageNet-normalised, crop-major: the first global crop of every
    /// sample, then the second.
    pub globals: Vec<f32>,
    /// `[L·B, 3, l, l]`, ImageNet-normalised, crop-major: local crop 0 of every sample, then
    /// local crop 1, ...
    pub locals: Vec<f32>,
    /// `[2·B, (G/patch)²]`, row-major patch masks (true = masked) in the order of `globals`.
    pub masks: Vec<bool>,
    /// Files that failed to decode while building this batch (each listed once), with why.
    /// Each was replaced by the next image of the shuffled order.
    pub skipped: Vec<(PathBuf, String)>,
    /// The un-normalised crops of sample 0, when [`BatchSpec::preview_every`] asked for them.
    pub preview: Option<Crops>,
    /// The source image (index into the [`ImageSource`]) of each sample.
    pub sources: Vec<usize>,
}

impl CropBatch {
    /// Patches per side of a global crop.
    pub fn grid(&self) -> usize {
        self.global_size as usize / self.patch_size.max(1)
    }

    /// Values per global crop (`3·G²`).
    pub fn global_values(&self) -> usize {
        3 * self.global_size as usize * self.global_size as usize
    }

    /// Values per local crop (`3·l²`).
    pub fn local_values(&self) -> usize {
        3 * self.local_size as usize * self.local_size as usize
    }

    /// The masks of sample `j`'s two global crops, concatenated (`2·grid²`), as
    /// [`contact_sheet`] takes them.
    pub fn sample_masks(&self, j: usize) -> Vec<bool> {
        let n = self.grid() * self.grid();
        let mut out = Vec::with_capacity(2 * n);
        for crop in [j, self.batch + j] {
            if let Some(m) = self.masks.get(crop * n..(crop + 1) * n) {
                out.extend_from_slice(m);
            }
        }
        out
    }

    /// Total number of masked patches.
    pub fn masked_count(&self) -> usize {
        self.masks.iter().filter(|&&m| m).count()
    }
}

/// Consecutive unreadable images after which a batch gives up.
const MAX_CONSECUTIVE_FAILURES: usize = 100;

/// Seeded epoch permutations of the image order, kept for the epochs in use.
#[derive(Default)]
struct OrderCache {
    key: (usize, u64),
    epochs: Vec<(u64, Arc<Vec<u32>>)>,
}

impl OrderCache {
    const KEEP: usize = 4;

    /// The shuffled order of epoch `epoch` of a source of `len` images.
    fn epoch(&mut self, len: usize, seed: u64, epoch: u64) -> Arc<Vec<u32>> {
        if self.key != (len, seed) {
            self.key = (len, seed);
            self.epochs.clear();
        }
        if let Some((_, perm)) = self.epochs.iter().find(|(e, _)| *e == epoch) {
            return perm.clone();
        }
        let mut perm: Vec<u32> = (0..len as u32).collect();
        shuffle(&mut perm, &mut stream_rng(seed, STREAM_ORDER, epoch));
        let perm = Arc::new(perm);
        if self.epochs.len() >= Self::KEEP {
            self.epochs.remove(0);
        }
        self.epochs.push((epoch, perm.clone()));
        perm
    }
}

/// One sample's crops and the files skipped to get it.
struct Sample {
    /// Index of the source image in the [`ImageSource`].
    index: usize,
    crops: Crops,
    skipped: Vec<(PathBuf, String)>,
}

fn invalid(reason: impl Into<String>) -> DataError {
    DataError::Invalid { reason: reason.into() }
}

/// Builds the batch of `step` (see the module documentation for what it contains and how it
/// is determined). Samples are decoded and augmented in parallel on the rayon pool.
///
/// An image that cannot be decoded is recorded in [`CropBatch::skipped`] and replaced by the
/// next one of the shuffled order; the batch fails only if 100 consecutive images (or, for
/// smaller sources, as many as it holds) cannot be read, or if `spec` is invalid
/// ([`DataError::Invalid`]).
pub fn build_batch(source: &dyn ImageSource, spec: &BatchSpec, step: u64) -> Result<CropBatch, DataError> {
    build_batch_cached(source, spec, step, &mut OrderCache::default())
}

fn build_batch_cached(source: &dyn ImageSource, spec: &BatchSpec, step: u64, cache: &mut OrderCache) -> Result<CropBatch, DataError> {
    spec.validate().map_err(|e| invalid(format!("invalid batch settings: {e}")))?;
    let len = source.len();
    if len == 0 {
        return Err(invalid(format!("{} holds no image", source.describe())));
    }
    if len > u32::MAX as usize {
        return Err(invalid(format!("{} holds too many images", source.describe())));
    }
    let b = spec.batch;
    let tries = len.min(MAX_CONSECUTIVE_FAILURES);
    let first = step
        .checked_mul(b as u64)
        .filter(|f| f.checked_add((b + tries) as u64).is_some())
        .ok_or_else(|| invalid(format!("step {step} is out of range")))?;

    // The shuffled orders of every epoch this batch can reach (usually one or two).
    let last = first + (b + tries - 2) as u64;
    let (first_epoch, last_epoch) = (first / len as u64, last / len as u64);
    let orders: Vec<Arc<Vec<u32>>> = (first_epoch..=last_epoch).map(|e| cache.epoch(len, spec.seed, e)).collect();
    let image_at = |position: u64| -> usize {
        let epoch = (position / len as u64 - first_epoch) as usize;
        orders[epoch][(position % len as u64) as usize] as usize
    };

    let samples: Vec<Result<Sample, DataError>> = (0..b)
        .into_par_iter()
        .map(|j| {
            let g = first + j as u64;
            let mut skipped = Vec::new();
            for t in 0..tries {
                let index = image_at(g + t as u64);
                match source.load(index) {
                    Ok(image) => {
                        let mut rng = stream_rng(spec.seed, STREAM_AUGMENT, g);
                        let crops = augment(&image, &spec.crops, &mut rng);
                        return Ok(Sample { index, crops, skipped });
                    }
                    Err(e) => {
                        let path = source.path(index).unwrap_or_else(|| PathBuf::from(format!("image #{index}")));
                        skipped.push((path, e.reason()));
                    }
                }
            }
            let (path, reason) = skipped.last().cloned().unwrap_or_default();
            Err(invalid(format!(
                "{tries} consecutive images of {} could not be read (the last: {}: {reason})",
                source.describe(),
                path.display()
            )))
        })
        .collect();
    let samples: Vec<Sample> = samples.into_iter().collect::<Result<_, _>>()?;

    let mut skipped: Vec<(PathBuf, String)> = Vec::new();
    for entry in samples.iter().flat_map(|s| &s.skipped) {
        if !skipped.iter().any(|(p, _)| *p == entry.0) {
            skipped.push(entry.clone());
        }
    }

    let cfg = &spec.crops;
    let (gs, ls) = (cfg.global_size.max(1), cfg.local_size.max(1));
    let global_values = 3 * gs as usize * gs as usize;
    let local_values = 3 * ls as usize * ls as usize;
    let mut globals = vec![0.0f32; 2 * b * global_values];
    globals.par_chunks_mut(global_values).enumerate().for_each(|(i, out)| {
        out.copy_from_slice(&normalize_chw(&samples[i % b].crops.globals[i / b]));
    });
    let mut locals = vec![0.0f32; cfg.local_crops * b * local_values];
    locals.par_chunks_mut(local_values).enumerate().for_each(|(i, out)| {
        out.copy_from_slice(&normalize_chw(&samples[i % b].crops.locals[i / b]));
    });

    let mut mask_rng = stream_rng(spec.seed, STREAM_MASKS, step);
    let masks = batch_masks(2 * b, spec.grid(), &spec.masks, &mut mask_rng);

    let sources = samples.iter().map(|s| s.index).collect();
    let preview = spec.wants_preview(step).then(|| samples.into_iter().next().map(|s| s.crops)).flatten();

    Ok(CropBatch {
        step,
        batch: b,
        global_size: gs,
        local_size: ls,
        local_crops: cfg.local_crops,
        patch_size: spec.patch_size,
        globals,
        locals,
        masks,
        skipped,
        preview,
        sources,
    })
}

// ---------------------------------------------------------------------------------------------
// Prefetching loader.

/// Builds the batches of consecutive steps on a background thread (each batch in parallel on
/// the rayon pool), keeping up to `prefetch` finished batches ready.
///
/// Dropping the loader stops the thread; it waits for the batch under construction.
pub struct CropLoader {
    rx: Option<Receiver<Result<CropBatch, DataError>>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    next_step: u64,
    spawn_error: Option<String>,
}

impl CropLoader {
    /// Starts building the batches of steps `start_step`, `start_step + 1`, ... of `spec`
    /// over `source`. `prefetch` is the number of finished batches that may wait (0: each
    /// batch is handed over as soon as it is built, and the next one starts after that).
    pub fn new(source: Arc<dyn ImageSource>, spec: BatchSpec, start_step: u64, prefetch: usize) -> Self {
        let (tx, rx) = sync_channel(prefetch);
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let spawned = std::thread::Builder::new().name("explora-crops".to_string()).spawn(move || {
            let mut cache = OrderCache::default();
            let mut step = start_step;
            while !stop_flag.load(Ordering::Relaxed) {
                let result = build_batch_cached(source.as_ref(), &spec, step, &mut cache);
                let failed = result.is_err();
                // A failed send means the loader was dropped; an error ends the stream.
                if tx.send(result).is_err() || failed {
                    break;
                }
                step += 1;
            }
        });
        let (handle, spawn_error) = match spawned {
            Ok(h) => (Some(h), None),
            Err(e) => (None, Some(e.to_string())),
        };
        CropLoader { rx: Some(rx), stop, handle, next_step: start_step, spawn_error }
    }

    /// The next batch, in step order; waits for it if needed. After an error (which ends the
    /// stream) every call returns an error.
    #[allow(clippy::should_implement_trait)] // a fallible `next`, not an iterator
    pub fn next(&mut self) -> Result<CropBatch, DataError> {
        match self.rx.as_ref().and_then(|rx| rx.recv().ok()) {
            Some(Ok(batch)) => {
                self.next_step = batch.step + 1;
                Ok(batch)
            }
            Some(Err(e)) => Err(e),
            None => Err(invalid(match &self.spawn_error {
                Some(e) => format!("cannot start the batch loader thread: {e}"),
                None => "the batch loader has stopped (after an earlier error)".to_string(),
            })),
        }
    }

    /// The step of the batch [`CropLoader::next`] returns next.
    pub fn next_step(&self) -> u64 {
        self.next_step
    }
}

impl Drop for CropLoader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver makes a pending send fail, so the thread exits.
        drop(self.rx.take());
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Contact sheet.

/// Gap between crops on a contact sheet, in pixels.
const SHEET_GAP: u32 = 4;
const SHEET_BACKGROUND: Rgb<u8> = Rgb([24, 24, 24]);
/// Colour masked patches are blended with.
const MASK_TINT: [f32; 3] = [30.0, 90.0, 220.0];

/// A copy of `crop` with the masked patches of a `grid`×`grid` mask darkened and tinted blue.
fn tinted(crop: &RgbImage, mask: &[bool], grid: usize) -> RgbImage {
    let mut out = crop.clone();
    let (w, h) = out.dimensions();
    if grid == 0 || w == 0 || h == 0 {
        return out;
    }
    for (x, y, p) in out.enumerate_pixels_mut() {
        let cell = (y as usize * grid / h as usize) * grid + x as usize * grid / w as usize;
        if mask.get(cell).copied().unwrap_or(false) {
            for (v, t) in p.0.iter_mut().zip(MASK_TINT) {
                *v = (0.35 * *v as f32 + 0.45 * t) as u8;
            }
        }
    }
    out
}

/// One image showing the crops of a sample: the two global crops side by side (with masked
/// patches darkened and tinted blue when `masks` gives the two crops' masks, concatenated,
/// and the grid side — e.g. [`CropBatch::sample_masks`] and [`CropBatch::grid`]), followed
/// by the local crops at their own size, stacked in columns of the global crops' height.
/// Masks of the wrong length are ignored where they run short.
pub fn contact_sheet(crops: &Crops, masks: Option<(&[bool], usize)>) -> RgbImage {
    let gap = SHEET_GAP;
    let g = crops.globals.iter().map(|c| c.width().max(c.height())).max().unwrap_or(0);
    let l = crops.locals.iter().map(|c| c.width().max(c.height())).max().unwrap_or(0);
    let row = g.max(l).max(1);
    let per_column = if l == 0 { 1 } else { ((row + gap) / (l + gap)).max(1) };
    let columns = crops.locals.len().div_ceil(per_column as usize) as u32;
    let globals_width = crops.globals.len() as u32 * (g + gap);
    let locals_x = gap + globals_width + if columns > 0 && globals_width > 0 { gap } else { 0 };
    let width = locals_x + columns * (l + gap);
    let height = row + 2 * gap;
    let mut sheet = RgbImage::from_pixel(width.max(1), height, SHEET_BACKGROUND);

    for (k, crop) in crops.globals.iter().enumerate() {
        let x = gap + k as u32 * (g + gap);
        match masks {
            Some((m, grid)) if grid > 0 => {
                let n = grid * grid;
                let slice = m.get(k * n..).unwrap_or(&[]);
                let slice = &slice[..slice.len().min(n)];
                imageops::replace(&mut sheet, &tinted(crop, slice, grid), x as i64, gap as i64);
            }
            _ => imageops::replace(&mut sheet, crop, x as i64, gap as i64),
        }
    }
    for (i, crop) in crops.locals.iter().enumerate() {
        let (c, r) = (i as u32 / per_column, i as u32 % per_column);
        let x = locals_x + c * (l + gap);
        let y = gap + r * (l + gap);
        imageops::replace(&mut sheet, crop, x as i64, y as i64);
    }
    sheet
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn small_crops() -> MultiCropConfig {
        MultiCropConfig { global_size: 32, local_size: 16, local_crops: 3, ..MultiCropConfig::default() }
    }

    fn small_spec(batch: usize) -> BatchSpec {
        BatchSpec { crops: small_crops(), masks: MaskConfig::default(), patch_size: 8, batch, seed: 7, preview_every: 0 }
    }

    fn procedural(count: usize) -> ProceduralSource {
        ProceduralSource { domain: ProceduralDomain { size: 48, seed: 3, shift: Default::default() }, count }
    }

    fn rng(seed: u64) -> Xoshiro256PlusPlus {
        Xoshiro256PlusPlus::seed_from_u64(seed)
    }

    #[test]
    fn defaults_are_dinov2_and_valid() {
        let c = MultiCropConfig::default();
        assert_eq!((c.global_size, c.local_size, c.local_crops), (224, 98, 8));
        assert_eq!((c.global_scale, c.local_scale), ([0.32, 1.0], [0.05, 0.32]));
        assert_eq!((c.blur_global, c.blur_local, c.solarize), ([1.0, 0.1], 0.5, 0.2));
        assert_eq!((c.brightness, c.contrast, c.saturation, c.hue), (0.4, 0.4, 0.2, 0.1));
        assert!(!c.overhead);
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(MaskConfig::default().validate(), Ok(()));
        assert_eq!(BatchSpec::default().validate(), Ok(()));
        assert_eq!(BatchSpec::default().grid(), 16);
    }

    #[test]
    fn validation_names_the_field() {
        type Edit = fn(&mut MultiCropConfig);
        let bad_crops: Vec<(&str, Edit)> = vec![
            ("crops.global_size", |c| c.global_size = 0),
            ("crops.local_size", |c| c.local_size = 0),
            ("crops.global_scale", |c| c.global_scale = [0.5, 0.2]),
            ("crops.global_scale", |c| c.global_scale = [0.0, 1.0]),
            ("crops.local_scale", |c| c.local_scale = [0.1, 1.5]),
            ("crops.local_scale", |c| c.local_scale = [f32::NAN, 0.3]),
            ("crops.hflip", |c| c.hflip = 1.5),
            ("crops.color_jitter", |c| c.color_jitter = -0.1),
            ("crops.brightness", |c| c.brightness = -1.0),
            ("crops.saturation", |c| c.saturation = f32::INFINITY),
            ("crops.hue", |c| c.hue = 0.7),
            ("crops.grayscale", |c| c.grayscale = f32::NAN),
            ("crops.blur_sigma", |c| c.blur_sigma = [0.0, 2.0]),
            ("crops.blur_sigma", |c| c.blur_sigma = [3.0, 2.0]),
            ("crops.blur_global", |c| c.blur_global = [1.0, 2.0]),
            ("crops.blur_local", |c| c.blur_local = 2.0),
            ("crops.solarize", |c| c.solarize = -0.5),
        ];
        for (field, edit) in bad_crops {
            let mut c = MultiCropConfig::default();
            edit(&mut c);
            let err = c.validate().unwrap_err();
            assert_eq!(err.field, field, "{err}");
            assert!(err.to_string().starts_with(&format!("invalid run config: `{field}` ")), "{err}");
        }
        let bad_masks = [
            MaskConfig { probability: 1.1, ..MaskConfig::default() },
            MaskConfig { ratio: [0.6, 0.2], ..MaskConfig::default() },
            MaskConfig { ratio: [0.1, 1.2], ..MaskConfig::default() },
        ];
        for (m, field) in bad_masks.iter().zip(["masks.probability", "masks.ratio", "masks.ratio"]) {
            assert_eq!(m.validate().unwrap_err().field, field);
        }
        assert_eq!(MaskConfig { ratio: [0.0, 0.0], probability: 0.0 }.validate(), Ok(()));

        let mut spec = small_spec(2);
        spec.crops.global_size = 30;
        let err = spec.validate().unwrap_err();
        assert_eq!(err.field, "crops.global_size");
        assert!(err.reason.contains("multiple of the patch size 8"), "{err}");
        let err = build_batch(&procedural(4), &spec, 0).unwrap_err();
        assert!(matches!(err, DataError::Invalid { .. }));
        assert!(err.to_string().contains("crops.global_size"), "{err}");
        let spec = BatchSpec { batch: 0, ..small_spec(1) };
        assert_eq!(spec.validate().unwrap_err().field, "batch");
        let spec = BatchSpec { patch_size: 0, ..small_spec(1) };
        assert_eq!(spec.validate().unwrap_err().field, "patch_size");
        let spec = BatchSpec { masks: bad_masks[0].clone(), ..small_spec(1) };
        assert_eq!(spec.validate().unwrap_err().field, "masks.probability");
    }

    #[test]
    fn serde_defaults_and_unknown_fields() {
        let c: MultiCropConfig = serde_json::from_str(r#"{"local_crops": 4, "overhead": true}"#).unwrap();
        assert_eq!(c.local_crops, 4);
        assert!(c.overhead);
        assert_eq!(c.global_size, 224);
        let back: MultiCropConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        assert!(serde_json::from_str::<MultiCropConfig>(r#"{"global_sise": 4}"#).is_err());
        let m: MaskConfig = serde_json::from_str(r#"{"probability": 0.3}"#).unwrap();
        assert_eq!(m.ratio, [0.1, 0.5]);
        assert!(serde_json::from_str::<MaskConfig>(r#"{"ratios": [0.1, 0.2]}"#).is_err());
    }

    #[test]
    fn crop_rect_is_inside_and_follows_scale() {
        let mut r = rng(1);
        for (w, h) in [(48, 48), (200, 120), (33, 90), (1, 1), (3, 7)] {
            for _ in 0..200 {
                let (x, y, cw, ch) = crop_rect(w, h, [0.05, 0.32], &mut r);
                assert!(cw >= 1 && ch >= 1 && x + cw <= w && y + ch <= h, "{w}x{h}");
            }
        }
        // On a square image the ten attempts essentially always succeed.
        for _ in 0..200 {
            let (_, _, cw, ch) = crop_rect(400, 400, [0.32, 1.0], &mut r);
            let frac = (cw * ch) as f64 / 160_000.0;
            assert!((0.30..=1.0).contains(&frac), "{frac}");
            let ratio = cw as f64 / ch as f64;
            assert!((0.74..=1.35).contains(&ratio), "{ratio}");
        }
        // A very wide image cannot fit the ratio range: centre crop with ratio 4/3.
        let (x, y, cw, ch) = crop_rect(1000, 10, [1.0, 1.0], &mut r);
        assert_eq!((x, y, cw, ch), ((1000 - 13) / 2, 0, 13, 10));
        let (x, y, cw, ch) = crop_rect(10, 1000, [1.0, 1.0], &mut r);
        assert_eq!((x, y, cw, ch), (0, (1000 - 13) / 2, 10, 13));
    }

    #[test]
    fn augment_shapes_and_determinism() {
        let img = procedural(1).load(0).unwrap();
        for overhead in [false, true] {
            let cfg = MultiCropConfig { overhead, ..small_crops() };
            let a = augment(&img, &cfg, &mut rng(5));
            assert_eq!(a.globals.len(), 2);
            assert_eq!(a.locals.len(), 3);
            assert!(a.globals.iter().all(|c| c.dimensions() == (32, 32)));
            assert!(a.locals.iter().all(|c| c.dimensions() == (16, 16)));
            assert_eq!(a, augment(&img, &cfg, &mut rng(5)));
            assert_ne!(a, augment(&img, &cfg, &mut rng(6)));
        }
        // Non-square crops sizes (rotations must not swap them) and tiny inputs.
        let cfg = MultiCropConfig { overhead: true, ..small_crops() };
        let tiny = RgbImage::from_pixel(1, 3, Rgb([9, 99, 199]));
        let mut r = rng(2);
        for _ in 0..20 {
            let c = augment(&tiny, &cfg, &mut r);
            assert!(c.globals.iter().all(|c| c.dimensions() == (32, 32)));
        }
    }

    #[test]
    fn overhead_rotates_crops() {
        // An asymmetric image: with overhead the crops take all eight orientations.
        let img = RgbImage::from_fn(32, 32, |x, y| Rgb([(x * 8) as u8, (y * 8) as u8, 0]));
        let cfg = MultiCropConfig {
            global_scale: [1.0, 1.0],
            color_jitter: 0.0,
            grayscale: 0.0,
            blur_global: [0.0, 0.0],
            solarize: 0.0,
            local_crops: 0,
            overhead: true,
            ..small_crops()
        };
        let mut seen = std::collections::HashSet::new();
        let mut r = rng(3);
        for _ in 0..100 {
            for c in augment(&img, &cfg, &mut r).globals {
                // Two adjacent corners identify the orientation.
                seen.insert((c.get_pixel(0, 0).0, c.get_pixel(31, 0).0));
            }
        }
        assert_eq!(seen.len(), 8, "{seen:?}");
    }

    #[test]
    fn colour_operations() {
        let img = RgbImage::from_fn(16, 16, |x, y| Rgb([(x * 16) as u8, (y * 16) as u8, 77]));
        // Jitter with no strength is the identity, whatever the order.
        let none = MultiCropConfig { brightness: 0.0, contrast: 0.0, saturation: 0.0, hue: 0.0, ..small_crops() };
        let mut c = img.clone();
        color_jitter(&mut c, &none, &mut rng(1));
        assert_eq!(c, img);

        let mut g = img.clone();
        grayscale(&mut g);
        assert!(g.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]));
        assert_eq!(g.get_pixel(15, 15).0[0], ((240 * 299 + 240 * 587 + 77 * 114 + 500) / 1000) as u8);

        let mut s = img.clone();
        solarize(&mut s);
        assert_eq!(s.get_pixel(8, 0).0, [127, 0, 77]);
        assert_eq!(s.get_pixel(7, 15).0, [112, 15, 77]);

        // Hue: a sixth of a turn takes red to yellow, a third to green; round trips; grays stay.
        let mut px = [255.0, 0.0, 0.0];
        rotate_hue(&mut px, 1.0);
        assert_eq!(px, [255.0, 255.0, 0.0]);
        rotate_hue(&mut px, 1.0);
        assert_eq!(px, [0.0, 255.0, 0.0]);
        rotate_hue(&mut px, 4.0);
        assert_eq!(px, [255.0, 0.0, 0.0]);
        let mut px = [200.0, 120.0, 40.0];
        rotate_hue(&mut px, 0.6);
        rotate_hue(&mut px, 5.4);
        assert!(px.iter().zip([200.0, 120.0, 40.0]).all(|(a, b)| (a - b).abs() < 1e-3), "{px:?}");
        let mut gray = [90.0, 90.0, 90.0];
        rotate_hue(&mut gray, 2.5);
        assert_eq!(gray, [90.0; 3]);

        // Full jitter stays in range and changes the image.
        let mut j = img.clone();
        let strong = MultiCropConfig { brightness: 0.8, contrast: 0.8, saturation: 0.8, hue: 0.5, ..small_crops() };
        color_jitter(&mut j, &strong, &mut rng(4));
        assert_ne!(j, img);
    }

    fn isolated_cells(mask: &[bool], rows: usize, cols: usize) -> usize {
        (0..rows * cols)
            .filter(|&i| {
                let (r, c) = (i / cols, i % cols);
                mask[i]
                    && !((r > 0 && mask[i - cols])
                        || (r + 1 < rows && mask[i + cols])
                        || (c > 0 && mask[i - 1])
                        || (c + 1 < cols && mask[i + 1]))
            })
            .count()
    }

    #[test]
    fn block_mask_respects_target_and_is_blocky() {
        let mut r = rng(11);
        for (rows, cols) in [(16, 16), (4, 4), (14, 9), (1, 12)] {
            let n = rows * cols;
            for target in [0, 1, 2, 3, 5, n / 10, n / 4, n / 2, n, n + 5] {
                for _ in 0..30 {
                    let m = block_mask(rows, cols, target, &mut r);
                    assert_eq!(m.len(), n);
                    let count = m.iter().filter(|&&v| v).count();
                    assert!(count <= target.min(n), "{rows}x{cols} target {target}: {count}");
                    if target > 0 {
                        assert!(count >= 1);
                    }
                    // Blocks have ≥ 2 cells except the few (< 4) filling the remainder.
                    if rows > 1 {
                        assert!(isolated_cells(&m, rows, cols) <= 3, "{m:?}");
                    }
                }
            }
        }
        // On a realistic grid the target is (nearly) reached.
        let mut total = 0;
        for _ in 0..50 {
            total += block_mask(16, 16, 100, &mut r).iter().filter(|&&v| v).count();
        }
        assert!(total >= 50 * 90, "{total}");
        assert_eq!(block_mask(16, 16, 77, &mut rng(4)), block_mask(16, 16, 77, &mut rng(4)));
    }

    #[test]
    fn mask_counts_and_bound() {
        let cfg = MaskConfig::default();
        assert_eq!(masked_crops(8, &cfg), 4);
        assert_eq!(masked_crops(7, &cfg), 3);
        assert_eq!(masked_crops(10, &MaskConfig { probability: 0.7, ..cfg.clone() }), 7);
        assert_eq!(masked_crops(10, &MaskConfig { probability: 0.0, ..cfg.clone() }), 0);
        // linspace(0.1, 0.5, 5) = [0.1, 0.2, 0.3, 0.4, 0.5]: floor(256·[0.2, 0.3, 0.4, 0.5]).
        assert_eq!(max_masked(8, 256, &cfg), 51 + 76 + 102 + 128);
        assert_eq!(max_masked(2, 16, &MaskConfig { probability: 0.0, ..cfg.clone() }), 0);

        let mut r = rng(9);
        for num_crops in [2, 3, 8, 16] {
            for _ in 0..20 {
                let m = batch_masks(num_crops, 4, &cfg, &mut r);
                assert_eq!(m.len(), num_crops * 16);
                let counts: Vec<usize> = m.chunks(16).map(|c| c.iter().filter(|&&v| v).count()).collect();
                let masked = counts.iter().filter(|&&c| c > 0).count();
                assert_eq!(masked, num_crops / 2, "{counts:?}");
                assert!(counts.iter().all(|&c| c <= 8), "{counts:?}");
                assert!(counts.iter().sum::<usize>() <= max_masked(num_crops, 16, &cfg));
            }
        }
    }

    #[test]
    fn batch_layout_values_and_masks() {
        let spec = BatchSpec { preview_every: 1, ..small_spec(3) };
        let source = procedural(10);
        let batch = build_batch(&source, &spec, 0).unwrap();
        assert_eq!((batch.step, batch.batch, batch.grid()), (0, 3, 4));
        assert_eq!(batch.globals.len(), 2 * 3 * 3 * 32 * 32);
        assert_eq!(batch.locals.len(), 3 * 3 * 3 * 16 * 16);
        assert_eq!(batch.masks.len(), 2 * 3 * 16);
        assert!(batch.skipped.is_empty());
        let lo = (0.0 - 0.485) / 0.229 - 1e-4;
        let hi = (1.0 - 0.406) / 0.225 + 1e-4;
        assert!(batch.globals.iter().chain(&batch.locals).all(|v| v.is_finite() && (lo..=hi).contains(v)));
        let mean = batch.globals.iter().sum::<f32>() / batch.globals.len() as f32;
        assert!(mean.abs() < 1.5, "{mean}");

        // Crop-major: sample 0's crops are at chunks 0 and B (globals), c·B (locals).
        let preview = batch.preview.as_ref().unwrap();
        let gv = batch.global_values();
        let lv = batch.local_values();
        assert_eq!(&batch.globals[..gv], &normalize_chw(&preview.globals[0])[..]);
        assert_eq!(&batch.globals[3 * gv..4 * gv], &normalize_chw(&preview.globals[1])[..]);
        for c in 0..3 {
            let at = c * 3 * lv;
            assert_eq!(&batch.locals[at..at + lv], &normalize_chw(&preview.locals[c])[..]);
        }

        // floor(6 · 0.5) = 3 masked crops, each with 1..=floor(0.5 · 16) patches.
        for step in 0..20 {
            let b = build_batch(&source, &spec, step).unwrap();
            let counts: Vec<usize> = b.masks.chunks(16).map(|c| c.iter().filter(|&&v| v).count()).collect();
            assert_eq!(counts.iter().filter(|&&c| c > 0).count(), 3, "{counts:?}");
            assert!(counts.iter().all(|&c| c <= 8));
            assert!(b.masked_count() <= max_masked(6, 16, &spec.masks));
            assert_eq!(b.sample_masks(1).len(), 32);
            assert_eq!(&b.sample_masks(1)[16..], &b.masks[4 * 16..5 * 16]);
        }
        let no_preview = build_batch(&source, &small_spec(3), 0).unwrap();
        assert!(no_preview.preview.is_none());
    }

    #[test]
    fn batches_are_deterministic_and_step_dependent() {
        let spec = small_spec(4);
        let source = procedural(9);
        let a = build_batch(&source, &spec, 5).unwrap();
        assert_eq!(a, build_batch(&source, &spec, 5).unwrap());
        let b = build_batch(&source, &spec, 6).unwrap();
        assert_ne!(a.globals, b.globals);
        assert_ne!(a.locals, b.locals);
        let other_seed = BatchSpec { seed: 8, ..spec.clone() };
        assert_ne!(a.globals, build_batch(&source, &other_seed, 5).unwrap().globals);
        // Independent of the thread pool.
        let single = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        assert_eq!(a, single.install(|| build_batch(&source, &spec, 5)).unwrap());
    }

    /// A source of solid images that records which indices were loaded.
    struct Recording {
        count: usize,
        loaded: Mutex<Vec<usize>>,
        broken: Vec<usize>,
    }

    impl ImageSource for Recording {
        fn len(&self) -> usize {
            self.count
        }
        fn load(&self, index: usize) -> Result<RgbImage, DataError> {
            self.loaded.lock().unwrap().push(index);
            if self.broken.contains(&index) {
                return Err(DataError::Decode { path: self.path(index).unwrap(), reason: "broken".into() });
            }
            Ok(RgbImage::from_pixel(20, 20, Rgb([index as u8, 0, 0])))
        }
        fn describe(&self) -> String {
            "recording".into()
        }
        fn path(&self, index: usize) -> Option<PathBuf> {
            Some(PathBuf::from(format!("img{index}.png")))
        }
    }

    #[test]
    fn every_epoch_visits_each_image_once_in_a_new_order() {
        let source = Recording { count: 12, loaded: Mutex::default(), broken: vec![] };
        let spec = small_spec(4);
        let mut epochs = Vec::new();
        for epoch in 0..2u64 {
            source.loaded.lock().unwrap().clear();
            for step in 3 * epoch..3 * epoch + 3 {
                build_batch(&source, &spec, step).unwrap();
            }
            let mut seen = source.loaded.lock().unwrap().clone();
            seen.sort();
            assert_eq!(seen, (0..12).collect::<Vec<_>>());
            let mut cache = OrderCache::default();
            epochs.push(cache.epoch(12, spec.seed, epoch));
        }
        assert_ne!(epochs[0], epochs[1]);
        // Batches larger than the source span several epochs.
        let big = build_batch(&source, &small_spec(30), 1).unwrap();
        assert_eq!(big.globals.len(), 2 * 30 * 3 * 32 * 32);
    }

    #[test]
    fn unreadable_images_are_replaced_or_fail_clearly() {
        let source = Recording { count: 6, loaded: Mutex::default(), broken: vec![2, 3] };
        let spec = small_spec(6); // one whole epoch: both broken images are met
        let batch = build_batch(&source, &spec, 0).unwrap();
        let mut skipped: Vec<_> = batch.skipped.iter().map(|(p, _)| p.clone()).collect();
        skipped.sort();
        assert_eq!(skipped, [PathBuf::from("img2.png"), PathBuf::from("img3.png")]);
        assert!(batch.skipped.iter().all(|(_, r)| r == "broken"));
        // Each sample names the image it was cut from: never a broken one, each once.
        let mut sources = batch.sources.clone();
        sources.sort_unstable();
        sources.dedup();
        assert_eq!(batch.sources.len(), 6);
        assert!(batch.sources.iter().all(|i| *i < 6 && *i != 2 && *i != 3), "{:?}", batch.sources);
        assert!(sources.len() >= 4, "{:?}", batch.sources);
        assert_eq!(batch.globals.len(), 2 * 6 * 3 * 32 * 32);
        assert_eq!(batch, build_batch(&source, &spec, 0).unwrap());

        let all_broken = Recording { count: 3, loaded: Mutex::default(), broken: vec![0, 1, 2] };
        let err = build_batch(&all_broken, &small_spec(2), 0).unwrap_err();
        assert!(matches!(err, DataError::Invalid { .. }));
        assert!(err.to_string().contains("3 consecutive images of recording"), "{err}");
        let empty = Recording { count: 0, loaded: Mutex::default(), broken: vec![] };
        assert!(build_batch(&empty, &small_spec(2), 0).unwrap_err().to_string().contains("no image"));
    }

    #[test]
    fn folder_source_skips_corrupt_files() {
        let dir = tempfile::tempdir().unwrap();
        let domain = ProceduralDomain { size: 48, seed: 1, shift: Default::default() };
        for i in 0..5 {
            domain.sample(i).0.save(dir.path().join(format!("tile{i}.png"))).unwrap();
        }
        let garbage = dir.path().join("garbage.jpg");
        std::fs::write(&garbage, b"\xFF\xD8\xFF this is not a JPEG").unwrap();
        let source = FolderSource { list: ImageList::scan(dir.path()).unwrap() };
        assert_eq!(source.len(), 6);
        assert!(source.describe().contains("6 images"));
        assert_eq!(source.path(0), Some(source.list.items[0].path.clone()));
        assert!(source.load(99).is_err());

        let spec = small_spec(6);
        let batch = build_batch(&source, &spec, 0).unwrap();
        assert_eq!(batch.skipped.len(), 1);
        assert_eq!(batch.skipped[0].0, garbage);
        assert!(!batch.skipped[0].1.is_empty());
        assert_eq!(batch.globals.len(), 2 * 6 * 3 * 32 * 32);
        assert_eq!(batch.locals.len(), 3 * 6 * 3 * 16 * 16);
        assert!(batch.globals.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn procedural_source_matches_domain() {
        let s = procedural(7);
        assert_eq!(s.len(), 7);
        assert!(!s.is_empty());
        assert_eq!(s.load(3).unwrap(), s.domain.sample(3).0);
        assert_eq!(s.path(3), None);
        assert!(s.describe().contains("7 tiles of 48 px"));
    }

    #[test]
    fn loader_yields_build_batch_in_order_and_resumes() {
        let source: Arc<dyn ImageSource> = Arc::new(procedural(10));
        let spec = BatchSpec { preview_every: 2, ..small_spec(3) };
        let mut loader = CropLoader::new(source.clone(), spec.clone(), 0, 2);
        for step in 0..4 {
            assert_eq!(loader.next_step(), step);
            let b = loader.next().unwrap();
            assert_eq!(b.step, step);
            assert_eq!(b.preview.is_some(), step % 2 == 0);
            assert_eq!(b, build_batch(source.as_ref(), &spec, step).unwrap());
        }
        drop(loader); // stops the producer (it may be blocked on a full channel)

        let mut resumed = CropLoader::new(source.clone(), spec.clone(), 7, 0);
        assert_eq!(resumed.next().unwrap(), build_batch(source.as_ref(), &spec, 7).unwrap());
        assert_eq!(resumed.next().unwrap().step, 8);
    }

    #[test]
    fn loader_reports_errors_then_stops() {
        let broken: Arc<dyn ImageSource> = Arc::new(Recording { count: 2, loaded: Mutex::default(), broken: vec![0, 1] });
        let mut loader = CropLoader::new(broken, small_spec(2), 0, 1);
        let err = loader.next().unwrap_err();
        assert!(err.to_string().contains("could not be read"), "{err}");
        assert!(loader.next().unwrap_err().to_string().contains("stopped"));
    }

    #[test]
    fn contact_sheet_layout_and_mask_tint() {
        let crops = Crops {
            globals: vec![RgbImage::from_pixel(40, 40, Rgb([200, 200, 200])); 2],
            locals: vec![RgbImage::from_pixel(16, 16, Rgb([100, 150, 50])); 5],
        };
        let sheet = contact_sheet(&crops, None);
        // Two rows of 16 px locals fit beside 40 px globals: 3 columns for 5 locals.
        let g = SHEET_GAP;
        assert_eq!(sheet.dimensions(), (g + 2 * (40 + g) + g + 3 * (16 + g), 40 + 2 * g));
        assert_eq!(sheet.get_pixel(g, g).0, [200; 3]);
        assert_eq!(sheet.get_pixel(0, 0).0, SHEET_BACKGROUND.0);
        let locals_x = g + 2 * (40 + g) + g;
        assert_eq!(sheet.get_pixel(locals_x, g).0, [100, 150, 50]);
        assert_eq!(sheet.get_pixel(locals_x, g + 16 + g).0, [100, 150, 50]);

        // Mask the first patch of global 0 and the last of global 1 (grid 4: 10 px patches).
        let mut masks = vec![false; 32];
        masks[0] = true;
        masks[31] = true;
        let tinted_sheet = contact_sheet(&crops, Some((&masks, 4)));
        assert_ne!(tinted_sheet.get_pixel(g, g).0, [200; 3]);
        assert_ne!(tinted_sheet.get_pixel(g + 9, g + 9).0, [200; 3]);
        assert_eq!(tinted_sheet.get_pixel(g + 10, g).0, [200; 3]);
        let x1 = g + 40 + g;
        assert_ne!(tinted_sheet.get_pixel(x1 + 39, g + 30).0, [200; 3]);
        assert_eq!(tinted_sheet.get_pixel(x1 + 39, g + 29).0, [200; 3]);
        assert_eq!(tinted_sheet.get_pixel(x1, g).0, [200; 3]);
        // Short masks are tolerated; a sheet without locals is just the globals.
        contact_sheet(&crops, Some((&masks[..5], 4)));
        let only = Crops { globals: crops.globals.clone(), locals: vec![] };
        assert_eq!(contact_sheet(&only, None).dimensions(), (g + 2 * (40 + g), 40 + 2 * g));
        // From a real batch.
        let spec = BatchSpec { preview_every: 1, ..small_spec(2) };
        let b = build_batch(&procedural(4), &spec, 0).unwrap();
        let sheet = contact_sheet(b.preview.as_ref().unwrap(), Some((&b.sample_masks(0), b.grid())));
        assert_eq!(sheet.height(), 32 + 2 * g);
    }
}
