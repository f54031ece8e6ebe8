//! Checkpoint layouts and their key maps to the canonical layout.
//!
//! The canonical layout is Meta's DINOv2 naming with PyTorch tensor orientation
//! (`blocks.N.attn.qkv.weight` as `[3D, D]`, `blocks.N.ls1.gamma`, `norm.weight`, SwiGLU as
//! `mlp.w12`/`mlp.w3`). Every supported layout is first renamed into it; the model's own
//! parameter paths are one more fixed step away (`to_module_tensors` in `load.rs`).

use std::sync::LazyLock;

use regex::Regex;

use super::raw::{RawTensor, TensorMap};

/// Where a checkpoint comes from, detected from its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Layout {
    /// Meta's torch-hub DINOv2 `.pth` (`blocks.N.attn.qkv.weight`, `ls1.gamma`).
    MetaDinov2,
    /// Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel` safetensors
    /// (`encoder.layer.N.attention.attention.query.weight`).
    HfDinov2,
    /// Meta's MAE `.pth` (`model` dict, `blocks.N...`, optional `decoder_*`).
    Mae,
    /// explora's own safetensors: canonical keys plus the config in the metadata.
    Explora,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Layout::MetaDinov2 => "Meta DINOv2 (torch hub)",
            Layout::HfDinov2 => "Hugging Face Dinov2Model",
            Layout::Mae => "MAE",
            Layout::Explora => "explora",
        })
    }
}

/// Prefixes that wrap a whole state dict (training wrappers, task models, MAE's `model` dict).
const WRAPPERS: [&str; 7] = ["model.", "module.", "teacher.backbone.", "student.backbone.", "backbone.", "dinov2.", "state_dict."];

/// Removes a prefix shared by every key (repeatedly: `model.module.` → ``).
pub fn strip_wrappers(map: TensorMap) -> TensorMap {
    let mut map = map;
    loop {
        let Some(prefix) = WRAPPERS.iter().find(|p| !map.is_empty() && map.keys().all(|k| k.starts_with(*p))) else {
            return map;
        };
        map = map.into_iter().map(|(k, v)| (k[prefix.len()..].to_string(), v)).collect();
    }
}

/// Detects the layout from the (unwrapped) keys and, for explora files, the metadata.
pub fn detect(map: &TensorMap, explora_metadata: bool) -> Option<Layout> {
    if explora_metadata {
        return Some(Layout::Explora);
    }
    let has = |needle: &str| map.keys().any(|k| k.contains(needle));
    if has("encoder.layer.") && has("embeddings.") {
        Some(Layout::HfDinov2)
    } else if has("blocks.") && map.contains_key("cls_token") {
        if has(".ls1.gamma") || has("register_tokens") { Some(Layout::MetaDinov2) } else { Some(Layout::Mae) }
    } else {
        None
    }
}

/// Hugging Face → canonical renames, applied in order (first match wins). Query, key and
/// value go to temporary `attn.{query,key,value}` names and are fused into `attn.qkv` after.
static HF_RENAMES: LazyLock<Vec<(Regex, &'static str)>> = LazyLock::new(|| {
    [
        (r"^embeddings\.cls_token$", "cls_token"),
        (r"^embeddings\.mask_token$", "mask_token"),
        (r"^embeddings\.position_embeddings$", "pos_embed"),
        (r"^embeddings\.register_tokens$", "register_tokens"),
        (r"^embeddings\.patch_embeddings\.projection\.(weight|bias)$", "patch_embed.proj.$1"),
        (r"^encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)$", "blocks.$1.norm$2.$3"),
        (r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$", "blocks.$1.attn.$2.$3"),
        (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)$", "blocks.$1.attn.proj.$2"),
        (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", "blocks.$1.ls$2.gamma"),
        (r"^encoder\.layer\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", "blocks.$1.mlp.$2.$3"),
        (r"^encoder\.layer\.(\d+)\.mlp\.weights_in\.(weight|bias)$", "blocks.$1.mlp.w12.$2"),
        (r"^encoder\.layer\.(\d+)\.mlp\.weights_out\.(weight|bias)$", "blocks.$1.mlp.w3.$2"),
        (r"^layernorm\.(weight|bias)$", "norm.$1"),
    ]
    .into_iter()
    .map(|(pattern, replacement)| (Regex::new(pattern).expect("valid pattern"), replacement))
    .collect()
});

/// Keys that belong to a checkpoint but not to the backbone: reported as ignored, not as
/// unexpected. MAE's decoder (its `mask_token` is the decoder's), classification heads, HF's
/// pooler.
static IGNORED: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(decoder_|head\.|heads\.|fc_norm\.|pooler\.|classifier\.|dino_head\.|ibot_head\.)").expect("valid pattern")
});

/// The result of renaming a checkpoint into the canonical layout.
#[derive(Debug, Default)]
pub struct Canonical {
    pub tensors: TensorMap,
    /// Keys that belong to known non-backbone parts (decoder, heads).
    pub ignored: Vec<String>,
    /// Keys no rule knows.
    pub unknown: Vec<String>,
}

/// Renames an unwrapped checkpoint of `layout` into the canonical layout.
pub fn to_canonical(map: TensorMap, layout: Layout) -> Canonical {
    let mut out = Canonical::default();
    let is_backbone_key = |k: &str| {
        k == "cls_token"
            || k == "pos_embed"
            || k == "mask_token"
            || k == "register_tokens"
            || k.starts_with("patch_embed.")
            || k.starts_with("blocks.")
            || k.starts_with("norm.")
    };
    for (key, tensor) in map {
        if IGNORED.is_match(&key) || (layout == Layout::Mae && key == "mask_token") {
            out.ignored.push(key);
            continue;
        }
        let renamed = match layout {
            Layout::HfDinov2 => HF_RENAMES.iter().find(|(re, _)| re.is_match(&key)).map(|(re, rep)| re.replace(&key, *rep).into_owned()),
            Layout::MetaDinov2 | Layout::Mae | Layout::Explora => is_backbone_key(&key).then(|| key.clone()),
        };
        match renamed {
            Some(name) => {
                out.tensors.insert(name, tensor);
            }
            None => out.unknown.push(key),
        }
    }
    if layout == Layout::HfDinov2 {
        fuse_qkv(&mut out);
    }
    out
}

/// Fuses `attn.{query,key,value}.{weight,bias}` into `attn.qkv.*` (rows stacked q, k, v as in
/// the fused Linear of Meta's code). Incomplete triples are left for the report to name.
fn fuse_qkv(out: &mut Canonical) {
    let prefixes: Vec<String> = out
        .tensors
        .keys()
        .filter_map(|k| k.strip_suffix(".query.weight").or_else(|| k.strip_suffix(".query.bias")))
        .map(str::to_string)
        .collect();
    for prefix in prefixes {
        for suffix in ["weight", "bias"] {
            let names = ["query", "key", "value"].map(|p| format!("{prefix}.{p}.{suffix}"));
            if !names.iter().all(|n| out.tensors.contains_key(n)) {
                continue;
            }
            let parts: Vec<RawTensor> = names.iter().map(|n| out.tensors.remove(n).expect("present")).collect();
            match RawTensor::concat_rows(&parts.iter().collect::<Vec<_>>()) {
                Some(fused) => {
                    out.tensors.insert(format!("{prefix}.qkv.{suffix}"), fused);
                }
                None => {
                    // Shapes disagree: put them back so the report names them.
                    for (n, t) in names.into_iter().zip(parts) {
                        out.tensors.insert(n, t);
                    }
                }
            }
        }
    }
}

/// Canonical → Hugging Face names (the inverse of [`HF_RENAMES`], with `qkv` split again), for
/// exporting an adapted backbone in the layout it came from.
pub fn canonical_to_hf(map: &TensorMap) -> TensorMap {
    let rules: [(&str, &str); 12] = [
        (r"^cls_token$", "embeddings.cls_token"),
        (r"^mask_token$", "embeddings.mask_token"),
        (r"^pos_embed$", "embeddings.position_embeddings"),
        (r"^register_tokens$", "embeddings.register_tokens"),
        (r"^patch_embed\.proj\.(weight|bias)$", "embeddings.patch_embeddings.projection.$1"),
        (r"^blocks\.(\d+)\.norm([12])\.(weight|bias)$", "encoder.layer.$1.norm$2.$3"),
        (r"^blocks\.(\d+)\.attn\.proj\.(weight|bias)$", "encoder.layer.$1.attention.output.dense.$2"),
        (r"^blocks\.(\d+)\.ls([12])\.gamma$", "encoder.layer.$1.layer_scale$2.lambda1"),
        (r"^blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", "encoder.layer.$1.mlp.$2.$3"),
        (r"^blocks\.(\d+)\.mlp\.w12\.(weight|bias)$", "encoder.layer.$1.mlp.weights_in.$2"),
        (r"^blocks\.(\d+)\.mlp\.w3\.(weight|bias)$", "encoder.layer.$1.mlp.weights_out.$2"),
        (r"^norm\.(weight|bias)$", "layernorm.$1"),
    ];
    let rules: Vec<(Regex, &str)> = rules.iter().map(|(p, r)| (Regex::new(p).expect("valid"), *r)).collect();
    let qkv = Regex::new(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$").expect("valid");
    let mut out = TensorMap::new();
    for (key, tensor) in map {
        if let Some(caps) = qkv.captures(key) {
            let rows = tensor.shape[0] / 3;
            let per = tensor.data.len() / 3;
            for (i, name) in ["query", "key", "value"].iter().enumerate() {
                let mut shape = tensor.shape.clone();
                shape[0] = rows;
                out.insert(
                    format!("encoder.layer.{}.attention.attention.{name}.{}", &caps[1], &caps[2]),
                    RawTensor::new(shape, tensor.data[i * per..(i + 1) * per].to_vec()),
                );
            }
        } else if let Some((re, rep)) = rules.iter().find(|(re, _)| re.is_match(key)) {
            out.insert(re.replace(key, *rep).into_owned(), tensor.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize]) -> RawTensor {
        let n = shape.iter().product();
        RawTensor::new(shape.to_vec(), (0..n).map(|i| i as f32).collect())
    }

    #[test]
    fn wrappers_are_stripped_only_when_shared_by_all_keys() {
        let mut map = TensorMap::new();
        map.insert("model.cls_token".into(), t(&[1, 1, 2]));
        map.insert("model.blocks.0.norm1.weight".into(), t(&[2]));
        let map = strip_wrappers(map);
        assert!(map.contains_key("cls_token"));
        let mut mixed = TensorMap::new();
        mixed.insert("model.a".into(), t(&[1]));
        mixed.insert("b".into(), t(&[1]));
        assert!(strip_wrappers(mixed).contains_key("model.a"));
    }

    #[test]
    fn hf_keys_rename_and_fuse_and_invert() {
        let mut map = TensorMap::new();
        map.insert("embeddings.cls_token".into(), t(&[1, 1, 4]));
        map.insert("embeddings.position_embeddings".into(), t(&[1, 5, 4]));
        map.insert("embeddings.patch_embeddings.projection.weight".into(), t(&[4, 3, 2, 2]));
        for p in ["query", "key", "value"] {
            map.insert(format!("encoder.layer.0.attention.attention.{p}.weight"), t(&[4, 4]));
            map.insert(format!("encoder.layer.0.attention.attention.{p}.bias"), t(&[4]));
        }
        map.insert("encoder.layer.0.layer_scale1.lambda1".into(), t(&[4]));
        map.insert("layernorm.weight".into(), t(&[4]));
        map.insert("pooler.dense.weight".into(), t(&[4, 4]));
        map.insert("something.else".into(), t(&[1]));
        assert_eq!(detect(&map, false), Some(Layout::HfDinov2));
        let c = to_canonical(map.clone(), Layout::HfDinov2);
        assert_eq!(c.tensors["blocks.0.attn.qkv.weight"].shape, vec![12, 4]);
        assert_eq!(c.tensors["blocks.0.attn.qkv.bias"].shape, vec![12]);
        assert!(c.tensors.contains_key("blocks.0.ls1.gamma"));
        assert!(c.tensors.contains_key("norm.weight"));
        assert_eq!(c.ignored, vec!["pooler.dense.weight".to_string()]);
        assert_eq!(c.unknown, vec!["something.else".to_string()]);
        // Inverse gives back the original HF tensors.
        let back = canonical_to_hf(&c.tensors);
        for (k, v) in &back {
            assert_eq!(&map[k], v, "{k}");
        }
        assert_eq!(back.len(), map.len() - 2);
    }

    #[test]
    fn meta_and_mae_are_told_apart() {
        let mut meta = TensorMap::new();
        meta.insert("cls_token".into(), t(&[1, 1, 4]));
        meta.insert("blocks.0.ls1.gamma".into(), t(&[4]));
        assert_eq!(detect(&meta, false), Some(Layout::MetaDinov2));
        let mut mae = TensorMap::new();
        mae.insert("cls_token".into(), t(&[1, 1, 4]));
        mae.insert("blocks.0.norm1.weight".into(), t(&[4]));
        mae.insert("mask_token".into(), t(&[1, 1, 2]));
        mae.insert("decoder_embed.weight".into(), t(&[2, 4]));
        assert_eq!(detect(&mae, false), Some(Layout::Mae));
        let c = to_canonical(mae, Layout::Mae);
        assert_eq!(c.ignored, vec!["decoder_embed.weight".to_string(), "mask_token".to_string()]);
        assert!(c.unknown.is_empty());
        let mut other = TensorMap::new();
        other.insert("conv1.weight".into(), t(&[1]));
        assert_eq!(detect(&other, false), None);
    }
}
