//! Classification metrics from per-sample class scores: top-1/top-5, per-class accuracy
//! (recall), macro-F1 and the confusion matrix.

use serde::Serialize;

/// What a classifier got right on one evaluation set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metrics {
    pub samples: usize,
    pub top1: f64,
    /// Top-5 accuracy (top-k with k = the number of classes when there are fewer than 5).
    pub top5: f64,
    pub macro_f1: f64,
    /// Recall of each class (NaN when the class has no sample).
    pub per_class: Vec<f64>,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<u64>>,
    /// Whether each sample's top-1 prediction was right, in the order scored (for paired
    /// comparisons of two classifiers on the same samples).
    #[serde(skip)]
    pub correct: Vec<bool>,
}

/// A paired bootstrap of the difference in accuracy `mean(b) − mean(a)` over the same
/// samples: the 2.5th and 97.5th percentiles of `resamples` resampled differences (seeded, so
/// a report is reproducible). `None` when the two do not cover the same samples.
pub fn paired_bootstrap(a: &[bool], b: &[bool], resamples: usize, seed: u64) -> Option<(f64, f64)> {
    use rand::rngs::Xoshiro256PlusPlus;
    use rand::{RngExt, SeedableRng};
    if a.len() != b.len() || a.is_empty() || resamples == 0 {
        return None;
    }
    let n = a.len();
    let diff: Vec<i32> = a.iter().zip(b).map(|(&x, &y)| i32::from(y) - i32::from(x)).collect();
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let mut deltas: Vec<f64> =
        (0..resamples).map(|_| (0..n).map(|_| diff[rng.random_range(0..n)]).sum::<i32>() as f64 / n as f64).collect();
    deltas.sort_by(f64::total_cmp);
    let at = |q: f64| deltas[((q * (resamples - 1) as f64).round() as usize).min(resamples - 1)];
    Some((at(0.025), at(0.975)))
}

impl Metrics {
    /// From `scores` (`[n, classes]` row-major; higher is more likely) and the true labels.
    pub fn from_scores(scores: &[f32], classes: usize, labels: &[usize]) -> Self {
        assert_eq!(scores.len(), labels.len() * classes, "scores must be [n, classes]");
        let mut confusion = vec![vec![0u64; classes]; classes];
        let (mut top1, mut top5) = (0usize, 0usize);
        let mut correct = Vec::with_capacity(labels.len());
        let k = classes.min(5);
        for (row, &label) in scores.chunks(classes.max(1)).zip(labels) {
            let mut order: Vec<usize> = (0..classes).collect();
            // Ties go to the lower class index (stable sort), so results are reproducible.
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            let predicted = order[0];
            confusion[label][predicted] += 1;
            top1 += usize::from(predicted == label);
            correct.push(predicted == label);
            top5 += usize::from(order[..k].contains(&label));
        }
        Self { correct, ..Self::from_confusion(confusion, top1, top5) }
    }

    fn from_confusion(confusion: Vec<Vec<u64>>, top1: usize, top5: usize) -> Self {
        let classes = confusion.len();
        let samples: u64 = confusion.iter().flatten().sum();
        let frac = |x: usize| if samples == 0 { 0.0 } else { x as f64 / samples as f64 };
        let per_class = (0..classes)
            .map(|c| {
                let support: u64 = confusion[c].iter().sum();
                if support == 0 { f64::NAN } else { confusion[c][c] as f64 / support as f64 }
            })
            .collect();
        // Macro-F1 over the classes that occur (in truth or prediction).
        let mut f1s = Vec::new();
        for c in 0..classes {
            let tp = confusion[c][c] as f64;
            let actual: u64 = confusion[c].iter().sum();
            let predicted: u64 = confusion.iter().map(|row| row[c]).sum();
            if actual + predicted == 0 {
                continue;
            }
            f1s.push(2.0 * tp / (actual + predicted) as f64);
        }
        let macro_f1 = if f1s.is_empty() { 0.0 } else { f1s.iter().sum::<f64>() / f1s.len() as f64 };
        Self { samples: samples as usize, top1: frac(top1), top5: frac(top5), macro_f1, per_class, confusion, correct: Vec::new() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // 3 classes; rows are one-hot-ish scores.
        let scores = [
            0.9, 0.1, 0.0, // true 0, pred 0
            0.2, 0.7, 0.1, // true 0, pred 1 (0 second)
            0.1, 0.8, 0.1, // true 1, pred 1
            0.1, 0.2, 0.7, // true 2, pred 2
        ];
        let m = Metrics::from_scores(&scores, 3, &[0, 0, 1, 2]);
        assert_eq!(m.samples, 4);
        assert_eq!(m.top1, 0.75);
        assert_eq!(m.top5, 1.0);
        assert_eq!(m.confusion, vec![vec![1, 1, 0], vec![0, 1, 0], vec![0, 0, 1]]);
        assert_eq!(m.per_class, vec![0.5, 1.0, 1.0]);
        // F1: class 0 = 2·1/(2+1), class 1 = 2·1/(1+2), class 2 = 1.
        let f1 = (2.0 / 3.0 + 2.0 / 3.0 + 1.0) / 3.0;
        assert!((m.macro_f1 - f1).abs() < 1e-12);
    }

    #[test]
    fn top5_counts_the_label_among_the_five_best() {
        let classes = 7;
        let mut scores = vec![0.0f32; classes];
        for (c, s) in scores.iter_mut().enumerate() {
            *s = c as f32; // class 6 best, class 2 fifth, class 1 sixth
        }
        let m = Metrics::from_scores(&scores, classes, &[2]);
        assert_eq!((m.top1, m.top5), (0.0, 1.0));
        let m = Metrics::from_scores(&scores, classes, &[1]);
        assert_eq!(m.top5, 0.0);
        assert!(m.per_class[0].is_nan() && m.per_class[1] == 0.0);
    }

    #[test]
    fn paired_bootstrap_brackets_the_observed_difference() {
        // b is right on 30 more of 100 samples: the interval is around +0.3 and excludes 0.
        let a: Vec<bool> = (0..100).map(|i| i < 50).collect();
        let b: Vec<bool> = (0..100).map(|i| i < 80).collect();
        let (lo, hi) = paired_bootstrap(&a, &b, 2000, 7).unwrap();
        assert!(lo > 0.15 && lo < 0.3 && hi > 0.3 && hi < 0.45, "({lo}, {hi})");
        // Identical classifiers: every resampled difference is 0.
        assert_eq!(paired_bootstrap(&a, &a, 500, 7), Some((0.0, 0.0)));
        // Different sample sets cannot be paired.
        assert_eq!(paired_bootstrap(&a, &b[..99], 500, 7), None);
        // from_scores records which samples were right.
        let m = Metrics::from_scores(&[0.9, 0.1, 0.2, 0.8, 0.6, 0.4], 2, &[0, 0, 0]);
        assert_eq!(m.correct, vec![true, false, true]);
    }
}
