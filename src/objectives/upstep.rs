//! The UpStep objective (Jha, Tuytelaars, Asano, arXiv 2502.21313) as explora interprets it:
//! only the paper's abstract is public, so the pieces below are one reading of it, not a
//! reproduction. Fixed cluster centres (spherical k-means of the frozen base model's CLS
//! embeddings, computed once per run), a swapped-prediction loss between two views (the
//! Sinkhorn-Knopp codes of the offline EMA model on one view are predicted by the online
//! model on the other) and a centroid-variance regulariser ("CVR") that keeps the mean
//! direction of the online embeddings near the base model's.

use burn::tensor::Tensor;
use burn::tensor::activation::log_softmax;

use super::head::l2_normalize;
use super::loss::sinkhorn_knopp;

/// A deterministic generator (SplitMix64) for k-means++ seeding and sampling, so a run's
/// centres are a function of its seed alone.
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x5550_5354_4550_0000)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `k` distinct indices of `0..n` (all of them, in order, when `k ≥ n`), sorted.
    pub fn sample(&mut self, n: usize, k: usize) -> Vec<usize> {
        if k >= n {
            return (0..n).collect();
        }
        let mut all: Vec<usize> = (0..n).collect();
        for i in 0..k {
            let j = i + (self.next_u64() % (n - i) as u64) as usize;
            all.swap(i, j);
        }
        let mut picked = all[..k].to_vec();
        picked.sort_unstable();
        picked
    }
}

fn normalise(row: &mut [f32]) {
    let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    row.iter_mut().for_each(|v| *v /= norm);
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Spherical (cosine) k-means of the `n × d` row-major `points`: rows are L2-normalised,
/// centres seeded by k-means++ on the cosine distance `1 − cos` (seeded by `seed`), then
/// `iterations` rounds of assignment to the most similar centre and re-normalised means; a
/// centre that loses all its points keeps its place. Returns `k × d` unit rows. Runs on the
/// host (k-means of a few thousand embeddings is a few seconds at most).
pub fn spherical_kmeans(points: &[f32], d: usize, k: usize, iterations: usize, seed: u64) -> Vec<f32> {
    assert!(d > 0 && points.len().is_multiple_of(d), "points must be n × d");
    let n = points.len() / d;
    assert!(k >= 1 && k <= n, "k-means needs 1 ≤ k ≤ n (k = {k}, n = {n})");
    let mut x = points.to_vec();
    x.chunks_mut(d).for_each(normalise);
    let row = |i: usize| &x[i * d..(i + 1) * d];
    let mut rng = SplitMix::new(seed);
    // k-means++: the first centre uniformly, each next one with probability ∝ distance².
    let mut centres = Vec::with_capacity(k * d);
    let first = (rng.next_u64() % n as u64) as usize;
    centres.extend_from_slice(row(first));
    let mut nearest: Vec<f32> = (0..n).map(|i| (1.0 - dot(row(i), row(first))).max(0.0)).collect();
    for _ in 1..k {
        let weights: Vec<f64> = nearest.iter().map(|&dist| f64::from(dist) * f64::from(dist)).collect();
        let total: f64 = weights.iter().sum();
        let pick = if total <= 0.0 {
            (rng.next_u64() % n as u64) as usize
        } else {
            let mut target = rng.unit() * total;
            let mut chosen = n - 1;
            for (i, w) in weights.iter().enumerate() {
                if target < *w {
                    chosen = i;
                    break;
                }
                target -= w;
            }
            chosen
        };
        let c = row(pick).to_vec();
        for (i, best) in nearest.iter_mut().enumerate() {
            *best = best.min((1.0 - dot(row(i), &c)).max(0.0));
        }
        centres.extend_from_slice(&c);
    }
    for _ in 0..iterations {
        let mut sums = vec![0f32; k * d];
        let mut counts = vec![0usize; k];
        for i in 0..n {
            let p = row(i);
            let (best, _) = centres
                .chunks(d)
                .enumerate()
                .map(|(j, c)| (j, dot(p, c)))
                .fold((0, f32::NEG_INFINITY), |acc, (j, s)| if s > acc.1 { (j, s) } else { acc });
            counts[best] += 1;
            sums[best * d..(best + 1) * d].iter_mut().zip(p).for_each(|(s, v)| *s += v);
        }
        for j in 0..k {
            if counts[j] > 0 {
                let mut mean = sums[j * d..(j + 1) * d].to_vec();
                normalise(&mut mean);
                centres[j * d..(j + 1) * d].copy_from_slice(&mean);
            }
        }
    }
    centres
}

/// The offline model's codes for one view: Sinkhorn-Knopp over the batch of the cosine scores
/// of its CLS embeddings `[B, D]` against the unit `centres` `[K, D]` (rows sum to 1, centres
/// used equally across the batch).
pub fn codes(offline_cls: Tensor<2>, centres: Tensor<2>, temperature: f64, iterations: usize) -> Tensor<2> {
    let scores = l2_normalize(offline_cls, 1).matmul(centres.transpose());
    sinkhorn_knopp(scores, temperature, iterations, None)
}

/// The online model's log-predictions for one view: `log softmax(cos(cls, centres) / t)`.
pub fn log_predictions(online_cls: Tensor<2>, centres: Tensor<2>, temperature: f64) -> Tensor<2> {
    log_softmax(l2_normalize(online_cls, 1).matmul(centres.transpose()).div_scalar(temperature), 1)
}

/// Swapped prediction: `−½ Σ_k (q₁·log p₂ + q₂·log p₁)`, mean over the batch. `[1]`.
pub fn swap_loss(q1: Tensor<2>, q2: Tensor<2>, log_p1: Tensor<2>, log_p2: Tensor<2>) -> Tensor<1> {
    let [b, _] = q1.dims();
    ((q1 * log_p2).sum() + (q2 * log_p1).sum()).div_scalar(-2.0 * b as f64)
}

/// The centre of the embedding cloud: the mean of the L2-normalised rows of `cls` `[N, D]`,
/// as `[1, D]` (its norm is 1 when every embedding points the same way, near 0 when they
/// spread evenly).
pub fn mean_direction(cls: Tensor<2>) -> Tensor<2> {
    l2_normalize(cls, 1).mean_dim(0)
}

/// CVR: `‖c − c_base‖²` between two mean directions `[1, D]`. `[1]`.
pub fn centre_drift(c: Tensor<2>, c_base: Tensor<2>) -> Tensor<1> {
    (c - c_base).powf_scalar(2.0).sum()
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, TensorData};

    use super::*;
    use crate::model::to_vec;

    #[test]
    fn spherical_kmeans_recovers_well_separated_blobs() {
        // Four directions in 8-D, 50 noisy points around each, shuffled.
        let d = 8;
        let truth: Vec<Vec<f32>> = (0..4).map(|j| (0..d).map(|i| if i == 2 * j { 1.0 } else { 0.0 }).collect()).collect();
        let mut rng = SplitMix::new(7);
        let mut points = Vec::new();
        let mut labels = Vec::new();
        for i in 0..200 {
            let j = (i * 7) % 4;
            labels.push(j);
            for v in &truth[j] {
                points.push(v * 3.0 + (rng.unit() as f32 - 0.5) * 0.6);
            }
        }
        let centres = spherical_kmeans(&points, d, 4, 20, 3);
        assert_eq!(centres.len(), 4 * d);
        // Every true direction has a centre within cosine 0.95, each centre is a unit vector.
        for t in &truth {
            let best = centres.chunks(d).map(|c| dot(c, t)).fold(f32::NEG_INFINITY, f32::max);
            assert!(best > 0.95, "no centre near {t:?}: {centres:?}");
        }
        for c in centres.chunks(d) {
            assert!((dot(c, c) - 1.0).abs() < 1e-4);
        }
        // Points of one blob share a centre, different blobs get different ones.
        let assign = |p: &[f32]| {
            centres.chunks(d).enumerate().map(|(j, c)| (j, dot(p, c))).fold((0, f32::NEG_INFINITY), |a, b| if b.1 > a.1 { b } else { a }).0
        };
        let mut map = [usize::MAX; 4];
        for (p, &l) in points.chunks(d).zip(&labels) {
            let a = assign(p);
            if map[l] == usize::MAX {
                map[l] = a;
            }
            assert_eq!(map[l], a, "blob {l} split");
        }
        let mut seen = map.to_vec();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 4, "{map:?}");
        // Seeded: the same seed gives the same centres.
        assert_eq!(centres, spherical_kmeans(&points, d, 4, 20, 3));
    }

    #[test]
    fn the_swap_loss_is_low_when_views_agree_and_the_drift_is_zero_at_the_base() {
        let device = Device::flex();
        let centres = Tensor::<2>::from_data(TensorData::new(vec![1.0f32, 0.0, 0.0, 1.0], [2, 2]), &device);
        let a = Tensor::<2>::from_data(TensorData::new(vec![1.0f32, 0.0, 0.0, 1.0], [2, 2]), &device);
        let b = Tensor::<2>::from_data(TensorData::new(vec![0.0f32, 1.0, 1.0, 0.0], [2, 2]), &device);
        let q = codes(a.clone(), centres.clone(), 0.05, 3);
        let agree = swap_loss(
            q.clone(),
            q.clone(),
            log_predictions(a.clone(), centres.clone(), 0.1),
            log_predictions(a.clone(), centres.clone(), 0.1),
        );
        let disagree = swap_loss(q.clone(), q, log_predictions(b.clone(), centres.clone(), 0.1), log_predictions(b, centres, 0.1));
        assert!(to_vec(agree)[0] < 0.01 && to_vec(disagree)[0] > 5.0);
        assert_eq!(to_vec(centre_drift(mean_direction(a.clone()), mean_direction(a)))[0], 0.0);
    }
}
