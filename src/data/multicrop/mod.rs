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
//!    0.2 (before it, with [`MultiCropConfig::band_shuffle`] > 0, the colour bands are
//!    reordered: not in DINOv2, for multi-sensor imagery);
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

mod augment;
mod batch;
mod loader;
mod masks;
mod preview;
mod source;

pub use augment::{Crops, augment, train_view};
pub use batch::{CropBatch, build_batch};
pub use loader::CropLoader;
pub use masks::{block_mask, masked_crops, max_masked};
pub use preview::contact_sheet;
pub use source::{FolderSource, ImageSource, ProceduralSource};

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
    /// Probability of reordering a view's colour bands (one of the five non-identity orders of
    /// R, G, B, uniformly), before the colour jitter. Not in DINOv2 (0 there): for imagery
    /// pooled from sensors whose band order and response differ, so that two views of one
    /// image disagree in band order and the model learns not to rely on it.
    pub band_shuffle: f32,
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
            band_shuffle: 0.0,
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
        check_probability("crops.band_shuffle", self.band_shuffle)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::Mutex;

    use image::{Rgb, RgbImage};
    use rand::SeedableRng;
    use rand::rngs::Xoshiro256PlusPlus;

    use crate::data::DataError;
    use crate::data::procedural::ProceduralDomain;

    // Helpers shared by the tests of the submodules.

    pub(super) fn small_crops() -> MultiCropConfig {
        MultiCropConfig { global_size: 32, local_size: 16, local_crops: 3, ..MultiCropConfig::default() }
    }

    pub(super) fn small_spec(batch: usize) -> BatchSpec {
        BatchSpec { crops: small_crops(), masks: MaskConfig::default(), patch_size: 8, batch, seed: 7, preview_every: 0 }
    }

    pub(super) fn procedural(count: usize) -> ProceduralSource {
        ProceduralSource { domain: ProceduralDomain { size: 48, seed: 3, shift: Default::default() }, count }
    }

    pub(super) fn rng(seed: u64) -> Xoshiro256PlusPlus {
        Xoshiro256PlusPlus::seed_from_u64(seed)
    }

    /// A source of solid images that records which indices were loaded.
    pub(super) struct Recording {
        pub(super) count: usize,
        pub(super) loaded: Mutex<Vec<usize>>,
        pub(super) broken: Vec<usize>,
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
            ("crops.band_shuffle", |c| c.band_shuffle = 1.5),
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
}
