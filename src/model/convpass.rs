//! Convpass (Jie & Deng 2022): a convolutional bypass beside attention and/or MLP that reads the
//! same LayerNorm output: `x + Attn(LN1 x) + s·C(LN1 x)`.
//!
//! C = Linear d→k, QuickGELU, a 3×3 convolution k→k over the patch grid (the CLS and register
//! tokens each go through the same convolution as their own 1×1 image, i.e. its centre tap),
//! QuickGELU, Linear k→d. The up-projection starts at zero, so a fresh adapter changes nothing.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::sigmoid;
use burn::tensor::{Device, Tensor};

fn quick_gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.clone() * sigmoid(x.mul_scalar(1.702))
}

#[derive(Module, Debug)]
pub struct Convpass {
    pub down: Linear,
    pub conv: Conv2d,
    pub up: Linear,
    scale: f64,
}

impl Convpass {
    /// `dim` is the bottleneck width (8 in the paper), `scale` the paper's `s`.
    pub fn new(d: usize, dim: usize, scale: f64, device: &Device) -> Self {
        let xavier = Initializer::XavierUniform { gain: 1.0 };
        Self {
            down: crate::model::init_linear(d, dim, xavier.clone(), device),
            conv: Conv2dConfig::new([dim, dim], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .with_initializer(xavier)
                .init(device),
            up: LinearConfig::new(dim, d).with_initializer(Initializer::Zeros).init(device),
            scale,
        }
    }

    /// `[B, prefix + rows·cols + suffix, D]` → same shape: `prefix` tokens (CLS, registers)
    /// before the patch grid, any task class tokens after it.
    pub fn forward(&self, x: Tensor<3>, prefix: usize, grid: (usize, usize)) -> Tensor<3> {
        let [b, t, _] = x.dims();
        let (rows, cols) = grid;
        let n = rows * cols;
        assert!(t >= prefix + n, "Convpass needs [prefix tokens, patch grid, …]");
        let suffix = t - prefix - n;
        let h = quick_gelu(self.down.forward(x)); // [B, T, k]
        let k = h.dims()[2];
        let patches = h.clone().narrow(1, prefix, n).swap_dims(1, 2).reshape([b, k, rows, cols]);
        let patches = self.conv.forward(patches).reshape([b, k, n]).swap_dims(1, 2);
        // Every other token as a 1×1 image: only the centre tap of the 3×3 kernel sees it.
        let single = |tokens: Tensor<3>, count: usize| self.conv.forward(tokens.reshape([b * count, k, 1, 1])).reshape([b, count, k]);
        let mut parts = vec![single(h.clone().narrow(1, 0, prefix), prefix), patches];
        if suffix > 0 {
            parts.push(single(h.narrow(1, prefix + n, suffix), suffix));
        }
        let h = quick_gelu(Tensor::cat(parts, 1));
        self.up.forward(h).mul_scalar(self.scale)
    }

    pub fn num_params(d: usize, dim: usize) -> usize {
        (d * dim + dim) + (dim * dim * 9 + dim) + (dim * d + d)
    }
}
