//! Numerical parity with independent PyTorch references (transformers' Dinov2Model and
//! Dinov2WithRegistersModel, timm's VisionTransformer for the Meta and MAE layouts). The
//! checkpoints and expected outputs are made by tests/fixtures/make_fixtures.py (see its
//! README for versions). Tolerance 1e-4 max-abs: f32 on both sides, differences come only from
//! summation order in matmuls and reductions.

use burn::tensor::Tensor;
use explora::checkpoint::{Layout, load_backbone, load_backbone_with};
use explora::model::{Family, ForwardOptions, VitConfig};

use crate::common::*;

const TOL: f32 = 1e-4;

fn tiny(family: Family) -> VitConfig {
    VitConfig {
        name: "fixture".into(),
        family,
        embed_dim: 64,
        depth: 2,
        num_heads: 4,
        patch_size: 8,
        pos_grid: 4,
        mlp_ratio: 4.0,
        swiglu: false,
        layer_scale: (family == Family::Dinov2).then_some(1e-5),
        num_registers: 0,
        mask_token: family == Family::Dinov2,
        norm_eps: 1e-6,
        interpolate_offset: if family == Family::Dinov2 { 0.1 } else { 0.0 },
        interpolate_antialias: false,
        image_size: 32,
    }
}

fn check_hf(dir: &str, inputs: &[&str], registers: bool) {
    let device = device();
    let path = fixtures().join(dir).join("model.safetensors");
    let (model, report) = load_backbone(&path, &device).unwrap();
    assert_eq!(report.layout, Layout::HfDinov2);
    assert_eq!(report.config.num_heads, 4, "heads come from config.json");
    let inputs_map = read(fixtures().join("inputs.safetensors"));
    let expected = read(fixtures().join(dir).join("expected.safetensors"));
    for name in inputs {
        let x: Tensor<4> = tensor(&inputs_map[*name], &device);
        let out = model.forward(x, ForwardOptions::default());
        assert_close(out.cls, &expected[&format!("{name}.cls")], TOL, &format!("{dir} {name} cls"));
        assert_close(out.patches, &expected[&format!("{name}.patches")], TOL, &format!("{dir} {name} patches"));
        if registers {
            let regs = out.registers.expect("registers");
            assert_close(regs, &expected[&format!("{name}.registers")], TOL, &format!("{dir} {name} registers"));
        }
    }
}

#[test]
fn hf_dinov2_matches_transformers_at_native_interpolated_and_non_square_sizes() {
    check_hf("dinov2_hf_tiny", &["x32", "x48", "x32x48"], false);
}

#[test]
fn hf_dinov2_attention_probabilities_and_mask_token_match() {
    let device = device();
    let dir = fixtures().join("dinov2_hf_tiny");
    let (model, _) = load_backbone(&dir.join("model.safetensors"), &device).unwrap();
    let inputs = read(fixtures().join("inputs.safetensors"));
    let expected = read(dir.join("expected.safetensors"));
    let x: Tensor<4> = tensor(&inputs["x32"], &device);
    let out = model.forward(x.clone(), ForwardOptions { mask: None, attention_layers: vec![1] });
    assert_eq!(out.attentions.len(), 1);
    assert_close(out.attentions[0].1.clone(), &expected["x32.attn1"], TOL, "attention layer 1");
    let masked = model.forward(x, ForwardOptions { mask: Some(mask(&inputs["mask32"], &device)), attention_layers: vec![] });
    assert_close(masked.cls, &expected["x32.masked.cls"], TOL, "masked cls");
    assert_close(masked.patches, &expected["x32.masked.patches"], TOL, "masked patches");
}

#[test]
fn hf_dinov2_swiglu_matches_transformers() {
    check_hf("dinov2_hf_swiglu_tiny", &["x32", "x48"], false);
}

#[test]
fn hf_dinov2_with_registers_matches_transformers() {
    check_hf("dinov2_hf_reg_tiny", &["x32", "x48"], true);
}

#[test]
fn meta_layout_pth_matches_timm() {
    let device = device();
    let path = fixtures().join("dinov2_meta_tiny.pth");
    let (model, report) = load_backbone_with(&path, Some(tiny(Family::Dinov2)), &device).unwrap();
    assert_eq!(report.layout, Layout::MetaDinov2);
    assert!(report.initialised.is_empty(), "the Meta file carries its mask token");
    let inputs = read(fixtures().join("inputs.safetensors"));
    let expected = read(fixtures().join("dinov2_meta_tiny.expected.safetensors"));
    let out = model.forward(tensor(&inputs["x32"], &device), ForwardOptions::default());
    assert_close(out.cls, &expected["x32.cls"], TOL, "meta cls");
    assert_close(out.patches, &expected["x32.patches"], TOL, "meta patches");
}

#[test]
fn mae_layout_pth_matches_timm_and_ignores_the_decoder() {
    let device = device();
    let path = fixtures().join("mae_tiny.pth");
    let (model, report) = load_backbone_with(&path, Some(tiny(Family::Mae)), &device).unwrap();
    assert_eq!(report.layout, Layout::Mae);
    assert!(report.ignored.iter().any(|k| k.starts_with("decoder_")), "{:?}", report.ignored);
    assert!(report.ignored.contains(&"mask_token".to_string()), "MAE's mask token belongs to the decoder");
    let inputs = read(fixtures().join("inputs.safetensors"));
    let expected = read(fixtures().join("mae_tiny.expected.safetensors"));
    let out = model.forward(tensor(&inputs["x32"], &device), ForwardOptions::default());
    assert_close(out.cls, &expected["x32.cls"], TOL, "mae cls");
    assert_close(out.patches, &expected["x32.patches"], TOL, "mae patches");
}
