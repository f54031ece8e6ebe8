//! One optimizer step of ExPLoRA pre-training with the DINOv2 objective, shared by the
//! pre-training job and `explora bench`: for each micro-batch the student/teacher losses, the
//! backward pass and the gradient accumulation; then the global-norm clip, AdamW and the EMA
//! teacher. Losses and the gradient norm stay on the device until the single read-back at the
//! end of the step, so the device is never waited for in between.

use std::collections::HashMap;
use std::time::Instant;

use burn::tensor::{Device, Tensor};

use super::config::{Objective, PretrainConfig};
use super::state::TrainState;
use crate::model::params::accumulate_grads;
use crate::model::to_vec;
use crate::objectives::{StepInputs, ema_update, step_loss};
use crate::optim::schedule::{cosine, linear, warmup_cosine};
use crate::optim::{UpdateRule, clip_by_global_norm};

/// The schedule values of one optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepValues {
    pub lr: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub teacher_temp: f64,
}

impl StepValues {
    /// The values of 0-based optimizer step `step` of a run: the learning rate warms up
    /// linearly then follows a cosine; weight decay and teacher momentum follow cosines; the
    /// teacher temperature warms up linearly.
    pub fn at(config: &PretrainConfig, step: u64) -> Self {
        let (o, l, total) = (&config.optim, &config.loss, config.run.steps);
        let wd = config.weight_decay();
        Self {
            lr: warmup_cosine(config.peak_lr(), o.min_lr, o.warmup_steps, step, total),
            weight_decay: cosine(wd[0], wd[1], step, total),
            momentum: cosine(o.momentum[0], o.momentum[1], step, total),
            teacher_temp: linear(l.teacher_temp[0], l.teacher_temp[1], step, l.teacher_temp_warmup_steps),
        }
    }

    /// The optimizer's rule for 0-based step `step` of a run on a `depth`-block backbone: this
    /// step's lr and weight decay, the layer-wise decay, DINOv2's prototypes frozen for the
    /// first `optim.freeze_last_layer_steps`, and the backbone waiting during
    /// `optim.head_warmup` while a fresh head (DINOv2) or decoder (MAE) learns. UpStep trains
    /// the backbone's adapters only, so nothing of it waits.
    pub fn update_rule(&self, config: &PretrainConfig, step: u64, depth: usize) -> UpdateRule {
        let objective = config.objective;
        UpdateRule {
            lr: self.lr,
            weight_decay: self.weight_decay,
            layer_decay: config.optim.layer_decay,
            depth,
            freeze_prototypes: objective == Objective::Dinov2 && step < config.optim.freeze_last_layer_steps,
            freeze_backbone: objective != Objective::Upstep && step < config.optim.head_warmup_steps(config.run.steps),
        }
    }
}

/// What one optimizer step read back.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutcome {
    /// The loss (`loss`, first) and its parts by name (DINOv2: `dino`, `ibot`, `koleo`), each
    /// the mean over the micro-batches.
    pub parts: Vec<(&'static str, f64)>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// `(phase, milliseconds)` when profiling (each phase ends with a device sync).
    pub timings: Vec<(&'static str, f64)>,
}

impl StepOutcome {
    /// The first value that is not finite, named ("loss" or "gradient norm").
    pub fn non_finite(&self) -> Option<(&'static str, f64)> {
        if let Some((_, bad)) = self.parts.iter().find(|(_, v)| !v.is_finite()) {
            return Some(("loss", *bad));
        }
        (!self.grad_norm.is_finite()).then_some(("gradient norm", self.grad_norm))
    }

    /// The profiled phases as one log line: `forward 290 ms, backward 316 ms, ...`.
    pub fn timings_line(&self) -> String {
        let phases: Vec<String> = self.timings.iter().map(|(k, v)| format!("{k} {v:.0} ms")).collect();
        phases.join(", ")
    }
}

/// Whether steps should be profiled: `EXPLORA_PROFILE` is set (read by `pretrain` and
/// `bench`).
pub fn profiling_requested() -> bool {
    std::env::var_os("EXPLORA_PROFILE").is_some()
}

/// The wall time of each phase of one step when profiling (`EXPLORA_PROFILE`); each phase
/// ends with a device sync, so the time is the device's, not the queue's.
pub(super) struct PhaseTimer<'a> {
    device: &'a Device,
    profile: bool,
    lap: Instant,
    pub timings: Vec<(&'static str, f64)>,
}

impl<'a> PhaseTimer<'a> {
    pub(super) fn new(device: &'a Device, profile: bool) -> Self {
        Self { device, profile, lap: Instant::now(), timings: Vec::new() }
    }

    /// Ends phase `name` (a no-op unless profiling).
    pub(super) fn mark(&mut self, name: &'static str) {
        if self.profile {
            let _ = self.device.sync();
            self.timings.push((name, self.lap.elapsed().as_secs_f64() * 1e3));
            self.lap = Instant::now();
        }
    }
}

/// A step's values summed over its micro-batches on the device, read back once at the end.
#[derive(Default)]
pub(super) struct DeviceSum(Option<Tensor<1>>);

impl DeviceSum {
    pub(super) fn add(&mut self, now: Tensor<1>) {
        self.0 = Some(match self.0.take() {
            Some(sum) => sum + now,
            None => now,
        });
    }

    /// The sum; an error when no micro-batch ran.
    pub(super) fn total(self) -> anyhow::Result<Tensor<1>> {
        self.0.ok_or_else(|| anyhow::anyhow!("optim.accumulation must be at least 1"))
    }
}

/// Runs optimizer step `state.step` (0-based) with the schedule `values`, pulling
/// `config.optim.accumulation` micro-batches from `next_inputs(micro)` (already on the
/// autodiff device). Advances `state.step`. `device` is the plain (non-autodiff) device.
pub fn optimizer_step(
    mut state: TrainState,
    config: &PretrainConfig,
    values: StepValues,
    device: &Device,
    profile: bool,
    mut next_inputs: impl FnMut(u64) -> anyhow::Result<StepInputs>,
) -> anyhow::Result<(TrainState, StepOutcome)> {
    let accumulation = config.optim.accumulation as u64;
    let mut timer = PhaseTimer::new(device, profile);
    let mut grads = HashMap::new();
    let mut parts = DeviceSum::default();
    for micro in 0..accumulation {
        let inputs = next_inputs(micro)?;
        timer.mark("data");
        let (loss, centers) = step_loss(&state.student, &state.teacher, &inputs, &state.centers, &config.loss, values.teacher_temp);
        state.centers = centers;
        timer.mark("forward");
        let backward = loss.total.clone().div_scalar(accumulation as f64).backward();
        accumulate_grads(&state.student, &backward, &mut grads);
        timer.mark("backward");
        let now = Tensor::cat(vec![loss.total.detach().inner(), loss.dino.inner(), loss.ibot.inner(), loss.koleo.inner()], 0)
            .div_scalar(accumulation as f64);
        parts.add(now);
    }
    let (norm, grad_scale) = clip_by_global_norm(&grads, config.optim.clip_grad, device);
    let rule = values.update_rule(config, state.step, state.student.backbone.config().depth);
    state.student = state.optim.step(state.student, grads, &grad_scale, rule);
    timer.mark("optimizer");
    state.teacher = ema_update(state.teacher, &state.student, values.momentum);
    timer.mark("ema");
    // The one read-back of the step.
    let read = to_vec(Tensor::cat(vec![parts.total()?, norm], 0));
    state.step += 1;
    let f = |i: usize| f64::from(read[i]);
    let parts = vec![("loss", f(0)), ("dino", f(1)), ("ibot", f(2)), ("koleo", f(3))];
    Ok((state, StepOutcome { parts, grad_norm: f(4), timings: timer.timings }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_values_follow_the_run_config() {
        let mut c = PretrainConfig::builtin();
        c.run.steps = 100;
        c.optim.warmup_steps = 10;
        let first = StepValues::at(&c, 0);
        assert!((first.lr - c.peak_lr() / 10.0).abs() < 1e-12);
        assert!((StepValues::at(&c, 9).lr - c.peak_lr()).abs() < 1e-12);
        let mid = StepValues::at(&c, 50).lr;
        assert!(mid < c.peak_lr() && mid > c.optim.min_lr);
        assert!((first.weight_decay - c.weight_decay()[0]).abs() < 1e-12);
        assert!((first.momentum - c.optim.momentum[0]).abs() < 1e-12);
        assert_eq!(first.teacher_temp, c.loss.teacher_temp[0]);
        assert_eq!(StepValues::at(&c, 1_000).teacher_temp, c.loss.teacher_temp[1]);
        assert!((StepValues::at(&c, 100).momentum - c.optim.momentum[1]).abs() < 1e-12);
    }

    #[test]
    fn what_waits_at_the_start_depends_on_the_objective() {
        // The built-in run: prototypes frozen for 5 steps, the backbone for the first tenth.
        let mut c = PretrainConfig::builtin();
        let warmup = c.optim.head_warmup_steps(c.run.steps);
        assert_eq!((c.optim.freeze_last_layer_steps, warmup), (5, 90));
        let rule = |c: &PretrainConfig, step: u64| {
            let r = StepValues::at(c, step).update_rule(c, step, 4);
            (r.freeze_prototypes, r.freeze_backbone)
        };
        assert_eq!([rule(&c, 0), rule(&c, 5), rule(&c, 89), rule(&c, 90)], [(true, true), (false, true), (false, true), (false, false)]);
        // MAE: no prototypes; its fresh decoder warms up first.
        c.objective = Objective::Mae;
        assert_eq!([rule(&c, 0), rule(&c, 90)], [(false, true), (false, false)]);
        // UpStep trains the backbone's adapters only: nothing waits.
        c.objective = Objective::Upstep;
        assert_eq!(rule(&c, 0), (false, false));
        let r = StepValues::at(&c, 7).update_rule(&c, 7, 4);
        assert_eq!((r.lr, r.weight_decay, r.layer_decay, r.depth), (StepValues::at(&c, 7).lr, StepValues::at(&c, 7).weight_decay, 0.9, 4));
    }
}
