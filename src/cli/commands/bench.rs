//! `explora bench`: the PyTorch reference's workloads, timed.

use super::super::args::*;
use super::super::output;
use crate::device::{self, DeviceChoice};
use crate::engine;

pub(crate) fn bench_cmd(choice: &DeviceChoice, args: BenchArgs) -> anyhow::Result<()> {
    let config = crate::recipes::bench::BenchConfig {
        mode: args.mode,
        arch: args.arch,
        batch: args.batch,
        global_size: args.global_size,
        local_size: args.local_size,
        locals: args.locals,
        prototypes: args.prototypes,
        rank: args.rank,
        unfreeze: args.unfreeze,
        infer_batch: args.infer_batch,
        infer_size: args.infer_size,
        steps: args.steps,
        warmup: args.warmup,
        seed: args.seed,
    };
    config.validate()?;
    let device = device::open(choice)?;
    eprintln!("device: {}", device::describe(&device));
    let handle = engine::spawn("bench", move |ctx| Ok(crate::recipes::bench::run(&config, &device, ctx)?.to_string()));
    output::follow(handle)
}
