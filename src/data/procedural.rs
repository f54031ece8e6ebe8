//! A procedurally generated satellite-like domain: overhead tiles of five scene classes, fully
//! deterministic from a seed, with no downloaded data.
//!
//! Tiles are drawn in resolution-independent tile coordinates (`u`, `v` in [0, 1]), so the same
//! seed gives the same scene at any size; only the per-pixel sensor noise depends on pixels.

use std::f32::consts::PI;
use std::path::Path;

use image::RgbImage;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use rayon::prelude::*;

use super::DataError;
use super::folder::ImageList;

/// The scene classes of the procedural domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SceneClass {
    Fields,
    Forest,
    Water,
    Roads,
    Roofs,
}

impl SceneClass {
    /// All classes, in [`SceneClass::index`] order. Note that ImageFolder labels follow the
    /// sorted folder names instead (fields, forest, roads, roofs, water).
    pub const ALL: [SceneClass; 5] = [SceneClass::Fields, SceneClass::Forest, SceneClass::Water, SceneClass::Roads, SceneClass::Roofs];

    /// Lower-case name, used as folder name.
    pub fn name(self) -> &'static str {
        match self {
            SceneClass::Fields => "fields",
            SceneClass::Forest => "forest",
            SceneClass::Water => "water",
            SceneClass::Roads => "roads",
            SceneClass::Roofs => "roofs",
        }
    }

    /// Position in [`SceneClass::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Inverse of [`SceneClass::index`].
    pub fn from_index(i: usize) -> Option<SceneClass> {
        Self::ALL.get(i).copied()
    }

    /// Inverse of [`SceneClass::name`].
    pub fn from_name(name: &str) -> Option<SceneClass> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }
}

impl std::fmt::Display for SceneClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

// ---------------------------------------------------------------------------------------------
// Small numeric helpers: hashing, value noise, colours. Everything per pixel is kept cheap
// (no libm calls, table lookups instead of per-pixel hashing) so that a 64×64 tile takes a
// small fraction of a millisecond.

use super::rng::mix64;

#[inline]
fn hash2(x: i32, y: i32, seed: u32) -> u32 {
    let mut h = (x as u32).wrapping_mul(0x8DA6_B343) ^ (y as u32).wrapping_mul(0xD816_3841) ^ seed.wrapping_mul(0xCB1A_B31F);
    h ^= h >> 15;
    h = h.wrapping_mul(0x2C1B_3C6D);
    h ^= h >> 12;
    h = h.wrapping_mul(0x297A_2D39);
    h ^ (h >> 15)
}

/// Uniform in [0, 1) from a lattice point.
#[inline]
fn hash_f(x: i32, y: i32, seed: u32) -> f32 {
    (hash2(x, y, seed) >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// `floor(x)` as an integer for |x| < 2^22, branch-free and without a libm call (`f32::floor`
/// is one on baseline x86-64).
#[inline(always)]
fn ifloor(x: f32) -> i32 {
    // Adding 1.5·2^23 leaves round(x) in the low mantissa bits.
    let r = (x + 12_582_912.0).to_bits() as i32 - 0x4B40_0000;
    r - ((r as f32) > x) as i32
}

/// Fractional part in [0, 1).
#[inline(always)]
fn fract(x: f32) -> f32 {
    x - ifloor(x) as f32
}

/// A cheap periodic wave, close to `sin(2πt)` (parabolic approximation).
#[inline(always)]
fn wave(t: f32) -> f32 {
    let x = 2.0 * fract(t) - 1.0;
    -4.0 * x * (1.0 - x.abs())
}

/// A fixed random permutation of 0..=255, repeated twice (classic Perlin-style lattice hash).
static PERM: [u8; 512] = {
    let mut p = [0u8; 512];
    let mut i = 0;
    while i < 256 {
        p[i] = i as u8;
        i += 1;
    }
    let mut state: u64 = 0x2545_F491_4F6C_DD1D;
    let mut k = 255;
    while k > 0 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let j = (state % (k as u64 + 1)) as usize;
        let t = p[k];
        p[k] = p[j];
        p[j] = t;
        k -= 1;
    }
    let mut i = 0;
    while i < 256 {
        p[256 + i] = p[i];
        i += 1;
    }
    p
};

/// Lattice value noise with smoothstep interpolation; the seed picks an offset into the
/// (256-periodic) lattice and a value scramble.
#[derive(Clone, Copy)]
struct Noise {
    ox: i32,
    oy: i32,
    scramble: u8,
}

impl Noise {
    fn new(rng: &mut Xoshiro256PlusPlus) -> Self {
        let r = rng.random::<u32>();
        Noise { ox: (r & 0xFF) as i32, oy: ((r >> 8) & 0xFF) as i32, scramble: (r >> 16) as u8 }
    }

    /// Value noise in [0, 1].
    #[inline]
    fn value(&self, x: f32, y: f32) -> f32 {
        let (x0, y0) = (ifloor(x), ifloor(y));
        let (fx, fy) = (x - x0 as f32, y - y0 as f32);
        let ix = ((x0 + self.ox) & 255) as usize;
        let iy = ((y0 + self.oy) & 255) as usize;
        let row0 = PERM[ix] as usize + iy;
        let row1 = PERM[(ix + 1) & 511] as usize + iy;
        let at = |k: usize| (PERM[k & 511] ^ self.scramble) as f32;
        let (a, b) = (at(row0), at(row1));
        let (c, d) = (at(row0 + 1), at(row1 + 1));
        let sx = fx * fx * (3.0 - 2.0 * fx);
        let sy = fy * fy * (3.0 - 2.0 * fy);
        let top = a + (b - a) * sx;
        let bottom = c + (d - c) * sx;
        (top + (bottom - top) * sy) * (1.0 / 255.0)
    }

    /// Fractal sum of `octaves` octaves (gain 0.5, lacunarity 2), normalised to [0, 1].
    fn fbm(&self, x: f32, y: f32, octaves: u32) -> f32 {
        let (mut sum, mut amp, mut norm) = (0.0, 1.0, 0.0);
        let (mut x, mut y) = (x, y);
        for o in 0..octaves {
            sum += amp * self.value(x + o as f32 * 17.31, y - o as f32 * 9.73);
            norm += amp;
            amp *= 0.5;
            // Rotate between octaves to hide lattice alignment.
            let (nx, ny) = (1.6 * x + 1.2 * y, -1.2 * x + 1.6 * y);
            x = nx;
            y = ny;
        }
        sum / norm
    }
}

/// A smooth layer sampled on a lattice over the tile just fine enough for its highest
/// frequency, then read back with bilinear interpolation (much cheaper than per-pixel fbm).
struct Grid {
    n: usize,
    scale: f32,
    data: Vec<f32>,
}

impl Grid {
    /// `noise.fbm(u * freq, v * freq, octaves)` over the unit tile.
    fn fbm(size: u32, noise: Noise, freq: f32, octaves: u32) -> Grid {
        let top = freq * (1u32 << (octaves.max(1) - 1)) as f32;
        let n = ((top * 2.5) as usize + 3).min(size as usize + 1).max(2);
        let scale = (n - 1) as f32;
        let mut data = Vec::with_capacity(n * n);
        for j in 0..n {
            for i in 0..n {
                let (u, v) = (i as f32 / scale, j as f32 / scale);
                data.push(noise.fbm(u * freq, v * freq, octaves));
            }
        }
        Grid { n, scale, data }
    }

    /// Bilinear read at tile coordinates in [0, 1].
    #[inline]
    fn at(&self, u: f32, v: f32) -> f32 {
        let (x, y) = (u * self.scale, v * self.scale);
        let i = (x as usize).min(self.n - 2);
        let j = (y as usize).min(self.n - 2);
        let (fx, fy) = (x - i as f32, y - j as f32);
        let k = j * self.n + i;
        let row = &self.data[k..k + self.n + 2];
        let top = row[0] + (row[1] - row[0]) * fx;
        let bottom = row[self.n] + (row[self.n + 1] - row[self.n]) * fx;
        top + (bottom - top) * fy
    }
}

type Col = [f32; 3];

#[inline]
fn mix(a: Col, b: Col, t: f32) -> Col {
    [a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, a[2] + (b[2] - a[2]) * t]
}

#[inline]
fn scale(a: Col, s: f32) -> Col {
    [a[0] * s, a[1] * s, a[2] * s]
}

#[inline]
fn smoothstep(e0: f32, e1: f32, x: f32) -> f32 {
    let t = ((x - e0) / (e1 - e0)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// Coverage of an edge at signed distance `d` (negative inside) for a pixel of size `px`.
#[inline]
fn coverage(d: f32, px: f32) -> f32 {
    (0.5 - d / px).clamp(0.0, 1.0)
}

/// `base` with each channel multiplied by a random factor in [1 - amount, 1 + amount].
fn jitter(rng: &mut Xoshiro256PlusPlus, base: Col, amount: f32) -> Col {
    let g = rng.random_range(1.0 - amount..1.0 + amount);
    base.map(|c| c * g * rng.random_range(1.0 - amount * 0.5..1.0 + amount * 0.5))
}

fn pick<T: Copy>(rng: &mut Xoshiro256PlusPlus, items: &[T]) -> T {
    items[rng.random_range(0..items.len())]
}

/// Rotation of centred tile coordinates by `angle`: returns (along, across).
#[derive(Clone, Copy)]
struct Frame {
    cos: f32,
    sin: f32,
}

impl Frame {
    fn new(angle: f32) -> Self {
        Frame { cos: angle.cos(), sin: angle.sin() }
    }

    #[inline]
    fn apply(&self, x: f32, y: f32) -> (f32, f32) {
        (x * self.cos + y * self.sin, -x * self.sin + y * self.cos)
    }
}

/// Sensor-like finishing applied to every tile: gain, colour cast, haze and pixel noise.
struct Post {
    /// Per-channel `out = c * gain + offset`, with haze folded in, in 0..=255 units.
    gain: Col,
    offset: Col,
    noise_amp: f32,
    noise_seed: u32,
}

impl Post {
    fn new(rng: &mut Xoshiro256PlusPlus, noise_amp: f32) -> Self {
        let g = rng.random_range(0.9..1.1);
        let gain = [g * rng.random_range(0.96..1.04), g, g * rng.random_range(0.96..1.04)];
        let haze = if rng.random_bool(0.3) { rng.random_range(0.0..0.15) } else { 0.0 };
        let haze_col: Col = [0.62, 0.66, 0.72];
        Post {
            gain: gain.map(|g| g * (1.0 - haze) * 255.0),
            offset: haze_col.map(|h| h * haze * 255.0 + 0.5),
            noise_amp: noise_amp * 255.0,
            noise_seed: rng.random::<u32>(),
        }
    }

    #[inline]
    fn finish(&self, c: Col, x: u32, y: u32, out: &mut [u8]) {
        let n = (hash_f(x as i32, y as i32, self.noise_seed) - 0.5) * 2.0 * self.noise_amp;
        for i in 0..3 {
            out[i] = (c[i] * self.gain[i] + self.offset[i] + n).clamp(0.0, 255.0) as u8;
        }
    }
}

/// Renders a `size`×`size` tile from a shader over tile coordinates (`u`, `v`, pixel size).
fn render(size: u32, post: &Post, shade: impl Fn(f32, f32, f32) -> Col) -> RgbImage {
    let size = size.max(1);
    let px = 1.0 / size as f32;
    let mut buf = vec![0u8; 3 * size as usize * size as usize];
    for (y, row) in buf.chunks_exact_mut(3 * size as usize).enumerate() {
        let v = (y as f32 + 0.5) * px;
        for (x, out) in row.chunks_exact_mut(3).enumerate() {
            let u = (x as f32 + 0.5) * px;
            post.finish(shade(u, v, px), x as u32, y as u32, out);
        }
    }
    RgbImage::from_raw(size, size, buf).expect("buffer matches the dimensions")
}

// ---------------------------------------------------------------------------------------------
// Scene classes.

/// Generates one tile of `class`, deterministic for (`class`, `seed`, `size`).
pub fn generate_tile(class: SceneClass, seed: u64, size: u32) -> RgbImage {
    let salt = 0xA076_1D64_78BD_642F_u64.wrapping_mul(class.index() as u64 + 1);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(mix64(seed ^ salt));
    match class {
        SceneClass::Fields => fields(&mut rng, size),
        SceneClass::Forest => forest(&mut rng, size),
        SceneClass::Water => water(&mut rng, size),
        SceneClass::Roads => roads(&mut rng, size),
        SceneClass::Roofs => roofs(&mut rng, size),
    }
}

struct Parcel {
    end: f32,
    color: Col,
    /// Crop-row frequency (cycles per tile unit) and amplitude; amplitude 0 means no rows.
    rows_freq: f32,
    rows_amp: f32,
    rows_across: bool,
}

struct Strip {
    end: f32,
    parcels: Vec<Parcel>,
}

/// Parallel strips cut into rectangular parcels of crops and soil, at a random angle.
fn fields(rng: &mut Xoshiro256PlusPlus, size: u32) -> RgbImage {
    const PALETTE: [Col; 7] = [
        [0.30, 0.44, 0.18], // green crop
        [0.45, 0.56, 0.27], // light green
        [0.76, 0.68, 0.40], // ripe/yellow
        [0.56, 0.44, 0.31], // bare soil
        [0.40, 0.31, 0.23], // ploughed
        [0.80, 0.76, 0.58], // straw
        [0.36, 0.50, 0.24], // pasture
    ];
    let frame = Frame::new(rng.random_range(0.0..PI));
    let narrow = rng.random_range(0.07..0.14);
    let wide = narrow * rng.random_range(1.3..2.5);
    // Regional preference: bias the palette towards a few entries.
    let favourites: [usize; 3] = std::array::from_fn(|_| rng.random_range(0..PALETTE.len()));
    let mut strips = Vec::new();
    let mut b = -0.75 + rng.random_range(-0.1..0.0);
    while b < 0.75 {
        b += rng.random_range(narrow..wide);
        let mut parcels = Vec::new();
        let mut a = -0.75 + rng.random_range(-0.3..0.0);
        while a < 0.75 {
            a += rng.random_range(0.12..0.8);
            let idx = if rng.random_bool(0.6) { pick(rng, &favourites) } else { rng.random_range(0..PALETTE.len()) };
            let rows = rng.random_bool(0.6);
            parcels.push(Parcel {
                end: a,
                color: jitter(rng, PALETTE[idx], 0.08),
                rows_freq: rng.random_range(14.0..30.0),
                rows_amp: if rows { rng.random_range(0.04..0.12) } else { 0.0 },
                rows_across: rng.random_bool(0.8),
            });
        }
        strips.push(Strip { end: b, parcels });
    }
    let border_col = if rng.random_bool(0.5) {
        [0.20, 0.30, 0.14] // hedgerow
    } else {
        [0.66, 0.62, 0.52] // dirt track
    };
    let border_w = if rng.random_bool(0.7) { rng.random_range(0.004..0.012) } else { 0.0 };
    let wobble = Grid::fbm(size, Noise::new(rng), 3.0, 1);
    let moisture = Grid::fbm(size, Noise::new(rng), 4.0, 2);
    let detail = Noise::new(rng);
    let post = Post::new(rng, 0.025);

    render(size, &post, |u, v, px| {
        let (a, b) = frame.apply(u - 0.5, v - 0.5);
        let b = b + (wobble.at(u, v) - 0.5) * 0.015;
        let si = strips.partition_point(|s| s.end <= b).min(strips.len() - 1);
        let strip = &strips[si];
        let pi = strip.parcels.partition_point(|p| p.end <= a).min(strip.parcels.len() - 1);
        let parcel = &strip.parcels[pi];
        let mut c = parcel.color;
        if parcel.rows_amp > 0.0 {
            let t = if parcel.rows_across { b } else { a };
            c = scale(c, 1.0 + parcel.rows_amp * wave(t * parcel.rows_freq));
        }
        let n = 0.6 * moisture.at(u, v) + 0.4 * detail.value(u * 24.0, v * 24.0);
        c = scale(c, 0.86 + 0.28 * n);
        if border_w > 0.0 {
            let strip_start = if si == 0 { -1.0 } else { strips[si - 1].end };
            let parcel_start = if pi == 0 { -1.0 } else { strip.parcels[pi - 1].end };
            let d = (b - strip_start).min(strip.end - b).min((a - parcel_start).min(parcel.end - a) * 2.0);
            let k = coverage(d - border_w * 0.5, px);
            c = mix(c, border_col, k * 0.8);
        }
        c
    })
}

/// A tree crown: centre (cell units), 1/radius and a tint in [0, 1].
#[derive(Clone, Copy)]
struct Crown {
    x: f32,
    y: f32,
    inv_r: f32,
    tint: f32,
}

/// Dense canopy of shaded tree crowns over dark gaps.
fn forest(rng: &mut Xoshiro256PlusPlus, size: u32) -> RgbImage {
    let conifer = rng.random_bool(0.4);
    let cells: f32 = if conifer { rng.random_range(12.0..20.0) } else { rng.random_range(7.0..13.0) };
    let base = if conifer { jitter(rng, [0.10, 0.19, 0.09], 0.12) } else { jitter(rng, [0.15, 0.26, 0.10], 0.12) };
    let alt = jitter(rng, [0.20, 0.27, 0.12], 0.15); // olive/brownish patches
    let gap = [0.03, 0.06, 0.03];
    let sun = rng.random_range(0.0..2.0 * PI);
    let (lx, ly) = (sun.cos(), sun.sin());
    // One crown per cell, jittered; the table has a one-cell margin around the tile.
    let seed = rng.random::<u32>();
    let stride = cells as usize + 3;
    let mut crowns = Vec::with_capacity(stride * stride);
    for j in -1..stride as i32 - 1 {
        for i in -1..stride as i32 - 1 {
            let h = hash2(i, j, seed);
            let byte = |k: u32| ((h >> k) & 0xFF) as f32 / 255.0;
            crowns.push(Crown {
                x: i as f32 + 0.1 + 0.8 * byte(0),
                y: j as f32 + 0.1 + 0.8 * byte(8),
                inv_r: 1.0 / (0.55 + 0.35 * byte(16)),
                tint: byte(24),
            });
        }
    }
    let patch_scale = rng.random_range(2.0..4.0);
    let patches = Grid::fbm(size, Noise::new(rng), patch_scale, 2);
    let detail = Noise::new(rng);
    let post = Post::new(rng, 0.02);

    render(size, &post, |u, v, _px| {
        let (x, y) = (u * cells, v * cells);
        let (cx, cy) = (ifloor(x) as usize, ifloor(y) as usize); // table index of the cell - 1
        // Nearest crown in normalised distance among the 3x3 neighbouring cells.
        let mut best = f32::MAX;
        let mut best_crown = crowns[0];
        let mut best_d = (0.0f32, 0.0f32);
        for j in 0..3 {
            let row = (cy + j).min(stride - 1) * stride;
            for i in 0..3 {
                let cr = crowns[row + (cx + i).min(stride - 1)];
                let dx = (x - cr.x) * cr.inv_r;
                let dy = (y - cr.y) * cr.inv_r;
                let d = dx * dx + dy * dy;
                if d < best {
                    best = d;
                    best_d = (dx, dy);
                    best_crown = cr;
                }
            }
        }
        let patch = smoothstep(0.45, 0.75, patches.at(u, v));
        let mut crown_col = mix(base, alt, patch * 0.7);
        let tint = best_crown.tint;
        crown_col = scale(crown_col, 0.8 + 0.4 * tint);
        crown_col[0] *= 0.9 + 0.2 * (1.0 - tint);
        let leaf = detail.value(u * cells * 2.5, v * cells * 2.5);
        if best < 1.0 {
            let height = 1.0 - best;
            let lit = -(best_d.0 * lx + best_d.1 * ly); // facing the sun
            let shade = (0.45 + 0.55 * height + 0.35 * lit).clamp(0.25, 1.4);
            let c = scale(crown_col, shade * (0.8 + 0.4 * leaf));
            mix(gap, c, smoothstep(1.0, 0.8, best))
        } else {
            scale(gap, 0.8 + 0.5 * leaf)
        }
    })
}

/// Smooth blue-ish water with faint ripples, sometimes with a shoreline and land.
fn water(rng: &mut Xoshiro256PlusPlus, size: u32) -> RgbImage {
    let deep = pick(
        rng,
        &[
            [0.05, 0.12, 0.24], // navy
            [0.07, 0.20, 0.28], // teal
            [0.10, 0.19, 0.34], // blue
            [0.11, 0.21, 0.24], // murky
        ],
    );
    let deep = jitter(rng, deep, 0.12);
    let light = mix(deep, [0.25, 0.42, 0.50], rng.random_range(0.15..0.45));
    let grad = Frame::new(rng.random_range(0.0..2.0 * PI));
    let ripple = Frame::new(rng.random_range(0.0..PI));
    let ripple_freq = rng.random_range(25.0..45.0);
    let ripple_amp = rng.random_range(0.01..0.03);
    let shore = rng.random_bool(0.45);
    let shore_frame = Frame::new(rng.random_range(0.0..2.0 * PI));
    let shore_offset = rng.random_range(0.1..0.4);
    let beach = rng.random_range(0.008..0.03);
    let sand = jitter(rng, [0.74, 0.69, 0.54], 0.08);
    let land_a = jitter(rng, [0.30, 0.38, 0.20], 0.12);
    let land_b = jitter(rng, [0.46, 0.43, 0.31], 0.12);
    let shallow = jitter(rng, [0.22, 0.40, 0.42], 0.1);
    let warp = Grid::fbm(size, Noise::new(rng), 3.0, 2);
    let land_noise = Noise::new(rng);
    let land = shore.then(|| Grid::fbm(size, land_noise, 5.0, 2));
    let detail = Noise::new(rng);
    let post = Post::new(rng, 0.012);

    render(size, &post, |u, v, px| {
        let (cu, cv) = (u - 0.5, v - 0.5);
        let (g, _) = grad.apply(cu, cv);
        let w = warp.at(u, v);
        let mut c = mix(deep, light, (g + 0.7) * 0.7 * (0.7 + 0.6 * w));
        let (ra, _) = ripple.apply(cu, cv);
        c = scale(c, 1.0 + ripple_amp * wave(ra * ripple_freq + w * 2.0));
        if let Some(land) = &land {
            let (s, _) = shore_frame.apply(cu, cv);
            let s = s - shore_offset + (w - 0.5) * 0.2;
            if s > -0.08 {
                // Shallows lighten towards the coast.
                c = mix(c, shallow, smoothstep(-0.08, 0.0, s) * 0.7);
                let n = 0.75 * land.at(u, v) + 0.25 * detail.value(u * 20.0, v * 20.0);
                let ground = mix(land_a, land_b, smoothstep(0.35, 0.65, n));
                let ground = scale(ground, 0.85 + 0.3 * n);
                let ground = mix(ground, sand, coverage(s - beach, px));
                c = mix(c, ground, coverage(-s, px));
            }
        }
        c
    })
}

struct Road {
    origin: (f32, f32),
    frame: Frame,
    bend: f32,
    half_width: f32,
    color: Col,
    centre_line: bool,
}

impl Road {
    /// Approximate distance from the road's centre curve, and the position along it.
    #[inline]
    fn distance(&self, u: f32, v: f32) -> (f32, f32) {
        let (s, t) = self.frame.apply(u - self.origin.0, v - self.origin.1);
        let slope = 2.0 * self.bend * s;
        let d = (t - self.bend * s * s).abs() / (1.0 + slope * slope).sqrt();
        (d, s)
    }
}

/// Land with one or more grey roads, straight or curved, sometimes crossing.
fn roads(rng: &mut Xoshiro256PlusPlus, size: u32) -> RgbImage {
    let grass = jitter(rng, [0.34, 0.42, 0.24], 0.1);
    let dry = jitter(rng, [0.55, 0.52, 0.38], 0.1);
    let soil = jitter(rng, [0.50, 0.42, 0.32], 0.1);
    let tree = [0.12, 0.20, 0.09];
    let count = match rng.random_range(0..20) {
        0..10 => 1,
        10..17 => 2,
        _ => 3,
    };
    let asphalt = rng.random_range(0.34..0.52);
    let mut list: Vec<Road> = Vec::new();
    for i in 0..count {
        let angle;
        let origin;
        if i > 0 && rng.random_bool(0.7) {
            // Cross the main road near the middle of the tile: an intersection.
            let main = &list[0];
            let along = rng.random_range(-0.2..0.2);
            origin = (main.origin.0 + along * main.frame.cos, main.origin.1 + along * main.frame.sin);
            angle = main.frame.sin.atan2(main.frame.cos) + PI / 2.0 + rng.random_range(-0.4..0.4);
        } else {
            angle = rng.random_range(0.0..PI);
            origin = (rng.random_range(0.25..0.75), rng.random_range(0.25..0.75));
        }
        let half_width = if i == 0 { rng.random_range(0.02..0.045) } else { rng.random_range(0.014..0.035) };
        let grey = asphalt * rng.random_range(0.9..1.1);
        list.push(Road {
            origin,
            frame: Frame::new(angle),
            bend: if rng.random_bool(0.5) { rng.random_range(-1.5..1.5) } else { 0.0 },
            half_width,
            color: [grey * 0.98, grey, grey * 1.03],
            centre_line: half_width > 0.025 && rng.random_bool(0.7),
        });
    }
    let verge = jitter(rng, [0.58, 0.55, 0.46], 0.08);
    let verge_w = rng.random_range(0.006..0.02);
    let tree_density = rng.random_range(0.0..0.14);
    let cover = Grid::fbm(size, Noise::new(rng), 4.0, 2);
    let soil_patches = Grid::fbm(size, Noise::new(rng), 8.0, 1);
    let trees = Grid::fbm(size, Noise::new(rng), 9.0, 2);
    let grain = Noise::new(rng);
    let post = Post::new(rng, 0.025);

    render(size, &post, |u, v, px| {
        let g = grain.value(u * 40.0, v * 40.0);
        let mut c = mix(grass, dry, smoothstep(0.35, 0.7, cover.at(u, v)));
        c = mix(c, soil, smoothstep(0.6, 0.8, soil_patches.at(u, v)) * 0.7);
        c = scale(c, 0.88 + 0.24 * g);
        let t = trees.at(u, v) + (g - 0.5) * 0.08;
        c = mix(c, tree, smoothstep(0.74 - tree_density, 0.8 - tree_density, t) * 0.85);
        for r in &list {
            let (d, s) = r.distance(u, v);
            let outer = r.half_width + verge_w;
            if d > outer + px {
                continue;
            }
            c = mix(c, verge, coverage(d - outer, px) * 0.6);
            let mut rc = scale(r.color, 0.95 + 0.1 * g);
            if r.centre_line && fract(s * 25.0) < 0.55 {
                rc = mix(rc, [0.9, 0.9, 0.86], coverage(d - 0.003, px) * 0.8);
            }
            c = mix(c, rc, coverage(d - r.half_width, px));
        }
        c
    })
}

#[derive(Clone, Copy)]
struct House {
    centre: (f32, f32),
    frame: Frame,
    half: (f32, f32),
    color: Col,
    gable: bool,
}

impl House {
    /// Signed distance to the footprint (cell units, negative inside) and whether the point
    /// lies on the roof half whose slope faces the direction `towards`.
    #[inline]
    fn sdf(&self, x: f32, y: f32, towards: (f32, f32)) -> (f32, bool) {
        let (a, b) = self.frame.apply(x - self.centre.0, y - self.centre.1);
        let d = (a.abs() - self.half.0).max(b.abs() - self.half.1);
        // The ridge runs along the longer side; each half slopes away from it.
        let (axis, t) =
            if self.half.0 >= self.half.1 { ((-self.frame.sin, self.frame.cos), b) } else { ((self.frame.cos, self.frame.sin), a) };
        let facing = t.signum() * (axis.0 * towards.0 + axis.1 * towards.1) > 0.0;
        (d, facing)
    }
}

/// A grid-ish suburb: small rotated roofs with shadows over a grey-green background.
fn roofs(rng: &mut Xoshiro256PlusPlus, size: u32) -> RgbImage {
    const ROOF: [Col; 6] = [
        [0.62, 0.30, 0.22], // terracotta
        [0.46, 0.23, 0.19], // dark red-brown
        [0.27, 0.28, 0.30], // dark grey
        [0.52, 0.52, 0.54], // mid grey
        [0.86, 0.86, 0.84], // white
        [0.56, 0.46, 0.39], // brownish
    ];
    let weights: [f32; 6] = std::array::from_fn(|_| rng.random_range(0.1..1.0f32).powi(2));
    let total: f32 = weights.iter().sum();
    let grid = Frame::new(rng.random_range(0.0..PI));
    let cell = rng.random_range(0.09..0.15);
    let aspect = rng.random_range(1.0..1.4);
    let (cell_a, cell_b) = (cell * aspect, cell);
    let street = if rng.random_bool(0.6) { rng.random_range(0.15..0.3) } else { 0.0 };
    let occupancy = rng.random_range(0.7..0.95);
    let sun = rng.random_range(0.0..2.0 * PI);
    let shadow_len = rng.random_range(0.06..0.14);
    let shadow = (sun.cos() * shadow_len, sun.sin() * shadow_len);
    let sun_dir = (-sun.cos(), -sun.sin()); // towards the sun, opposite to the shadows
    let lawn = jitter(rng, [0.34, 0.43, 0.27], 0.1);
    let paved = jitter(rng, [0.50, 0.50, 0.47], 0.08);
    let ground = mix(lawn, paved, rng.random_range(0.1..0.6));
    let street_col = jitter(rng, [0.42, 0.42, 0.43], 0.08);
    let tree = [0.13, 0.22, 0.10];
    let tree_level = rng.random_range(0.66..0.8);

    // Houses of every grid cell that can touch the tile (rotated tile radius < 0.71).
    let houses_seed = rng.random::<u32>();
    let (i0, j0) = (ifloor(-0.75 / cell_a) - 1, ifloor(-0.75 / cell_b) - 1);
    let (ni, nj) = ((2 - 2 * i0) as usize, (2 - 2 * j0) as usize);
    let mut houses: Vec<Option<House>> = Vec::with_capacity(ni * nj);
    for j in j0..j0 + nj as i32 {
        for i in i0..i0 + ni as i32 {
            let r = |k: u32| hash_f(i, j, houses_seed.wrapping_add(k.wrapping_mul(0x9E37_79B9)));
            if r(0) > occupancy {
                houses.push(None);
                continue;
            }
            let top = 1.0 - street;
            let half = (0.22 + 0.14 * r(1), (0.18 + 0.12 * r(2)).min(top * 0.42));
            let mut w = r(3) * total;
            let mut idx = 0;
            while idx < ROOF.len() - 1 && w > weights[idx] {
                w -= weights[idx];
                idx += 1;
            }
            houses.push(Some(House {
                centre: (i as f32 + 0.5 + (r(5) - 0.5) * 0.1, j as f32 + street + top * 0.5 + (r(6) - 0.5) * 0.08),
                frame: Frame::new((r(7) - 0.5) * 0.2),
                half,
                color: scale(ROOF[idx], 0.88 + 0.24 * r(4)),
                gable: idx != 4 && r(8) < 0.8,
            }));
        }
    }
    let house_at = |i: i32, j: i32| -> Option<&House> {
        let (a, b) = ((i - i0) as usize, (j - j0) as usize);
        if a < ni && b < nj { houses[b * ni + a].as_ref() } else { None }
    };
    let ground_noise = Grid::fbm(size, Noise::new(rng), 6.0, 2);
    let trees = Grid::fbm(size, Noise::new(rng), 12.0, 1);
    let detail = Noise::new(rng);
    let post = Post::new(rng, 0.025);

    render(size, &post, |u, v, px| {
        let (a, b) = grid.apply(u - 0.5, v - 0.5);
        let (x, y) = (a / cell_a, b / cell_b);
        let (i, j) = (ifloor(x), ifloor(y));
        let px_cell = px / cell_b;
        let g = detail.value(u * 24.0, v * 24.0);
        let n = 0.7 * ground_noise.at(u, v) + 0.3 * g;
        let mut c = scale(ground, 0.85 + 0.3 * n);
        if street > 0.0 {
            let fy = y - j as f32;
            c = mix(c, street_col, coverage(fy - street, px_cell));
        }
        let t = trees.at(u, v) + (g - 0.5) * 0.15;
        c = mix(c, tree, smoothstep(tree_level, tree_level + 0.06, t) * 0.85);
        // Shadow: the shifted point falls inside a house (checked in its own cell).
        let (sx, sy) = (x - shadow.0, y - shadow.1);
        if let Some(hs) = house_at(ifloor(sx), ifloor(sy)) {
            let (d, _) = hs.sdf(sx, sy, sun_dir);
            c = scale(c, 1.0 - 0.5 * coverage(d, px_cell));
        }
        if let Some(h) = house_at(i, j) {
            let (d, sunny) = h.sdf(x, y, sun_dir);
            if d < px_cell {
                let mut rc = h.color;
                if h.gable {
                    rc = scale(rc, if sunny { 1.12 } else { 0.78 });
                } else if d > -0.04 {
                    rc = scale(rc, 0.85); // flat roof: a slightly darker parapet
                }
                c = mix(c, rc, coverage(d, px_cell));
            }
        }
        c
    })
}

// ---------------------------------------------------------------------------------------------
// Datasets.

/// Writes `per_class` PNG tiles per class as `dir/<class>/<class>_<i>.png` (ImageFolder layout)
/// and returns the scan of `dir` (which includes any other images already there).
pub fn generate_image_folder(dir: &Path, per_class: usize, size: u32, seed: u64) -> Result<ImageList, DataError> {
    generate_shifted_image_folder(dir, per_class, size, seed, Shift::Source)
}

/// [`generate_image_folder`] with the tiles seen through `shift`.
pub fn generate_shifted_image_folder(dir: &Path, per_class: usize, size: u32, seed: u64, shift: Shift) -> Result<ImageList, DataError> {
    for class in SceneClass::ALL {
        let sub = dir.join(class.name());
        std::fs::create_dir_all(&sub).map_err(|e| DataError::io(&sub, e))?;
    }
    let jobs: Vec<(SceneClass, usize)> = SceneClass::ALL.into_iter().flat_map(|c| (0..per_class).map(move |i| (c, i))).collect();
    jobs.into_par_iter().try_for_each(|(class, i)| {
        let tile_seed = mix64(seed ^ mix64(i as u64));
        let img = shift.apply(generate_tile(class, tile_seed, size), tile_seed);
        let path = dir.join(class.name()).join(format!("{}_{i}.png", class.name()));
        img.save(&path).map_err(|e| match e {
            image::ImageError::IoError(source) => DataError::Io { path, source },
            other => DataError::Encode { path, reason: other.to_string() },
        })
    })?;
    ImageList::scan(dir)
}

/// [`generate_shifted_image_folder`] once per folder: a `.complete` marker written after the
/// last tile makes a later call (a resumed run, a repeated pipeline) reuse the tiles, and a
/// folder cut short by a crash is generated again.
pub fn ensure_shifted_image_folder(dir: &Path, per_class: usize, size: u32, seed: u64, shift: Shift) -> Result<(), DataError> {
    let marker = dir.join(".complete");
    if !marker.exists() {
        generate_shifted_image_folder(dir, per_class, size, seed, shift)?;
        std::fs::write(&marker, "").map_err(|e| DataError::io(&marker, e))?;
    }
    Ok(())
}

/// Which sensors a procedural tile is seen through. `Source` is the domain as drawn: one
/// sensor, true colours. `Target` is the shift the default run adapts to, the kind satellite
/// users meet when they pool imagery from many sensors and seasons: every tile comes from its
/// own sensor with its own band order and colour response (so colour says little about the
/// class and the scene's structure has to), seen through haze at half the ground resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shift {
    #[default]
    Source,
    Target,
}

impl Shift {
    pub fn name(self) -> &'static str {
        match self {
            Shift::Source => "source",
            Shift::Target => "target",
        }
    }

    /// The tile as this domain's sensor for tile `seed` sees it.
    pub fn apply(self, tile: RgbImage, seed: u64) -> RgbImage {
        match self {
            Shift::Source => tile,
            Shift::Target => target_sensor(tile, seed),
        }
    }
}

/// One target sensor (seeded per tile): 2×2 box-averaged (half the ground resolution, shown at
/// the same pixel size), bands permuted and mixed towards their mean with per-band gains, and
/// haze.
fn target_sensor(tile: RgbImage, seed: u64) -> RgbImage {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(mix64(seed ^ 0x5E45_0A11));
    let mut order = [0usize, 1, 2];
    for k in (1..3).rev() {
        order.swap(k, rng.random_range(0..=k));
    }
    let purity: f32 = rng.random_range(0.45..0.85);
    let gain: [f32; 3] = std::array::from_fn(|_| rng.random_range(0.7..1.3));
    let haze: f32 = rng.random_range(0.1..0.3);
    const HAZE_COLOUR: [f32; 3] = [200.0, 196.0, 186.0];
    let (w, h) = tile.dimensions();
    let mut out = RgbImage::new(w, h);
    for y in 0..h {
        for x in 0..w {
            let (x0, y0) = (x & !1, y & !1);
            let mut mean = [0f32; 3];
            let mut count = 0.0;
            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                if x0 + dx < w && y0 + dy < h {
                    let p = tile.get_pixel(x0 + dx, y0 + dy).0;
                    for c in 0..3 {
                        mean[c] += p[c] as f32;
                    }
                    count += 1.0;
                }
            }
            let band = mean.map(|v| v / count);
            let grey = (band[0] + band[1] + band[2]) / 3.0;
            let pixel: [u8; 3] = std::array::from_fn(|c| {
                let v = (purity * band[order[c]] + (1.0 - purity) * grey) * gain[c];
                (v * (1.0 - haze) + HAZE_COLOUR[c] * haze).round().clamp(0.0, 255.0) as u8
            });
            out.put_pixel(x, y, image::Rgb(pixel));
        }
    }
    out
}

/// An endless, deterministic stream of labelled procedural tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProceduralDomain {
    pub size: u32,
    pub seed: u64,
    /// The sensor the tiles are seen through.
    pub shift: Shift,
}

impl ProceduralDomain {
    /// The class of sample `index`: every block of 5 consecutive indices holds each class once,
    /// in a seed-dependent shuffled order.
    pub fn class_of(&self, index: u64) -> SceneClass {
        let n = SceneClass::ALL.len() as u64;
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(mix64(self.seed ^ 0x5EED_C1A5) ^ mix64(index / n));
        let mut order = SceneClass::ALL;
        for k in (1..order.len()).rev() {
            let j = rng.random_range(0..=k);
            order.swap(k, j);
        }
        order[(index % n) as usize]
    }

    /// Sample `index` of the stream: a tile and its class.
    pub fn sample(&self, index: u64) -> (RgbImage, SceneClass) {
        let class = self.class_of(index);
        let tile_seed = mix64(self.seed.wrapping_add(mix64(index)));
        (self.shift.apply(generate_tile(class, tile_seed, self.size), tile_seed), class)
    }

    /// Samples `start..start + count`, generated in parallel.
    pub fn batch(&self, start: u64, count: usize) -> Vec<(RgbImage, SceneClass)> {
        (0..count as u64).into_par_iter().map(|k| self.sample(start + k)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mean_rgb(img: &RgbImage) -> [f64; 3] {
        let mut s = [0.0f64; 3];
        for p in img.pixels() {
            for (acc, &v) in s.iter_mut().zip(&p.0) {
                *acc += v as f64;
            }
        }
        let n = (img.width() * img.height()) as f64;
        s.map(|v| v / n)
    }

    fn class_mean(class: SceneClass, seeds: std::ops::Range<u64>) -> [f64; 3] {
        let n = (seeds.end - seeds.start) as f64;
        let mut acc = [0.0; 3];
        for s in seeds {
            let m = mean_rgb(&generate_tile(class, s, 48));
            for c in 0..3 {
                acc[c] += m[c] / n;
            }
        }
        acc
    }

    /// Mean absolute difference of horizontally adjacent pixels (a texture measure).
    fn roughness(img: &RgbImage) -> f64 {
        let mut sum = 0.0;
        let mut n = 0.0;
        for y in 0..img.height() {
            for x in 1..img.width() {
                let a = img.get_pixel(x - 1, y).0;
                let b = img.get_pixel(x, y).0;
                for c in 0..3 {
                    sum += (a[c] as f64 - b[c] as f64).abs();
                }
                n += 3.0;
            }
        }
        sum / n
    }

    #[test]
    fn names_and_indices() {
        let names: Vec<_> = SceneClass::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names, ["fields", "forest", "water", "roads", "roofs"]);
        for (i, c) in SceneClass::ALL.into_iter().enumerate() {
            assert_eq!(c.index(), i);
            assert_eq!(SceneClass::from_index(i), Some(c));
            assert_eq!(SceneClass::from_name(c.name()), Some(c));
            assert_eq!(c.to_string(), c.name());
        }
        assert_eq!(SceneClass::from_index(5), None);
    }

    #[test]
    fn tiles_are_deterministic_and_seed_dependent() {
        for class in SceneClass::ALL {
            let a = generate_tile(class, 42, 64);
            assert_eq!(a.dimensions(), (64, 64));
            assert_eq!(a, generate_tile(class, 42, 64), "{class}");
            assert_ne!(a, generate_tile(class, 43, 64), "{class}");
            // Not a flat image.
            assert!(roughness(&a) > 0.5, "{class} is flat");
            // Odd and tiny sizes work.
            assert_eq!(generate_tile(class, 1, 17).dimensions(), (17, 17));
            assert_eq!(generate_tile(class, 1, 1).dimensions(), (1, 1));
        }
        // Same class and seed but different classes give different images.
        assert_ne!(generate_tile(SceneClass::Fields, 7, 32), generate_tile(SceneClass::Roofs, 7, 32));
    }

    #[test]
    fn scene_is_resolution_independent() {
        // The same seed at two sizes shows the same scene: downscaled means agree closely.
        for class in SceneClass::ALL {
            let big = mean_rgb(&generate_tile(class, 9, 128));
            let small = mean_rgb(&generate_tile(class, 9, 64));
            for c in 0..3 {
                assert!((big[c] - small[c]).abs() < 8.0, "{class}: {big:?} vs {small:?}");
            }
        }
    }

    #[test]
    fn classes_are_statistically_distinct() {
        let seeds = 0..12;
        let fields = class_mean(SceneClass::Fields, seeds.clone());
        let forest = class_mean(SceneClass::Forest, seeds.clone());
        let water = class_mean(SceneClass::Water, seeds.clone());
        let roads = class_mean(SceneClass::Roads, seeds.clone());
        let roofs = class_mean(SceneClass::Roofs, seeds);
        let lum = |m: [f64; 3]| (m[0] + m[1] + m[2]) / 3.0;
        // Water is the bluest: blue above red, and bluer than forest and fields.
        assert!(water[2] > water[0] + 20.0, "{water:?}");
        assert!(water[2] > forest[2] + 20.0, "{water:?} vs {forest:?}");
        assert!(water[2] > fields[2], "{water:?} vs {fields:?}");
        // Forest is dark and green.
        assert!(lum(forest) + 30.0 < lum(roofs), "{forest:?} vs {roofs:?}");
        assert!(lum(forest) + 30.0 < lum(fields), "{forest:?} vs {fields:?}");
        assert!(forest[1] > forest[0] && forest[1] > forest[2], "{forest:?}");
        // Fields are warmer (more red relative to blue) than water.
        assert!(fields[0] - fields[2] > water[0] - water[2] + 30.0);
        // Roads tiles hold grey asphalt: closer to neutral than fields on average.
        assert!(lum(roads) > lum(forest) + 20.0, "{roads:?}");
    }

    #[test]
    fn texture_differs_between_water_and_roofs() {
        let avg = |class: SceneClass| (0..8).map(|s| roughness(&generate_tile(class, s, 64))).sum::<f64>() / 8.0;
        let water = avg(SceneClass::Water);
        let roofs = avg(SceneClass::Roofs);
        let forest = avg(SceneClass::Forest);
        assert!(water < roofs, "water {water} roofs {roofs}");
        assert!(water < forest, "water {water} forest {forest}");
    }

    #[test]
    fn domain_stream_is_deterministic_and_balanced() {
        let d = ProceduralDomain { size: 32, seed: 5, shift: Shift::Source };
        let mut counts = [0usize; 5];
        for i in 0..100 {
            counts[d.class_of(i).index()] += 1;
        }
        assert_eq!(counts, [20; 5]);
        let (a, ca) = d.sample(17);
        let (b, cb) = d.sample(17);
        assert_eq!((a.clone(), ca), (b, cb));
        assert_eq!(a.dimensions(), (32, 32));
        assert_ne!(a, d.sample(18).0);
        let other = ProceduralDomain { size: 32, seed: 6, shift: Shift::Source };
        let classes: Vec<_> = (0..20).map(|i| d.class_of(i)).collect();
        let other_classes: Vec<_> = (0..20).map(|i| other.class_of(i)).collect();
        assert_ne!(classes, other_classes);
        let batch = d.batch(15, 4);
        assert_eq!(batch.len(), 4);
        assert_eq!(batch[2], d.sample(17));
    }

    #[test]
    fn the_target_shift_changes_colour_and_resolution_but_not_the_scene() {
        let source = ProceduralDomain { size: 32, seed: 5, shift: Shift::Source };
        let target = ProceduralDomain { shift: Shift::Target, ..source };
        let (a, ca) = source.sample(3);
        let (b, cb) = target.sample(3);
        assert_eq!(ca, cb, "the same scene, seen by another sensor");
        assert_eq!(a.dimensions(), b.dimensions());
        assert_eq!(b, target.sample(3).0, "deterministic");
        // Half the ground resolution: every 2×2 block of the target tile is one colour.
        assert_eq!(b.get_pixel(4, 6), b.get_pixel(5, 7));
        // Sensors differ from tile to tile: the mean colour of forest varies far more.
        let mean = |img: &RgbImage| -> [f64; 3] {
            let n = img.pixels().len() as f64;
            std::array::from_fn(|c| img.pixels().map(|p| p.0[c] as f64).sum::<f64>() / n)
        };
        let spread = |d: &ProceduralDomain| {
            let forests: Vec<[f64; 3]> = (0..60).filter(|&i| d.class_of(i) == SceneClass::Forest).map(|i| mean(&d.sample(i).0)).collect();
            let green_minus_red: Vec<f64> = forests.iter().map(|m| m[1] - m[0]).collect();
            let avg = green_minus_red.iter().sum::<f64>() / green_minus_red.len() as f64;
            (green_minus_red.iter().map(|v| (v - avg).powi(2)).sum::<f64>() / green_minus_red.len() as f64).sqrt()
        };
        assert!(spread(&target) > 2.0 * spread(&source), "target {} source {}", spread(&target), spread(&source));
    }

    #[test]
    fn image_folder_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let list = generate_image_folder(dir.path(), 3, 24, 11).unwrap();
        assert_eq!(list.classes, ["fields", "forest", "roads", "roofs", "water"]);
        assert_eq!(list.len(), 15);
        assert!(dir.path().join("water/water_2.png").is_file());
        for item in &list.items {
            let label = item.label.unwrap();
            let class_dir = item.path.parent().unwrap().file_name().unwrap();
            assert_eq!(class_dir.to_str().unwrap(), list.classes[label]);
            let img = super::super::decode_rgb(&item.path).unwrap();
            assert_eq!(img.dimensions(), (24, 24));
        }
        // Deterministic: a second run writes identical files.
        let dir2 = tempfile::tempdir().unwrap();
        generate_image_folder(dir2.path(), 3, 24, 11).unwrap();
        let a = std::fs::read(dir.path().join("roofs/roofs_1.png")).unwrap();
        let b = std::fs::read(dir2.path().join("roofs/roofs_1.png")).unwrap();
        assert_eq!(a, b);
    }
}
