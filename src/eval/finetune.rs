//! Supervised fine-tuning for the labelled task (the paper's second phase): a linear head on
//! the CLS token concatenated with the mean patch token, the backbone adapted under a plan
//! (`lora` by default, rank 8; `full` and `linear` for comparison), AdamW with warm-up and a
//! cosine schedule, augmented views, the validation split checked every epoch, early stopping,
//! and the best epoch's weights kept and written to the output folder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::Context;
use burn::module::Module;
use burn::nn::Linear;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::metrics::Metrics;
use crate::checkpoint::{Metadata, RawTensor, TensorMap, load_backbone, save_backbone, write_safetensors};
use crate::data::{Preprocess, SkipReport, decode_rgb, load_batch, normalize_chw, train_view};
use crate::engine::{Event, Flow, JobContext};
use crate::inspect::images_tensor;
use crate::model::params::{accumulate_grads, map_params, trainable_params};
use crate::model::to_vec;
use crate::model::{ForwardOptions, Vit};
use crate::optim::{AdamW, UpdateRule, clip_by_global_norm};
use crate::peft::{PlanSpec, apply_plan, merge_lora};

/// Fine-tuning settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FinetuneConfig {
    /// What trains in the backbone: `lora` (the paper's LoRA-r8 fine-tuning), `full`,
    /// `linear` (head only), or any plan.
    pub plan: PlanSpec,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup_epochs: f64,
    /// Layer-wise lr decay (1 = off).
    pub layer_decay: f64,
    pub clip_grad: f64,
    pub label_smoothing: f64,
    /// Stop after this many epochs without a better validation accuracy (0: never).
    pub patience: usize,
    /// Random-resized-crop area range of the training views.
    pub crop_scale: [f32; 2],
    /// Random 90° rotations and vertical flips (overhead imagery).
    pub overhead: bool,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            plan: PlanSpec { preset: "lora".into(), lora_rank: Some(8), lora_alpha: Some(8.0), ..PlanSpec::default() },
            epochs: 20,
            batch: 64,
            lr: 1e-3,
            weight_decay: 0.05,
            warmup_epochs: 1.0,
            layer_decay: 1.0,
            clip_grad: 3.0,
            label_smoothing: 0.1,
            patience: 5,
            crop_scale: [0.5, 1.0],
            overhead: true,
        }
    }
}

impl FinetuneConfig {
    /// Checks the knobs; errors name the field (relative to the `[finetune]` table).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |f: &str, r: &str| Err((f.to_string(), r.to_string()));
        if self.epochs == 0 {
            return bad("epochs", "must be at least 1");
        }
        if self.batch < 2 {
            return bad("batch", "must be at least 2");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", "must be a positive number");
        }
        if !(self.weight_decay >= 0.0) || !(self.clip_grad >= 0.0) || !(self.warmup_epochs >= 0.0) {
            return bad("weight_decay", "weight_decay, clip_grad and warmup_epochs must be ≥ 0");
        }
        if !(self.layer_decay > 0.0 && self.layer_decay <= 1.0) {
            return bad("layer_decay", "must be in (0, 1]");
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return bad("label_smoothing", "must be in [0, 1)");
        }
        let [lo, hi] = self.crop_scale;
        if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
            return bad("crop_scale", "must be [min, max] with 0 < min ≤ max ≤ 1");
        }
        Ok(())
    }
}

/// The backbone and the linear head on `[CLS ‖ mean patch]`.
#[derive(Module, Debug)]
pub struct Classifier {
    pub backbone: Vit,
    pub head: Linear,
}

impl Classifier {
    pub fn new(backbone: Vit, classes: usize, device: &Device) -> Self {
        let d = backbone.config().embed_dim;
        let head = crate::model::init_linear(2 * d, classes, burn::nn::Initializer::Normal { mean: 0.0, std: 0.01 }, device);
        Self { backbone, head }
    }

    /// Logits `[B, classes]`.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let out = self.backbone.forward(images, ForwardOptions::default());
        let [b, _, d] = out.patches.dims();
        let pooled = out.patches.mean_dim(1).reshape([b, d]);
        self.head.forward(Tensor::cat(vec![out.cls, pooled], 1))
    }
}

/// What a fine-tuning run produced.
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneResult {
    pub epochs_run: usize,
    pub best_epoch: usize,
    pub best_val_top1: f64,
    pub test: Metrics,
    pub trainable: usize,
    pub images_seen: u64,
    pub seconds: f64,
    pub peak_gpu_bytes: Option<u64>,
    /// `(epoch, mean training loss, validation top-1)`.
    pub history: Vec<(usize, f64, f64)>,
    pub stopped: bool,
    pub skipped_files: usize,
}

/// A decoded batch: images (CHW, concatenated), labels, and the files that could not be read.
type Batch = (Vec<f32>, Vec<i64>, Vec<(PathBuf, String)>);

/// Decodes, augments and normalises the training batches on a producer thread.
fn batches(items: Vec<(PathBuf, usize)>, size: u32, config: &FinetuneConfig, seed: u64, epoch: usize) -> mpsc::Receiver<Batch> {
    let (tx, rx) = mpsc::sync_channel(2);
    let (batch, scale, overhead) = (config.batch, config.crop_scale, config.overhead);
    std::thread::spawn(move || {
        let mut order: Vec<usize> = (0..items.len()).collect();
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9));
        crate::data::rng::shuffle(&mut order, &mut rng);
        for (b, chunk) in order.chunks(batch).enumerate() {
            type View = Result<(Vec<f32>, i64), (PathBuf, String)>;
            let views: Vec<View> = chunk
                .par_iter()
                .enumerate()
                .map(|(j, &i)| {
                    let (path, label) = &items[i];
                    let image = decode_rgb(path).map_err(|e| (path.clone(), e.reason()))?;
                    let index = ((epoch * items.len().div_ceil(batch) + b) * batch + j) as u64;
                    let view = train_view(&image, size, scale, overhead, seed, index);
                    Ok((normalize_chw(&view), *label as i64))
                })
                .collect();
            let (mut data, mut labels, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
            for v in views {
                match v {
                    Ok((d, l)) => {
                        data.extend(d);
                        labels.push(l);
                    }
                    Err(s) => skipped.push(s),
                }
            }
            if tx.send((data, labels, skipped)).is_err() {
                return;
            }
        }
    });
    rx
}

/// Class scores of `items` under `model` (no autodiff), in order; unreadable images are
/// skipped and their labels dropped.
pub fn predict(model: &Classifier, items: &[(PathBuf, usize)], size: u32, batch: usize, device: &Device) -> (Vec<f32>, Vec<usize>) {
    let pre = Preprocess::new(size);
    let (mut scores, mut labels) = (Vec::new(), Vec::new());
    for chunk in items.chunks(batch.max(1)) {
        let paths: Vec<PathBuf> = chunk.iter().map(|(p, _)| p.clone()).collect();
        let (data, kept) = load_batch(&paths, &pre, &mut SkipReport::default());
        if kept.is_empty() {
            continue;
        }
        let x = images_tensor(data, kept.len(), size as usize, device);
        scores.extend(to_vec(model.forward(x)));
        labels.extend(kept.iter().map(|&k| chunk[k].1));
    }
    (scores, labels)
}

/// Images with their class index.
pub type Examples<'a> = &'a [(PathBuf, usize)];

/// Fine-tunes the backbone in `weights` for `classes` classes on `train`, selecting the epoch
/// on `val`, and reports test metrics of the best epoch. Writes
/// `finetuned-backbone.safetensors` (LoRA merged), `head.safetensors` and `history.json` to
/// `out`.
#[allow(clippy::too_many_arguments)]
pub fn finetune(
    weights: &Path,
    classes: usize,
    train: Examples,
    val: Examples,
    test: Examples,
    size: u32,
    config: &FinetuneConfig,
    seed: u64,
    out: &Path,
    plain: &Device,
    ctx: &mut JobContext,
) -> anyhow::Result<FinetuneResult> {
    config.validate().map_err(|(f, r)| anyhow::anyhow!("invalid config: `finetune.{f}` {r}"))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let device = plain.clone().autodiff();
    device.seed(seed);
    let (backbone, _) = load_backbone(weights, &device)?;
    let vit = backbone.config().clone();
    let plan = config.plan.resolve(&vit).map_err(|e| anyhow::anyhow!("[finetune.plan] {e}"))?;
    let mut model = Classifier::new(apply_plan(backbone, &plan)?, classes, &device);
    let trainable: usize = trainable_params(&model).values().map(|t| t.dims()[0]).sum();
    ctx.info(format!(
        "fine-tuning ({} plan): {trainable} trainable parameters incl. the head, {} training images",
        config.plan.preset,
        train.len()
    ));
    let loss_fn =
        CrossEntropyLossConfig::new().with_smoothing((config.label_smoothing > 0.0).then_some(config.label_smoothing as f32)).init(&device);
    let steps_per_epoch = train.len().div_ceil(config.batch).max(1);
    let total_steps = (config.epochs * steps_per_epoch) as f64;
    let warmup = config.warmup_epochs * steps_per_epoch as f64;
    let mut optim = AdamW::new([0.9, 0.999], 1e-8);
    let began = Instant::now();
    let mut result = FinetuneResult {
        epochs_run: 0,
        best_epoch: 0,
        best_val_top1: f64::NEG_INFINITY,
        test: Metrics::from_scores(&[], classes, &[]),
        trainable,
        images_seen: 0,
        seconds: 0.0,
        peak_gpu_bytes: None,
        history: Vec::new(),
        stopped: false,
        skipped_files: 0,
    };
    let mut best: Option<HashMap<String, Tensor<1>>> = None;
    let mut step = 0usize;
    ctx.phase(crate::engine::Phase::FineTuning, Some(total_steps as u64));
    'epochs: for epoch in 1..=config.epochs {
        // Losses stay on the device and are read once per epoch.
        let mut loss_sum: Option<Tensor<1>> = None;
        let mut batches_run = 0usize;
        for (data, labels, skipped) in batches(train.to_vec(), size, config, seed, epoch) {
            for (path, reason) in skipped {
                result.skipped_files += 1;
                ctx.warn(format!("skipped {}: {reason}", path.display()));
            }
            if ctx.checkpoint() == Flow::Stop {
                result.stopped = true;
                break 'epochs;
            }
            let n = labels.len();
            if n == 0 {
                continue;
            }
            let x = images_tensor(data, n, size as usize, &device);
            let y = Tensor::<1, Int>::from_data(TensorData::new(labels, [n]), &device);
            let loss = loss_fn.forward(model.forward(x), y);
            let grads_raw = loss.backward();
            let mut grads = HashMap::new();
            accumulate_grads(&model, &grads_raw, &mut grads);
            let loss = loss.detach().inner();
            loss_sum = Some(match loss_sum.take() {
                Some(sum) => sum + loss,
                None => loss,
            });
            batches_run += 1;
            let (_, grad_scale) = clip_by_global_norm(&grads, config.clip_grad, plain);
            let lr = crate::optim::schedule::warmup_cosine(config.lr, 0.0, warmup as u64, step as u64, total_steps as u64);
            let rule = UpdateRule {
                lr,
                weight_decay: config.weight_decay,
                layer_decay: config.layer_decay,
                depth: vit.depth,
                freeze_prototypes: false,
                freeze_backbone: false,
            };
            model = optim.step(model, grads, &grad_scale, rule);
            step += 1;
            result.images_seen += n as u64;
            if let Some(m) = crate::device::memory_reserved(plain) {
                result.peak_gpu_bytes = Some(result.peak_gpu_bytes.unwrap_or(0).max(m));
            }
            ctx.progress(step as u64, Some(total_steps as u64));
        }
        let (scores, labels) = predict(&model.valid(), val, size, config.batch, plain);
        let val_top1 = Metrics::from_scores(&scores, classes, &labels).top1;
        let mean_loss = loss_sum.map_or(0.0, |sum| sum.into_scalar::<f32>() as f64) / batches_run.max(1) as f64;
        if !mean_loss.is_finite() {
            anyhow::bail!("the fine-tuning loss became {mean_loss} in epoch {epoch}; try a lower finetune.lr");
        }
        result.history.push((epoch, mean_loss, val_top1));
        result.epochs_run = epoch;
        ctx.emit(Event::Metrics {
            step: step as u64,
            values: vec![("finetune_loss".into(), mean_loss), ("finetune_val_top1".into(), val_top1)],
        });
        ctx.info(format!("epoch {epoch}: loss {mean_loss:.4}, val top-1 {:.1}%", 100.0 * val_top1));
        if val_top1 > result.best_val_top1 {
            result.best_val_top1 = val_top1;
            result.best_epoch = epoch;
            best = Some(trainable_params(&model));
        } else if config.patience > 0 && epoch - result.best_epoch >= config.patience {
            ctx.info(format!("early stop: no better validation accuracy for {} epochs", config.patience));
            break;
        }
    }
    if let Some(best) = &best {
        model = map_params(model, |path, _| best.get(path).cloned());
    }
    let eval_model = model.valid();
    let (scores, labels) = predict(&eval_model, test, size, config.batch, plain);
    result.test = Metrics::from_scores(&scores, classes, &labels);
    result.seconds = began.elapsed().as_secs_f64();

    let backbone_path = out.join("finetuned-backbone.safetensors");
    save_backbone(&merge_lora(eval_model.backbone.clone()), &backbone_path)?;
    let mut head = TensorMap::new();
    let weight = eval_model.head.weight.val();
    let [i, o] = weight.dims();
    head.insert("head.weight".into(), RawTensor::new(vec![i, o], to_vec(weight)));
    if let Some(bias) = &eval_model.head.bias {
        head.insert("head.bias".into(), RawTensor::new(vec![o], to_vec(bias.val())));
    }
    let mut meta = Metadata::new();
    meta.insert("format".into(), "explora-head-v1".into());
    meta.insert("input".into(), "concat(cls, mean patch) after the final norm".into());
    write_safetensors(&out.join("head.safetensors"), &head, &meta)?;
    std::fs::write(out.join("history.json"), serde_json::to_string_pretty(&result.history)?)?;
    ctx.artifact("fine-tuned backbone (best epoch)", &backbone_path);
    Ok(result)
}
