//! Weighted k-NN classification on frozen features, as DINO evaluates: cosine similarity to
//! the training features, the `k` nearest vote with weight `exp(similarity / T)`, and the
//! summed votes rank the classes (top-1 and top-5).

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::metrics::Metrics;

/// DINO's settings: k = 20, T = 0.07.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KnnConfig {
    pub k: usize,
    pub temperature: f64,
}

impl Default for KnnConfig {
    fn default() -> Self {
        Self { k: 20, temperature: 0.07 }
    }
}

/// Rows of `features` (`[n, dim]`) scaled to unit length.
pub fn l2_rows(features: &[f32], dim: usize) -> Vec<f32> {
    let mut out = features.to_vec();
    for row in out.chunks_mut(dim.max(1)) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|v| *v /= norm);
    }
    out
}

/// Class scores (`[n_query, classes]`, the summed vote weights) of each query.
pub fn knn_scores(
    train: &[f32],
    train_labels: &[usize],
    query: &[f32],
    dim: usize,
    classes: usize,
    config: KnnConfig,
) -> Vec<f32> {
    let train = l2_rows(train, dim);
    let query = l2_rows(query, dim);
    let k = config.k.clamp(1, train_labels.len().max(1));
    query
        .par_chunks(dim)
        .flat_map_iter(|q| {
            let mut sims: Vec<(f32, usize)> = train
                .chunks(dim)
                .zip(train_labels)
                .map(|(t, &label)| (q.iter().zip(t).map(|(a, b)| a * b).sum::<f32>(), label))
                .collect();
            if sims.len() > k {
                sims.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
                sims.truncate(k);
            }
            let mut votes = vec![0f32; classes];
            for (sim, label) in sims {
                votes[label] += (sim as f64 / config.temperature).exp() as f32;
            }
            votes
        })
        .collect()
}

/// k-NN metrics of `query` against `train`.
pub fn knn_classify(
    train: &[f32],
    train_labels: &[usize],
    query: &[f32],
    query_labels: &[usize],
    dim: usize,
    classes: usize,
    config: KnnConfig,
) -> Metrics {
    let scores = knn_scores(train, train_labels, query, dim, classes, config);
    Metrics::from_scores(&scores, classes, query_labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clusters_are_classified_and_the_vote_is_weighted() {
        // Three directions, five noisy training points each.
        let mut train = Vec::new();
        let mut labels = Vec::new();
        for c in 0..3 {
            for i in 0..5 {
                let mut v = [0.05 * i as f32; 3];
                v[c] = 1.0;
                train.extend(v);
                labels.push(c);
            }
        }
        let query = [0.9, 0.1, 0.0, 0.0, 0.2, 1.0];
        let m = knn_classify(&train, &labels, &query, &[0, 2], 3, 3, KnnConfig { k: 5, temperature: 0.07 });
        assert_eq!((m.top1, m.samples), (1.0, 2));
        // k larger than the training set uses all of it; the near class still wins on weight.
        let scores = knn_scores(&train, &labels, &query[..3], 3, 3, KnnConfig { k: 100, temperature: 0.07 });
        assert!(scores[0] > scores[1] && scores[0] > scores[2], "{scores:?}");
        // With one neighbour the votes of other classes are zero.
        let scores = knn_scores(&train, &labels, &query[..3], 3, 3, KnnConfig { k: 1, temperature: 0.07 });
        assert!(scores[0] > 0.0 && scores[1] == 0.0 && scores[2] == 0.0);
    }
}
