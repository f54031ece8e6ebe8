//! `explora embed`: CLS and mean-pooled patch features for every image of a folder.

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use anyhow::Context;

use super::{images_tensor, to_vec};
use crate::checkpoint::{Metadata, RawTensor, TensorMap, write_safetensors};
use crate::data::{ImageList, Preprocess, SkipReport, load_batch};
use crate::engine::{Flow, JobContext};
use crate::model::{ForwardOptions, Vit};

/// Features of the images that decoded, in folder order.
#[derive(Debug, Clone, Default)]
pub struct Features {
    pub dim: usize,
    /// `[n, dim]` row-major: the CLS token after the final norm.
    pub cls: Vec<f32>,
    /// `[n, dim]`: the mean of the patch tokens after the final norm.
    pub patch_mean: Vec<f32>,
    pub paths: Vec<PathBuf>,
    pub labels: Vec<Option<usize>>,
    pub classes: Vec<String>,
    pub skipped: SkipReport,
    /// Whether a stop command ended the extraction early.
    pub stopped: bool,
}

impl Features {
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// Writes `cls`, `patch_mean` (and `labels` when the folder has classes) to a safetensors
    /// file; paths and class names go into its metadata as JSON.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let n = self.len();
        let mut tensors = TensorMap::new();
        tensors.insert("cls".into(), RawTensor::new(vec![n, self.dim], self.cls.clone()));
        tensors.insert("patch_mean".into(), RawTensor::new(vec![n, self.dim], self.patch_mean.clone()));
        if !self.classes.is_empty() {
            let labels = self.labels.iter().map(|l| l.map_or(-1.0, |l| l as f32)).collect();
            tensors.insert("labels".into(), RawTensor::new(vec![n], labels));
        }
        let mut meta = Metadata::new();
        meta.insert("format".into(), "explora-features-v1".into());
        meta.insert("paths".into(), serde_json::to_string(&self.paths)?);
        meta.insert("classes".into(), serde_json::to_string(&self.classes)?);
        write_safetensors(path, &tensors, &meta).with_context(|| format!("writing {}", path.display()))
    }
}

/// Runs the backbone over `list` in batches of `batch`, decoding the next batch on another
/// thread while the GPU works on the current one. Unreadable images are skipped and counted.
pub fn extract(
    model: &Vit,
    list: &ImageList,
    pre: &Preprocess,
    batch: usize,
    ctx: &mut JobContext,
) -> anyhow::Result<Features> {
    let batch = batch.max(1);
    let size = pre.size as usize;
    let device = model.device();
    let total = list.len() as u64;
    let mut features = Features {
        dim: model.config().embed_dim,
        classes: list.classes.clone(),
        ..Default::default()
    };
    ctx.phase("embedding images", Some(total));
    let chunks: Vec<Vec<usize>> = (0..list.len()).collect::<Vec<_>>().chunks(batch).map(<[usize]>::to_vec).collect();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let (tx, rx) = mpsc::sync_channel::<(Vec<usize>, Vec<f32>, Vec<usize>, SkipReport)>(2);
        let pre = *pre;
        scope.spawn(move || {
            for chunk in chunks {
                let paths: Vec<PathBuf> = chunk.iter().map(|&i| list.items[i].path.clone()).collect();
                let mut skips = SkipReport::default();
                let (data, kept) = load_batch(&paths, &pre, &mut skips);
                if tx.send((chunk, data, kept, skips)).is_err() {
                    return; // the consumer stopped
                }
            }
        });
        let mut done = 0u64;
        for (chunk, data, kept, skips) in rx {
            for (path, reason) in skips.skipped {
                features.skipped.record(path, reason);
            }
            done += chunk.len() as u64;
            if !kept.is_empty() {
                let images = images_tensor(data, kept.len(), size, &device);
                let out = model.forward(images, ForwardOptions::default());
                features.cls.extend(to_vec(out.cls));
                features.patch_mean.extend(to_vec(out.patches.mean_dim(1)));
                for k in kept {
                    let item = &list.items[chunk[k]];
                    features.paths.push(item.path.clone());
                    features.labels.push(item.label);
                }
            }
            ctx.progress(done, Some(total));
            if ctx.checkpoint() == Flow::Stop {
                features.stopped = true;
                break;
            }
        }
        Ok(())
    })?;
    if let Some(summary) = features.skipped.summary() {
        ctx.warn(summary);
    }
    Ok(features)
}
