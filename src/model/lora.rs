//! Low-rank adapters beside frozen projections (LoRA, Hu et al. 2021), as ExPLoRA uses them.
//!
//! The adapter layer lives in `model/` because the forward pass must call it; *which*
//! projections get one, freezing and accounting are decided by `peft/`.

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Initializer};
use burn::tensor::module::linear;
use burn::tensor::{Device, Tensor};

/// `scale · (dropout(x) A) B` with A `[d_in, rank]`, B `[rank, d_out]`, scale = alpha / rank.
/// Dropout acts only while training on an autodiff device (ExPLoRA uses none).
///
/// Init as in the LoRA paper and ExPLoRA's code: A kaiming-uniform with a = √5 (uniform in
/// ±1/√d_in), B zeros — so the adapted model equals the base model at step 0.
#[derive(Module, Debug)]
pub struct Lora {
    pub a: Param<Tensor<2>>,
    pub b: Param<Tensor<2>>,
    pub dropout: Dropout,
    scale: f64,
}

impl Lora {
    pub fn new(d_in: usize, d_out: usize, rank: usize, alpha: f64, dropout: f64, device: &Device) -> Self {
        let bound = 1.0 / (d_in as f64).sqrt();
        Self {
            a: Initializer::Uniform { min: -bound, max: bound }.init([d_in, rank], device),
            b: Initializer::Zeros.init([rank, d_out], device),
            dropout: DropoutConfig::new(dropout).init(),
            scale: alpha / rank as f64,
        }
    }

    pub fn rank(&self) -> usize {
        self.a.dims()[1]
    }

    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The update for input `x` `[.., d_in]` → `[.., d_out]`.
    pub fn delta<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let x = self.dropout.forward(x);
        let (a, b) = (self.a.val(), self.b.val());
        // Without gradients on the CPU backend: two gemm calls, the scale folded into the second.
        if let Some(delta) = super::cpu::affine(&x, &a, None, 1.0).and_then(|h| super::cpu::affine(&h, &b, None, self.scale as f32)) {
            return delta;
        }
        linear(linear(x, a, None), b, None).mul_scalar(self.scale)
    }

    /// The dense update `scale · A B` `[d_in, d_out]` (burn's weight orientation), for merging.
    pub fn weight_delta(&self) -> Tensor<2> {
        self.a.val().matmul(self.b.val()).mul_scalar(self.scale)
    }
}
