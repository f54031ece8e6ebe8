//! Labelled figures (confusion matrix, line chart) drawn into [`RgbImage`]s,
//! with text rasterised by `ab_glyph` from the font file egui ships (no window, no egui).
//! Everything is clipped to the image: no input makes these functions panic.

use ab_glyph::{Font, FontRef, GlyphId, PxScale, ScaleFont, point};
use image::{Rgb, RgbImage};

const WHITE: [u8; 3] = [255, 255, 255];
const BLACK: [u8; 3] = [0, 0, 0];
const GREY: [u8; 3] = [90, 90, 90];
const LIGHT: [u8; 3] = [225, 225, 225];

/// Text drawn with the Ubuntu-Light font (the file egui ships, rasterised here by `ab_glyph`),
/// alpha-blended.
pub struct Painter {
    font: FontRef<'static>,
}

impl Default for Painter {
    fn default() -> Self {
        Self::new()
    }
}

/// One glyph placed on a line whose top is y = 0.
struct Placed {
    id: GlyphId,
    x: f32,
}

impl Painter {
    pub fn new() -> Self {
        Self { font: FontRef::try_from_slice(epaint_default_fonts::UBUNTU_LIGHT).expect("the shipped font parses") }
    }

    fn scale(size: f32) -> PxScale {
        let size = if size.is_finite() { size.clamp(1.0, 256.0) } else { 14.0 };
        PxScale::from(size * 1.2)
    }

    /// Glyphs of `text` on one line (with kerning) and the line's width.
    fn layout(&self, text: &str, size: f32) -> (Vec<Placed>, f32) {
        let font = self.font.as_scaled(Self::scale(size));
        let mut caret = 0.0;
        let mut previous: Option<GlyphId> = None;
        let mut glyphs = Vec::with_capacity(text.len());
        for c in text.chars().filter(|c| !c.is_control()) {
            let id = font.glyph_id(c);
            if let Some(p) = previous {
                caret += font.kern(p, id);
            }
            glyphs.push(Placed { id, x: caret });
            caret += font.h_advance(id);
            previous = Some(id);
        }
        (glyphs, caret)
    }

    /// Draws `text` with its top-left at (x, y), `size` px high, in `color`; returns the drawn width in px.
    pub fn text(&mut self, img: &mut RgbImage, x: i32, y: i32, text: &str, size: f32, color: [u8; 3]) -> u32 {
        self.draw(img, x, y, text, size, color, false)
    }

    /// Same, rotated 90° counter-clockwise (reads bottom-to-top), with the baseline start at (x, y) — for column labels.
    /// Returns the drawn length (vertical extent) in px.
    pub fn text_vertical(&mut self, img: &mut RgbImage, x: i32, y: i32, text: &str, size: f32, color: [u8; 3]) -> u32 {
        self.draw(img, x, y, text, size, color, true)
    }

    /// (width, height) in px of `text` laid out at `size` (height = line height).
    pub fn measure(&mut self, text: &str, size: f32) -> (u32, u32) {
        let (_, width) = self.layout(text, size);
        let height = self.font.as_scaled(Self::scale(size)).height();
        (width.ceil().max(0.0) as u32, height.ceil().max(0.0) as u32)
    }

    /// Shortens `text` with "…" until it is at most `max_w` px wide.
    fn fit(&mut self, text: &str, size: f32, max_w: u32) -> String {
        if self.measure(text, size).0 <= max_w {
            return text.to_owned();
        }
        let mut chars: Vec<char> = text.chars().take((max_w as f32 / (size * 0.2)) as usize + 2).collect();
        while !chars.is_empty() {
            chars.pop();
            let s: String = chars.iter().collect::<String>() + "…";
            if self.measure(&s, size).0 <= max_w {
                return s;
            }
        }
        String::new()
    }

    #[allow(clippy::too_many_arguments)]
    fn draw(&mut self, img: &mut RgbImage, x: i32, y: i32, text: &str, size: f32, color: [u8; 3], vertical: bool) -> u32 {
        let scale = Self::scale(size);
        let ascent = self.font.as_scaled(scale).ascent();
        let baseline = ascent.round() as i64;
        let (glyphs, width) = self.layout(text, size);
        let (x, y) = (x as i64, y as i64);
        for g in glyphs {
            let Some(outline) = self.font.outline_glyph(g.id.with_scale_and_position(scale, point(g.x, ascent))) else { continue };
            let bounds = outline.px_bounds();
            let (left, top) = (bounds.min.x.round() as i64, bounds.min.y.round() as i64);
            outline.draw(|u, v, coverage| {
                let (gx, gy) = (left + u as i64, top + v as i64);
                let (px, py) = if vertical { (x + gy - baseline, y - gx - 1) } else { (x + gx, y + gy) };
                blend(img, px, py, color, coverage);
            });
        }
        width.ceil().max(0.0) as u32
    }
}

/// Alpha-blends `color` over pixel (x, y) with coverage `a` (0..=1); out-of-bounds is ignored.
fn blend(img: &mut RgbImage, x: i64, y: i64, color: [u8; 3], a: f32) {
    if a <= 0.0 || x < 0 || y < 0 || x >= img.width() as i64 || y >= img.height() as i64 {
        return;
    }
    let a = a.min(1.0);
    let p = img.get_pixel_mut(x as u32, y as u32);
    for (d, s) in p.0.iter_mut().zip(color) {
        *d = (*d as f32 * (1.0 - a) + s as f32 * a).round() as u8;
    }
}

/// Fills the rectangle [x, x+w) × [y, y+h), clipped to the image.
fn fill_rect(img: &mut RgbImage, x: i64, y: i64, w: i64, h: i64, color: [u8; 3]) {
    let (x0, y0) = (x.max(0), y.max(0));
    let (x1, y1) = ((x + w).min(img.width() as i64), (y + h).min(img.height() as i64));
    for yy in y0..y1 {
        for xx in x0..x1 {
            img.put_pixel(xx as u32, yy as u32, Rgb(color));
        }
    }
}

/// Anti-aliased line segment of the given width, clipped to the image.
fn line(img: &mut RgbImage, (x0, y0): (f32, f32), (x1, y1): (f32, f32), width: f32, color: [u8; 3]) {
    if ![x0, y0, x1, y1].iter().all(|v| v.is_finite() && v.abs() < 1e6) {
        return;
    }
    let r = width / 2.0 + 1.0;
    let bx0 = (x0.min(x1) - r).floor().max(0.0) as i64;
    let by0 = (y0.min(y1) - r).floor().max(0.0) as i64;
    let bx1 = ((x0.max(x1) + r).ceil() as i64).min(img.width() as i64 - 1);
    let by1 = ((y0.max(y1) + r).ceil() as i64).min(img.height() as i64 - 1);
    let (dx, dy) = (x1 - x0, y1 - y0);
    let len2 = dx * dx + dy * dy;
    for py in by0..=by1 {
        for px in bx0..=bx1 {
            let (cx, cy) = (px as f32 + 0.5, py as f32 + 0.5);
            let t = if len2 > 0.0 { (((cx - x0) * dx + (cy - y0) * dy) / len2).clamp(0.0, 1.0) } else { 0.0 };
            let d = ((cx - x0 - t * dx).powi(2) + (cy - y0 - t * dy).powi(2)).sqrt();
            blend(img, px, py, color, (width / 2.0 + 0.5 - d).clamp(0.0, 1.0));
        }
    }
}

/// A small white image with a title and a message (e.g. "no data").
fn message_image(p: &mut Painter, title: &str, msg: &str) -> RgbImage {
    let title = p.fit(title, 16.0, 600);
    let (tw, _) = p.measure(&title, 16.0);
    let (mw, _) = p.measure(msg, 14.0);
    let mut img = RgbImage::from_pixel(tw.max(mw).max(160) + 24, 70, Rgb(WHITE));
    p.text(&mut img, 12, 8, &title, 16.0, BLACK);
    p.text(&mut img, 12, 38, msg, 14.0, GREY);
    img
}

/// White → dark blue ("Blues"-like), for `f` in 0..=1.
fn blues(f: f64) -> [u8; 3] {
    const STOPS: [[f64; 3]; 5] =
        [[255.0, 255.0, 255.0], [198.0, 219.0, 239.0], [107.0, 174.0, 214.0], [33.0, 113.0, 181.0], [8.0, 48.0, 107.0]];
    let t = if f.is_finite() { f.clamp(0.0, 1.0) * 4.0 } else { 0.0 };
    let i = (t.floor() as usize).min(3);
    let k = t - i as f64;
    std::array::from_fn(|c| (STOPS[i][c] * (1.0 - k) + STOPS[i + 1][c] * k).round() as u8)
}

/// A confusion matrix figure: rows = true class, columns = predicted, cell colour by row-normalised
/// fraction (white → dark blue), each cell shows its count (white text on dark cells, black on light),
/// class names on the left (rows) and on top (columns, vertical if they don't fit), axis titles
/// "true class" / "predicted class", a title line at the top, and the per-class recall (%) in a column
/// at the right. Works for 2..=50 classes with long names (EuroSAT: "AnnualCrop", "HerbaceousVegetation",
/// "PermanentCrop", "SeaLake", ...); cell size adapts (min ~14 px) so the image stays under ~1600 px.
/// Missing entries (ragged rows, fewer names than rows) count as 0 / are named by their index.
pub fn confusion_matrix(matrix: &[Vec<u64>], classes: &[String], title: &str) -> RgbImage {
    draw_confusion(matrix, classes, title).0
}

/// The confusion matrix image and its geometry (matrix left, top, cell size) for tests.
fn draw_confusion(matrix: &[Vec<u64>], classes: &[String], title: &str) -> (RgbImage, [i64; 3]) {
    let mut p = Painter::new();
    let n = matrix.len();
    if n == 0 {
        return (message_image(&mut p, title, "no data"), [0; 3]);
    }
    if n > 1500 {
        return (message_image(&mut p, title, &format!("too many classes ({n})")), [0; 3]);
    }
    let get = |i: usize, j: usize| matrix.get(i).and_then(|r| r.get(j)).copied().unwrap_or(0);
    let row_sum: Vec<u64> = (0..n).map(|i| (0..n).fold(0u64, |s, j| s.saturating_add(get(i, j)))).collect();
    let total = row_sum.iter().fold(0u64, |s, &v| s.saturating_add(v));
    let correct = (0..n).fold(0u64, |s, i| s.saturating_add(get(i, i)));

    let cell: i64 = (900 / n as i64).clamp(14, 64).min(1400 / n as i64).max(1);
    let label_size = (cell as f32 - 3.0).min(14.0);
    let show_labels = label_size >= 7.0;
    let names: Vec<String> = (0..n)
        .map(|i| classes.get(i).cloned().unwrap_or_else(|| i.to_string()))
        .map(|s| if show_labels { p.fit(&s, label_size, 200) } else { s })
        .collect();
    let name_w: Vec<u32> = names.iter().map(|s| if show_labels { p.measure(s, label_size).0 } else { 0 }).collect();
    let max_name = name_w.iter().copied().max().unwrap_or(0) as i64;
    let vertical = name_w.iter().any(|&w| w as i64 > cell - 4);

    let (title_size, axis_size, pad) = (18.0, 14.0, 8i64);
    let title = p.fit(title, title_size, 1400);
    let (tw0, th) = p.measure(&title, title_size);
    let th = th as i64;
    let sub = if total > 0 {
        format!("accuracy {:.2}%  ·  {} samples  ·  colour = fraction of the true class", 100.0 * correct as f64 / total as f64, total)
    } else {
        "no samples".to_owned()
    };
    let (sw, sh) = p.measure(&sub, 12.0);
    let sh = sh as i64;
    let ah = p.measure("predicted class", axis_size).1 as i64;
    let col_h = if !show_labels {
        0
    } else if vertical {
        max_name
    } else {
        p.measure("Ag", label_size).1 as i64
    };
    let recall_w = p.measure("recall", axis_size).0.max(p.measure("100.0%", 13.0).0) as i64;

    let mx = pad + ah + 6 + max_name + 8; // matrix left
    let my = pad + th + sh + 10 + ah + 6 + col_h + 6; // matrix top
    let side = cell * n as i64;
    let w = (mx + side + 12 + recall_w + pad).max(2 * pad + tw0.max(sw) as i64);
    let h = my + side + pad;
    let mut img = RgbImage::from_pixel(w.max(1) as u32, h.max(1) as u32, Rgb(WHITE));

    p.text(&mut img, pad as i32, pad as i32, &title, title_size, BLACK);
    p.text(&mut img, pad as i32, (pad + th) as i32, &sub, 12.0, GREY);
    let (pw, _) = p.measure("predicted class", axis_size);
    let atop = pad + th + sh + 10;
    p.text(&mut img, (mx + (side - pw as i64) / 2).max(mx) as i32, atop as i32, "predicted class", axis_size, BLACK);
    let (tw, _) = p.measure("true class", axis_size);
    let asc = (axis_size * 0.78) as i64; // baseline offset of a line of text
    p.text_vertical(&mut img, (pad + asc) as i32, (my + (side + tw as i64) / 2).min(my + side) as i32, "true class", axis_size, BLACK);
    let rh = p.measure("recall", axis_size).1 as i64;
    p.text(&mut img, (mx + side + 12) as i32, (my - 4 - rh) as i32, "recall", axis_size, BLACK);

    let count_size = (cell as f32 * 0.36).clamp(7.0, 15.0);
    for i in 0..n {
        let y = my + i as i64 * cell;
        let x = mx + i as i64 * cell;
        if show_labels {
            let lh = p.measure(&names[i], label_size).1 as i64;
            p.text(&mut img, (mx - 8 - name_w[i] as i64) as i32, (y + (cell - lh) / 2) as i32, &names[i], label_size, BLACK);
            if vertical {
                let bx = x + cell / 2 + (label_size * 0.35) as i64;
                p.text_vertical(&mut img, bx as i32, (my - 6) as i32, &names[i], label_size, BLACK);
            } else {
                p.text(&mut img, (x + (cell - name_w[i] as i64) / 2) as i32, (my - 6 - col_h) as i32, &names[i], label_size, BLACK);
            }
        }
        for j in 0..n {
            let c = get(i, j);
            let f = if row_sum[i] > 0 { c as f64 / row_sum[i] as f64 } else { 0.0 };
            let x = mx + j as i64 * cell;
            let gap = if cell >= 6 { 1 } else { 0 };
            fill_rect(&mut img, x, y, cell - gap, cell - gap, blues(f));
            if c > 0 && cell >= 10 {
                let s = c.to_string();
                let (mut cw, mut ch) = p.measure(&s, count_size);
                let mut fs = count_size;
                if cw as i64 > cell - 3 {
                    fs = count_size * (cell - 3) as f32 / cw as f32;
                    (cw, ch) = p.measure(&s, fs);
                }
                if fs >= 7.0 {
                    let tc = if f > 0.45 { WHITE } else { BLACK };
                    p.text(&mut img, (x + (cell - gap - cw as i64) / 2) as i32, (y + (cell - gap - ch as i64) / 2) as i32, &s, fs, tc);
                }
            }
        }
        if show_labels || cell >= 7 {
            let r = if row_sum[i] > 0 { format!("{:.1}%", 100.0 * get(i, i) as f64 / row_sum[i] as f64) } else { "–".into() };
            let rs = label_size.clamp(6.0, 13.0);
            let (_, rh) = p.measure(&r, rs);
            p.text(&mut img, (mx + side + 12) as i32, (y + (cell - rh as i64) / 2) as i32, &r, rs, GREY);
        }
    }
    for k in [-1, side - 1] {
        fill_rect(&mut img, mx - 1, my + k, side + 1, 1, GREY); // frame
        fill_rect(&mut img, mx + k, my - 1, 1, side + 1, GREY);
    }
    (img, [mx, my, cell])
}

/// Nice axis bounds, about `target` ticks (steps of 1, 2 or 5 × 10^k) covering [lo, hi], and their decimals.
fn axis(lo: f64, hi: f64, target: f64) -> (f64, f64, Vec<f64>, usize) {
    let (lo, hi) = if hi - lo > 1e-12 * lo.abs().max(hi.abs()).max(1e-300) { (lo, hi) } else { (lo - 0.5, hi + 0.5) };
    let raw = (hi - lo) / target;
    let mag = 10f64.powf(raw.log10().floor());
    let r = raw / mag;
    let step = mag
        * if r < 1.5 {
            1.0
        } else if r < 3.5 {
            2.0
        } else if r < 7.5 {
            5.0
        } else {
            10.0
        };
    if !(step.is_finite() && step > 0.0) {
        return (lo, hi, vec![lo, hi], 2);
    }
    let (a, b) = ((lo / step).floor() * step, (hi / step).ceil() * step);
    let ticks: Vec<f64> = (0..=((b - a) / step).round().min(100.0) as usize).map(|k| a + k as f64 * step).collect();
    let decimals = (-step.log10().floor()).clamp(0.0, 8.0) as usize;
    (a, b, ticks, decimals)
}

const PALETTE: [[u8; 3]; 8] =
    [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189], [140, 86, 75], [227, 119, 194], [127, 127, 127]];

/// A small line chart (e.g. validation accuracy per epoch): several named series over x, axes with a few tick labels, legend.
/// Non-finite points are skipped; `width`/`height` are clamped to 160..=4000 px.
pub fn line_chart(series: &[(&str, Vec<(f64, f64)>)], title: &str, x_label: &str, y_label: &str, width: u32, height: u32) -> RgbImage {
    let (w, h) = (width.clamp(160, 4000) as i64, height.clamp(120, 4000) as i64);
    let mut img = RgbImage::from_pixel(w as u32, h as u32, Rgb(WHITE));
    let mut p = Painter::new();
    let (ts, ls, ks) = (16.0, 13.0, 12.0); // title, axis label, tick sizes
    let title = p.fit(title, ts, (w - 16) as u32);
    let (tw, th) = p.measure(&title, ts);
    p.text(&mut img, ((w - tw as i64) / 2).max(8) as i32, 6, &title, ts, BLACK);

    let pts: Vec<Vec<(f64, f64)>> =
        series.iter().map(|(_, v)| v.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect()).collect();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in pts.iter().flatten() {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    let top = 6 + th as i64 + 10;
    if !(x0 <= x1 && (x1 - x0).is_finite() && (y1 - y0).is_finite()) {
        p.text(&mut img, (w / 2 - 25) as i32, (h / 2) as i32, "no data", 14.0, GREY);
        return img;
    }
    let (xa, xb, xt, xd) = axis(x0, x1, 6.0);
    let (ya, yb, yt, yd) = axis(y0, y1, 5.0);
    let ylabels: Vec<String> = yt.iter().map(|v| format!("{v:.yd$}")).collect();
    let ylw = ylabels.iter().map(|s| p.measure(s, ks).0).max().unwrap_or(0) as i64;
    let lh = p.measure("Ag", ls).1 as i64;
    let kh = p.measure("0", ks).1 as i64;

    // legend on the right
    let legend_max = (w / 3) as u32;
    let names: Vec<String> = series.iter().map(|(n, _)| p.fit(n, ks, legend_max.saturating_sub(30))).collect();
    let legend_w = names.iter().map(|s| p.measure(s, ks).0 as i64 + 30).max().unwrap_or(0);
    let (px0, px1) = (8 + lh + 6 + ylw + 6, w - 12 - legend_w);
    let (py0, py1) = (top, h - 8 - lh - 4 - kh - 6);
    if px1 - px0 < 20 || py1 - py0 < 20 {
        p.text(&mut img, 8, top as i32, "too small", 14.0, GREY);
        return img;
    }
    let mapx = |x: f64| px0 as f32 + ((x - xa) / (xb - xa)) as f32 * (px1 - px0) as f32;
    let mapy = |y: f64| py1 as f32 - ((y - ya) / (yb - ya)) as f32 * (py1 - py0) as f32;

    for (v, s) in yt.iter().zip(&ylabels) {
        let y = mapy(*v).round() as i64;
        fill_rect(&mut img, px0, y, px1 - px0, 1, LIGHT);
        let (sw, _) = p.measure(s, ks);
        p.text(&mut img, (px0 - 6 - sw as i64) as i32, (y - kh / 2) as i32, s, ks, GREY);
    }
    let mut last_right = i64::MIN;
    for v in &xt {
        let x = mapx(*v).round() as i64;
        fill_rect(&mut img, x, py0, 1, py1 - py0, LIGHT);
        fill_rect(&mut img, x, py1, 1, 4, GREY);
        let s = format!("{v:.xd$}");
        let (sw, _) = p.measure(&s, ks);
        let lx = x - sw as i64 / 2;
        if lx > last_right + 4 {
            p.text(&mut img, lx as i32, (py1 + 5) as i32, &s, ks, GREY);
            last_right = lx + sw as i64;
        }
    }
    fill_rect(&mut img, px0, py1, px1 - px0 + 1, 1, BLACK);
    fill_rect(&mut img, px0, py0, 1, py1 - py0 + 1, BLACK);
    let (xw, _) = p.measure(x_label, ls);
    p.text(&mut img, ((px0 + px1 - xw as i64) / 2) as i32, (h - 8 - lh) as i32, x_label, ls, BLACK);
    let (yw, _) = p.measure(y_label, ls);
    p.text_vertical(&mut img, (8 + (ls * 0.78) as i64) as i32, ((py0 + py1 + yw as i64) / 2) as i32, y_label, ls, BLACK);

    for (k, (pts, name)) in pts.iter().zip(&names).enumerate() {
        let c = PALETTE[k % PALETTE.len()];
        for s in pts.windows(2) {
            line(&mut img, (mapx(s[0].0), mapy(s[0].1)), (mapx(s[1].0), mapy(s[1].1)), 2.0, c);
        }
        if pts.len() <= 60 {
            for &(x, y) in pts {
                line(&mut img, (mapx(x), mapy(y)), (mapx(x), mapy(y)), 5.0, c);
            }
        }
        let ly = py0 + 4 + k as i64 * (kh + 6);
        line(&mut img, ((px1 + 12) as f32, (ly + kh / 2) as f32), ((px1 + 32) as f32, (ly + kh / 2) as f32), 2.5, c);
        p.text(&mut img, (px1 + 38) as i32, ly as i32, name, ks, BLACK);
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ink(img: &RgbImage) -> Vec<(u32, u32)> {
        img.enumerate_pixels().filter(|p| p.2.0 != WHITE).map(|p| (p.0, p.1)).collect()
    }
    /// Where the tests leave their pictures for a human to look at: $TMPDIR/fig-out (/tmp/fig-out).
    fn out(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join("fig-out");
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }
    fn eurosat() -> Vec<String> {
        let s = "AnnualCrop Forest HerbaceousVegetation Highway Industrial Pasture PermanentCrop Residential River SeaLake";
        s.split(' ').map(String::from).collect()
    }

    #[test]
    fn text_draws_and_measures() {
        let mut p = Painter::new();
        let blank = RgbImage::from_pixel(200, 40, Rgb(WHITE));
        let (mut a, mut b, mut c) = (blank.clone(), blank.clone(), blank.clone());
        assert!(p.text(&mut a, 5, 5, "Hello", 16.0, BLACK) > 10 && ink(&a).len() > 20);
        p.text(&mut b, 5, 5, "World", 16.0, BLACK);
        assert_ne!(a, b);
        assert!(p.measure("Hello world, longer", 14.0).0 > p.measure("Hello", 14.0).0);
        // clipping and odd input never panic
        p.text(&mut b, -50, -5, "clipped ÄÖÜ 日本 🙂", 30.0, BLACK);
        p.text(&mut b, i32::MAX, i32::MIN, "x", f32::NAN, BLACK);
        p.text_vertical(&mut b, 190, 1000, "off", 1e9, BLACK);
        p.text(&mut RgbImage::new(0, 0), 0, 0, "empty", 12.0, BLACK);
        // fill the glyph atlas many times over: it gets cleared, later text still renders the same
        for s in (20..=400).step_by(10) {
            p.text(&mut b, 0, 0, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789", s as f32, WHITE);
        }
        p.text(&mut c, 5, 5, "Hello", 16.0, BLACK);
        assert_eq!(a, c, "same text, same pixels");
    }

    #[test]
    fn vertical_text_is_tall() {
        let mut img = RgbImage::from_pixel(60, 200, Rgb(WHITE));
        Painter::new().text_vertical(&mut img, 30, 190, "HerbaceousVegetation", 14.0, BLACK);
        let ink = ink(&img);
        let (x0, x1) = (ink.iter().map(|p| p.0).min().unwrap(), ink.iter().map(|p| p.0).max().unwrap());
        let (y0, y1) = (ink.iter().map(|p| p.1).min().unwrap(), ink.iter().map(|p| p.1).max().unwrap());
        assert!(y1 - y0 > 3 * (x1 - x0), "bbox {x0}..{x1} × {y0}..{y1}");
        assert!(y1 <= 192 && x0 >= 14 && x1 <= 36, "drawn above the baseline start, ascenders to the left");
    }

    fn cm(n: usize) -> Vec<Vec<u64>> {
        let v = |i: usize, j: usize| {
            if i == j {
                200 + 17 * i as u64
            } else if (i + 2 * j).is_multiple_of(7) {
                (i * j) as u64 % 23
            } else {
                0
            }
        };
        (0..n).map(|i| (0..n).map(|j| v(i, j)).collect()).collect()
    }

    fn check_matrix(m: &[Vec<u64>], names: &[String], path: &std::path::Path) {
        let (img, [mx, my, cell]) = draw_confusion(m, names, "EuroSAT — ResNet-18, validation (epoch 12)");
        img.save(path).unwrap();
        assert!(img.width() < 1600 && img.height() < 1600 && img.width() > 100);
        assert!(ink(&img).len() > 1000 && cell >= 14, "cell {cell}");
        let at = |i: usize, j: usize| img.get_pixel((mx + j as i64 * cell + 2) as u32, (my + i as i64 * cell + 2) as u32).0;
        let (zi, zj) = (0..m.len()).flat_map(|i| (0..m.len()).map(move |j| (i, j))).find(|&(i, j)| m[i][j] == 0).unwrap();
        assert!(at(0, 0).iter().map(|&c| c as u32).sum::<u32>() < 200 && at(0, 0)[2] > at(0, 0)[0], "dark blue diagonal");
        assert_eq!(at(zi, zj), WHITE, "empty cell is white");
    }

    #[test]
    fn confusion_matrices() {
        check_matrix(&cm(3), &["cat".into(), "dog".into(), "bird".into()], &out("confusion3.png"));
        let mut m10 = cm(10);
        (m10[2][5], m10[6][0]) = (180, 90); // heavy confusions: mid-tone cells
        check_matrix(&m10, &eurosat(), &out("confusion10.png"));
        let names: Vec<String> = (0..50).map(|i| format!("{}_{i}", eurosat()[i % 10])).collect();
        check_matrix(&cm(50), &names, &out("confusion50.png"));
    }

    #[test]
    fn degenerate_inputs() {
        let img = confusion_matrix(&[], &[], "empty");
        assert!(img.width() > 0 && !ink(&img).is_empty());
        confusion_matrix(&[vec![0, 0], vec![0, 0]], &[], "zeros");
        confusion_matrix(&[vec![1], vec![2, 3, 4]], &["ü€日本語".into(), "".into(), "extra".into()], "");
        confusion_matrix(&vec![vec![u64::MAX; 3]; 3], &[], "overflow");
        confusion_matrix(&vec![vec![1; 300]; 300], &[], "300");
        line_chart(&[], "", "", "", 0, 0);
        line_chart(&[("nan", vec![(f64::NAN, 1.0), (1.0, f64::INFINITY)])], "t", "x", "y", 300, 200);
        line_chart(&[("one", vec![(1.0, 1.0)]), ("huge", vec![(-1e308, 1e308), (1e308, -1e308)])], "t", "x", "y", 300, 200);
    }

    #[test]
    fn line_chart_draws() {
        let acc = |o: f64| (1..=20).map(|e| (e as f64, 1.0 - 0.5 * (-(e as f64) / (4.0 + o)).exp())).collect::<Vec<_>>();
        let mut val = acc(1.0);
        val[5].1 = f64::NAN;
        let series = [("train accuracy", acc(0.0)), ("val accuracy", val)];
        let img = line_chart(&series, "EuroSAT accuracy per epoch", "epoch", "accuracy", 640, 400);
        assert_eq!(img.dimensions(), (640, 400));
        assert!(ink(&img).len() > 2000);
        img.save(out("line_chart.png")).unwrap();
    }
}
