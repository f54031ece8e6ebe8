//! Files shipped inside the binary from `assets/`, addressed as `builtin:<name>` wherever a
//! checkpoint path is accepted (`--weights builtin:source-tiny`, `model.weights` in a run
//! config), so the default run works offline from any directory.

use std::path::Path;

/// The tiny ViT that explora pre-trained with the DINOv2 objective on the procedural source
/// domain (`assets/recipes/source-tiny.toml` regenerates it): the default run's source
/// backbone.
pub const SOURCE_TINY: &str = "builtin:source-tiny";

static SOURCE_TINY_BYTES: &[u8] = include_bytes!("../../assets/source-tiny.safetensors");

/// The shipped bytes behind a `builtin:` path, or `None` for an ordinary path.
pub fn bytes(path: &Path) -> Option<&'static [u8]> {
    match path.to_str()? {
        SOURCE_TINY => Some(SOURCE_TINY_BYTES),
        _ => None,
    }
}

/// Whether `path` names a shipped file (`builtin:…`), known or not.
pub fn is_builtin(path: &Path) -> bool {
    path.to_str().is_some_and(|p| p.starts_with("builtin:"))
}

/// The architecture of a shipped checkpoint (from its metadata, without building the model).
pub fn config(path: &Path) -> anyhow::Result<crate::model::VitConfig> {
    let (_, meta) = crate::checkpoint::read_safetensors(path)?;
    let json = meta.get("config").ok_or_else(|| anyhow::anyhow!("{} has no config in its metadata", path.display()))?;
    Ok(serde_json::from_str(json)?)
}

/// Whether a checkpoint path can be read: a shipped file or an existing one.
pub fn exists(path: &Path) -> bool {
    bytes(path).is_some() || path.exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_source_backbone_is_an_explora_checkpoint() {
        let path = Path::new(SOURCE_TINY);
        assert!(is_builtin(path) && exists(path));
        let (tensors, meta) = crate::checkpoint::read_safetensors(path).unwrap();
        assert_eq!(meta.get("format").map(String::as_str), Some(crate::checkpoint::EXPLORA_FORMAT));
        assert!(tensors.contains_key("blocks.3.attn.qkv.weight"));
        assert_eq!(config(path).unwrap().name, "tiny");
        assert!(bytes(Path::new("builtin:nothing")).is_none() && !exists(Path::new("builtin:nothing")));
        assert!(bytes(Path::new("source-tiny")).is_none());
    }
}
