//! `explora default` (and `explora --no-gui`): the built-in default run.

use std::path::PathBuf;

use super::super::args::*;
use super::super::output;
use crate::device::{self, DeviceChoice};
use crate::engine;
use crate::recipes::default_run::DefaultRun;

pub(crate) fn default_cmd(choice: &DeviceChoice, args: DefaultArgs) -> anyhow::Result<()> {
    let device = device::open(choice)?;
    eprintln!("device: {}", device::describe(&device));
    let out = args.out.unwrap_or_else(|| PathBuf::from("runs").join(format!("default-{}", crate::engine::utc_stamp())));
    let mut job = DefaultRun::for_device(out, &device);
    job.config.run.seed = args.seed;
    if let Some(steps) = args.steps {
        job.config.run.steps = steps;
    }
    let handle = engine::spawn("default", move |ctx| crate::recipes::default_run::run(&job, &device, ctx));
    output::follow(handle)
}
