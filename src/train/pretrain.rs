//! The ExPLoRA pre-training job: continues a backbone's self-supervised training (DINOv2 or
//! MAE, `objective`; the per-objective side lives in [`super::objective`]) on unlabelled domain
//! images under an adaptation plan. Runs on the engine's job thread, reports through events,
//! writes the run folder:
//!
//! - `config.toml` — the full config of the run (what `explora resume` reads back);
//! - `metrics.jsonl` — one JSON object per step (losses, schedules, img/s, GPU memory, k-NN);
//! - `checkpoints/step-NNNNNNN.safetensors` — atomic, the newest `keep_checkpoints` kept;
//! - `backbone.safetensors` — the teacher (MAE: the encoder) with LoRA merged (explora format:
//!   `explora embed --weights` and the evaluation commands read it), `adapter.safetensors` —
//!   its trained tensors only (apply onto the base checkpoint);
//! - `batch-preview.png`, `report.md`; MAE runs also `reconstructions.png`, UpStep runs
//!   `centres.safetensors` (the k-means centres, computed once and reused on resume).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use burn::module::Module;
use burn::tensor::Device;

use super::config::{Objective, PretrainConfig};
use super::monitor::KnnSet;
use super::objective::{Trainer, loader_crops};
use super::state;
use super::step::StepValues;
use crate::checkpoint::{load_backbone_with, save_adapter, save_backbone};
use crate::data::{
    BatchSpec, CropBatch, CropLoader, FolderSource, ImageList, ImageSource, ProceduralDomain, ProceduralSource, contact_sheet,
};
use crate::engine::{AttentionRequest, AttentionView, BatchPreview, Event, Flow, JobContext, Phase, SamplePreview};
use crate::model::{Vit, VitConfig};
use crate::peft::{AdaptationPlan, apply_plan, merge_lora};

/// A pre-training run: where it writes and whether it continues from its last checkpoint.
#[derive(Debug, Clone)]
pub struct PretrainJob {
    pub config: PretrainConfig,
    pub out: PathBuf,
    pub resume: bool,
}

impl PretrainJob {
    /// The job that continues the run in `dir` (its `config.toml`, its newest checkpoint).
    pub fn resume(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("config.toml");
        if !path.exists() {
            anyhow::bail!("{} is not a run folder: it has no config.toml", dir.display());
        }
        Ok(Self { config: PretrainConfig::load(&path)?, out: dir.to_path_buf(), resume: true })
    }
}

/// Outcome of a run, for the report and tests.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PretrainSummary {
    pub steps_done: u64,
    pub stopped_early: bool,
    pub images_seen: u64,
    pub images_per_second: f64,
    pub final_loss: Option<f64>,
    pub knn_before: Option<f64>,
    pub knn_after: Option<f64>,
    pub peak_gpu_bytes: Option<u64>,
    pub skipped_files: usize,
}

fn load_base(config: &mut PretrainConfig, out: &Path, device: &Device, ctx: &mut JobContext) -> anyhow::Result<Vit> {
    let arch = config.arch_preset()?;
    if let Some(path) = &config.model.weights {
        let (model, report) = load_backbone_with(path, arch, device)?;
        ctx.info(format!("loaded {report}"));
        if report.initialised.iter().any(|t| t == "mask_token") && config.loss.ibot_weight > 0.0 && config.objective == Objective::Dinov2 {
            ctx.warn(format!(
                "{} has no mask token: iBOT trains a freshly initialised one (set loss.ibot_weight = 0 to train without iBOT)",
                path.display()
            ));
        }
        return Ok(model);
    }
    // Random weights (tests, demos): saved once so that a resumed run starts from the same base.
    let arch = arch.expect("validated: weights or arch");
    let model = arch.init(device);
    let path = out.join("base.safetensors");
    save_backbone(&model, &path)?;
    config.model.weights = Some(path);
    Ok(model)
}

fn source_for(config: &PretrainConfig) -> anyhow::Result<Arc<dyn ImageSource>> {
    if let Some(file) = &config.data.list {
        let text = std::fs::read_to_string(file).with_context(|| format!("reading the image list {}", file.display()))?;
        let paths: Vec<PathBuf> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(PathBuf::from).collect();
        anyhow::ensure!(!paths.is_empty(), "the image list {} is empty", file.display());
        return Ok(Arc::new(FolderSource { list: ImageList::from_paths(paths) }));
    }
    Ok(match &config.data.images {
        Some(root) => Arc::new(FolderSource { list: ImageList::scan(root)? }),
        None => Arc::new(ProceduralSource {
            domain: ProceduralDomain { size: config.data.procedural_size, seed: config.run.seed, shift: config.data.procedural_shift },
            count: config.data.procedural_tiles,
        }),
    })
}

struct Metrics {
    file: std::fs::File,
}

impl Metrics {
    /// Opens `metrics.jsonl`, keeping only lines up to `keep_until` (a resumed run rewrites
    /// what came after its checkpoint).
    fn open(path: &Path, keep_until: u64) -> anyhow::Result<Self> {
        let kept: Vec<String> = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter(|line| {
                serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                    .is_some_and(|s| s <= keep_until)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        crate::checkpoint::atomic_write(path, kept.concat().as_bytes())?;
        let file = std::fs::OpenOptions::new().append(true).open(path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { file })
    }

    fn write(&mut self, value: &serde_json::Value) -> anyhow::Result<()> {
        writeln!(self.file, "{value}")?;
        self.file.flush()?;
        Ok(())
    }
}

/// The run itself.
pub fn pretrain(job: &PretrainJob, device: &Device, ctx: &mut JobContext) -> anyhow::Result<PretrainSummary> {
    let mut config = job.config.clone();
    if !job.resume {
        // Once, when the run is created: the config.toml written below then resumes from anywhere.
        config.make_paths_absolute(&std::env::current_dir().context("reading the working directory")?);
    }
    config.validate()?;
    let out = &job.out;
    std::fs::create_dir_all(out).with_context(|| format!("creating run folder {}", out.display()))?;
    let previous = state::list(out);
    if !job.resume && !previous.is_empty() {
        anyhow::bail!(
            "{} already holds a run with checkpoints; continue it with `explora --no-gui resume {}` or choose another --out",
            out.display(),
            out.display()
        );
    }

    // `summary.json` marks a finished run (the pipeline and the app's evaluation read it); a
    // run that goes on is not finished until it writes a new one.
    let summary_path = out.join("summary.json");
    if summary_path.exists() {
        std::fs::remove_file(&summary_path).with_context(|| format!("removing {}", summary_path.display()))?;
    }
    ctx.phase(Phase::Loading, None);
    let ad = device.clone().autodiff();
    device.seed(config.run.seed);
    ad.seed(config.run.seed);
    let base = load_base(&mut config, out, &ad, ctx)?;
    let vit = base.config().clone();
    let patch = vit.patch_size;
    config.check_model(&vit)?;
    if !vit.mask_token && config.loss.ibot_weight > 0.0 && config.objective == Objective::Dinov2 {
        anyhow::bail!("invalid run config: `loss.ibot_weight` is > 0 but the backbone has no mask token (set it to 0)");
    }
    let plan: AdaptationPlan = config.resolve_plan(&vit).map_err(|e| anyhow::anyhow!("[plan] {e}"))?;
    std::fs::write(out.join("config.toml"), config.to_toml()).with_context(|| format!("writing {}/config.toml", out.display()))?;
    let source = source_for(&config)?;
    let mut state = Trainer::new(apply_plan(base, &plan)?, &config, device, &ad, source.as_ref(), out, ctx)?;
    let (extra, extra_params) = state.extra_module(&config);
    let budget = plan.budget(&vit).with_module(extra, extra_params);
    ctx.info(format!(
        "{} ({} objective): {} of {} backbone parameters train ({:.2}%) + {} {}",
        vit.name,
        config.objective,
        budget.trainable,
        budget.backbone,
        budget.percent(),
        budget.extra[0].component,
        budget.extra[0].params
    ));
    if job.resume {
        let (found, skipped) = state::newest_readable(out);
        skipped.into_iter().for_each(|w| ctx.warn(w));
        match found {
            Some(found) => {
                let path = found.path.clone();
                state = state.restore(found, device)?;
                ctx.info(format!("resuming from {} (step {})", path.display(), state.step()));
            }
            None => ctx.warn(format!("{} has no readable checkpoint: starting from the beginning", out.display())),
        }
    }
    let start = state.step();
    let total = config.run.steps;
    let mut metrics = Metrics::open(&out.join("metrics.jsonl"), start)?;

    ctx.info(format!("data: {}", source.describe()));
    let accumulation = config.optim.accumulation as u64;
    let (crops, masks) = loader_crops(&config);
    let spec = BatchSpec {
        crops,
        masks,
        patch_size: patch,
        batch: config.optim.batch,
        seed: config.run.seed,
        preview_every: config.run.preview_every * accumulation,
    };
    let preview_source = source.clone();
    let mut loader = CropLoader::new(source, spec, start * accumulation, config.data.prefetch);

    let knn_set = if config.monitor.knn_every > 0 {
        let size = config.crops.global_size;
        let set = match &config.monitor.knn_images {
            Some(root) => KnnSet::folder(root, config.monitor.knn_max_images, size, config.run.seed)?,
            None => KnnSet::procedural(config.monitor.knn_max_images, size, config.run.seed ^ 0x4B4E_4E00, config.data.procedural_shift),
        };
        Some(set)
    } else {
        None
    };
    let knn = |encoder: &Vit| knn_set.as_ref().map(|set| set.evaluate(encoder, config.monitor.knn_k, config.optim.batch.max(32), device));
    let mut summary = PretrainSummary {
        steps_done: start,
        stopped_early: false,
        images_seen: start * config.optim.effective_batch() as u64,
        images_per_second: 0.0,
        final_loss: None,
        knn_before: None,
        knn_after: None,
        peak_gpu_bytes: None,
        skipped_files: 0,
    };
    if start == 0 {
        summary.knn_before = knn(state.encoder());
        if let Some(acc) = summary.knn_before {
            metrics.write(&serde_json::json!({ "step": 0, "knn_top1": acc }))?;
            ctx.emit(Event::Metrics { step: 0, values: vec![("knn_top1".into(), acc)] });
            ctx.info(format!("k-NN top-1 before pre-training: {:.1}%", 100.0 * acc));
        }
    }

    ctx.phase(Phase::Pretraining, Some(total));
    ctx.progress(start, Some(total));
    let began = Instant::now();
    let mut last_checkpoint = previous.last().map(|(_, p)| p.clone());
    let mut images_this_session = 0u64;
    // EXPLORA_PROFILE=1: per-step timings of the phases (each ends with a device sync).
    let profile = super::step::profiling_requested();
    // The source backbone for attention requests, loaded on the first one.
    let mut source_model: Option<Vit> = None;
    let mut last_preview: Option<Instant> = None;
    // MAE: a preview waiting for the step's reconstructions (the first global crops it shows).
    let mut reconstruct_later: Option<(BatchPreview, Vec<f32>, usize)> = None;
    while state.step() < total {
        let flow = ctx.checkpoint_with(|request| {
            match answer_attention(&request, &config, &mut source_model, state.student(), state.step(), device) {
                Ok(view) => ctx.emit(Event::Attention(Arc::new(view))),
                Err(e) => ctx.warn(format!("attention map: {e:#}")),
            }
        });
        if flow == Flow::Stop {
            summary.stopped_early = true;
            break;
        }
        let step = state.step();
        let values = StepValues::at(&config, step);
        let tick = Instant::now();
        let (next, outcome) = state.optimizer_step(&config, values, device, &ad, profile, |micro| {
            let batch = loader.next()?;
            // Pictures of the batch for the app, at most every two seconds.
            if micro == 0 && last_preview.is_none_or(|t| t.elapsed().as_secs_f64() >= 2.0) {
                last_preview = Some(Instant::now());
                let preview = batch_preview(&batch, preview_source.as_ref(), step + 1, 8);
                if config.objective == Objective::Mae {
                    // Shown after the step, with the model's reconstructions of these crops.
                    let shown = preview.samples.len() * batch.global_values();
                    reconstruct_later = Some((preview, batch.globals[..shown].to_vec(), batch.batch));
                } else {
                    ctx.emit(Event::BatchPreview(Arc::new(preview)));
                }
            }
            for (path, reason) in &batch.skipped {
                summary.skipped_files += 1;
                ctx.warn(format!("skipped {}: {reason}", path.display()));
            }
            if let Some(crops) = &batch.preview {
                let g = (batch.global_size as usize) / patch;
                let b = batch.batch;
                let n = g * g;
                let masks: Vec<bool> = batch.masks[0..n].iter().chain(&batch.masks[b * n..b * n + n]).copied().collect();
                let sheet = contact_sheet(crops, Some((&masks, g)));
                let path = out.join("batch-preview.png");
                sheet.save(&path).with_context(|| format!("writing {}", path.display()))?;
                let what = if config.objective == Objective::Dinov2 { "augmented crops and iBOT masks" } else { "augmented views" };
                ctx.artifact(format!("{what}, step {}", step + 1), path);
            }
            Ok(batch)
        })?;
        state = next;
        if let Some((mut preview, globals, batch)) = reconstruct_later.take() {
            state.annotate_preview(&mut preview, &globals, batch, &config, step, device);
            ctx.emit(Event::BatchPreview(Arc::new(preview)));
        }
        if let Some((what, bad)) = outcome.non_finite() {
            anyhow::bail!(
                "the {what} became {bad} at step {}; nothing after the last good checkpoint ({}) was saved. \
                 Try a lower optim.base_lr, a larger optim.batch or optim.clip_grad > 0",
                step + 1,
                last_checkpoint.as_ref().map_or("none yet".into(), |p| p.display().to_string())
            );
        }
        let norm = outcome.grad_norm;
        if profile {
            ctx.info(format!("step {} timings: {}", step + 1, outcome.timings_line()));
        }

        let images = config.optim.effective_batch() as u64;
        summary.images_seen += images;
        images_this_session += images;
        let step_seconds = tick.elapsed().as_secs_f64();
        let memory = crate::device::memory_reserved(device);
        if let Some(m) = memory {
            summary.peak_gpu_bytes = Some(summary.peak_gpu_bytes.unwrap_or(0).max(m));
        }
        summary.final_loss = outcome.parts.first().map(|(_, loss)| *loss);
        let mut line = serde_json::json!({
            "step": state.step(),
            "grad_norm": norm,
            "img_per_s": images as f64 / step_seconds.max(1e-9),
            "gpu_bytes": memory,
        });
        for (key, value) in outcome.parts.iter().chain(&state.schedule(&values)) {
            line[*key] = serde_json::json!(value);
        }
        let done = state.step();
        let monitor_due = config.monitor.knn_every > 0 && (done.is_multiple_of(config.monitor.knn_every) || done == total);
        if monitor_due && let Some(acc) = knn(state.encoder()) {
            line["knn_top1"] = serde_json::json!(acc);
            summary.knn_after = Some(acc);
        }
        metrics.write(&line)?;
        ctx.emit(Event::Metrics {
            step: done,
            values: [
                "loss",
                "dino",
                "ibot",
                "koleo",
                "swap",
                "cvr",
                "skipped_total",
                "lr",
                "teacher_temp",
                "grad_norm",
                "img_per_s",
                "gpu_bytes",
                "knn_top1",
            ]
            .iter()
            .filter_map(|k| line.get(*k).and_then(|v| v.as_f64()).map(|v| (k.to_string(), v)))
            .collect(),
        });
        ctx.progress(done, Some(total));
        let every = config.run.checkpoint_every;
        if (every > 0 && done.is_multiple_of(every)) || done == total {
            last_checkpoint = Some(state.save(out, config.run.keep_checkpoints)?);
        }
    }
    summary.steps_done = state.step();
    summary.images_per_second = images_this_session as f64 / began.elapsed().as_secs_f64().max(1e-9);
    if summary.stopped_early {
        if last_checkpoint.as_ref().is_none_or(|p| *p != state::checkpoint_path(out, state.step())) {
            let path = state.save(out, config.run.keep_checkpoints)?;
            ctx.artifact("checkpoint", &path);
        }
        return Ok(summary);
    }

    ctx.phase(Phase::Exporting, None);
    let adapted = merge_lora(state.encoder().clone());
    let backbone_path = out.join("backbone.safetensors");
    save_backbone(&adapted, &backbone_path)?;
    let which = match config.objective {
        Objective::Dinov2 => "teacher",
        Objective::Mae => "encoder",
        Objective::Upstep => "offline EMA model",
    };
    ctx.artifact(format!("adapted backbone ({which}, LoRA merged)"), &backbone_path);
    let adapter_path = out.join("adapter.safetensors");
    save_adapter(state.encoder(), &plan, &adapter_path)?;
    ctx.artifact("adapter (trained tensors only)", &adapter_path);
    state.finish(&config, preview_source.as_ref(), out, device, ctx)?;
    let report = out.join("report.md");
    std::fs::write(&report, report_text(&config, &budget, &plan, &vit, &summary))?;
    ctx.artifact("report", &report);
    crate::checkpoint::atomic_write(&summary_path, serde_json::to_string_pretty(&summary)?.as_bytes())?;
    Ok(summary)
}

/// The first `max` samples of `batch` as images (crops un-normalised, masks per global crop).
fn batch_preview(batch: &CropBatch, source: &dyn ImageSource, step: u64, max: usize) -> BatchPreview {
    let b = batch.batch;
    let (gs, ls) = (batch.global_size, batch.local_size);
    let (gv, lv) = (batch.global_values(), batch.local_values());
    let image = |data: &[f32], size: u32| crate::data::denormalize_chw_to_rgb(data, size, size);
    let samples = (0..b.min(max))
        .map(|j| SamplePreview {
            source: batch.sources.get(j).and_then(|&i| source.load(i).ok()).map(|img| {
                let (w, h) = img.dimensions();
                let scale = (128.0 / w.max(h).max(1) as f64).min(1.0);
                let size = |v: u32| ((v as f64 * scale).round() as u32).max(1);
                image::imageops::thumbnail(&img, size(w), size(h))
            }),
            globals: [j, b + j].iter().filter_map(|&c| batch.globals.get(c * gv..(c + 1) * gv)).map(|d| image(d, gs)).collect(),
            masks: batch.sample_masks(j),
            locals: (0..batch.local_crops)
                .filter_map(|k| batch.locals.get((k * b + j) * lv..(k * b + j + 1) * lv))
                .map(|d| image(d, ls))
                .collect(),
            reconstruction: None,
        })
        .collect();
    BatchPreview { step, grid: batch.grid(), samples }
}

/// CLS attention of `request`'s image in the source backbone (loaded once from the run's
/// weights) and in the current student.
fn answer_attention(
    request: &AttentionRequest,
    config: &PretrainConfig,
    source: &mut Option<Vit>,
    student: &Vit,
    step: u64,
    device: &Device,
) -> anyhow::Result<AttentionView> {
    if source.is_none() {
        let path = config.model.weights.as_ref().context("the run has no source weights")?;
        *source = Some(load_backbone_with(path, config.arch_preset()?, device)?.0);
    }
    let source = source.as_ref().expect("loaded above");
    crate::inspect::attention::before_after(request, config.crops.global_size, source, &student.clone().valid(), step, device)
}

fn report_text(
    config: &PretrainConfig,
    budget: &crate::peft::Budget,
    plan: &AdaptationPlan,
    vit: &VitConfig,
    s: &PretrainSummary,
) -> String {
    let pct = |v: Option<f64>| v.map_or("—".into(), |v| format!("{:.1}%", 100.0 * v));
    let data = match (&config.data.images, &config.data.list) {
        (Some(p), _) => format!("images under `{}`", p.display()),
        (None, Some(p)) => format!("the images listed in `{}`", p.display()),
        (None, None) => format!("{} procedural satellite-like tiles ({} px)", config.data.procedural_tiles, config.data.procedural_size),
    };
    format!(
        "# ExPLoRA pre-training\n\n\
         - backbone: {} ({} blocks, width {}), weights `{}`\n\
         - objective: {}; beside the backbone trains: {}\n\
         - plan: unfrozen blocks {:?}, LoRA rank {} on {} elsewhere; {} trainable of {} ({:.2}%)\n\
         - data: {data}\n\
         - each image as: {}; effective batch {}\n\
         - steps: {} ({} images seen, {:.1} images/s){}\n\
         - final loss: {}\n\
         - k-NN top-1 (CLS of the exported backbone, leave-one-out, k = {}): before {} → after {}\n\
         - peak GPU memory reserved: {}\n\
         - files skipped (unreadable): {}\n\n\
         `backbone.safetensors` is the adapted backbone (the EMA teacher, or MAE's encoder, with LoRA merged); probe it with \
         `explora embed --weights backbone.safetensors --images <folder>`.\n\n\
         To run on real weights and data: \
         `explora --no-gui pretrain --weights dinov2_vits14.pth --images /data/eurosat --out runs/eurosat` \
         (paper defaults: 224/98 px crops, 65,536 prototypes; see `explora pretrain --help`).\n",
        vit.name,
        vit.depth,
        vit.embed_dim,
        config.model.weights.as_ref().map_or("random".into(), |p| p.display().to_string()),
        config.objective,
        budget
            .extra
            .iter()
            .map(|r| format!("{} ({} parameters)", r.component, crate::peft::thousands(r.params)))
            .collect::<Vec<_>>()
            .join(", "),
        plan.unfrozen_blocks(),
        plan.lora.rank,
        plan.lora.targets,
        budget.trainable,
        budget.backbone,
        budget.percent(),
        config.views_description(),
        config.optim.effective_batch(),
        s.steps_done,
        s.images_seen,
        s.images_per_second,
        if s.stopped_early { " — stopped early" } else { "" },
        s.final_loss.map_or("—".into(), |l| format!("{l:.4}")),
        config.monitor.knn_k,
        pct(s.knn_before),
        pct(s.knn_after),
        s.peak_gpu_bytes.map_or("not reported by this backend".into(), |b| format!("{:.1} MiB", b as f64 / (1 << 20) as f64)),
        s.skipped_files,
    )
}
