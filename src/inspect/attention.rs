//! CLS-attention maps: which patches the CLS token attends to in a chosen layer and head, and
//! a heatmap overlay PNG for the CLI. (The app colours the same map on the GPU.)

use image::{Rgb, RgbImage, imageops};

use crate::model::to_vec;
use crate::model::{ForwardOptions, Vit};
use burn::tensor::Tensor;

pub use crate::engine::AttentionMap;
use crate::engine::{AttentionRequest, AttentionView};

/// The answer to an attention request: the image as the models see it at `size` px and its
/// CLS attention in the source backbone and in the student (after `step` optimizer steps).
/// One function for a running job (between two steps) and for a finished run.
pub fn before_after(
    request: &AttentionRequest,
    size: u32,
    source: &Vit,
    student: &Vit,
    step: u64,
    device: &burn::tensor::Device,
) -> anyhow::Result<AttentionView> {
    let pre = crate::data::Preprocess::new(size);
    let x = || super::images_tensor(pre.to_tensor_data(&request.image), 1, size as usize, device);
    Ok(AttentionView {
        id: request.id,
        image: pre.apply(&request.image),
        source: cls_attention(source, x(), request.layer, request.head)?,
        student: cls_attention(student, x(), request.layer, request.head)?,
        step,
    })
}

/// Runs `image` (`[1, 3, H, W]`) through the model and returns the CLS attention of `layer`
/// (one head, or the mean over heads) over the patches. Errors name the valid range.
pub fn cls_attention(model: &Vit, image: Tensor<4>, layer: usize, head: Option<usize>) -> anyhow::Result<AttentionMap> {
    let config = model.config();
    anyhow::ensure!(layer < config.depth, "--layer {layer} is out of range: the model has blocks 0..={}", config.depth - 1);
    if let Some(h) = head {
        anyhow::ensure!(h < config.num_heads, "--head {h} is out of range: the model has heads 0..={}", config.num_heads - 1);
    }
    let out = model.forward(image, ForwardOptions { mask: None, attention_layers: vec![layer] });
    let (rows, cols) = out.grid;
    let (_, probs) = out.attentions.into_iter().next().expect("requested layer");
    let [_, heads, _, _] = probs.dims();
    let first_patch = 1 + config.num_registers;
    // [1, H, T, T] → CLS row over patch columns: [H, rows·cols]
    let cls_row = probs.narrow(2, 0, 1).narrow(3, first_patch, rows * cols).reshape([heads, rows * cols]);
    let selected = match head {
        Some(h) => cls_row.narrow(0, h, 1),
        None => cls_row.mean_dim(0),
    };
    Ok(AttentionMap { layer, head, rows, cols, values: to_vec(selected) })
}

/// A perceptually ordered colour map (dark purple → orange → pale yellow, like "inferno"),
/// the same control points the app's WGSL shader uses (`shaders/heatmap.wgsl`).
pub const HEATMAP_STOPS: [[f32; 3]; 6] = [
    [0.001, 0.000, 0.014],
    [0.258, 0.039, 0.406],
    [0.578, 0.148, 0.404],
    [0.865, 0.317, 0.226],
    [0.988, 0.645, 0.040],
    [0.988, 0.998, 0.645],
];

/// Colour of `t ∈ [0, 1]` on [`HEATMAP_STOPS`], linearly interpolated.
pub fn heat_color(t: f32) -> [f32; 3] {
    let t = t.clamp(0.0, 1.0) * (HEATMAP_STOPS.len() - 1) as f32;
    let i = (t.floor() as usize).min(HEATMAP_STOPS.len() - 2);
    let f = t - i as f32;
    let (a, b) = (HEATMAP_STOPS[i], HEATMAP_STOPS[i + 1]);
    [a[0] + (b[0] - a[0]) * f, a[1] + (b[1] - a[1]) * f, a[2] + (b[2] - a[2]) * f]
}

/// Blends the min-max normalised map, upsampled bilinearly to the image size, over `image`
/// with opacity `alpha`.
pub fn overlay(image: &RgbImage, map: &AttentionMap, alpha: f32) -> RgbImage {
    let (lo, hi) = map.values.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let range = (hi - lo).max(1e-12);
    let grid = image::ImageBuffer::<image::Luma<f32>, Vec<f32>>::from_vec(
        map.cols as u32,
        map.rows as u32,
        map.values.iter().map(|v| (v - lo) / range).collect(),
    )
    .expect("rows × cols values");
    let heat = imageops::resize(&grid, image.width(), image.height(), imageops::FilterType::Triangle);
    let mut out = image.clone();
    for (x, y, pixel) in out.enumerate_pixels_mut() {
        let c = heat_color(heat.get_pixel(x, y)[0]);
        let blend = |base: u8, h: f32| ((1.0 - alpha) * base as f32 + alpha * h * 255.0).round().clamp(0.0, 255.0) as u8;
        *pixel = Rgb([blend(pixel[0], c[0]), blend(pixel[1], c[1]), blend(pixel[2], c[2])]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heat_colors_run_from_dark_to_bright() {
        let lum = |c: [f32; 3]| 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2];
        let mut last = -1.0;
        for i in 0..=20 {
            let l = lum(heat_color(i as f32 / 20.0));
            assert!(l > last, "luminance must increase monotonically");
            last = l;
        }
        assert_eq!(heat_color(-1.0), HEATMAP_STOPS[0]);
        assert_eq!(heat_color(2.0), HEATMAP_STOPS[5]);
    }

    #[test]
    fn overlay_is_brightest_where_attention_is_highest() {
        let image = RgbImage::from_pixel(32, 32, Rgb([128, 128, 128]));
        let mut values = vec![0.0; 16];
        values[0] = 1.0; // top-left patch
        let map = AttentionMap { layer: 0, head: None, rows: 4, cols: 4, values };
        let out = overlay(&image, &map, 0.6);
        let top_left = out.get_pixel(2, 2);
        let bottom_right = out.get_pixel(29, 29);
        assert!(top_left[0] > bottom_right[0] + 50, "{top_left:?} vs {bottom_right:?}");
        assert_eq!(out.dimensions(), (32, 32));
    }
}
