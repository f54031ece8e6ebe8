//! The comparison's report files: `report.csv` (one row per variant and method) and
//! `report.md` (the table, the verdict with bootstrap intervals, per-class accuracy).

use super::*;

pub(super) fn gib(bytes: Option<u64>) -> String {
    bytes.map_or("n/a".into(), |b| format!("{:.2}", b as f64 / (1u64 << 30) as f64))
}

pub(super) fn report_csv(s: &PipelineSummary) -> Vec<u8> {
    let header =
        ["variant", "method", "top1", "top5", "macro_f1", "pretrain_trainable", "eval_trainable", "images_seen", "seconds", "peak_gpu_gib"];
    let rows = s.rows.iter().map(|r| {
        [
            r.variant.clone(),
            r.method.clone(),
            format!("{:.4}", r.top1),
            format!("{:.4}", r.top5),
            format!("{:.4}", r.macro_f1),
            r.pretrain_trainable.to_string(),
            r.eval_trainable.to_string(),
            r.images_seen.to_string(),
            format!("{:.1}", r.seconds),
            gib(r.peak_gpu_bytes),
        ]
    });
    crate::data::table::write(std::iter::once(header.map(String::from)).chain(rows))
}

/// How one pre-training run of the comparison was set up, for the report.
fn describe_run(pre: &PretrainConfig, pre_data: &str) -> String {
    format!(
        "{}, {} steps × {} images on {pre_data}, plan `{}`",
        match pre.objective {
            crate::train::Objective::Dinov2 => "ExPLoRA with the DINOv2 objective",
            crate::train::Objective::Mae => "ExPLoRA with the MAE objective",
            crate::train::Objective::Upstep => "UpStep (explora's interpretation of the abstract)",
        },
        pre.run.steps,
        pre.optim.effective_batch(),
        if pre.objective.uses_own_plan(&pre.plan) { "UpStep's LoRA r = 8 on Q,K,V".to_string() } else { pre.plan.preset.to_string() },
    )
}

pub(super) fn report_md(
    config: &PipelineConfig,
    s: &PipelineSummary,
    set: &LabelledSet,
    runs: &[(String, PretrainConfig)],
    pre_data: &str,
) -> String {
    let pct = |v: f64| if v.is_nan() { "—".to_string() } else { format!("{:.1}", 100.0 * v) };
    let mut md = String::from("# Did ExPLoRA pre-training help?\n\n");
    md.push_str(&format!(
        "- backbone: `{}`\n- labelled set: `{}` ({} images, {} classes); split {} train / {} val / {} test, seed {}\n\
         - evaluation input: {} px; k-NN on the CLS token (k = {}, T = {}); linear probe on [CLS ‖ mean patch], \
         {} settings swept, chosen on val\n{}\n",
        config
            .model
            .weights
            .as_ref()
            .map_or_else(|| format!("{} (random weights)", config.model.arch.clone().unwrap_or_default()), |p| p.display().to_string()),
        set.origin.display(),
        set.len(),
        set.classes.len(),
        s.split_sizes[0],
        s.split_sizes[1],
        s.split_sizes[2],
        config.data.seed,
        config.data.image_size,
        config.knn.k,
        config.knn.temperature,
        config.probe.lrs.len() * config.probe.weight_decays.len(),
        runs.iter()
            .map(|(variant, pre)| {
                let ensemble = if pre.objective == crate::train::Objective::Upstep {
                    format!("; `{}` is the ensemble of its features with the base (source) model's", super::ensemble_name(variant))
                } else {
                    String::new()
                };
                format!("- pre-training (the `{variant}` rows): {}{ensemble}\n", describe_run(pre, pre_data))
            })
            .collect::<String>(),
    ));
    md.push_str("| variant | method | top-1 % | top-5 % | macro-F1 | trained in pre-training | trained in evaluation | images seen | wall time (s) | peak GPU (GiB) | notes |\n");
    md.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
    for r in &s.rows {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {:.3} | {} | {} | {} | {:.1} | {} | {} |\n",
            r.variant,
            r.method,
            pct(r.top1),
            pct(r.top5),
            r.macro_f1,
            r.pretrain_trainable,
            r.eval_trainable,
            r.images_seen,
            r.seconds,
            gib(r.peak_gpu_bytes),
            r.note
        ));
    }
    md.push_str(
        "\n## Verdict\n\nTop-1 on the test split, source → ExPLoRA, with the 95 % paired-bootstrap interval of the \
                 difference over the test images:\n\n",
    );
    for d in s.deltas() {
        md.push_str(&format!("- {}{}\n", d.describe(), if d.delta > 0.0 { "" } else { " — pre-training did not help here" }));
    }
    md.push_str("\n## Per-class accuracy (%)\n\n| class |");
    for r in &s.rows {
        md.push_str(&format!(" {} {} |", r.variant, r.method));
    }
    md.push_str("\n|---|");
    md.push_str(&"---:|".repeat(s.rows.len()));
    md.push('\n');
    for (c, name) in s.classes.iter().enumerate() {
        md.push_str(&format!("| {name} |"));
        for r in &s.rows {
            md.push_str(&format!(" {} |", pct(r.per_class[c])));
        }
        md.push('\n');
    }
    md.push_str("\nConfusion matrices: `eval/<variant>-<method>/confusion.png`; the probe's sweep: `eval/<variant>-linear-probe/sweep.json`; the splits: `splits.csv`.\n");
    md
}
