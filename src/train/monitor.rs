//! The k-NN monitor: how well the teacher's CLS features separate the classes of a small
//! labelled set (leave-one-out, cosine similarity), tracked during pre-training as DINO does.

use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use crate::data::{ImageList, Preprocess, ProceduralDomain, decode_rgb};
use crate::model::{ForwardOptions, Vit};

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

/// A labelled set held in memory, preprocessed once.
pub struct KnnSet {
    pub images: Vec<Vec<f32>>,
    pub labels: Vec<usize>,
    pub size: usize,
    pub classes: usize,
    /// Files that could not be decoded (skipped).
    pub skipped: usize,
}

impl KnnSet {
    /// Procedural tiles seen through `shift`, the same number of each scene class.
    pub fn procedural(count: usize, size: u32, seed: u64, shift: crate::data::Shift) -> Self {
        let domain = ProceduralDomain { size, seed, shift };
        let pre = Preprocess::new(size);
        let (images, labels) =
            domain.batch(0, count).into_iter().map(|(img, class)| (pre.to_tensor_data(&img), class.index())).unzip();
        Self { images, labels, size: size as usize, classes: 5, skipped: 0 }
    }

    /// Up to `max` images of a labelled ImageFolder (a seeded sample), resized and centre-cropped.
    pub fn folder(root: &Path, max: usize, size: u32, seed: u64) -> anyhow::Result<Self> {
        let list = ImageList::scan(root)?;
        if list.classes.len() < 2 {
            anyhow::bail!("{}: the k-NN monitor needs an ImageFolder with at least two class folders", root.display());
        }
        let mut items = list.items.clone();
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        for i in (1..items.len()).rev() {
            items.swap(i, rng.random_range(0..=i));
        }
        items.truncate(max);
        let pre = Preprocess::new(size);
        let (mut images, mut labels, mut skipped) = (Vec::new(), Vec::new(), 0);
        for item in items {
            match (decode_rgb(&item.path), item.label) {
                (Ok(img), Some(label)) => {
                    images.push(pre.to_tensor_data(&img));
                    labels.push(label);
                }
                _ => skipped += 1,
            }
        }
        Ok(Self { images, labels, size: size as usize, classes: list.classes.len(), skipped })
    }

    /// Leave-one-out k-NN accuracy of `model`'s CLS features.
    pub fn evaluate(&self, model: &Vit, k: usize, batch: usize, device: &Device) -> f64 {
        let s = self.size;
        let mut features = Vec::new();
        let mut dim = 0;
        for chunk in self.images.chunks(batch.max(1)) {
            let data: Vec<f32> = chunk.iter().flatten().copied().collect();
            let x = Tensor::<4>::from_data(TensorData::new(data, [chunk.len(), 3, s, s]), device);
            let cls = model.forward(x, ForwardOptions::default()).cls;
            dim = cls.dims()[1];
            features.extend(super::state::to_vec(cls));
        }
        knn_leave_one_out(&features, dim, &self.labels, k)
    }
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
