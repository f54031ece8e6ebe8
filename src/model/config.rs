//! Typed ViT configurations and the named presets of the DINOv2 and MAE families.

use serde::{Deserialize, Serialize};

/// Which pre-training family a backbone comes from. It decides the defaults that differ between
/// the two (LayerScale, mask token, position-embedding interpolation offset) and which
/// self-supervised objective continues its pre-training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Dinov2,
    Mae,
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::Dinov2 => "dinov2",
            Family::Mae => "mae",
        })
    }
}

/// Architecture of a ViT backbone. Every field is needed to build the module; presets give the
/// published architectures and `checkpoint::infer_config` recovers one from a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    /// Preset name or a free label ("inferred", "custom").
    pub name: String,
    pub family: Family,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub patch_size: usize,
    /// Side of the square grid the stored position embeddings were trained for
    /// (37 for DINOv2's 518 px, 14 for MAE's 224 px with patch 16).
    pub pos_grid: usize,
    /// MLP hidden width as a multiple of `embed_dim` (before the SwiGLU 2/3 rule).
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    /// SwiGLU MLP (DINOv2 ViT-g) instead of fc1-GELU-fc2.
    #[serde(default)]
    pub swiglu: bool,
    /// LayerScale after attention and MLP (DINOv2); its initial value for fresh weights.
    #[serde(default)]
    pub layer_scale: Option<f64>,
    /// Register tokens (DINOv2 "with registers").
    #[serde(default)]
    pub num_registers: usize,
    /// A learnable mask token for masked-patch objectives (iBOT).
    #[serde(default = "yes")]
    pub mask_token: bool,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    /// Offset added to the target grid when computing the bicubic scale factor of the position
    /// embeddings: 0.1 in Meta's DINOv2 code, 0.0 (exact output size) in Hugging Face's.
    #[serde(default)]
    pub interpolate_offset: f64,
    /// Antialiased bicubic resampling of the position embeddings (Hugging Face's
    /// Dinov2WithRegisters does this; Meta's code and Dinov2Model do not).
    #[serde(default)]
    pub interpolate_antialias: bool,
    /// Default input resolution in pixels (a multiple of `patch_size`).
    pub image_size: usize,
}

fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_eps() -> f64 {
    1e-6
}
fn yes() -> bool {
    true
}

/// An architecture that cannot be built, with the field at fault.
pub type VitConfigError = crate::fields::FieldError;

impl VitConfig {
    fn dinov2(name: &str, embed_dim: usize, depth: usize, num_heads: usize) -> Self {
        Self {
            name: name.to_string(),
            family: Family::Dinov2,
            embed_dim,
            depth,
            num_heads,
            patch_size: 14,
            pos_grid: 37,
            mlp_ratio: 4.0,
            swiglu: false,
            layer_scale: Some(1e-5),
            num_registers: 0,
            mask_token: true,
            norm_eps: 1e-6,
            interpolate_offset: 0.1,
            interpolate_antialias: false,
            image_size: 224,
        }
    }

    fn mae(name: &str, embed_dim: usize, depth: usize, num_heads: usize, patch: usize) -> Self {
        Self {
            name: name.to_string(),
            family: Family::Mae,
            embed_dim,
            depth,
            num_heads,
            patch_size: patch,
            pos_grid: 224 / patch,
            mlp_ratio: 4.0,
            swiglu: false,
            layer_scale: None,
            num_registers: 0,
            mask_token: false,
            norm_eps: 1e-6,
            interpolate_offset: 0.0,
            interpolate_antialias: false,
            image_size: 224,
        }
    }

    /// DINOv2 ViT-S/14 (Oquab et al. 2023, Table 17: width 384, 12 blocks, 6 heads; 22.06M params).
    pub fn dinov2_vits14() -> Self {
        Self::dinov2("vits14", 384, 12, 6)
    }
    /// DINOv2 ViT-B/14 (width 768, 12 blocks, 12 heads).
    pub fn dinov2_vitb14() -> Self {
        Self::dinov2("vitb14", 768, 12, 12)
    }
    /// DINOv2 ViT-L/14 (width 1024, 24 blocks, 16 heads).
    pub fn dinov2_vitl14() -> Self {
        Self::dinov2("vitl14", 1024, 24, 16)
    }
    /// DINOv2 ViT-g/14 (width 1536, 40 blocks, 24 heads, SwiGLU MLP with 4096 hidden units).
    pub fn dinov2_vitg14() -> Self {
        Self { swiglu: true, ..Self::dinov2("vitg14", 1536, 40, 24) }
    }
    /// MAE ViT-B/16 (He et al. 2022; width 768, 12 blocks, 12 heads, no LayerScale).
    pub fn mae_vitb16() -> Self {
        Self::mae("mae-vitb16", 768, 12, 12, 16)
    }
    /// MAE ViT-L/16 (width 1024, 24 blocks, 16 heads).
    pub fn mae_vitl16() -> Self {
        Self::mae("mae-vitl16", 1024, 24, 16, 16)
    }
    /// MAE ViT-H/14 (width 1280, 32 blocks, 16 heads).
    pub fn mae_vith14() -> Self {
        Self::mae("mae-vith14", 1280, 32, 16, 14)
    }
    /// A tiny DINOv2-style backbone for tests and the built-in default run: width 64, 4 blocks,
    /// 4 heads, patch 8, 64 px input (8×8 patches), LayerScale and a mask token.
    pub fn tiny() -> Self {
        Self {
            name: "tiny".to_string(),
            family: Family::Dinov2,
            embed_dim: 64,
            depth: 4,
            num_heads: 4,
            patch_size: 8,
            pos_grid: 8,
            mlp_ratio: 4.0,
            swiglu: false,
            layer_scale: Some(0.1),
            num_registers: 0,
            mask_token: true,
            norm_eps: 1e-6,
            interpolate_offset: 0.0,
            interpolate_antialias: false,
            image_size: 64,
        }
    }

    /// Every preset name with its config, in the order `--help` lists them.
    pub fn presets() -> Vec<VitConfig> {
        vec![
            Self::tiny(),
            Self::dinov2_vits14(),
            Self::dinov2_vitb14(),
            Self::dinov2_vitl14(),
            Self::dinov2_vitg14(),
            Self::mae_vitb16(),
            Self::mae_vitl16(),
            Self::mae_vith14(),
        ]
    }

    /// Looks a preset up by name; `vits14_reg` style names add 4 register tokens.
    pub fn preset(name: &str) -> Option<Self> {
        let (base, registers) = match name.strip_suffix("_reg") {
            Some(base) => (base, 4),
            None => (name, 0),
        };
        let base = base.strip_prefix("dinov2-").unwrap_or(base);
        let mut config = Self::presets().into_iter().find(|c| c.name == base)?;
        if registers > 0 {
            if config.family != Family::Dinov2 {
                return None;
            }
            config.num_registers = registers;
            config.name = name.to_string();
        }
        Some(config)
    }

    /// Hidden width of the MLP: `embed_dim * mlp_ratio`, or for SwiGLU the DINOv2 rule
    /// `round_up_8(int(hidden * 2 / 3))` (SwiGLUFFNFused), whose first layer is twice as wide.
    pub fn mlp_hidden(&self) -> usize {
        let hidden = (self.embed_dim as f64 * self.mlp_ratio) as usize;
        if self.swiglu { (hidden * 2 / 3).div_ceil(8) * 8 } else { hidden }
    }

    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }

    /// Number of patch tokens for an input of `height × width` pixels.
    pub fn num_patches(&self, height: usize, width: usize) -> usize {
        (height / self.patch_size) * (width / self.patch_size)
    }

    /// Checks that the architecture can be built; names the first field at fault.
    pub fn validate(&self) -> Result<(), VitConfigError> {
        let err = |field, reason: String| Err(VitConfigError::model(field, reason));
        if self.embed_dim == 0 {
            return err("embed_dim", "must be positive".into());
        }
        if self.depth == 0 {
            return err("depth", "must be at least 1".into());
        }
        if self.num_heads == 0 || !self.embed_dim.is_multiple_of(self.num_heads) {
            return err("num_heads", format!("({}) must divide embed_dim ({})", self.num_heads, self.embed_dim));
        }
        if self.patch_size == 0 {
            return err("patch_size", "must be positive".into());
        }
        if self.pos_grid == 0 {
            return err("pos_grid", "must be positive".into());
        }
        if self.image_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return err("image_size", format!("({}) must be a positive multiple of patch_size ({})", self.image_size, self.patch_size));
        }
        if !(self.mlp_ratio > 0.0) {
            return err("mlp_ratio", "must be positive".into());
        }
        if !(self.norm_eps > 0.0) {
            return err("norm_eps", "must be positive".into());
        }
        Ok(())
    }

    /// Parameter count of the backbone as built from this config.
    pub fn num_params(&self) -> usize {
        let d = self.embed_dim;
        let p = self.patch_size;
        let hidden = self.mlp_hidden();
        let mlp = if self.swiglu { (d * 2 * hidden + 2 * hidden) + (hidden * d + d) } else { (d * hidden + hidden) + (hidden * d + d) };
        let block = 2 * (2 * d) // two LayerNorms
            + (d * 3 * d + 3 * d) // qkv
            + (d * d + d) // proj
            + mlp
            + if self.layer_scale.is_some() { 2 * d } else { 0 };
        let embed = 3 * p * p * d + d // patch embedding
            + d // cls token
            + (1 + self.pos_grid * self.pos_grid) * d
            + self.num_registers * d
            + if self.mask_token { d } else { 0 };
        embed + self.depth * block + 2 * d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vits14_parameter_count_matches_the_published_checkpoint() {
        // ../shared/README.md: the real ViT-S/14 holds 22,056,192 parameters (no mask token).
        let config = VitConfig { mask_token: false, ..VitConfig::dinov2_vits14() };
        assert_eq!(config.num_params(), 22_056_192);
    }

    #[test]
    fn vitg14_swiglu_hidden_width_follows_dinov2() {
        assert_eq!(VitConfig::dinov2_vitg14().mlp_hidden(), 4096);
        assert_eq!(VitConfig::dinov2_vitl14().mlp_hidden(), 4096);
    }

    #[test]
    fn preset_lookup_and_registers() {
        assert_eq!(VitConfig::preset("vitl14").unwrap().depth, 24);
        assert_eq!(VitConfig::preset("dinov2-vitb14").unwrap().embed_dim, 768);
        assert_eq!(VitConfig::preset("vits14_reg").unwrap().num_registers, 4);
        assert!(VitConfig::preset("mae-vitb16_reg").is_none());
        assert!(VitConfig::preset("vitz99").is_none());
        for preset in VitConfig::presets() {
            preset.validate().unwrap();
        }
    }

    #[test]
    fn validation_names_the_field() {
        let bad = VitConfig { num_heads: 5, ..VitConfig::tiny() };
        assert_eq!(bad.validate().unwrap_err().field, "num_heads");
        let bad = VitConfig { image_size: 60, ..VitConfig::tiny() };
        assert_eq!(bad.validate().unwrap_err().field, "image_size");
    }
}
