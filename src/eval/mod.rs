//! Evaluation on a backbone: feature extraction with a cache (`explora embed`), CLS-attention
//! maps (`explora attention`), k-NN and linear probing on frozen features, supervised
//! fine-tuning, classification metrics and figures, and the before/after comparison
//! (`explora pipeline`).

pub mod embed;
pub mod figure;
pub mod finetune;
pub mod linear;
pub mod metrics;

pub use metrics::Metrics;

/// k-NN metrics (top-1, top-5, per class) of `query` against `train`, with the vote of
/// [`crate::inspect::knn`].
pub fn knn_classify(
    train: &[f32],
    train_labels: &[usize],
    query: &[f32],
    query_labels: &[usize],
    dim: usize,
    classes: usize,
    config: crate::inspect::KnnConfig,
) -> Metrics {
    let scores = crate::inspect::knn_scores(train, train_labels, query, dim, classes, config);
    Metrics::from_scores(&scores, classes, query_labels)
}
