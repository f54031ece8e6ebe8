//! `explora pipeline`: "did extended pre-training help on my domain?" For one backbone and
//! one labelled dataset it evaluates (a) the source backbone as it is and (b) the backbone
//! after ExPLoRA pre-training on the training split's images (labels unused), each with k-NN
//! and a linear probe (and optionally LoRA fine-tuning), and writes the comparison:
//!
//! - `pipeline.toml` (the config), `splits.csv` (path, label, split of every image);
//! - `pretrain/` — the ExPLoRA run folder (resumed if the pipeline is run again); with
//!   `objectives = [...]` one `pretrain-<objective>/` per objective;
//! - `features/<variant>-<split>.safetensors` — cached features (reused while the backbone,
//!   image size and images are the same);
//! - `eval/<variant>-<method>/` — `metrics.json`, `confusion.png`;
//! - `report.md`, `report.csv` — one row per variant and method.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{load_backbone, load_backbone_with, save_backbone};
use crate::data::{LabelledSet, Preprocess, Split, Splits, ensure_shifted_image_folder};
use crate::engine::JobContext;
use crate::eval::embed::{Features, cached};
use crate::eval::finetune::{FinetuneConfig, finetune};
use crate::eval::linear::{Labelled, ProbeConfig, train_probe};
use crate::eval::{Metrics, knn_classify};
use crate::inspect::KnnConfig;
use crate::model::VitConfig;
use crate::train::config::ModelSection;
use crate::train::{PretrainConfig, PretrainJob, pretrain};

mod evaluate;
mod report;

use evaluate::{Setting, evaluate, score};
use report::{report_csv, report_md};

/// The labelled dataset and how it is split and fed to the backbone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LabelledSection {
    /// An ImageFolder or a `path,label` CSV manifest. Without it, a procedural labelled set
    /// (5 scene classes) is generated into the run folder.
    pub labelled: Option<PathBuf>,
    /// Class names in order (optional; default: sorted folder names or labels).
    pub classes: Option<Vec<String>>,
    /// Train, validation and test fractions (stratified per class).
    pub split: [f64; 3],
    /// Use at most this many images per class (0: all).
    pub max_per_class: usize,
    /// Input size for evaluation (a multiple of the patch size).
    pub image_size: u32,
    /// Feature-extraction batch.
    pub batch: usize,
    /// Procedural set: tiles per class, their size and the sensor they are seen through.
    pub procedural_per_class: usize,
    pub procedural_size: u32,
    pub procedural_shift: crate::data::Shift,
    pub seed: u64,
    /// Which images ExPLoRA pre-trains on (labels unused either way).
    pub pretrain_on: PretrainOn,
}

/// The unlabelled images of the pre-training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PretrainOn {
    /// The training split.
    #[default]
    Train,
    /// Every image of the labelled set outside the validation and test splits, including
    /// those `max_per_class` leaves out of the evaluation (the usual situation: many
    /// unlabelled tiles, few labels).
    AllButHeldOut,
}

impl Default for LabelledSection {
    fn default() -> Self {
        Self {
            labelled: None,
            classes: None,
            split: [0.6, 0.2, 0.2],
            max_per_class: 0,
            image_size: 224,
            batch: 64,
            procedural_per_class: 40,
            procedural_size: 64,
            procedural_shift: crate::data::Shift::Source,
            seed: 0,
            pretrain_on: PretrainOn::Train,
        }
    }
}

/// Everything `explora pipeline` does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    pub model: ModelSection,
    pub data: LabelledSection,
    /// The ExPLoRA pre-training; its `model` and `data` are set by the pipeline (the backbone
    /// above, the training split's images).
    pub pretrain: PretrainConfig,
    pub knn: KnnConfig,
    pub probe: ProbeConfig,
    /// Present: LoRA fine-tuning (or the plan given here) of both variants as a third method.
    pub finetune: Option<FinetuneConfig>,
    /// Fine-tune once per preset named here (e.g. `["lora", "full", "linear"]`) instead of
    /// only with `finetune.plan`; each is a row `finetune-<preset>`.
    pub finetune_presets: Vec<String>,
    /// Pre-train once per objective named here (e.g. `["dinov2", "mae", "upstep"]`), each from
    /// the same `[pretrain]` settings with its own `objective`, into `pretrain-<objective>/`, and
    /// evaluate each beside the source backbone as variant `explora-<objective>` (UpStep also as
    /// `explora-upstep+source`, the ensemble of its features with the base model's). Empty:
    /// one run with `pretrain.objective`, variant `explora`.
    pub objectives: Vec<crate::train::Objective>,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        let mut pretrain = PretrainConfig::default();
        pretrain.monitor.knn_every = 0;
        Self {
            model: ModelSection::default(),
            data: LabelledSection::default(),
            pretrain,
            knn: KnnConfig::default(),
            probe: ProbeConfig::default(),
            finetune: None,
            finetune_presets: Vec::new(),
            objectives: Vec::new(),
        }
    }
}

fn bad(field: &str, reason: impl std::fmt::Display) -> anyhow::Error {
    crate::fields::FieldError::pipeline(field, reason.to_string()).into()
}

impl PipelineConfig {
    /// The built-in comparison: the shipped source backbone (the tiny ViT pre-trained on the
    /// procedural source domain) on a labelled set of the shifted target domain, with a short
    /// ExPLoRA pre-training — every stage in minutes on any machine.
    pub fn builtin(software: bool) -> Self {
        let mut c = Self::default();
        c.model.weights = Some(PathBuf::from(crate::checkpoint::builtin::SOURCE_TINY));
        c.data.procedural_shift = crate::data::Shift::Target;
        c.data.image_size = 32;
        c.data.batch = 32;
        c.pretrain = if software { PretrainConfig::builtin_software() } else { PretrainConfig::builtin() };
        c.pretrain.monitor.knn_every = 0;
        c.pretrain.crops.global_size = 32;
        c.pretrain.crops.local_size = 16;
        // UpStep's k-means on the 120 training tiles (with --objectives upstep).
        c.pretrain.upstep.centres = 32;
        c.probe.epochs = 50;
        c
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read pipeline config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("pipeline config {}: {e}", path.display()))
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config serialises")
    }

    /// Checks what needs no model; errors name the field.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.model.weights.is_none() && self.model.arch.is_none() {
            return Err(bad("model", "give `weights` (a checkpoint) or `arch` (a preset, random weights)"));
        }
        if let Some(w) = &self.model.weights
            && !crate::checkpoint::builtin::exists(w)
        {
            return Err(bad("model.weights", format!("{} does not exist", w.display())));
        }
        if let Some(l) = &self.data.labelled
            && !l.exists()
        {
            return Err(bad("data.labelled", format!("{} does not exist", l.display())));
        }
        let d = &self.data;
        if d.image_size < 8 {
            return Err(bad("data.image_size", "must be at least 8 pixels"));
        }
        if d.batch == 0 {
            return Err(bad("data.batch", "must be at least 1"));
        }
        if d.labelled.is_none() && (d.procedural_per_class < 3 || d.procedural_size < 8) {
            return Err(bad("data.procedural_per_class", "needs ≥ 3 tiles per class of ≥ 8 px"));
        }
        if self.knn.k == 0 || !(self.knn.temperature > 0.0) {
            return Err(bad("knn", "k must be ≥ 1 and temperature > 0"));
        }
        self.probe.validate().map_err(|e| bad("probe", e))?;
        if let Some(f) = &self.finetune {
            f.validate().map_err(|(field, reason)| bad(&format!("finetune.{field}"), reason))?;
        }
        if let Some(p) = self.finetune_presets.iter().find(|p| p.parse::<crate::peft::Preset>().is_err()) {
            return Err(bad("finetune_presets", format!("`{p}` is not a preset (explora, lora, linear, full, blocks:K)")));
        }
        if !self.finetune_presets.is_empty() && self.finetune.is_none() {
            return Err(bad("finetune_presets", "needs a [finetune] section"));
        }
        if let Some(o) = self.objectives.iter().enumerate().find_map(|(i, o)| self.objectives[..i].contains(o).then_some(o)) {
            return Err(bad("objectives", format!("`{}` is named twice", o.name())));
        }
        for (_, pre) in self.pretrain_runs() {
            pre.validate().map_err(|e| e.within("pipeline config", "pretrain"))?;
        }
        Ok(())
    }

    /// The pre-training runs of the comparison: (variant name, run config without data), one
    /// per entry of `objectives`, or the one `[pretrain]` describes.
    pub fn pretrain_runs(&self) -> Vec<(String, PretrainConfig)> {
        let mut pre = self.pretrain.clone();
        pre.model = self.model.clone();
        pre.data.images = None;
        // The pipeline runs its own comparison; a run config's `[evaluate]` does not apply.
        pre.evaluate = Default::default();
        if self.objectives.is_empty() {
            return vec![("explora".to_string(), pre)];
        }
        self.objectives
            .iter()
            .map(|&objective| (format!("explora-{}", objective.name()), PretrainConfig { objective, ..pre.clone() }))
            .collect()
    }
}

/// One line of the comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub variant: String,
    pub method: String,
    pub top1: f64,
    pub top5: f64,
    pub macro_f1: f64,
    pub per_class: Vec<f64>,
    /// Parameters ExPLoRA pre-training trained (0 for the source backbone).
    pub pretrain_trainable: usize,
    /// Parameters the evaluation itself trained (probe head; fine-tune adapters + head).
    pub eval_trainable: usize,
    /// Images through the backbone in training: pre-training plus fine-tuning.
    pub images_seen: u64,
    /// Pre-training + feature extraction + the method, in seconds.
    pub seconds: f64,
    pub peak_gpu_bytes: Option<u64>,
    /// What the method chose (probe lr, fine-tune epoch).
    pub note: String,
    /// Per test image, whether the top-1 prediction was right (for the paired bootstrap).
    #[serde(skip)]
    pub correct: Vec<bool>,
}

/// One method's change from the source backbone to an adapted one on the same test images.
#[derive(Debug, Clone, Serialize)]
pub struct Delta {
    /// The adapted variant (`explora`, or `explora-<objective>` when objectives were named).
    pub variant: String,
    pub method: String,
    pub source_top1: f64,
    pub explora_top1: f64,
    /// `explora − source`, in accuracy (0-1).
    pub delta: f64,
    /// 95 % paired-bootstrap interval of `delta` over the test images (2,000 resamples).
    pub interval: Option<(f64, f64)>,
}

impl Delta {
    /// Whether the interval excludes 0: the change is larger than the test split's sampling
    /// noise.
    pub fn significant(&self) -> bool {
        self.interval.is_some_and(|(lo, hi)| lo > 0.0 || hi < 0.0)
    }

    /// `knn: 43.3% → 51.7% (+8.3 points, 95% CI +3.3 to +13.3: beyond sampling noise)`.
    pub fn describe(&self) -> String {
        let interval = match self.interval {
            Some((lo, hi)) => format!(
                ", 95% CI {:+.1} to {:+.1}: {}",
                100.0 * lo,
                100.0 * hi,
                if self.significant() { "beyond the test split's sampling noise" } else { "within the test split's sampling noise" }
            ),
            None => String::new(),
        };
        let label = if self.variant == "explora" { self.method.clone() } else { format!("{} {}", self.variant, self.method) };
        format!(
            "{label}: {:.1}% → {:.1}% ({:+.1} points{interval})",
            100.0 * self.source_top1,
            100.0 * self.explora_top1,
            100.0 * self.delta
        )
    }
}

/// What the pipeline produced.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineSummary {
    pub rows: Vec<Row>,
    pub classes: Vec<String>,
    pub split_sizes: [usize; 3],
    pub stopped: bool,
}

impl PipelineSummary {
    /// Per adapted variant and method also evaluated on the source backbone: source → adapted
    /// top-1 and the difference with its bootstrap interval.
    pub fn deltas(&self) -> Vec<Delta> {
        let source = |method: &str| self.rows.iter().find(|r| r.variant == "source" && r.method == method);
        self.rows
            .iter()
            .filter(|r| r.variant != "source")
            .filter_map(|b| {
                let a = source(&b.method)?;
                Some(Delta {
                    variant: b.variant.clone(),
                    method: a.method.clone(),
                    source_top1: a.top1,
                    explora_top1: b.top1,
                    delta: b.top1 - a.top1,
                    interval: crate::eval::metrics::paired_bootstrap(&a.correct, &b.correct, 2000, 0xB007),
                })
            })
            .collect()
    }

    /// One line: top-1 of each method before → after ExPLoRA, with the difference.
    pub fn headline(&self) -> String {
        let parts: Vec<String> = self.deltas().iter().map(Delta::describe).collect();
        if parts.is_empty() { "no comparison (stopped early)".into() } else { format!("top-1, source → ExPLoRA: {}", parts.join("; ")) }
    }
}

/// The name of the variant that ensembles `variant`'s features with the source backbone's.
fn ensemble_name(variant: &str) -> String {
    format!("{variant}+source")
}

struct Variant {
    name: String,
    /// The backbone file (`None` for an ensemble of two).
    weights: Option<PathBuf>,
    pretrain_trainable: usize,
    images_seen: u64,
    seconds: f64,
    peak_gpu_bytes: Option<u64>,
}

/// Runs the comparison into `out`; running it again continues where it stopped.
pub fn run_pipeline(config: &PipelineConfig, out: &Path, device: &Device, ctx: &mut JobContext) -> anyhow::Result<PipelineSummary> {
    run_comparison(config, out, None, device, ctx)
}

/// Compares the base backbone of the finished pre-training run in `run` with the backbone it
/// produced, on the labelled set `labelled` (k-NN and linear probe at the run's global crop
/// size), and writes the comparison into `<run>/evaluation/`. This is what the app does after
/// a run when a labelled folder is given.
pub fn evaluate_run(run: &Path, labelled: &Path, device: &Device, ctx: &mut JobContext) -> anyhow::Result<PipelineSummary> {
    let summary_path = run.join("summary.json");
    if !summary_path.exists() {
        anyhow::bail!("{} has not finished pre-training (no summary.json): resume it first", run.display());
    }
    let done: crate::train::PretrainSummary = serde_json::from_str(&std::fs::read_to_string(&summary_path)?)?;
    let pretrain = PretrainConfig::load(&run.join("config.toml"))?;
    let mut config = PipelineConfig { model: pretrain.model.clone(), pretrain, ..PipelineConfig::default() };
    config.data.labelled = Some(labelled.to_path_buf());
    config.data.image_size = config.pretrain.crops.global_size;
    config.data.seed = config.pretrain.run.seed;
    let adapted = Finished { dir: run.to_path_buf(), summary: done };
    run_comparison(&config, &run.join("evaluation"), Some(adapted), device, ctx)
}

/// A pre-training run that already finished.
struct Finished {
    dir: PathBuf,
    summary: crate::train::PretrainSummary,
}

fn run_comparison(
    config: &PipelineConfig,
    out: &Path,
    finished: Option<Finished>,
    device: &Device,
    ctx: &mut JobContext,
) -> anyhow::Result<PipelineSummary> {
    config.validate()?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join("pipeline.toml"), config.to_toml())?;
    let seed = config.data.seed;

    // Data and splits.
    ctx.phase(crate::engine::Phase::step("preparing the labelled set"), None);
    let labelled_path = match &config.data.labelled {
        Some(p) => p.clone(),
        None => {
            let dir = out.join("data");
            let d = &config.data;
            ensure_shifted_image_folder(&dir, d.procedural_per_class, d.procedural_size, seed, d.procedural_shift)?;
            dir
        }
    };
    let set = LabelledSet::open(&labelled_path, config.data.classes.as_deref())?;
    let splits = Splits::stratified(&set, config.data.split, config.data.max_per_class, seed)?;
    splits.save(&set, &out.join("splits.csv"))?;
    let items = |split: Split| -> Vec<(PathBuf, usize)> { splits.get(split).iter().map(|&i| set.items[i].clone()).collect() };
    let (train, val, test) = (items(Split::Train), items(Split::Val), items(Split::Test));
    let classes = set.classes.len();
    ctx.info(format!(
        "{}: {} images in {classes} classes; split {} train / {} val / {} test (seed {seed})",
        set.origin.display(),
        set.len(),
        train.len(),
        val.len(),
        test.len()
    ));

    // The source backbone: the given checkpoint, or seeded random weights saved once.
    let arch = match &config.model.arch {
        Some(name) => Some(VitConfig::preset(name).ok_or_else(|| bad("model.arch", format!("{name} is not a preset")))?),
        None => None,
    };
    let source_weights = match &config.model.weights {
        Some(w) => w.clone(),
        None => {
            let path = out.join("base.safetensors");
            if !path.exists() {
                device.seed(seed);
                save_backbone(&arch.clone().expect("validated: weights or arch").init(device), &path)?;
            }
            path
        }
    };
    let vit = load_backbone_with(&source_weights, arch.clone(), device)?.0.config().clone();
    let size = config.data.image_size;
    anyhow::ensure!(
        (size as usize).is_multiple_of(vit.patch_size),
        "invalid pipeline config: `data.image_size` {size} is not a multiple of the model's patch size {}",
        vit.patch_size
    );

    let mut summary = PipelineSummary {
        rows: Vec::new(),
        classes: set.classes.clone(),
        split_sizes: [train.len(), val.len(), test.len()],
        stopped: false,
    };
    let source = Variant {
        name: "source".into(),
        weights: Some(source_weights.clone()),
        pretrain_trainable: 0,
        images_seen: 0,
        seconds: 0.0,
        peak_gpu_bytes: None,
    };
    let setting = Setting { config, class_names: &set.classes, splits: [&train, &val, &test], size, out };
    let Some(source_features) = evaluate(&source, &setting, device, ctx, &mut summary)? else {
        summary.stopped = true;
        return Ok(summary);
    };

    // ExPLoRA pre-training on the training images (labels unused), once per objective, or the
    // finished run given.
    let runs = config.pretrain_runs();
    // The unlabelled images of the pre-training.
    let (pretrain_images, pretrain_what): (Vec<&PathBuf>, String) = match config.data.pretrain_on {
        PretrainOn::Train => (train.iter().map(|(p, _)| p).collect(), "the training split (labels unused)".into()),
        PretrainOn::AllButHeldOut => {
            let pool: Vec<&PathBuf> = splits.outside_held_out(set.len()).into_iter().map(|i| &set.items[i].0).collect();
            let what = format!("{} images outside the validation and test splits (labels unused)", pool.len());
            (pool, what)
        }
    };
    // What needs their number is checked before any run starts.
    for (_, run) in runs.iter().filter(|(_, r)| r.objective == crate::train::Objective::Upstep) {
        run.upstep.check_images(pretrain_images.len()).map_err(|e| e.within("pipeline config", "pretrain"))?;
    }
    // Named objectives each get their own folder (even one), as their variants are named.
    let named = !config.objectives.is_empty();
    // What the runs trained on; the list is written once for all of them.
    let list = out.join("train-images.txt");
    let pre_data = match &finished {
        Some(_) => match (&config.pretrain.data.images, &config.pretrain.data.list) {
            (Some(p), _) | (None, Some(p)) => format!("`{}`", p.display()),
            (None, None) => "procedural tiles".to_string(),
        },
        None => {
            let lines: String = pretrain_images.iter().map(|p| format!("{}\n", p.display())).collect();
            std::fs::write(&list, lines)?;
            pretrain_what
        }
    };
    let mut finished = finished;
    let mut trained: Vec<(String, PretrainConfig)> = Vec::new();
    for (name, run_config) in runs {
        let (pre_dir, pre_config, pre_summary, pre_seconds) = match finished.take() {
            Some(run) => {
                let seconds = run.summary.images_seen as f64 / run.summary.images_per_second.max(1e-9);
                (run.dir, config.pretrain.clone(), run.summary, seconds)
            }
            None => {
                let folder = if named { format!("pretrain-{}", run_config.objective.name()) } else { "pretrain".to_string() };
                let pre_dir = out.join(folder);
                std::fs::create_dir_all(&pre_dir)?;
                let mut pre_config = run_config;
                pre_config.model = ModelSection { weights: Some(source_weights.clone()), arch: config.model.arch.clone() };
                pre_config.data.list = Some(list.clone());
                pre_config.run.seed = seed;
                let began = Instant::now();
                let summary_path = pre_dir.join("summary.json");
                let (pre_summary, seconds) = if summary_path.exists() {
                    ctx.info(format!("pre-training already done in {} (delete the folder to redo it)", pre_dir.display()));
                    let s: crate::train::PretrainSummary = serde_json::from_str(&std::fs::read_to_string(&summary_path)?)?;
                    let seconds = s.images_seen as f64 / s.images_per_second.max(1e-9);
                    (s, seconds)
                } else {
                    if named {
                        ctx.info(format!("pre-training with the {} objective into {}", pre_config.objective.name(), pre_dir.display()));
                    }
                    let resume = !crate::train::state::list(&pre_dir).is_empty();
                    let job = PretrainJob { config: pre_config.clone(), out: pre_dir.clone(), resume };
                    let s = pretrain(&job, device, ctx)?;
                    if s.stopped_early {
                        summary.stopped = true;
                        return Ok(summary);
                    }
                    (s, began.elapsed().as_secs_f64())
                };
                (pre_dir, pre_config, pre_summary, seconds)
            }
        };
        // The plan the run trained (UpStep's own LoRA plan when `[pretrain.plan]` is left out).
        let plan = pre_config.resolve_plan(&vit).map_err(|e| anyhow::anyhow!("[pretrain.plan] {e}"))?;
        let adapted = Variant {
            name: name.clone(),
            weights: Some(pre_dir.join("backbone.safetensors")),
            pretrain_trainable: plan.budget(&vit).trainable,
            images_seen: pre_summary.images_seen,
            seconds: pre_seconds,
            peak_gpu_bytes: pre_summary.peak_gpu_bytes,
        };
        let Some(adapted_features) = evaluate(&adapted, &setting, device, ctx, &mut summary)? else {
            summary.stopped = true;
            return Ok(summary);
        };
        // UpStep keeps its base model: its features beside the adapted ones are a third row
        // (the base model alone is the source row).
        if pre_config.objective == crate::train::Objective::Upstep {
            let ensemble = Variant { name: ensemble_name(&name), weights: None, ..adapted };
            ctx.info(format!("evaluating the {} ensemble (adapted and base features, each L2-normalised, concatenated)", ensemble.name));
            if !score(&ensemble, &adapted_features.ensemble(&source_features), &setting, device, ctx, &mut summary)? {
                summary.stopped = true;
                return Ok(summary);
            }
        }
        trained.push((name, pre_config));
    }

    ctx.phase(crate::engine::Phase::step("writing the report"), None);
    std::fs::write(out.join("report.csv"), report_csv(&summary))?;
    std::fs::write(out.join("report.md"), report_md(config, &summary, &set, &trained, &pre_data))?;
    ctx.artifact("comparison report", out.join("report.md"));
    Ok(summary)
}
