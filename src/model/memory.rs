//! Learnable memory (Sandler et al., CVPR 2022): a task gets its own class token and `m`
//! memory tokens per layer that act only as extra keys/values. In a shared pass the original
//! tokens never attend to any task's class token or memory, so the original outputs are exactly
//! unchanged; a task's class token attends to the original tokens, itself and its own memory.

use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::{Device, Tensor, TensorData};

#[derive(Module, Debug)]
pub struct MemoryTask {
    /// `[1, 1, D]`, initialised from the model's CLS token.
    pub cls: Param<Tensor<3>>,
    /// `[depth, m, D]`, N(0, 0.02).
    pub memory: Param<Tensor<3>>,
}

impl MemoryTask {
    pub fn new(model_cls: Tensor<3>, depth: usize, tokens: usize, device: &Device) -> Self {
        let d = model_cls.dims()[2];
        Self {
            cls: Param::from_tensor(model_cls.detach()),
            memory: Initializer::Normal { mean: 0.0, std: 0.02 }.init([depth, tokens, d], device),
        }
    }

    pub fn tokens_per_layer(&self) -> usize {
        self.memory.dims()[1]
    }
}

/// Additive attention bias `[T, T + K·m]` for `original` tokens followed by `K` task class
/// tokens, with keys `[tokens…, memory of task 0…, memory of task 1…]`: 0 where attention is
/// allowed, a large negative number where it is not.
pub fn memory_mask(original: usize, tasks: usize, per_task: usize, device: &Device) -> Tensor<2> {
    const BLOCKED: f32 = -1e9;
    let t = original + tasks;
    let keys = t + tasks * per_task;
    let mut bias = vec![BLOCKED; t * keys];
    for q in 0..t {
        let row = &mut bias[q * keys..(q + 1) * keys];
        row[..original].fill(0.0);
        if q >= original {
            let k = q - original;
            row[q] = 0.0;
            row[t + k * per_task..t + (k + 1) * per_task].fill(0.0);
        }
    }
    Tensor::from_data(TensorData::new(bias, [t, keys]), device)
}
