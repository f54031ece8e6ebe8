//! `explora bench`: the two workloads of the PyTorch reference (`torch_explora_bench.py`) on
//! explora's own code paths, so the two can be run side by side on one machine.
//!
//! - `infer`: the backbone's forward pass (no autodiff) on `infer_batch` random images of
//!   `infer_size` px, CLS features → images/s. As in the reference (its EMA teacher), the
//!   backbone carries the ExPLoRA plan's LoRA adapters, unmerged.
//! - `train`: one ExPLoRA optimizer step of the DINOv2 objective exactly as `pretrain` runs it
//!   ([`optimizer_step`]): student on 2 global (masked, 30 % of the patches of every global
//!   crop, as the reference) + `locals` local crops, EMA teacher on the globals, one DINO/iBOT
//!   head with `prototypes` prototypes, Sinkhorn-Knopp targets, DINO + iBOT + KoLeo, AdamW on
//!   LoRA (Q,V, rank `rank`, alpha = rank as the reference) + the unfrozen blocks + all norms →
//!   source images/s and ms per step.
//!
//! The first call of each workload is timed on its own (`*_first_s`: cold, including any
//! kernel compilation and autotuning), then `warmup` more calls run untimed before `steps`
//! timed ones. The result is one JSON object with the reference's keys plus the device name,
//! the cold times and the peak memory (the device's pools on a GPU, the process's resident
//! peak on the CPU backend).

use std::time::Instant;

use anyhow::Context;
use burn::tensor::{Device, Distribution, Tensor};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use crate::engine::JobContext;
use crate::model::{ForwardOptions, VitConfig};
use crate::objectives::{Centering, HeadConfig, MaskedPatches, StepInputs};
use crate::peft::{PlanSpec, apply_plan};
use crate::train::PretrainConfig;
use crate::train::state::TrainState;
use crate::train::step::StepValues;
use crate::train::step::{optimizer_step, profiling_requested};

/// Which workloads to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchMode {
    Infer,
    Train,
    Both,
}

/// The knobs of the reference script, with its defaults.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchConfig {
    pub mode: BenchMode,
    pub arch: String,
    pub batch: usize,
    pub global_size: usize,
    pub local_size: usize,
    pub locals: usize,
    pub prototypes: usize,
    pub rank: usize,
    pub unfreeze: Vec<usize>,
    pub infer_batch: usize,
    pub infer_size: usize,
    pub steps: usize,
    pub warmup: usize,
    pub seed: u64,
}

impl Default for BenchConfig {
    fn default() -> Self {
        Self {
            mode: BenchMode::Both,
            arch: "vits14".into(),
            batch: 32,
            global_size: 224,
            local_size: 98,
            locals: 8,
            prototypes: 65_536,
            rank: 64,
            unfreeze: vec![11],
            infer_batch: 64,
            infer_size: 224,
            steps: 10,
            warmup: 2,
            seed: 0,
        }
    }
}

/// Fraction of each global crop's patches masked in the `train` workload (the reference's 0.3).
const MASK_RATIO: f64 = 0.3;

impl BenchConfig {
    /// The architecture, checked against the sizes; errors name the flag.
    pub fn validate(&self) -> anyhow::Result<VitConfig> {
        let vit = VitConfig::preset(&self.arch).with_context(|| {
            let names: Vec<String> = VitConfig::presets().into_iter().map(|c| c.name).collect();
            format!("--arch {}: not a preset ({})", self.arch, names.join(", "))
        })?;
        let p = vit.patch_size;
        for (flag, size) in [("--global-size", self.global_size), ("--local-size", self.local_size), ("--infer-size", self.infer_size)] {
            anyhow::ensure!(size > 0 && size % p == 0, "{flag} {size} is not a multiple of {}'s patch size {p}", vit.name);
        }
        anyhow::ensure!(self.batch >= 2, "--batch {} : the train workload needs at least 2 images (KoLeo)", self.batch);
        anyhow::ensure!(self.infer_batch >= 1, "--infer-batch must be at least 1");
        anyhow::ensure!(self.steps >= 1, "--steps must be at least 1");
        anyhow::ensure!(self.prototypes >= 1, "--prototypes must be at least 1");
        if let Some(&b) = self.unfreeze.iter().find(|&&b| b >= vit.depth) {
            anyhow::bail!("--unfreeze {b}: {} has blocks 0-{}", vit.name, vit.depth - 1);
        }
        Ok(vit)
    }

    /// The pre-training config whose step the `train` workload runs.
    fn pretrain_config(&self, vit: &VitConfig) -> PretrainConfig {
        let mut c = PretrainConfig::default();
        c.model.arch = Some(vit.name.clone());
        c.plan = PlanSpec {
            preset: "explora".into(),
            unfreeze: Some(self.unfreeze.clone()),
            lora_rank: Some(self.rank),
            lora_alpha: Some(self.rank as f64),
            ..Default::default()
        };
        c.head = HeadConfig { prototypes: self.prototypes, ..HeadConfig::default() };
        c.loss.centering = Centering::SinkhornKnopp;
        c.crops.global_size = self.global_size as u32;
        c.crops.local_size = self.local_size as u32;
        c.crops.local_crops = self.locals;
        c.optim.batch = self.batch;
        c.optim.accumulation = 1;
        c.optim.freeze_last_layer_steps = 0;
        c
    }
}

/// Peak memory so far: the device's pools when it reports them, else the process's resident
/// peak (the CPU backend).
fn peak_memory(device: &Device, peak: &mut Option<u64>) {
    let now = crate::device::memory_reserved(device).or_else(crate::device::peak_rss);
    if let Some(now) = now {
        *peak = Some(peak.unwrap_or(0).max(now));
    }
}

/// Runs the workloads; returns the result line as JSON.
pub fn run(config: &BenchConfig, device: &Device, ctx: &mut JobContext) -> anyhow::Result<serde_json::Value> {
    let vit = config.validate()?;
    let mut res = serde_json::json!({
        "arch": vit.name,
        "batch": config.batch,
        "precision": "fp32",
        "device": crate::device::describe(device),
        "backend": if crate::device::is_native_cpu(device) { "flex" } else { "wgpu" },
        "threads": crate::device::cpu_threads(),
        "global_size": config.global_size,
        "local_size": config.local_size,
        "locals": config.locals,
        "prototypes": config.prototypes,
        "rank": config.rank,
        "unfreeze": config.unfreeze,
        "infer_batch": config.infer_batch,
        "infer_size": config.infer_size,
        "steps": config.steps,
    });
    let mut peak = None;
    device.seed(config.seed);
    // Both workloads run the backbone with the ExPLoRA plan applied, as the reference does.
    let pre = config.pretrain_config(&vit);
    let plan = pre.plan.resolve(&vit).map_err(|e| anyhow::anyhow!("{e}"))?;
    if matches!(config.mode, BenchMode::Infer | BenchMode::Both) {
        ctx.phase(crate::engine::Phase::step("bench: infer"), Some((1 + config.warmup + config.steps) as u64));
        let model = apply_plan(vit.init(device), &plan)?;
        let x = Tensor::<4>::random([config.infer_batch, 3, config.infer_size, config.infer_size], Distribution::Normal(0.0, 1.0), device);
        // Each call ends with a read-back, so its time includes the device's work.
        let features = || model.forward(x.clone(), ForwardOptions::default()).cls.sum().into_scalar::<f32>();
        let cold = Instant::now();
        features();
        res["infer_first_s"] = round(cold.elapsed().as_secs_f64(), 3);
        ctx.progress(1, None);
        for i in 0..config.warmup {
            features();
            ctx.progress(2 + i as u64, None);
        }
        let timed = Instant::now();
        for _ in 0..config.steps {
            features();
        }
        let seconds = timed.elapsed().as_secs_f64() / config.steps as f64;
        res["infer_img_per_s"] = round(config.infer_batch as f64 / seconds, 1);
        res["infer_batch_ms"] = round(seconds * 1e3, 1);
        peak_memory(device, &mut peak);
        ctx.info(format!(
            "infer: {:.1} images/s ({:.1} ms a batch of {})",
            config.infer_batch as f64 / seconds,
            seconds * 1e3,
            config.infer_batch
        ));
    }
    if matches!(config.mode, BenchMode::Train | BenchMode::Both) {
        ctx.phase(crate::engine::Phase::step("bench: train"), Some((1 + config.warmup + config.steps) as u64));
        let ad = device.clone().autodiff();
        let budget = plan.budget(&vit);
        // iBOT needs a mask token; the reference adds one to checkpoints that lack it.
        let vit = VitConfig { mask_token: true, ..vit.clone() };
        res["trainable_backbone_params"] = budget.trainable.into();
        res["backbone_params"] = budget.backbone.into();
        let mut state = TrainState::new(apply_plan(vit.init(&ad), &plan)?, &pre, device);
        let values = StepValues { lr: 1e-4, weight_decay: 0.04, momentum: 0.996, teacher_temp: 0.07 };
        let (b, g, l) = (config.batch, config.global_size, config.local_size);
        let n = (g / vit.patch_size).pow(2);
        let masked_per_crop = ((n as f64 * MASK_RATIO).round() as usize).clamp(1, n);
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(config.seed);
        // The images are drawn once, as the reference does; each step draws its own masks.
        let normal = Distribution::Normal(0.0, 1.0);
        let globals = Tensor::<4>::random([2 * b, 3, g, g], normal, &ad);
        let locals = (config.locals > 0).then(|| Tensor::<4>::random([config.locals * b, 3, l, l], normal, &ad));
        let mut inputs = || -> StepInputs {
            let mut masks = vec![false; 2 * b * n];
            for crop in masks.chunks_mut(n) {
                let mut order: Vec<usize> = (0..n).collect();
                for i in 0..masked_per_crop {
                    let j = rng.random_range(i..n);
                    order.swap(i, j);
                    crop[order[i]] = true;
                }
            }
            let mask_values: Vec<f32> = masks.iter().map(|&m| if m { 1.0 } else { 0.0 }).collect();
            StepInputs {
                globals: globals.clone(),
                locals: locals.clone(),
                masks: Tensor::<2>::from_data(burn::tensor::TensorData::new(mask_values, [2 * b, n]), &ad).greater_elem(0.5),
                masked: MaskedPatches::new(&masks, n, 2 * b * masked_per_crop, &ad),
                batch: b,
                global_crops: 2,
                local_crops: config.locals,
            }
        };
        // EXPLORA_PROFILE (as for `pretrain`): each step's phases, timed with a device sync.
        let profile = profiling_requested();
        let mut step = |state: TrainState| -> anyhow::Result<TrainState> {
            let (state, outcome) = optimizer_step(state, &pre, values, device, profile, |_| Ok(inputs()))?;
            if let Some((what, bad)) = outcome.non_finite() {
                anyhow::bail!("the {what} became {bad} in the train workload");
            }
            if profile {
                ctx.info(format!("train step timings: {}", outcome.timings_line()));
            }
            Ok(state)
        };
        let cold = Instant::now();
        state = step(state)?;
        res["train_first_step_s"] = round(cold.elapsed().as_secs_f64(), 3);
        ctx.progress(1, None);
        for i in 0..config.warmup {
            state = step(state)?;
            ctx.progress(2 + i as u64, None);
        }
        let timed = Instant::now();
        for _ in 0..config.steps {
            state = step(state)?;
            peak_memory(device, &mut peak);
        }
        let seconds = timed.elapsed().as_secs_f64() / config.steps as f64;
        res["train_img_per_s"] = round(b as f64 / seconds, 2);
        res["train_step_ms"] = round(seconds * 1e3, 1);
        ctx.info(format!("train: {:.1} ms a step ({:.2} images/s)", seconds * 1e3, b as f64 / seconds));
        drop(state);
    }
    if let Some(bytes) = peak {
        res["peak_mem_bytes"] = bytes.into();
        res["train_peak_mem_gib"] = round(bytes as f64 / (1u64 << 30) as f64, 2);
    }
    Ok(res)
}

fn round(value: f64, decimals: i32) -> serde_json::Value {
    let scale = 10f64.powi(decimals);
    ((value * scale).round() / scale).into()
}
