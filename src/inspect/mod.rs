//! What a backbone sees, shared by training (the k-NN monitor, attention between steps) and
//! evaluation (k-NN probes, `explora attention`): CLS-attention maps and the weighted k-NN vote.

pub mod attention;
pub mod knn;

use burn::tensor::{Device, Tensor, TensorData};

pub use attention::{cls_attention, overlay};
pub use knn::{KnnConfig, knn_scores, leave_one_out_scores, top1};

/// Uploads `n` preprocessed CHW images (concatenated) as a `[n, 3, size, size]` tensor.
pub fn images_tensor(data: Vec<f32>, n: usize, size: usize, device: &Device) -> Tensor<4> {
    Tensor::from_data(TensorData::new(data, [n, 3, size, size]), device)
}

/// Rows of pictures on white with 2-pixel gaps, each row left-aligned (a contact sheet for
/// comparisons such as MAE's input | masked | reconstruction).
pub fn grid_sheet(rows: &[Vec<image::RgbImage>]) -> image::RgbImage {
    let gap = 2u32;
    let row_width = |row: &Vec<image::RgbImage>| row.iter().map(|i| i.width() + gap).sum::<u32>() + gap;
    let row_height = |row: &Vec<image::RgbImage>| row.iter().map(|i| i.height()).max().unwrap_or(0);
    let width = rows.iter().map(row_width).max().unwrap_or(gap).max(1);
    let height = rows.iter().map(|r| row_height(r) + gap).sum::<u32>() + gap;
    let mut out = image::RgbImage::from_pixel(width, height.max(1), image::Rgb([255, 255, 255]));
    let mut y = gap;
    for row in rows {
        let mut x = gap;
        for img in row {
            image::imageops::replace(&mut out, img, x as i64, y as i64);
            x += img.width() + gap;
        }
        y += row_height(row) + gap;
    }
    out
}
