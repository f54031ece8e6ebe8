//! Loading a backbone from any supported checkpoint, and saving one.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use burn::store::ModuleSnapshot;
use burn::store::burn_pack::Tensor as PackTensor;
use burn::tensor::{Bytes, DType, Device};

use super::CheckpointError;
use super::layout::{self, Layout};
use super::raw::{self, Metadata, RawTensor, TensorMap};
use crate::model::{Family, Vit, VitConfig};

/// The metadata value of `format` in explora's own safetensors files.
pub const EXPLORA_FORMAT: &str = "explora-vit-v1";

/// What a load did, key by key. Printed by the CLI and shown by the app.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadReport {
    pub path: PathBuf,
    pub layout: Layout,
    pub config: VitConfig,
    /// Tensors loaded into the backbone.
    pub loaded: usize,
    /// Backbone tensors the checkpoint lacks by design and that keep their fresh init
    /// (the mask token of a checkpoint saved without one).
    pub initialised: Vec<String>,
    /// Checkpoint tensors that belong to other parts (MAE decoder, heads).
    pub ignored: Vec<String>,
    /// Backbone tensors the checkpoint lacks.
    pub missing: Vec<String>,
    /// Checkpoint tensors the backbone has no place for.
    pub unexpected: Vec<String>,
    /// `(name, expected shape, checkpoint shape)`.
    pub mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
}

impl LoadReport {
    pub fn is_complete(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }
}

fn list(names: &[String]) -> String {
    const MAX: usize = 12;
    let mut s = names.iter().take(MAX).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > MAX {
        s.push_str(&format!(", … ({} more)", names.len() - MAX));
    }
    s
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.config;
        write!(
            f,
            "{}: {} layout, {} ({} family, width {}, {} blocks, {} heads, patch {}, {} registers), {} tensors loaded",
            self.path.display(),
            self.layout,
            c.name,
            c.family,
            c.embed_dim,
            c.depth,
            c.num_heads,
            c.patch_size,
            c.num_registers,
            self.loaded
        )?;
        if !self.initialised.is_empty() {
            write!(f, "\n  freshly initialised (not in the checkpoint): {}", list(&self.initialised))?;
        }
        if !self.ignored.is_empty() {
            write!(f, "\n  ignored (not part of the backbone): {}", list(&self.ignored))?;
        }
        if !self.missing.is_empty() {
            write!(f, "\n  MISSING from the checkpoint: {}", list(&self.missing))?;
        }
        if !self.unexpected.is_empty() {
            write!(f, "\n  UNEXPECTED in the checkpoint: {}", list(&self.unexpected))?;
        }
        for (name, expected, found) in &self.mismatched {
            write!(f, "\n  WRONG SHAPE: {name}: model expects {expected:?}, checkpoint has {found:?}")?;
        }
        if !self.is_complete() {
            write!(f, "\nrefusing to run with partly random weights; pass the matching --arch or another checkpoint")?;
        }
        Ok(())
    }
}

/// Whether a canonical key names a Linear weight (stored `[out, in]` by PyTorch, `[in, out]`
/// by burn).
fn is_linear_weight(key: &str) -> bool {
    key.ends_with(".weight") && (key.contains(".attn.") || key.contains(".mlp."))
}

/// Canonical (Meta/PyTorch) name → the model's parameter path.
fn module_path(key: &str) -> String {
    let key = key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.");
    let is_norm = key.starts_with("norm.") || key.contains(".norm1.") || key.contains(".norm2.");
    match (is_norm, key.strip_suffix(".weight"), key.strip_suffix(".bias")) {
        (true, Some(stem), _) => format!("{stem}.gamma"),
        (true, _, Some(stem)) => format!("{stem}.beta"),
        _ => key,
    }
}

/// The model's parameter path → canonical name (inverse of [`module_path`]).
fn canonical_path(path: &str, swiglu: bool) -> String {
    let mut key = path.to_string();
    if swiglu {
        key = key.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.");
    }
    if let Some(stem) = key.strip_suffix(".gamma").filter(|s| !s.ends_with(".ls1") && !s.ends_with(".ls2")) {
        return format!("{stem}.weight");
    }
    if let Some(stem) = key.strip_suffix(".beta") {
        return format!("{stem}.bias");
    }
    key
}

/// Recovers the architecture from canonical tensors (plus a Hugging Face `config.json` when
/// one lies beside the weights, which is the only place the head count is written).
pub fn infer_config(
    tensors: &TensorMap,
    layout: Layout,
    hf_config: Option<&serde_json::Value>,
    path: &Path,
) -> Result<VitConfig, CheckpointError> {
    let fail = |reason: String| CheckpointError::Architecture { path: path.to_path_buf(), reason };
    let shape = |k: &str| tensors.get(k).map(|t| t.shape.clone());
    let cls = shape("cls_token").ok_or_else(|| fail("no cls_token".into()))?;
    let embed_dim = *cls.last().ok_or_else(|| fail("cls_token has no shape".into()))?;
    let patch = shape("patch_embed.proj.weight").ok_or_else(|| fail("no patch embedding".into()))?;
    if patch.len() != 4 || patch[2] != patch[3] {
        return Err(fail(format!("patch embedding has shape {patch:?}, expected [D, 3, p, p]")));
    }
    let pos = shape("pos_embed").ok_or_else(|| fail("no pos_embed".into()))?;
    let positions = pos.get(1).copied().unwrap_or(0).saturating_sub(1);
    let pos_grid = (positions as f64).sqrt().round() as usize;
    if pos_grid * pos_grid != positions || positions == 0 {
        return Err(fail(format!("pos_embed has {positions} patch positions, not a square grid")));
    }
    let depth = tensors
        .keys()
        .filter_map(|k| k.strip_prefix("blocks.")?.split('.').next()?.parse::<usize>().ok())
        .max()
        .map(|m| m + 1)
        .ok_or_else(|| fail("no transformer blocks".into()))?;
    let swiglu = tensors.contains_key("blocks.0.mlp.w12.weight");
    let hidden = if swiglu { shape("blocks.0.mlp.w3.weight").map(|s| s[1]) } else { shape("blocks.0.mlp.fc1.weight").map(|s| s[0]) }
        .ok_or_else(|| fail("no MLP weights in block 0".into()))?;
    let layer_scale = tensors.contains_key("blocks.0.ls1.gamma");
    let family = if layer_scale || layout == Layout::HfDinov2 { Family::Dinov2 } else { Family::Mae };
    let num_registers = shape("register_tokens").map(|s| s[1]).unwrap_or(0);
    let hf = |k: &str| hf_config.and_then(|c| c.get(k));
    let num_heads = match hf("num_attention_heads").and_then(|v| v.as_u64()) {
        Some(h) => h as usize,
        None => match embed_dim {
            384 => 6,
            768 => 12,
            1024 | 1280 => 16,
            1536 => 24,
            d => {
                return Err(fail(format!("width {d} is not a published ViT width, so the number of heads is unknown")));
            }
        },
    };
    let mut config = VitConfig {
        name: "inferred".into(),
        family,
        embed_dim,
        depth,
        num_heads,
        patch_size: patch[2],
        pos_grid,
        mlp_ratio: 4.0,
        swiglu,
        layer_scale: layer_scale.then_some(1e-5),
        num_registers,
        mask_token: family == Family::Dinov2,
        norm_eps: hf("layer_norm_eps").and_then(|v| v.as_f64()).unwrap_or(1e-6),
        interpolate_offset: if layout == Layout::MetaDinov2 { 0.1 } else { 0.0 },
        // transformers' Dinov2WithRegisters resamples with antialias=True, Dinov2Model without.
        interpolate_antialias: layout == Layout::HfDinov2 && num_registers > 0,
        image_size: if patch[2] == 14 || patch[2] == 16 { 224 } else { pos_grid * patch[2] },
    };
    if !swiglu {
        config.mlp_ratio = hidden as f64 / embed_dim as f64;
    } else if config.mlp_hidden() != hidden {
        return Err(fail(format!("SwiGLU hidden width {hidden} does not follow DINOv2's rule for width {embed_dim}")));
    }
    // Name it after the preset it equals, if any.
    if let Some(preset) = VitConfig::presets().into_iter().find(|p| {
        p.family == config.family
            && p.embed_dim == config.embed_dim
            && p.depth == config.depth
            && p.patch_size == config.patch_size
            && p.swiglu == config.swiglu
    }) {
        config.name = if num_registers > 0 { format!("{}_reg", preset.name) } else { preset.name };
    }
    config.validate().map_err(|e| fail(e.to_string()))?;
    Ok(config)
}

/// Loads a backbone, detecting the layout and inferring the architecture from the checkpoint.
pub fn load_backbone(path: &Path, device: &Device) -> Result<(Vit, LoadReport), CheckpointError> {
    load_backbone_with(path, None, device)
}

/// Loads a backbone; `config` overrides the inferred architecture (shapes are still checked).
pub fn load_backbone_with(path: &Path, config: Option<VitConfig>, device: &Device) -> Result<(Vit, LoadReport), CheckpointError> {
    let (map, metadata) = raw::read_any(path)?;
    let map = layout::strip_wrappers(map);
    let own = metadata.get("format").map(String::as_str) == Some(EXPLORA_FORMAT);
    let layout = layout::detect(&map, own).ok_or_else(|| CheckpointError::UnknownLayout {
        path: path.to_path_buf(),
        sample: map.keys().take(6).cloned().collect::<Vec<_>>().join(", "),
    })?;
    let canonical = layout::to_canonical(map, layout);
    let config = match config {
        Some(config) => config,
        None if own => {
            let json = metadata.get("config").ok_or_else(|| CheckpointError::Architecture {
                path: path.to_path_buf(),
                reason: "explora file without a config in its metadata".into(),
            })?;
            serde_json::from_str(json).map_err(|e| CheckpointError::Architecture {
                path: path.to_path_buf(),
                reason: format!("its stored config does not parse: {e}"),
            })?
        }
        None => {
            let hf_config = path
                .parent()
                .map(|dir| dir.join("config.json"))
                .filter(|p| p.exists())
                .and_then(|p| std::fs::read_to_string(p).ok())
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok());
            infer_config(&canonical.tensors, layout, hf_config.as_ref(), path)?
        }
    };
    config.validate().map_err(|e| CheckpointError::Architecture { path: path.to_path_buf(), reason: e.to_string() })?;
    let mut model = config.init(device);

    // The model's expected tensors, by parameter path.
    let expected: Vec<(String, Vec<usize>)> =
        model.collect(None, None, false).into_iter().map(|t| (t.name.clone(), t.shape.to_vec())).collect();
    let mut report = LoadReport {
        path: path.to_path_buf(),
        layout,
        config,
        loaded: 0,
        initialised: Vec::new(),
        ignored: canonical.ignored,
        missing: Vec::new(),
        unexpected: canonical.unknown,
        mismatched: Vec::new(),
    };
    let mut provided: TensorMap = canonical
        .tensors
        .into_iter()
        .map(|(key, t)| {
            let t = if is_linear_weight(&key) && t.shape.len() == 2 { t.transposed() } else { t };
            (module_path(&key), t)
        })
        .collect();
    let expected_names: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    for name in provided.keys() {
        if !expected_names.contains(name.as_str()) {
            report.unexpected.push(name.clone());
        }
    }
    let mut pack = Vec::new();
    for (name, shape) in &expected {
        match provided.remove(name) {
            None if name == "mask_token" => report.initialised.push(name.clone()),
            None => report.missing.push(name.clone()),
            Some(t) if t.shape != *shape => report.mismatched.push((name.clone(), shape.clone(), t.shape)),
            Some(t) => pack.push(PackTensor::new(name.clone(), DType::F32, t.shape.clone(), None, Bytes::from_elems(t.data))),
        }
    }
    if !report.is_complete() {
        return Err(CheckpointError::Mismatch(Box::new(report)));
    }
    let result = model.apply(pack, None, None, false);
    if !result.errors.is_empty() {
        report.mismatched.extend(result.errors.iter().map(|e| (e.to_string(), vec![], vec![])));
        return Err(CheckpointError::Mismatch(Box::new(report)));
    }
    report.loaded = result.applied.len();
    Ok((model, report))
}

/// Reads a collected model tensor back to the host as f32.
pub(crate) fn raw_from_pack(tensor: &PackTensor) -> Result<RawTensor, CheckpointError> {
    let name = &tensor.name;
    let bytes = tensor.to_bytes().map_err(|e| CheckpointError::Unsupported(format!("cannot read parameter {name}: {e:?}")))?;
    match tensor.dtype {
        DType::F32 => Ok(RawTensor::new(tensor.shape.to_vec(), bytemuck::pod_collect_to_vec(&bytes[..]))),
        other => Err(CheckpointError::Unsupported(format!("parameter {name} has dtype {other:?}"))),
    }
}

/// The model's weights as canonical (Meta-named, PyTorch-oriented) tensors.
pub fn canonical_from_model(model: &Vit) -> Result<TensorMap, CheckpointError> {
    let swiglu = model.config().swiglu;
    let mut out = TensorMap::new();
    for tensor in model.collect(None, None, false) {
        let key = canonical_path(&tensor.name, swiglu);
        let t = raw_from_pack(&tensor)?;
        let t = if is_linear_weight(&key) && t.shape.len() == 2 { t.transposed() } else { t };
        out.insert(key, t);
    }
    Ok(out)
}

fn own_metadata(model: &Vit, extra: &[(&str, String)]) -> Metadata {
    let mut meta = Metadata::new();
    meta.insert("format".into(), EXPLORA_FORMAT.into());
    meta.insert("config".into(), serde_json::to_string(model.config()).expect("config serialises"));
    for (k, v) in extra {
        meta.insert((*k).into(), v.clone());
    }
    meta
}

/// Saves the backbone in explora's own format (canonical keys + config), atomically.
pub fn save_backbone(model: &Vit, path: &Path) -> Result<(), CheckpointError> {
    let tensors = canonical_from_model(model)?;
    raw::write_safetensors(path, &tensors, &own_metadata(model, &[]))
}

/// Saves the backbone with Meta's key names (the canonical layout) as safetensors, for the
/// Meta DINOv2 and MAE code (`safetensors.torch.load_file` + `load_state_dict`), atomically.
pub fn save_backbone_meta(model: &Vit, path: &Path) -> Result<(), CheckpointError> {
    let mut meta = Metadata::new();
    meta.insert("format".into(), "pt".into());
    raw::write_safetensors(path, &canonical_from_model(model)?, &meta)
}

/// Saves the backbone in the Hugging Face `Dinov2Model` layout (safetensors + `config.json`
/// beside it), atomically.
pub fn save_backbone_hf(model: &Vit, path: &Path) -> Result<(), CheckpointError> {
    let tensors = layout::canonical_to_hf(&canonical_from_model(model)?);
    let mut meta = Metadata::new();
    meta.insert("format".into(), "pt".into());
    raw::write_safetensors(path, &tensors, &meta)?;
    let c = model.config();
    let hf_config = serde_json::json!({
        "architectures": [if c.num_registers > 0 { "Dinov2WithRegistersModel" } else { "Dinov2Model" }],
        "model_type": if c.num_registers > 0 { "dinov2_with_registers" } else { "dinov2" },
        "hidden_size": c.embed_dim,
        "num_hidden_layers": c.depth,
        "num_attention_heads": c.num_heads,
        "mlp_ratio": c.mlp_ratio,
        "patch_size": c.patch_size,
        "image_size": c.pos_grid * c.patch_size,
        "layer_norm_eps": c.norm_eps,
        "use_swiglu_ffn": c.swiglu,
        "num_register_tokens": c.num_registers,
        "hidden_act": "gelu",
        "layerscale_value": c.layer_scale.unwrap_or(1.0),
    });
    let config_path = path.with_file_name("config.json");
    raw::atomic_write(&config_path, serde_json::to_string_pretty(&hf_config).expect("json").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_and_canonical_paths_are_inverse() {
        for key in [
            "blocks.3.norm1.weight",
            "blocks.3.norm2.bias",
            "norm.weight",
            "blocks.0.ls1.gamma",
            "blocks.0.attn.qkv.weight",
            "cls_token",
            "patch_embed.proj.bias",
        ] {
            assert_eq!(canonical_path(&module_path(key), false), key);
        }
        assert_eq!(module_path("blocks.1.norm1.weight"), "blocks.1.norm1.gamma");
        assert_eq!(module_path("blocks.1.mlp.w12.weight"), "blocks.1.mlp.fc1.weight");
        assert_eq!(canonical_path("blocks.1.mlp.fc2.bias", true), "blocks.1.mlp.w3.bias");
        assert!(is_linear_weight("blocks.1.attn.qkv.weight"));
        assert!(!is_linear_weight("blocks.1.attn.qkv.bias"));
        assert!(!is_linear_weight("patch_embed.proj.weight"));
    }

    fn canonical_for(config: &VitConfig) -> TensorMap {
        let d = config.embed_dim;
        let mut m = TensorMap::new();
        let z = |shape: &[usize]| RawTensor::new(shape.to_vec(), vec![0.0; shape.iter().product()]);
        m.insert("cls_token".into(), z(&[1, 1, d]));
        m.insert("pos_embed".into(), z(&[1, 1 + config.pos_grid.pow(2), d]));
        m.insert("patch_embed.proj.weight".into(), z(&[d, 3, config.patch_size, config.patch_size]));
        for b in 0..config.depth {
            m.insert(format!("blocks.{b}.mlp.fc1.weight"), z(&[config.mlp_hidden(), d]));
            if config.layer_scale.is_some() {
                m.insert(format!("blocks.{b}.ls1.gamma"), z(&[d]));
            }
        }
        m
    }

    #[test]
    fn infers_published_architectures() {
        let path = Path::new("x.pth");
        let vitl = VitConfig::dinov2_vitl14();
        let inferred = infer_config(&canonical_for(&vitl), Layout::MetaDinov2, None, path).unwrap();
        assert_eq!(inferred.name, "vitl14");
        assert_eq!((inferred.num_heads, inferred.depth, inferred.pos_grid), (16, 24, 37));
        assert_eq!(inferred.interpolate_offset, 0.1);
        let mae = VitConfig::mae_vitb16();
        let inferred = infer_config(&canonical_for(&mae), Layout::Mae, None, path).unwrap();
        assert_eq!(inferred.name, "mae-vitb16");
        assert_eq!(inferred.family, Family::Mae);
        assert!(!inferred.mask_token);
    }

    #[test]
    fn unknown_width_needs_heads_from_hf_config() {
        let tiny = VitConfig::tiny();
        let path = Path::new("x.safetensors");
        let err = infer_config(&canonical_for(&tiny), Layout::HfDinov2, None, path).unwrap_err();
        assert!(err.to_string().contains("number of heads is unknown"), "{err}");
        let hf = serde_json::json!({"num_attention_heads": 4, "layer_norm_eps": 1e-6});
        let inferred = infer_config(&canonical_for(&tiny), Layout::HfDinov2, Some(&hf), path).unwrap();
        assert_eq!(inferred.num_heads, 4);
        assert_eq!(inferred.interpolate_offset, 0.0);
    }
}
