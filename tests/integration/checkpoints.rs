//! Checkpoint loading reports, refusal of partial loads, save/export round trips.

use burn::tensor::Tensor;
use explora::checkpoint::{
    CheckpointError, Layout, RawTensor, load_backbone, read_safetensors, save_backbone, save_backbone_hf, write_safetensors,
};
use explora::model::{ForwardOptions, Vit, VitConfig};

use crate::common::*;

fn hf_fixture() -> std::path::PathBuf {
    fixtures().join("dinov2_hf_tiny")
}

fn outputs(model: &Vit) -> Vec<f32> {
    let inputs = read(fixtures().join("inputs.safetensors"));
    let x: Tensor<4> = tensor(&inputs["x32"], &model.device());
    let out = model.forward(x, ForwardOptions::default());
    let (_, mut cls) = values(out.cls);
    cls.extend(values(out.patches).1);
    cls
}

#[test]
fn a_mismatched_checkpoint_names_missing_unexpected_and_misshaped_keys() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(hf_fixture().join("config.json"), dir.path().join("config.json")).unwrap();
    let (mut map, meta) = read_safetensors(&hf_fixture().join("model.safetensors")).unwrap();
    map.remove("encoder.layer.1.layer_scale2.lambda1").unwrap();
    map.insert("encoder.layer.0.extra.weight".into(), RawTensor::new(vec![2], vec![0.0, 1.0]));
    let norm = map.get_mut("layernorm.weight").unwrap();
    *norm = RawTensor::new(vec![32], vec![1.0; 32]);
    let path = dir.path().join("model.safetensors");
    write_safetensors(&path, &map, &meta).unwrap();
    let err = load_backbone(&path, &device()).unwrap_err();
    let CheckpointError::Mismatch(report) = &err else { panic!("expected a mismatch, got {err}") };
    assert_eq!(report.missing, vec!["blocks.1.ls2.gamma".to_string()]);
    assert_eq!(report.unexpected, vec!["encoder.layer.0.extra.weight".to_string()]);
    assert_eq!(report.mismatched, vec![("norm.gamma".to_string(), vec![64], vec![32])]);
    let message = err.to_string();
    for needle in ["MISSING", "blocks.1.ls2.gamma", "UNEXPECTED", "encoder.layer.0.extra.weight", "WRONG SHAPE", "refusing"] {
        assert!(message.contains(needle), "message lacks {needle}: {message}");
    }
}

#[test]
fn a_non_checkpoint_and_a_missing_file_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = load_backbone(&dir.path().join("nope.pth"), &device()).unwrap_err();
    assert!(missing.to_string().contains("does not exist"), "{missing}");
    let other = dir.path().join("resnet.safetensors");
    let mut map = explora::checkpoint::TensorMap::new();
    map.insert("conv1.weight".into(), RawTensor::new(vec![1], vec![0.0]));
    write_safetensors(&other, &map, &Default::default()).unwrap();
    let err = load_backbone(&other, &device()).unwrap_err();
    assert!(err.to_string().contains("unknown checkpoint layout") && err.to_string().contains("conv1.weight"), "{err}");
}

#[test]
fn pretrained_weights_differ_from_random_init_and_survive_save_and_export() {
    let device = device();
    let (model, report) = load_backbone(&hf_fixture().join("model.safetensors"), &device).unwrap();
    assert!(report.is_complete());
    assert_eq!(report.initialised, Vec::<String>::new(), "the HF fixture carries a mask token");
    let reference = outputs(&model);
    let random = outputs(&report.config.init(&device));
    assert!(max_abs_diff(&reference, &random) > 0.1, "loaded output must not equal random init");

    let dir = tempfile::tempdir().unwrap();
    let own = dir.path().join("backbone.safetensors");
    save_backbone(&model, &own).unwrap();
    let (reloaded, report) = load_backbone(&own, &device).unwrap();
    assert_eq!(report.layout, Layout::Explora);
    assert_eq!(report.config, *model.config());
    assert_eq!(max_abs_diff(&outputs(&reloaded), &reference), 0.0);

    let hf = dir.path().join("hf").join("model.safetensors");
    save_backbone_hf(&model, &hf).unwrap();
    let (exported, report) = load_backbone(&hf, &device).unwrap();
    assert_eq!(report.layout, Layout::HfDinov2);
    assert_eq!(max_abs_diff(&outputs(&exported), &reference), 0.0);
    // The export has exactly the original file's keys.
    let original: Vec<String> = read(hf_fixture().join("model.safetensors")).into_keys().collect();
    let written: Vec<String> = read(hf).into_keys().collect();
    assert_eq!(written, original);
}

#[test]
fn explicit_architecture_that_disagrees_is_refused() {
    let err =
        explora::checkpoint::load_backbone_with(&hf_fixture().join("model.safetensors"), Some(VitConfig::tiny()), &device()).unwrap_err();
    // tiny has 4 blocks and an 8×8 grid; the fixture has 2 blocks and a 4×4 grid.
    let msg = err.to_string();
    assert!(msg.contains("MISSING") && msg.contains("blocks.2.") && msg.contains("pos_embed"), "{msg}");
    let CheckpointError::Mismatch(report) = err else { unreachable!() };
    assert_eq!(report.missing.iter().filter(|k| k.starts_with("blocks.3.")).count(), 14);
}
