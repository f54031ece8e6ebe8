//! The desktop app under egui_kittest, rendered with wgpu on the device burn computes on (so
//! the heatmap shader runs where CI runs everything else: Mesa's software Vulkan). The tiny
//! built-in model at 32/16-px crops, batch 4: launch, edit the plan and read the budget, train
//! a few steps and watch the plots and the batch viewer fill, look at attention maps, stop (a
//! checkpoint) and resume, read the results. Every panel is rendered to a PNG under
//! `$CARGO_TARGET_TMPDIR/gui-snapshots/`, checked not blank and different where it should be.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use explora::device::{DeviceChoice, open};
use explora::gui::{App, AppState, Tab, step_label, total_label};
use explora::train::PretrainConfig;
use image::RgbaImage;

fn snapshots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("gui-snapshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The tests' small pre-training run with batch 4, the k-NN monitor every 2 steps and a preview
/// every step; long enough (on the CPU backend a step takes milliseconds) that the test pauses
/// and stops it midway.
fn small_config() -> PretrainConfig {
    let mut c = crate::common::small_config(5_000);
    c.optim.batch = 4;
    c.optim.reference_batch = Some(4);
    c.optim.warmup_steps = 1;
    c.monitor.knn_every = 2;
    c.monitor.knn_max_images = 16;
    c.monitor.knn_k = 3;
    c.run.preview_every = 1;
    // The run evaluates itself when it ends (`[evaluate]`), on a few generated tiles.
    c.evaluate.after_training = true;
    c.evaluate.tiles_per_class = 10;
    c
}

fn app_harness(out: &Path) -> Harness<'static, App> {
    // Training computes on the CPU backend; the window renders (and runs the heatmap shader)
    // on a wgpu device of its own, as the app does on a machine without a GPU.
    let device = open(&DeviceChoice::Cpu).expect("the CPU backend");
    let mut state = AppState::new(small_config(), DeviceChoice::Cpu, Some(device));
    state.out = out.to_path_buf();
    Harness::builder().with_size([1280.0, 860.0]).wgpu().build_eframe(move |cc| App::new(cc, state))
}

/// Renders the current frame to `<name>.png`, checks it is not blank, that the labels a person
/// would look for on this panel are drawn, and that no error is shown (a panel that only shows
/// an error banner is not blank either).
fn snapshot(harness: &mut Harness<'_, App>, name: &str, shows: &[&str]) -> RgbaImage {
    harness.run_steps(2);
    for label in shows {
        assert!(harness.get_all_by_label_contains(label).count() >= 1, "{name}: `{label}` is not shown");
    }
    let state = &harness.state().state;
    assert!(state.model_error.is_none(), "{name}: the app shows a model error: {:?}", state.model_error);
    if let Some(Err(e)) = state.run.as_ref().and_then(|r| r.finished.as_ref()) {
        panic!("{name}: the app shows a failed run: {e}");
    }
    let image = harness.render().expect("render");
    image.save(snapshots().join(format!("{name}.png"))).unwrap();
    let mut colours = std::collections::HashSet::new();
    for p in image.pixels().step_by(7) {
        colours.insert(p.0);
    }
    assert!(colours.len() > 20, "{name}.png looks blank ({} colours)", colours.len());
    image
}

/// Fraction of pixels that differ between two renders of the same size.
fn difference(a: &RgbaImage, b: &RgbaImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let differ = a.pixels().zip(b.pixels()).filter(|(p, q)| p.0 != q.0).count();
    differ as f64 / (a.width() * a.height()) as f64
}

fn open_tab(harness: &mut Harness<'_, App>, tab: Tab) {
    harness.get_by_label(tab.name()).click();
    harness.run_steps(2);
    assert_eq!(harness.state().tab, tab);
}

/// Steps the app (the job runs on its own thread) until `until` holds.
fn step_until(harness: &mut Harness<'_, App>, what: &str, limit: Duration, until: impl Fn(&App) -> bool) {
    let began = Instant::now();
    while !until(harness.state()) {
        assert!(began.elapsed() < limit, "timed out waiting for {what}; log: {:?}", harness.state().state.log);
        harness.step();
        std::thread::sleep(Duration::from_millis(40));
    }
}

#[test]
fn the_app_edits_the_plan_trains_and_shows_batches_and_attention() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut harness = app_harness(&out);
    let launched = Instant::now();

    // Launch: the Setup panel on the built-in run, ready to start.
    assert_eq!(harness.state().tab, Tab::Setup);
    harness.get_by_label("ready: press Start on the Training panel");
    let setup = snapshot(&mut harness, "setup", &["ready: press Start on the Training panel", "built-in source backbone"]);

    // The plan: the budget label follows the preset buttons, with `explora plan`'s numbers.
    open_tab(&mut harness, Tab::Adaptation);
    let explora_label = total_label(&harness.state().state).unwrap();
    // (in the panel and in the status bar)
    assert_eq!(harness.get_all_by_label(&explora_label).count(), 2);
    let adaptation = snapshot(&mut harness, "adaptation-explora", &[&explora_label, "explora preset"]);
    harness.get_by_label("lora preset").click();
    harness.run_steps(2);
    let vit = explora::model::VitConfig::tiny();
    let lora = explora::peft::AdaptationPlan::preset(explora::peft::Preset::Lora, &vit).budget(&vit);
    assert_eq!(harness.state().state.budget().unwrap(), lora);
    let lora_label = total_label(&harness.state().state).unwrap();
    assert!(lora_label.starts_with("total trainable: 65,536 "), "{lora_label}");
    assert_eq!(harness.get_all_by_label(&lora_label).count(), 2);
    let adaptation_lora = snapshot(&mut harness, "adaptation-lora", &[&lora_label]);
    assert!(difference(&setup, &adaptation) > 0.02, "setup and adaptation panels look the same");
    let changed = difference(&adaptation, &adaptation_lora);
    assert!(changed > 0.0005 && changed < 0.5, "a preset should change the rows and budget only ({changed})");
    harness.get_by_label("explora preset").click();
    harness.run_steps(2);
    assert_eq!(total_label(&harness.state().state).unwrap(), explora_label);

    // Training: start, see the plots and the batch viewer fill.
    open_tab(&mut harness, Tab::Training);
    let idle = snapshot(&mut harness, "training-idle", &["Start"]);
    harness.get_by_label("Start").click();
    step_until(&mut harness, "the first training steps", Duration::from_secs(240), |app| {
        app.state.series.get("loss").is_some_and(|s| !s.is_empty()) && app.state.batch.is_some()
    });
    // Pause: the job stops between two steps; the rest happens while it waits.
    harness.get_by_label("Pause").click();
    step_until(&mut harness, "the pause", Duration::from_secs(120), |app| app.state.run.as_ref().unwrap().paused);
    harness.get_by_label("Resume");
    let steps_taken = harness.state().state.run.as_ref().unwrap().step;
    assert!((1..5_000).contains(&steps_taken), "paused at {steps_taken}");
    assert!(harness.get_all_by_label_contains(&step_label(&harness.state().state)).count() >= 1);
    let training = snapshot(&mut harness, "training", &["Resume", "loss"]);
    assert!(difference(&idle, &training) > 0.01, "the plots did not fill");

    open_tab(&mut harness, Tab::Batch);
    assert_eq!(harness.state().batch.thumbnails(), 4 * 5, "4 samples × (source + 2 global + 2 local crops)");
    let batch = snapshot(&mut harness, "batch", &["sample 0, global crop 0"]);
    harness.get_by_label_contains("sample 0, global crop 0").click();
    harness.run_steps(2);
    assert_eq!(harness.state().batch.enlarged, Some((0, 1)), "global crop 0 comes after the source image");
    let enlarged = snapshot(&mut harness, "batch-enlarged", &["sample 0, global crop 0"]);
    assert!(difference(&batch, &enlarged) > 0.01, "clicking a crop should enlarge it");

    // Attention: asked of the (paused) job, answered between two steps.
    open_tab(&mut harness, Tab::Attention);
    harness.get_by_label("Show attention").click();
    step_until(&mut harness, "the attention maps", Duration::from_secs(180), |app| app.state.attention.is_some());
    assert!(harness.state().state.gpu_heatmap, "heatmaps are drawn by the WGSL shader");
    let view = harness.state().state.attention.clone().unwrap();
    assert_eq!((view.source.rows, view.source.cols), (4, 4));
    assert_eq!(view.source.layer, 3);
    let attention = snapshot(&mut harness, "attention", &["Show attention"]);
    assert!(difference(&batch, &attention) > 0.05);

    // Stop writes a checkpoint; resuming the folder (as `explora --no-gui resume` would) finishes.
    harness.state_mut().state.send(explora::engine::Command::Stop);
    step_until(&mut harness, "the stop", Duration::from_secs(120), |app| !app.state.is_running());
    let stopped_at = harness.state().state.run.as_ref().unwrap().step;
    assert_eq!(stopped_at, steps_taken, "a paused run stops where it is");
    let checkpoints: Vec<_> = std::fs::read_dir(out.join("checkpoints")).unwrap().collect();
    assert!(!checkpoints.is_empty(), "stop wrote no checkpoint");
    harness.state_mut().state.resume(&out, Some(steps_taken + 2)).unwrap();
    step_until(&mut harness, "the resumed run", Duration::from_secs(240), |app| !app.state.is_running());
    assert!(harness.state().state.series["loss"].len() >= 3, "the resumed run's plots start with the earlier steps");
    let finished = harness.state().state.run.as_ref().unwrap().finished.clone().unwrap();
    let expected = format!("pre-trained {} steps", steps_taken + 2);
    assert!(finished.as_ref().is_ok_and(|s| s.contains(&expected) && s.contains("report in")), "{finished:?}");
    assert!(out.join("backbone.safetensors").exists() && out.join("report.md").exists());
    assert!(out.join("evaluation/report.md").exists(), "the run's [evaluate] section was not carried out");

    open_tab(&mut harness, Tab::Results);
    harness.get_by_label("report.md");
    let results = snapshot(&mut harness, "results", &["report.md", "evaluation/report.md"]);
    assert!(difference(&results, &training) > 0.02);

    // The run the app started resumes headless from another directory: two more steps, then
    // its evaluation again.
    let elsewhere = tempfile::tempdir().unwrap();
    let steps = (steps_taken + 4).to_string();
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_explora"))
        .current_dir(elsewhere.path())
        .args(["--no-gui", "--device", "cpu", "resume", out.to_str().unwrap(), "--steps", &steps])
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&cli.stdout), String::from_utf8_lossy(&cli.stderr));
    assert!(cli.status.success(), "{text}");
    assert!(text.contains(&format!("pre-trained {steps} steps")) && text.contains("report in"), "{text}");
    eprintln!("gui test: {:.0} s, snapshots in {}", launched.elapsed().as_secs_f64(), snapshots().display());
}

#[test]
fn without_a_display_the_binary_says_so_in_one_line_and_runs_headless() {
    use std::io::BufRead;
    // `explora` with no command and no display: one line naming what it looked for, then the
    // built-in default run headless (stopped once it has started, to stay fast).
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_explora"))
        .current_dir(dir.path())
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    // (Mesa may print a driver warning before the run's own first line.)
    let started = lines.by_ref().take(10).map_while(Result::ok).find(|l| l.starts_with("device: "));
    child.kill().ok();
    child.wait().ok();
    assert_eq!(
        first,
        "explora: no display found (neither DISPLAY nor WAYLAND_DISPLAY is set); running the built-in default headless, as `explora --no-gui` does"
    );
    assert!(started.is_some(), "the default run should start headless");
}

#[test]
fn without_a_usable_adapter_a_gpu_request_names_what_was_tried_and_auto_computes_on_the_cpu() {
    // The Vulkan loader finds no driver.
    let explora = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_explora"))
            .args(args)
            .env("VK_ICD_FILENAMES", "/nonexistent/icd.json")
            .env("VK_DRIVER_FILES", "/nonexistent/icd.json")
            .output()
            .unwrap()
    };
    for device in ["gpu", "software"] {
        let out = explora(&["--no-gui", "--device", device, "default", "--steps", "1"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--device {device}");
        assert!(stderr.contains("no GPU adapter found (wgpu tried Vulkan, Metal and DX12)"), "{stderr}");
        assert!(stderr.contains("mesa-vulkan-drivers"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let out = explora(&["info"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("explora uses (--device auto): CPU (burn-flex"), "{text}");
}

#[test]
fn the_results_panel_shows_the_evaluation_report_and_confusion_matrices() {
    // A finished run folder as the app leaves it after evaluating on a labelled folder.
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let eval = run.join("evaluation");
    std::fs::create_dir_all(eval.join("eval/explora-linear-probe")).unwrap();
    std::fs::create_dir_all(run.join("checkpoints")).unwrap();
    std::fs::write(run.join("report.md"), "# ExPLoRA pre-training\n").unwrap();
    std::fs::write(
        eval.join("report.md"),
        "# Did ExPLoRA pre-training help?\n\n| variant | method | top-1 % |\n|---|---|---:|\n| source | knn | 82.5 |\n| explora | linear-probe | 100.0 |\n",
    )
    .unwrap();
    let classes: Vec<String> = ["fields", "forest", "water"].iter().map(|s| s.to_string()).collect();
    explora::eval::figure::confusion_matrix(&[vec![8, 0, 0], vec![1, 7, 0], vec![0, 0, 8]], &classes, "explora, linear-probe")
        .save(eval.join("eval/explora-linear-probe/confusion.png"))
        .unwrap();
    let mut harness = app_harness(&run);
    let before = snapshot(&mut harness, "results-before", &[]);
    open_tab(&mut harness, Tab::Results);
    harness.get_by_label("evaluation/report.md");
    // Its caption and the picture itself (alt text).
    assert_eq!(harness.get_all_by_label("evaluation/eval/explora-linear-probe/confusion.png").count(), 2);
    let results = snapshot(&mut harness, "results-evaluation", &["evaluation/report.md"]);
    assert!(difference(&before, &results) > 0.02, "the Results panel shows nothing new");
}

#[test]
fn the_setup_panel_chooses_the_objective_and_shows_maes_knobs_only_for_mae() {
    let dir = tempfile::tempdir().unwrap();
    let mut harness = app_harness(&dir.path().join("run"));
    harness.run_steps(2);
    assert_eq!(harness.state().tab, Tab::Setup);
    assert_eq!(harness.state().state.config.objective, explora::train::Objective::Dinov2);
    assert!(harness.query_by_label("mask ratio").is_none(), "MAE's knobs are shown for DINOv2");
    harness.get_by_label_contains("MAE (masked-patch reconstruction").click();
    harness.run_steps(2);
    let state = &harness.state().state;
    assert_eq!(state.config.objective, explora::train::Objective::Mae);
    assert!(state.problems().is_empty(), "{:?}", state.problems());
    harness.get_by_label("mask ratio");
    harness.get_by_label("decoder width");
    // The budget lists the fresh decoder beside the backbone (512 wide, 8 blocks by default).
    let budget = harness.state().state.budget().unwrap();
    let decoder = explora::objectives::mae::DecoderConfig::default().num_params(64, 8);
    assert_eq!(budget.extra.len(), 1);
    assert_eq!(budget.extra[0].params, decoder);
    open_tab(&mut harness, Tab::Adaptation);
    harness.get_by_label_contains("beside the backbone: MAE decoder, fresh");
    open_tab(&mut harness, Tab::Setup);
    harness.get_by_label_contains("DINOv2 (self-distillation").click();
    harness.run_steps(2);
    assert_eq!(harness.state().state.config.objective, explora::train::Objective::Dinov2);
    assert!(harness.query_by_label("mask ratio").is_none(), "MAE's knobs stay after switching back");

    // UpStep's knobs, and a gate's own setting only under that gate; the Training panel plots
    // what UpStep's step writes.
    assert!(harness.query_by_label("skip gate").is_none(), "UpStep's knobs are shown for DINOv2");
    harness.get_by_label_contains("UpStep (our reading").click();
    harness.run_steps(2);
    assert_eq!(harness.state().state.config.objective, explora::train::Objective::Upstep);
    harness.get_by_label("centres (k-means K)");
    harness.get_by_label("skip gate");
    assert!(harness.query_by_label("threshold").is_none());
    harness.get_by_label("drift below threshold").click();
    harness.run_steps(2);
    assert_eq!(harness.state().state.config.upstep.gate, explora::train::config::Gate::CvrThreshold);
    harness.get_by_label("threshold");
    snapshot(&mut harness, "setup-upstep", &["centre regulariser λ"]);
    open_tab(&mut harness, Tab::Training);
    harness.get_by_label("iterations skipped / backward passes (total)");
    harness.get_by_label("loss (total, swapped codes, centre regulariser)");
}

#[test]
fn the_batch_viewer_shows_maes_masks_and_reconstructions() {
    let dir = tempfile::tempdir().unwrap();
    let mut harness = app_harness(&dir.path().join("run"));
    harness.run_steps(2);
    harness.get_by_label_contains("MAE (masked-patch reconstruction").click();
    harness.run_steps(2);
    {
        let config = &mut harness.state_mut().state.config;
        assert_eq!(config.objective, explora::train::Objective::Mae);
        // A small fresh decoder keeps the steps short.
        (config.mae.decoder_width, config.mae.decoder_depth, config.mae.decoder_heads) = (32, 1, 2);
        config.evaluate.after_training = false;
    }
    open_tab(&mut harness, Tab::Training);
    harness.get_by_label("Start").click();
    step_until(&mut harness, "a batch with reconstructions", Duration::from_secs(240), |app| {
        app.state.batch.as_ref().is_some_and(|b| b.samples.iter().all(|s| s.reconstruction.is_some()))
    });
    harness.get_by_label("Pause").click();
    step_until(&mut harness, "the pause", Duration::from_secs(120), |app| app.state.run.as_ref().unwrap().paused);

    let preview = harness.state().state.batch.clone().unwrap();
    let sample = &preview.samples[0];
    let ratio = harness.state().state.config.mae.mask_ratio;
    let patches = preview.grid * preview.grid;
    assert_eq!(sample.globals.len(), 1, "MAE reconstructs one crop per image");
    assert_eq!(sample.masks.iter().filter(|&&m| m).count(), patches - explora::objectives::mae::PatchMask::visible(patches, ratio));
    let (input, recon) = (&sample.globals[0], sample.reconstruction.as_ref().unwrap());
    assert_eq!(input.dimensions(), recon.dimensions());
    // Visible patches are kept as they were; masked ones are the decoder's prediction.
    let patch = input.width() as usize / preview.grid;
    let (mut same_visible, mut visible, mut changed_masked) = (0, 0, 0);
    for (x, y, p) in input.enumerate_pixels() {
        let masked = sample.masks[(y as usize / patch) * preview.grid + x as usize / patch];
        let q = recon.get_pixel(x, y);
        if masked {
            changed_masked += usize::from(p != q);
        } else {
            visible += 1;
            same_visible += usize::from(p == q);
        }
    }
    assert_eq!(same_visible, visible, "visible patches must be shown as they were");
    assert!(changed_masked > 0, "the masked patches show no prediction");

    open_tab(&mut harness, Tab::Batch);
    assert_eq!(harness.state().batch.thumbnails(), 4 * 3, "4 samples × (source + input crop + reconstruction)");
    snapshot(&mut harness, "batch-mae", &["sample 0, input crop", "sample 0, reconstruction after step", "the crop MAE reconstructs"]);

    harness.state_mut().state.send(explora::engine::Command::Stop);
    step_until(&mut harness, "the stop", Duration::from_secs(120), |app| !app.state.is_running());
}
