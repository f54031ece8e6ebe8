//! What differs between the objectives of a pre-training run, behind one type the run's loop
//! drives: the models (DINOv2: student, EMA teacher and centers; MAE: encoder and decoder),
//! what a batch becomes, the optimizer step, checkpoints, which backbone is monitored and
//! exported, and the pictures written at the end.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};

use super::config::{Objective, PretrainConfig};
use super::mae_step::{MaeState, mae_optimizer_step};
use super::state::{self, Readable, TrainState};
use super::step::{StepOutcome, StepValues, optimizer_step};
use super::upstep_step::{UpstepState, run_centres, strip_adapters, upstep_optimizer_step};
use crate::checkpoint::load_mae_decoder;
use crate::data::{CropBatch, ImageSource, MaskConfig, MultiCropConfig, Preprocess, ProceduralDomain};
use crate::engine::{BatchPreview, JobContext};
use crate::model::Vit;
use crate::model::params::for_each_param;
use crate::objectives::MaskedPatches;
use crate::objectives::StepInputs;
use crate::objectives::mae::{MaeDecoder, MaeModel, PatchMask, reconstruct, step_mask};

/// The run's models and optimizer state, per objective.
pub enum Trainer {
    Dino(Box<TrainState>),
    Mae(Box<MaeState>),
    Upstep(Box<UpstepState>),
}

impl Trainer {
    /// Step 0 of a run of `config.objective` on `backbone` (the adapted encoder, on the autodiff
    /// device `ad`); `device` is the plain device. For MAE, the decoder comes from the run's
    /// checkpoint when it carries one, else a fresh one; the log says which. For UpStep, the
    /// centres come from the run folder `run` when it has them, else k-means on `source`.
    pub fn new(
        backbone: Vit,
        config: &PretrainConfig,
        device: &Device,
        ad: &Device,
        source: &dyn ImageSource,
        run: &Path,
        ctx: &mut JobContext,
    ) -> anyhow::Result<Self> {
        Ok(match config.objective {
            Objective::Dinov2 => Trainer::Dino(Box::new(TrainState::new(backbone, config, device))),
            Objective::Mae => {
                let decoder = mae_decoder(config, &backbone, ad, ctx)?;
                Trainer::Mae(Box::new(MaeState::new(MaeModel { backbone, decoder }, config)))
            }
            Objective::Upstep => {
                let centres = run_centres(config, &strip_adapters(backbone.clone()), source, run, device, ctx)?;
                Trainer::Upstep(Box::new(UpstepState::new(backbone, centres, config)))
            }
        })
    }

    /// Optimizer steps done.
    pub fn step(&self) -> u64 {
        match self {
            Trainer::Dino(s) => s.step,
            Trainer::Mae(s) => s.step,
            Trainer::Upstep(s) => s.step,
        }
    }

    /// The backbone the run monitors and exports: DINOv2's EMA teacher, MAE's encoder,
    /// UpStep's offline (EMA) model.
    pub fn encoder(&self) -> &Vit {
        match self {
            Trainer::Dino(s) => &s.teacher.backbone,
            Trainer::Mae(s) => &s.model.backbone,
            Trainer::Upstep(s) => &s.offline.backbone,
        }
    }

    /// The backbone the optimizer updates (the student for DINOv2).
    pub fn student(&self) -> &Vit {
        match self {
            Trainer::Dino(s) => &s.student.backbone,
            Trainer::Mae(s) => &s.model.backbone,
            Trainer::Upstep(s) => &s.online.backbone,
        }
    }

    /// What trains beside the backbone, for the log and the report: `(description, parameters)`.
    pub fn extra_module(&self, config: &PretrainConfig) -> (String, usize) {
        match self {
            Trainer::Dino(s) => ("head".into(), config.head.num_params(s.student.backbone.config().embed_dim)),
            Trainer::Mae(s) => {
                let d = &s.model.decoder;
                let mut trainable = 0;
                let mut all = true;
                for_each_param(d, |_, t, on| {
                    if on {
                        trainable += t.dims()[0];
                    } else {
                        all = false;
                    }
                });
                let how = if all { "fresh, trains fully" } else { "from the checkpoint: LoRA on Q,V and norms train" };
                (format!("MAE decoder (width {}, {} blocks; {how})", d.width(), d.depth()), trainable)
            }
            Trainer::Upstep(s) => (format!("UpStep: {} fixed k-means centres, no head", s.centres.dims()[0]), 0),
        }
    }

    /// Runs one optimizer step, pulling `config.optim.accumulation` batches from `next_batch`.
    /// `ad` is the autodiff device the batches are uploaded to.
    pub fn optimizer_step(
        self,
        config: &PretrainConfig,
        values: StepValues,
        device: &Device,
        ad: &Device,
        profile: bool,
        mut next_batch: impl FnMut(u64) -> anyhow::Result<CropBatch>,
    ) -> anyhow::Result<(Self, StepOutcome)> {
        Ok(match self {
            Trainer::Dino(s) => {
                let patch = s.student.backbone.config().patch_size;
                let grid = config.crops.global_size as usize / patch;
                let capacity = crate::data::max_masked(2 * config.optim.batch, grid * grid, &config.masks).max(1);
                let (s, outcome) =
                    optimizer_step(*s, config, values, device, profile, |micro| Ok(step_inputs(&next_batch(micro)?, patch, capacity, ad)))?;
                (Trainer::Dino(Box::new(s)), outcome)
            }
            Trainer::Mae(s) => {
                let (s, outcome) =
                    mae_optimizer_step(*s, config, values, device, profile, |micro| Ok(first_globals(&next_batch(micro)?, ad)))?;
                (Trainer::Mae(Box::new(s)), outcome)
            }
            Trainer::Upstep(s) => {
                let (s, outcome) =
                    upstep_optimizer_step(*s, config, values, device, profile, |micro| Ok(both_globals(&next_batch(micro)?, ad)))?;
                (Trainer::Upstep(Box::new(s)), outcome)
            }
        })
    }

    /// The schedule values of the step that the metrics record.
    pub fn schedule(&self, values: &StepValues) -> Vec<(&'static str, f64)> {
        match self {
            Trainer::Dino(_) => {
                vec![("lr", values.lr), ("wd", values.weight_decay), ("teacher_temp", values.teacher_temp), ("momentum", values.momentum)]
            }
            Trainer::Mae(_) | Trainer::Upstep(_) => vec![("lr", values.lr), ("wd", values.weight_decay)],
        }
    }

    /// Writes the checkpoint of the current step; see [`state::save`].
    pub fn save(&self, run: &Path, keep: usize) -> anyhow::Result<PathBuf> {
        match self {
            Trainer::Dino(s) => state::save(run, s, keep),
            Trainer::Mae(s) => s.save(run, keep),
            Trainer::Upstep(s) => s.save(run, keep),
        }
    }

    /// Restores a checkpoint into this freshly built state.
    pub fn restore(self, found: Readable, device: &Device) -> anyhow::Result<Self> {
        Ok(match self {
            Trainer::Dino(s) => Trainer::Dino(Box::new(state::restore(found, *s, device)?)),
            Trainer::Mae(s) => Trainer::Mae(Box::new(s.restore(found, device)?)),
            Trainer::Upstep(s) => Trainer::Upstep(Box::new(s.restore(found, device)?)),
        })
    }

    /// For MAE, what the app's batch viewer shows of optimizer step `step` (0-based, just
    /// taken): each previewed sample's input crop with the patch mask that step trained on
    /// (micro-batch 0 of `batch` images) and the model's reconstruction of it after the step.
    /// `globals`: the first global crop of each previewed sample (CHW, normalised). The other
    /// objectives' previews are left as they are.
    pub fn annotate_preview(
        &self,
        preview: &mut BatchPreview,
        globals: &[f32],
        batch: usize,
        config: &PretrainConfig,
        step: u64,
        device: &Device,
    ) {
        let Trainer::Mae(s) = self else { return };
        let n = preview.samples.len();
        let size = config.crops.global_size as usize;
        let patch = s.model.backbone.config().patch_size;
        let plane = 3 * size * size;
        if n == 0 || n > batch || globals.len() != n * plane {
            return;
        }
        let all = step_mask(config.run.seed, step, 0, batch, (size / patch) * (size / patch), config.mae.mask_ratio);
        let patches = all.patches;
        let mask = PatchMask { patches, keep: all.keep[..n].to_vec(), masked: all.masked[..n * patches].to_vec() };
        let pasted = reconstructed(&s.model.clone().valid(), globals, &mask, size, config.mae.norm_pix, device);
        for ((j, sample), pasted) in preview.samples.iter_mut().enumerate().zip(pasted) {
            sample.globals.truncate(1);
            sample.masks = mask.masked[j * patches..(j + 1) * patches].to_vec();
            sample.reconstruction = Some(crate::data::denormalize_chw_to_rgb(&pasted, size as u32, size as u32));
        }
    }

    /// What the objective leaves in the run folder when the run ends: for MAE,
    /// `reconstructions.png` (held-out tiles: input | masked input | reconstruction).
    pub fn finish(
        &self,
        config: &PretrainConfig,
        source: &dyn ImageSource,
        out: &Path,
        device: &Device,
        ctx: &mut JobContext,
    ) -> anyhow::Result<()> {
        let Trainer::Mae(s) = self else { return Ok(()) };
        let (tiles, what) = held_out_tiles(config, source, 6);
        let sheet = reconstruction_sheet(&s.model.clone().valid(), config, &tiles, device);
        let path = out.join("reconstructions.png");
        sheet.save(&path).map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
        ctx.artifact(format!("MAE reconstructions of {what}: input | masked input | reconstruction"), path);
        Ok(())
    }
}

/// The crops and iBOT masks the loader makes for `config`'s objective. MAE sees each image
/// once, as the first global crop, cropped and flipped only (its reference augmentation): no
/// local crops, colour jitter, blur, solarisation or iBOT masks. UpStep sees the two global
/// crops with DINOv2's augmentations, no local crops, no masks.
pub fn loader_crops(config: &PretrainConfig) -> (MultiCropConfig, MaskConfig) {
    match config.objective {
        Objective::Upstep => {
            (MultiCropConfig { local_crops: 0, ..config.crops.clone() }, MaskConfig { probability: 0.0, ..config.masks.clone() })
        }
        Objective::Dinov2 => (config.crops.clone(), config.masks.clone()),
        Objective::Mae => (
            MultiCropConfig {
                local_crops: 0,
                color_jitter: 0.0,
                grayscale: 0.0,
                blur_global: [0.0, 0.0],
                blur_local: 0.0,
                solarize: 0.0,
                ..config.crops.clone()
            },
            MaskConfig { probability: 0.0, ..config.masks.clone() },
        ),
    }
}

/// The MAE decoder of a run: the checkpoint's (adapted with LoRA) or a fresh one.
fn mae_decoder(config: &PretrainConfig, encoder: &Vit, ad: &Device, ctx: &mut JobContext) -> anyhow::Result<MaeDecoder> {
    let vit = encoder.config();
    let (patch, width) = (vit.patch_size, vit.embed_dim);
    let grid = config.crops.global_size as usize / patch;
    let m = &config.mae;
    let path = config.model.weights.as_ref().ok_or_else(|| anyhow::anyhow!("the run has no weights (not even saved random ones)"))?;
    match load_mae_decoder(path, m.decoder_heads, width, grid, patch, ad)? {
        Some(loaded) => {
            let c = loaded.config;
            ctx.info(format!(
                "loaded the MAE decoder of {} (width {}, {} blocks, {} tensors): LoRA r={} on Q,V of its blocks and its norms train; \
                 its embedding, mask token and prediction stay frozen",
                path.display(),
                c.width,
                c.depth,
                loaded.loaded,
                m.decoder_lora_rank
            ));
            Ok(loaded.decoder.adapt(m.decoder_lora_rank, config.plan.lora_alpha.unwrap_or(1.0)))
        }
        None => {
            ctx.info(format!(
                "no MAE decoder in {}: a fresh decoder (width {}, depth {}, {} heads) trains from scratch",
                path.display(),
                m.decoder_width,
                m.decoder_depth,
                m.decoder_heads
            ));
            Ok(m.decoder().init(width, grid, patch, ad))
        }
    }
}

/// The DINOv2 step's inputs from a batch of crops, on `device`.
fn step_inputs(batch: &CropBatch, patch: usize, capacity: usize, device: &Device) -> StepInputs {
    let b = batch.batch;
    let (g, s) = (2, batch.global_size as usize);
    let (l, ls) = (batch.local_crops, batch.local_size as usize);
    let n = (s / patch) * (s / patch);
    let globals = Tensor::<4>::from_data(TensorData::new(batch.globals.clone(), [g * b, 3, s, s]), device);
    let locals = (l > 0).then(|| Tensor::<4>::from_data(TensorData::new(batch.locals.clone(), [l * b, 3, ls, ls]), device));
    let mask_values: Vec<f32> = batch.masks.iter().map(|&m| if m { 1.0 } else { 0.0 }).collect();
    let masks = Tensor::<2>::from_data(TensorData::new(mask_values, [g * b, n]), device).greater_elem(0.5);
    StepInputs {
        globals,
        locals,
        masks,
        masked: MaskedPatches::new(&batch.masks, n, capacity, device),
        batch: b,
        global_crops: g,
        local_crops: l,
    }
}

/// Both global crops of every sample `[2B, 3, S, S]` (crop 0 of every sample, then crop 1), on
/// `device` (UpStep's two views).
fn both_globals(batch: &CropBatch, device: &Device) -> Tensor<4> {
    let (b, s) = (batch.batch, batch.global_size as usize);
    Tensor::from_data(TensorData::new(batch.globals[..2 * b * 3 * s * s].to_vec(), [2 * b, 3, s, s]), device)
}

/// The first global crop of every sample `[B, 3, S, S]`, on `device` (what MAE reconstructs).
fn first_globals(batch: &CropBatch, device: &Device) -> Tensor<4> {
    let (b, s) = (batch.batch, batch.global_size as usize);
    Tensor::from_data(TensorData::new(batch.globals[..b * 3 * s * s].to_vec(), [b, 3, s, s]), device)
}

/// `n` preprocessed tiles the run did not train on, and what they are: tiles of the procedural
/// domain under another seed, or (a folder of images) the first images of the source.
fn held_out_tiles(config: &PretrainConfig, source: &dyn ImageSource, n: usize) -> (Vec<Vec<f32>>, String) {
    let size = config.crops.global_size;
    let pre = Preprocess::new(size);
    if config.data.images.is_none() && config.data.list.is_none() {
        let domain = ProceduralDomain { size, seed: config.run.seed ^ 0x5245_4300, shift: config.data.procedural_shift };
        let tiles = domain.batch(0, n).into_iter().map(|(img, _)| pre.to_tensor_data(&img)).collect();
        return (tiles, format!("{n} held-out procedural tiles"));
    }
    let tiles: Vec<Vec<f32>> = (0..source.len()).filter_map(|i| source.load(i).ok()).take(n).map(|img| pre.to_tensor_data(&img)).collect();
    let count = tiles.len();
    (tiles, format!("the first {count} training images"))
}

/// One row per tile: input | masked input (hidden patches grey) | reconstruction (the
/// predicted masked patches beside the visible ones), un-normalised to RGB.
fn reconstruction_sheet(model: &MaeModel, config: &PretrainConfig, tiles: &[Vec<f32>], device: &Device) -> image::RgbImage {
    let s = config.crops.global_size as usize;
    let patch = model.backbone.config().patch_size;
    let g = s / patch;
    let n = tiles.len();
    if n == 0 {
        return image::RgbImage::new(1, 1);
    }
    let data: Vec<f32> = tiles.iter().flatten().copied().collect();
    let mask = step_mask(config.run.seed ^ 0x5245_4300, 0, 0, n, g * g, config.mae.mask_ratio);
    let pasted = reconstructed(model, &data, &mask, s, config.mae.norm_pix, device);
    let rows: Vec<Vec<image::RgbImage>> = tiles
        .iter()
        .zip(&pasted)
        .enumerate()
        .map(|(j, (input, masked))| {
            let rgb = |d: &[f32]| crate::data::denormalize_chw_to_rgb(d, s as u32, s as u32);
            let mut hidden = rgb(input);
            grey_out(&mut hidden, &mask, j, g, patch);
            vec![rgb(input), hidden, rgb(masked)]
        })
        .collect();
    crate::inspect::grid_sheet(&rows)
}

/// Each of the `mask.keep.len()` images in `data` (CHW, `s × s`, normalised, one after
/// another) with its masked patches replaced by `model`'s reconstruction, as the sheet and the
/// app's batch viewer show it.
fn reconstructed(model: &MaeModel, data: &[f32], mask: &PatchMask, s: usize, norm_pix: bool, device: &Device) -> Vec<Vec<f32>> {
    let n = mask.keep.len();
    let patch = model.backbone.config().patch_size;
    let plane = 3 * s * s;
    let images = Tensor::<4>::from_data(TensorData::new(data.to_vec(), [n, 3, s, s]), device);
    let pred = model.forward(images.clone(), mask);
    let recon = crate::model::to_vec(reconstruct(pred, images, patch, norm_pix));
    (0..n).map(|j| paste(&data[j * plane..(j + 1) * plane], &recon[j * plane..(j + 1) * plane], mask, j, s, patch)).collect()
}

/// `input` with the masked patches of image `j` taken from `recon` (both CHW, `s × s`).
fn paste(input: &[f32], recon: &[f32], mask: &PatchMask, j: usize, s: usize, patch: usize) -> Vec<f32> {
    let g = s / patch;
    let mut out = input.to_vec();
    for (i, v) in out.iter_mut().enumerate() {
        let (y, x) = ((i / s) % s, i % s);
        if mask.masked[j * mask.patches + (y / patch) * g + x / patch] {
            *v = recon[i];
        }
    }
    out
}

fn grey_out(img: &mut image::RgbImage, mask: &PatchMask, j: usize, g: usize, patch: usize) {
    for (x, y, px) in img.enumerate_pixels_mut() {
        let (r, c) = (y as usize / patch, x as usize / patch);
        if r < g && c < g && mask.masked[j * mask.patches + r * g + c] {
            *px = image::Rgb([128, 128, 128]);
        }
    }
}
