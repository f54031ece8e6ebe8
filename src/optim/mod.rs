//! AdamW over the trainable parameters only, with DINOv2's parameter rules: no weight decay on
//! biases, norms and LayerScale; layer-wise learning-rate decay; the head's prototype layer
//! frozen for the first steps; a global gradient-norm clip. Hand-written (rather than burn's
//! `AdamW`) because the weight decay follows a schedule and clipping must be global; the state
//! is kept by parameter path so checkpoints can store and restore it exactly.

pub mod schedule;

use std::collections::{HashMap, HashSet};

use burn::module::Module;
use burn::tensor::{DType, Device, Tensor, TensorData};
use rayon::prelude::*;

use crate::checkpoint::{RawTensor, TensorMap};
use crate::device::is_native_cpu;
use crate::model::params::map_selected_params;

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
    /// gradient first multiplied by `grad_scale` (`[1]`, the clip factor). The gradients are
    /// consumed: the CPU path reuses their memory instead of copying it. On the CPU backend
    /// each parameter is updated in one parallel pass over its values, gradient and moments
    /// ([`fused_update`]); elsewhere through tensor operations ([`tensor_update`]), which
    /// compute the same values.
    pub fn step<M: Module>(&mut self, module: M, grads: HashMap<String, Tensor<1>>, grad_scale: &Tensor<1>, rule: UpdateRule) -> M {
        let fused =
            (is_native_cpu(&grad_scale.device()) && grad_scale.dtype() == DType::F32).then(|| grad_scale.clone().into_scalar::<f32>());
        self.step_with(module, grads, grad_scale, rule, fused)
    }

    /// [`AdamW::step`], fused with `scale` (the clip factor, read back) or through tensor
    /// operations with `grad_scale` when `fused` is `None`.
    fn step_with<M: Module>(
        &mut self,
        module: M,
        mut grads: HashMap<String, Tensor<1>>,
        grad_scale: &Tensor<1>,
        rule: UpdateRule,
        fused: Option<f32>,
    ) -> M {
        let with_grads: HashSet<String> = grads.keys().cloned().collect();
        let [b1, b2] = self.betas;
        let eps = self.eps;
        let state = &mut self.state;
        map_selected_params(
            module,
            |path| with_grads.contains(path),
            |path, param| {
                let grad = grads.remove(path)?;
                if (rule.freeze_prototypes && path == "head.prototypes") || (rule.freeze_backbone && path.starts_with("backbone.")) {
                    return None;
                }
                let mut moments = state.remove(path).unwrap_or_else(|| Moments { m: param.zeros_like(), v: param.zeros_like(), steps: 0 });
                moments.steps += 1;
                let t = moments.steps as i32;
                let lr = rule.lr * lr_multiplier(path, rule.depth, rule.layer_decay);
                let wd = if decays(path) { rule.weight_decay } else { 0.0 };
                let k = Coefficients { b1, b2, eps, lr, wd, bias1: 1.0 - b1.powi(t), bias2: 1.0 - b2.powi(t) };
                let (param, moments) = match fused {
                    Some(scale) if param.dtype() == DType::F32 => fused_update(param, grad, moments, scale, k),
                    _ => tensor_update(param, grad, moments, grad_scale, k),
                };
                state.insert(path.to_string(), moments);
                Some(param)
            },
        )
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

/// The numbers of one parameter's AdamW update.
#[derive(Debug, Clone, Copy)]
struct Coefficients {
    b1: f64,
    b2: f64,
    eps: f64,
    lr: f64,
    wd: f64,
    /// `1 − β₁ᵗ` and `1 − β₂ᵗ`.
    bias1: f64,
    bias2: f64,
}

/// AdamW through tensor operations (any device):
/// `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`, `p ← p(1 − lr·wd) − lr·m̂/(√v̂ + ε)`.
fn tensor_update(param: Tensor<1>, grad: Tensor<1>, moments: Moments, grad_scale: &Tensor<1>, k: Coefficients) -> (Tensor<1>, Moments) {
    let g = grad * grad_scale.clone();
    let m = moments.m.mul_scalar(k.b1) + g.clone().mul_scalar(1.0 - k.b1);
    let v = moments.v.mul_scalar(k.b2) + g.powf_scalar(2.0).mul_scalar(1.0 - k.b2);
    let m_hat = m.clone().div_scalar(k.bias1);
    let v_hat = v.clone().div_scalar(k.bias2);
    let decayed = param.mul_scalar(1.0 - k.lr * k.wd);
    let param = decayed - (m_hat / v_hat.sqrt().add_scalar(k.eps)).mul_scalar(k.lr);
    (param, Moments { m, v, steps: moments.steps })
}

/// Elements per parallel task of [`fused_update`].
const CHUNK: usize = 16 * 1024;

/// [`tensor_update`] on the CPU backend in one parallel pass: the parameter and both moments
/// are rewritten in place (the tensor path makes some fifteen passes, each allocating).
fn fused_update(param: Tensor<1>, grad: Tensor<1>, moments: Moments, scale: f32, k: Coefficients) -> (Tensor<1>, Moments) {
    let device = param.device();
    let (mut p, mut m, mut v) = (param.into_data(), moments.m.into_data(), moments.v.into_data());
    let g = grad.into_data();
    let (Ok(ps), Ok(ms), Ok(vs), Ok(gs)) = (p.as_mut_slice::<f32>(), m.as_mut_slice::<f32>(), v.as_mut_slice::<f32>(), g.as_slice::<f32>())
    else {
        unreachable!("fused_update is called for f32 parameters on the CPU backend");
    };
    let (b1, b2) = (k.b1 as f32, k.b2 as f32);
    let (c1, c2) = (1.0 - b1, 1.0 - b2);
    let (bias1, bias2, eps) = (k.bias1 as f32, k.bias2 as f32, k.eps as f32);
    let (lr, keep) = (k.lr as f32, (1.0 - k.lr * k.wd) as f32);
    ps.par_chunks_mut(CHUNK).zip(ms.par_chunks_mut(CHUNK)).zip(vs.par_chunks_mut(CHUNK)).zip(gs.par_chunks(CHUNK)).for_each(
        |(((p, m), v), g)| {
            for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                let g = g * scale;
                *m = b1 * *m + c1 * g;
                *v = b2 * *v + c2 * (g * g);
                *p = *p * keep - (*m / bias1) / ((*v / bias2).sqrt() + eps) * lr;
            }
        },
    );
    let tensor = |data: TensorData| Tensor::<1>::from_data(data, &device);
    (tensor(p), Moments { m: tensor(m), v: tensor(v), steps: moments.steps })
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

    #[test]
    fn the_fused_cpu_update_matches_the_tensor_update() {
        use crate::model::params::for_each_param;
        use burn::module::Param;
        #[derive(Module, Debug)]
        struct Two {
            weight: Param<Tensor<2>>,
            bias: Param<Tensor<1>>,
        }
        let device = Device::flex();
        let values = |n: usize, k: f32| (0..n).map(|i| ((i as f32 * k).sin() + 0.1) * 0.5).collect::<Vec<f32>>();
        let module = || Two {
            weight: Param::from_tensor(Tensor::from_data(TensorData::new(values(40_000, 0.37), [200, 200]), &device)),
            bias: Param::from_tensor(Tensor::from_data(TensorData::new(values(200, 1.3), [200]), &device)),
        };
        let grads = HashMap::from([
            ("weight".to_string(), Tensor::<1>::from_data(TensorData::new(values(40_000, 0.11), [40_000]), &device)),
            ("bias".to_string(), Tensor::<1>::from_data(TensorData::new(values(200, 0.7), [200]), &device)),
        ]);
        let scale = Tensor::<1>::from_data(TensorData::new(vec![0.8f32], [1]), &device);
        let rule =
            UpdateRule { lr: 1e-2, weight_decay: 0.05, layer_decay: 1.0, depth: 1, freeze_prototypes: false, freeze_backbone: false };
        let (mut fused, mut plain) = (AdamW::new([0.9, 0.999], 1e-8), AdamW::new([0.9, 0.999], 1e-8));
        let (mut a, mut b) = (module(), module());
        for _ in 0..3 {
            a = fused.step_with(a, grads.clone(), &scale, rule, Some(0.8));
            b = plain.step_with(b, grads.clone(), &scale, rule, None);
        }
        let mut moved = 0.0f32;
        let read = |m: &Two| {
            let mut out = Vec::new();
            for_each_param(m, |_, t, _| out.extend(crate::model::to_vec(t)));
            out
        };
        for ((x, y), start) in read(&a).iter().zip(read(&b)).zip(read(&module())) {
            assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "fused {x} vs tensor ops {y}");
            moved = moved.max((x - start).abs());
        }
        assert!(moved > 1e-3, "three steps at lr 1e-2 move the parameters");
        let ((fm, _), (pm, _)) = (fused.save(), plain.save());
        for (key, raw) in &fm {
            for (x, y) in raw.data.iter().zip(&pm[key].data) {
                assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{key}: {x} vs {y}");
            }
        }
    }
}
