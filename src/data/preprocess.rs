//! Turning decoded images into model input: resize + centre crop (like torchvision's eval
//! transforms) and ImageNet normalisation into CHW `f32`.

use std::borrow::Cow;
use std::path::PathBuf;

use image::RgbImage;
use image::imageops::{self, FilterType};
use rayon::prelude::*;

use super::folder::{SkipReport, decode_rgb};
use super::{IMAGENET_MEAN, IMAGENET_STD};

/// Eval-time geometry: resize the shorter side to `round(size / crop_fraction)` (CatmullRom,
/// aspect ratio kept), then centre-crop `size`×`size`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Preprocess {
    /// Output side length in pixels.
    pub size: u32,
    /// Fraction of the resized shorter side kept by the crop, in (0, 1]; 0.875 gives the
    /// classic "resize 256, crop 224".
    pub crop_fraction: f32,
}

impl Default for Preprocess {
    fn default() -> Self {
        Preprocess { size: 224, crop_fraction: 1.0 }
    }
}

impl Preprocess {
    /// A preprocess with the given output size and `crop_fraction` 1.0.
    pub fn new(size: u32) -> Self {
        Preprocess { size, crop_fraction: 1.0 }
    }

    /// Output side, at least 1.
    fn out_size(&self) -> u32 {
        self.size.max(1)
    }

    /// The length the shorter side is resized to. An invalid `crop_fraction` (not in (0, 1])
    /// is treated as 1.0.
    pub fn resize_target(&self) -> u32 {
        let size = self.out_size();
        let f = self.crop_fraction;
        if !(f.is_finite() && f > 0.0 && f <= 1.0) {
            return size;
        }
        ((size as f64 / f as f64).round() as u32).max(size)
    }

    /// Number of `f32` values per image produced by [`Preprocess::to_tensor_data`].
    pub fn values_per_image(&self) -> usize {
        let s = self.out_size() as usize;
        3 * s * s
    }

    fn prepared<'a>(&self, img: &'a RgbImage) -> Cow<'a, RgbImage> {
        let size = self.out_size();
        let target = self.resize_target();
        let (w, h) = img.dimensions();
        if w == 0 || h == 0 {
            return Cow::Owned(RgbImage::new(size, size));
        }
        // Shorter side -> target; longer side scaled and truncated like torchvision.
        let (nw, nh) = if w <= h {
            (target, ((h as u64 * target as u64) / w as u64).max(target as u64) as u32)
        } else {
            (((w as u64 * target as u64) / h as u64).max(target as u64) as u32, target)
        };
        let resized =
            if (nw, nh) == (w, h) { Cow::Borrowed(img) } else { Cow::Owned(imageops::resize(img, nw, nh, FilterType::CatmullRom)) };
        if (nw, nh) == (size, size) {
            return resized;
        }
        let x = (nw - size) / 2;
        let y = (nh - size) / 2;
        Cow::Owned(imageops::crop_imm(resized.as_ref(), x, y, size, size).to_image())
    }

    /// Resizes and centre-crops `img` to `size`×`size`.
    pub fn apply(&self, img: &RgbImage) -> RgbImage {
        self.prepared(img).into_owned()
    }

    /// [`Preprocess::apply`] then [`normalize_chw`]: `3*size*size` values in CHW order.
    pub fn to_tensor_data(&self, img: &RgbImage) -> Vec<f32> {
        normalize_chw(self.prepared(img).as_ref())
    }
}

/// CHW `f32` of `img` (no resize), each value `(pixel/255 - mean[c]) / std[c]` with the
/// ImageNet statistics.
pub fn normalize_chw(img: &RgbImage) -> Vec<f32> {
    let plane = img.width() as usize * img.height() as usize;
    let mut out = vec![0.0f32; 3 * plane];
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * IMAGENET_STD[c]));
    let offset: [f32; 3] = std::array::from_fn(|c| IMAGENET_MEAN[c] / IMAGENET_STD[c]);
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
        r[i] = px[0] as f32 * scale[0] - offset[0];
        g[i] = px[1] as f32 * scale[1] - offset[1];
        b[i] = px[2] as f32 * scale[2] - offset[2];
    }
    out
}

/// Inverse of [`normalize_chw`] (values clamped to 0..=255), for previews.
///
/// # Panics
/// If `data.len() != 3 * width * height`.
pub fn denormalize_chw_to_rgb(data: &[f32], width: u32, height: u32) -> RgbImage {
    let plane = width as usize * height as usize;
    assert_eq!(data.len(), 3 * plane, "denormalize_chw_to_rgb: expected 3*{width}*{height} values");
    let mut raw = vec![0u8; 3 * plane];
    for (c, chan) in data.chunks_exact(plane.max(1)).enumerate().take(3) {
        for (i, &v) in chan.iter().enumerate() {
            let p = (v * IMAGENET_STD[c] + IMAGENET_MEAN[c]) * 255.0;
            raw[3 * i + c] = p.round().clamp(0.0, 255.0) as u8;
        }
    }
    RgbImage::from_raw(width, height, raw).expect("buffer has the right length")
}

/// Decodes and preprocesses `items` in parallel. Returns the concatenated CHW data of the
/// images that could be read and their indices into `items`; the others are recorded in
/// `skips` (in input order).
pub fn load_batch(items: &[PathBuf], pre: &Preprocess, skips: &mut SkipReport) -> (Vec<f32>, Vec<usize>) {
    let results: Vec<_> = items.par_iter().map(|p| decode_rgb(p).map(|img| pre.to_tensor_data(&img))).collect();
    let mut data = Vec::with_capacity(pre.values_per_image() * items.len());
    let mut kept = Vec::with_capacity(items.len());
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(v) => {
                data.extend_from_slice(&v);
                kept.push(i);
            }
            Err(e) => skips.record(items[i].clone(), e.reason()),
        }
    }
    (data, kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn output_dims_for_various_shapes() {
        let pre = Preprocess::new(32);
        for (w, h) in [(32, 32), (64, 48), (48, 64), (100, 33), (7, 5), (1, 300)] {
            let img = RgbImage::from_fn(w, h, |x, y| Rgb([x as u8, y as u8, 7]));
            let out = pre.apply(&img);
            assert_eq!(out.dimensions(), (32, 32), "{w}x{h}");
            assert_eq!(pre.to_tensor_data(&img).len(), 3 * 32 * 32);
        }
        assert_eq!(Preprocess::default().size, 224);
        assert_eq!(Preprocess::default().crop_fraction, 1.0);
    }

    #[test]
    fn resize_target_follows_crop_fraction() {
        let pre = Preprocess { size: 224, crop_fraction: 0.875 };
        assert_eq!(pre.resize_target(), 256);
        assert_eq!(Preprocess::new(224).resize_target(), 224);
        for bad in [0.0, -1.0, 2.0, f32::NAN] {
            let p = Preprocess { size: 16, crop_fraction: bad };
            assert_eq!(p.resize_target(), 16);
            assert_eq!(p.apply(&RgbImage::new(40, 20)).dimensions(), (16, 16));
        }
    }

    #[test]
    fn same_size_image_is_untouched_and_crop_is_centred() {
        let img = RgbImage::from_fn(16, 16, |x, y| Rgb([x as u8 * 9, y as u8 * 13, 200]));
        assert_eq!(Preprocess::new(16).apply(&img), img);

        // Shorter side already equals size: no resize, only a centre crop of the width.
        let wide = RgbImage::from_fn(24, 16, |x, y| Rgb([x as u8, y as u8, 0]));
        let out = Preprocess::new(16).apply(&wide);
        assert_eq!(out.get_pixel(0, 0).0, [4, 0, 0]);
        assert_eq!(out.get_pixel(15, 15).0, [19, 15, 0]);

        // crop_fraction 0.5: shorter side 8 -> 16, then the central 8x8.
        let small = RgbImage::from_fn(8, 8, |x, _| Rgb([if x < 4 { 0 } else { 255 }, 0, 0]));
        let pre = Preprocess { size: 8, crop_fraction: 0.5 };
        let out = pre.apply(&small);
        assert_eq!(out.dimensions(), (8, 8));
        assert!(out.get_pixel(0, 4).0[0] < 30 && out.get_pixel(7, 4).0[0] > 225);
    }

    #[test]
    fn normalisation_of_solid_colour() {
        let img = RgbImage::from_pixel(10, 6, Rgb([255, 0, 128]));
        let pre = Preprocess::new(4);
        let data = pre.to_tensor_data(&img);
        assert_eq!(data.len(), 3 * 16);
        let expect = [
            (1.0 - 0.485) / 0.229,           // 2.2489
            (0.0 - 0.456) / 0.224,           // -2.0357
            (128.0 / 255.0 - 0.406) / 0.225, // 0.4265
        ];
        for c in 0..3 {
            for v in &data[c * 16..(c + 1) * 16] {
                assert!((v - expect[c]).abs() < 1e-5, "channel {c}: {v} vs {}", expect[c]);
            }
        }
        assert!((data[0] - 2.248_908).abs() < 1e-5);
        assert!((data[16] + 2.035_714).abs() < 1e-5);
    }

    #[test]
    fn normalize_layout_is_chw() {
        let mut img = RgbImage::new(3, 2);
        img.put_pixel(2, 1, Rgb([255, 255, 255]));
        let d = normalize_chw(&img);
        assert_eq!(d.len(), 18);
        let white_r = (1.0 - 0.485) / 0.229;
        let black_r = -0.485 / 0.229;
        assert!((d[5] - white_r).abs() < 1e-5); // R plane, last pixel (x=2, y=1)
        assert!((d[4] - black_r).abs() < 1e-5);
        assert!((d[6 + 5] - (1.0 - 0.456) / 0.224).abs() < 1e-5); // G plane
    }

    #[test]
    fn denormalize_inverts_normalize() {
        let img = RgbImage::from_fn(13, 7, |x, y| Rgb([(x * 19 + y) as u8, (y * 37) as u8, ((x * y * 11) % 256) as u8]));
        let back = denormalize_chw_to_rgb(&normalize_chw(&img), 13, 7);
        for (a, b) in img.pixels().zip(back.pixels()) {
            for c in 0..3 {
                assert!((a.0[c] as i32 - b.0[c] as i32).abs() <= 1);
            }
        }
        // Out-of-range values are clamped.
        let clamped = denormalize_chw_to_rgb(&[100.0, -100.0, 0.0], 1, 1);
        assert_eq!(clamped.get_pixel(0, 0).0, [255, 0, 104]);
    }

    #[test]
    fn load_batch_skips_corrupt_files_and_keeps_good_ones() {
        let dir = tempfile::tempdir().unwrap();
        let good1 = dir.path().join("good1.png");
        let good2 = dir.path().join("good2.jpg");
        let bad_trunc = dir.path().join("truncated.jpg");
        let bad_empty = dir.path().join("empty.png");
        let bad_text = dir.path().join("text.png");
        RgbImage::from_pixel(20, 10, Rgb([255, 0, 0])).save(&good1).unwrap();
        let jpg = {
            let img = RgbImage::from_fn(40, 40, |x, y| Rgb([(x * 6) as u8, (y * 6) as u8, 99]));
            let mut buf = std::io::Cursor::new(Vec::new());
            img.write_to(&mut buf, image::ImageFormat::Jpeg).unwrap();
            buf.into_inner()
        };
        std::fs::write(&good2, &jpg).unwrap();
        std::fs::write(&bad_trunc, &jpg[..jpg.len() / 4]).unwrap();
        std::fs::write(&bad_empty, b"").unwrap();
        std::fs::write(&bad_text, b"hello").unwrap();

        let items = vec![bad_trunc.clone(), good1.clone(), bad_empty.clone(), good2, bad_text.clone(), dir.path().join("missing.png")];
        let pre = Preprocess::new(8);
        let mut skips = SkipReport::default();
        let (data, kept) = load_batch(&items, &pre, &mut skips);
        assert_eq!(kept, vec![1, 3]);
        assert_eq!(data.len(), 2 * 3 * 64);
        assert!((data[0] - (1.0 - 0.485) / 0.229).abs() < 1e-4); // first kept is the red PNG
        assert_eq!(skips.count(), 4);
        let skipped: Vec<_> = skips.skipped.iter().map(|(p, _)| p.clone()).collect();
        assert_eq!(skipped, vec![bad_trunc, bad_empty, bad_text, dir.path().join("missing.png")]);
        let summary = skips.summary().unwrap();
        assert!(summary.starts_with("skipped 4 unreadable images: "), "{summary}");
        assert!(summary.contains("truncated.jpg"));

        let (data, kept) = load_batch(&[], &pre, &mut skips);
        assert!(data.is_empty() && kept.is_empty());
    }
}
