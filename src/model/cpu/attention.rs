//! Multi-head attention on the CPU backend, read in place from the fused `[.., 3D]` projection
//! of q, k and v: [`fused_attention`] for the passes without gradients and
//! [`attention_with_grad`], an autodiff operation of its own, for the student's pass.
//!
//! burn's path splits q, k and v into `[B, heads, N, Dh]` copies, runs `B·heads` small products
//! one after another on one thread, a softmax through scalar `expf`, and as many operations
//! again in the backward pass, each with its own buffers. Here one parallel task per sequence
//! computes all of its heads from the projection's rows and writes the context into `[.., D]`;
//! the backward pass writes the gradient of the whole projection in one buffer. (burn-flex's
//! own fused attention wants `[B, heads, N, Dh]` copies too, and a scalar `expf` per score.)

use std::sync::Arc;

use burn::tensor::{DType, Tensor, TensorData};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{exp_nonpositive, product};
use crate::device::is_native_cpu;

/// Whether [`fused_attention`] applies to these tensors: all f32 on the CPU backend, none
/// needing gradients. Elsewhere the caller uses burn's attention.
pub fn attention_applies(tensors: &[&Tensor<3>]) -> bool {
    tensors.iter().all(|t| !t.is_tracked() && t.dtype() == DType::F32 && is_native_cpu(&t.device()))
}

/// Multi-head scaled dot-product attention, `softmax(q·kᵀ/√Dh)·v` per head, read straight from
/// the fused projection `qkv` `[B, Nk, 3D]` (q, k and v side by side, `D = heads·Dh`); the
/// queries are the first `n` rows. `deltas` are added to q (`[B, n, D]`), k and v
/// (`[B, Nk, D]`) first: the LoRA updates. Returns `[B, n, D]`. Only where
/// [`attention_applies`] to every input.
///
/// The projection is consumed: when nothing else holds it, its buffer is read (and the deltas
/// added) in place, so no copy of q, k or v is made.
pub fn fused_attention(qkv: Tensor<3>, deltas: [Option<Tensor<3>>; 3], n: usize, heads: usize) -> Tensor<3> {
    let [b, nk, d3] = qkv.dims();
    let d = d3 / 3;
    assert!(d3 == 3 * d && n <= nk && d % heads == 0, "fused attention: qkv {:?}, {n} queries, {heads} heads", qkv.dims());
    let dh = d / heads;
    let device = qkv.device();
    let mut qkv = qkv.into_data();
    let buffer = qkv.as_mut_slice::<f32>().expect("an f32 tensor reads back as f32");
    for (part, delta) in deltas.into_iter().enumerate() {
        let Some(delta) = delta else { continue };
        let rows = if part == 0 { n } else { nk };
        assert_eq!(delta.dims(), [b, rows, d], "fused attention: delta {part}");
        let delta = delta.into_data();
        let delta = delta.as_slice::<f32>().expect("an f32 tensor reads back as f32");
        buffer.par_chunks_mut(nk * d3).zip(delta.par_chunks(rows * d)).for_each(|(batch, delta)| {
            for (row, delta) in batch.chunks_mut(d3).zip(delta.chunks(d)) {
                for (x, &dx) in row[part * d..(part + 1) * d].iter_mut().zip(delta) {
                    *x += dx;
                }
            }
        });
    }
    let buffer = &*buffer;
    let scale = (dh as f32).powf(-0.5);
    let mut out = vec![0.0f32; b * n * d];
    out.par_chunks_mut(n * d).zip(buffer.par_chunks(nk * d3)).for_each(|(out, qkv)| {
        let mut scores = vec![0.0f32; n * nk];
        for head in 0..heads {
            let col = head * dh;
            let (q, k, v) = (&qkv[col..], &qkv[d + col..], &qkv[2 * d + col..]);
            // SAFETY: every operand lies inside its slice: q rows `0..n` and k/v rows `0..nk`,
            // each `3d` apart, `dh` columns from their start (`2d + col + dh ≤ 3d`); `out` rows
            // `0..n`, `d` apart, columns `col..col + dh`; `scores` holds `n × nk`.
            // `scores = 0·scores + scale·(q kᵀ)`, then `out = 0·out + 1·(p v)`.
            unsafe {
                product(scores.as_mut_ptr(), nk, false, q.as_ptr(), d3, 1, k.as_ptr(), 1, d3, [n, nk, dh], scale, Parallelism::None);
                softmax_rows(&mut scores, nk);
                product(out[col..].as_mut_ptr(), d, false, scores.as_ptr(), nk, 1, v.as_ptr(), d3, 1, [n, dh, nk], 1.0, Parallelism::None);
            }
        }
    });
    Tensor::from_data(TensorData::new(out, [b, n, d]), &device)
}

/// Whether [`attention_with_grad`] applies to tensors like `t`: f32 on the CPU backend, in
/// autodiff without gradient checkpointing.
pub fn attention_with_grad_applies<const D: usize>(t: &Tensor<D>) -> bool {
    use burn_autodiff::Autodiff;
    use burn_autodiff::checkpoint::strategy::NoCheckpointing;
    t.dtype() == DType::F32
        && is_native_cpu(&t.device())
        && t.is_autodiff()
        && t.clone().try_into_primitive::<Autodiff<burn_flex::Flex, NoCheckpointing>>().is_ok()
}

/// `softmax(q·kᵀ/√Dh)·v` per head with gradients, on the CPU backend: `qkv` `[B, N, 3D]` (q, k
/// and v side by side, `D = heads·Dh`, LoRA deltas already added) → `[B, N, D]`. The
/// sequences are the `B` rows of `N` tokens, or with `lengths` consecutive runs of that many
/// tokens over all `B·N` (several crop sizes packed in one tensor). `None` where it does not
/// apply (another device or dtype, a tensor outside autodiff, gradient checkpointing); the
/// caller then takes burn's path.
pub fn attention_with_grad(qkv: Tensor<3>, heads: usize, lengths: Option<Arc<[usize]>>) -> Option<Tensor<3>> {
    use burn_autodiff::Autodiff;
    use burn_autodiff::checkpoint::strategy::NoCheckpointing;
    use burn_autodiff::ops::{Backward, OpsKind};
    use burn_flex::{Flex, FlexTensor};
    let [b, n, d3] = qkv.dims();
    let d = d3 / 3;
    let lengths = lengths.unwrap_or_else(|| vec![n; b].into());
    let fits = d3 == 3 * d && heads > 0 && d % heads == 0 && b * n > 0 && lengths.iter().sum::<usize>() == b * n;
    if !fits || !qkv.is_autodiff() || qkv.dtype() != DType::F32 || !is_native_cpu(&qkv.device()) {
        return None;
    }
    let input = qkv.try_into_primitive::<Autodiff<Flex, NoCheckpointing>>().ok()?;
    // (burn-flex copies only where the values are not already contiguous from the start.)
    let values = input.primitive().to_contiguous();
    let (out, probs) = forward_with_probs(values.storage::<f32>(), &lengths, d, heads);
    let output = FlexTensor::from_data(TensorData::new(out, [b, n, d]));

    /// What the backward pass reads: the projection, the attention probabilities of every
    /// sequence and head, and the sequences' lengths.
    #[derive(Debug, Clone)]
    struct Saved {
        qkv: FlexTensor,
        probs: Arc<Vec<f32>>,
        lengths: Arc<[usize]>,
        heads: usize,
    }
    #[derive(Debug)]
    struct AttentionBackward;
    impl Backward<Flex, 1> for AttentionBackward {
        type State = Saved;
        fn backward(
            self,
            ops: burn_autodiff::ops::Ops<Self::State, 1>,
            grads: &mut burn_autodiff::grads::Gradients,
            _: &mut burn_autodiff::checkpoint::base::Checkpointer,
        ) {
            let grad = grads.consume::<Flex>(&ops.node);
            let [Some(parent)] = ops.parents else { return };
            let saved = ops.state;
            let grad = grad.to_contiguous();
            let shape = saved.qkv.layout().shape().clone();
            let d = shape[shape.num_dims() - 1] / 3;
            let dqkv = backward(saved.qkv.storage::<f32>(), &saved.probs, grad.storage::<f32>(), &saved.lengths, d, saved.heads);
            grads.register::<Flex>(parent.id, FlexTensor::from_data(TensorData::new(dqkv, shape)));
        }
    }
    let saved = Saved { qkv: values, probs: Arc::new(probs), lengths, heads };
    let result = match AttentionBackward.prepare::<NoCheckpointing>([input.node()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(saved, output),
        OpsKind::UnTracked(prep) => prep.finish(output),
    };
    Some(Tensor::from_primitive::<Autodiff<Flex, NoCheckpointing>>(result))
}

/// `buffer` cut into consecutive pieces of the given sizes.
fn pieces(mut buffer: &mut [f32], sizes: impl Iterator<Item = usize>) -> Vec<&mut [f32]> {
    sizes
        .map(|size| {
            let (piece, rest) = std::mem::take(&mut buffer).split_at_mut(size);
            buffer = rest;
            piece
        })
        .collect()
}

/// [`pieces`] of a buffer that is only read.
fn read_pieces(mut buffer: &[f32], sizes: impl Iterator<Item = usize>) -> Vec<&[f32]> {
    sizes
        .map(|size| {
            let (piece, rest) = buffer.split_at(size);
            buffer = rest;
            piece
        })
        .collect()
}

/// The context `[rows, D]` and the probabilities (per sequence, per head, `n × n`) of
/// sequences of `lengths` consecutive rows of `qkv` `[rows, 3D]`.
fn forward_with_probs(qkv: &[f32], lengths: &[usize], d: usize, heads: usize) -> (Vec<f32>, Vec<f32>) {
    let rows: usize = lengths.iter().sum();
    let mut out = vec![0.0f32; rows * d];
    let mut probs = vec![0.0f32; heads * lengths.iter().map(|n| n * n).sum::<usize>()];
    let inputs = read_pieces(qkv, lengths.iter().map(|n| n * 3 * d));
    let outs = pieces(&mut out, lengths.iter().map(|n| n * d));
    let ps = pieces(&mut probs, lengths.iter().map(|n| heads * n * n));
    outs.into_par_iter().zip(ps).zip(inputs).for_each(|((out, p), x)| sequence_forward(x, out, p, d, heads));
    (out, probs)
}

/// The gradient of the projection `[rows, 3D]` given the context's `dout` `[rows, D]`.
fn backward(qkv: &[f32], probs: &[f32], dout: &[f32], lengths: &[usize], d: usize, heads: usize) -> Vec<f32> {
    let rows: usize = lengths.iter().sum();
    let mut dqkv = vec![0.0f32; rows * 3 * d];
    let inputs = read_pieces(qkv, lengths.iter().map(|n| n * 3 * d));
    let ps = read_pieces(probs, lengths.iter().map(|n| heads * n * n));
    let douts = read_pieces(dout, lengths.iter().map(|n| n * d));
    let grads = pieces(&mut dqkv, lengths.iter().map(|n| n * 3 * d));
    grads.into_par_iter().zip(inputs).zip(ps).zip(douts).for_each(|(((g, x), p), dout)| sequence_backward(x, p, dout, g, d, heads));
    dqkv
}

/// Sequences up to this long run their attention as plain loops over the head's columns;
/// longer ones through `gemm` (its call costs more than the loops for a few tokens, and its
/// kernel wins beyond).
const SHORT: usize = 32;

/// `Σ a·b` over eight lanes, so that the loop vectorises.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut lanes = [0.0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_chunks.remainder().iter().zip(b_chunks.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for l in 0..LANES {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `y ← y + alpha·x`.
#[inline(always)]
fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

with_avx2!(
    /// One sequence's attention: `qkv` `[n, 3D]` → `out` `[n, D]` (zeroed), keeping each
    /// head's probabilities (`probs`, `heads × n × n`).
    sequence_forward(qkv: &[f32], out: &mut [f32], probs: &mut [f32], d: usize, heads: usize) {
    let n = out.len() / d;
    let (dh, d3) = (d / heads, 3 * d);
    let scale = (dh as f32).powf(-0.5);
    for (head, p) in probs.chunks_exact_mut(n * n).enumerate() {
        let col = head * dh;
        let at = |i: usize, part: usize| i * d3 + part * d + col;
        // S = scale·q·kᵀ
        if n > SHORT {
            // SAFETY: q and k rows `0..n` lie in `qkv` (`3D` apart, `Dh` columns from
            // `part·D + col`; kᵀ: row stride 1, column stride 3D); `p` holds `n × n`.
            unsafe { product(p.as_mut_ptr(), n, false, qkv[col..].as_ptr(), d3, 1, qkv[d + col..].as_ptr(), 1, d3, [n, n, dh], scale, Parallelism::None) };
        } else {
            for (i, row) in p.chunks_exact_mut(n).enumerate() {
                let q = &qkv[at(i, 0)..][..dh];
                for (j, s) in row.iter_mut().enumerate() {
                    *s = scale * dot(q, &qkv[at(j, 1)..][..dh]);
                }
            }
        }
        softmax_rows(p, n);
        // O = P·v
        if n > SHORT {
            // SAFETY: v rows `0..n` lie in `qkv` as above; the context rows `0..n` lie in `out`
            // (`D` apart, columns `col..col + Dh`).
            unsafe { product(out[col..].as_mut_ptr(), d, false, p.as_ptr(), n, 1, qkv[2 * d + col..].as_ptr(), d3, 1, [n, dh, n], 1.0, Parallelism::None) };
        } else {
            for (i, row) in p.chunks_exact(n).enumerate() {
                let o = &mut out[i * d + col..][..dh];
                for (j, &p) in row.iter().enumerate() {
                    axpy(p, &qkv[at(j, 2)..][..dh], o);
                }
            }
        }
    }
});

with_avx2!(
    /// One sequence's gradient of its projection `dqkv` `[n, 3D]` (zeroed) from the context's
    /// `dout` `[n, D]`: with `S = q·kᵀ/√Dh` and `P = softmax(S)`, `dV = Pᵀ·dO`,
    /// `dS = P ⊙ (dO·vᵀ − rowsum(P ⊙ dO·vᵀ))`, `dQ = dS·k/√Dh` and `dK = dSᵀ·q/√Dh`.
    sequence_backward(qkv: &[f32], probs: &[f32], dout: &[f32], dqkv: &mut [f32], d: usize, heads: usize) {
    let n = dout.len() / d;
    let (dh, d3) = (d / heads, 3 * d);
    let scale = (dh as f32).powf(-0.5);
    let mut ds = vec![0.0f32; n * n];
    for (head, p) in probs.chunks_exact(n * n).enumerate() {
        let col = head * dh;
        let at = |i: usize, part: usize| i * d3 + part * d + col;
        let grad_out = |i: usize| &dout[i * d + col..][..dh];
        // dP = dO·vᵀ
        if n > SHORT {
            // SAFETY: `dout` rows `0..n` are `D` apart, v's in `qkv` `3D` apart (`Dh` columns
            // from `2D + col`); `ds` holds `n × n`.
            unsafe { product(ds.as_mut_ptr(), n, false, dout[col..].as_ptr(), d, 1, qkv[2 * d + col..].as_ptr(), 1, d3, [n, n, dh], 1.0, Parallelism::None) };
        } else {
            for (i, row) in ds.chunks_exact_mut(n).enumerate() {
                for (j, dp) in row.iter_mut().enumerate() {
                    *dp = dot(grad_out(i), &qkv[at(j, 2)..][..dh]);
                }
            }
        }
        // dS = P ⊙ (dP − rowsum(P ⊙ dP)), with the scale of S folded in.
        for (row, p) in ds.chunks_exact_mut(n).zip(p.chunks_exact(n)) {
            let weighted = dot(p, row);
            for (ds, &p) in row.iter_mut().zip(p) {
                *ds = p * (*ds - weighted) * scale;
            }
        }
        // dV = Pᵀ·dO, dQ = dS·k, dK = dSᵀ·q
        if n > SHORT {
            let (q, k) = (qkv[col..].as_ptr(), qkv[d + col..].as_ptr());
            // SAFETY: as above; `dqkv`'s rows are `3D` apart like `qkv`'s; `p` holds `n × n`.
            unsafe {
                product(dqkv[2 * d + col..].as_mut_ptr(), d3, false, p.as_ptr(), 1, n, dout[col..].as_ptr(), d, 1, [n, dh, n], 1.0, Parallelism::None);
                product(dqkv[col..].as_mut_ptr(), d3, false, ds.as_ptr(), n, 1, k, d3, 1, [n, dh, n], 1.0, Parallelism::None);
                product(dqkv[d + col..].as_mut_ptr(), d3, false, ds.as_ptr(), 1, n, q, d3, 1, [n, dh, n], 1.0, Parallelism::None);
            }
        } else {
            for i in 0..n {
                for j in 0..n {
                    axpy(p[i * n + j], grad_out(i), &mut dqkv[at(j, 2)..][..dh]);
                    axpy(ds[i * n + j], &qkv[at(i, 0)..][..dh], &mut dqkv[at(j, 1)..][..dh]);
                    axpy(ds[i * n + j], &qkv[at(j, 1)..][..dh], &mut dqkv[at(i, 0)..][..dh]);
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use burn::tensor::activation;

    use super::*;

    #[test]
    fn the_fused_attention_kernel_matches_burns_explicit_attention() {
        use burn::tensor::{Device, Distribution};
        let device = Device::flex();
        // Queries are the first `n` of `nk` rows (memory tokens add keys only); deltas on q and v.
        let (b, n, nk, heads, dh) = (3, 7, 9, 4, 5);
        let d = heads * dh;
        let normal = |dims: [usize; 3]| Tensor::<3>::random(dims, Distribution::Normal(0.0, 1.0), &device);
        let qkv = normal([b, nk, 3 * d]);
        let (dq, dv) = (normal([b, n, d]), normal([b, nk, d]));
        let q = qkv.clone().narrow(1, 0, n).narrow(2, 0, d) + dq.clone();
        let k = qkv.clone().narrow(2, d, d);
        let v = qkv.clone().narrow(2, 2 * d, d) + dv.clone();
        assert!(attention_applies(&[&qkv, &dq, &dv]));
        let ours = fused_attention(qkv, [Some(dq), None, Some(dv)], n, heads);
        let split = |t: Tensor<3>, len: usize| t.reshape([b, len, heads, dh]).swap_dims(1, 2);
        let scores = split(q, n).matmul(split(k, nk).swap_dims(2, 3)).mul_scalar((dh as f64).powf(-0.5));
        let reference = activation::softmax(scores, 3).matmul(split(v, nk)).swap_dims(1, 2).reshape([b, n, d]);
        let worst = (ours - reference).abs().max().into_scalar::<f32>();
        assert!(worst < 1e-5, "largest difference {worst}");
    }

    #[test]
    fn attention_with_gradients_matches_burns_in_value_and_gradient() {
        use burn::tensor::{Device, Distribution};
        let device = Device::flex().autodiff();
        // Head widths below, at and beyond the eight lanes of the dot products.
        // Sequences short enough for the loops, and longer ones through `gemm`.
        for (b, n, heads, dh) in [(3, 7, 4, 5), (2, 17, 2, 20), (1, 1, 1, 8), (2, 40, 2, 16), (1, 65, 4, 5)] {
            let d = heads * dh;
            let qkv = Tensor::<3>::random([b, n, 3 * d], Distribution::Normal(0.0, 1.0), &device).require_grad();
            let weights = Tensor::<3>::random([b, n, d], Distribution::Normal(0.0, 1.0), &device);
            let ours = attention_with_grad(qkv.clone(), heads, None).expect("applies to a tracked f32 input");
            let split = |t: Tensor<3>| t.reshape([b, n, heads, dh]).swap_dims(1, 2);
            let (q, k, v) = (qkv.clone().narrow(2, 0, d), qkv.clone().narrow(2, d, d), qkv.clone().narrow(2, 2 * d, d));
            let scores = split(q).matmul(split(k).swap_dims(2, 3)).mul_scalar((dh as f64).powf(-0.5));
            let reference = activation::softmax(scores, 3).matmul(split(v)).swap_dims(1, 2).reshape([b, n, d]);
            let gap = |a: Tensor<3>, b: Tensor<3>| (a - b).abs().max().into_scalar::<f32>();
            let value = gap(ours.clone().inner(), reference.clone().inner());
            let ours_grad = qkv.grad(&(ours * weights.clone()).sum().backward()).expect("a gradient");
            let reference_grad = qkv.grad(&(reference * weights).sum().backward()).expect("a gradient");
            let grad = gap(ours_grad, reference_grad);
            assert!(value < 1e-5 && grad < 1e-4, "b {b}, n {n}, heads {heads}: value {value}, gradient {grad}");
        }
        // Outside autodiff the caller keeps its own path.
        assert!(!attention_with_grad_applies(&Tensor::<3>::zeros([1, 2, 6], &Device::flex())));
        assert!(attention_with_grad(Tensor::<3>::zeros([1, 2, 6], &Device::flex()), 1, None).is_none());
    }

    #[test]
    fn packed_sequences_of_two_lengths_match_each_length_on_its_own() {
        use burn::tensor::{Device, Distribution};
        let device = Device::flex().autodiff();
        let (heads, dh) = (3, 8);
        let d = heads * dh;
        let normal = |dims: [usize; 3]| Tensor::<3>::random(dims, Distribution::Normal(0.0, 1.0), &device);
        // Two images of 7 tokens and three of 3, packed as one [1, 23, 3D] tensor.
        let (long, short) = (normal([2, 7, 3 * d]).require_grad(), normal([3, 3, 3 * d]).require_grad());
        let packed = Tensor::cat(vec![long.clone().reshape([1, 14, 3 * d]), short.clone().reshape([1, 9, 3 * d])], 1);
        let lengths: Arc<[usize]> = vec![7, 7, 3, 3, 3].into();
        let ours = attention_with_grad(packed, heads, Some(lengths)).expect("applies");
        let weights = normal([1, 23, d]);
        let grads = (ours.clone() * weights.clone()).sum().backward();
        let (long_grad, short_grad) = (long.grad(&grads).expect("a gradient"), short.grad(&grads).expect("a gradient"));
        let alone = |t: Tensor<3>, start: usize, rows: usize| {
            let [b, n, _] = t.dims();
            let out = attention_with_grad(t.clone(), heads, None).expect("applies");
            let w = weights.clone().narrow(1, start, rows).reshape([b, n, d]);
            let grad = t.grad(&(out.clone() * w).sum().backward()).expect("a gradient");
            (out.reshape([1, rows, d]), grad)
        };
        let (long_out, long_ref) = alone(long, 0, 14);
        let (short_out, short_ref) = alone(short, 14, 9);
        let gap = |a: Tensor<3>, b: Tensor<3>| (a.inner() - b.inner()).abs().max().into_scalar::<f32>();
        let value = gap(ours, Tensor::cat(vec![long_out, short_out], 1));
        let grad = gap(long_grad, long_ref).max(gap(short_grad, short_ref));
        assert!(value < 1e-6 && grad < 1e-6, "value {value}, gradient {grad}");
    }
}
