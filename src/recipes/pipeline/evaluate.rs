//! Evaluating one backbone of a comparison: features (cached by a stable key), k-NN, the
//! linear probe, optional fine-tuning, and one report row with its confusion matrix each.

use super::*;

pub(super) fn max_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    }
}

/// The cache key of a feature file: the weights file (path, size, modification time), the
/// input size and the images (a SHA-256 of the paths and labels, the same with every Rust
/// release, so caches survive an upgrade).
pub(super) fn cache_key(weights: &Path, size: u32, items: &[(PathBuf, usize)]) -> String {
    use sha2::{Digest, Sha256};
    let meta = std::fs::metadata(weights).ok();
    let modified = meta.as_ref().and_then(|m| m.modified().ok()).and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
    let mut h = Sha256::new();
    for (path, label) in items {
        h.update(path.to_string_lossy().as_bytes());
        h.update([0]);
        h.update((*label as u64).to_le_bytes());
    }
    let digest: String = h.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect();
    format!("{}|{}|{:?}|size={size}|n={}|{digest}", weights.display(), meta.map_or(0, |m| m.len()), modified, items.len(),)
}

/// What every variant of one comparison is evaluated on.
pub(super) struct Setting<'a> {
    pub(super) config: &'a PipelineConfig,
    pub(super) class_names: &'a [String],
    /// Train, val and test images with their labels.
    pub(super) splits: [&'a Vec<(PathBuf, usize)>; 3],
    /// Input size in pixels.
    pub(super) size: u32,
    pub(super) out: &'a Path,
}

/// The train, val and test features of one variant, and what extracting them cost.
pub(super) struct VariantFeatures {
    pub(super) splits: [Features; 3],
    pub(super) seconds: f64,
    pub(super) memory: Option<u64>,
}

impl VariantFeatures {
    /// The ensemble of two backbones' features: each half L2-normalised, then concatenated, so
    /// the k-NN's cosine similarity is the mean of the two backbones' similarities.
    pub(super) fn ensemble(&self, other: &VariantFeatures) -> VariantFeatures {
        VariantFeatures {
            splits: std::array::from_fn(|i| self.splits[i].concat_normalized(&other.splits[i])),
            seconds: self.seconds + other.seconds,
            memory: max_opt(self.memory, other.memory),
        }
    }
}

/// Features of `variant` on the three splits (cached by a stable key); `None` if a stop
/// command came.
pub(super) fn extract(
    variant: &Variant,
    setting: &Setting<'_>,
    device: &Device,
    ctx: &mut JobContext,
) -> anyhow::Result<Option<VariantFeatures>> {
    let Setting { config, class_names, splits: [train, val, test], size, out } = *setting;
    let weights = variant.weights.as_ref().expect("a variant with a backbone file");
    ctx.info(format!("evaluating the {} backbone ({})", variant.name, weights.display()));
    let began = Instant::now();
    let (model, _) = load_backbone(weights, device)?;
    let pre = Preprocess::new(size);
    let mut features: Vec<Features> = Vec::new();
    for (split, items) in [(Split::Train, train), (Split::Val, val), (Split::Test, test)] {
        let list = crate::data::ImageList {
            root: PathBuf::new(),
            items: items.iter().map(|(p, l)| crate::data::ImageItem { path: p.clone(), label: Some(*l) }).collect(),
            classes: class_names.to_vec(),
        };
        let file = out.join("features").join(format!("{}-{split}.safetensors", variant.name));
        let f = cached(&model, &list, &pre, config.data.batch, &file, &cache_key(weights, size, items), ctx)?;
        if f.stopped {
            return Ok(None);
        }
        features.push(f);
    }
    let seconds = began.elapsed().as_secs_f64();
    let memory = crate::device::memory_reserved(device);
    let splits: [Features; 3] = features.try_into().map_err(|_| anyhow::anyhow!("three splits"))?;
    Ok(Some(VariantFeatures { splits, seconds, memory }))
}

/// Features, k-NN, linear probe (and fine-tuning) of one variant; `None` if a stop command
/// came, else its features (for an ensemble).
pub(super) fn evaluate(
    variant: &Variant,
    setting: &Setting<'_>,
    device: &Device,
    ctx: &mut JobContext,
    summary: &mut PipelineSummary,
) -> anyhow::Result<Option<VariantFeatures>> {
    let Some(features) = extract(variant, setting, device, ctx)? else { return Ok(None) };
    Ok(score(variant, &features, setting, device, ctx, summary)?.then_some(features))
}

/// k-NN, the linear probe and (for a variant with its own backbone file) fine-tuning on
/// `features`, one report row each; false if a stop command came.
pub(super) fn score(
    variant: &Variant,
    features: &VariantFeatures,
    setting: &Setting<'_>,
    device: &Device,
    ctx: &mut JobContext,
    summary: &mut PipelineSummary,
) -> anyhow::Result<bool> {
    let Setting { config, class_names, splits: [train, val, test], size, out } = *setting;
    let classes = class_names.len();
    let [ftrain, fval, ftest] = &features.splits;
    let extract_seconds = features.seconds;
    let (ytrain, yval, ytest) = (ftrain.labels()?, fval.labels()?, ftest.labels()?);
    let base_row = |method: &str, m: &Metrics, eval_trainable: usize, seconds: f64, note: String| Row {
        variant: variant.name.clone(),
        method: method.into(),
        top1: m.top1,
        top5: m.top5,
        macro_f1: m.macro_f1,
        per_class: m.per_class.clone(),
        pretrain_trainable: variant.pretrain_trainable,
        eval_trainable,
        images_seen: variant.images_seen,
        seconds: variant.seconds + extract_seconds + seconds,
        peak_gpu_bytes: max_opt(variant.peak_gpu_bytes, features.memory),
        note,
        correct: m.correct.clone(),
    };

    // k-NN on the CLS token (DINO).
    let t = Instant::now();
    let knn = knn_classify(&ftrain.cls, &ytrain, &ftest.cls, &ytest, ftrain.dim, classes, config.knn);
    let row = base_row("knn", &knn, 0, t.elapsed().as_secs_f64(), format!("k = {}, T = {}", config.knn.k, config.knn.temperature));
    record(out, row, &knn, class_names, ctx, summary)?;

    // Linear probe on [CLS ‖ mean patch] (DINOv2).
    let t = Instant::now();
    let (xtrain, xval, xtest) = (ftrain.cls_and_patch_mean(), fval.cls_and_patch_mean(), ftest.cls_and_patch_mean());
    let dim = 2 * ftrain.dim;
    let probe = train_probe(
        Labelled { features: &xtrain, labels: &ytrain },
        Labelled { features: &xval, labels: &yval },
        dim,
        classes,
        &config.probe,
        config.data.seed,
    );
    let metrics = Metrics::from_scores(&probe.probe.scores(&xtest), classes, &ytest);
    let note = format!(
        "lr {} wd {} (val top-1 {:.1}%; sweep of {})",
        probe.best.lr,
        probe.best.weight_decay,
        100.0 * probe.best.val_top1,
        probe.sweep.len()
    );
    let row = base_row("linear-probe", &metrics, dim * classes + classes, t.elapsed().as_secs_f64(), note);
    let dir = record(out, row, &metrics, class_names, ctx, summary)?;
    std::fs::write(dir.join("sweep.json"), serde_json::to_string_pretty(&probe.sweep)?)?;

    // Fine-tuning: LoRA by default, or one run per preset asked for (an ensemble has no single
    // backbone to fine-tune).
    if let (Some(ft), Some(weights)) = (&config.finetune, &variant.weights) {
        let presets = if config.finetune_presets.is_empty() { vec![ft.plan.preset.clone()] } else { config.finetune_presets.clone() };
        for preset in presets {
            let mut ft = ft.clone();
            ft.plan.preset = preset.clone();
            let method = format!("finetune-{preset}").replace(':', "");
            let dir = out.join("eval").join(format!("{}-{method}", variant.name));
            let result = finetune(weights, classes, train, val, test, size, &ft, config.data.seed, &dir, device, ctx)?;
            if result.stopped {
                return Ok(false);
            }
            let note =
                format!("best epoch {} of {} (val top-1 {:.1}%)", result.best_epoch, result.epochs_run, 100.0 * result.best_val_top1);
            let mut row = base_row(&method, &result.test, result.trainable, result.seconds - extract_seconds, note);
            row.images_seen += result.images_seen;
            row.peak_gpu_bytes = max_opt(row.peak_gpu_bytes, result.peak_gpu_bytes);
            record(out, row, &result.test, class_names, ctx, summary)?;
        }
    }
    Ok(true)
}

/// Writes a row's metrics and confusion matrix, logs it and adds it to the summary.
pub(super) fn record(
    out: &Path,
    row: Row,
    metrics: &Metrics,
    classes: &[String],
    ctx: &mut JobContext,
    summary: &mut PipelineSummary,
) -> anyhow::Result<PathBuf> {
    let dir = out.join("eval").join(format!("{}-{}", row.variant, row.method));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("metrics.json"),
        serde_json::to_string_pretty(&serde_json::json!({ "row": &row, "metrics": metrics, "classes": classes }))?,
    )?;
    let title = format!("{} backbone, {}: top-1 {:.1}% on {} test images", row.variant, row.method, 100.0 * row.top1, metrics.samples);
    let png = dir.join("confusion.png");
    crate::eval::figure::confusion_matrix(&metrics.confusion, classes, &title)
        .save(&png)
        .with_context(|| format!("writing {}", png.display()))?;
    ctx.info(format!(
        "{} / {}: top-1 {:.1}%, top-5 {:.1}%, macro-F1 {:.3} ({})",
        row.variant,
        row.method,
        100.0 * row.top1,
        100.0 * row.top5,
        row.macro_f1,
        row.note
    ));
    ctx.artifact(format!("confusion matrix, {} {}", row.variant, row.method), &png);
    summary.rows.push(row);
    Ok(dir)
}
