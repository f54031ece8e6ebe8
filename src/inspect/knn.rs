//! The weighted k-NN vote, as DINO evaluates frozen features: cosine similarity to the
//! reference features, the `k` nearest vote with weight `exp(similarity / T)`, and the summed
//! votes rank the classes. One vote for both uses: evaluation (queries against a training
//! split) and the pre-training monitor (leave-one-out over a small labelled set).

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

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
pub fn knn_scores(train: &[f32], train_labels: &[usize], query: &[f32], dim: usize, classes: usize, config: KnnConfig) -> Vec<f32> {
    let train = l2_rows(train, dim);
    let query = l2_rows(query, dim);
    let k = config.k.clamp(1, train_labels.len().max(1));
    query
        .par_chunks(dim)
        .flat_map_iter(|q| {
            let sims = train.chunks(dim).zip(train_labels).map(|(t, &label)| (q.iter().zip(t).map(|(a, b)| a * b).sum::<f32>(), label));
            vote(sims.collect(), k, classes, config.temperature)
        })
        .collect()
}

/// Leave-one-out class scores (`[n, classes]`): each row votes among the other rows.
pub fn leave_one_out_scores(features: &[f32], labels: &[usize], dim: usize, classes: usize, config: KnnConfig) -> Vec<f32> {
    let normed = l2_rows(features, dim);
    let k = config.k.clamp(1, labels.len().saturating_sub(1).max(1));
    (0..labels.len())
        .into_par_iter()
        .flat_map_iter(|i| {
            let q = &normed[i * dim..(i + 1) * dim];
            let sims = normed
                .chunks(dim)
                .zip(labels)
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, (t, &label))| (q.iter().zip(t).map(|(a, b)| a * b).sum::<f32>(), label));
            vote(sims.collect(), k, classes, config.temperature)
        })
        .collect()
}

/// The `k` most similar `(similarity, label)` pairs vote with weight `exp(similarity / T)`.
fn vote(mut sims: Vec<(f32, usize)>, k: usize, classes: usize, temperature: f64) -> Vec<f32> {
    if sims.len() > k {
        sims.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
        sims.truncate(k);
    }
    let mut votes = vec![0f32; classes];
    for (sim, label) in sims {
        votes[label] += (sim as f64 / temperature).exp() as f32;
    }
    votes
}

/// Top-1 accuracy of per-row class scores (`[n, classes]`) against `labels`.
pub fn top1(scores: &[f32], labels: &[usize], classes: usize) -> f64 {
    if labels.is_empty() {
        return 0.0;
    }
    let correct = scores
        .chunks(classes.max(1))
        .zip(labels)
        .filter(|&(row, &label)| row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(c, _)| c) == Some(label))
        .count();
    correct as f64 / labels.len() as f64
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
        let scores = knn_scores(&train, &labels, &query, 3, 3, KnnConfig { k: 5, temperature: 0.07 });
        assert_eq!(top1(&scores, &[0, 2], 3), 1.0);
        // k larger than the training set uses all of it; the near class still wins on weight.
        let scores = knn_scores(&train, &labels, &query[..3], 3, 3, KnnConfig { k: 100, temperature: 0.07 });
        assert!(scores[0] > scores[1] && scores[0] > scores[2], "{scores:?}");
        // With one neighbour the votes of other classes are zero.
        let scores = knn_scores(&train, &labels, &query[..3], 3, 3, KnnConfig { k: 1, temperature: 0.07 });
        assert!(scores[0] > 0.0 && scores[1] == 0.0 && scores[2] == 0.0);
    }

    #[test]
    fn leave_one_out_separates_clusters_and_fails_on_noise_labels() {
        let config = KnnConfig { k: 3, temperature: 0.07 };
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
        assert_eq!(top1(&leave_one_out_scores(&feats, &labels, 3, 2, config), &labels, 2), 1.0);
        // Alternating labels along one direction cannot be predicted from the nearest other row.
        let line: Vec<f32> = (0..20).flat_map(|i| [1.0, i as f32 * 0.05, 0.0]).collect();
        let alternating: Vec<usize> = (0..20).map(|i| i % 2).collect();
        let one = KnnConfig { k: 1, ..config };
        assert!(top1(&leave_one_out_scores(&line, &alternating, 3, 2, one), &alternating, 2) < 0.2);
        // A row never votes for itself: a lone class member is always missed.
        let lone = [1.0, 0.0, 0.0, 0.9, 0.1, 0.0, 0.0, 1.0, 0.0];
        let scores = leave_one_out_scores(&lone, &[0, 1, 1], 3, 2, KnnConfig { k: 1, temperature: 0.07 });
        assert_eq!(scores[0], 0.0);
    }
}
