//! A pre-training run as both faces start and resume it: ExPLoRA pre-training, then — when the
//! run config's `[evaluate]` section asks — the before/after evaluation of the finished run.
//! The evaluation is part of the run: a run stopped before it (or killed during it) is
//! evaluated when it is resumed, from either face.

use std::path::{Path, PathBuf};

use burn::tensor::Device;

use super::pipeline::{PipelineSummary, evaluate_run};
use crate::checkpoint::{load_backbone, load_backbone_with};
use crate::data::ensure_shifted_image_folder;
use crate::engine::{AttentionRequest, AttentionView, JobContext, Phase};
use crate::train::{PretrainConfig, PretrainJob, PretrainSummary, pretrain};

/// What a run ended with.
pub struct RunOutcome {
    pub pretrain: PretrainSummary,
    /// The comparison, when the config asks for one and pre-training finished.
    pub evaluation: Option<PipelineSummary>,
}

/// The summary of a run in `dir` whose pre-training already finished all `steps`.
fn finished(dir: &Path, steps: u64) -> Option<PretrainSummary> {
    let summary: PretrainSummary = serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).ok()?).ok()?;
    (!summary.stopped_early && summary.steps_done >= steps).then_some(summary)
}

/// Pre-trains (or continues) the run, then evaluates it when `[evaluate] after_training`.
/// Resuming a run whose pre-training finished goes straight to the evaluation.
pub fn pretrain_then_evaluate(job: &PretrainJob, device: &Device, ctx: &mut JobContext) -> anyhow::Result<RunOutcome> {
    let done = if job.resume { finished(&job.out, job.config.run.steps) } else { None };
    let summary = match done {
        Some(summary) => {
            ctx.info(format!("{}: pre-training already finished ({} steps)", job.out.display(), summary.steps_done));
            summary
        }
        None => pretrain(job, device, ctx)?,
    };
    if summary.stopped_early || !job.config.evaluate.after_training {
        return Ok(RunOutcome { pretrain: summary, evaluation: None });
    }
    let labelled = labelled_set(&job.config, &job.out, ctx)?;
    let evaluation = evaluate_run(&job.out, &labelled, device, ctx)?;
    Ok(RunOutcome { pretrain: summary, evaluation: Some(evaluation) })
}

/// The labelled folder of `[evaluate]`, or labelled tiles of the run's procedural domain
/// generated once into `<run>/target-tiles` (a different seed from the training tiles).
pub fn labelled_set(config: &PretrainConfig, run: &Path, ctx: &mut JobContext) -> anyhow::Result<PathBuf> {
    if let Some(folder) = &config.evaluate.labelled {
        return Ok(folder.clone());
    }
    let tiles = run.join("target-tiles");
    ctx.phase(Phase::step("preparing the labelled tiles"), None);
    let (e, d) = (&config.evaluate, &config.data);
    ensure_shifted_image_folder(&tiles, e.tiles_per_class, d.procedural_size, config.run.seed ^ 0x7E57, d.procedural_shift)?;
    Ok(tiles)
}

/// What a run stopped before its last step says: where it stopped and the command that
/// continues it.
pub fn stopped_message(summary: &PretrainSummary, out: &Path) -> String {
    format!("stopped after step {}; continue with `explora --no-gui resume {}`", summary.steps_done, out.display())
}

/// The job both faces start for a pre-training run; its text is the run's closing summary.
pub fn run(job: &PretrainJob, device: &Device, ctx: &mut JobContext) -> anyhow::Result<String> {
    let outcome = pretrain_then_evaluate(job, device, ctx)?;
    let s = &outcome.pretrain;
    let out = job.out.display();
    let what = if s.stopped_early { stopped_message(s, &job.out) } else { format!("pre-trained {} steps", s.steps_done) };
    let knn = match (s.knn_before, s.knn_after) {
        (Some(b), Some(a)) => format!("; k-NN monitor top-1 {:.1}% → {:.1}%", 100.0 * b, 100.0 * a),
        (None, Some(a)) => format!("; k-NN monitor top-1 {:.1}%", 100.0 * a),
        _ => String::new(),
    };
    let mut text = format!(
        "{what} ({} images, {:.1} img/s{knn}). Results in {out}: report.md, metrics.jsonl, backbone.safetensors, checkpoints/",
        s.images_seen, s.images_per_second
    );
    if let Some(evaluation) = &outcome.evaluation {
        text.push_str(&format!("\n{}; report in {}", evaluation.headline(), job.out.join("evaluation/report.md").display()));
    }
    Ok(text)
}

/// The attention of `request` in a finished run: its source weights (from its `config.toml`)
/// against its adapted `backbone.safetensors` (what the app shows once a run has ended).
pub fn attention_of_finished_run(out: &Path, request: &AttentionRequest, device: &Device) -> anyhow::Result<AttentionView> {
    let config = PretrainConfig::load(&out.join("config.toml"))?;
    let source_path = config.model.weights.clone().unwrap_or_else(|| out.join("base.safetensors"));
    let (source, _) = load_backbone_with(&source_path, config.arch_preset()?, device)?;
    let (student, _) = load_backbone(&out.join("backbone.safetensors"), device)?;
    crate::inspect::attention::before_after(request, config.crops.global_size, &source, &student, config.run.steps, device)
}
