//! ExPLoRA pre-training with the UpStep objective (explora's interpretation of the paper's
//! abstract) on tiny configs: a run finishes with finite values and writes its backbone,
//! adapter and centres; the gate skips exactly the iterations it should, counted by the
//! backward passes the step ran; the centroid regulariser holds the online embeddings near the
//! base model's; a resumed run ends as the uninterrupted one; bad settings name their field.

use std::path::Path;

use explora::checkpoint::read_safetensors;
use explora::train::config::Gate;
use explora::train::state::checkpoint_path;
use explora::train::{Objective, PretrainConfig, PretrainJob};

use crate::common::*;
use crate::pretrain::{metrics, run_logged, run_quietly};

/// The small run with the UpStep objective on the tiny ViT with random weights, 8 centres.
fn upstep_config(steps: u64, gate: Gate) -> PretrainConfig {
    let mut c = small_config(steps);
    c.objective = Objective::Upstep;
    c.model.weights = None;
    c.model.arch = Some("tiny".into());
    c.upstep.centres = 8;
    c.upstep.kmeans_iterations = 5;
    c.upstep.gate = gate;
    c.optim.reference_batch = Some(8);
    c
}

fn series(run: &Path, key: &str) -> Vec<f64> {
    metrics(run).iter().filter_map(|m| m.get(key).and_then(|v| v.as_f64())).collect()
}

#[test]
fn a_tiny_upstep_run_finishes_and_writes_backbone_adapter_and_centres() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut config = upstep_config(8, Gate::Alternate);
    config.optim.base_lr = Some(1e-2);
    let (result, log) = run_logged(PretrainJob { config, out: out.clone(), resume: false });
    let summary = result.unwrap();
    assert_eq!(summary.steps_done, 8);
    assert!(log.iter().any(|l| l.contains("spherical k-means") && l.contains("8 centres")), "{log:#?}");
    assert!(log.iter().any(|l| l.contains("upstep objective")), "{log:#?}");

    let lines = metrics(&out);
    assert_eq!(lines.len(), 8);
    for key in
        ["loss", "swap", "cvr", "centre_norm_online", "centre_norm_base", "skipped", "skipped_total", "lr", "grad_norm", "backward_total"]
    {
        assert!(lines.iter().all(|m| m[key].as_f64().is_some_and(f64::is_finite)), "{key} missing or not finite: {lines:?}");
    }
    let raw = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(raw.lines().all(|l| l.contains("img_per_s")), "{raw}");
    assert!(lines.iter().all(|m| m.get("dino").is_none()), "DINOv2 fields in an UpStep run");
    // `alternate`: iterations 2, 4, 6, 8 skip, and run no backward pass.
    assert_eq!(series(&out, "skipped"), [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]);
    assert_eq!(series(&out, "backward_passes"), [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]);
    assert_eq!(lines[7]["skipped_total"].as_f64(), Some(4.0));
    assert_eq!(lines[7]["backward_total"].as_f64(), Some(4.0));
    assert!(lines.iter().zip(series(&out, "skipped")).all(|(m, s)| s == 0.0 || m["grad_norm"].as_f64() == Some(0.0)));

    // Centres: 8 unit rows of the tiny ViT's width.
    let (centres, _) = read_safetensors(&out.join("centres.safetensors")).unwrap();
    let c = &centres["centres"];
    assert_eq!(c.shape, [8, 64]);
    for row in c.data.chunks(64) {
        assert!((row.iter().map(|v| v * v).sum::<f32>() - 1.0).abs() < 1e-4);
    }
    // The exported backbone (offline model, LoRA merged) moved off the base in Q, K, V only.
    let (a, b) = (read(out.join("backbone.safetensors")), read(out.join("base.safetensors")));
    let key = "blocks.0.attn.qkv.weight";
    assert!(max_abs_diff(&a[key].data, &b[key].data) > 0.0, "LoRA was not merged into block 0");
    for frozen in ["blocks.3.mlp.fc1.weight", "cls_token", "patch_embed.proj.weight"] {
        assert_eq!(a[frozen].data, b[frozen].data, "{frozen} must stay frozen");
    }
    let (adapter, _) = read_safetensors(&out.join("adapter.safetensors")).unwrap();
    let keys: Vec<&String> = adapter.keys().collect();
    for target in ["lora_q", "lora_k", "lora_v"] {
        assert!(keys.iter().any(|k| k.contains(target)), "{target} missing: {keys:?}");
    }
    assert!(!keys.iter().any(|k| k.contains("norm") || k.contains("cls_token")), "{keys:?}");
    let (tensors, meta) = read_safetensors(&checkpoint_path(&out, 8)).unwrap();
    assert_eq!(meta.get("objective").map(String::as_str), Some("upstep"));
    assert!(
        tensors.contains_key("online.backbone.blocks.0.attn.lora_k.a") && tensors.contains_key("offline.backbone.blocks.0.attn.lora_k.a")
    );
    assert_eq!(tensors["gate.state"].data[1..], [4.0, 4.0]);
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("objective: upstep") && report.contains("gate alternate"), "{report}");
}

#[test]
fn each_gate_skips_what_it_should_counted_by_backward_passes() {
    let dir = tempfile::tempdir().unwrap();
    let totals = |gate: Gate, edit: fn(&mut PretrainConfig)| {
        let out = dir.path().join(gate.name());
        let mut config = upstep_config(8, gate);
        edit(&mut config);
        run_quietly(config, &out, false).unwrap();
        let lines = metrics(&out);
        let last = &lines[lines.len() - 1];
        let passes: f64 = series(&out, "backward_passes").iter().sum();
        assert_eq!(Some(passes), last["backward_total"].as_f64());
        (last["backward_total"].as_f64().unwrap(), last["skipped_total"].as_f64().unwrap(), series(&out, "skipped"))
    };
    let (passes, skipped, _) = totals(Gate::Off, |_| {});
    assert_eq!((passes, skipped), (8.0, 0.0));
    // Far from any threshold the drift is always below it: every iteration skips.
    let (passes, skipped, _) = totals(Gate::CvrThreshold, |c| c.upstep.cvr_threshold = 1e6);
    assert_eq!((passes, skipped), (0.0, 8.0));
    // The loss's running mean starts at the first loss: the first iteration trains.
    let (passes, skipped, pattern) = totals(Gate::LossBelowEma, |_| {});
    assert_eq!(passes + skipped, 8.0);
    assert_eq!(pattern[0], 0.0);
}

#[test]
fn the_centroid_regulariser_keeps_the_online_embeddings_near_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let drift = |weight: f64| {
        let out = dir.path().join(format!("cvr-{weight}"));
        let mut config = upstep_config(10, Gate::Off);
        config.optim.base_lr = Some(5e-2);
        config.optim.warmup_steps = 0;
        config.upstep.cvr_weight = weight;
        run_quietly(config, &out, false).unwrap();
        let cvr = series(&out, "cvr");
        assert!(cvr.iter().all(|v| v.is_finite()), "{cvr:?}");
        cvr[cvr.len() - 1]
    };
    let (free, held) = (drift(0.0), drift(100.0));
    eprintln!("UpStep, 10 steps at lr 5e-2: final ‖c − c_base‖² {free:.3e} (λ = 0) vs {held:.3e} (λ = 100)");
    assert!(held < free, "λ > 0 did not keep c near c_base: {held:e} vs {free:e}");
}

#[test]
fn an_upstep_run_resumed_from_a_mid_run_checkpoint_ends_as_the_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let (a, c) = (dir.path().join("a"), dir.path().join("c"));
    let mut config = upstep_config(6, Gate::Alternate);
    config.run.checkpoint_every = 3;
    config.run.keep_checkpoints = 5;
    let whole = run_quietly(config, &a, false).unwrap();
    std::fs::create_dir_all(c.join("checkpoints")).unwrap();
    for file in ["config.toml", "metrics.jsonl", "base.safetensors", "centres.safetensors", "checkpoints/step-0000003.safetensors"] {
        std::fs::copy(a.join(file), c.join(file)).unwrap();
    }
    let resumed = PretrainJob::resume(&c).unwrap();
    assert_eq!(resumed.config.objective, Objective::Upstep);
    let (result, log) = run_logged(resumed);
    let summary = result.unwrap();
    assert!(log.iter().any(|l| l.contains("centres read from")), "{log:#?}");
    assert_eq!(summary.steps_done, 6);
    for key in ["loss", "swap", "cvr", "skipped_total", "backward_total"] {
        let (x, y) = (series(&a, key), series(&c, key));
        assert_eq!(x.len(), 6, "{key}");
        assert_eq!(x.len(), y.len(), "{key}");
        for (step, (x, y)) in x.iter().zip(&y).enumerate() {
            assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "step {}: {key} {x} vs {y}", step + 1);
        }
    }
    let (fa, fc) = (whole.final_loss.unwrap(), summary.final_loss.unwrap());
    assert!((fa - fc).abs() <= 1e-4 * fa.abs().max(1.0), "final loss {fa} vs {fc}");
    let (wa, wc) = (read(a.join("backbone.safetensors")), read(c.join("backbone.safetensors")));
    for (key, t) in &wa {
        assert!(max_abs_diff(&t.data, &wc[key].data) < 1e-4, "{key} differs after resume");
    }
}

#[test]
fn upstep_settings_are_checked_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    // More centres than training images (64 procedural tiles).
    let mut config = upstep_config(1, Gate::Alternate);
    config.upstep.centres = 100;
    let e = run_quietly(config, &dir.path().join("k"), false).unwrap_err().to_string();
    assert!(e.contains("`upstep.centres`") && e.contains("64"), "{e}");
    let mut config = upstep_config(1, Gate::Alternate);
    config.upstep.cvr_weight = -1.0;
    let e = run_quietly(config, &dir.path().join("l"), false).unwrap_err().to_string();
    assert!(e.contains("`upstep.cvr_weight`"), "{e}");
    // A gate that does not exist, in a config file.
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "objective = \"upstep\"\n[upstep]\ngate = \"sometimes\"\n").unwrap();
    let e = format!("{:#}", PretrainConfig::load(&path).unwrap_err());
    assert!(e.contains("gate") && e.contains("sometimes") && e.contains("loss-below-ema"), "{e}");
    // Through the CLI: --objective upstep.
    use clap::Parser;
    let args = explora::cli::Cli::try_parse_from(["explora", "pretrain", "--objective", "upstep", "--arch", "tiny"]).unwrap();
    let Some(explora::cli::Command::Pretrain(args)) = args.command else { panic!("not a pretrain command") };
    let config = explora::cli::pretrain_config(&args).unwrap();
    assert_eq!(config.objective, Objective::Upstep);
    let plan = config.resolve_plan(&explora::model::VitConfig::tiny()).unwrap();
    assert_eq!((plan.lora.rank, plan.lora.targets.to_string(), plan.norms), (8, "q,k,v".to_string(), false), "{plan:?}");
}
