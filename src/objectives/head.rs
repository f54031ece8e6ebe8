//! The DINO/iBOT projection head (DINOv2's `DINOHead`): an MLP to a bottleneck, L2
//! normalisation, then a weight-normalised linear layer onto the prototypes.

use crate::model::gelu;
use burn::module::{Module, Param};
use burn::nn::{Initializer, Linear};
use burn::tensor::{Device, Tensor};

/// Sizes of the head. The paper's (DINOv2's) defaults are 3 layers, 2048 hidden, 256
/// bottleneck and 65,536 prototypes; tests and the built-in default use much smaller ones.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeadConfig {
    /// Linear layers before the bottleneck output (≥ 1; the last one maps to the bottleneck).
    pub layers: usize,
    pub hidden: usize,
    pub bottleneck: usize,
    pub prototypes: usize,
}

impl Default for HeadConfig {
    fn default() -> Self {
        Self { layers: 3, hidden: 2048, bottleneck: 256, prototypes: 65_536 }
    }
}

impl HeadConfig {
    pub fn init(&self, embed_dim: usize, device: &Device) -> DinoHead {
        let init = Initializer::Normal { mean: 0.0, std: 0.02 };
        // Weights N(0, 0.02) and zero biases, as DINOv2's DINOHead.
        let linear = |i: usize, o: usize| crate::model::init_linear(i, o, init.clone(), device);
        let mut mlp = Vec::new();
        if self.layers == 1 {
            mlp.push(linear(embed_dim, self.bottleneck));
        } else {
            mlp.push(linear(embed_dim, self.hidden));
            for _ in 1..self.layers - 1 {
                mlp.push(linear(self.hidden, self.hidden));
            }
            mlp.push(linear(self.hidden, self.bottleneck));
        }
        DinoHead { mlp, prototypes: init.init([self.bottleneck, self.prototypes], device) }
    }

    /// Parameters of the head for an `embed_dim`-wide backbone.
    pub fn num_params(&self, embed_dim: usize) -> usize {
        let lin = |i: usize, o: usize| i * o + o;
        let mlp = if self.layers == 1 {
            lin(embed_dim, self.bottleneck)
        } else {
            lin(embed_dim, self.hidden) + (self.layers - 2) * lin(self.hidden, self.hidden) + lin(self.hidden, self.bottleneck)
        };
        mlp + self.bottleneck * self.prototypes
    }
}

/// `x [N, D]` → prototype scores `[N, K]` in [-1, 1]: cosine similarity between the
/// L2-normalised bottleneck and each (normalised) prototype. The prototype norms are fixed
/// at 1 (`weight_g` = 1 in DINO's weight norm), so only directions are learned.
#[derive(Module, Debug)]
pub struct DinoHead {
    pub mlp: Vec<Linear>,
    /// `[bottleneck, K]`, one column per prototype (weight-normalised in the forward pass).
    pub prototypes: Param<Tensor<2>>,
}

pub(crate) fn l2_normalize<const D: usize>(x: Tensor<D>, dim: usize) -> Tensor<D> {
    let norm = x.clone().powf_scalar(2.0).sum_dim(dim).sqrt().clamp_min(1e-12);
    x / norm
}

impl DinoHead {
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let last = self.mlp.len() - 1;
        let mut h = x;
        for (i, layer) in self.mlp.iter().enumerate() {
            h = crate::model::cpu_linear(layer, h);
            if i < last {
                h = gelu(h);
            }
        }
        let h = l2_normalize(h, 1);
        h.matmul(l2_normalize(self.prototypes.val(), 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, Tensor};

    #[test]
    fn a_fresh_head_keeps_images_apart() {
        // DINOv2 initialises the head's biases at zero. With burn's default (the bias drawn
        // like the weights, N(0, 0.02)) the bias outweighs the signal and every image's
        // bottleneck points the same way (mean cosine ≈ 0.9), so the teacher's targets carry
        // nothing about the image.
        let device = burn::tensor::Device::flex();
        device.seed(3);
        let head = HeadConfig { layers: 3, hidden: 256, bottleneck: 64, prototypes: 32 }.init(192, &device);
        let x = Tensor::<2>::random([16, 192], Distribution::Normal(0.0, 1.0), &device);
        let mut h = x;
        let last = head.mlp.len() - 1;
        for (i, layer) in head.mlp.iter().enumerate() {
            h = layer.forward(h);
            if i < last {
                h = gelu(h);
            }
        }
        let h = l2_normalize(h, 1);
        let cos = crate::model::to_vec(h.clone().matmul(h.transpose()).reshape([256]));
        let off: Vec<f32> =
            (0..16).flat_map(|i| (0..16).filter(move |&j| j != i).map(move |j| (i, j))).map(|(i, j)| cos[i * 16 + j]).collect();
        let mean = off.iter().sum::<f32>() / off.len() as f32;
        assert!(mean < 0.5, "mean cosine between different images' bottlenecks: {mean}");
        assert!(head.mlp.iter().all(|l| crate::model::to_vec(l.bias.as_ref().unwrap().val()).iter().all(|&b| b == 0.0)));
    }
}
