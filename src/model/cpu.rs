//! Kernels for the CPU backend (burn-flex) where its own are slow on a ViT: the exact (erf)
//! GELU and the attention of the passes without gradients. Every other device, and every
//! other dtype, keeps burn's own operations.
//!
//! **GELU.** burn-flex evaluates `gelu` and `gelu_backward` one element at a time on one thread through
//! libm's `erff` (and `expf` for the derivative): on a ViT-S/14 forward at 224 px that was the
//! largest single cost after the matmuls. On that backend this module computes the values and
//! the derivative in one parallel, auto-vectorised pass over the activations instead and puts
//! them back into the graph as `x·g + (gelu(x) − x·g)` with `g = gelu'(x)` held constant: the
//! value is `gelu(x)` and the gradient is `g`, both exact up to the erf approximation below.
//!
//! **Attention.** burn-flex's fused attention wants `[B, heads, N, Dh]` inputs (three strided
//! copies of the `[B, N, D]` projections, and one more back) and runs its softmax through
//! scalar `expf` per score. [`attention`] reads the heads in place from `[B, N, D]` with
//! strided `gemm` calls, writes the context straight into `[B, N, D]`, and computes the
//! softmax with the vectorised exponential below; one batch element per parallel task.

use burn::tensor::activation;
use burn::tensor::{DType, Tensor, TensorData};
use gemm::{Parallelism, gemm};
use rayon::prelude::*;

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
    let tracked = x.is_tracked();
    let input = x.clone().into_data();
    let input = input.as_slice::<f32>().expect("an f32 tensor reads back as f32");
    if !tracked {
        let mut out = vec![0.0f32; input.len()];
        out.par_chunks_mut(CHUNK).zip(input.par_chunks(CHUNK)).for_each(|(out, x)| gelu_values(x, out));
        return Tensor::from_data(TensorData::new(out, shape), &device);
    }
    let mut slope = vec![0.0f32; input.len()];
    let mut offset = vec![0.0f32; input.len()];
    slope
        .par_chunks_mut(CHUNK)
        .zip(offset.par_chunks_mut(CHUNK))
        .zip(input.par_chunks(CHUNK))
        .for_each(|((slope, offset), x)| gelu_slopes(x, slope, offset));
    let slope = Tensor::from_data(TensorData::new(slope, shape.clone()), &device);
    let offset = Tensor::from_data(TensorData::new(offset, shape), &device);
    x * slope + offset
}

/// Multi-head scaled dot-product attention, `softmax(q·kᵀ/√Dh)·v` per head, for `q`
/// `[B, N, D]` and `k`, `v` `[B, Nk, D]` (`D = heads·Dh`) → `[B, N, D]`. `None` where the
/// CPU kernel does not apply (another device, another dtype, or a tensor that needs
/// gradients): the caller then uses burn's attention.
pub fn attention(q: &Tensor<3>, k: &Tensor<3>, v: &Tensor<3>, heads: usize) -> Option<Tensor<3>> {
    let tracked = q.is_tracked() || k.is_tracked() || v.is_tracked();
    if tracked || [q, k, v].iter().any(|t| t.dtype() != DType::F32) || !is_native_cpu(&q.device()) {
        return None;
    }
    let [b, n, d] = q.dims();
    let nk = k.dims()[1];
    let dh = d / heads;
    let device = q.device();
    let (q, k, v) = (q.clone().into_data(), k.clone().into_data(), v.clone().into_data());
    let (q, k, v) = (q.as_slice::<f32>().ok()?, k.as_slice::<f32>().ok()?, v.as_slice::<f32>().ok()?);
    let scale = (dh as f32).powf(-0.5);
    let mut out = vec![0.0f32; b * n * d];
    out.par_chunks_mut(n * d).enumerate().for_each(|(batch, out)| {
        let q = &q[batch * n * d..(batch + 1) * n * d];
        let k = &k[batch * nk * d..(batch + 1) * nk * d];
        let v = &v[batch * nk * d..(batch + 1) * nk * d];
        let mut scores = vec![0.0f32; n * nk];
        for head in 0..heads {
            let col = head * dh;
            // SAFETY: every operand lies inside its slice: `q`/`out` rows `0..n` and `k`/`v`
            // rows `0..nk`, each `d` apart, columns `col..col + dh` (`col + dh ≤ d`); `scores`
            // holds `n × nk`. `dst = 0·dst + scale·(q kᵀ)`, then `out = 0·out + 1·(p v)`.
            unsafe {
                gemm(
                    n,
                    nk,
                    dh,
                    scores.as_mut_ptr(),
                    1,
                    nk as isize,
                    false,
                    q[col..].as_ptr(),
                    1,
                    d as isize,
                    k[col..].as_ptr(),
                    d as isize,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
            softmax_rows(&mut scores, nk);
            unsafe {
                gemm(
                    n,
                    dh,
                    nk,
                    out[col..].as_mut_ptr(),
                    1,
                    d as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    nk as isize,
                    v[col..].as_ptr(),
                    1,
                    d as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        }
    });
    Some(Tensor::from_data(TensorData::new(out, [b, n, d]), &device))
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
    module.map(&mut OutputMajor { path: Vec::new() })
}

struct OutputMajor {
    path: Vec<String>,
}

impl burn::module::ModuleMapper for OutputMajor {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: burn::module::Param<Tensor<D>>) -> burn::module::Param<Tensor<D>> {
        let wanted = matches!(self.path.as_slice(), [.., layer, weight] if (layer == "qkv" || layer == "fc1") && weight == "weight");
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

with_avx2!(gelu_slopes(x: &[f32], slope: &mut [f32], offset: &mut [f32]) {
    for ((g, c), &x) in slope.iter_mut().zip(offset.iter_mut()).zip(x) {
        let (value, derivative) = gelu_and_slope(x);
        *g = derivative;
        *c = value - x * derivative;
    }
});

with_avx2!(
    /// `row ← softmax(row)` for each `len`-long row of `rows`, with the vectorised exponential.
    /// The maximum and the sum run over eight lanes so that they vectorise too (a single
    /// running float sum cannot be reordered by the compiler).
    softmax_rows(rows: &mut [f32], len: usize) {
    const LANES: usize = 8;
    for row in rows.chunks_exact_mut(len) {
        let mut lanes = [f32::NEG_INFINITY; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for chunk in &mut chunks {
            for (m, &x) in lanes.iter_mut().zip(chunk) {
                *m = if x > *m { x } else { *m };
            }
        }
        let max = chunks.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
        for x in row.iter_mut() {
            *x = exp_nonpositive(*x - max);
        }
        let mut sums = [0.0f32; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for chunk in &mut chunks {
            for (s, &x) in sums.iter_mut().zip(chunk) {
                *s += x;
            }
        }
        let sum: f32 = sums.iter().chain(chunks.remainder()).sum();
        let inv = 1.0 / sum;
        for x in row.iter_mut() {
            *x *= inv;
        }
    }
});

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
    fn the_attention_kernel_matches_burns_explicit_attention() {
        use burn::tensor::{Device, Distribution};
        let device = Device::flex();
        let (b, n, nk, heads, dh) = (3, 7, 9, 4, 5);
        let d = heads * dh;
        let q = Tensor::<3>::random([b, n, d], Distribution::Normal(0.0, 1.0), &device);
        let k = Tensor::<3>::random([b, nk, d], Distribution::Normal(0.0, 1.0), &device);
        let v = Tensor::<3>::random([b, nk, d], Distribution::Normal(0.0, 1.0), &device);
        let ours = attention(&q, &k, &v, heads).expect("the CPU kernel applies on the CPU backend");
        let split = |t: Tensor<3>, len: usize| t.reshape([b, len, heads, dh]).swap_dims(1, 2);
        let scores = split(q, n).matmul(split(k, nk).swap_dims(2, 3)).mul_scalar((dh as f64).powf(-0.5));
        let reference = activation::softmax(scores, 3).matmul(split(v, nk)).swap_dims(1, 2).reshape([b, n, d]);
        let worst = (ours - reference).abs().max().into_scalar::<f32>();
        assert!(worst < 1e-5, "largest difference {worst}");
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
