//! The k-NN monitor: how well the teacher's CLS features separate the classes of a small
//! labelled set, tracked during pre-training — leave-one-out with the same weighted vote as the
//! evaluation's k-NN probe (`inspect::knn`, DINO's T = 0.07).

use std::path::Path;

use burn::tensor::Device;
use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;

use crate::data::{ImageList, Preprocess, ProceduralDomain, decode_rgb};
use crate::inspect::{KnnConfig, images_tensor, leave_one_out_scores, top1};
use crate::model::{ForwardOptions, Vit, to_vec};

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
        let (images, labels) = domain.batch(0, count).into_iter().map(|(img, class)| (pre.to_tensor_data(&img), class.index())).unzip();
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
        crate::data::rng::shuffle(&mut items, &mut rng);
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

    /// Leave-one-out k-NN accuracy of `model`'s CLS features (weighted vote of the `k` nearest).
    pub fn evaluate(&self, model: &Vit, k: usize, batch: usize, device: &Device) -> f64 {
        let s = self.size;
        let mut features = Vec::new();
        let mut dim = 0;
        for chunk in self.images.chunks(batch.max(1)) {
            let data: Vec<f32> = chunk.iter().flatten().copied().collect();
            let x = images_tensor(data, chunk.len(), s, device);
            let cls = model.forward(x, ForwardOptions::default()).cls;
            dim = cls.dims()[1];
            features.extend(to_vec(cls));
        }
        let config = KnnConfig { k, ..KnnConfig::default() };
        top1(&leave_one_out_scores(&features, &self.labels, dim, self.classes, config), &self.labels, self.classes)
    }
}
