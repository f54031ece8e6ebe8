//! Adapter-only files: just the tensors a plan trains (LoRA factors, unfrozen blocks, norms,
//! tokens) plus the plan and the base architecture, small enough to share and re-applied over
//! the base checkpoint.

use std::path::Path;

use burn::store::ModuleSnapshot;
use burn::store::burn_pack::Tensor as PackTensor;
use burn::tensor::{Bytes, DType};

use super::CheckpointError;
use super::load::raw_from_pack;
use super::raw::{Metadata, TensorMap, read_safetensors, write_safetensors};
use crate::model::{Vit, VitConfig};
use crate::peft::{AdaptationPlan, apply_plan, trainable_tensors};

/// The metadata value of `format` in adapter files.
pub const ADAPTER_FORMAT: &str = "explora-adapter-v1";

/// Writes the tensors `plan` trains in `model` (module paths, burn orientation) with the plan
/// and the base config in the metadata, atomically.
pub fn save_adapter(model: &Vit, plan: &AdaptationPlan, path: &Path) -> Result<(), CheckpointError> {
    let mut tensors = TensorMap::new();
    for t in trainable_tensors(model, plan) {
        tensors.insert(t.name.clone(), raw_from_pack(&t)?);
    }
    let mut meta = Metadata::new();
    meta.insert("format".into(), ADAPTER_FORMAT.into());
    meta.insert("plan".into(), serde_json::to_string(plan).expect("plan serialises"));
    meta.insert("base_config".into(), serde_json::to_string(model.config()).expect("config serialises"));
    write_safetensors(path, &tensors, &meta)
}

/// Re-applies an adapter file over a base backbone: attaches the plan's LoRA factors and loads
/// every stored tensor. Refuses a file made for another architecture, naming the difference.
pub fn load_adapter(base: Vit, path: &Path) -> Result<(Vit, AdaptationPlan), CheckpointError> {
    let (tensors, meta) = read_safetensors(path)?;
    let bad = |reason: String| CheckpointError::Corrupt { path: path.to_path_buf(), reason };
    if meta.get("format").map(String::as_str) != Some(ADAPTER_FORMAT) {
        return Err(bad(format!("not an explora adapter file (format {:?})", meta.get("format"))));
    }
    let plan: AdaptationPlan = serde_json::from_str(meta.get("plan").ok_or_else(|| bad("no plan in the metadata".into()))?)
        .map_err(|e| bad(format!("its plan does not parse: {e}")))?;
    let made_for: VitConfig = serde_json::from_str(meta.get("base_config").ok_or_else(|| bad("no base config in the metadata".into()))?)
        .map_err(|e| bad(format!("its base config does not parse: {e}")))?;
    let have = base.config();
    let same = (made_for.embed_dim, made_for.depth, made_for.patch_size, made_for.swiglu, made_for.num_registers)
        == (have.embed_dim, have.depth, have.patch_size, have.swiglu, have.num_registers);
    if !same {
        return Err(CheckpointError::Architecture {
            path: path.to_path_buf(),
            reason: format!(
                "the adapter was made for {} (width {}, {} blocks) but the base is {} (width {}, {} blocks)",
                made_for.name, made_for.embed_dim, made_for.depth, have.name, have.embed_dim, have.depth
            ),
        });
    }
    let mut model = apply_plan(base, &plan).map_err(|e| bad(e.to_string()))?;
    let expected: std::collections::BTreeMap<String, Vec<usize>> =
        model.collect(None, None, false).into_iter().map(|t| (t.name.clone(), t.shape.to_vec())).collect();
    let mut problems = Vec::new();
    let mut pack = Vec::new();
    for (name, t) in tensors {
        match expected.get(&name) {
            None => problems.push(format!("unexpected {name}")),
            Some(shape) if *shape != t.shape => problems.push(format!("{name}: expected {shape:?}, file has {:?}", t.shape)),
            Some(_) => pack.push(PackTensor::new(name, DType::F32, t.shape.clone(), None, Bytes::from_elems(t.data))),
        }
    }
    if !problems.is_empty() {
        return Err(bad(format!("does not fit the base model: {}", problems.join("; "))));
    }
    let result = model.apply(pack, None, None, false);
    if !result.errors.is_empty() {
        return Err(bad(result.errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")));
    }
    Ok((model, plan))
}
