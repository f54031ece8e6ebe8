//! `explora export`: a backbone with an adapter merged, in a chosen layout.

use super::super::args::*;
use super::super::load_model_with_layout;
use crate::device::{self, DeviceChoice};

pub(crate) fn export_cmd(choice: &DeviceChoice, args: ExportArgs) -> anyhow::Result<()> {
    use crate::checkpoint::{Layout, load_adapter, save_backbone, save_backbone_hf, save_backbone_meta};
    let device = device::open(choice)?;
    let (mut model, source) = load_model_with_layout(&args.model, &device)?;
    if let Some(adapter) = &args.adapter {
        let (adapted, plan) = load_adapter(model, adapter)?;
        let budget = plan.budget(adapted.config());
        eprintln!("applied {} ({} trained parameters)", adapter.display(), budget.trainable);
        model = adapted;
    }
    anyhow::ensure!(
        !model.blocks.iter().any(|b| b.convpass_attn.is_some() || b.convpass_mlp.is_some()) && model.tasks.is_empty(),
        "Convpass adapters and memory tokens cannot be merged into plain weights; keep the adapter file \
         and re-apply it over the base checkpoint instead"
    );
    let model = crate::peft::merge_lora(model);
    let layout = match args.layout.as_str() {
        "same" => match source {
            Layout::HfDinov2 => "hf",
            Layout::MetaDinov2 | Layout::Mae => "meta",
            Layout::Explora => "explora",
        },
        other @ ("hf" | "meta" | "explora") => other,
        other => anyhow::bail!("unknown --layout `{other}`: use same, hf, meta or explora"),
    };
    match layout {
        "hf" => save_backbone_hf(&model, &args.out)?,
        "meta" => save_backbone_meta(&model, &args.out)?,
        _ => save_backbone(&model, &args.out)?,
    }
    println!("wrote {} ({layout} layout, LoRA merged)", args.out.display());
    Ok(())
}
