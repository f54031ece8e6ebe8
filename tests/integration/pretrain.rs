//! ExPLoRA pre-training on tiny configs: the loss falls, gradients reach only the plan, the
//! teacher is the EMA of the student, a stopped run resumes exactly, bad input is named.

use std::collections::HashSet;
use std::path::Path;

use burn::module::Module;
use burn::tensor::{Tensor, TensorData};
use explora::data::generate_image_folder;
use explora::engine::{self, Command, Event};
use explora::model::VitConfig;
use explora::model::params::{accumulate_grads, for_each_param, trainable_params};
use explora::objectives::{Centers, DinoModel, HeadConfig, LossConfig, MaskedPatches, StepInputs, ema_update, step_loss};
use explora::optim::{AdamW, UpdateRule};
use explora::peft::{AdaptationPlan, Preset, apply_plan, trainable_patterns};
use explora::train::{PretrainConfig, PretrainJob, pretrain};

use crate::common::*;

pub fn run_quietly(config: PretrainConfig, out: &Path, resume: bool) -> anyhow::Result<explora::train::PretrainSummary> {
    let device = device();
    let job = PretrainJob { config, out: out.to_path_buf(), resume };
    let (events, _commands) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<Command>());
    let mut ctx = engine::JobContext::new(events.0, _commands.1);
    pretrain(&job, &device, &mut ctx)
}

/// Runs the job and returns what it ended with and the log lines it emitted.
pub fn run_logged(job: PretrainJob) -> (anyhow::Result<explora::train::PretrainSummary>, Vec<String>) {
    let device = device();
    let (events, commands) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<Command>());
    let mut ctx = engine::JobContext::new(events.0, commands.1);
    let result = pretrain(&job, &device, &mut ctx);
    drop(ctx);
    let log = events.1.iter().filter_map(|e| if let Event::Log { message, .. } = e { Some(message) } else { None }).collect();
    (result, log)
}

/// `metrics.jsonl` lines without the wall-clock fields.
pub fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("img_per_s");
            o.remove("gpu_bytes");
            v
        })
        .collect()
}

pub fn tiny_student(device: &burn::tensor::Device) -> (DinoModel, AdaptationPlan) {
    let config = VitConfig::tiny();
    let plan = AdaptationPlan::preset(Preset::Explora, &config).with_unfrozen(&[3]).unwrap();
    let backbone = apply_plan(config.init(device), &plan).unwrap();
    (DinoModel::new(backbone, &HeadConfig { layers: 2, hidden: 32, bottleneck: 16, prototypes: 32 }), plan)
}

pub fn inputs(device: &burn::tensor::Device, b: usize) -> StepInputs {
    let globals = Tensor::<4>::random([2 * b, 3, 32, 32], burn::tensor::Distribution::Normal(0.0, 1.0), device);
    let locals = Tensor::<4>::random([2 * b, 3, 16, 16], burn::tensor::Distribution::Normal(0.0, 1.0), device);
    let n = 16;
    let masks: Vec<bool> = (0..2 * b * n).map(|i| i < b * n && i % 3 == 0).collect();
    let values: Vec<f32> = masks.iter().map(|&m| if m { 1.0 } else { 0.0 }).collect();
    StepInputs {
        globals,
        locals: Some(locals),
        masks: Tensor::<2>::from_data(TensorData::new(values, [2 * b, n]), device).greater_elem(0.5),
        masked: MaskedPatches::new(&masks, n, b * n, device),
        batch: b,
        global_crops: 2,
        local_crops: 2,
    }
}

#[test]
fn gradients_reach_exactly_the_plan_and_the_head_and_the_teacher_follows_by_ema() {
    let device = device();
    let ad = device.clone().autodiff();
    let (student, plan) = tiny_student(&ad);
    let teacher = student.valid();
    let x = inputs(&ad, 4);
    let centers = Centers::zeros(32, &device);
    let (loss, _) = step_loss(&student, &teacher, &x, &centers, &LossConfig::default(), 0.04);
    let mut grads = std::collections::HashMap::new();
    accumulate_grads(&student, &loss.total.backward(), &mut grads);

    // Exactly the planned backbone tensors and every head tensor receive gradients.
    let patterns: Vec<regex::Regex> = trainable_patterns(&plan).iter().map(|p| regex::Regex::new(p).unwrap()).collect();
    let mut expected = HashSet::new();
    for_each_param(&student, |name, _, _| {
        let planned = name.strip_prefix("backbone.").is_some_and(|n| patterns.iter().any(|p| p.is_match(n)));
        if planned || name.starts_with("head.") {
            expected.insert(name.to_string());
        }
    });
    let got: HashSet<String> = grads.keys().cloned().collect();
    assert_eq!(got, expected);
    assert!(got.contains("backbone.blocks.3.attn.qkv.weight") && got.contains("backbone.blocks.0.attn.lora_v.b"));
    assert!(!got.iter().any(|n| n.contains("blocks.0.attn.qkv") || n.contains("patch_embed") || n.contains("lora_k")));

    // One AdamW step, then the EMA: teacher' = m·teacher + (1 − m)·student' for trained
    // tensors; frozen tensors stay identical (and shared).
    let trained: HashSet<String> = trainable_params(&student).into_keys().collect();
    let mut before = std::collections::HashMap::new();
    for_each_param(&teacher, |name, t, _| {
        if trained.contains(name) {
            before.insert(name.to_string(), t);
        }
    });
    assert_eq!(before.len(), trained.len());
    let frozen_before = values(teacher.backbone.blocks[0].attn.qkv.weight.val());
    let mut optim = AdamW::new([0.9, 0.999], 1e-8);
    let rule = UpdateRule { lr: 1e-2, weight_decay: 0.04, layer_decay: 0.9, depth: 4, freeze_prototypes: false, freeze_backbone: false };
    // During a head warm-up only the head moves (and AdamW keeps no moments for the backbone).
    let warm = AdamW::new([0.9, 0.999], 1e-8).step(
        student.clone(),
        grads.clone(),
        &Tensor::ones([1], &device),
        UpdateRule { freeze_backbone: true, ..rule },
    );
    let (warm_now, student_now) = (trainable_params(&warm), trainable_params(&student));
    for (name, t) in &warm_now {
        let moved = max_abs_diff(&values(t.clone()).1, &values(student_now[name].clone()).1) > 0.0;
        assert_eq!(moved, !name.starts_with("backbone."), "{name} during the head warm-up");
    }
    let student = optim.step(student, grads, &Tensor::ones([1], &device), rule);
    let m = 0.9;
    let teacher = ema_update(teacher, &student, m);
    let after_student = trainable_params(&student);
    let mut teacher_now = std::collections::HashMap::new();
    for_each_param(&teacher, |name, t, _| {
        teacher_now.insert(name.to_string(), t);
    });
    for (name, s) in &after_student {
        let expect = before[name].clone().mul_scalar(m) + s.clone().mul_scalar(1.0 - m);
        let (_, e) = values(expect);
        let (_, t) = values(teacher_now[name].clone());
        assert!(max_abs_diff(&e, &t) < 1e-6, "{name}: teacher is not the EMA");
    }
    let (_, s0) = values(after_student["backbone.blocks.3.attn.qkv.weight"].clone());
    let (_, t0) = values(before["backbone.blocks.3.attn.qkv.weight"].clone());
    assert!(max_abs_diff(&s0, &t0) > 0.0, "the step changed the unfrozen block");
    assert_eq!(values(teacher.backbone.blocks[0].attn.qkv.weight.val()), frozen_before);
}

#[test]
fn the_loss_falls_on_procedural_tiles() {
    let dir = tempfile::tempdir().unwrap();
    // Sinkhorn-Knopp targets (the built-in run's choice for a tiny random backbone).
    let mut config = small_config(30);
    config.optim.base_lr = Some(2e-3);
    config.loss.centering = explora::objectives::Centering::SinkhornKnopp;
    let summary = run_quietly(config, dir.path(), false).unwrap();
    assert_eq!(summary.steps_done, 30);
    let m = metrics(dir.path());
    let loss: Vec<f64> = m.iter().filter_map(|v| v["loss"].as_f64()).collect();
    assert_eq!(loss.len(), 30);
    let first: f64 = loss[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = loss[25..].iter().sum::<f64>() / 5.0;
    assert!(last < first - 0.2, "loss did not fall: first steps {first:.4}, last steps {last:.4}: {loss:?}");
    for file in ["config.toml", "backbone.safetensors", "adapter.safetensors", "report.md", "checkpoints/step-0000030.safetensors"] {
        assert!(dir.path().join(file).exists(), "{file} missing");
    }
    // The adapted backbone loads as a plain checkpoint.
    let (model, _) = explora::checkpoint::load_backbone(&dir.path().join("backbone.safetensors"), &device()).unwrap();
    assert_eq!(model.config().depth, 4);
}

/// The default run as it ships (the built-in source backbone, the target domain, 900 steps of
/// 16, then the comparison on 5,000 held-out target tiles): its losses stay finite and fall,
/// and on the held-out test split (1,000 tiles) the adapted backbone's k-NN beats the source
/// backbone's.
///
/// Measured on the CPU backend (2-core AMD EPYC), seed 0 (this test): held-out k-NN 71.7% →
/// 77.6% (+5.9, 95% CI +2.9..+8.8), → 75.5% (+3.8), → 76.2% (+4.5) and → 72.9% (+1.2, beside
/// the other tests) in four runs: threads sum in varying order, and 900 steps carry that into
/// the last points. The validation seeds 1-4 gave +5.0 / +3.5 / +5.3 / +6.3 (test split). What
/// is asserted is the direction: the adapted backbone's k-NN is above the source's.
#[test]
fn the_default_run_adapts_the_source_backbone_to_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = PretrainConfig::builtin();
    assert!(config.evaluate.after_training);
    config.monitor.knn_every = config.run.steps;
    config.run.checkpoint_every = 0;
    config.run.preview_every = 0;
    let steps = config.run.steps as usize;
    let job = PretrainJob { config, out: dir.path().to_path_buf(), resume: false };
    let (events, commands) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<Command>());
    let mut ctx = engine::JobContext::new(events.0, commands.1);
    let outcome = explora::recipes::run::pretrain_then_evaluate(&job, &device(), &mut ctx).unwrap();
    let summary = outcome.pretrain;
    assert_eq!(summary.steps_done as usize, steps);
    let m = metrics(dir.path());
    let series = |key: &str| -> Vec<f64> { m.iter().filter_map(|v| v[key].as_f64()).collect() };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    for key in ["loss", "dino", "ibot", "koleo"] {
        let v = series(key);
        assert_eq!(v.len(), steps, "{key}");
        assert!(v.iter().all(|x| x.is_finite()), "{key} is not finite: {v:?}");
    }
    let window = steps / 6;
    for key in ["loss", "dino"] {
        let v = series(key);
        let (first, last) = (mean(&v[..window]), mean(&v[steps - window..]));
        assert!(last < first - 0.1, "{key} did not fall: first {window} steps {first:.4}, last {window} {last:.4}");
    }
    // The monitor (leave-one-out on 200 tiles) is measured at both ends but not asserted: on
    // 200 tiles it varies between runs of the same config (seed 0: 54.0% → 67.0%, 64.0%, 62.0%,
    // 57.0%); the held-out split below is five times larger.
    let (before, after) = (summary.knn_before.unwrap(), summary.knn_after.unwrap());
    eprintln!("default run, k-NN monitor: {before} → {after}");
    assert!((0.2..=1.0).contains(&before) && (0.2..=1.0).contains(&after), "monitor {before} → {after}");

    // The held-out comparison, as the pipeline reports it.
    let evaluation = outcome.evaluation.expect("the default run evaluates after training");
    assert_eq!(evaluation.split_sizes, [3000, 1000, 1000]);
    let deltas = evaluation.deltas();
    let knn = deltas.iter().find(|d| d.method == "knn").expect("a k-NN row");
    eprintln!("default run, held-out k-NN: {} → {} ({:?})", knn.source_top1, knn.explora_top1, knn.interval);
    assert!(knn.source_top1 < 0.9, "the source backbone is already near-perfect on the target: {}", knn.source_top1);
    assert!(knn.delta > 0.0, "ExPLoRA's held-out k-NN did not beat the source backbone's: {} → {}", knn.source_top1, knn.explora_top1);
    let probe = deltas.iter().find(|d| d.method == "linear-probe").expect("a linear-probe row");
    assert!(probe.explora_top1 > 0.6 && probe.source_top1 > 0.6, "{probe:?}");
}

#[test]
fn a_killed_run_resumes_where_it_stopped_and_a_stop_command_keeps_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("c"));
    let mut config = small_config(6);
    config.run.checkpoint_every = 2;
    config.run.keep_checkpoints = 5;
    run_quietly(config.clone(), &a, false).unwrap();

    // A run killed after step 3: its folder holds the step-2 checkpoint and metrics up to
    // step 3 (here: all of run A's, which resume must cut back to the checkpoint).
    std::fs::create_dir_all(c.join("checkpoints")).unwrap();
    for file in ["config.toml", "metrics.jsonl", "checkpoints/step-0000002.safetensors"] {
        std::fs::copy(a.join(file), c.join(file)).unwrap();
    }
    let resumed = PretrainJob::resume(&c).unwrap();
    let summary = run_quietly(resumed.config, &c, true).unwrap();
    assert_eq!(summary.steps_done, 6);
    // Every metric equals the uninterrupted run's. GPU kernels are not bitwise reproducible
    // from one run to the next (reduction order, autotuned kernel choice), so "equal" means
    // within float noise.
    let (ma, mc) = (metrics(&a), metrics(&c));
    assert_eq!(ma.len(), mc.len());
    for (la, lc) in ma.iter().zip(&mc) {
        assert_eq!(la["step"], lc["step"]);
        for (key, va) in la.as_object().unwrap() {
            let (x, y) = (va.as_f64().unwrap(), lc[key].as_f64().unwrap());
            assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "step {}: {key} {x} vs {y}", la["step"]);
        }
    }
    let (wa, wc) = (read(a.join("backbone.safetensors")), read(c.join("backbone.safetensors")));
    assert_eq!(wa.keys().collect::<Vec<_>>(), wc.keys().collect::<Vec<_>>());
    for (key, t) in &wa {
        assert!(max_abs_diff(&t.data, &wc[key].data) < 1e-4, "{key} differs after resume");
    }

    // A Stop command (the app's stop button) ends the run with a checkpoint at the last
    // finished step and the command that continues it.
    let job = PretrainJob { config, out: b.clone(), resume: false };
    let device = device();
    let handle = engine::spawn("pretrain", move |ctx| explora::recipes::run::run(&job, &device, ctx));
    let mut finished = None;
    for event in handle.events.iter() {
        match event {
            Event::Metrics { .. } => handle.send(Command::Stop),
            Event::Finished(result) => finished = Some(result),
            _ => {}
        }
    }
    let message = finished.unwrap().unwrap();
    assert!(message.contains("stopped after step") && message.contains("explora --no-gui resume"), "{message}");
    let stopped_at = metrics(&b).len() as u64;
    assert!(stopped_at < 6, "the run was not stopped early");
    assert!(explora::train::state::checkpoint_path(&b, stopped_at).exists());
    let summary = run_quietly(PretrainJob::resume(&b).unwrap().config, &b, true).unwrap();
    assert_eq!(summary.steps_done, 6);
    assert_eq!(metrics(&b).len(), 6);
    // A fresh start over an existing run is refused, with the way out.
    let again = run_quietly(small_config(6), &b, false).unwrap_err().to_string();
    assert!(again.contains("already holds a run") && again.contains("resume"), "{again}");
}

#[test]
fn resume_skips_an_unreadable_newest_checkpoint_and_a_full_disk_keeps_the_last_good_one() {
    use explora::train::state::checkpoint_path;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let mut config = small_config(6);
    config.run.checkpoint_every = 2;
    config.run.keep_checkpoints = 5;
    run_quietly(config.clone(), &a, false).unwrap();

    // Step 6's file cut short (a crash mid-write without the atomic rename, or damage later):
    // resume says so, keeps the file aside and continues from step 4.
    let newest = checkpoint_path(&a, 6);
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
    let mut job = PretrainJob::resume(&a).unwrap();
    job.config.run.steps = 8;
    let (result, log) = run_logged(job);
    let summary = result.unwrap();
    assert_eq!(summary.steps_done, 8);
    assert!(log.iter().any(|l| l.contains("skipping") && l.contains("step-0000006")), "{log:#?}");
    assert!(log.iter().any(|l| l.contains("resuming from") && l.contains("step 4")), "{log:#?}");
    assert!(newest.with_extension("safetensors.unreadable").exists(), "the damaged file was not kept");
    let steps: Vec<u64> = metrics(&a).iter().map(|m| m["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>(), "metrics after the fallback must restart at step 5");

    // A full disk while writing the step-6 checkpoint: the run stops with the last good
    // checkpoint named; nothing half-written is left; once there is space, resume continues.
    let mut four = config.clone();
    four.run.steps = 4;
    run_quietly(four, &b, false).unwrap();
    let checkpoints = b.join("checkpoints");
    let mut job = PretrainJob::resume(&b).unwrap();
    job.config.run.steps = 8;
    explora::checkpoint::fault::disk_full_under(&checkpoints);
    let (result, _) = run_logged(job);
    explora::checkpoint::fault::clear(&checkpoints);
    let error = format!("{:#}", result.unwrap_err());
    assert!(error.contains("disk is full") && error.contains("last good checkpoint is step 4"), "{error}");
    assert!(error.contains("explora --no-gui resume"), "{error}");
    let files: Vec<String> =
        std::fs::read_dir(&checkpoints).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(files.len(), 2, "only the good checkpoints of steps 2 and 4 may be there: {files:?}");
    assert!(explora::train::state::read(&checkpoint_path(&b, 4)).is_ok());
    let mut job = PretrainJob::resume(&b).unwrap();
    job.config.run.steps = 8;
    assert_eq!(run_logged(job).0.unwrap().steps_done, 8);
}

#[test]
fn bad_configs_and_unreadable_images_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(1);
    config.crops.global_size = 36; // tiny's patch is 8
    let e = run_quietly(config, &dir.path().join("a"), false).unwrap_err().to_string();
    assert!(e.contains("crops.global_size") && e.contains("patch size 8"), "{e}");

    // One corrupt file among good ones: skipped, counted, named; the run goes on.
    let images = dir.path().join("images");
    generate_image_folder(&images, 4, 48, 1).unwrap();
    std::fs::write(images.join("forest/broken.png"), b"not a png").unwrap();
    // 21 files, 3 steps of 8: one full pass over the data.
    let mut config = small_config(3);
    config.data.images = Some(images.clone());
    let summary = run_quietly(config, &dir.path().join("b"), false).unwrap();
    assert!(summary.skipped_files >= 1, "the corrupt file is skipped and counted");
    assert_eq!(summary.steps_done, 3);

    let e = explora::train::PretrainJob::resume(&dir.path().join("images")).unwrap_err().to_string();
    assert!(e.contains("not a run folder"), "{e}");
}
