//! Kernels for the CPU backend (burn-flex) where its own are slow on a ViT: the exact (erf)
//! GELU, the linear layers without trainable weights, and the attention (in `attention`).
//! Every other device, and every other dtype, keeps burn's own operations.
//!
//! **GELU.** burn-flex evaluates `gelu` and `gelu_backward` one element at a time on one thread through
//! libm's `erff` (and `expf` for the derivative): on a ViT-S/14 forward at 224 px that was the
//! largest single cost after the matmuls. On that backend this module computes the values and
//! the derivative in one parallel, auto-vectorised pass over the activations instead (exact up
//! to the erf approximation below); with gradients it is an autodiff operation whose backward
//! pass multiplies by the kept derivative.

use burn::nn::Linear;
use burn::tensor::activation;
use burn::tensor::{DType, Tensor, TensorData};
use gemm::{Parallelism, gemm};
use rayon::prelude::*;

use super::params::Path;
use crate::device::is_native_cpu;

/// Elements per parallel chunk: large enough that rayon's scheduling is noise.
const CHUNK: usize = 16 * 1024;

/// `x·Φ(x)`, the GELU of DINOv2, MAE and timm ViTs.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if x.dtype() != DType::F32 || !is_native_cpu(&x.device()) {
        return activation::gelu(x);
    }
    let device = x.device();
    let shape = x.shape();
    if !x.is_tracked() {
        let out = read(&x, |input| {
            let mut out = vec![0.0f32; input.len()];
            out.par_chunks_mut(CHUNK).zip(input.par_chunks(CHUNK)).for_each(|(out, x)| gelu_values(x, out));
            out
        });
        return Tensor::from_data(TensorData::new(out, shape), &device);
    }
    gelu_with_grad(&x).unwrap_or_else(|| activation::gelu(x))
}

/// The GELU as an autodiff operation: one pass computes the values and the slopes, the
/// backward pass multiplies the gradient by the slopes. `None` outside autodiff without
/// gradient checkpointing.
fn gelu_with_grad<const D: usize>(x: &Tensor<D>) -> Option<Tensor<D>> {
    use burn_autodiff::Autodiff;
    use burn_autodiff::checkpoint::strategy::NoCheckpointing;
    use burn_autodiff::ops::{Backward, OpsKind};
    use burn_flex::{Flex, FlexTensor};
    type Ad = Autodiff<Flex, NoCheckpointing>;
    let input = x.clone().try_into_primitive::<Ad>().ok()?;
    let shape = x.shape();
    let (values, slopes) = read(x, |input| {
        let mut values = vec![0.0f32; input.len()];
        let mut slopes = vec![0.0f32; input.len()];
        values
            .par_chunks_mut(CHUNK)
            .zip(slopes.par_chunks_mut(CHUNK))
            .zip(input.par_chunks(CHUNK))
            .for_each(|((values, slopes), x)| gelu_slopes(x, values, slopes));
        (values, slopes)
    });
    let output = FlexTensor::from_data(TensorData::new(values, shape.clone()));

    #[derive(Debug)]
    struct GeluBackward;
    impl Backward<Flex, 1> for GeluBackward {
        type State = FlexTensor;
        fn backward(
            self,
            ops: burn_autodiff::ops::Ops<Self::State, 1>,
            grads: &mut burn_autodiff::grads::Gradients,
            _: &mut burn_autodiff::checkpoint::base::Checkpointer,
        ) {
            let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
            let [Some(parent)] = ops.parents else { return };
            let shape = ops.state.layout().shape().clone();
            let n = shape.num_elements();
            let (grad, slopes) = (&grad.storage::<f32>()[..n], &ops.state.storage::<f32>()[..n]);
            let mut dx = vec![0.0f32; n];
            dx.par_chunks_mut(CHUNK).zip(grad.par_chunks(CHUNK)).zip(slopes.par_chunks(CHUNK)).for_each(|((dx, g), s)| {
                dx.iter_mut().zip(g).zip(s).for_each(|((dx, &g), &s)| *dx = g * s);
            });
            grads.register::<Flex>(parent.id, FlexTensor::from_data(TensorData::new(dx, shape)));
        }
    }
    let slopes = FlexTensor::from_data(TensorData::new(slopes, shape));
    let result = match GeluBackward.prepare::<NoCheckpointing>([input.node()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(slopes, output),
        OpsKind::UnTracked(prep) => prep.finish(output),
    };
    Some(Tensor::from_primitive::<Ad>(result))
}

/// `f(values, layout)` on the CPU backend's own buffer of `t` (no copy, whoever else holds
/// it); `None` for another backend or dtype.
fn with_storage<const D: usize, R>(t: &Tensor<D>, f: impl FnOnce(&[f32], &burn_flex::Layout) -> R) -> Option<R> {
    let flex = flex_tensor(t)?;
    (flex.dtype() == DType::F32).then(|| f(flex.storage::<f32>(), flex.layout()))
}

/// The values of `t` when it is stored contiguously on the CPU backend, read in place.
fn contiguous<const D: usize, R>(t: &Tensor<D>, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    with_storage(t, |values, layout| {
        let start = layout.start_offset();
        layout.is_contiguous().then(|| f(&values[start..start + layout.num_elements()]))
    })?
}

/// `f` on the values of an f32 tensor on the CPU backend: in place when it is stored
/// contiguously, else from a contiguous copy.
fn read<const D: usize, R>(t: &Tensor<D>, f: impl FnOnce(&[f32]) -> R) -> R {
    let mut f = Some(f);
    if let Some(r) = contiguous(t, |values| (f.take().expect("called once"))(values)) {
        return r;
    }
    let data = t.clone().into_data();
    (f.take().expect("not called yet"))(data.as_slice::<f32>().expect("an f32 tensor reads back as f32"))
}

/// `x·W + b` for an f32 [`Linear`] on the CPU backend when nothing needs gradients; `layer`'s
/// own forward otherwise.
///
/// burn-flex's matmul zero-fills its output, copies it into an aligned buffer and then adds
/// the bias in a second pass; here the output starts as the bias rows and one `gemm` call
/// accumulates into it, reading `x` and the weight in place (either memory order; see
/// [`backward_friendly_layout`]).
pub fn linear<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    let weight = layer.weight.val();
    let bias = layer.bias.as_ref().map(|b| b.val());
    affine(&x, &weight, bias.as_ref(), 1.0).or_else(|| frozen_linear(&x, &weight, bias.as_ref())).unwrap_or_else(|| layer.forward(x))
}

/// A linear layer whose weight and bias are frozen, on an input that needs gradients, on the
/// CPU backend: the forward is [`affine`]'s single `gemm` call and the backward one `gemm` call
/// for `dY·Wᵀ` (burn's autodiff linear zero-fills, copies and adds the bias in passes of its
/// own, both ways). `None` where that does not apply (another device or dtype, a trainable
/// weight or bias, gradient checkpointing).
pub fn frozen_linear<const D: usize>(x: &Tensor<D>, weight: &Tensor<2>, bias: Option<&Tensor<1>>) -> Option<Tensor<D>> {
    use burn_autodiff::Autodiff;
    use burn_autodiff::checkpoint::strategy::NoCheckpointing;
    use burn_autodiff::ops::{Backward, OpsKind};
    let frozen = !weight.is_tracked() && bias.is_none_or(|b| !b.is_tracked());
    if D < 2 || !frozen || !x.is_tracked() || !is_native_cpu(&x.device()) || x.dtype() != DType::F32 {
        return None;
    }
    let w = flex_tensor(weight)?;
    let b = match bias {
        Some(b) => Some(flex_tensor(b)?),
        None => None,
    };
    let input = x.clone().try_into_primitive::<Autodiff<burn_flex::Flex, NoCheckpointing>>().ok()?;
    let output = flex_affine(input.primitive(), &w, b.as_ref(), false, 1.0)?;

    #[derive(Debug)]
    struct FrozenLinear;
    impl Backward<burn_flex::Flex, 1> for FrozenLinear {
        type State = burn_flex::FlexTensor;
        fn backward(
            self,
            ops: burn_autodiff::ops::Ops<Self::State, 1>,
            grads: &mut burn_autodiff::grads::Gradients,
            _: &mut burn_autodiff::checkpoint::base::Checkpointer,
        ) {
            let grad = grads.consume::<burn_flex::Flex>(&ops.node);
            let [Some(parent)] = ops.parents else { return };
            let grad = if grad.layout().is_contiguous() { grad } else { grad.to_contiguous() };
            let dx = flex_affine(&grad, &ops.state, None, true, 1.0).expect("dY·Wᵀ of a frozen linear layer");
            grads.register::<burn_flex::Flex>(parent.id, dx);
        }
    }
    let result = match FrozenLinear.prepare::<NoCheckpointing>([input.node()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(w, output),
        OpsKind::UnTracked(prep) => prep.finish(output),
    };
    Some(Tensor::from_primitive::<Autodiff<burn_flex::Flex, NoCheckpointing>>(result))
}

/// `scale·(x·W) + b` (or with `Wᵀ` when `transposed`) on CPU-backend tensors: one `gemm` call
/// into the bias rows, `x` contiguous, `W` `[k, n]` in any memory order. `None` where a tensor
/// is not f32, `x` or the bias not contiguous, or the shapes do not fit.
fn flex_affine(
    x: &burn_flex::FlexTensor,
    w: &burn_flex::FlexTensor,
    bias: Option<&burn_flex::FlexTensor>,
    transposed: bool,
    scale: f32,
) -> Option<burn_flex::FlexTensor> {
    let (x_layout, w_layout) = (x.layout(), w.layout());
    let f32_tensors = x.dtype() == DType::F32 && w.dtype() == DType::F32 && bias.is_none_or(|b| b.dtype() == DType::F32);
    if !f32_tensors || !x_layout.is_contiguous() || w_layout.shape().num_dims() != 2 {
        return None;
    }
    let dims = x_layout.shape().clone();
    let rank = dims.num_dims();
    let [rows, cols] = w_layout.shape().dims::<2>();
    let (w_rs, w_cs) = (w_layout.strides()[0], w_layout.strides()[1]);
    // The product's operand `[k, n]` with its strides (row, column).
    let (k, n, rhs_rs, rhs_cs) = if transposed { (cols, rows, w_cs, w_rs) } else { (rows, cols, w_rs, w_cs) };
    // (A flipped view has a negative stride: burn's path takes it.)
    let (Ok(rhs_rs), Ok(rhs_cs)) = (usize::try_from(rhs_rs), usize::try_from(rhs_cs)) else {
        return None;
    };
    let bias_fits = bias.is_none_or(|b| b.layout().is_contiguous() && b.layout().num_elements() == n);
    if rank < 2 || dims[rank - 1] != k || k == 0 || !bias_fits {
        return None;
    }
    let m = dims.num_elements() / k;
    if m == 0 || n == 0 {
        return None;
    }
    let mut out = vec![0.0f32; m * n];
    if let Some(bias) = bias {
        let b = &bias.storage::<f32>()[bias.layout().start_offset()..][..n];
        out.par_chunks_mut(n * 64).for_each(|rows| rows.chunks_mut(n).for_each(|row| row.copy_from_slice(b)));
    }
    let xs = &x.storage::<f32>()[x_layout.start_offset()..][..m * k];
    let ws = w.storage::<f32>();
    // SAFETY: `xs` holds `m × k` values row-major; the operand `k × n` lies inside `ws` from
    // the weight's start offset with strides `(rhs_rs, rhs_cs)`; `out` holds `m × n` row-major.
    // `out = [out +] scale·(x W)`: the bias rows (or nothing) plus the product.
    unsafe {
        let w = ws.as_ptr().add(w_layout.start_offset());
        product(out.as_mut_ptr(), n, bias.is_some(), xs.as_ptr(), k, 1, w, rhs_rs, rhs_cs, [m, n, k], scale, threads(&[m, n, k]));
    }
    let mut out_dims = dims.clone();
    out_dims[rank - 1] = n;
    Some(burn_flex::FlexTensor::from_data(TensorData::new(out, out_dims)))
}

/// `dst ← [dst +] scale·(lhs·rhs)`, `[m, n] = [m, k]·[k, n]`, every operand given by its (row,
/// column) strides; `dst`'s rows are `dst_rs` apart and its columns contiguous.
///
/// # Safety
/// Every element the strides reach must lie inside its allocation, and `dst` must not overlap
/// the operands.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn product(
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
    [m, n, k]: [usize; 3],
    scale: f32,
    parallelism: Parallelism,
) {
    // SAFETY: the caller's.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// rayon's threads for a product of these `[m, n, k]` sizes, none below a million
/// multiply-adds.
fn threads(&[m, n, k]: &[usize; 3]) -> Parallelism {
    if m * n * k >= 1 << 20 { Parallelism::Rayon(0) } else { Parallelism::None }
}

/// `scale·(x·W) + b` on the CPU backend for f32 tensors that need no gradients, `x` `[.., k]`
/// contiguous and `W` `[k, n]` in any memory order; `None` where that does not apply.
pub fn affine<const D: usize>(x: &Tensor<D>, weight: &Tensor<2>, bias: Option<&Tensor<1>>, scale: f32) -> Option<Tensor<D>> {
    let untracked = !x.is_tracked() && !weight.is_tracked() && bias.is_none_or(|b| !b.is_tracked());
    if D < 2 || !untracked || !is_native_cpu(&x.device()) {
        return None;
    }
    let b = match bias {
        Some(b) => Some(flex_tensor(b)?),
        None => None,
    };
    let out = flex_affine(&flex_tensor(x)?, &flex_tensor(weight)?, b.as_ref(), false, scale)?;
    let out = Tensor::<D>::from_primitive::<burn_flex::Flex>(out);
    Some(if x.is_autodiff() { out.autodiff() } else { out })
}

/// The CPU backend's own tensor behind `t` (sharing its buffer); `None` on another backend.
fn flex_tensor<const D: usize>(t: &Tensor<D>) -> Option<burn_flex::FlexTensor> {
    t.clone().inner().try_into_primitive::<burn_flex::Flex>().ok()
}

/// Stores the frozen `qkv` and `fc1` weights of `module`'s blocks output-major (`[d_out, d_in]`
/// in memory, still `[d_in, d_out]` to every reader) on the CPU backend; a no-op elsewhere.
///
/// The backward pass of a frozen linear layer multiplies the output gradient by the weight's
/// transpose. With the weight stored input-major that transpose is a strided operand, which
/// `gemm` packs slowly when the product has few columns: on 2 cores `[272, 1536] · Wᵀ` ran at
/// ~110 GFLOP/s and `[272, 1152] · Wᵀ` at ~135, against ~190 for the same products with a
/// contiguous operand. Stored output-major, the backward's operand is contiguous and the
/// forward's becomes the strided one, which `gemm` handles well for these wide outputs
/// (~175-185). `proj` and `fc2` (384 outputs) keep their layout: for them it is the other way
/// round. Values, checkpoints and gradients are unchanged; only the memory order differs.
pub fn backward_friendly_layout<M: burn::module::Module>(module: M) -> M {
    module.map(&mut OutputMajor { path: Path::new() })
}

struct OutputMajor {
    path: Path,
}

impl burn::module::ModuleMapper for OutputMajor {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: burn::module::Param<Tensor<D>>) -> burn::module::Param<Tensor<D>> {
        let name = self.path.name();
        let mut parts = name.rsplit('.');
        let wanted = matches!((parts.next(), parts.next()), (Some("weight"), Some("qkv" | "fc1")));
        let (id, tensor, mapper) = param.consume();
        let frozen = !tensor.is_require_grad();
        if !wanted || D != 2 || !frozen || tensor.dtype() != DType::F32 || !is_native_cpu(&tensor.device()) {
            return burn::module::Param::from_mapped_value(id, tensor, mapper);
        }
        let autodiff = tensor.is_autodiff();
        let device = tensor.device();
        // `into_data` of the transposed view writes it out contiguously: `[d_out, d_in]`.
        let output_major = Tensor::<D>::from_data(tensor.inner().swap_dims(0, 1).into_data(), &device);
        let mut view = output_major.swap_dims(0, 1);
        if autodiff {
            view = view.autodiff();
        }
        burn::module::Param::from_mapped_value(id, view, mapper)
    }
}

/// Runs `$body` compiled for AVX2 + FMA where the CPU has them (twice SSE2's lanes for the
/// loops the compiler vectorises), and for the baseline target otherwise.
macro_rules! with_avx2 {
    ($(#[$doc:meta])* $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

with_avx2!(gelu_values(x: &[f32], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(x) {
        *o = gelu_and_slope(x).0;
    }
});

with_avx2!(gelu_slopes(x: &[f32], values: &mut [f32], slopes: &mut [f32]) {
    for ((v, s), &x) in values.iter_mut().zip(slopes.iter_mut()).zip(x) {
        (*v, *s) = gelu_and_slope(x);
    }
});

mod attention;
mod lora;
mod norm;
pub use attention::{attention_applies, attention_with_grad, attention_with_grad_applies, fused_attention};
pub use lora::frozen_linear_with_lora;
pub use norm::layer_norm;

/// `(gelu(x), gelu'(x))` = `(x·Φ(x), Φ(x) + x·φ(x))`. Branch-free so that the loops above
/// vectorise.
#[inline(always)]
fn gelu_and_slope(x: f32) -> (f32, f32) {
    const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
    // 1/sqrt(2π)
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let z = x * FRAC_1_SQRT_2;
    // exp(-z²) is both erf's tail factor and, scaled, the normal density φ(x).
    let gauss = exp_nonpositive(-z * z);
    let cdf = 0.5 * (1.0 + erf_with_gauss(z, gauss));
    (x * cdf, cdf + x * INV_SQRT_2PI * gauss)
}

/// erf(z) given `gauss = exp(-z²)`: Abramowitz & Stegun 7.1.26 (absolute error ≤ 1.5e-7, the
/// same formula CubeCL's WGSL `erf` uses).
#[inline(always)]
fn erf_with_gauss(z: f32, gauss: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A1: f32 = 0.254_829_6;
    const A2: f32 = -0.284_496_74;
    const A3: f32 = 1.421_413_8;
    const A4: f32 = -1.453_152;
    const A5: f32 = 1.061_405_4;
    let a = z.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = ((((A5 * t + A4) * t + A3) * t + A2) * t + A1) * t;
    let magnitude = 1.0 - poly * gauss;
    magnitude.copysign(z)
}

/// `e^v` for `v ≤ 0` (relative error ~1e-7; 0 below -87): `2^n · p(r)` with `v = n·ln 2 + r`,
/// `|r| ≤ ln 2 / 2` and a degree-6 Taylor polynomial, in plain arithmetic (no libm call) so it
/// vectorises.
#[inline(always)]
fn exp_nonpositive(v: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5·2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let below = v < -87.0;
    let v = v.max(-87.0);
    let shifted = v * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let n_int = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = v - n * LN2_HI - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((n_int + 127) as u32) << 23);
    if below { 0.0 } else { p * scale }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_linear_matches_burns_in_either_weight_order_with_or_without_bias() {
        use burn::module::Param;
        use burn::tensor::{Device, Distribution};
        let device = Device::flex();
        let x = Tensor::<3>::random([3, 5, 7], Distribution::Normal(0.0, 1.0), &device);
        let weight = Tensor::<2>::random([7, 4], Distribution::Normal(0.0, 1.0), &device);
        let bias = Tensor::<1>::random([4], Distribution::Normal(0.0, 1.0), &device);
        let output_major = Tensor::<2>::from_data(weight.clone().swap_dims(0, 1).into_data(), &device).swap_dims(0, 1);
        for w in [weight, output_major] {
            for b in [Some(bias.clone()), None] {
                let layer = Linear { weight: Param::from_tensor(w.clone()), bias: b.map(Param::from_tensor) };
                let gap = (linear(&layer, x.clone()) - layer.forward(x.clone())).abs().max().into_scalar::<f32>();
                assert!(gap < 1e-5, "largest difference {gap}");
            }
        }
    }

    #[test]
    fn the_frozen_linear_matches_burns_in_value_and_input_gradient() {
        use burn::module::{Module, Param};
        use burn::tensor::{Device, Distribution};
        let ad = Device::flex().autodiff();
        let normal = Distribution::Normal(0.0, 1.0);
        let weight = Tensor::<2>::random([7, 4], normal, &ad);
        let output_major = Tensor::<2>::from_data(weight.clone().inner().swap_dims(0, 1).into_data(), &ad).swap_dims(0, 1);
        let bias = Tensor::<1>::random([4], normal, &ad);
        let upstream = Tensor::<3>::random([3, 5, 4], normal, &ad);
        for w in [weight, output_major] {
            for b in [Some(bias.clone()), None] {
                let layer = Linear { weight: Param::from_tensor(w.clone()), bias: b.map(Param::from_tensor) }.no_grad();
                let x = Tensor::<3>::random([3, 5, 7], normal, &ad).require_grad();
                let bias = layer.bias.as_ref().map(|b| b.val());
                let ours = frozen_linear(&x, &layer.weight.val(), bias.as_ref()).expect("a frozen layer on a tracked input");
                let reference = layer.forward(x.clone());
                let (g1, g2) =
                    ((ours.clone() * upstream.clone()).sum().backward(), (reference.clone() * upstream.clone()).sum().backward());
                let value_gap = (ours - reference).abs().max().into_scalar::<f32>();
                let grad_gap = (x.grad(&g1).expect("a gradient") - x.grad(&g2).expect("a gradient")).abs().max().into_scalar::<f32>();
                assert!(value_gap < 1e-5 && grad_gap < 1e-5, "value {value_gap}, gradient {grad_gap}");
            }
        }
        // A trainable weight keeps burn's linear (its gradient is needed).
        let x = Tensor::<2>::random([2, 7], normal, &ad).require_grad();
        let layer = crate::model::init_linear(7, 4, burn::nn::Initializer::Ones, &ad);
        assert!(frozen_linear(&x, &layer.weight.val(), layer.bias.as_ref().map(|b| b.val()).as_ref()).is_none());
        let grads = linear(&layer, x.clone()).sum().backward();
        assert!(x.grad(&grads).is_some() && layer.weight.grad(&grads).is_some());
    }

    #[test]
    fn the_passes_without_gradients_match_the_passes_with_gradients_on_an_explora_backbone() {
        // The teacher's setting: ExPLoRA plan (LoRA on Q and V, one unfrozen block), frozen
        // weights in the output-major layout, then the module without autodiff. Its forward runs
        // explora's CPU linear and fused attention; with a tracked input the same module runs the
        // autodiff operations (projection with LoRA, attention, norms, GELU, frozen linear
        // layers) and burn's linear layers for the unfrozen block. Each operation is checked
        // against burn's own in its unit test; the WGSL tests compare whole passes with burn's.
        use crate::model::{ForwardOptions, VitConfig, params::map_params};
        use crate::peft::{AdaptationPlan, Preset, apply_plan};
        use burn::module::Module;
        use burn::tensor::{Device, Distribution};
        let device = Device::flex().autodiff();
        device.seed(7);
        let config = VitConfig::tiny();
        let plan = AdaptationPlan::preset(Preset::Explora, &config);
        let model = apply_plan(config.init(&device), &plan).expect("the plan fits");
        // LoRA's B starts at zero; give every adapter a visible update.
        let model = map_params(model, |name, t| {
            name.contains("lora").then(|| Tensor::random([t.dims()[0]], Distribution::Normal(0.0, 0.1), &t.device()))
        });
        let model = backward_friendly_layout(model);
        let images = Tensor::<4>::random([3, 3, 64, 64], Distribution::Normal(0.0, 1.0), &device);
        let reference = model.forward(images.clone().require_grad(), ForwardOptions::default());
        assert!(reference.cls.is_tracked(), "the reference takes the path with gradients");
        let ours = model.valid().forward(images.inner(), ForwardOptions::default());
        let gap = |a: Tensor<3>, b: Tensor<3>| (a.inner() - b.inner()).abs().max().into_scalar::<f32>();
        let patches = gap(reference.patches, ours.patches);
        let cls = gap(reference.cls.unsqueeze(), ours.cls.unsqueeze());
        assert!(patches < 1e-4 && cls < 1e-4, "patches {patches}, cls {cls}");
    }

    #[test]
    fn the_output_major_layout_changes_no_value_output_or_gradient() {
        use crate::model::params::for_each_param;
        use crate::model::{ForwardOptions, VitConfig};
        use burn::module::Module;
        use burn::tensor::{Device, Distribution};
        let device = Device::flex().autodiff();
        let model = VitConfig::tiny().init(&device).no_grad();
        let laid_out = backward_friendly_layout(model.clone());
        let mut before = Vec::new();
        for_each_param(&model, |name, t, _| before.push((name.to_string(), t)));
        let mut after = Vec::new();
        for_each_param(&laid_out, |name, t, _| after.push((name.to_string(), t)));
        assert_eq!(before.len(), after.len());
        for ((name, a), (name_after, b)) in before.into_iter().zip(after) {
            assert_eq!(name, name_after);
            assert_eq!(crate::model::to_vec(a), crate::model::to_vec(b), "{name}");
        }
        let qkv = laid_out.blocks[0].attn.qkv.weight.val();
        assert_eq!(qkv.dims(), [64, 192], "readers still see [d_in, d_out]");
        let stored = flex_tensor(&qkv).expect("a CPU-backend tensor");
        assert_eq!(stored.layout().strides(), &[1, 64], "stored [d_out, d_in]");
        let images = Tensor::<4>::random([2, 3, 64, 64], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let weights = Tensor::<2>::random([2, 64], Distribution::Normal(0.0, 1.0), &device);
        let run = |m: &crate::model::Vit| {
            let cls = m.forward(images.clone(), ForwardOptions::default()).cls;
            let grads = (cls.clone() * weights.clone()).sum().backward();
            (cls.inner(), images.grad(&grads).expect("a gradient"))
        };
        let ((y1, g1), (y2, g2)) = (run(&model), run(&laid_out));
        let gap = |a: Tensor<2>, b: Tensor<2>| (a - b).abs().max().into_scalar::<f32>();
        let (value_gap, grad_gap) = (gap(y1, y2), (g1 - g2).abs().max().into_scalar::<f32>());
        assert!(value_gap < 1e-5 && grad_gap < 1e-5, "value {value_gap}, gradient {grad_gap}");
    }

    #[test]
    fn gelu_on_the_cpu_backend_matches_burns_in_value_and_gradient() {
        use burn::tensor::{Device, Distribution};
        let device = Device::flex().autodiff();
        let x = Tensor::<2>::random([6, 50], Distribution::Normal(0.0, 3.0), &device).require_grad();
        assert!(gelu_with_grad(&x).is_some(), "the CPU backend's operation applies");
        let ours = gelu(x.clone());
        let reference = activation::gelu(x.clone());
        let value_gap = (ours.clone() - reference.clone()).abs().max().into_scalar::<f32>();
        let weights = Tensor::<2>::random([6, 50], Distribution::Normal(0.0, 1.0), &device);
        let grad_ours = (ours * weights.clone()).sum().backward();
        let grad_ref = (reference * weights).sum().backward();
        let (g1, g2) = (x.grad(&grad_ours).expect("a gradient"), x.grad(&grad_ref).expect("a gradient"));
        let grad_gap = (g1 - g2).abs().max().into_scalar::<f32>();
        assert!(value_gap < 1e-5 && grad_gap < 1e-5, "value {value_gap}, gradient {grad_gap}");
    }

    #[test]
    fn the_exponential_matches_libm_on_its_range() {
        let mut worst = 0.0f32;
        for i in 0..=200_000 {
            let v = -87.0 * i as f32 / 200_000.0;
            let exact = v.exp();
            worst = worst.max(((exp_nonpositive(v) - exact) / exact).abs());
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(exp_nonpositive(-100.0), 0.0);
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }

    /// erf by its Taylor series in f64 (absolute error < 1e-9 for |z| ≤ 4; erfc(4) < 2e-8).
    fn erf_reference(z: f64) -> f64 {
        if z.abs() > 4.0 {
            return z.signum();
        }
        let (mut term, mut sum) = (z, z);
        for n in 1..200 {
            term *= -z * z / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn gelu_and_its_slope_match_the_erf_definition() {
        let (mut worst_value, mut worst_slope) = (0.0f64, 0.0f64);
        for i in -40_000..=40_000 {
            let x = i as f64 / 4_000.0; // -10 ..= 10
            let cdf = 0.5 * (1.0 + erf_reference(x / std::f64::consts::SQRT_2));
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let (value, slope) = gelu_and_slope(x as f32);
            worst_value = worst_value.max((value as f64 - x * cdf).abs() / x.abs().max(1.0));
            worst_slope = worst_slope.max((slope as f64 - (cdf + x * pdf)).abs());
        }
        assert!(worst_value < 1e-6, "value error {worst_value}");
        assert!(worst_slope < 1e-6, "slope error {worst_slope}");
    }
}
