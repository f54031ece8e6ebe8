//! Bicubic resampling of position embeddings, written as a matrix so that it is exact
//! (PyTorch's `upsample_bicubic2d`, A = -0.75, `align_corners = False`, border clamp),
//! runs on the GPU as two matmuls, and stays differentiable (burn's bicubic `interpolate`
//! has no backward on CubeCL).

/// Row-stochastic weights `[out_len, in_len]` (row-major) that resample a 1-D signal of
/// `in_len` samples to `out_len` samples.
///
/// `offset` reproduces Meta's DINOv2 `interpolate_offset`: PyTorch is then called with
/// `scale_factor = (out_len + offset) / in_len`, so source coordinates use that scale instead
/// of `in_len / out_len`. With `offset = 0` this is `interpolate(size = out_len)`.
/// `antialias` reproduces `antialias=True` (Hugging Face's Dinov2WithRegisters).
pub fn bicubic_weights(in_len: usize, out_len: usize, offset: f64, antialias: bool) -> Vec<f32> {
    if antialias {
        return antialiased_bicubic_weights(in_len, out_len);
    }
    const A: f64 = -0.75;
    let cubic1 = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let cubic2 = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = if offset != 0.0 { in_len as f64 / (out_len as f64 + offset) } else { in_len as f64 / out_len as f64 };
    let mut weights = vec![0f32; out_len * in_len];
    for i in 0..out_len {
        // PyTorch computes the source index in the kernel's float type (f32 for f32 inputs).
        let real = (scale as f32 * (i as f32 + 0.5) - 0.5) as f64;
        let base = real.floor();
        let t = real - base;
        let coeffs = [cubic2(t + 1.0), cubic1(t), cubic1(1.0 - t), cubic2(2.0 - t)];
        for (k, c) in coeffs.iter().enumerate() {
            let src = (base as i64 - 1 + k as i64).clamp(0, in_len as i64 - 1) as usize;
            weights[i * in_len + src] += *c as f32;
        }
    }
    weights
}

/// PyTorch's separable antialiased bicubic (`_upsample_bicubic2d_aa`, PIL's filter): Keys'
/// kernel with a = -0.5, stretched by the downscale factor, taps normalised to sum to 1.
fn antialiased_bicubic_weights(in_len: usize, out_len: usize) -> Vec<f32> {
    const A: f64 = -0.5;
    let filter = |x: f64| {
        let x = x.abs();
        if x < 1.0 {
            ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * A
        } else {
            0.0
        }
    };
    let scale = in_len as f64 / out_len as f64;
    let support = 2.0 * scale.max(1.0);
    let inv = 1.0 / scale.max(1.0);
    let mut weights = vec![0f32; out_len * in_len];
    for i in 0..out_len {
        let center = scale * (i as f64 + 0.5);
        let lo = ((center - support + 0.5) as i64).max(0) as usize;
        let hi = ((center + support + 0.5) as i64).min(in_len as i64) as usize;
        let taps: Vec<f64> = (lo..hi).map(|j| filter((j as f64 - center + 0.5) * inv)).collect();
        let total: f64 = taps.iter().sum();
        for (j, w) in (lo..hi).zip(taps) {
            weights[i * in_len + j] = (w / total) as f32;
        }
    }
    weights
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_without_offset_is_identity() {
        let w = bicubic_weights(5, 5, 0.0, false);
        for i in 0..5 {
            for j in 0..5 {
                let expected = if i == j { 1.0 } else { 0.0 };
                assert!((w[i * 5 + j] - expected).abs() < 1e-6, "w[{i},{j}] = {}", w[i * 5 + j]);
            }
        }
    }

    #[test]
    fn rows_sum_to_one_and_constant_is_preserved() {
        for (n_in, n_out, off, aa) in [(4, 6, 0.0, false), (37, 16, 0.1, false), (8, 3, 0.0, true), (2, 9, 0.1, false), (37, 16, 0.0, true)]
        {
            let w = bicubic_weights(n_in, n_out, off, aa);
            for i in 0..n_out {
                let s: f32 = w[i * n_in..(i + 1) * n_in].iter().sum();
                assert!((s - 1.0).abs() < 1e-5, "row {i} sums to {s}");
            }
        }
    }

    #[test]
    fn matches_hand_computed_pytorch_values() {
        // torch.nn.functional.interpolate(torch.arange(4.).view(1,1,1,4), size=(1,6),
        //   mode="bicubic", align_corners=False) gives
        // the values below (torch 2.x, float32).
        let w = bicubic_weights(4, 6, 0.0, false);
        let out: Vec<f32> = (0..6).map(|i| (0..4).map(|j| w[i * 4 + j] * j as f32).sum()).collect();
        let expected = [-0.086_805_56, 0.40625, 1.212963, 1.787037, 2.59375, 3.0868056];
        for (o, e) in out.iter().zip(expected) {
            assert!((o - e).abs() < 1e-5, "{out:?}");
        }
    }

    #[test]
    fn matches_pytorch_with_metas_scale_factor_offset() {
        // interpolate(arange(37.).view(1,1,1,37), scale_factor=(1, 16.1/37), mode="bicubic",
        //   align_corners=False)[..., :5] with torch 2.x.
        let w = bicubic_weights(37, 16, 0.1, false);
        let expected = [0.55516255, 2.9248412, 5.292489, 7.532691, 9.796081];
        for (i, e) in expected.iter().enumerate() {
            let o: f32 = (0..37).map(|j| w[i * 37 + j] * j as f32).sum();
            assert!((o - e).abs() < 1e-4, "output {i}: {o} vs {e}");
        }
    }

    #[test]
    fn matches_pytorch_antialias() {
        // interpolate(arange(n).view(1,1,1,n), size=(1,m), mode="bicubic", align_corners=False,
        //   antialias=True)[..., :5] with torch 2.x, for an upsampling and a downsampling.
        let cases: [(usize, usize, [f32; 5]); 2] = [
            (4, 6, [-0.06578932, 0.41176474, 1.1666667, 1.8333333, 2.5882354]),
            (37, 16, [0.708427, 2.9193218, 5.2833624, 7.592_695, 9.904927]),
        ];
        for (n_in, n_out, expected) in cases {
            let w = bicubic_weights(n_in, n_out, 0.0, true);
            for (i, e) in expected.iter().enumerate() {
                let o: f32 = (0..n_in).map(|j| w[i * n_in + j] * j as f32).sum();
                assert!((o - e).abs() < 1e-5, "{n_in}→{n_out} output {i}: {o} vs {e}");
            }
        }
    }
}
