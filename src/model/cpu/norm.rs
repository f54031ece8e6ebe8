//! LayerNorm with gradients on the CPU backend, as one autodiff operation.
//!
//! burn-autodiff builds a LayerNorm from nine tensor operations (mean, centre, square, mean,
//! add ε, square root, divide, scale, shift), each with its own buffer and, in the backward
//! pass, one or two more with broadcast reductions: about thirty passes over the activations
//! per norm, each handed to rayon's threads. Here the forward is one parallel pass that keeps
//! the normalised rows and each row's reciprocal deviation, and the backward one more pass (plus
//! the column sums for γ and β).

use burn::nn::LayerNorm;
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

use crate::device::is_native_cpu;

/// Rows per parallel task.
const ROWS: usize = 16;

/// `norm(x)` over the last dimension, with `eps` (burn keeps the norm's own private). On the
/// CPU backend in autodiff (f32, with γ and β) this is explora's operation; elsewhere burn's.
pub fn layer_norm<const D: usize>(norm: &LayerNorm, x: Tensor<D>, eps: f64) -> Tensor<D> {
    match with_grad(norm, &x, eps) {
        Some(y) => y,
        None => norm.forward(x),
    }
}

fn with_grad<const D: usize>(norm: &LayerNorm, x: &Tensor<D>, eps: f64) -> Option<Tensor<D>> {
    use burn_autodiff::Autodiff;
    use burn_autodiff::checkpoint::strategy::NoCheckpointing;
    use burn_autodiff::ops::{Backward, OpsKind};
    use burn_flex::{Flex, FlexTensor};
    type Ad = Autodiff<Flex, NoCheckpointing>;
    if !x.is_autodiff() || x.dtype() != DType::F32 || !is_native_cpu(&x.device()) {
        return None;
    }
    let beta = norm.beta.as_ref()?.val();
    let gamma = norm.gamma.val();
    let input = x.clone().try_into_primitive::<Ad>().ok()?;
    let gamma = gamma.try_into_primitive::<Ad>().ok()?;
    let beta = beta.try_into_primitive::<Ad>().ok()?;
    let d = gamma.primitive().layout().num_elements();
    let shape = input.primitive().layout().shape().clone();
    if d == 0 || shape[shape.num_dims() - 1] != d || gamma.primitive().dtype() != DType::F32 || beta.primitive().dtype() != DType::F32 {
        return None;
    }
    let values = input.primitive().to_contiguous();
    let (g, b) = (gamma.primitive().to_contiguous(), beta.primitive().to_contiguous());
    let (g, b) = (&g.storage::<f32>()[..d], &b.storage::<f32>()[..d]);
    let xs = &values.storage::<f32>()[..shape.num_elements()];
    let rows = xs.len() / d;
    let mut normalised = vec![0.0f32; xs.len()];
    let mut out = vec![0.0f32; xs.len()];
    let mut inv_std = vec![0.0f32; rows];
    normalised
        .par_chunks_mut(ROWS * d)
        .zip(out.par_chunks_mut(ROWS * d))
        .zip(inv_std.par_chunks_mut(ROWS))
        .zip(xs.par_chunks(ROWS * d))
        .for_each(|(((normalised, out), inv_std), xs)| forward_rows(xs, g, b, normalised, out, inv_std, eps as f32));
    let output = FlexTensor::from_data(TensorData::new(out, shape.clone()));

    /// The normalised input, each row's `1/√(var + ε)`, and γ.
    #[derive(Debug, Clone)]
    struct Saved {
        normalised: FlexTensor,
        inv_std: std::sync::Arc<Vec<f32>>,
        gamma: FlexTensor,
    }
    #[derive(Debug)]
    struct NormBackward;
    impl Backward<Flex, 3> for NormBackward {
        type State = Saved;
        fn backward(
            self,
            ops: burn_autodiff::ops::Ops<Self::State, 3>,
            grads: &mut burn_autodiff::grads::Gradients,
            _: &mut burn_autodiff::checkpoint::base::Checkpointer,
        ) {
            let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
            let [x_node, gamma_node, beta_node] = ops.parents;
            let saved = ops.state;
            let shape = saved.normalised.layout().shape().clone();
            let d = saved.gamma.layout().num_elements();
            let dy = &grad.storage::<f32>()[..shape.num_elements()];
            let xhat = &saved.normalised.storage::<f32>()[..shape.num_elements()];
            let gamma = saved.gamma.to_contiguous();
            let gamma = &gamma.storage::<f32>()[..d];
            if let Some(node) = x_node {
                let mut dx = vec![0.0f32; dy.len()];
                dx.par_chunks_mut(ROWS * d)
                    .zip(dy.par_chunks(ROWS * d))
                    .zip(xhat.par_chunks(ROWS * d))
                    .zip(saved.inv_std.par_chunks(ROWS))
                    .for_each(|(((dx, dy), xhat), inv_std)| input_grad_rows(dy, xhat, gamma, inv_std, dx));
                grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(dx, shape)));
            }
            if gamma_node.is_some() || beta_node.is_some() {
                let (dgamma, dbeta) = dy
                    .par_chunks(ROWS * d)
                    .zip(xhat.par_chunks(ROWS * d))
                    .map(|(dy, xhat)| {
                        let (mut dg, mut db) = (vec![0.0f32; d], vec![0.0f32; d]);
                        column_sums(dy, xhat, &mut dg, &mut db);
                        (dg, db)
                    })
                    .reduce(
                        || (vec![0.0f32; d], vec![0.0f32; d]),
                        |(mut dg, mut db), (g, b)| {
                            dg.iter_mut().zip(g).for_each(|(a, b)| *a += b);
                            db.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                            (dg, db)
                        },
                    );
                if let Some(node) = gamma_node {
                    grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(dgamma, [d])));
                }
                if let Some(node) = beta_node {
                    grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(dbeta, [d])));
                }
            }
        }
    }
    let saved = Saved {
        normalised: FlexTensor::from_data(TensorData::new(normalised, shape)),
        inv_std: std::sync::Arc::new(inv_std),
        gamma: gamma.primitive().clone(),
    };
    let result = match NormBackward.prepare::<NoCheckpointing>([input.node(), gamma.node(), beta.node()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(saved, output),
        OpsKind::UnTracked(prep) => prep.finish(output),
    };
    Some(Tensor::from_primitive::<Ad>(result))
}

/// `Σ` over eight lanes, so that the loop vectorises.
#[inline(always)]
fn sum(values: impl Iterator<Item = f32>) -> f32 {
    let mut lanes = [0.0f32; 8];
    for (i, v) in values.enumerate() {
        lanes[i % 8] += v;
    }
    lanes.iter().sum()
}

with_avx2!(
    /// Rows of `xs` → their normalised values, `γ·x̂ + β` and `1/√(var + ε)`.
    forward_rows(xs: &[f32], gamma: &[f32], beta: &[f32], normalised: &mut [f32], out: &mut [f32], inv_std: &mut [f32], eps: f32) {
    let d = gamma.len();
    for (((x, xhat), y), r) in xs.chunks_exact(d).zip(normalised.chunks_exact_mut(d)).zip(out.chunks_exact_mut(d)).zip(inv_std.iter_mut()) {
        let mean = sum(x.iter().copied()) / d as f32;
        let var = sum(x.iter().map(|&v| (v - mean) * (v - mean))) / d as f32;
        *r = 1.0 / (var + eps).sqrt();
        for (((xhat, y), &x), (&g, &b)) in xhat.iter_mut().zip(y.iter_mut()).zip(x).zip(gamma.iter().zip(beta)) {
            *xhat = (x - mean) * *r;
            *y = *xhat * g + b;
        }
    }
});

with_avx2!(
    /// `dx = (γ·dy − mean(γ·dy) − x̂·mean(γ·dy·x̂)) / √(var + ε)` for each row.
    input_grad_rows(dy: &[f32], xhat: &[f32], gamma: &[f32], inv_std: &[f32], dx: &mut [f32]) {
    let d = gamma.len();
    for (((dy, xhat), dx), &r) in dy.chunks_exact(d).zip(xhat.chunks_exact(d)).zip(dx.chunks_exact_mut(d)).zip(inv_std) {
        let mean_g = sum(dy.iter().zip(gamma).map(|(&dy, &g)| dy * g)) / d as f32;
        let mean_gx = sum(dy.iter().zip(gamma).zip(xhat).map(|((&dy, &g), &x)| dy * g * x)) / d as f32;
        for (((dx, &dy), &g), &x) in dx.iter_mut().zip(dy).zip(gamma).zip(xhat) {
            *dx = (dy * g - mean_g - x * mean_gx) * r;
        }
    }
});

with_avx2!(
    /// `dγ += Σ dy·x̂` and `dβ += Σ dy` over the rows.
    column_sums(dy: &[f32], xhat: &[f32], dgamma: &mut [f32], dbeta: &mut [f32]) {
    let d = dgamma.len();
    for (dy, xhat) in dy.chunks_exact(d).zip(xhat.chunks_exact(d)) {
        for (((dg, db), &dy), &x) in dgamma.iter_mut().zip(dbeta.iter_mut()).zip(dy).zip(xhat) {
            *dg += dy * x;
            *db += dy;
        }
    }
});

#[cfg(test)]
mod tests {
    use burn::module::Param;
    use burn::nn::LayerNormConfig;
    use burn::tensor::{Device, Distribution};

    use super::*;

    #[test]
    fn layer_norm_matches_burns_in_value_and_every_gradient() {
        let device = Device::flex().autodiff();
        let eps = 1e-6;
        let mut norm = LayerNormConfig::new(20).with_epsilon(eps).init(&device);
        // γ and β away from their 1 and 0, as a trained norm's.
        norm.gamma = Param::from_tensor(Tensor::random([20], Distribution::Normal(1.0, 0.5), &device));
        norm.beta = Some(Param::from_tensor(Tensor::random([20], Distribution::Normal(0.0, 0.5), &device)));
        // 37 rows: more than one parallel task, and a short last one.
        let x = (Tensor::<3>::random([37, 1, 20], Distribution::Normal(0.0, 2.0), &device) + 3.0).require_grad();
        let weights = Tensor::<3>::random([37, 1, 20], Distribution::Normal(0.0, 1.0), &device);
        let ours = layer_norm(&norm, x.clone(), eps);
        assert!(with_grad(&norm, &x, eps).is_some(), "the CPU backend's operation applies");
        let reference = norm.forward(x.clone());
        let value = (ours.clone() - reference.clone()).abs().max().into_scalar::<f32>();
        let ours_grads = (ours * weights.clone()).sum().backward();
        let reference_grads = (reference * weights).sum().backward();
        let gap = |a: Tensor<1>, b: Tensor<1>| (a - b).abs().max().into_scalar::<f32>();
        let flat = |t: Tensor<3>| t.reshape([37 * 20]);
        let dx = gap(flat(x.grad(&ours_grads).unwrap()), flat(x.grad(&reference_grads).unwrap()));
        let dgamma = gap(norm.gamma.grad(&ours_grads).unwrap(), norm.gamma.grad(&reference_grads).unwrap());
        let beta = norm.beta.as_ref().unwrap();
        let dbeta = gap(beta.grad(&ours_grads).unwrap(), beta.grad(&reference_grads).unwrap());
        assert!(value < 1e-5 && dx < 1e-4 && dgamma < 1e-4 && dbeta < 1e-4, "value {value}, dx {dx}, dγ {dgamma}, dβ {dbeta}");
    }
}
