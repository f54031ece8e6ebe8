//! MAE's decoder as the reference checkpoints carry it (the `*_visualize` .pth files):
//! `mask_token`, `decoder_embed`, `decoder_blocks.N.{norm1, attn.qkv, attn.proj, norm2,
//! mlp.fc1, mlp.fc2}`, `decoder_norm`, `decoder_pred` (PyTorch orientation), and the fixed
//! `decoder_pos_embed`, which is rebuilt rather than loaded. The backbone loader reports these
//! keys as ignored; this module reads them into a [`MaeDecoder`].

use std::collections::BTreeSet;
use std::path::Path;

use burn::store::ModuleSnapshot;
use burn::store::burn_pack::Tensor as PackTensor;
use burn::tensor::{Bytes, DType, Device};

use super::CheckpointError;
use super::layout::{self, Layout};
use super::load::raw_from_pack;
use super::raw::{self, TensorMap};
use crate::objectives::mae::{DecoderConfig, MaeDecoder};

/// A decoder read from a checkpoint, and what was found.
pub struct LoadedDecoder {
    pub decoder: MaeDecoder,
    pub config: DecoderConfig,
    /// Tensors loaded.
    pub loaded: usize,
}

fn is_linear_weight(path: &str) -> bool {
    path.ends_with(".weight")
        && (path.starts_with("embed.") || path.starts_with("pred.") || path.contains(".attn.") || path.contains(".mlp."))
}

/// MAE key → the decoder's parameter path (`None`: not a decoder key, or the fixed positions).
fn decoder_path(key: &str, layout: Layout) -> Option<String> {
    if key == "mask_token" {
        // In MAE checkpoints the only mask token is the decoder's.
        return (layout == Layout::Mae).then(|| "mask_token".into());
    }
    let norm = |stem: &str, rest: &str| match rest {
        "weight" => Some(format!("{stem}.gamma")),
        "bias" => Some(format!("{stem}.beta")),
        _ => None,
    };
    if let Some(rest) = key.strip_prefix("decoder_embed.") {
        return Some(format!("embed.{rest}"));
    }
    if let Some(rest) = key.strip_prefix("decoder_pred.") {
        return Some(format!("pred.{rest}"));
    }
    if let Some(rest) = key.strip_prefix("decoder_norm.") {
        return norm("norm", rest);
    }
    let rest = key.strip_prefix("decoder_blocks.")?;
    let (index, rest) = rest.split_once('.')?;
    index.parse::<usize>().ok()?;
    for n in ["norm1", "norm2"] {
        if let Some(r) = rest.strip_prefix(n).and_then(|r| r.strip_prefix('.')) {
            return norm(&format!("blocks.{index}.{n}"), r);
        }
    }
    Some(format!("blocks.{index}.{rest}"))
}

/// The decoder's tensors of a checkpoint, by decoder parameter path in burn orientation.
fn decoder_tensors(map: TensorMap, layout: Layout) -> TensorMap {
    map.into_iter()
        .filter(|(k, _)| k != "decoder_pos_embed")
        .filter_map(|(k, t)| {
            let path = decoder_path(&k, layout)?;
            let t = if is_linear_weight(&path) && t.shape.len() == 2 { t.transposed() } else { t };
            Some((path, t))
        })
        .collect()
}

/// Reads the MAE decoder of the checkpoint at `path` when it carries one (`Ok(None)` when it
/// has no `decoder_*` keys). The width and depth come from the file; `heads` (not recorded in
/// checkpoints) from the run config. The decoder is built for a `grid × grid` patch grid of
/// `patch`-pixel patches after an encoder of width `encoder_width`; a file made for another
/// encoder width or patch size is refused, naming the tensor.
pub fn load_mae_decoder(
    path: &Path,
    heads: usize,
    encoder_width: usize,
    grid: usize,
    patch: usize,
    device: &Device,
) -> Result<Option<LoadedDecoder>, CheckpointError> {
    let (map, metadata) = raw::read_any(path)?;
    let map = layout::strip_wrappers(map);
    if !map.keys().any(|k| k.starts_with("decoder_")) {
        return Ok(None);
    }
    let own = metadata.get("format").map(String::as_str) == Some(super::EXPLORA_FORMAT);
    let layout = layout::detect(&map, own).unwrap_or(Layout::Mae);
    let tensors = decoder_tensors(map, layout);
    let fail = |reason: String| CheckpointError::Architecture { path: path.to_path_buf(), reason: format!("its MAE decoder: {reason}") };
    let embed = tensors.get("embed.weight").ok_or_else(|| fail("no decoder_embed.weight".into()))?;
    let (found_in, width) = (embed.shape[0], embed.shape[1]);
    if found_in != encoder_width {
        return Err(fail(format!("decoder_embed reads width {found_in}, the encoder is {encoder_width} wide")));
    }
    let depth =
        tensors.keys().filter_map(|k| k.strip_prefix("blocks.")?.split('.').next()?.parse::<usize>().ok()).max().map_or(0, |m| m + 1);
    if depth == 0 {
        return Err(fail("no decoder_blocks".into()));
    }
    if heads == 0 || !width.is_multiple_of(heads) {
        return Err(fail(format!("its width {width} is not a multiple of mae.decoder_heads ({heads})")));
    }
    let config = DecoderConfig { width, depth, heads };
    let mut decoder = config.init(encoder_width, grid, patch, device);
    let expected: Vec<(String, Vec<usize>)> =
        decoder.collect(None, None, false).into_iter().map(|t| (t.name.clone(), t.shape.to_vec())).collect();
    let names: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let unexpected: Vec<&String> = tensors.keys().filter(|k| !names.contains(k.as_str())).collect();
    if !unexpected.is_empty() {
        return Err(fail(format!("unexpected tensors {unexpected:?}")));
    }
    let mut pack = Vec::new();
    let mut missing = Vec::new();
    for (name, shape) in &expected {
        match tensors.get(name) {
            None => missing.push(name.clone()),
            Some(t) if t.shape != *shape => {
                return Err(fail(format!(
                    "{name} has shape {:?}, expected {shape:?} (patch {patch}, width {width}; the prediction has patch²·3 outputs)",
                    t.shape
                )));
            }
            Some(t) => pack.push(PackTensor::new(name.clone(), DType::F32, t.shape.clone(), None, Bytes::from_elems(t.data.clone()))),
        }
    }
    if !missing.is_empty() {
        return Err(fail(format!("missing {}", missing.join(", "))));
    }
    let result = decoder.apply(pack, None, None, false);
    if !result.errors.is_empty() {
        return Err(fail(format!("{:?}", result.errors)));
    }
    Ok(Some(LoadedDecoder { decoder, config, loaded: result.applied.len() }))
}

/// The decoder's weights under MAE's checkpoint keys (PyTorch orientation; LoRA factors, if
/// any, are left out), as MAE's `*_visualize` files store them, with `decoder_pos_embed`.
pub fn mae_decoder_tensors(decoder: &MaeDecoder) -> Result<TensorMap, CheckpointError> {
    let mut out = TensorMap::new();
    for t in decoder.collect(None, None, false) {
        if t.name.contains(".lora_") {
            continue;
        }
        let raw = raw_from_pack(&t)?;
        let raw = if is_linear_weight(&t.name) && raw.shape.len() == 2 { raw.transposed() } else { raw };
        let name = &t.name;
        let key = if name == "mask_token" {
            name.clone()
        } else if let Some(rest) = name.strip_prefix("blocks.") {
            format!("decoder_blocks.{}", rest.replace(".gamma", ".weight").replace(".beta", ".bias"))
        } else if let Some(rest) = name.strip_prefix("norm.") {
            format!("decoder_norm.{}", rest.replace("gamma", "weight").replace("beta", "bias"))
        } else {
            format!("decoder_{name}")
        };
        out.insert(key, raw);
    }
    let (w, g) = (decoder.width(), decoder.grid());
    out.insert("decoder_pos_embed".into(), raw::RawTensor::new(vec![1, 1 + g * g, w], crate::objectives::mae::sincos_2d(w, g)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{Metadata, write_safetensors};
    use crate::model::to_vec;

    #[test]
    fn a_decoder_round_trips_through_maes_keys() {
        let device = Device::flex();
        let decoder = DecoderConfig { width: 32, depth: 2, heads: 4 }.init(64, 4, 8, &device);
        let tensors = mae_decoder_tensors(&decoder).unwrap();
        for key in
            ["mask_token", "decoder_embed.weight", "decoder_blocks.1.norm1.weight", "decoder_blocks.0.attn.qkv.bias", "decoder_norm.bias"]
        {
            assert!(tensors.contains_key(key), "{key}: {:?}", tensors.keys().collect::<Vec<_>>());
        }
        assert_eq!(tensors["decoder_embed.weight"].shape, vec![32, 64], "PyTorch orientation [out, in]");
        assert_eq!(tensors["decoder_pred.weight"].shape, vec![8 * 8 * 3, 32]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mae.safetensors");
        let mut all = tensors.clone();
        all.insert("cls_token".into(), raw::RawTensor::new(vec![1, 1, 64], vec![0.0; 64]));
        write_safetensors(&path, &all, &Metadata::new()).unwrap();
        let loaded = load_mae_decoder(&path, 4, 64, 4, 8, &device).unwrap().expect("a decoder");
        assert_eq!(loaded.config, DecoderConfig { width: 32, depth: 2, heads: 4 });
        let original = to_vec(decoder.pred.weight.val());
        assert_eq!(to_vec(loaded.decoder.pred.weight.val()), original);
        assert_eq!(to_vec(loaded.decoder.blocks[1].attn.qkv.weight.val()), to_vec(decoder.blocks[1].attn.qkv.weight.val()));
        // Another patch size or encoder width is refused, naming what differs.
        let err = load_mae_decoder(&path, 4, 64, 2, 16, &device).err().expect("patch 16 refused").to_string();
        assert!(err.contains("pred.weight"), "{err}");
        let err = load_mae_decoder(&path, 4, 96, 4, 8, &device).err().expect("width 96 refused").to_string();
        assert!(err.contains("decoder_embed reads width 64"), "{err}");
        // No decoder keys: none.
        let plain = dir.path().join("plain.safetensors");
        write_safetensors(&plain, &TensorMap::from([("cls_token".to_string(), all["cls_token"].clone())]), &Metadata::new()).unwrap();
        assert!(load_mae_decoder(&plain, 4, 64, 4, 8, &device).unwrap().is_none());
    }
}
