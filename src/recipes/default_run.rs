//! The built-in default run (what `explora --no-gui` and `cargo run --release` start), a
//! miniature of the paper that runs offline on any machine: the shipped source backbone (a tiny
//! ViT that explora pre-trained on the procedural *source* domain) is adapted with ExPLoRA to
//! the shifted *target* domain (many sensors, haze, half the ground resolution). Then it
//! answers "did it help?" on held-out labelled target tiles — k-NN and linear probe, source
//! backbone vs adapted one, with the difference and its bootstrap interval — and draws the last
//! block's CLS attention before and after for one target tile of each scene class.

use std::path::PathBuf;

use anyhow::Context;
use burn::tensor::Device;
use image::RgbImage;

use super::run::{RunOutcome, pretrain_then_evaluate};
use crate::checkpoint::load_backbone;
use crate::data::{Preprocess, ProceduralDomain, SceneClass};
use crate::engine::JobContext;
use crate::inspect::attention::{cls_attention, overlay};
use crate::inspect::images_tensor;
use crate::train::{PretrainConfig, PretrainJob};

/// Knobs of the default run (the CLI exposes them).
#[derive(Debug, Clone)]
pub struct DefaultRun {
    pub out: PathBuf,
    pub config: PretrainConfig,
}

impl DefaultRun {
    pub fn new(out: PathBuf) -> Self {
        Self { out, config: PretrainConfig::builtin() }
    }

    /// The default for `device`: on software Vulkan a smaller run that still finishes in
    /// minutes.
    pub fn for_device(out: PathBuf, device: &Device) -> Self {
        let config = if crate::device::is_software(device) { PretrainConfig::builtin_software() } else { PretrainConfig::builtin() };
        Self { out, config }
    }
}

/// Runs the default job and returns its summary.
pub fn run(job: &DefaultRun, device: &Device, ctx: &mut JobContext) -> anyhow::Result<String> {
    ctx.info(format!("run folder: {}", job.out.display()));
    if crate::device::is_software(device) {
        ctx.info(format!(
            "software Vulkan (no GPU): a smaller default run ({} steps of {} images); on a GPU it runs {} steps of {}",
            job.config.run.steps,
            job.config.optim.batch,
            PretrainConfig::builtin().run.steps,
            PretrainConfig::builtin().optim.batch
        ));
    }
    // Pre-training, then "did it help?": source vs adapted backbone on held-out labelled
    // target tiles (the pipeline's k-NN and linear probe on a seeded split), written to
    // evaluation/report.md — the run config's `[evaluate]` section, as any run can ask.
    let pre = PretrainJob { config: job.config.clone(), out: job.out.clone(), resume: false };
    let RunOutcome { pretrain: summary, evaluation } = pretrain_then_evaluate(&pre, device, ctx)?;
    let out = job.out.display();
    let (false, Some(evaluation)) = (summary.stopped_early, evaluation) else {
        return Ok(super::run::stopped_message(&summary, &job.out));
    };

    ctx.phase(crate::engine::Phase::step("attention maps before/after"), Some(SceneClass::ALL.len() as u64));
    let size = job.config.crops.global_size;
    let source_weights = job.config.model.weights.clone().unwrap_or_else(|| job.out.join("base.safetensors"));
    let (base, _) = load_backbone(&source_weights, device)?;
    let (adapted, _) = load_backbone(&job.out.join("backbone.safetensors"), device)?;
    let last = base.config().depth - 1;
    let domain = ProceduralDomain { size, seed: job.config.run.seed ^ 0xA77E, shift: job.config.data.procedural_shift };
    let pre = Preprocess::new(size);
    let mut index = 0u64;
    for (i, class) in SceneClass::ALL.iter().enumerate() {
        while domain.class_of(index) != *class {
            index += 1;
        }
        let (tile, _) = domain.sample(index);
        let x = images_tensor(pre.to_tensor_data(&tile), 1, size as usize, device);
        let before = overlay(&tile, &cls_attention(&base, x.clone(), last, None)?, 0.55);
        let after = overlay(&tile, &cls_attention(&adapted, x, last, None)?, 0.55);
        let path = job.out.join(format!("attention_{}.png", class.name()));
        side_by_side(&[&tile, &before, &after]).save(&path).with_context(|| format!("writing {}", path.display()))?;
        ctx.artifact(format!("attention, block {last}: tile | before | after ({})", class.name()), &path);
        ctx.progress(i as u64 + 1, Some(SceneClass::ALL.len() as u64));
    }

    let deltas: Vec<String> = evaluation.deltas().iter().map(|d| format!("  {}", d.describe())).collect();
    let monitor = match (summary.knn_before, summary.knn_after) {
        (Some(b), Some(a)) => format!(
            " Leave-one-out k-NN monitor on {} target tiles: {:.1}% → {:.1}%.",
            job.config.monitor.knn_max_images,
            100.0 * b,
            100.0 * a
        ),
        _ => String::new(),
    };
    Ok(format!(
        "default run finished: ExPLoRA pre-training of the {} source backbone on the shifted target domain, {} steps, {} images ({:.1} img/s).{monitor}\n\
         Held-out target tiles ({} test images; chance 20%), source backbone → after ExPLoRA:\n{}\n\
         Results are in {out}: evaluation/report.md, report.md, metrics.jsonl, backbone.safetensors, attention_*.png, batch-preview.png.\n\
         On real weights and data: explora --no-gui pipeline --config assets/recipes/eurosat-cpu.toml --weights <dinov2 checkpoint> --labelled <ImageFolder>",
        base.config().name,
        summary.steps_done,
        summary.images_seen,
        summary.images_per_second,
        evaluation.split_sizes[2],
        deltas.join("\n"),
    ))
}

/// Images of equal height next to each other with a 2 px gap.
fn side_by_side(images: &[&RgbImage]) -> RgbImage {
    let gap = 2;
    let height = images.iter().map(|i| i.height()).max().unwrap_or(0);
    let width = images.iter().map(|i| i.width()).sum::<u32>() + gap * images.len().saturating_sub(1) as u32;
    let mut out = RgbImage::from_pixel(width, height, image::Rgb([255, 255, 255]));
    let mut x = 0;
    for img in images {
        image::imageops::replace(&mut out, *img, x as i64, 0);
        x += img.width() + gap;
    }
    out
}
