//! Properties of the ViT on tiny random configs (shapes, attention, masking, interpolation).

use burn::tensor::{Distribution, Tensor};
use explora::model::{ForwardOptions, VitConfig};

use crate::common::*;

fn random_images(n: usize, h: usize, w: usize) -> Tensor<4> {
    Tensor::random([n, 3, h, w], Distribution::Normal(0.0, 1.0), &device())
}

#[test]
fn shapes_attention_rows_and_registers() {
    let device = device();
    let config = VitConfig { num_registers: 2, ..VitConfig::tiny() };
    let model = config.init(&device);
    let out = model.forward(random_images(2, 64, 40), ForwardOptions { mask: None, attention_layers: vec![0, 3] });
    assert_eq!(out.grid, (8, 5));
    assert_eq!(out.cls.dims(), [2, 64]);
    assert_eq!(out.patches.dims(), [2, 40, 64]);
    assert_eq!(out.registers.unwrap().dims(), [2, 2, 64]);
    let layers: Vec<usize> = out.attentions.iter().map(|(l, _)| *l).collect();
    assert_eq!(layers, vec![0, 3]);
    let (dims, probs) = values(out.attentions[1].1.clone());
    assert_eq!(dims, vec![2, 4, 43, 43]);
    for row in probs.chunks(43) {
        let sum: f32 = row.iter().sum();
        assert!((sum - 1.0).abs() < 1e-4, "attention row sums to {sum}");
        assert!(row.iter().all(|p| *p >= 0.0));
    }
}

#[test]
fn position_embeddings_at_the_stored_grid_are_returned_unchanged_and_resampled_otherwise() {
    let device = device();
    let model = VitConfig::tiny().init(&device);
    let (_, stored) = values(model.pos_embed.val());
    let (_, same) = values(model.position_embeddings(8, 8));
    assert_eq!(stored, same);
    let (dims, bigger) = values(model.position_embeddings(12, 6));
    assert_eq!(dims, vec![1, 1 + 72, 64]);
    // CLS position is never resampled.
    assert_eq!(&bigger[..64], &stored[..64]);
}

#[test]
fn mask_token_replaces_masked_patches_only() {
    let device = device();
    let model = VitConfig::tiny().init(&device);
    let images = random_images(1, 64, 64);
    let plain = model.forward(images.clone(), ForwardOptions::default());
    let none_masked = Tensor::<2>::zeros([1, 64], &device).greater_elem(0.5);
    let unmasked = model.forward(images.clone(), ForwardOptions { mask: Some(none_masked), attention_layers: vec![] });
    let (_, a) = values(plain.cls.clone());
    let (_, b) = values(unmasked.cls);
    assert!(max_abs_diff(&a, &b) < 1e-6, "an all-false mask changes nothing");
    let half = Tensor::<2>::random([1, 64], Distribution::Uniform(0.0, 1.0), &device).greater_elem(0.5);
    let masked = model.forward(images, ForwardOptions { mask: Some(half), attention_layers: vec![] });
    let (_, c) = values(masked.cls);
    assert!(max_abs_diff(&a, &c) > 1e-4, "masking half the patches changes the CLS token");
}
