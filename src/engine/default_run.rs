//! The built-in default run: a procedurally generated satellite-like domain and a tiny
//! backbone, so that `explora --no-gui` does something real on any machine without downloads.
//!
//! Until ExPLoRA pre-training lands (issue "ExPLoRA extended pre-training"), the default run
//! exercises the foundation end to end: it generates the domain, builds the tiny backbone,
//! saves it, extracts features for every tile, measures how well the frozen features separate
//! the scene classes (leave-one-out k-NN) and writes CLS-attention overlays.

use std::path::PathBuf;

use anyhow::Context;
use burn::tensor::Device;

use super::{Flow, JobContext};
use crate::checkpoint::save_backbone;
use crate::data::{Preprocess, SceneClass, decode_rgb, generate_image_folder, normalize_chw};
use crate::eval::attention::{cls_attention, overlay};
use crate::eval::embed::extract;
use crate::eval::images_tensor;
use crate::model::VitConfig;

/// Knobs of the default run (the CLI exposes them; the defaults finish in about a minute on
/// software Vulkan).
#[derive(Debug, Clone, serde::Serialize)]
pub struct DefaultRun {
    pub out: PathBuf,
    /// Tiles generated per scene class.
    pub tiles_per_class: usize,
    pub seed: u64,
    pub batch: usize,
}

impl DefaultRun {
    pub fn new(out: PathBuf) -> Self {
        Self { out, tiles_per_class: 40, seed: 0, batch: 50 }
    }
}

/// Leave-one-out k-NN accuracy with cosine similarity (majority vote, ties to the nearest).
pub fn knn_leave_one_out(features: &[f32], dim: usize, labels: &[usize], k: usize) -> f64 {
    let n = labels.len();
    if n < 2 {
        return 0.0;
    }
    let normed: Vec<Vec<f32>> = features
        .chunks(dim)
        .map(|f| {
            let norm = f.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            f.iter().map(|v| v / norm).collect()
        })
        .collect();
    let classes = labels.iter().max().map_or(0, |m| m + 1);
    let correct = (0..n)
        .filter(|&i| {
            let mut sims: Vec<(f32, usize)> = (0..n)
                .filter(|&j| j != i)
                .map(|j| (normed[i].iter().zip(&normed[j]).map(|(a, b)| a * b).sum(), labels[j]))
                .collect();
            sims.sort_by(|a, b| b.0.total_cmp(&a.0));
            let mut votes = vec![0usize; classes];
            for (_, l) in sims.iter().take(k) {
                votes[*l] += 1;
            }
            let best = *votes.iter().max().unwrap_or(&0);
            let winner = sims.iter().take(k).find(|(_, l)| votes[*l] == best).map(|(_, l)| *l);
            winner == Some(labels[i])
        })
        .count();
    correct as f64 / n as f64
}

/// Runs the default job and returns its summary.
pub fn run(job: &DefaultRun, device: &Device, ctx: &mut JobContext) -> anyhow::Result<String> {
    std::fs::create_dir_all(&job.out).with_context(|| format!("creating run folder {}", job.out.display()))?;
    let config = VitConfig::tiny();
    let size = config.image_size as u32;
    std::fs::write(
        job.out.join("config.toml"),
        toml::to_string(&serde_json::json!({ "run": job, "model": config }))?,
    )?;
    ctx.info(format!("run folder: {}", job.out.display()));

    ctx.phase("generating the procedural satellite domain", None);
    let data_dir = job.out.join("data");
    let list = generate_image_folder(&data_dir, job.tiles_per_class, size, job.seed)?;
    ctx.info(format!("{} tiles of {size} px in {} classes under {}", list.len(), list.classes.len(), data_dir.display()));
    if ctx.checkpoint() == Flow::Stop {
        return Ok("stopped".into());
    }

    let model = config.init(device);
    let backbone = job.out.join("backbone.safetensors");
    save_backbone(&model, &backbone)?;
    ctx.artifact("backbone", &backbone);

    let features = extract(&model, &list, &Preprocess::new(size), job.batch, ctx)?;
    let features_path = job.out.join("features.safetensors");
    features.save(&features_path)?;
    ctx.artifact("features", &features_path);
    if features.stopped {
        return Ok(format!("stopped after {} images; results so far in {}", features.len(), job.out.display()));
    }
    let labels: Vec<usize> = features.labels.iter().map(|l| l.unwrap_or(0)).collect();
    let knn_cls = knn_leave_one_out(&features.cls, features.dim, &labels, 10);
    let knn_patch = knn_leave_one_out(&features.patch_mean, features.dim, &labels, 10);

    ctx.phase("attention maps", Some(SceneClass::ALL.len() as u64));
    let last = config.depth - 1;
    for (i, class) in SceneClass::ALL.iter().enumerate() {
        let path = data_dir.join(class.name()).join(format!("{}_0.png", class.name()));
        let image = decode_rgb(&path)?;
        let tensor = images_tensor(normalize_chw(&image), 1, size as usize, device);
        let map = cls_attention(&model, tensor, last, None)?;
        let out = job.out.join(format!("attention_{}.png", class.name()));
        overlay(&image, &map, 0.55).save(&out).with_context(|| format!("writing {}", out.display()))?;
        ctx.artifact(format!("attention map ({})", class.name()), &out);
        ctx.progress(i as u64 + 1, Some(SceneClass::ALL.len() as u64));
    }

    let chance = 1.0 / list.classes.len().max(1) as f64;
    let report = format!(
        "# explora default run\n\n\
         Backbone: `{name}` (width {d}, {depth} blocks, {params} parameters), randomly initialised.\n\
         Domain: {n} procedural {size} px tiles, classes {classes:?}.\n\n\
         | features | leave-one-out 10-NN accuracy |\n|---|---|\n\
         | CLS | {cls:.1}% |\n| mean patch | {patch:.1}% |\n| chance | {chance:.1}% |\n\n\
         ExPLoRA pre-training is not part of the default run yet; this run checks the backbone,\n\
         data and output pipeline end to end.\n",
        name = config.name,
        d = config.embed_dim,
        depth = config.depth,
        params = config.num_params(),
        n = features.len(),
        classes = list.classes,
        cls = 100.0 * knn_cls,
        patch = 100.0 * knn_patch,
        chance = 100.0 * chance,
    );
    let report_path = job.out.join("report.md");
    std::fs::write(&report_path, &report)?;
    ctx.artifact("report", &report_path);
    Ok(format!(
        "default run finished: {} tiles embedded, 10-NN accuracy {:.1}% (CLS) / {:.1}% (mean patch) vs {:.1}% chance.\n\
         Results are in {}. To run on real data: explora embed --weights <checkpoint> --images <folder> --out features.safetensors",
        features.len(),
        100.0 * knn_cls,
        100.0 * knn_patch,
        100.0 * chance,
        job.out.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knn_separates_clusters_and_fails_on_noise_labels() {
        // Two tight clusters along different axes.
        let mut feats = Vec::new();
        let mut labels = Vec::new();
        for i in 0..10 {
            let e = i as f32 * 0.01;
            feats.extend([1.0, e, 0.0]);
            labels.push(0);
            feats.extend([e, 1.0, 0.0]);
            labels.push(1);
        }
        assert_eq!(knn_leave_one_out(&feats, 3, &labels, 3), 1.0);
        // Alternating labels along one direction cannot be predicted.
        let line: Vec<f32> = (0..20).flat_map(|i| [1.0, i as f32 * 0.001, 0.0]).collect();
        let alternating: Vec<usize> = (0..20).map(|i| i % 2).collect();
        assert!(knn_leave_one_out(&line, 3, &alternating, 1) < 0.2);
    }
}
