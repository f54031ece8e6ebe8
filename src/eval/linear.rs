//! Linear probing on frozen features (DINOv2's protocol: a linear classifier on the CLS token
//! concatenated with the average-pooled patch tokens, a small learning-rate sweep, the best
//! setting chosen on the validation split). Features are standardised with the training
//! split's statistics; each setting trains a softmax regression with SGD + momentum and a
//! cosine schedule, all settings in parallel on the CPU (the features are small; the backbone
//! never runs again).

use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::metrics::Metrics;

/// The sweep and the optimiser.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProbeConfig {
    /// Learning rates tried (on standardised features).
    pub lrs: Vec<f64>,
    /// Weight decays tried with every learning rate.
    pub weight_decays: Vec<f64>,
    pub epochs: usize,
    pub batch: usize,
    pub momentum: f64,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self { lrs: vec![0.001, 0.003, 0.01, 0.03, 0.1, 0.3], weight_decays: vec![0.0, 1e-3], epochs: 100, batch: 256, momentum: 0.9 }
    }
}

impl ProbeConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.lrs.is_empty() || self.lrs.iter().any(|l| !(*l > 0.0 && l.is_finite())) {
            return Err("`lrs` must list positive learning rates".into());
        }
        if self.weight_decays.is_empty() || self.weight_decays.iter().any(|w| !(*w >= 0.0)) {
            return Err("`weight_decays` must list values ≥ 0".into());
        }
        if self.epochs == 0 || self.batch == 0 {
            return Err("`epochs` and `batch` must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err("`momentum` must be in [0, 1)".into());
        }
        Ok(())
    }
}

/// A trained probe: standardisation and the linear map.
#[derive(Debug, Clone)]
pub struct LinearProbe {
    pub dim: usize,
    pub classes: usize,
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    /// `[classes, dim]`
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl LinearProbe {
    /// Class scores (logits) `[n, classes]`.
    pub fn scores(&self, features: &[f32]) -> Vec<f32> {
        features
            .par_chunks(self.dim)
            .flat_map_iter(|x| {
                let x = self.standardise(x);
                self.logits(&x)
            })
            .collect()
    }

    fn standardise(&self, x: &[f32]) -> Vec<f32> {
        x.iter().zip(&self.mean).zip(&self.inv_std).map(|((v, m), s)| (v - m) * s).collect()
    }

    fn logits(&self, x: &[f32]) -> Vec<f32> {
        self.weight.chunks(self.dim).zip(&self.bias).map(|(w, b)| w.iter().zip(x).map(|(a, b)| a * b).sum::<f32>() + b).collect()
    }
}

/// One setting of the sweep and its validation accuracy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SweepPoint {
    pub lr: f64,
    pub weight_decay: f64,
    pub val_top1: f64,
}

/// The sweep's outcome: every setting, and the probe of the best one.
#[derive(Debug, Clone)]
pub struct ProbeResult {
    pub sweep: Vec<SweepPoint>,
    pub best: SweepPoint,
    pub probe: LinearProbe,
}

/// A labelled feature matrix.
#[derive(Debug, Clone, Copy)]
pub struct Labelled<'a> {
    pub features: &'a [f32],
    pub labels: &'a [usize],
}

/// Trains one probe per (lr, weight decay) on `train`, keeps the best on `val` (on `train`
/// when `val` is empty; ties go to the earlier setting).
pub fn train_probe(train: Labelled, val: Labelled, dim: usize, classes: usize, config: &ProbeConfig, seed: u64) -> ProbeResult {
    let (mean, inv_std) = standardisation(train.features, dim);
    let base = LinearProbe { dim, classes, mean, inv_std, weight: vec![0.0; classes * dim], bias: vec![0.0; classes] };
    let x: Vec<Vec<f32>> = train.features.chunks(dim).map(|r| base.standardise(r)).collect();
    let settings: Vec<(f64, f64)> = config.lrs.iter().flat_map(|&lr| config.weight_decays.iter().map(move |&wd| (lr, wd))).collect();
    let select = if val.labels.is_empty() { train } else { val };
    let mut trained: Vec<(SweepPoint, LinearProbe)> = settings
        .par_iter()
        .map(|&(lr, wd)| {
            let probe = sgd(&base, &x, train.labels, config, lr, wd, seed);
            let top1 = Metrics::from_scores(&probe.scores(select.features), classes, select.labels).top1;
            (SweepPoint { lr, weight_decay: wd, val_top1: top1 }, probe)
        })
        .collect();
    let best = (0..trained.len()).fold(0, |best, i| if trained[i].0.val_top1 > trained[best].0.val_top1 { i } else { best });
    let sweep = trained.iter().map(|(point, _)| point.clone()).collect();
    let (best, probe) = trained.swap_remove(best);
    ProbeResult { sweep, best, probe }
}

fn standardisation(features: &[f32], dim: usize) -> (Vec<f32>, Vec<f32>) {
    let n = (features.len() / dim.max(1)).max(1) as f64;
    let mut mean = vec![0f64; dim];
    for row in features.chunks(dim) {
        for (m, v) in mean.iter_mut().zip(row) {
            *m += *v as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n);
    let mut var = vec![0f64; dim];
    for row in features.chunks(dim) {
        for ((s, v), m) in var.iter_mut().zip(row).zip(&mean) {
            *s += (*v as f64 - m).powi(2);
        }
    }
    let inv_std = var.iter().map(|s| (1.0 / (s / n).sqrt().max(1e-6)) as f32).collect();
    (mean.into_iter().map(|m| m as f32).collect(), inv_std)
}

/// Mini-batch SGD with momentum on the cross-entropy, cosine learning rate to 0.
fn sgd(base: &LinearProbe, x: &[Vec<f32>], labels: &[usize], config: &ProbeConfig, lr: f64, wd: f64, seed: u64) -> LinearProbe {
    let (dim, classes) = (base.dim, base.classes);
    let mut probe = base.clone();
    let mut velocity_w = vec![0f32; classes * dim];
    let mut velocity_b = vec![0f32; classes];
    let mut order: Vec<usize> = (0..x.len()).collect();
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let batches_per_epoch = x.len().div_ceil(config.batch).max(1);
    let total = (config.epochs * batches_per_epoch) as f64;
    let mut iteration = 0usize;
    let mut grad_w = vec![0f32; classes * dim];
    let mut grad_b = vec![0f32; classes];
    for _ in 0..config.epochs {
        crate::data::rng::shuffle(&mut order, &mut rng);
        for batch in order.chunks(config.batch) {
            grad_w.iter_mut().for_each(|g| *g = 0.0);
            grad_b.iter_mut().for_each(|g| *g = 0.0);
            for &i in batch {
                let logits = probe.logits(&x[i]);
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
                let sum: f32 = exp.iter().sum();
                for c in 0..classes {
                    let g = exp[c] / sum - if c == labels[i] { 1.0 } else { 0.0 };
                    grad_b[c] += g;
                    for (gw, xv) in grad_w[c * dim..(c + 1) * dim].iter_mut().zip(&x[i]) {
                        *gw += g * xv;
                    }
                }
            }
            let scale = 1.0 / batch.len() as f32;
            let step = crate::optim::schedule::cosine(lr, 0.0, iteration as u64, total as u64) as f32;
            let (mu, wd) = (config.momentum as f32, wd as f32);
            for ((w, v), g) in probe.weight.iter_mut().zip(&mut velocity_w).zip(&grad_w) {
                *v = mu * *v + g * scale + wd * *w;
                *w -= step * *v;
            }
            for ((b, v), g) in probe.bias.iter_mut().zip(&mut velocity_b).zip(&grad_b) {
                *v = mu * *v + g * scale;
                *b -= step * *v;
            }
            iteration += 1;
        }
    }
    probe
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gaussian-ish blobs in `dim` dimensions, one per class, with an offset and a scale that
    /// standardisation must undo.
    fn blobs(classes: usize, per_class: usize, dim: usize, seed: u64) -> (Vec<f32>, Vec<usize>) {
        use rand::RngExt;
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let centres: Vec<Vec<f32>> = (0..classes).map(|c| (0..dim).map(|d| if d % classes == c { 3.0 } else { 0.0 }).collect()).collect();
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for (c, centre) in centres.iter().enumerate() {
            for _ in 0..per_class {
                x.extend(centre.iter().map(|m| 100.0 + 50.0 * (m + rng.random_range(-1.0f32..1.0))));
                y.push(c);
            }
        }
        (x, y)
    }

    #[test]
    fn separable_blobs_are_learned_and_the_sweep_is_deterministic() {
        let (dim, classes) = (12, 4);
        let (xt, yt) = blobs(classes, 40, dim, 1);
        let (xv, yv) = blobs(classes, 10, dim, 2);
        let config = ProbeConfig { epochs: 20, batch: 32, ..Default::default() };
        let train = Labelled { features: &xt, labels: &yt };
        let val = Labelled { features: &xv, labels: &yv };
        let a = train_probe(train, val, dim, classes, &config, 3);
        assert!(a.best.val_top1 > 0.95, "{:?}", a.sweep);
        assert_eq!(a.sweep.len(), config.lrs.len() * config.weight_decays.len());
        assert!(a.sweep.iter().all(|p| p.val_top1.is_finite()));
        assert!(a.sweep.iter().all(|p| p.val_top1 <= a.best.val_top1));
        let b = train_probe(train, val, dim, classes, &config, 3);
        assert_eq!(a.sweep, b.sweep);
        assert_eq!(a.probe.scores(&xv), b.probe.scores(&xv));
        // Shuffled labels cannot be predicted on held-out data.
        let noise: Vec<usize> = (0..yt.len()).map(|i| (i * 7 + 3) % classes).collect();
        let r = train_probe(Labelled { features: &xt, labels: &noise }, val, dim, classes, &config, 3);
        let held_out = Metrics::from_scores(&r.probe.scores(&xv), classes, &yv).top1;
        assert!(held_out < 0.6, "{held_out}");
        config.validate().unwrap();
        assert!(ProbeConfig { lrs: vec![], ..Default::default() }.validate().is_err());
    }
}
