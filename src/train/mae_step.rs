//! One optimizer step of ExPLoRA pre-training with the MAE objective, and its checkpoints: for
//! each micro-batch a random mask (a function of the run's seed and the step, so a resumed run
//! draws the same masks), the encoder on the visible patches, the decoder, the reconstruction
//! loss, the backward pass and the gradient accumulation; then the global-norm clip and AdamW.
//! No teacher. As in the DINOv2 step, the loss and the gradient norm stay on the device until
//! the single read-back at the end of the step.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor};

use super::config::{Objective, PretrainConfig};
use super::state::{self, Readable};
use super::step::{DeviceSum, PhaseTimer, StepOutcome, StepValues};
use crate::model::params::accumulate_grads;
use crate::model::to_vec;
use crate::objectives::mae::{MaeModel, step_mask};
use crate::optim::{AdamW, clip_by_global_norm};

/// The state of an MAE run between two optimizer steps.
pub struct MaeState {
    /// Optimizer steps done.
    pub step: u64,
    pub model: MaeModel,
    pub optim: AdamW,
}

impl MaeState {
    /// Step 0: the adapted encoder and the decoder (on the autodiff device), empty moments.
    pub fn new(model: MaeModel, config: &PretrainConfig) -> Self {
        Self { step: 0, model, optim: AdamW::new(config.betas(), config.optim.eps) }
    }

    /// Writes the checkpoint (the encoder's and the decoder's trainable tensors, the moments)
    /// atomically and deletes all but the newest `keep`.
    pub fn save(&self, run: &Path, keep: usize) -> anyhow::Result<PathBuf> {
        state::write(run, self.step, state::trainable(&self.model, "model"), &self.optim, Objective::Mae, keep)
    }

    /// Restores a checkpoint read by [`state::read`] into a freshly built state (same config,
    /// plan and decoder); names any tensor the model expects that the file lacks.
    pub fn restore(mut self, found: Readable, device: &Device) -> anyhow::Result<Self> {
        let steps = found.optim_steps()?;
        let Readable { step, path, tensors, meta } = found;
        state::check_objective(&meta, Objective::Mae, &path)?;
        let mut missing = Vec::new();
        self.model = state::restore_trainable(self.model, "model", &tensors, &mut missing);
        if !missing.is_empty() {
            anyhow::bail!("{} does not match this run's model and plan; missing or mis-sized: {}", path.display(), missing.join(", "));
        }
        self.optim.load(&tensors, &steps, device)?;
        self.step = step;
        Ok(self)
    }
}

/// Runs optimizer step `state.step` (0-based) with the schedule `values`, pulling
/// `config.optim.accumulation` micro-batches of images `[B, 3, S, S]` (ImageNet-normalised, on
/// the autodiff device) from `next_images(micro)`. Advances `state.step`. `device` is the plain
/// device.
pub fn mae_optimizer_step(
    mut state: MaeState,
    config: &PretrainConfig,
    values: StepValues,
    device: &Device,
    profile: bool,
    mut next_images: impl FnMut(u64) -> anyhow::Result<Tensor<4>>,
) -> anyhow::Result<(MaeState, StepOutcome)> {
    let accumulation = config.optim.accumulation as u64;
    let patch = state.model.backbone.config().patch_size;
    let mut timer = PhaseTimer::new(device, profile);
    let mut grads = HashMap::new();
    let mut total = DeviceSum::default();
    for micro in 0..accumulation {
        let images = next_images(micro)?;
        timer.mark("data");
        let [b, _, h, w] = images.dims();
        let mask = step_mask(config.run.seed, state.step, micro, b, (h / patch) * (w / patch), config.mae.mask_ratio);
        let (loss, _) = state.model.loss(images, &mask, config.mae.norm_pix);
        timer.mark("forward");
        let backward = loss.clone().div_scalar(accumulation as f64).backward();
        accumulate_grads(&state.model, &backward, &mut grads);
        timer.mark("backward");
        let now = loss.detach().inner().div_scalar(accumulation as f64);
        total.add(now);
    }
    let (norm, grad_scale) = clip_by_global_norm(&grads, config.optim.clip_grad, device);
    let rule = values.update_rule(config, state.step, state.model.backbone.config().depth);
    state.model = state.optim.step(state.model, grads, &grad_scale, rule);
    timer.mark("optimizer");
    // The one read-back of the step.
    let read = to_vec(Tensor::cat(vec![total.total()?, norm], 0));
    state.step += 1;
    Ok((state, StepOutcome { parts: vec![("loss", f64::from(read[0]))], grad_norm: f64::from(read[1]), timings: timer.timings }))
}
