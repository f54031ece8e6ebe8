//! `explora embed`: CLS and mean-pooled patch features for every image of a folder.

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use anyhow::Context;

use crate::checkpoint::{Metadata, RawTensor, TensorMap, read_safetensors, write_safetensors};
use crate::data::{ImageList, Preprocess, SkipReport, load_batch};
use crate::engine::{Flow, JobContext};
use crate::inspect::images_tensor;
use crate::model::to_vec;
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

    /// DINOv2's linear-probe input: each row is the CLS token followed by the mean patch
    /// token, `[n, 2·dim]`.
    pub fn cls_and_patch_mean(&self) -> Vec<f32> {
        let d = self.dim;
        self.cls.chunks(d).zip(self.patch_mean.chunks(d)).flat_map(|(c, p)| c.iter().chain(p).copied()).collect()
    }

    /// Each row of `self` and of `other` (the same images, in the same order) L2-normalised,
    /// then concatenated: the features of an ensemble of the two backbones, whose cosine
    /// similarity is the mean of theirs.
    pub fn concat_normalized(&self, other: &Features) -> Features {
        fn join(a: &[f32], da: usize, b: &[f32], db: usize) -> Vec<f32> {
            fn push_unit(out: &mut Vec<f32>, row: &[f32]) {
                let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                out.extend(row.iter().map(|v| v / norm));
            }
            let mut out = Vec::with_capacity(a.len() + b.len());
            for (x, y) in a.chunks(da).zip(b.chunks(db)) {
                push_unit(&mut out, x);
                push_unit(&mut out, y);
            }
            out
        }
        debug_assert_eq!(self.paths, other.paths, "an ensemble of features of the same images");
        Features {
            dim: self.dim + other.dim,
            cls: join(&self.cls, self.dim, &other.cls, other.dim),
            patch_mean: join(&self.patch_mean, self.dim, &other.patch_mean, other.dim),
            paths: self.paths.clone(),
            labels: self.labels.clone(),
            classes: self.classes.clone(),
            skipped: self.skipped.clone(),
            stopped: self.stopped || other.stopped,
        }
    }

    /// The class index of every row (an image without a label is an error).
    pub fn labels(&self) -> anyhow::Result<Vec<usize>> {
        self.labels.iter().zip(&self.paths).map(|(l, p)| l.ok_or_else(|| anyhow::anyhow!("{} has no class label", p.display()))).collect()
    }

    /// Reads a file written by [`Features::save`]; `key` is the cache key it was saved with.
    pub fn load(path: &Path) -> anyhow::Result<(Self, Option<String>)> {
        let (tensors, meta) = read_safetensors(path)?;
        if meta.get("format").map(String::as_str) != Some("explora-features-v1") {
            anyhow::bail!("{} is not an explora features file", path.display());
        }
        let get = |name: &str| tensors.get(name).ok_or_else(|| anyhow::anyhow!("{} lacks `{name}`", path.display()));
        let (cls, patch_mean) = (get("cls")?, get("patch_mean")?);
        let paths: Vec<PathBuf> = serde_json::from_str(meta.get("paths").map_or("[]", String::as_str))?;
        let classes: Vec<String> = serde_json::from_str(meta.get("classes").map_or("[]", String::as_str))?;
        let labels = match tensors.get("labels") {
            Some(l) => l.data.iter().map(|&v| (v >= 0.0).then_some(v as usize)).collect(),
            None => vec![None; paths.len()],
        };
        let features = Features {
            dim: cls.shape.get(1).copied().unwrap_or(0),
            cls: cls.data.clone(),
            patch_mean: patch_mean.data.clone(),
            paths,
            labels,
            classes,
            ..Default::default()
        };
        if features.cls.len() != features.len() * features.dim || features.labels.len() != features.len() {
            anyhow::bail!("{} is inconsistent (rows and paths differ)", path.display());
        }
        Ok((features, meta.get("key").cloned()))
    }

    /// Writes `cls`, `patch_mean` (and `labels` when the folder has classes) to a safetensors
    /// file; paths and class names go into its metadata as JSON.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        self.save_keyed(path, None)
    }

    /// [`Features::save`] with a cache key in the metadata.
    pub fn save_keyed(&self, path: &Path, key: Option<&str>) -> anyhow::Result<()> {
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
        if let Some(key) = key {
            meta.insert("key".into(), key.into());
        }
        write_safetensors(path, &tensors, &meta).with_context(|| format!("writing {}", path.display()))
    }
}

/// Runs the backbone over `list` in batches of `batch`, decoding the next batch on another
/// thread while the GPU works on the current one. Unreadable images are skipped and counted.
pub fn extract(model: &Vit, list: &ImageList, pre: &Preprocess, batch: usize, ctx: &mut JobContext) -> anyhow::Result<Features> {
    let batch = batch.max(1);
    let size = pre.size as usize;
    let device = model.device();
    let total = list.len() as u64;
    let mut features = Features { dim: model.config().embed_dim, classes: list.classes.clone(), ..Default::default() };
    ctx.phase(crate::engine::Phase::Embedding, Some(total));
    let chunks: Vec<Vec<usize>> = (0..list.len()).collect::<Vec<_>>().chunks(batch).map(<[usize]>::to_vec).collect();
    let chunks_total = chunks.len();
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
                // A short batch (the last one, or one with skipped files) is padded with copies
                // of its last image, so the backend sees one shape only (no new kernels to
                // compile or tune for the tail); the padding rows are dropped.
                let n = kept.len();
                let rows = if n < batch && chunks_total > 1 { batch } else { n };
                let mut data = data;
                let image = 3 * size * size;
                let last = data[(n - 1) * image..n * image].to_vec();
                for _ in n..rows {
                    data.extend_from_slice(&last);
                }
                let dim = features.dim;
                let out = model.forward(images_tensor(data, rows, size, &device), ForwardOptions::default());
                let (cls, mean) = (to_vec(out.cls), to_vec(out.patches.mean_dim(1)));
                features.cls.extend_from_slice(&cls[..n * dim]);
                features.patch_mean.extend_from_slice(&mean[..n * dim]);
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

/// Features of `list` from the cache file `path` when it was written under the same `key`
/// (same backbone, image size and images), otherwise extracted and cached there. A stopped
/// extraction is not cached.
pub fn cached(
    model: &Vit,
    list: &ImageList,
    pre: &Preprocess,
    batch: usize,
    path: &Path,
    key: &str,
    ctx: &mut JobContext,
) -> anyhow::Result<Features> {
    if path.exists() {
        match Features::load(path) {
            Ok((features, Some(found))) if found == key => {
                ctx.info(format!("features from cache {}", path.display()));
                return Ok(features);
            }
            Ok(_) => ctx.info(format!("{} was computed for other inputs: recomputing", path.display())),
            Err(e) => ctx.warn(format!("ignoring unreadable feature cache: {e:#}")),
        }
    }
    let features = extract(model, list, pre, batch, ctx)?;
    if !features.stopped {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        features.save_keyed(path, Some(key))?;
    }
    Ok(features)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(dim: usize, cls: Vec<f32>) -> Features {
        let n = cls.len() / dim;
        Features {
            dim,
            patch_mean: cls.iter().map(|v| 2.0 * v).collect(),
            cls,
            paths: (0..n).map(|i| PathBuf::from(format!("{i}.png"))).collect(),
            labels: vec![Some(0); n],
            classes: vec!["a".into()],
            skipped: SkipReport::default(),
            stopped: false,
        }
    }

    #[test]
    fn an_ensemble_concatenates_each_backbones_unit_rows() {
        let a = features(2, vec![3.0, 4.0, 0.0, 2.0]);
        let b = features(1, vec![-5.0, 0.5]);
        let e = a.concat_normalized(&b);
        assert_eq!(e.dim, 3);
        assert_eq!(e.cls, [0.6, 0.8, -1.0, 0.0, 1.0, 1.0]);
        assert_eq!(e.patch_mean, e.cls, "each half is normalised, so the scale of the input goes");
        assert_eq!(e.len(), 2);
        // The cosine of two ensemble rows is the mean of the two backbones' cosines.
        let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>();
        let (r0, r1) = (&e.cls[0..3], &e.cls[3..6]);
        let cos = dot(r0, r1) / (dot(r0, r0).sqrt() * dot(r1, r1).sqrt());
        assert!((cos - (0.8 + -1.0) / 2.0).abs() < 1e-6, "{cos}");
    }
}
