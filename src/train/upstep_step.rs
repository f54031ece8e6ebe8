//! One iteration of ExPLoRA pre-training with the UpStep objective (an interpretation of the
//! paper's abstract; see [`super::config::UpstepSection`]), its centres and its checkpoints.
//!
//! Every iteration runs the forward pass of its micro-batches (online, offline and base model
//! on both global crops). The gate then decides whether the iteration also runs the backward
//! passes, the clip, AdamW and the offline EMA update, or skips them; a skipped iteration runs
//! no `.backward()` at all (`backward_passes` counts them where they are called). The
//! iteration counter (`step`, what the run's progress, checkpoints and schedules count)
//! advances either way. For the data-dependent gates (`loss-below-ema`, `cvr-threshold`) the
//! first micro-batch's loss and drift are read back before its backward pass: the decision
//! needs them on the host.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};

use super::config::{Gate, Objective, PretrainConfig};
use super::state::{self, Readable};
use super::step::{DeviceSum, PhaseTimer, StepOutcome, StepValues};
use crate::checkpoint::{Metadata, RawTensor, TensorMap, read_safetensors, write_safetensors};
use crate::data::{ImageSource, Preprocess};
use crate::engine::JobContext;
use crate::model::params::{accumulate_grads, for_each_param, map_params, map_selected_params, trainable_params};
use crate::model::{ForwardOptions, Vit, to_vec};
use crate::objectives::upstep::{SplitMix, centre_drift, codes, log_predictions, mean_direction, spherical_kmeans, swap_loss};
use crate::optim::{AdamW, clip_by_global_norm};

/// The online model: the backbone under the plan (paths `backbone.*`, as the optimizer's
/// layer-wise rules expect).
#[derive(Module, Debug)]
pub struct UpstepModel {
    pub backbone: Vit,
}

/// The gate's state, checkpointed so a resumed run skips the same iterations.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct GateState {
    /// Running mean of the gated loss (`None` before the first iteration).
    pub loss_ema: Option<f32>,
    pub skipped: u64,
    pub backward_passes: u64,
}

/// The state of an UpStep run between two iterations.
pub struct UpstepState {
    /// Iterations done (skipped ones included).
    pub step: u64,
    pub online: UpstepModel,
    /// The EMA of the online model (no autodiff); exported at the end.
    pub offline: UpstepModel,
    /// The base model (the backbone without its adapters), frozen, for the regulariser.
    pub base: Vit,
    /// `[K, D]` unit centres, on the plain device.
    pub centres: Tensor<2>,
    pub optim: AdamW,
    pub gate: GateState,
}

/// The backbone with its adapters (LoRA, Convpass, memory tokens) taken off: at step 0, before
/// anything trained, this is the base model.
pub fn strip_adapters(mut model: Vit) -> Vit {
    for block in model.blocks.iter_mut() {
        block.attn.lora_q = None;
        block.attn.lora_k = None;
        block.attn.lora_v = None;
        block.attn.lora_proj = None;
        block.mlp.lora_fc1 = None;
        block.mlp.lora_fc2 = None;
        block.convpass_attn = None;
        block.convpass_mlp = None;
    }
    model.tasks.clear();
    model
}

impl UpstepState {
    /// Step 0: the adapted backbone (autodiff device) as the online model, its copy as the
    /// offline model, the base model, the centres, empty moments.
    pub fn new(backbone: Vit, centres: Tensor<2>, config: &PretrainConfig) -> Self {
        let base = strip_adapters(backbone.clone()).valid();
        let online = UpstepModel { backbone };
        let offline = online.valid();
        Self { step: 0, online, offline, base, centres, optim: AdamW::new(config.betas(), config.optim.eps), gate: GateState::default() }
    }

    /// Writes the checkpoint: the online and offline trainable tensors, the moments and the
    /// gate's state (`gate.state` = [loss EMA or NaN, skipped, backward passes]).
    pub fn save(&self, run: &Path, keep: usize) -> anyhow::Result<PathBuf> {
        let mut tensors = state::trainable(&self.online, "online");
        for_each_param(&self.offline, |name, t, _| {
            if tensors.contains_key(&format!("online.{name}")) {
                let data = to_vec(t);
                tensors.insert(format!("offline.{name}"), RawTensor::new(vec![data.len()], data));
            }
        });
        let g = self.gate;
        tensors.insert(
            "gate.state".into(),
            RawTensor::new(vec![3], vec![g.loss_ema.unwrap_or(f32::NAN), g.skipped as f32, g.backward_passes as f32]),
        );
        state::write(run, self.step, tensors, &self.optim, Objective::Upstep, keep)
    }

    /// Restores a checkpoint into a freshly built state (same config, plan and centres).
    pub fn restore(mut self, found: Readable, device: &Device) -> anyhow::Result<Self> {
        let steps = found.optim_steps()?;
        let Readable { step, path, tensors, meta } = found;
        state::check_objective(&meta, Objective::Upstep, &path)?;
        let mut missing = Vec::new();
        self.online = state::restore_trainable(self.online, "online", &tensors, &mut missing);
        let names: Vec<String> = trainable_params(&self.online).into_keys().collect();
        for name in &names {
            if !tensors.contains_key(&format!("offline.{name}")) {
                missing.push(format!("offline.{name}"));
            }
        }
        match tensors.get("gate.state") {
            Some(g) if g.data.len() == 3 => {
                let ema = g.data[0];
                self.gate =
                    GateState { loss_ema: (!ema.is_nan()).then_some(ema), skipped: g.data[1] as u64, backward_passes: g.data[2] as u64 };
            }
            _ => missing.push("gate.state".into()),
        }
        if !missing.is_empty() {
            anyhow::bail!("{} does not match this run's model and plan; missing or mis-sized: {}", path.display(), missing.join(", "));
        }
        self.offline = map_params(self.offline, |name, current| {
            if !names.iter().any(|n| n == name) {
                return None;
            }
            let t = tensors.get(&format!("offline.{name}"))?;
            Some(Tensor::from_data(TensorData::new(t.data.clone(), [t.data.len()]), &current.device()))
        });
        self.optim.load(&tensors, &steps, device)?;
        self.step = step;
        Ok(self)
    }
}

/// `<run>/centres.safetensors`
pub fn centres_path(run: &Path) -> PathBuf {
    run.join("centres.safetensors")
}

/// The run's centres `[K, D]` on `device`: read from `centres.safetensors` when the run folder
/// has them (a resumed run), else spherical k-means of the base model's CLS embeddings of up to
/// `upstep.kmeans_sample` training images (a seeded sample, each resized and centre-cropped to
/// the global crop size), written there.
pub fn run_centres(
    config: &PretrainConfig,
    base: &Vit,
    source: &dyn ImageSource,
    run: &Path,
    device: &Device,
    ctx: &mut JobContext,
) -> anyhow::Result<Tensor<2>> {
    let u = &config.upstep;
    let d = base.config().embed_dim;
    let path = centres_path(run);
    if path.exists() {
        let (tensors, _) = read_safetensors(&path)?;
        let t = tensors.get("centres").ok_or_else(|| anyhow::anyhow!("{} has no `centres` tensor", path.display()))?;
        if t.shape != [u.centres, d] {
            anyhow::bail!(
                "{} holds centres of shape {:?}; this run needs [{}, {d}] (upstep.centres × width)",
                path.display(),
                t.shape,
                u.centres
            );
        }
        ctx.info(format!("UpStep: {} centres read from {}", u.centres, path.display()));
        return Ok(Tensor::from_data(TensorData::new(t.data.clone(), [u.centres, d]), device));
    }
    u.check_images(source.len().min(u.kmeans_sample))?;
    let began = Instant::now();
    let picked = SplitMix::new(config.run.seed).sample(source.len(), u.kmeans_sample);
    let pre = Preprocess::new(config.crops.global_size);
    let size = config.crops.global_size as usize;
    let base = base.clone().valid();
    let mut embeddings = Vec::with_capacity(picked.len() * d);
    let mut used = 0;
    for chunk in picked.chunks(32) {
        let mut data = Vec::new();
        for &i in chunk {
            match source.load(i) {
                Ok(img) => data.extend(pre.to_tensor_data(&img)),
                Err(e) => ctx.warn(format!("UpStep k-means: skipped image {i}: {e}")),
            }
        }
        let n = data.len() / (3 * size * size);
        if n == 0 {
            continue;
        }
        used += n;
        let images = Tensor::<4>::from_data(TensorData::new(data, [n, 3, size, size]), device);
        embeddings.extend(to_vec(base.forward(images, ForwardOptions::default()).cls));
    }
    u.check_images(used)?;
    let centres = spherical_kmeans(&embeddings, d, u.centres, u.kmeans_iterations, config.run.seed);
    let mut tensors = TensorMap::new();
    tensors.insert("centres".into(), RawTensor::new(vec![u.centres, d], centres.clone()));
    let mut meta = Metadata::new();
    meta.insert("images".into(), used.to_string());
    meta.insert("iterations".into(), u.kmeans_iterations.to_string());
    write_safetensors(&path, &tensors, &meta)?;
    ctx.info(format!(
        "UpStep: spherical k-means of the base model's CLS embeddings of {used} images → {} centres ({} iterations, {:.1} s), saved to {}",
        u.centres,
        u.kmeans_iterations,
        began.elapsed().as_secs_f64(),
        path.display()
    ));
    Ok(Tensor::from_data(TensorData::new(centres, [u.centres, d]), device))
}

/// Moves the offline model towards the online one: `o ← m·o + (1 − m)·s` for every tensor
/// the online model trains.
fn ema_update(offline: UpstepModel, online: &UpstepModel, momentum: f64) -> UpstepModel {
    let source = trainable_params(online);
    map_selected_params(
        offline,
        |name| source.contains_key(name),
        |name, t| source.get(name).map(|s| t.mul_scalar(momentum) + s.clone().mul_scalar(1.0 - momentum)),
    )
}

/// Whether the gate skips an iteration known before its forward pass (`alternate`, `off`);
/// `None` when it depends on the iteration's values.
fn gate_before(gate: Gate, step: u64) -> Option<bool> {
    match gate {
        Gate::Alternate => Some(step % 2 == 1),
        Gate::Off => Some(false),
        Gate::LossBelowEma | Gate::CvrThreshold => None,
    }
}

/// Runs iteration `state.step` (0-based) with the schedule `values`, pulling
/// `config.optim.accumulation` micro-batches of both global crops `[2B, 3, S, S]` (crop 0 of
/// every sample, then crop 1; on the autodiff device) from `next_views(micro)`. Advances
/// `state.step`. `device` is the plain device.
pub fn upstep_optimizer_step(
    mut state: UpstepState,
    config: &PretrainConfig,
    values: StepValues,
    device: &Device,
    profile: bool,
    mut next_views: impl FnMut(u64) -> anyhow::Result<Tensor<4>>,
) -> anyhow::Result<(UpstepState, StepOutcome)> {
    let u = &config.upstep;
    let accumulation = config.optim.accumulation as u64;
    let mut timer = PhaseTimer::new(device, profile);
    let mut skip = gate_before(u.gate, state.step);
    let mut gated_loss = None;
    let mut grads = HashMap::new();
    let mut parts = DeviceSum::default();
    let mut backward_passes = 0u64;
    let centres = state.centres.clone();
    let centres_ad = centres.clone().autodiff();
    for micro in 0..accumulation {
        let views = next_views(micro)?;
        timer.mark("data");
        let b = views.dims()[0] / 2;
        let online = state.online.backbone.forward(views.clone(), ForwardOptions::default()).cls;
        let plain = views.inner();
        let offline = state.offline.backbone.forward(plain.clone(), ForwardOptions::default()).cls;
        let base = state.base.forward(plain, ForwardOptions::default()).cls;
        let (t, it) = (u.code_temperature, u.sinkhorn_iterations);
        let q1 = codes(offline.clone().narrow(0, 0, b), centres.clone(), t, it).autodiff();
        let q2 = codes(offline.narrow(0, b, b), centres.clone(), t, it).autodiff();
        let log_p1 = log_predictions(online.clone().narrow(0, 0, b), centres_ad.clone(), u.temperature);
        let log_p2 = log_predictions(online.clone().narrow(0, b, b), centres_ad.clone(), u.temperature);
        let swap = swap_loss(q1, q2, log_p1, log_p2);
        let c = mean_direction(online);
        let c_base = mean_direction(base);
        let cvr = centre_drift(c.clone(), c_base.clone().autodiff());
        let loss = swap.clone() + cvr.clone().mul_scalar(u.cvr_weight);
        timer.mark("forward");
        if skip.is_none() {
            // The one extra read-back of a data-dependent gate.
            let read = to_vec(Tensor::cat(vec![loss.clone().detach().inner(), cvr.clone().detach().inner()], 0));
            let (l, drift) = (read[0], read[1]);
            gated_loss = Some(l);
            skip = Some(match u.gate {
                Gate::LossBelowEma => state.gate.loss_ema.is_some_and(|ema| l < ema),
                Gate::CvrThreshold => f64::from(drift) < u.cvr_threshold,
                Gate::Alternate | Gate::Off => unreachable!("decided before the forward pass"),
            });
        }
        if skip == Some(false) {
            let backward = loss.clone().div_scalar(accumulation as f64).backward();
            backward_passes += 1;
            accumulate_grads(&state.online, &backward, &mut grads);
            timer.mark("backward");
        }
        let norm = |x: Tensor<2>| x.powf_scalar(2.0).sum().sqrt();
        let now = Tensor::cat(
            vec![loss.detach().inner(), swap.detach().inner(), cvr.detach().inner(), norm(c.detach().inner()), norm(c_base)],
            0,
        )
        .div_scalar(accumulation as f64);
        parts.add(now);
    }
    let skipped = skip.unwrap_or(false);
    let norm = if skipped {
        Tensor::zeros([1], device)
    } else {
        let (norm, grad_scale) = clip_by_global_norm(&grads, config.optim.clip_grad, device);
        let rule = values.update_rule(config, state.step, state.online.backbone.config().depth);
        state.online = state.optim.step(state.online, grads, &grad_scale, rule);
        timer.mark("optimizer");
        state.offline = ema_update(state.offline, &state.online, u.ema);
        timer.mark("ema");
        norm
    };
    // The read-back of the step.
    let read = to_vec(Tensor::cat(vec![parts.total()?, norm], 0));
    let f = |i: usize| f64::from(read[i]);
    if let Some(l) = gated_loss {
        state.gate.loss_ema = Some(match state.gate.loss_ema {
            Some(ema) => (u.gate_ema * f64::from(ema) + (1.0 - u.gate_ema) * f64::from(l)) as f32,
            None => l,
        });
    }
    state.gate.skipped += u64::from(skipped);
    state.gate.backward_passes += backward_passes;
    state.step += 1;
    let mut out = vec![("loss", f(0)), ("swap", f(1)), ("cvr", f(2)), ("centre_norm_online", f(3)), ("centre_norm_base", f(4))];
    out.push(("skipped", f64::from(u8::from(skipped))));
    out.push(("skipped_total", state.gate.skipped as f64));
    out.push(("backward_passes", backward_passes as f64));
    out.push(("backward_total", state.gate.backward_passes as f64));
    if let Some(ema) = state.gate.loss_ema {
        out.push(("loss_ema", f64::from(ema)));
    }
    Ok((state, StepOutcome { parts: out, grad_norm: f(5), timings: timer.timings }))
}
