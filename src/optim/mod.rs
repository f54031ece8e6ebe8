//! AdamW over the trainable parameters only, with DINOv2's parameter rules: no weight decay on
//! biases, norms and LayerScale; layer-wise learning-rate decay; the head's prototype layer
//! frozen for the first steps; a global gradient-norm clip. Hand-written (rather than burn's
//! `AdamW`) because the weight decay follows a schedule and clipping must be global; the state
//! is kept by parameter path so checkpoints can store and restore it exactly.

pub mod schedule;

use std::collections::HashMap;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};

use crate::checkpoint::{RawTensor, TensorMap};
use crate::model::params::map_params;

/// Per-parameter AdamW moments and step count.
#[derive(Debug, Clone)]
struct Moments {
    m: Tensor<1>,
    v: Tensor<1>,
    steps: u64,
}

#[derive(Debug, Clone)]
pub struct AdamW {
    pub betas: [f64; 2],
    pub eps: f64,
    state: HashMap<String, Moments>,
}

/// What one update uses besides the gradients.
#[derive(Debug, Clone, Copy)]
pub struct UpdateRule {
    pub lr: f64,
    pub weight_decay: f64,
    pub layer_decay: f64,
    pub depth: usize,
    /// Leave `head.prototypes` untouched this step.
    pub freeze_prototypes: bool,
    /// Leave every `backbone.*` tensor untouched this step (the head warms up first).
    pub freeze_backbone: bool,
}

/// DINOv2: no weight decay on biases, norms and LayerScale.
pub fn decays(path: &str) -> bool {
    !(path.ends_with(".bias") || path.contains("norm") || path.contains("gamma"))
}

/// Layer-wise lr multiplier: embeddings and tokens are layer 0, block i is layer i + 1, the
/// final norm and the head are layer depth + 1; multiplier = decay^(depth + 1 − layer).
pub fn lr_multiplier(path: &str, depth: usize, decay: f64) -> f64 {
    let layer = match path.strip_prefix("backbone.") {
        None => depth + 1,
        Some(rest) => match rest.strip_prefix("blocks.") {
            Some(r) => r.split('.').next().and_then(|i| i.parse::<usize>().ok()).map_or(depth + 1, |i| i + 1),
            None if rest.starts_with("norm.") => depth + 1,
            None => 0,
        },
    };
    decay.powi((depth + 1 - layer) as i32)
}

/// The global L2 norm of all gradients and the factor that clips it to `clip` (1 when
/// `clip` ≤ 0 or the norm is below it), both `[1]` tensors left on the device: nothing is read
/// back, so a training step does not wait for the device here.
pub fn clip_by_global_norm(grads: &HashMap<String, Tensor<1>>, clip: f64, device: &Device) -> (Tensor<1>, Tensor<1>) {
    let squares: Vec<Tensor<1>> = grads.values().map(|g| g.clone().powf_scalar(2.0).sum()).collect();
    if squares.is_empty() {
        return (Tensor::zeros([1], device), Tensor::ones([1], device));
    }
    let norm = Tensor::cat(squares, 0).sum().sqrt();
    let scale = if clip > 0.0 { norm.clone().add_scalar(1e-6).recip().mul_scalar(clip).clamp_max(1.0) } else { Tensor::ones([1], device) };
    (norm, scale)
}

impl AdamW {
    pub fn new(betas: [f64; 2], eps: f64) -> Self {
        Self { betas, eps, state: HashMap::new() }
    }

    /// Applies one update to every parameter of `module` that has a gradient in `grads`, each
    /// gradient first multiplied by `grad_scale` (`[1]`, the clip factor).
    pub fn step<M: Module>(&mut self, module: M, grads: &HashMap<String, Tensor<1>>, grad_scale: &Tensor<1>, rule: UpdateRule) -> M {
        let [b1, b2] = self.betas;
        let eps = self.eps;
        let state = &mut self.state;
        map_params(module, |path, param| {
            let grad = grads.get(path)?;
            if (rule.freeze_prototypes && path == "head.prototypes") || (rule.freeze_backbone && path.starts_with("backbone.")) {
                return None;
            }
            let g = grad.clone() * grad_scale.clone();
            let moments =
                state.entry(path.to_string()).or_insert_with(|| Moments { m: param.zeros_like(), v: param.zeros_like(), steps: 0 });
            moments.steps += 1;
            moments.m = moments.m.clone().mul_scalar(b1) + g.clone().mul_scalar(1.0 - b1);
            moments.v = moments.v.clone().mul_scalar(b2) + g.powf_scalar(2.0).mul_scalar(1.0 - b2);
            let t = moments.steps as i32;
            let m_hat = moments.m.clone().div_scalar(1.0 - b1.powi(t));
            let v_hat = moments.v.clone().div_scalar(1.0 - b2.powi(t));
            let lr = rule.lr * lr_multiplier(path, rule.depth, rule.layer_decay);
            let wd = if decays(path) { rule.weight_decay } else { 0.0 };
            let decayed = param.mul_scalar(1.0 - lr * wd);
            Some(decayed - (m_hat / v_hat.sqrt().add_scalar(eps)).mul_scalar(lr))
        })
    }

    /// The state as tensors (`optim.m.<path>`, `optim.v.<path>`) and step counts by path.
    pub fn save(&self) -> (TensorMap, HashMap<String, u64>) {
        let mut tensors = TensorMap::new();
        let mut steps = HashMap::new();
        for (path, s) in &self.state {
            for (kind, t) in [("m", &s.m), ("v", &s.v)] {
                let data = crate::model::to_vec(t.clone());
                tensors.insert(format!("optim.{kind}.{path}"), RawTensor::new(vec![data.len()], data));
            }
            steps.insert(path.clone(), s.steps);
        }
        (tensors, steps)
    }

    /// Restores the state written by [`AdamW::save`] onto `device`.
    pub fn load(&mut self, tensors: &TensorMap, steps: &HashMap<String, u64>, device: &Device) -> anyhow::Result<()> {
        self.state.clear();
        let tensor = |raw: &RawTensor| Tensor::<1>::from_data(TensorData::new(raw.data.clone(), [raw.data.len()]), device);
        for (path, &n) in steps {
            let get = |kind: &str| {
                tensors
                    .get(&format!("optim.{kind}.{path}"))
                    .ok_or_else(|| anyhow::anyhow!("checkpoint lacks optimizer state `optim.{kind}.{path}`"))
            };
            self.state.insert(path.clone(), Moments { m: tensor(get("m")?), v: tensor(get("v")?), steps: n });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_rules() {
        assert!(!decays("backbone.blocks.3.norm1.gamma"));
        assert!(!decays("backbone.blocks.3.attn.qkv.bias"));
        assert!(!decays("backbone.blocks.3.ls1.gamma"));
        assert!(decays("backbone.blocks.3.attn.lora_q.a"));
        assert!(decays("head.prototypes"));
        assert_eq!(lr_multiplier("head.mlp.0.weight", 4, 0.9), 1.0);
        assert_eq!(lr_multiplier("backbone.norm.gamma", 4, 0.9), 1.0);
        assert!((lr_multiplier("backbone.blocks.3.attn.qkv.weight", 4, 0.9) - 0.9).abs() < 1e-12);
        assert!((lr_multiplier("backbone.cls_token", 4, 0.9) - 0.9f64.powi(5)).abs() < 1e-12);
    }

    #[test]
    fn global_norm_clipping_stays_on_the_device() {
        let device = Device::flex();
        let grads = HashMap::from([
            ("a".to_string(), Tensor::<1>::from_data(TensorData::new(vec![3.0f32, 0.0], [2]), &device)),
            ("b".to_string(), Tensor::<1>::from_data(TensorData::new(vec![4.0f32], [1]), &device)),
        ]);
        let read = |t: Tensor<1>| t.into_scalar::<f32>() as f64;
        let (norm, scale) = clip_by_global_norm(&grads, 2.5, &device);
        assert!((read(norm) - 5.0).abs() < 1e-6);
        assert!((read(scale) - 2.5 / (5.0 + 1e-6)).abs() < 1e-6);
        let (_, scale) = clip_by_global_norm(&grads, 10.0, &device);
        assert_eq!(read(scale), 1.0, "a norm below the clip is left alone");
        let (_, scale) = clip_by_global_norm(&grads, 0.0, &device);
        assert_eq!(read(scale), 1.0, "clip 0 turns clipping off");
    }
}
