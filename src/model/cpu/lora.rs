//! A frozen linear layer with LoRA updates on column blocks of its output, with gradients, as
//! one autodiff operation on the CPU backend: ExPLoRA's `qkv` projection with adapters on q and
//! v.
//!
//! burn's path computes each update as two linear operations and a scaling, then adds it to the
//! projection through a zero block, a concatenation and an addition over the whole `[T, 3D]`
//! output, with as many operations again backwards. Here the updates' second products
//! accumulate straight into their columns of the projection, and the backward pass computes the
//! input's gradient and both factors' from one read of the output's gradient.

use burn::tensor::{DType, Tensor};

use super::{flex_affine, flex_tensor, product, threads};
use crate::device::is_native_cpu;
use crate::model::lora::Lora;

/// `x·W + b` (`W` `[k, n]` and `b` frozen) with `scale·(x·A)·B` added to the output's columns
/// `offset..offset + B's width` for each `(offset, adapter)`; gradients for `x` and every `A`
/// and `B`. `None` where that does not apply (another device or dtype, a trainable weight or
/// bias, dropout on an adapter, gradient checkpointing, more than three adapters); the caller
/// then takes burn's path.
pub fn frozen_linear_with_lora<const D: usize>(
    x: &Tensor<D>,
    weight: &Tensor<2>,
    bias: Option<&Tensor<1>>,
    adapters: &[(usize, &Lora)],
) -> Option<Tensor<D>> {
    let frozen = !weight.is_tracked() && bias.is_none_or(|b| !b.is_tracked());
    let plain = adapters.iter().all(|(_, lora)| lora.dropout.prob == 0.0);
    if D < 2 || !frozen || !plain || !x.is_autodiff() || x.dtype() != DType::F32 || !is_native_cpu(&x.device()) {
        return None;
    }
    match adapters.len() {
        1 => with_grad::<D, 3>(x, weight, bias, adapters),
        2 => with_grad::<D, 5>(x, weight, bias, adapters),
        3 => with_grad::<D, 7>(x, weight, bias, adapters),
        _ => None,
    }
}

/// What the backward pass reads of one adapter.
#[derive(Debug, Clone)]
struct SavedAdapter {
    offset: usize,
    scale: f32,
    /// `[k, r]`, `[r, d]`, and `x·A` `[m, r]`, contiguous.
    a: burn_flex::FlexTensor,
    b: burn_flex::FlexTensor,
    h: burn_flex::FlexTensor,
}

#[derive(Debug, Clone)]
struct Saved {
    x: burn_flex::FlexTensor,
    weight: burn_flex::FlexTensor,
    adapters: Vec<SavedAdapter>,
}

#[derive(Debug)]
struct LoraBackward<const N: usize>;

fn with_grad<const D: usize, const N: usize>(
    x: &Tensor<D>,
    weight: &Tensor<2>,
    bias: Option<&Tensor<1>>,
    adapters: &[(usize, &Lora)],
) -> Option<Tensor<D>> {
    use burn_autodiff::Autodiff;
    use burn_autodiff::checkpoint::strategy::NoCheckpointing;
    use burn_autodiff::ops::{Backward, OpsKind};
    type Ad = Autodiff<burn_flex::Flex, NoCheckpointing>;
    let w = flex_tensor(weight)?;
    let b = match bias {
        Some(b) => Some(flex_tensor(b)?),
        None => None,
    };
    let input = x.clone().try_into_primitive::<Ad>().ok()?;
    let xs = input.primitive().to_contiguous();
    let mut out = flex_affine(&xs, &w, b.as_ref(), false, 1.0)?;
    let n = *out.layout().shape().as_slice().last()?;
    let m = out.layout().num_elements() / n;
    let mut nodes = vec![input.node()];
    let mut saved = Vec::new();
    for &(offset, lora) in adapters {
        let a = lora.a.val().try_into_primitive::<Ad>().ok()?;
        let b = lora.b.val().try_into_primitive::<Ad>().ok()?;
        let (a_values, b_values) = (a.primitive().to_contiguous(), b.primitive().to_contiguous());
        let [r, d] = b_values.layout().shape().dims::<2>();
        if a_values.layout().shape().dims::<2>()[1] != r
            || offset + d > n
            || a_values.dtype() != DType::F32
            || b_values.dtype() != DType::F32
        {
            return None;
        }
        let h = flex_affine(&xs, &a_values, None, false, 1.0)?;
        let scale = lora.scale() as f32;
        let (hs, bs) = (h.storage::<f32>(), b_values.storage::<f32>());
        let dst = out.storage_mut::<f32>();
        // SAFETY: `h` is `[m, r]` and `B` `[r, d]`, both contiguous; the destination is the
        // output's columns `offset..offset + d` (checked to fit), rows `n` apart.
        unsafe {
            product(dst[offset..].as_mut_ptr(), n, true, hs.as_ptr(), r, 1, bs.as_ptr(), d, 1, [m, d, r], scale, threads(&[m, d, r]))
        };
        nodes.push(a.node());
        nodes.push(b.node());
        saved.push(SavedAdapter { offset, scale, a: a_values, b: b_values, h });
    }
    let nodes: [_; N] = nodes.try_into().ok()?;

    let state = Saved { x: xs, weight: w, adapters: saved };
    let result = match LoraBackward::<N>.prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(state, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Some(Tensor::from_primitive::<Ad>(result))
}

impl<const N: usize> burn_autodiff::ops::Backward<burn_flex::Flex, N> for LoraBackward<N> {
    type State = Saved;
    fn backward(
        self,
        ops: burn_autodiff::ops::Ops<Self::State, N>,
        grads: &mut burn_autodiff::grads::Gradients,
        _: &mut burn_autodiff::checkpoint::base::Checkpointer,
    ) {
        use burn::tensor::TensorData;
        use burn_flex::{Flex, FlexTensor};
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let saved = ops.state;
        let shape = grad.layout().shape().clone();
        let n = shape[shape.num_dims() - 1];
        let m = shape.num_elements() / n;
        let k = saved.x.layout().shape()[shape.num_dims() - 1];
        let (dy, xs) = (grad.storage::<f32>(), saved.x.storage::<f32>());
        // dY's columns of each adapter times Bᵀ: `[m, r]`, shared by dx and dA.
        let through_b: Vec<Vec<f32>> = saved
            .adapters
            .iter()
            .map(|ad| {
                let [r, d] = ad.b.layout().shape().dims::<2>();
                let mut g = vec![0.0f32; m * r];
                // SAFETY: dY `[m, n]` read at columns `offset..offset + d`; Bᵀ `[d, r]` is
                // B `[r, d]` with swapped strides; `g` holds `[m, r]`.
                unsafe {
                    product(
                        g.as_mut_ptr(),
                        r,
                        false,
                        dy[ad.offset..].as_ptr(),
                        n,
                        1,
                        ad.b.storage::<f32>().as_ptr(),
                        1,
                        d,
                        [m, r, d],
                        1.0,
                        threads(&[m, r, d]),
                    )
                };
                g
            })
            .collect();
        if let Some(node) = &ops.parents[0] {
            let mut dx = flex_affine(&grad, &saved.weight, None, true, 1.0).expect("dY·Wᵀ of the projection");
            let dst = dx.storage_mut::<f32>();
            for (ad, g) in saved.adapters.iter().zip(&through_b) {
                let r = ad.b.layout().shape().dims::<2>()[0];
                // SAFETY: `g` `[m, r]`; Aᵀ `[r, k]` is A `[k, r]` with swapped strides; dx `[m, k]`.
                unsafe {
                    product(
                        dst.as_mut_ptr(),
                        k,
                        true,
                        g.as_ptr(),
                        r,
                        1,
                        ad.a.storage::<f32>().as_ptr(),
                        1,
                        r,
                        [m, k, r],
                        ad.scale,
                        threads(&[m, k, r]),
                    )
                };
            }
            grads.register::<Flex>(node.id, dx);
        }
        for (i, (ad, g)) in saved.adapters.iter().zip(&through_b).enumerate() {
            let [r, d] = ad.b.layout().shape().dims::<2>();
            if let Some(node) = &ops.parents[1 + 2 * i] {
                let mut da = vec![0.0f32; k * r];
                // SAFETY: xᵀ `[k, m]` is x `[m, k]` with swapped strides; `g` `[m, r]`.
                unsafe {
                    product(da.as_mut_ptr(), r, false, xs.as_ptr(), 1, k, g.as_ptr(), r, 1, [k, r, m], ad.scale, threads(&[k, r, m]))
                };
                grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(da, [k, r])));
            }
            if let Some(node) = &ops.parents[2 + 2 * i] {
                let mut db = vec![0.0f32; r * d];
                // SAFETY: (x·A)ᵀ `[r, m]` is `h` `[m, r]` with swapped strides; dY's columns
                // `offset..offset + d`, rows `n` apart.
                unsafe {
                    product(
                        db.as_mut_ptr(),
                        d,
                        false,
                        ad.h.storage::<f32>().as_ptr(),
                        1,
                        r,
                        dy[ad.offset..].as_ptr(),
                        n,
                        1,
                        [r, d, m],
                        ad.scale,
                        threads(&[r, d, m]),
                    )
                };
                grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(db, [r, d])));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Distribution};

    use super::*;

    #[test]
    fn the_projection_with_lora_matches_burns_in_value_and_every_gradient() {
        // ExPLoRA's qkv: LoRA on q and v (B randomised: it starts at zero), the frozen weight in
        // either memory order, with and without bias.
        let device = Device::flex().autodiff();
        let (k, d, r) = (12, 8, 3);
        let normal = |dims: [usize; 2]| Tensor::<2>::random(dims, Distribution::Normal(0.0, 1.0), &device);
        for (output_major, with_bias) in [(false, true), (true, true), (false, false)] {
            let weight = if output_major { normal([3 * d, k]).swap_dims(0, 1) } else { normal([k, 3 * d]) };
            let bias = with_bias.then(|| Tensor::<1>::random([3 * d], Distribution::Normal(0.0, 1.0), &device));
            let lora = || {
                let mut l = Lora::new(k, d, r, 2.0 * r as f64, 0.0, &device);
                l.b = burn::module::Param::from_tensor(normal([r, d]));
                l
            };
            let (q, v) = (lora(), lora());
            let x = Tensor::<3>::random([2, 5, k], Distribution::Normal(0.0, 1.0), &device).require_grad();
            let weights = Tensor::<3>::random([2, 5, 3 * d], Distribution::Normal(0.0, 1.0), &device);
            let ours = frozen_linear_with_lora(&x, &weight, bias.as_ref(), &[(0, &q), (2 * d, &v)]).expect("applies");
            let base = x.clone().matmul(weight.clone().unsqueeze())
                + bias.clone().map(|b| b.unsqueeze()).unwrap_or_else(|| Tensor::zeros([1, 1, 3 * d], &device));
            let zeros = Tensor::<3>::zeros([2, 5, d], &device);
            let reference = base + Tensor::cat(vec![q.delta(x.clone()), zeros, v.delta(x.clone())], 2);
            let gap = |a: Tensor<3>, b: Tensor<3>| (a.inner() - b.inner()).abs().max().into_scalar::<f32>();
            let value = gap(ours.clone(), reference.clone());
            let (g1, g2) = ((ours * weights.clone()).sum().backward(), (reference * weights).sum().backward());
            let dx = gap(x.grad(&g1).unwrap(), x.grad(&g2).unwrap());
            let g2d = |p: &burn::module::Param<Tensor<2>>| gap(p.grad(&g1).unwrap().unsqueeze(), p.grad(&g2).unwrap().unsqueeze());
            let factors = [g2d(&q.a), g2d(&q.b), g2d(&v.a), g2d(&v.b)];
            let worst = factors.iter().fold(dx, |a, &b| a.max(b));
            assert!(value < 1e-4 && worst < 1e-3, "order {output_major}, bias {with_bias}: value {value}, dx {dx}, factors {factors:?}");
        }
    }
}
