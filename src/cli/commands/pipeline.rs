//! `explora pipeline`: "did it help?" — the source backbone against ExPLoRA on a labelled set.

use std::path::PathBuf;

use super::super::args::*;
use super::super::output;
use crate::device::{self, DeviceChoice};
use crate::engine;

/// The pipeline config from `--config` (or the built-in one) with the flags applied.
pub fn pipeline_config(args: &PipelineArgs, software: bool) -> anyhow::Result<crate::recipes::pipeline::PipelineConfig> {
    let mut c = match &args.config {
        Some(path) => crate::recipes::pipeline::PipelineConfig::load(path)?,
        None => crate::recipes::pipeline::PipelineConfig::builtin(software),
    };
    if args.weights.is_some() {
        c.model.weights = args.weights.clone();
        if args.config.is_none() && args.arch.is_none() {
            c.model.arch = None;
        }
    }
    if args.arch.is_some() {
        c.model.arch = args.arch.clone();
    }
    if args.labelled.is_some() {
        c.data.labelled = args.labelled.clone();
    }
    if let Some(v) = args.image_size {
        c.data.image_size = v;
    }
    if let Some(v) = args.max_per_class {
        c.data.max_per_class = v;
    }
    if let Some(v) = args.steps {
        c.pretrain.run.steps = v;
    }
    if let Some(v) = args.seed {
        c.data.seed = v;
    }
    if let Some(objectives) = &args.objectives {
        c.objectives = objectives.clone();
    }
    if args.finetune && c.finetune.is_none() {
        c.finetune = Some(Default::default());
    }
    Ok(c)
}

pub(crate) fn pipeline_cmd(choice: &DeviceChoice, args: PipelineArgs) -> anyhow::Result<()> {
    if args.print_config {
        print!("{}", pipeline_config(&args, false)?.to_toml());
        return Ok(());
    }
    let device = device::open(choice)?;
    eprintln!("device: {}", device::describe(&device));
    let config = pipeline_config(&args, device::is_software(&device))?;
    config.validate()?;
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from("runs").join(format!("pipeline-{}", crate::engine::utc_stamp())));
    let handle = engine::spawn("pipeline", move |ctx| {
        let summary = crate::recipes::pipeline::run_pipeline(&config, &out, &device, ctx)?;
        if summary.stopped {
            return Ok(format!("stopped; run the same command with --out {} to continue", out.display()));
        }
        let lines: Vec<String> =
            summary.rows.iter().map(|r| format!("  {:<8} {:<13} top-1 {:5.1}%", r.variant, r.method, 100.0 * r.top1)).collect();
        let deltas: Vec<String> = summary.deltas().iter().map(|d| format!("  {}", d.describe())).collect();
        Ok(format!(
            "{}\nSource → ExPLoRA:\n{}\nResults in {}: report.md, report.csv, eval/*/confusion.png",
            lines.join("\n"),
            deltas.join("\n"),
            out.display()
        ))
    });
    output::follow(handle)
}
