//! The binary as a person uses it: exit codes, messages, files written.

use std::path::Path;
use std::process::{Command, Output};

use explora::checkpoint::save_backbone;
use explora::data::generate_image_folder;
use explora::model::VitConfig;

use crate::common::*;

fn explora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_explora")).args(args).output().expect("run explora")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn tiny_weights(dir: &Path) -> String {
    let path = dir.join("tiny.safetensors");
    save_backbone(&VitConfig::tiny().init(&device()), &path).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn info_lists_adapters_and_the_one_in_use() {
    let out = explora(&["info"]);
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("--device cpu") && t.contains("burn's native CPU backend") && t.contains("explora uses"), "{t}");
    let out = explora(&["info", "--device", "cpu"]);
    assert!(text(&out).contains("explora uses (--device cpu): CPU (burn-flex"), "{}", text(&out));
    let out = explora(&["info", "--device", "tpu"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("unknown device `tpu`") && text(&out).contains("software"), "{}", text(&out));
}

#[test]
fn embed_skips_and_names_corrupt_images() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    generate_image_folder(&images, 3, 64, 7).unwrap();
    std::fs::write(images.join("water").join("broken.png"), b"not a png").unwrap();
    let weights = tiny_weights(dir.path());
    let features = dir.path().join("features.safetensors");
    let out = explora(&[
        "embed",
        "--weights",
        &weights,
        "--images",
        images.to_str().unwrap(),
        "--out",
        features.to_str().unwrap(),
        "--size",
        "64",
        "--batch",
        "4",
    ]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("embedded 15 images") && t.contains("1 skipped"), "{t}");
    assert!(t.contains("broken.png"), "the skipped file is named: {t}");
    let map = read(features);
    assert_eq!(map["cls"].shape, vec![15, 64]);
    assert_eq!(map["patch_mean"].shape, vec![15, 64]);
    assert_eq!(map["labels"].data.iter().filter(|l| **l == 4.0).count(), 3, "water is class 4 of 5");
}

#[test]
fn embed_and_attention_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let out = explora(&["embed", "--weights", "/nonexistent/w.pth", "--images", dir.path().to_str().unwrap(), "--out", "x"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("no images"), "empty folder first: {}", text(&out));
    let images = dir.path().join("imgs");
    generate_image_folder(&images, 1, 64, 1).unwrap();
    let out = explora(&["embed", "--weights", "/nonexistent/w.pth", "--images", images.to_str().unwrap(), "--out", "x"]);
    assert!(text(&out).contains("/nonexistent/w.pth does not exist"), "{}", text(&out));
    let weights = tiny_weights(dir.path());
    let image = images.join("roads").join("roads_0.png");
    let out = explora(&[
        "attention",
        "--weights",
        &weights,
        "--image",
        image.to_str().unwrap(),
        "--layer",
        "9",
        "--out",
        "a.png",
        "--size",
        "64",
    ]);
    assert!(text(&out).contains("--layer 9 is out of range: the model has blocks 0..=3"), "{}", text(&out));
    let out = explora(&["attention", "--weights", &weights, "--image", image.to_str().unwrap(), "--out", "a.png", "--size", "60"]);
    assert!(text(&out).contains("not a multiple of the model's patch size 8"), "{}", text(&out));
}

#[test]
fn attention_writes_a_heatmap_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("imgs");
    generate_image_folder(&images, 1, 64, 3).unwrap();
    // The shipped source backbone: its attention has structure (a random ViT's is nearly flat,
    // and the arg-max of a flat map is noise).
    let weights = explora::checkpoint::builtin::SOURCE_TINY.to_string();
    let png = dir.path().join("maps").join("roofs.png");
    let image = images.join("roofs").join("roofs_0.png");
    let out = explora(&[
        "attention",
        "--weights",
        &weights,
        "--image",
        image.to_str().unwrap(),
        "--head",
        "1",
        "--out",
        png.to_str().unwrap(),
        "--size",
        "64",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let overlay = image::open(&png).unwrap().to_rgb8();
    assert_eq!(overlay.dimensions(), (64, 64));

    // The written overlay's heat follows the attention map: the map in-process (same weights,
    // image and head) against the heat of each patch, recovered from the PNG by undoing the
    // blend over the image as shown. (Bilinear upsampling mixes neighbouring patches, so the
    // check is a correlation and the hottest drawn patch being among the most attended.)
    let device = device();
    let (model, _) = explora::checkpoint::load_backbone(Path::new(&weights), &device).unwrap();
    let pre = explora::data::Preprocess::new(64);
    let picture = explora::data::decode_rgb(&image).unwrap();
    let shown = pre.apply(&picture);
    let x = explora::inspect::images_tensor(pre.to_tensor_data(&picture), 1, 64, &device);
    let map = explora::inspect::cls_attention(&model, x, 3, Some(1)).unwrap();
    let (alpha, patch) = (0.55f32, 64 / map.cols as u32);
    let mut heat = vec![0f32; map.values.len()];
    for (x, y, p) in overlay.enumerate_pixels() {
        let base = shown.get_pixel(x, y);
        // Luminance of the heat colour: increases with the attention value.
        let lum: f32 = [0.2126f32, 0.7152, 0.0722]
            .iter()
            .enumerate()
            .map(|(c, w)| w * (p[c] as f32 - (1.0 - alpha) * base[c] as f32) / (alpha * 255.0))
            .sum();
        heat[(y / patch) as usize * map.cols + (x / patch) as usize] += lum;
    }
    let pearson = |a: &[f32], b: &[f32]| {
        let (ma, mb) = (a.iter().sum::<f32>() / a.len() as f32, b.iter().sum::<f32>() / b.len() as f32);
        let cov: f32 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
        let (va, vb): (f32, f32) = (a.iter().map(|x| (x - ma).powi(2)).sum(), b.iter().map(|y| (y - mb).powi(2)).sum());
        cov / (va * vb).sqrt()
    };
    let r = pearson(&heat, &map.values);
    eprintln!("drawn heat vs attention: correlation {r:.3}");
    assert!(r > 0.8, "drawn heat vs attention: correlation {r}; map {:?}", map.values);
    let hottest = heat.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    let mut ranked = map.values.clone();
    ranked.sort_by(|a, b| b.total_cmp(a));
    let top_tenth = ranked[ranked.len() / 10];
    assert!(map.values[hottest] >= top_tenth, "the hottest drawn patch {hottest} is not among the most attended; map {:?}", map.values);
}

#[test]
fn runs_with_relative_paths_resume_from_another_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (here, elsewhere) = (dir.path().join("here"), dir.path().join("elsewhere"));
    std::fs::create_dir_all(&elsewhere).unwrap();
    generate_image_folder(&here.join("imgs"), 6, 48, 1).unwrap();
    let run = |cwd: &Path, args: &[&str]| Command::new(env!("CARGO_BIN_EXE_explora")).current_dir(cwd).args(args).output().unwrap();
    let small = ["--crops", "32,16", "--local-crops", "2", "--batch", "4", "--prototypes", "64", "--checkpoint-every", "1"];
    let mut args = vec!["--no-gui", "--device", "cpu", "pretrain", "--images", "imgs", "--steps", "1", "--out", "run"];
    args.extend(small);
    let out = run(&here, &args);
    assert!(out.status.success(), "{}", text(&out));
    // The run folder's config names the images by absolute path, so it resumes from anywhere.
    let config = explora::train::PretrainConfig::load(&here.join("run/config.toml")).unwrap();
    assert_eq!(config.data.images.as_deref(), Some(here.join("imgs").as_path()));
    let out = run(&elsewhere, &["--no-gui", "--device", "cpu", "resume", here.join("run").to_str().unwrap(), "--steps", "2"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("pre-trained 2 steps"), "{t}");
}

#[test]
fn the_default_run_pretrains_and_writes_its_results() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let out = explora(&["--no-gui", "default", "--steps", "3", "--out", run.to_str().unwrap()]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("default run finished: ExPLoRA pre-training of the tiny source backbone on the shifted target domain, 3 steps"),
        "{t}"
    );
    assert!(t.contains("Held-out target tiles") && t.contains("knn: ") && t.contains("linear-probe: "), "{t}");
    assert!(t.contains("explora --no-gui pipeline --config assets/recipes/eurosat-cpu.toml"), "{t}");
    for file in [
        "config.toml",
        "metrics.jsonl",
        "evaluation/report.md",
        "target-tiles/water/water_0.png",
        "backbone.safetensors",
        "adapter.safetensors",
        "report.md",
        "batch-preview.png",
        "attention_water.png",
        "checkpoints/step-0000003.safetensors",
    ] {
        assert!(run.join(file).exists(), "{file} missing; output: {t}");
    }
    let report = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(report.contains("k-NN top-1") && report.contains("steps: 3"), "{report}");
    let lines = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(lines.lines().last().unwrap()).unwrap();
    for key in ["loss", "dino", "ibot", "koleo", "lr", "wd", "teacher_temp", "momentum", "img_per_s", "knn_top1"] {
        assert!(last.get(key).is_some(), "metrics lack {key}: {last}");
    }
    // The run folder's config is a complete, valid pretrain config.
    let config = explora::train::PretrainConfig::load(&run.join("config.toml")).unwrap();
    config.validate().unwrap();
    assert_eq!(config.run.steps, 3);
}

#[test]
fn pretrain_configs_and_flags_are_checked_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = explora(&["pretrain", "--print-config", "--steps", "7", "--overhead"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    let config: explora::train::PretrainConfig = toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(config.run.steps, 7);
    assert!(config.crops.overhead);

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[optim]\nbatch = 8\nlearning_rate = 0.1\n").unwrap();
    let out = explora(&["--no-gui", "pretrain", "--config", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("learning_rate"), "{}", text(&out));

    std::fs::write(&bad, "[model]\narch = \"tiny\"\n[masks]\nratio = [0.6, 0.2]\n").unwrap();
    let out = explora(&["--no-gui", "pretrain", "--config", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("masks.ratio"), "{}", text(&out));

    let out = explora(&["--no-gui", "pretrain", "--images", "/no/such/folder"]);
    assert!(text(&out).contains("`data.images` /no/such/folder is not a folder"), "{}", text(&out));

    let out = explora(&["--no-gui", "resume", dir.path().to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("is not a run folder"), "{}", text(&out));
}

#[test]
fn plan_prints_the_papers_vitl14_budget_and_rejects_bad_ranks() {
    let out = explora(&["plan", "--arch", "vitl14", "--preset", "explora"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    // ExPLoRA paper: block 23 (12.6M) + LoRA r=64 on Q,V (6.0M) = 18.7M trainable.
    for needle in ["unfrozen blocks [23]", "12,598,272", "6,029,312", "18,725,888", "6.15%"] {
        assert!(t.contains(needle), "missing {needle}: {t}");
    }
    let out = explora(&["plan", "--arch", "vits14", "--preset", "lora", "--rank", "400"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("`lora.rank` 400 is larger than the q projection (384→384)"), "{}", text(&out));
    let out = explora(&["plan", "--arch", "tiny", "--unfreeze", "7"]);
    assert!(text(&out).contains("block 7 is out of range: the model has blocks 0..=3"), "{}", text(&out));
}

#[test]
fn plan_lists_the_mae_decoder_beside_an_mae_backbone() {
    let out = explora(&["plan", "--arch", "mae-vitb16"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("unfrozen blocks [11]") && t.contains("LoRA r=64 on q,v of 11 blocks") && t.contains("CLS token"), "{t}");
    assert!(!t.contains("mask token") && !t.contains("patch embedding") && !t.contains("position embeddings"), "{t}");
    let decoder = explora::objectives::mae::DecoderConfig::default().num_params(768, 16);
    let line = "beside the backbone (mae objective): MAE decoder, fresh (512 wide, 8 blocks; ";
    assert!(t.contains(line) && t.contains(&format!("{} parameters", explora::peft::thousands(decoder))), "{t}");
    // A DINOv2 backbone under MAE: its mask token stays frozen.
    let dino = text(&explora(&["plan", "--arch", "vits14"]));
    assert!(dino.contains("mask token") && !dino.contains("MAE decoder"), "{dino}");
    let mae = text(&explora(&["plan", "--arch", "vits14", "--objective", "mae"]));
    assert!(!mae.contains("mask token") && mae.contains("MAE decoder"), "{mae}");
}

#[test]
fn pipeline_prints_its_config_and_names_bad_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let out = explora(&["pipeline", "--print-config", "--steps", "3", "--finetune", "--image-size", "56"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    let config: explora::recipes::pipeline::PipelineConfig = toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!((config.pretrain.run.steps, config.data.image_size), (3, 56));
    assert_eq!(config.finetune.unwrap().plan.lora_rank, Some(8));

    let out = explora(&["--no-gui", "pipeline", "--labelled", "/no/such/set"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("`data.labelled` /no/such/set does not exist"), "{}", text(&out));

    let bad = dir.path().join("pipeline.toml");
    std::fs::write(&bad, "[probe]\nlr = [0.1]\n").unwrap();
    let out = explora(&["--no-gui", "pipeline", "--config", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("unknown field `lr`"), "{}", text(&out));
}

#[test]
fn bench_prints_one_json_line_with_the_reference_keys() {
    let out = explora(&[
        "--no-gui",
        "bench",
        "--arch",
        "tiny",
        "--batch",
        "2",
        "--global-size",
        "32",
        "--local-size",
        "16",
        "--locals",
        "2",
        "--prototypes",
        "64",
        "--rank",
        "4",
        "--unfreeze",
        "3",
        "--infer-batch",
        "2",
        "--infer-size",
        "32",
        "--steps",
        "1",
        "--warmup",
        "0",
    ]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().expect("a JSON line");
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    for key in ["infer_img_per_s", "train_img_per_s", "train_step_ms", "infer_first_s", "train_first_step_s"] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key} is not a positive number: {v}");
    }
    assert_eq!(v["arch"], "tiny");
    assert_eq!(v["batch"], 2);
    assert_eq!(v["prototypes"], 64);
    // The tiny plan: block 3 unfrozen, LoRA r4 on Q,V of blocks 0-2, norms and CLS.
    let trainable = v["trainable_backbone_params"].as_u64().unwrap();
    assert!(trainable > 0 && trainable < v["backbone_params"].as_u64().unwrap(), "{v}");
    assert!(v["device"].as_str().is_some_and(|d| !d.is_empty()), "{v}");

    let out = explora(&["--no-gui", "bench", "--arch", "tiny", "--global-size", "30"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("--global-size 30 is not a multiple of tiny's patch size 8"), "{}", text(&out));
}
