//! Random helpers (seeded streams) and the multi-crop augmentations of one image.

use image::RgbImage;
use image::imageops::{self, FilterType};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use super::MultiCropConfig;
use crate::data::rng::{mix64, shuffle};

// ---------------------------------------------------------------------------------------------
// Random helpers.

// Independent streams derived from the one seed.
pub(super) const STREAM_ORDER: u64 = 0x0DE5_0F0E_90C8_5EED;
pub(super) const STREAM_AUGMENT: u64 = 0xA5A5_C20B_5A11_0001;
pub(super) const STREAM_MASKS: u64 = 0x1B07_3A5C_0000_0002;
pub(super) const STREAM_SUPERVISED: u64 = 0x5EB7_1CED_0000_0003;

/// A generator for item `index` of stream `stream` under `seed`.
pub(super) fn stream_rng(seed: u64, stream: u64, index: u64) -> Xoshiro256PlusPlus {
    Xoshiro256PlusPlus::seed_from_u64(mix64(mix64(seed ^ stream).wrapping_add(mix64(index))))
}

/// Uniform in [a, b) (or [b, a)), also for an empty range, where it returns `a`.
pub(super) fn uniform(rng: &mut Xoshiro256PlusPlus, a: f64, b: f64) -> f64 {
    a + (b - a) * rng.random::<f64>()
}

/// Bernoulli trial; `p` ≥ 1 always succeeds, `p` ≤ 0 never does.
pub(super) fn chance(rng: &mut Xoshiro256PlusPlus, p: f32) -> bool {
    rng.random::<f32>() < p
}

// ---------------------------------------------------------------------------------------------
// Augmentation.

/// The crops of one image: two global crops, then the local crops.
#[derive(Debug, Clone, PartialEq)]
pub struct Crops {
    /// The two global crops (`global_size`²).
    pub globals: Vec<RgbImage>,
    /// The local crops (`local_size`²).
    pub locals: Vec<RgbImage>,
}

/// Aspect-ratio range of `RandomResizedCrop`.
const CROP_RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);

/// torchvision's `RandomResizedCrop.get_params`: `(x, y, width, height)` of a crop of an
/// image of `width`×`height` covering an area fraction in `scale` with a log-uniform aspect
/// ratio in [3/4, 4/3]; after ten misses, the largest centred crop with a ratio in range.
fn crop_rect(width: u32, height: u32, scale: [f32; 2], rng: &mut Xoshiro256PlusPlus) -> (u32, u32, u32, u32) {
    let area = width as f64 * height as f64;
    let (log_lo, log_hi) = (CROP_RATIO.0.ln(), CROP_RATIO.1.ln());
    for _ in 0..10 {
        let target = area * uniform(rng, scale[0] as f64, scale[1] as f64);
        let ratio = uniform(rng, log_lo, log_hi).exp();
        let w = (target * ratio).sqrt().round();
        let h = (target / ratio).sqrt().round();
        if w >= 1.0 && h >= 1.0 && w <= width as f64 && h <= height as f64 {
            let (w, h) = (w as u32, h as u32);
            let y = rng.random_range(0..=height - h);
            let x = rng.random_range(0..=width - w);
            return (x, y, w, h);
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < CROP_RATIO.0 {
        (width, ((width as f64 / CROP_RATIO.0).round() as u32).clamp(1, height))
    } else if in_ratio > CROP_RATIO.1 {
        (((height as f64 * CROP_RATIO.1).round() as u32).clamp(1, width), height)
    } else {
        (width, height)
    };
    ((width - w) / 2, (height - h) / 2, w, h)
}

/// A random resized crop of side `size` (bicubic resampling, antialiased when shrinking).
fn random_resized_crop(image: &RgbImage, size: u32, scale: [f32; 2], rng: &mut Xoshiro256PlusPlus) -> RgbImage {
    let (width, height) = image.dimensions();
    if width == 0 || height == 0 {
        return RgbImage::new(size, size);
    }
    let (x, y, w, h) = crop_rect(width, height, scale, rng);
    let view = imageops::crop_imm(image, x, y, w, h);
    imageops::resize(&*view, size, size, FilterType::CatmullRom)
}

/// Flip, and for overhead imagery rotation and vertical flip.
fn geometric(crop: &mut RgbImage, cfg: &MultiCropConfig, rng: &mut Xoshiro256PlusPlus) {
    if chance(rng, cfg.hflip) {
        imageops::flip_horizontal_in_place(crop);
    }
    if cfg.overhead {
        match rng.random_range(0..4u32) {
            1 => *crop = imageops::rotate90(crop),
            2 => imageops::rotate180_in_place(crop),
            3 => *crop = imageops::rotate270(crop),
            _ => {}
        }
        if chance(rng, 0.5) {
            imageops::flip_vertical_in_place(crop);
        }
    }
}

/// A view of `image` for supervised training: a random resized crop of side `size` covering a
/// fraction `scale` of the area, a horizontal flip, and for overhead imagery random 90°
/// rotations and vertical flips. Seeded by `(seed, index)`, like the multi-crop views.
pub fn train_view(image: &RgbImage, size: u32, scale: [f32; 2], overhead: bool, seed: u64, index: u64) -> RgbImage {
    let mut rng = stream_rng(seed, STREAM_SUPERVISED, index);
    let mut crop = random_resized_crop(image, size.max(1), scale, &mut rng);
    let cfg = MultiCropConfig { hflip: 0.5, overhead, ..MultiCropConfig::default() };
    geometric(&mut crop, &cfg, &mut rng);
    crop
}

/// ITU-R 601 luma of an RGB triple (same scale as the input).
#[inline(always)]
fn luma(r: f32, g: f32, b: f32) -> f32 {
    0.299 * r + 0.587 * g + 0.114 * b
}

/// Rotates the hue of an RGB pixel (values in 0..=255) by `shift6` sixths of a turn,
/// `shift6` in [0, 6), through HSV; grays are unchanged.
#[inline]
fn rotate_hue(px: &mut [f32], shift6: f32) {
    let (r, g, b) = (px[0], px[1], px[2]);
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let c = max - min;
    if c <= 0.0 {
        return;
    }
    let mut h = if max == r {
        (g - b) / c
    } else if max == g {
        (b - r) / c + 2.0
    } else {
        (r - g) / c + 4.0
    };
    // h is in [-1, 5] and shift6 in [0, 6): one wrap brings the sum into [0, 6).
    h += shift6;
    if h < 0.0 {
        h += 6.0;
    } else if h >= 6.0 {
        h -= 6.0;
    }
    let sector = (h as u32).min(5);
    let f = h - sector as f32;
    // Within a sector one channel is max, one min and one moves linearly between them.
    let (rise, fall) = (min + c * f, max - c * f);
    let (nr, ng, nb) = match sector {
        0 => (max, rise, min),
        1 => (fall, max, min),
        2 => (min, max, rise),
        3 => (min, fall, max),
        4 => (rise, min, max),
        _ => (max, min, fall),
    };
    px[0] = nr;
    px[1] = ng;
    px[2] = nb;
}

/// Draws a jitter factor in [max(0, 1 - amount), 1 + amount]; `None` when `amount` is 0.
fn jitter_factor(rng: &mut Xoshiro256PlusPlus, amount: f32) -> Option<f32> {
    (amount > 0.0).then(|| uniform(rng, (1.0 - amount as f64).max(0.0), 1.0 + amount as f64) as f32)
}

/// torchvision's `ColorJitter`: brightness, contrast, saturation and hue in a random order,
/// each clamping to the valid range, computed in `f32` and rounded once at the end.
fn color_jitter(img: &mut RgbImage, cfg: &MultiCropConfig, rng: &mut Xoshiro256PlusPlus) {
    let mut order = [0u8, 1, 2, 3];
    shuffle(&mut order, rng);
    let brightness = jitter_factor(rng, cfg.brightness);
    let contrast = jitter_factor(rng, cfg.contrast);
    let saturation = jitter_factor(rng, cfg.saturation);
    let hue = (cfg.hue > 0.0).then(|| uniform(rng, -cfg.hue as f64, cfg.hue as f64) as f32);

    let mut buf: Vec<f32> = img.as_raw().iter().map(|&v| v as f32).collect();
    if buf.is_empty() {
        return;
    }
    for op in order {
        match op {
            0 => {
                if let Some(f) = brightness {
                    buf.iter_mut().for_each(|v| *v = (*v * f).min(255.0));
                }
            }
            1 => {
                if let Some(f) = contrast {
                    let sum: f64 = buf.chunks_exact(3).map(|p| luma(p[0], p[1], p[2]) as f64).sum();
                    let mean = (sum / (buf.len() / 3) as f64) as f32;
                    let base = mean * (1.0 - f);
                    buf.iter_mut().for_each(|v| *v = (base + f * *v).clamp(0.0, 255.0));
                }
            }
            2 => {
                if let Some(f) = saturation {
                    for p in buf.chunks_exact_mut(3) {
                        let base = luma(p[0], p[1], p[2]) * (1.0 - f);
                        for v in p {
                            *v = (base + f * *v).clamp(0.0, 255.0);
                        }
                    }
                }
            }
            _ => {
                if let Some(shift) = hue.filter(|&s| s != 0.0) {
                    let shift6 = (shift * 6.0).rem_euclid(6.0);
                    buf.chunks_exact_mut(3).for_each(|p| rotate_hue(p, shift6));
                }
            }
        }
    }
    for (out, v) in img.iter_mut().zip(&buf) {
        *out = (v + 0.5) as u8; // values are clamped to [0, 255]: this rounds
    }
}

/// Grayscale (ITU-R 601 luma, as PIL's `convert("L")`) kept as three equal channels.
fn grayscale(img: &mut RgbImage) {
    for p in img.pixels_mut() {
        let [r, g, b] = p.0.map(u32::from);
        let l = ((r * 299 + g * 587 + b * 114 + 500) / 1000) as u8;
        p.0 = [l; 3];
    }
}

/// Inverts every channel value ≥ 128 (torchvision's `RandomSolarize(threshold=128)`).
fn solarize(img: &mut RgbImage) {
    for v in img.iter_mut() {
        if *v >= 128 {
            *v = 255 - *v;
        }
    }
}

/// Reorders the bands of every pixel: output band `c` is input band `order[c]`.
fn reorder_bands(img: &mut RgbImage, order: [usize; 3]) {
    for px in img.pixels_mut() {
        let p = px.0;
        px.0 = [p[order[0]], p[order[1]], p[order[2]]];
    }
}

/// The five band orders other than the identity.
const BAND_ORDERS: [[usize; 3]; 5] = [[0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]];

/// Band shuffle (when enabled), colour jitter, grayscale, blur (probability `blur_p`) and
/// solarisation (`solarize_p`).
fn photometric(crop: &mut RgbImage, cfg: &MultiCropConfig, blur_p: f32, solarize_p: f32, rng: &mut Xoshiro256PlusPlus) {
    // Draws nothing when off, so runs without it see the random stream they always saw.
    if cfg.band_shuffle > 0.0 && chance(rng, cfg.band_shuffle) {
        reorder_bands(crop, BAND_ORDERS[rng.random_range(0..BAND_ORDERS.len())]);
    }
    if chance(rng, cfg.color_jitter) {
        color_jitter(crop, cfg, rng);
    }
    if chance(rng, cfg.grayscale) {
        grayscale(crop);
    }
    if chance(rng, blur_p) {
        let sigma = uniform(rng, cfg.blur_sigma[0] as f64, cfg.blur_sigma[1] as f64) as f32;
        // σ is defined for 224 px crops; scale it with the crop.
        let sigma = (sigma * crop.width() as f32 / 224.0).max(1e-3);
        if crop.width() > 0 && crop.height() > 0 && sigma.is_finite() {
            *crop = imageops::blur(crop, sigma);
        }
    }
    if solarize_p > 0.0 && chance(rng, solarize_p) {
        solarize(crop);
    }
}

/// The DINOv2 multi-crop augmentation of one image (see the [module documentation](super)); `cfg`
/// should be valid ([`MultiCropConfig::validate`]). Fully determined by the image, `cfg` and
/// the state of `rng`.
pub fn augment(image: &RgbImage, cfg: &MultiCropConfig, rng: &mut Xoshiro256PlusPlus) -> Crops {
    let global_size = cfg.global_size.max(1);
    let local_size = cfg.local_size.max(1);
    let globals = (0..2)
        .map(|k| {
            let mut crop = random_resized_crop(image, global_size, cfg.global_scale, rng);
            geometric(&mut crop, cfg, rng);
            let solarize_p = if k == 1 { cfg.solarize } else { 0.0 };
            photometric(&mut crop, cfg, cfg.blur_global[k], solarize_p, rng);
            crop
        })
        .collect();
    let locals = (0..cfg.local_crops)
        .map(|_| {
            let mut crop = random_resized_crop(image, local_size, cfg.local_scale, rng);
            geometric(&mut crop, cfg, rng);
            photometric(&mut crop, cfg, cfg.blur_local, 0.0, rng);
            crop
        })
        .collect();
    Crops { globals, locals }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{procedural, rng, small_crops};
    use super::*;
    use crate::data::ImageSource;
    use image::Rgb;

    #[test]
    fn crop_rect_is_inside_and_follows_scale() {
        let mut r = rng(1);
        for (w, h) in [(48, 48), (200, 120), (33, 90), (1, 1), (3, 7)] {
            for _ in 0..200 {
                let (x, y, cw, ch) = crop_rect(w, h, [0.05, 0.32], &mut r);
                assert!(cw >= 1 && ch >= 1 && x + cw <= w && y + ch <= h, "{w}x{h}");
            }
        }
        // On a square image the ten attempts essentially always succeed.
        for _ in 0..200 {
            let (_, _, cw, ch) = crop_rect(400, 400, [0.32, 1.0], &mut r);
            let frac = (cw * ch) as f64 / 160_000.0;
            assert!((0.30..=1.0).contains(&frac), "{frac}");
            let ratio = cw as f64 / ch as f64;
            assert!((0.74..=1.35).contains(&ratio), "{ratio}");
        }
        // A very wide image cannot fit the ratio range: centre crop with ratio 4/3.
        let (x, y, cw, ch) = crop_rect(1000, 10, [1.0, 1.0], &mut r);
        assert_eq!((x, y, cw, ch), ((1000 - 13) / 2, 0, 13, 10));
        let (x, y, cw, ch) = crop_rect(10, 1000, [1.0, 1.0], &mut r);
        assert_eq!((x, y, cw, ch), (0, (1000 - 13) / 2, 10, 13));
    }

    #[test]
    fn augment_shapes_and_determinism() {
        let img = procedural(1).load(0).unwrap();
        for overhead in [false, true] {
            let cfg = MultiCropConfig { overhead, ..small_crops() };
            let a = augment(&img, &cfg, &mut rng(5));
            assert_eq!(a.globals.len(), 2);
            assert_eq!(a.locals.len(), 3);
            assert!(a.globals.iter().all(|c| c.dimensions() == (32, 32)));
            assert!(a.locals.iter().all(|c| c.dimensions() == (16, 16)));
            assert_eq!(a, augment(&img, &cfg, &mut rng(5)));
            assert_ne!(a, augment(&img, &cfg, &mut rng(6)));
        }
        // Non-square crops sizes (rotations must not swap them) and tiny inputs.
        let cfg = MultiCropConfig { overhead: true, ..small_crops() };
        let tiny = RgbImage::from_pixel(1, 3, Rgb([9, 99, 199]));
        let mut r = rng(2);
        for _ in 0..20 {
            let c = augment(&tiny, &cfg, &mut r);
            assert!(c.globals.iter().all(|c| c.dimensions() == (32, 32)));
        }
    }

    #[test]
    fn overhead_rotates_crops() {
        // An asymmetric image: with overhead the crops take all eight orientations.
        let img = RgbImage::from_fn(32, 32, |x, y| Rgb([(x * 8) as u8, (y * 8) as u8, 0]));
        let cfg = MultiCropConfig {
            global_scale: [1.0, 1.0],
            color_jitter: 0.0,
            grayscale: 0.0,
            blur_global: [0.0, 0.0],
            solarize: 0.0,
            local_crops: 0,
            overhead: true,
            ..small_crops()
        };
        let mut seen = std::collections::HashSet::new();
        let mut r = rng(3);
        for _ in 0..100 {
            for c in augment(&img, &cfg, &mut r).globals {
                // Two adjacent corners identify the orientation.
                seen.insert((c.get_pixel(0, 0).0, c.get_pixel(31, 0).0));
            }
        }
        assert_eq!(seen.len(), 8, "{seen:?}");
    }

    #[test]
    fn band_shuffle_reorders_each_views_bands() {
        // Distinct band values everywhere: a view's band order is readable from any pixel.
        let img = RgbImage::from_pixel(32, 32, Rgb([200, 100, 30]));
        let plain =
            MultiCropConfig { color_jitter: 0.0, grayscale: 0.0, blur_global: [0.0, 0.0], blur_local: 0.0, solarize: 0.0, ..small_crops() };
        let shuffled = MultiCropConfig { band_shuffle: 1.0, ..plain.clone() };
        let mut orders = std::collections::HashSet::new();
        let mut r = rng(5);
        for _ in 0..40 {
            let crops = augment(&img, &shuffled, &mut r);
            for c in crops.globals.iter().chain(&crops.locals) {
                let p = c.get_pixel(3, 3).0;
                let mut sorted = p;
                sorted.sort_unstable();
                assert_eq!(sorted, [30, 100, 200], "the bands are reordered, not changed");
                assert!(c.pixels().all(|q| q.0 == p), "one order per view");
                orders.insert(p);
            }
        }
        // Every order but the original one.
        assert_eq!(orders.len(), 5, "{orders:?}");
        assert!(!orders.contains(&[200, 100, 30]));
        // Off (the default), every view keeps the image's band order.
        let off = augment(&img, &plain, &mut rng(9));
        assert!(off.globals.iter().chain(&off.locals).all(|c| c.get_pixel(3, 3).0 == [200, 100, 30]));
    }

    #[test]
    fn colour_operations() {
        let img = RgbImage::from_fn(16, 16, |x, y| Rgb([(x * 16) as u8, (y * 16) as u8, 77]));
        // Jitter with no strength is the identity, whatever the order.
        let none = MultiCropConfig { brightness: 0.0, contrast: 0.0, saturation: 0.0, hue: 0.0, ..small_crops() };
        let mut c = img.clone();
        color_jitter(&mut c, &none, &mut rng(1));
        assert_eq!(c, img);

        let mut g = img.clone();
        grayscale(&mut g);
        assert!(g.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]));
        assert_eq!(g.get_pixel(15, 15).0[0], ((240 * 299 + 240 * 587 + 77 * 114 + 500) / 1000) as u8);

        let mut s = img.clone();
        solarize(&mut s);
        assert_eq!(s.get_pixel(8, 0).0, [127, 0, 77]);
        assert_eq!(s.get_pixel(7, 15).0, [112, 15, 77]);

        // Hue: a sixth of a turn takes red to yellow, a third to green; round trips; grays stay.
        let mut px = [255.0, 0.0, 0.0];
        rotate_hue(&mut px, 1.0);
        assert_eq!(px, [255.0, 255.0, 0.0]);
        rotate_hue(&mut px, 1.0);
        assert_eq!(px, [0.0, 255.0, 0.0]);
        rotate_hue(&mut px, 4.0);
        assert_eq!(px, [255.0, 0.0, 0.0]);
        let mut px = [200.0, 120.0, 40.0];
        rotate_hue(&mut px, 0.6);
        rotate_hue(&mut px, 5.4);
        assert!(px.iter().zip([200.0, 120.0, 40.0]).all(|(a, b)| (a - b).abs() < 1e-3), "{px:?}");
        let mut gray = [90.0, 90.0, 90.0];
        rotate_hue(&mut gray, 2.5);
        assert_eq!(gray, [90.0; 3]);

        // Full jitter stays in range and changes the image.
        let mut j = img.clone();
        let strong = MultiCropConfig { brightness: 0.8, contrast: 0.8, saturation: 0.8, hue: 0.5, ..small_crops() };
        color_jitter(&mut j, &strong, &mut rng(4));
        assert_ne!(j, img);
    }
}
