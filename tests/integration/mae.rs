//! ExPLoRA pre-training with the MAE objective on tiny configs: the loss falls and the run
//! writes its backbone, adapter and reconstructions; a resumed run ends as the uninterrupted
//! one; the decoder is read from a checkpoint that has one and started fresh otherwise; bad
//! settings are named by field.

use std::path::{Path, PathBuf};

use explora::checkpoint::{Metadata, canonical_from_model, load_backbone, mae_decoder_tensors, read_safetensors, write_safetensors};
use explora::model::{Family, VitConfig};
use explora::objectives::mae::DecoderConfig;
use explora::train::state::checkpoint_path;
use explora::train::{Objective, PretrainConfig, PretrainJob};

use crate::common::*;
use crate::pretrain::{metrics, run_logged, run_quietly};

/// The small run with the MAE objective on the tiny ViT with random weights and a small decoder.
fn mae_config(steps: u64) -> PretrainConfig {
    let mut c = small_config(steps);
    c.objective = Objective::Mae;
    c.model.weights = None;
    c.model.arch = Some("tiny".into());
    c.mae.decoder_width = 32;
    c.mae.decoder_depth = 1;
    c.mae.decoder_heads = 2;
    c.optim.reference_batch = Some(8);
    c
}

fn losses(run: &Path) -> Vec<f64> {
    metrics(run).iter().filter_map(|m| m.get("loss").and_then(|l| l.as_f64())).collect()
}

#[test]
fn a_tiny_mae_run_learns_and_writes_backbone_adapter_and_reconstructions() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let (result, log) = run_logged(PretrainJob { config: mae_config(40), out: out.clone(), resume: false });
    let summary = result.unwrap();
    assert_eq!(summary.steps_done, 40);
    assert!(log.iter().any(|l| l.contains("no MAE decoder in") && l.contains("a fresh decoder (width 32, depth 1")), "{log:#?}");
    assert!(log.iter().any(|l| l.contains("mae objective") && l.contains("MAE decoder")), "{log:#?}");

    let lines = metrics(&out);
    for key in ["loss", "lr", "grad_norm"] {
        assert!(lines.iter().all(|m| m[key].as_f64().is_some_and(f64::is_finite)), "{key} missing or not finite: {lines:?}");
    }
    assert!(lines.iter().all(|m| m.get("dino").is_none() && m.get("teacher_temp").is_none()), "DINOv2 fields in an MAE run");
    let raw = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(raw.lines().all(|l| l.contains("img_per_s")), "{raw}");
    let loss = losses(&out);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (first, last) = (mean(&loss[..5]), mean(&loss[loss.len() - 5..]));
    eprintln!("MAE, tiny ViT + decoder 32×1, 40 steps of 8: loss {first:.3} → {last:.3}");
    assert!(last < 0.85 * first, "the MAE loss did not fall: {first:.3} → {last:.3} ({loss:?})");

    // The adapted encoder (LoRA merged) loads as a backbone and differs from the base.
    let (adapted, _) = load_backbone(&out.join("backbone.safetensors"), &device()).unwrap();
    let (base, _) = load_backbone(&out.join("base.safetensors"), &device()).unwrap();
    assert_eq!(adapted.config().depth, 4);
    let key = "blocks.3.attn.qkv.weight";
    let (a, b) = (read(out.join("backbone.safetensors")), read(out.join("base.safetensors")));
    assert!(max_abs_diff(&a[key].data, &b[key].data) > 0.0, "the unfrozen last block did not train");
    let key = "blocks.0.attn.qkv.weight";
    assert!(max_abs_diff(&a[key].data, &b[key].data) > 0.0, "LoRA was not merged into block 0");
    assert_eq!(a["patch_embed.proj.weight"].data, b["patch_embed.proj.weight"].data, "the patch embedding must stay frozen");
    drop((adapted, base));
    let (adapter, meta) = read_safetensors(&out.join("adapter.safetensors")).unwrap();
    assert!(adapter.keys().any(|k| k.contains("lora_q")), "{:?}", adapter.keys().collect::<Vec<_>>());
    assert!(meta.contains_key("plan"));

    // One row per held-out tile: input | masked | reconstruction, 32 px each with 2 px gaps.
    let sheet = image::open(out.join("reconstructions.png")).unwrap().to_rgb8();
    assert_eq!(sheet.dimensions(), (2 + 3 * 34, 2 + 6 * 34));
    // The masked input hides 12 of 16 patches in grey; the reconstruction fills them.
    let grey =
        |x0: u32| (0..32).flat_map(|y| (0..32).map(move |x| (x, y))).filter(|&(x, y)| sheet.get_pixel(x0 + x, 2 + y).0 == [128; 3]).count();
    assert_eq!(grey(2 + 34), 12 * 64);
    assert!(grey(2 + 68) < 64, "the reconstruction left the masked patches grey");
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("objective: mae") && report.contains("MAE decoder"), "{report}");
    assert!(report.contains("one 32 px view, 75% of its patches masked"), "{report}");
}

#[test]
fn an_mae_run_resumed_from_a_mid_run_checkpoint_ends_as_the_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let (a, c) = (dir.path().join("a"), dir.path().join("c"));
    let mut config = mae_config(6);
    config.run.checkpoint_every = 2;
    config.run.keep_checkpoints = 5;
    let whole = run_quietly(config, &a, false).unwrap();
    std::fs::create_dir_all(c.join("checkpoints")).unwrap();
    for file in ["config.toml", "metrics.jsonl", "checkpoints/step-0000002.safetensors"] {
        std::fs::copy(a.join(file), c.join(file)).unwrap();
    }
    let resumed = PretrainJob::resume(&c).unwrap();
    assert_eq!(resumed.config.objective, Objective::Mae);
    let summary = run_quietly(resumed.config, &c, true).unwrap();
    assert_eq!(summary.steps_done, 6);
    let (la, lc) = (losses(&a), losses(&c));
    assert_eq!(la.len(), 6);
    assert_eq!(la.len(), lc.len());
    for (step, (x, y)) in la.iter().zip(&lc).enumerate() {
        assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "step {}: loss {x} vs {y}", step + 1);
    }
    let (fa, fc) = (whole.final_loss.unwrap(), summary.final_loss.unwrap());
    assert!((fa - fc).abs() <= 1e-4 * fa.abs().max(1.0), "final loss {fa} vs {fc}");
    let (wa, wc) = (read(a.join("backbone.safetensors")), read(c.join("backbone.safetensors")));
    for (key, t) in &wa {
        assert!(max_abs_diff(&t.data, &wc[key].data) < 1e-4, "{key} differs after resume");
    }
    // The checkpoint holds the encoder's and the decoder's trainable tensors and says MAE.
    let (tensors, meta) = read_safetensors(&checkpoint_path(&a, 4)).unwrap();
    assert_eq!(meta.get("objective").map(String::as_str), Some("mae"));
    assert!(tensors.contains_key("model.decoder.pred.weight") && tensors.contains_key("model.backbone.blocks.0.attn.lora_q.a"));
    assert!(tensors.contains_key("optim.m.decoder.pred.weight") && tensors.contains_key("optim.v.backbone.cls_token"));
    assert!(!tensors.keys().any(|k| k.starts_with("teacher.") || k.starts_with("center.")));
    // A DINOv2 run does not resume from it.
    let d = dir.path().join("d");
    std::fs::create_dir_all(d.join("checkpoints")).unwrap();
    std::fs::copy(checkpoint_path(&a, 4), checkpoint_path(&d, 4)).unwrap();
    let mut dino = small_config(6);
    dino.model.weights = Some(a.join("base.safetensors"));
    std::fs::write(d.join("config.toml"), dino.to_toml()).unwrap();
    let e = format!("{:#}", run_quietly(PretrainJob::resume(&d).unwrap().config, &d, true).unwrap_err());
    assert!(e.contains("objective mae") && e.contains("objective is dinov2"), "{e}");
}

/// A tiny MAE-family checkpoint (no LayerScale, no encoder mask token) under MAE's keys, with
/// a decoder of width 32 and 2 blocks when `decoder` is set, and the `config.json` that names
/// its head count (tiny widths are not published ones).
fn tiny_mae_checkpoint(dir: &Path, decoder: bool) -> (PathBuf, Option<DecoderConfig>) {
    let device = device();
    let vit = VitConfig { family: Family::Mae, layer_scale: None, mask_token: false, ..VitConfig::tiny() };
    let encoder = vit.init(&device);
    let mut tensors = canonical_from_model(&encoder).unwrap();
    let shape = decoder.then_some(DecoderConfig { width: 32, depth: 2, heads: 2 });
    if let Some(shape) = shape {
        tensors.extend(mae_decoder_tensors(&shape.init(64, 4, 8, &device)).unwrap());
    }
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("mae_tiny.safetensors");
    let mut meta = Metadata::new();
    meta.insert("format".into(), "pt".into());
    write_safetensors(&path, &tensors, &meta).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"num_attention_heads": 4}"#).unwrap();
    (path, shape)
}

#[test]
fn a_decoder_in_the_checkpoint_is_loaded_and_adapted_and_its_absence_is_said() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = tiny_mae_checkpoint(&dir.path().join("with"), true);
    let mut config = mae_config(2);
    config.model.arch = None;
    config.model.weights = Some(path.clone());
    let out = dir.path().join("run");
    let (result, log) = run_logged(PretrainJob { config: config.clone(), out: out.clone(), resume: false });
    result.unwrap();
    assert!(
        log.iter().any(|l| l.contains("loaded the MAE decoder of") && l.contains("width 32, 2 blocks") && l.contains("LoRA r=8")),
        "{log:#?}"
    );
    // Trainable: LoRA on Q,V of the decoder's blocks and its norms; the rest stays frozen.
    let (tensors, _) = read_safetensors(&checkpoint_path(&out, 2)).unwrap();
    let decoder: Vec<&String> = tensors.keys().filter(|k| k.starts_with("model.decoder.")).collect();
    for key in ["model.decoder.blocks.1.attn.lora_q.a", "model.decoder.blocks.0.attn.lora_v.b", "model.decoder.norm.gamma"] {
        assert!(tensors.contains_key(key), "{key} not trained: {decoder:?}");
    }
    for frozen in ["embed", "pred", "mask_token", "attn.qkv.weight", "mlp.fc1", "lora_k"] {
        assert!(!decoder.iter().any(|k| k.contains(frozen)), "{frozen} trained: {decoder:?}");
    }

    // A DINOv2-objective run on the MAE backbone is refused, naming the field.
    let mut dino = config.clone();
    dino.objective = Objective::Dinov2;
    let e = run_quietly(dino, &dir.path().join("dino"), false).unwrap_err().to_string();
    assert!(e.contains("`objective`") && e.contains("MAE backbone"), "{e}");

    // Without decoder keys: a fresh decoder, said so with the path.
    let (plain, _) = tiny_mae_checkpoint(&dir.path().join("without"), false);
    config.model.weights = Some(plain.clone());
    let (result, log) = run_logged(PretrainJob { config, out: dir.path().join("fresh"), resume: false });
    result.unwrap();
    let said = format!("no MAE decoder in {}: a fresh decoder (width 32, depth 1, 2 heads) trains from scratch", plain.display());
    assert!(log.iter().any(|l| l.contains(&said)), "{said} not in {log:#?}");
}

#[test]
fn mae_settings_are_checked_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    type Edit = fn(&mut PretrainConfig);
    let cases: [(Edit, &str); 3] = [
        (|c| c.mae.mask_ratio = 1.0, "`mae.mask_ratio`"),
        (
            |c| {
                c.mae.decoder_width = 36;
                c.mae.decoder_heads = 8;
            },
            "`mae.decoder_width`",
        ),
        (|c| c.mae.decoder_depth = 0, "`mae.decoder_depth`"),
    ];
    for (i, (edit, field)) in cases.into_iter().enumerate() {
        let mut config = mae_config(1);
        edit(&mut config);
        let e = run_quietly(config, &dir.path().join(i.to_string()), false).unwrap_err().to_string();
        assert!(e.contains(field), "{field} not named: {e}");
    }
    // Through the CLI: --objective sets the objective and with it MAE's optimizer defaults.
    use clap::Parser;
    let args = explora::cli::Cli::try_parse_from(["explora", "pretrain", "--objective", "mae", "--arch", "tiny"]).unwrap();
    let Some(explora::cli::Command::Pretrain(args)) = args.command else { panic!("not a pretrain command") };
    let config = explora::cli::pretrain_config(&args).unwrap();
    assert_eq!(config.objective, Objective::Mae);
    assert_eq!(config.betas(), [0.9, 0.95]);
    assert!(explora::cli::Cli::try_parse_from(["explora", "pretrain", "--objective", "simclr"]).is_err());
}

#[test]
fn the_decoder_of_an_mae_pth_loads_with_its_exact_values_and_trains_under_lora() {
    let device = device();
    let fixture = fixtures().join("mae_tiny.pth");
    // The fixture: MAE's {"model": state_dict} with a decoder of width 32, 1 block (4 heads),
    // after a width-64 encoder with 8-px patches on a 4×4 grid.
    let loaded = explora::checkpoint::load_mae_decoder(&fixture, 4, 64, 4, 8, &device).unwrap().expect("the fixture has a decoder");
    assert_eq!(loaded.config, DecoderConfig { width: 32, depth: 1, heads: 4 });
    let (raw, _) = explora::checkpoint::read_any(&fixture).unwrap();
    let raw = explora::checkpoint::strip_wrappers(raw);
    let as_burn = |key: &str| raw[key].transposed().data;
    let values = |t: burn::tensor::Tensor<2>| explora::model::to_vec(t);
    assert_eq!(values(loaded.decoder.pred.weight.val()), as_burn("decoder_pred.weight"));
    assert_eq!(values(loaded.decoder.embed.weight.val()), as_burn("decoder_embed.weight"));
    assert_eq!(values(loaded.decoder.blocks[0].attn.qkv.weight.val()), as_burn("decoder_blocks.0.attn.qkv.weight"));
    assert_eq!(explora::model::to_vec(loaded.decoder.mask_token.val()), raw["mask_token"].data);
    assert_eq!(explora::model::to_vec(loaded.decoder.norm.gamma.val()), raw["decoder_norm.weight"].data);

    // A run from the .pth (its head count beside it, as for any unpublished width) adapts it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(&fixture, dir.path().join("mae_tiny.pth")).unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"num_attention_heads": 4}"#).unwrap();
    let mut config = mae_config(3);
    config.model.arch = None;
    config.model.weights = Some(dir.path().join("mae_tiny.pth"));
    config.mae.decoder_heads = 4;
    config.mae.decoder_lora_rank = 4;
    let out = dir.path().join("run");
    let (result, log) = run_logged(PretrainJob { config, out: out.clone(), resume: false });
    let summary = result.unwrap();
    assert!(summary.final_loss.is_some_and(f64::is_finite));
    assert!(
        log.iter().any(|l| l.contains("loaded the MAE decoder") && l.contains("width 32, 1 blocks") && l.contains("LoRA r=4")),
        "{log:#?}"
    );
    assert!(out.join("reconstructions.png").exists());
}
