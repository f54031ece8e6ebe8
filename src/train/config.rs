//! The pre-training run config: every knob of an ExPLoRA run, read from TOML (missing fields
//! take their defaults), validated with field-level errors, and written next to the outputs.
//!
//! Defaults are the paper's (DINOv2 objective as shipped with ExPLoRA, see
//! `../shared/explora-method.md`); [`PretrainConfig::builtin`] is the small built-in run that
//! `explora --no-gui` starts. Schedules count optimizer steps (one step = `batch ×
//! accumulation` images); DINOv2's "epoch" is 1,250 steps.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::{MaskConfig, MultiCropConfig};
use crate::model::VitConfig;
use crate::objectives::{HeadConfig, LossConfig};
use crate::peft::PlanSpec;

pub use crate::fields::FieldError;

fn bad(field: &str, reason: impl Into<String>) -> FieldError {
    FieldError::run(field, reason)
}

/// The backbone to start from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// Meta DINOv2 .pth, Hugging Face safetensors, MAE .pth or explora safetensors. Without
    /// weights the `arch` preset starts from random weights (for tests and demos only).
    pub weights: Option<PathBuf>,
    /// Architecture preset; inferred from the checkpoint when omitted.
    pub arch: Option<String>,
}

/// Unlabelled domain images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSection {
    /// Any folder tree of images (labels ignored). Without it, a procedural satellite-like
    /// domain of `procedural_tiles` tiles is generated in memory.
    pub images: Option<PathBuf>,
    /// A text file listing image paths, one per line (instead of `images`; `explora
    /// pipeline` writes one for the training split of a labelled set).
    pub list: Option<PathBuf>,
    pub procedural_tiles: usize,
    pub procedural_size: u32,
    /// The sensor the procedural tiles are seen through: `source` (as drawn) or `target`
    /// (another sensor's colours, haze, half the ground resolution; what the default run
    /// adapts to). The k-NN monitor's procedural tiles use the same.
    pub procedural_shift: crate::data::Shift,
    /// Batches prepared ahead on worker threads.
    pub prefetch: usize,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            images: None,
            list: None,
            procedural_tiles: 2_000,
            procedural_size: 256,
            procedural_shift: crate::data::Shift::Source,
            prefetch: 3,
        }
    }
}

/// AdamW and the schedules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimSection {
    /// Images per forward/backward pass (per micro-batch).
    pub batch: usize,
    /// Micro-batches per optimizer step (effective batch = batch × accumulation).
    pub accumulation: usize,
    /// Peak learning rate at `reference_batch`, scaled to the effective batch by `lr_scaling`.
    /// Default: DINOv2's 1e-3 at 1,024 images, square-root scaling; MAE's 4.5e-4 at 256,
    /// linear scaling (lr = 4.5e-4 × batch / 256) with `objective = "mae"`. A value given wins.
    pub base_lr: Option<f64>,
    pub reference_batch: Option<usize>,
    /// How the peak lr follows the effective batch: `sqrt` (DINOv2, UpStep) or `linear` (MAE).
    pub lr_scaling: Option<LrScaling>,
    pub min_lr: f64,
    pub warmup_steps: u64,
    /// Weight decay, cosine from the first to the second value (none on biases, norms and
    /// LayerScale, as DINOv2). Default: DINOv2's [0.04, 0.4]; MAE's 0 with `objective = "mae"`.
    pub weight_decay: Option<[f64; 2]>,
    /// AdamW betas. Default: DINOv2's (0.9, 0.999); MAE's (0.9, 0.95) with `objective = "mae"`.
    pub betas: Option<[f64; 2]>,
    pub eps: f64,
    /// Global gradient-norm clip (0 = off).
    pub clip_grad: f64,
    /// Layer-wise learning-rate decay: block i gets decay^(depth − i) (1 = off).
    pub layer_decay: f64,
    /// Teacher EMA momentum, cosine from the first to the second value.
    pub momentum: [f64; 2],
    /// The head's prototype layer stays frozen for this many steps (DINO's stabiliser).
    pub freeze_last_layer_steps: u64,
    /// Fraction of the run's steps during which only the DINO/iBOT head trains and the
    /// backbone (its unfrozen blocks, LoRA and norms) waits: a head that starts from scratch
    /// first learns to read the source features instead of sending random gradients into
    /// them. 0 = off (the paper's recipe); the built-in run uses 1/3. Under the MAE objective
    /// the decoder is what warms up first.
    pub head_warmup: f64,
}

impl Default for OptimSection {
    fn default() -> Self {
        Self {
            batch: 32,
            accumulation: 32,
            base_lr: None,
            reference_batch: None,
            lr_scaling: None,
            min_lr: 1e-6,
            warmup_steps: 12_500,
            weight_decay: None,
            betas: None,
            eps: 1e-8,
            clip_grad: 3.0,
            layer_decay: 0.9,
            momentum: [0.992, 1.0],
            freeze_last_layer_steps: 1_250,
            head_warmup: 0.0,
        }
    }
}

impl OptimSection {
    pub fn effective_batch(&self) -> usize {
        self.batch * self.accumulation
    }

    /// Steps of a `steps`-step run during which only the head trains.
    pub fn head_warmup_steps(&self, steps: u64) -> u64 {
        (self.head_warmup * steps as f64).round() as u64
    }
}

/// How the peak learning rate follows the effective batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrScaling {
    /// `base_lr × sqrt(batch / reference_batch)` (DINOv2).
    Sqrt,
    /// `base_lr × batch / reference_batch` (MAE).
    Linear,
}

/// Optional k-NN monitor on a small labelled set (as DINO does), written to the metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MonitorSection {
    /// Run it every this many steps (0 = never) and at the end.
    pub knn_every: u64,
    /// A labelled ImageFolder; without it, procedural tiles of the five scene classes.
    pub knn_images: Option<PathBuf>,
    /// Images used at most (a seeded sample when the folder holds more).
    pub knn_max_images: usize,
    pub knn_k: usize,
}

impl Default for MonitorSection {
    fn default() -> Self {
        Self { knn_every: 0, knn_images: None, knn_max_images: 500, knn_k: 20 }
    }
}

impl MonitorSection {
    /// The period used when a labelled folder is given and no period was chosen.
    pub const DEFAULT_EVERY: u64 = 500;
}

/// What follows pre-training: the source backbone against the adapted one on labelled images
/// (k-NN and a linear probe on a seeded 60/20/20 split, with bootstrap intervals), written to
/// `<run>/evaluation/`. Part of the run, so a run that stops before it is evaluated on resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvaluateSection {
    /// Compare once pre-training has finished.
    pub after_training: bool,
    /// A labelled ImageFolder. Without it, labelled tiles of the run's procedural domain are
    /// generated into the run folder (only when the run trains on procedural tiles).
    pub labelled: Option<PathBuf>,
    /// Generated tiles per scene class when `labelled` is not set.
    pub tiles_per_class: usize,
}

impl Default for EvaluateSection {
    fn default() -> Self {
        Self { after_training: false, labelled: None, tiles_per_class: 300 }
    }
}

/// The self-supervised objective that continues the backbone's pre-training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// DINOv2's self-distillation (DINO + iBOT + KoLeo against an EMA teacher); needs a DINOv2
    /// backbone.
    #[default]
    Dinov2,
    /// MAE's masked-patch reconstruction (encoder on the visible patches, a light decoder
    /// predicts the pixels of the masked ones); runs on MAE backbones and on DINOv2 ones (with a
    /// fresh decoder).
    Mae,
    /// UpStep (Jha, Tuytelaars, Asano 2025), as explora interprets the paper's abstract (the
    /// full method is not public): swapped prediction of Sinkhorn-Knopp codes against fixed
    /// k-means centres of the base model, a centroid regulariser towards the base model, and a
    /// gate that skips some optimizer steps. LoRA r=8 on Q,K,V unless `[plan]` says otherwise.
    Upstep,
}

impl Objective {
    pub fn name(self) -> &'static str {
        match self {
            Objective::Dinov2 => "dinov2",
            Objective::Mae => "mae",
            Objective::Upstep => "upstep",
        }
    }

    /// Whether this objective trains its own plan instead of `spec`: UpStep when the plan is
    /// left at its default.
    pub fn uses_own_plan(self, spec: &PlanSpec) -> bool {
        self == Objective::Upstep && *spec == PlanSpec::default()
    }

    /// The plan a run of this objective trains for `spec`: UpStep's own
    /// ([`PretrainConfig::upstep_plan`]) when [`Self::uses_own_plan`], otherwise `spec`.
    pub fn plan_spec(self, spec: PlanSpec) -> PlanSpec {
        if self.uses_own_plan(&spec) { PretrainConfig::upstep_plan() } else { spec }
    }
}

impl std::fmt::Display for Objective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The MAE objective (`objective = "mae"`): masking, the loss target and the decoder. The
/// decoder comes from the checkpoint when it carries one (MAE's `*_visualize` weights), then
/// it trains LoRA on Q,V of its blocks plus its norms; otherwise a fresh decoder of this shape
/// trains fully. Each image is seen once per step as the first global crop, cropped and
/// flipped only (MAE's augmentation: no colour jitter, blur or solarisation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MaeSection {
    /// Fraction of each image's patches hidden from the encoder, in (0, 1).
    pub mask_ratio: f64,
    /// Reconstruct per-patch normalised pixels (MAE's `norm_pix_loss`).
    pub norm_pix: bool,
    /// A fresh decoder's width, blocks and heads (MAE's 512, 8, 16).
    pub decoder_width: usize,
    pub decoder_depth: usize,
    pub decoder_heads: usize,
    /// LoRA rank on Q,V of a decoder loaded from the checkpoint (the paper's 8).
    pub decoder_lora_rank: usize,
}

impl Default for MaeSection {
    fn default() -> Self {
        Self { mask_ratio: 0.75, norm_pix: true, decoder_width: 512, decoder_depth: 8, decoder_heads: 16, decoder_lora_rank: 8 }
    }
}

impl MaeSection {
    /// The shape of a fresh decoder.
    pub fn decoder(&self) -> crate::objectives::mae::DecoderConfig {
        crate::objectives::mae::DecoderConfig { width: self.decoder_width, depth: self.decoder_depth, heads: self.decoder_heads }
    }

    /// The budget line of a fresh decoder after `vit` (all of it trains), which also names
    /// what trains when the checkpoint carries a decoder instead.
    pub fn budget_row(&self, vit: &VitConfig) -> (String, usize) {
        let d = self.decoder();
        (
            format!(
                "MAE decoder, fresh ({} wide, {} blocks; a decoder in the checkpoint trains LoRA r={} instead: {})",
                d.width,
                d.depth,
                self.decoder_lora_rank,
                crate::peft::thousands(d.adapted_params(self.decoder_lora_rank))
            ),
            d.num_params(vit.embed_dim, vit.patch_size),
        )
    }

    fn validate(&self) -> Result<(), FieldError> {
        if !(self.mask_ratio > 0.0 && self.mask_ratio < 1.0) {
            return Err(bad("mae.mask_ratio", format!("must be in (0, 1) (MAE: 0.75), got {}", self.mask_ratio)));
        }
        if self.decoder_depth == 0 {
            return Err(bad("mae.decoder_depth", "must be at least 1"));
        }
        if self.decoder_heads == 0 || !self.decoder_width.is_multiple_of(self.decoder_heads) {
            return Err(bad(
                "mae.decoder_width",
                format!("{} must be a multiple of mae.decoder_heads ({})", self.decoder_width, self.decoder_heads),
            ));
        }
        if self.decoder_width == 0 || !self.decoder_width.is_multiple_of(4) {
            return Err(bad(
                "mae.decoder_width",
                format!("{} must be a positive multiple of 4 (2-D sine-cosine positions)", self.decoder_width),
            ));
        }
        if self.decoder_lora_rank == 0 || self.decoder_lora_rank > self.decoder_width {
            return Err(bad("mae.decoder_lora_rank", format!("must be in 1..={}", self.decoder_width)));
        }
        Ok(())
    }
}

/// When an UpStep iteration skips its backward pass and optimizer step (the forward always runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Gate {
    /// Every second iteration (the 2nd, 4th, ...) is skipped.
    #[default]
    Alternate,
    /// Skipped when the iteration's loss is below its running mean (`gate_ema`): the model
    /// already does well on this batch.
    LossBelowEma,
    /// Skipped when the centroid drift ‖c − c_base‖² is below `cvr_threshold`.
    CvrThreshold,
    /// Never skipped.
    Off,
}

impl Gate {
    pub fn name(self) -> &'static str {
        match self {
            Gate::Alternate => "alternate",
            Gate::LossBelowEma => "loss-below-ema",
            Gate::CvrThreshold => "cvr-threshold",
            Gate::Off => "off",
        }
    }
}

/// The UpStep objective (`objective = "upstep"`). **An interpretation**: only the abstract of
/// Jha, Tuytelaars & Asano (arXiv 2502.21313) is public, so explora's version is: `centres`
/// unit centres from spherical k-means of the frozen base model's CLS embeddings (up to
/// `kmeans_sample` training images at the global crop size, computed once, kept in the run
/// folder as `centres.safetensors`); an online model (backbone + LoRA) and an offline EMA copy
/// (`ema`); for two global crops of each image, the offline model's Sinkhorn-Knopp codes
/// (temperature `code_temperature`) of one view are predicted by the online model's softmax
/// over centre cosines (`temperature`) on the other view (swapped prediction); plus
/// `cvr_weight` · ‖c − c_base‖², c the mean L2-normalised online CLS of the batch and c_base
/// the base model's. A `gate` decides per iteration whether the backward pass and the
/// optimizer step run. The exported backbone is the offline (EMA) model with LoRA merged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstepSection {
    /// K, the number of k-means centres (at most the number of training images).
    pub centres: usize,
    pub kmeans_iterations: usize,
    /// Training images embedded for k-means (a seeded sample when there are more).
    pub kmeans_sample: usize,
    /// Momentum of the offline (EMA) model, updated after every real optimizer step.
    pub ema: f64,
    /// Temperature of the online model's softmax over centre cosines.
    pub temperature: f64,
    /// Temperature of the offline Sinkhorn-Knopp codes (SwAV's ε = 0.05).
    pub code_temperature: f64,
    pub sinkhorn_iterations: usize,
    /// λ of the centroid regulariser (≥ 0; 0 turns it off).
    pub cvr_weight: f64,
    pub gate: Gate,
    /// Momentum of the loss's running mean (`gate = "loss-below-ema"`).
    pub gate_ema: f64,
    /// `gate = "cvr-threshold"` skips while ‖c − c_base‖² is below this.
    pub cvr_threshold: f64,
}

impl Default for UpstepSection {
    fn default() -> Self {
        Self {
            centres: 256,
            kmeans_iterations: 20,
            kmeans_sample: 2_000,
            ema: 0.996,
            temperature: 0.1,
            code_temperature: 0.05,
            sinkhorn_iterations: 3,
            cvr_weight: 1.0,
            gate: Gate::Alternate,
            gate_ema: 0.9,
            cvr_threshold: 1e-3,
        }
    }
}

impl UpstepSection {
    fn validate(&self) -> Result<(), FieldError> {
        if self.centres < 2 {
            return Err(bad("upstep.centres", "must be at least 2"));
        }
        if self.kmeans_sample < self.centres {
            return Err(bad(
                "upstep.centres",
                format!("{} centres need at least as many k-means images; upstep.kmeans_sample is {}", self.centres, self.kmeans_sample),
            ));
        }
        if !(0.0..=1.0).contains(&self.ema) {
            return Err(bad("upstep.ema", format!("must be in [0, 1], got {}", self.ema)));
        }
        for (field, t) in [("upstep.temperature", self.temperature), ("upstep.code_temperature", self.code_temperature)] {
            if !(t > 0.0 && t.is_finite()) {
                return Err(bad(field, format!("must be > 0, got {t}")));
            }
        }
        if self.sinkhorn_iterations == 0 {
            return Err(bad("upstep.sinkhorn_iterations", "must be at least 1"));
        }
        if !(self.cvr_weight >= 0.0 && self.cvr_weight.is_finite()) {
            return Err(bad("upstep.cvr_weight", format!("must be a finite number ≥ 0, got {}", self.cvr_weight)));
        }
        if !(0.0..1.0).contains(&self.gate_ema) {
            return Err(bad("upstep.gate_ema", format!("must be in [0, 1), got {}", self.gate_ema)));
        }
        if !(self.cvr_threshold >= 0.0 && self.cvr_threshold.is_finite()) {
            return Err(bad("upstep.cvr_threshold", format!("must be a finite number ≥ 0, got {}", self.cvr_threshold)));
        }
        Ok(())
    }

    /// Checks K against the training images (known once the data source is open).
    pub fn check_images(&self, images: usize) -> Result<(), FieldError> {
        if self.centres > images {
            return Err(bad(
                "upstep.centres",
                format!("{} centres need at least as many training images; the data has {images}", self.centres),
            ));
        }
        Ok(())
    }
}

/// Length, seed, checkpoints and logging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunSection {
    /// Optimizer steps.
    pub steps: u64,
    pub seed: u64,
    /// Write a checkpoint every this many steps (0 = only at the end).
    pub checkpoint_every: u64,
    /// Checkpoints kept (older ones are deleted).
    pub keep_checkpoints: usize,
    /// Write a picture of the augmented batch (crops and masks) every this many steps (0 = never).
    pub preview_every: u64,
}

impl Default for RunSection {
    fn default() -> Self {
        Self { steps: 25_000, seed: 0, checkpoint_every: 500, keep_checkpoints: 2, preview_every: 1_000 }
    }
}

/// Everything that defines an ExPLoRA pre-training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainConfig {
    /// `dinov2` (default), `mae` or `upstep`.
    pub objective: Objective,
    pub model: ModelSection,
    pub plan: PlanSpec,
    pub data: DataSection,
    pub crops: MultiCropConfig,
    pub masks: MaskConfig,
    pub head: HeadConfig,
    pub loss: LossConfig,
    pub mae: MaeSection,
    pub upstep: UpstepSection,
    pub optim: OptimSection,
    pub monitor: MonitorSection,
    pub evaluate: EvaluateSection,
    pub run: RunSection,
}

impl PretrainConfig {
    /// The built-in run, a miniature of the paper: the shipped source backbone (the tiny ViT
    /// that explora pre-trained on the procedural *source* domain,
    /// `assets/recipes/source-tiny.toml`) adapted with ExPLoRA to the shifted *target*
    /// domain (tiles from many sensors, hazy, at half the ground resolution); about two and a
    /// half minutes on two CPU cores. Its teacher targets use Sinkhorn-Knopp: softmax centering
    /// collapses the small head of a tiny backbone to uniform outputs within a few dozen steps.
    ///
    /// The views and the schedule were chosen on validation runs (`run.seed` 1 and 2: other
    /// training, monitor and evaluation tiles than the default's) by the k-NN monitor; see the
    /// README. Two 80-100 % crops whose colour bands are reordered (the target's nuisance: each
    /// tile's sensor has its own band order), no local crops and no colour jitter: with
    /// DINOv2's views the student cannot match the other view's assignment within a few hundred
    /// steps. A teacher that follows the student (0.99 → 0.999, not → 1.0) and a head warm-up
    /// of a tenth of the run, so that the backbone trains for most of it.
    pub fn builtin() -> Self {
        let mut c = Self::default();
        c.model.weights = Some(PathBuf::from(crate::checkpoint::builtin::SOURCE_TINY));
        c.data.procedural_shift = crate::data::Shift::Target;
        // The tiny backbone has 4 blocks: the last two train fully (the paper unfreezes one or
        // two), LoRA sits on Q,V of the first two.
        c.plan.unfreeze = Some(vec![2, 3]);
        c.data.procedural_tiles = 1_000;
        c.data.procedural_size = 96;
        c.crops.global_size = 64;
        c.crops.local_size = 32;
        c.crops.local_crops = 0;
        c.crops.global_scale = [0.8, 1.0];
        c.crops.color_jitter = 0.0;
        c.crops.grayscale = 0.0;
        c.crops.solarize = 0.0;
        c.crops.band_shuffle = 1.0;
        // 256 prototypes: Sinkhorn-Knopp spreads a batch of 32 teacher views evenly over the
        // prototypes, so with 1,024 its targets are nearly uniform.
        c.head = HeadConfig { layers: 3, hidden: 256, bottleneck: 64, prototypes: 256 };
        c.optim.head_warmup = 0.1;
        c.loss.teacher_temp_warmup_steps = 30;
        c.optim.batch = 16;
        c.optim.accumulation = 1;
        // A small effective batch trains a tiny model faster with twice the un-scaled paper lr.
        c.optim.reference_batch = Some(16);
        c.optim.base_lr = Some(2e-3);
        c.optim.warmup_steps = 10;
        c.optim.freeze_last_layer_steps = 5;
        c.optim.momentum = [0.99, 0.999];
        c.monitor.knn_every = 150;
        c.monitor.knn_max_images = 200;
        c.evaluate.after_training = true;
        // 1,000 tiles per class: a test split of 1,000 tiles (95% interval about ±3 points; with
        // 300 per class the same runs' gains swung between +1 and +16 from the split alone),
        // evaluated in about 15 s.
        c.evaluate.tiles_per_class = 1_000;
        c.monitor.knn_k = 10;
        c.loss.centering = crate::objectives::Centering::SinkhornKnopp;
        c.run.steps = 900;
        c.run.checkpoint_every = 150;
        c.run.preview_every = 50;
        c
    }

    /// The built-in run sized for software Vulkan (no GPU): smaller batches, fewer steps; it
    /// finishes in a few minutes on two CPU cores.
    pub fn builtin_software() -> Self {
        let mut c = Self::builtin();
        c.optim.batch = 8;
        c.optim.reference_batch = Some(8);
        c.monitor.knn_every = 12;
        c.monitor.knn_max_images = 100;
        c.run.steps = 24;
        c.run.checkpoint_every = 8;
        c.run.preview_every = 12;
        c.loss.teacher_temp_warmup_steps = 10;
        c.optim.warmup_steps = 4;
        c.optim.freeze_last_layer_steps = 2;
        c.evaluate.tiles_per_class = 300;
        c
    }

    /// The unlabelled images to pre-train on (`None`: procedural tiles), as both faces set
    /// them. Generated evaluation tiles only match the procedural domain, so with a folder and
    /// no labelled set the evaluation after the run is turned off.
    pub fn set_images(&mut self, folder: Option<PathBuf>) {
        if folder.is_some() && self.evaluate.labelled.is_none() {
            self.evaluate.after_training = false;
        }
        self.data.images = folder;
    }

    /// A labelled ImageFolder for the run, as both faces set it: the k-NN monitor reads it
    /// (every [`MonitorSection::DEFAULT_EVERY`] steps unless a period is set) and, with
    /// `evaluate`, the comparison after the run uses it. `None` clears both uses.
    pub fn set_labelled(&mut self, folder: Option<PathBuf>, evaluate: bool) {
        if folder.is_some() && self.monitor.knn_every == 0 {
            self.monitor.knn_every = MonitorSection::DEFAULT_EVERY;
        }
        self.monitor.knn_images = folder.clone();
        self.evaluate.labelled = folder;
        self.evaluate.after_training |= evaluate && self.evaluate.labelled.is_some();
    }

    /// The architecture preset named by `model.arch`, if any; an unknown name is an error
    /// that lists the presets.
    pub fn arch_preset(&self) -> Result<Option<VitConfig>, FieldError> {
        match &self.model.arch {
            None => Ok(None),
            Some(name) => VitConfig::preset(name).map(Some).ok_or_else(|| {
                bad(
                    "model.arch",
                    format!("{name} is not a preset (tiny, vits14, vitb14, vitl14, vitg14, mae-vitb16, mae-vitl16, mae-vith14; `_reg` for registers)"),
                )
            }),
        }
    }

    /// Checks the knobs that depend on the model: crop sizes against its patch size, iBOT
    /// against its mask token, the objective against its family. (The plan is resolved on the
    /// model by [`PlanSpec::resolve`].) The engine and the app's Start button both call this.
    pub fn check_model(&self, vit: &VitConfig) -> Result<(), FieldError> {
        let patch = vit.patch_size as u32;
        for (field, size) in [("crops.global_size", self.crops.global_size), ("crops.local_size", self.crops.local_size)] {
            if size % patch != 0 {
                return Err(bad(field, format!("{size} is not a multiple of the model's patch size {patch}")));
            }
        }
        match self.objective {
            Objective::Dinov2 if vit.family == crate::model::Family::Mae => {
                return Err(bad(
                    "objective",
                    format!(
                        "{} is an MAE backbone: ExPLoRA continues a backbone with its own objective; set objective = \"mae\" \
                         (or --objective mae)",
                        vit.name
                    ),
                ));
            }
            // Patch 8 is the tiny test backbones' (tests and demos run in seconds).
            Objective::Mae if ![8, 14, 16].contains(&vit.patch_size) => {
                return Err(bad(
                    "objective",
                    format!(
                        "the MAE objective needs a backbone with 14- or 16-pixel patches (8: the tiny test backbones); {} has {patch}",
                        vit.name
                    ),
                ));
            }
            _ => {}
        }
        Ok(())
    }

    /// AdamW betas: `optim.betas`, else the objective's default.
    pub fn betas(&self) -> [f64; 2] {
        self.optim.betas.unwrap_or(match self.objective {
            Objective::Dinov2 | Objective::Upstep => [0.9, 0.999],
            Objective::Mae => [0.9, 0.95],
        })
    }

    /// The budget of `plan` on `vit` as planned before a run: under the MAE objective with the
    /// fresh decoder of `[mae]` beside the backbone (the run itself reports a loaded decoder's
    /// LoRA instead).
    pub fn planned_budget(&self, vit: &VitConfig, plan: &crate::peft::AdaptationPlan) -> crate::peft::Budget {
        let budget = plan.budget(vit);
        match self.objective {
            Objective::Dinov2 | Objective::Upstep => budget,
            Objective::Mae => {
                let (component, params) = self.mae.budget_row(vit);
                budget.with_module(component, params)
            }
        }
    }

    /// What the trained model sees of each image per step, in words (the run report, `explora
    /// plan`, the app): DINOv2's global and local crops, MAE's one masked view, UpStep's two views.
    pub fn views_description(&self) -> String {
        let c = &self.crops;
        match self.objective {
            Objective::Dinov2 => format!("2 × {} px global, {} × {} px local crops", c.global_size, c.local_crops, c.local_size),
            Objective::Mae => format!(
                "one {} px view, {:.0}% of its patches masked, a {} × {} decoder",
                c.global_size,
                100.0 * self.mae.mask_ratio,
                self.mae.decoder_width,
                self.mae.decoder_depth
            ),
            Objective::Upstep => format!(
                "2 × {} px global views against {} k-means centres, gate {}",
                c.global_size,
                self.upstep.centres,
                self.upstep.gate.name()
            ),
        }
    }

    /// The activation memory autograd keeps for one micro-batch of this run with `plan` on
    /// `vit` (an order of magnitude, see [`crate::peft::activation_bytes_for_tokens`]): DINOv2's
    /// student on the global and local crops, UpStep's online model on two global views, MAE's
    /// encoder on the visible patches of one view plus its decoder (which always trains: fully
    /// when fresh, LoRA when loaded) on every patch.
    pub fn activation_bytes(&self, vit: &VitConfig, plan: &crate::peft::AdaptationPlan) -> u64 {
        let c = &self.crops;
        let batch = self.optim.batch;
        match self.objective {
            Objective::Dinov2 => crate::peft::activation_bytes(vit, plan, batch, &[(c.global_size, 2), (c.local_size, c.local_crops)]),
            Objective::Upstep => crate::peft::activation_bytes(vit, plan, batch, &[(c.global_size, 2)]),
            Objective::Mae => {
                let n = (c.global_size as usize / vit.patch_size.max(1)).pow(2);
                let visible = crate::objectives::mae::PatchMask::visible(n, self.mae.mask_ratio);
                let encoder = crate::peft::activation_bytes_for_tokens(vit, plan, batch, &[(visible, 1)]);
                let d = self.mae.decoder();
                let per_block = crate::peft::block_activation_values(d.width, 4 * d.width, d.heads, n + 1);
                encoder + 4 * batch as u64 * d.depth as u64 * per_block
            }
        }
    }

    /// The peak-lr rule: `optim.base_lr`, `optim.reference_batch` and `optim.lr_scaling`, each
    /// else the objective's default (DINOv2 and UpStep: 1e-3 at 1,024, sqrt; MAE: 4.5e-4 at 256,
    /// linear).
    pub fn lr_rule(&self) -> (f64, usize, LrScaling) {
        let (lr, reference, scaling) = match self.objective {
            Objective::Dinov2 | Objective::Upstep => (1e-3, 1024, LrScaling::Sqrt),
            Objective::Mae => (4.5e-4, 256, LrScaling::Linear),
        };
        let o = &self.optim;
        (o.base_lr.unwrap_or(lr), o.reference_batch.unwrap_or(reference), o.lr_scaling.unwrap_or(scaling))
    }

    /// The peak learning rate: the base lr scaled to the effective batch.
    pub fn peak_lr(&self) -> f64 {
        let (lr, reference, scaling) = self.lr_rule();
        let ratio = self.optim.effective_batch() as f64 / reference.max(1) as f64;
        match scaling {
            LrScaling::Sqrt => lr * ratio.sqrt(),
            LrScaling::Linear => lr * ratio,
        }
    }

    /// Weight decay (start, end of the cosine): `optim.weight_decay`, else the objective's default.
    pub fn weight_decay(&self) -> [f64; 2] {
        self.optim.weight_decay.unwrap_or(match self.objective {
            Objective::Dinov2 => [0.04, 0.4],
            Objective::Mae => [0.0, 0.0],
            Objective::Upstep => [0.05, 0.05],
        })
    }

    /// The run's adaptation plan on `vit`: `[plan]` resolved, with the MAE objective's rule
    /// that the encoder's mask token stays frozen unless asked for (MAE's encoder never sees
    /// it: masked patches are dropped, not replaced).
    /// UpStep's default plan (when `[plan]` is left as it comes) is LoRA r=8 on Q, K, V of
    /// every block and nothing else.
    pub fn resolve_plan(&self, vit: &VitConfig) -> Result<crate::peft::AdaptationPlan, FieldError> {
        let mut plan = self.objective.plan_spec(self.plan.clone()).resolve(vit)?;
        if self.objective == Objective::Mae && self.plan.mask_token.is_none() {
            plan.mask_token = false;
        }
        Ok(plan)
    }

    /// The plan UpStep uses when `[plan]` is left at its default: LoRA r=8 on Q, K, V of every
    /// block, nothing else trainable.
    pub fn upstep_plan() -> PlanSpec {
        PlanSpec { preset: "lora".into(), lora_rank: Some(8), lora_targets: Some("q,k,v".into()), ..PlanSpec::default() }
    }

    /// Makes every path of the config absolute against `base` (the working directory when the
    /// run is created), so that the `config.toml` written into the run folder holds wherever
    /// the run is resumed from. Built-in names (`builtin:…`) stay as they are.
    pub fn make_paths_absolute(&mut self, base: &Path) {
        let fix = |p: &mut Option<PathBuf>| {
            if let Some(path) = p
                && path.is_relative()
                && !crate::checkpoint::builtin::is_builtin(path)
            {
                *path = base.join(&*path);
            }
        };
        fix(&mut self.model.weights);
        fix(&mut self.data.images);
        fix(&mut self.data.list);
        fix(&mut self.monitor.knn_images);
        fix(&mut self.evaluate.labelled);
    }

    /// Reads a TOML file; fields it leaves out keep their defaults.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read run config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("run config {}: {e}", path.display()))
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config serialises")
    }

    /// Checks every knob that does not need the model (the plan and crop sizes are checked
    /// against the model when it is loaded).
    pub fn validate(&self) -> Result<(), FieldError> {
        self.crops.validate()?;
        self.masks.validate()?;
        if let Some(path) = &self.model.weights
            && !crate::checkpoint::builtin::exists(path)
        {
            return Err(bad("model.weights", format!("{} does not exist", path.display())));
        }
        if self.model.weights.is_none() && self.model.arch.is_none() {
            return Err(bad("model", "give `weights` (a checkpoint) or `arch` (a preset, random weights)"));
        }
        if let Some(path) = &self.data.images
            && !path.is_dir()
        {
            return Err(bad("data.images", format!("{} is not a folder", path.display())));
        }
        if let Some(path) = &self.data.list {
            if !path.is_file() {
                return Err(bad("data.list", format!("{} is not a file", path.display())));
            }
            if self.data.images.is_some() {
                return Err(bad("data.list", "give either `images` (a folder) or `list` (a file of paths), not both"));
            }
        }
        if self.data.images.is_none() && self.data.list.is_none() && self.data.procedural_tiles == 0 {
            return Err(bad("data.procedural_tiles", "must be at least 1 when no `images` folder is given"));
        }
        if self.data.procedural_size < 8 {
            return Err(bad("data.procedural_size", "must be at least 8 pixels"));
        }
        if self.data.prefetch == 0 {
            return Err(bad("data.prefetch", "must be at least 1"));
        }
        let h = &self.head;
        if h.layers == 0 || h.hidden == 0 || h.bottleneck == 0 || h.prototypes < 2 {
            return Err(bad("head", "needs layers ≥ 1, hidden ≥ 1, bottleneck ≥ 1 and prototypes ≥ 2"));
        }
        let l = &self.loss;
        for (field, w) in [("loss.dino_weight", l.dino_weight), ("loss.ibot_weight", l.ibot_weight), ("loss.koleo_weight", l.koleo_weight)]
        {
            if !(w >= 0.0 && w.is_finite()) {
                return Err(bad(field, "must be a finite number ≥ 0"));
            }
        }
        if l.dino_weight + l.ibot_weight + l.koleo_weight == 0.0 {
            return Err(bad("loss", "all loss weights are 0: nothing to train"));
        }
        if !(l.student_temp > 0.0) || l.teacher_temp.iter().any(|t| !(*t > 0.0)) {
            return Err(bad("loss.student_temp / loss.teacher_temp", "temperatures must be > 0"));
        }
        if !(0.0..1.0).contains(&l.center_momentum) {
            return Err(bad("loss.center_momentum", "must be in [0, 1)"));
        }
        if l.sinkhorn_iterations == 0 {
            return Err(bad("loss.sinkhorn_iterations", "must be at least 1"));
        }
        let o = &self.optim;
        if o.batch < 2 && self.objective == Objective::Dinov2 {
            return Err(bad("optim.batch", "must be at least 2 (KoLeo needs a neighbour in the batch)"));
        }
        if o.batch == 0 {
            return Err(bad("optim.batch", "must be at least 1"));
        }
        self.mae.validate()?;
        if self.objective == Objective::Upstep {
            self.upstep.validate()?;
        }
        if o.accumulation == 0 {
            return Err(bad("optim.accumulation", "must be at least 1"));
        }
        if o.base_lr.is_some_and(|lr| !(lr > 0.0 && lr.is_finite())) {
            return Err(bad("optim.base_lr", "must be a positive number"));
        }
        if o.reference_batch == Some(0) {
            return Err(bad("optim.reference_batch", "must be at least 1"));
        }
        if !(o.min_lr >= 0.0 && o.min_lr <= self.peak_lr()) {
            return Err(bad("optim.min_lr", format!("must be in [0, peak lr {:.3e}]", self.peak_lr())));
        }
        if self.weight_decay().iter().any(|w| !(*w >= 0.0)) {
            return Err(bad("optim.weight_decay", "must be ≥ 0"));
        }
        if self.betas().iter().any(|b| !(0.0..1.0).contains(b)) {
            return Err(bad("optim.betas", "must be in [0, 1)"));
        }
        if !(o.eps > 0.0) {
            return Err(bad("optim.eps", "must be > 0"));
        }
        if !(o.clip_grad >= 0.0) {
            return Err(bad("optim.clip_grad", "must be ≥ 0 (0 turns clipping off)"));
        }
        if !(o.layer_decay > 0.0 && o.layer_decay <= 1.0) {
            return Err(bad("optim.layer_decay", "must be in (0, 1]"));
        }
        if o.momentum.iter().any(|m| !(0.0..=1.0).contains(m)) {
            return Err(bad("optim.momentum", "must be in [0, 1]"));
        }
        if self.run.steps == 0 {
            return Err(bad("run.steps", "must be at least 1"));
        }
        if !(0.0..1.0).contains(&o.head_warmup) {
            return Err(bad("optim.head_warmup", "must be in [0, 1) (a fraction of run.steps)"));
        }
        if self.run.keep_checkpoints == 0 {
            return Err(bad("run.keep_checkpoints", "must be at least 1"));
        }
        if let Some(path) = &self.monitor.knn_images
            && !path.is_dir()
        {
            return Err(bad("monitor.knn_images", format!("{} is not a folder", path.display())));
        }
        if self.monitor.knn_k == 0 || self.monitor.knn_max_images < 2 {
            return Err(bad("monitor", "knn_k must be ≥ 1 and knn_max_images ≥ 2"));
        }
        self.arch_preset()?;
        let e = &self.evaluate;
        if let Some(path) = &e.labelled
            && !path.is_dir()
        {
            return Err(bad("evaluate.labelled", format!("{} is not a folder", path.display())));
        }
        if e.after_training && e.labelled.is_none() && (self.data.images.is_some() || self.data.list.is_some()) {
            return Err(bad(
                "evaluate.labelled",
                "is needed to evaluate a run on your own images (generated tiles only match the procedural domain)",
            ));
        }
        if e.after_training && e.labelled.is_none() && e.tiles_per_class < 10 {
            return Err(bad("evaluate.tiles_per_class", "must be at least 10 (the split keeps 20% for testing)"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_and_validate() {
        for config in [PretrainConfig::builtin(), {
            let mut c = PretrainConfig::default();
            c.model.arch = Some("vits14".into());
            c
        }] {
            config.validate().unwrap();
            let back: PretrainConfig = toml::from_str(&config.to_toml()).unwrap();
            assert_eq!(back, config);
        }
    }

    #[test]
    fn partial_files_keep_defaults_and_errors_name_the_field() {
        let c: PretrainConfig = toml::from_str("[model]\narch = \"tiny\"\n[optim]\nbatch = 8\n").unwrap();
        assert_eq!(c.optim.batch, 8);
        assert_eq!(c.lr_rule().0, 1e-3);
        assert_eq!(c.head.prototypes, 65_536);
        let unknown = toml::from_str::<PretrainConfig>("[optim]\nbatchsize = 8\n").unwrap_err().to_string();
        assert!(unknown.contains("batchsize"), "{unknown}");
        let mut c = PretrainConfig::builtin();
        c.optim.layer_decay = 1.5;
        assert_eq!(c.validate().unwrap_err().field, "optim.layer_decay");
        let mut c = PretrainConfig::builtin();
        c.data.images = Some("/no/such/folder".into());
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "data.images");
        assert!(e.to_string().contains("/no/such/folder"));
        let mut c = PretrainConfig::builtin();
        c.optim.batch = 1;
        assert_eq!(c.validate().unwrap_err().field, "optim.batch");
    }

    #[test]
    fn the_objective_reads_from_toml_and_mae_errors_name_the_field() {
        let c: PretrainConfig = toml::from_str("objective = \"mae\"\n[model]\narch = \"tiny\"\n[mae]\nmask_ratio = 0.6\n").unwrap();
        assert_eq!(c.objective, Objective::Mae);
        assert_eq!(c.mae.mask_ratio, 0.6);
        assert_eq!(c.mae.decoder_width, 512);
        c.validate().unwrap();
        let back: PretrainConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
        assert_eq!(PretrainConfig::default().objective, Objective::Dinov2);
        let wrong = toml::from_str::<PretrainConfig>("objective = \"simclr\"\n").unwrap_err().to_string();
        assert!(wrong.contains("simclr"), "{wrong}");

        for (edit, field) in [
            ((|c: &mut PretrainConfig| c.mae.mask_ratio = 1.0) as fn(&mut PretrainConfig), "mae.mask_ratio"),
            (|c| c.mae.mask_ratio = 0.0, "mae.mask_ratio"),
            (|c| c.mae.decoder_width = 500, "mae.decoder_width"),
            (|c| c.mae.decoder_depth = 0, "mae.decoder_depth"),
            (|c| c.mae.decoder_lora_rank = 0, "mae.decoder_lora_rank"),
        ] {
            let mut c = c.clone();
            edit(&mut c);
            assert_eq!(c.validate().unwrap_err().field, field);
        }
    }

    #[test]
    fn objectives_pick_their_optimizer_defaults_and_backbones() {
        let mut c = PretrainConfig::default();
        assert_eq!((c.betas(), c.weight_decay()), ([0.9, 0.999], [0.04, 0.4]));
        c.objective = Objective::Mae;
        assert_eq!((c.betas(), c.weight_decay()), ([0.9, 0.95], [0.0, 0.0]));
        c.optim.betas = Some([0.8, 0.9]);
        assert_eq!(c.betas(), [0.8, 0.9]);

        // MAE backbones need the MAE objective; MAE needs 14/16-px patches (8: the tiny test ViTs).
        let mut c = PretrainConfig::default();
        c.crops.global_size = 224;
        c.crops.local_size = 96;
        let err = c.check_model(&VitConfig::mae_vitb16()).unwrap_err();
        assert_eq!(err.field, "objective");
        assert!(err.reason.contains("mae-vitb16") && err.reason.contains("objective = \"mae\""), "{err}");
        c.objective = Objective::Mae;
        c.check_model(&VitConfig::mae_vitb16()).unwrap();
        let odd = VitConfig { patch_size: 32, pos_grid: 7, name: "custom".into(), ..VitConfig::mae_vitb16() };
        assert_eq!(c.check_model(&odd).unwrap_err().field, "objective");
        c.crops.local_size = 98;
        c.check_model(&VitConfig::dinov2_vits14()).unwrap();

        // The MAE objective leaves the encoder's mask token frozen unless asked for.
        let vits = VitConfig::dinov2_vits14();
        assert!(PretrainConfig::default().resolve_plan(&vits).unwrap().mask_token);
        assert!(!c.resolve_plan(&vits).unwrap().mask_token);
        c.plan.mask_token = Some(true);
        assert!(c.resolve_plan(&vits).unwrap().mask_token);
    }

    #[test]
    fn upstep_reads_from_toml_with_its_defaults_plan_and_field_errors() {
        let c: PretrainConfig =
            toml::from_str("objective = \"upstep\"\n[model]\narch = \"tiny\"\n[upstep]\ngate = \"loss-below-ema\"\n").unwrap();
        assert_eq!(c.objective, Objective::Upstep);
        assert_eq!(c.upstep.gate, Gate::LossBelowEma);
        assert_eq!((c.upstep.centres, c.upstep.kmeans_iterations, c.upstep.kmeans_sample), (256, 20, 2_000));
        assert_eq!((c.upstep.ema, c.upstep.temperature, c.upstep.sinkhorn_iterations), (0.996, 0.1, 3));
        assert_eq!((c.upstep.cvr_weight, c.upstep.gate_ema, c.upstep.cvr_threshold), (1.0, 0.9, 1e-3));
        assert_eq!(UpstepSection::default().gate, Gate::Alternate);
        c.validate().unwrap();
        let back: PretrainConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
        let wrong = toml::from_str::<PretrainConfig>("objective = \"upstep\"\n[upstep]\ngate = \"sometimes\"\n").unwrap_err().to_string();
        assert!(wrong.contains("gate") && wrong.contains("sometimes"), "{wrong}");
        for (edit, field) in [
            ((|c: &mut PretrainConfig| c.upstep.cvr_weight = -1.0) as fn(&mut PretrainConfig), "upstep.cvr_weight"),
            (|c| c.upstep.centres = 1, "upstep.centres"),
            (|c| c.upstep.kmeans_sample = 100, "upstep.centres"),
            (|c| c.upstep.temperature = 0.0, "upstep.temperature"),
            (|c| c.upstep.ema = 1.5, "upstep.ema"),
            (|c| c.upstep.gate_ema = 1.0, "upstep.gate_ema"),
        ] {
            let mut c = c.clone();
            edit(&mut c);
            assert_eq!(c.validate().unwrap_err().field, field);
        }
        assert_eq!(c.upstep.check_images(100).unwrap_err().field, "upstep.centres");
        c.upstep.check_images(256).unwrap();
        // The default plan: LoRA r=8 on Q, K, V of every block, nothing else.
        let vits = VitConfig::dinov2_vits14();
        let plan = c.resolve_plan(&vits).unwrap();
        assert!(plan.blocks.iter().all(|m| *m == crate::peft::BlockMode::Lora));
        assert_eq!(plan.lora.rank, 8);
        assert!(plan.lora.targets.q && plan.lora.targets.k && plan.lora.targets.v && !plan.lora.targets.proj);
        assert!(!plan.norms && !plan.cls_token && !plan.mask_token && !plan.patch_embed);
        // A plan the user set is kept.
        let mut mine = c.clone();
        mine.plan.lora_rank = Some(4);
        assert_eq!(mine.resolve_plan(&vits).unwrap().lora.rank, 4);
    }

    #[test]
    fn the_activation_estimate_counts_what_each_objective_trains_on() {
        let vit = VitConfig::preset("vits14").unwrap();
        let mut c = PretrainConfig::default();
        c.optim.batch = 2;
        c.crops.global_size = 224;
        c.crops.local_size = 98;
        c.crops.local_crops = 8;
        let plan = c.resolve_plan(&vit).unwrap();
        let patches = |side: usize| (side / 14) * (side / 14);
        // DINOv2: both global and all local crops through the student.
        let dino = c.activation_bytes(&vit, &plan);
        let crops = [(224, 2), (98, 8)];
        assert_eq!(dino, crate::peft::activation_bytes(&vit, &plan, 2, &crops));
        // UpStep: the two global views only.
        c.objective = Objective::Upstep;
        let plan_u = c.resolve_plan(&vit).unwrap();
        assert_eq!(c.activation_bytes(&vit, &plan_u), crate::peft::activation_bytes(&vit, &plan_u, 2, &[(224, 2)]));
        // MAE: 25 % of one view's 256 patches (64) through the encoder, all 256 (+ CLS) through
        // the decoder's 8 blocks of width 512.
        c.objective = Objective::Mae;
        let plan_m = c.resolve_plan(&vit).unwrap();
        let encoder = crate::peft::activation_bytes_for_tokens(&vit, &plan_m, 2, &[(patches(224) / 4, 1)]);
        let decoder = 4 * 2 * 8 * crate::peft::block_activation_values(512, 2048, 16, patches(224) + 1);
        assert_eq!(c.activation_bytes(&vit, &plan_m), encoder + decoder);
        assert!(encoder < dino / 10, "MAE's encoder sees a quarter of one view: {encoder} vs {dino}");
        c.mae.mask_ratio = 0.5;
        assert!(c.activation_bytes(&vit, &plan_m) > encoder + decoder, "fewer patches masked, more activations");
        assert!(c.views_description().contains("50% of its patches masked, a 512 × 8 decoder"), "{}", c.views_description());
    }

    #[test]
    fn the_peak_lr_follows_each_objectives_rule_unless_one_is_given() {
        let mut c = PretrainConfig { optim: OptimSection { batch: 32, accumulation: 8, ..Default::default() }, ..Default::default() };
        c.model.arch = Some("tiny".into());
        // DINOv2: 1e-3 at 1,024 images, square-root scaling.
        assert!((c.peak_lr() - 1e-3 * 0.5).abs() < 1e-12);
        // MAE: 4.5e-4 × batch / 256.
        c.objective = Objective::Mae;
        assert!((c.peak_lr() - 4.5e-4).abs() < 1e-12);
        // A value given wins over the objective's.
        c.optim.base_lr = Some(1e-4);
        c.optim.lr_scaling = Some(LrScaling::Sqrt);
        assert!((c.peak_lr() - 1e-4).abs() < 1e-12);
        let text = c.to_toml();
        assert!(text.contains("lr_scaling = \"sqrt\""), "{text}");
        c.optim.base_lr = Some(-1.0);
        assert_eq!(c.validate().unwrap_err().field, "optim.base_lr");
    }
}
