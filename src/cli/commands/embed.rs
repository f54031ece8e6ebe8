//! `explora embed`: CLS and mean-patch features of an image folder, cached.

use super::super::args::*;
use super::super::{check_size, load_model, output};
use crate::data::{ImageList, Preprocess};
use crate::device::{self, DeviceChoice};
use crate::engine;
use crate::eval::embed;

pub(crate) fn embed_cmd(choice: &DeviceChoice, args: EmbedArgs) -> anyhow::Result<()> {
    let list = ImageList::scan(&args.images)?;
    let device = device::open(choice)?;
    let model = load_model(&args.model, &device)?;
    check_size(args.size, model.config())?;
    let out = args.out.clone();
    let pre = Preprocess::new(args.size);
    let batch = args.batch;
    let handle = engine::spawn("embed", move |ctx| {
        let started = std::time::Instant::now();
        let features = embed::extract(&model, &list, &pre, batch, ctx)?;
        let secs = started.elapsed().as_secs_f64();
        features.save(&out)?;
        ctx.artifact("features", &out);
        Ok(format!(
            "embedded {} images in {secs:.1} s ({:.1} images/s, {} skipped) → {}",
            features.len(),
            features.len() as f64 / secs.max(1e-9),
            features.skipped.count(),
            out.display()
        ))
    });
    output::follow(handle)
}
