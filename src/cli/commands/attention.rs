//! `explora attention`: a CLS-attention heatmap over one image.

use super::super::args::*;
use super::super::{check_size, load_model, write_png};
use crate::data::{Preprocess, decode_rgb};
use crate::device::{self, DeviceChoice};
use crate::inspect::{attention, images_tensor};

pub(crate) fn attention_cmd(choice: &DeviceChoice, args: AttentionArgs) -> anyhow::Result<()> {
    let device = device::open(choice)?;
    let model = load_model(&args.model, &device)?;
    check_size(args.size, model.config())?;
    let image = decode_rgb(&args.image)?;
    let pre = Preprocess::new(args.size);
    let shown = pre.apply(&image);
    let tensor = images_tensor(pre.to_tensor_data(&image), 1, args.size as usize, &device);
    let layer = args.layer.unwrap_or(model.config().depth - 1);
    let map = attention::cls_attention(&model, tensor, layer, args.head)?;
    write_png(&attention::overlay(&shown, &map, 0.55), &args.out)?;
    println!(
        "wrote {} (CLS attention, block {layer}, {})",
        args.out.display(),
        args.head.map_or("mean over heads".to_string(), |h| format!("head {h}"))
    );
    Ok(())
}
