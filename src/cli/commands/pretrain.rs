//! `explora pretrain` and `explora resume`: an ExPLoRA run, then its evaluation when asked.

use std::path::PathBuf;

use super::super::args::*;
use super::super::output;
use crate::device::{self, DeviceChoice};
use crate::engine;
use crate::train::{PretrainConfig, PretrainJob};

/// The run config a `pretrain` invocation asks for: the file (or the defaults) plus flags.
pub fn pretrain_config(args: &PretrainArgs) -> anyhow::Result<PretrainConfig> {
    let mut c = match &args.config {
        Some(path) => PretrainConfig::load(path)?,
        None if args.weights.is_none() && args.arch.is_none() => PretrainConfig::builtin(),
        None => PretrainConfig::default(),
    };
    if args.weights.is_some() {
        c.model.weights = args.weights.clone();
        c.model.arch = None;
    }
    if args.arch.is_some() {
        c.model.arch = args.arch.clone();
    }
    if let Some(objective) = args.objective {
        c.objective = objective;
    }
    if args.images.is_some() {
        c.set_images(args.images.clone());
    }
    let o = &mut c.optim;
    o.batch = args.batch.unwrap_or(o.batch);
    o.accumulation = args.accumulation.unwrap_or(o.accumulation);
    if args.lr.is_some() {
        o.base_lr = args.lr;
    }
    if args.unfreeze.is_some() {
        c.plan.unfreeze = args.unfreeze.clone();
    }
    if args.rank.is_some() {
        c.plan.lora_rank = args.rank;
    }
    c.crops.overhead |= args.overhead;
    if let Some(sizes) = &args.crops {
        if sizes.len() != 2 {
            anyhow::bail!("--crops takes two sizes, global and local, e.g. --crops 224,98");
        }
        c.crops.global_size = sizes[0];
        c.crops.local_size = sizes[1];
    }
    c.crops.local_crops = args.local_crops.unwrap_or(c.crops.local_crops);
    c.head.prototypes = args.prototypes.unwrap_or(c.head.prototypes);
    if let Some(centering) = &args.centering {
        c.loss.centering = match centering.as_str() {
            "softmax" => crate::objectives::Centering::Softmax,
            "sinkhorn-knopp" | "sinkhorn" => crate::objectives::Centering::SinkhornKnopp,
            other => anyhow::bail!("--centering {other}: use softmax or sinkhorn-knopp"),
        };
    }
    c.run.steps = args.steps.unwrap_or(c.run.steps);
    c.run.seed = args.seed.unwrap_or(c.run.seed);
    c.run.checkpoint_every = args.checkpoint_every.unwrap_or(c.run.checkpoint_every);
    if args.knn_images.is_some() {
        c.set_labelled(args.knn_images.clone(), false);
    }
    if args.labelled.is_some() {
        c.set_labelled(args.labelled.clone(), true);
    }
    c.evaluate.after_training |= args.evaluate;
    c.monitor.knn_every = args.knn_every.unwrap_or(c.monitor.knn_every);
    Ok(c)
}

pub(crate) fn pretrain_cmd(choice: &DeviceChoice, args: PretrainArgs) -> anyhow::Result<()> {
    let config = pretrain_config(&args)?;
    if args.print_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    config.validate()?;
    let device = device::open(choice)?;
    eprintln!("device: {}", device::describe(&device));
    let out = args.out.unwrap_or_else(|| PathBuf::from("runs").join(format!("pretrain-{}", crate::engine::utc_stamp())));
    let job = PretrainJob { config, out, resume: false };
    let handle = engine::spawn("pretrain", move |ctx| crate::recipes::run::run(&job, &device, ctx));
    output::follow(handle)
}

pub(crate) fn resume_cmd(choice: &DeviceChoice, args: ResumeArgs) -> anyhow::Result<()> {
    let mut job = PretrainJob::resume(&args.run)?;
    if let Some(steps) = args.steps {
        job.config.run.steps = steps;
    }
    let device = device::open(choice)?;
    eprintln!("device: {}", device::describe(&device));
    let handle = engine::spawn("pretrain", move |ctx| crate::recipes::run::run(&job, &device, ctx));
    output::follow(handle)
}
