//! Contact sheets: one picture of the crops of a sample, with their masks.

use image::imageops;
use image::{Rgb, RgbImage};

use super::augment::Crops;

/// Gap between crops on a contact sheet, in pixels.
const SHEET_GAP: u32 = 4;
const SHEET_BACKGROUND: Rgb<u8> = Rgb([24, 24, 24]);
/// Colour masked patches are blended with.
const MASK_TINT: [f32; 3] = [30.0, 90.0, 220.0];

/// A copy of `crop` with the masked patches of a `grid`×`grid` mask darkened and tinted blue.
fn tinted(crop: &RgbImage, mask: &[bool], grid: usize) -> RgbImage {
    let mut out = crop.clone();
    let (w, h) = out.dimensions();
    if grid == 0 || w == 0 || h == 0 {
        return out;
    }
    for (x, y, p) in out.enumerate_pixels_mut() {
        let cell = (y as usize * grid / h as usize) * grid + x as usize * grid / w as usize;
        if mask.get(cell).copied().unwrap_or(false) {
            for (v, t) in p.0.iter_mut().zip(MASK_TINT) {
                *v = (0.35 * *v as f32 + 0.45 * t) as u8;
            }
        }
    }
    out
}

/// One image showing the crops of a sample: the two global crops side by side (with masked
/// patches darkened and tinted blue when `masks` gives the two crops' masks, concatenated,
/// and the grid side — e.g. [`CropBatch::sample_masks`](super::CropBatch::sample_masks) and [`CropBatch::grid`](super::CropBatch::grid)), followed
/// by the local crops at their own size, stacked in columns of the global crops' height.
/// Masks of the wrong length are ignored where they run short.
pub fn contact_sheet(crops: &Crops, masks: Option<(&[bool], usize)>) -> RgbImage {
    let gap = SHEET_GAP;
    let g = crops.globals.iter().map(|c| c.width().max(c.height())).max().unwrap_or(0);
    let l = crops.locals.iter().map(|c| c.width().max(c.height())).max().unwrap_or(0);
    let row = g.max(l).max(1);
    let per_column = if l == 0 { 1 } else { ((row + gap) / (l + gap)).max(1) };
    let columns = crops.locals.len().div_ceil(per_column as usize) as u32;
    let globals_width = crops.globals.len() as u32 * (g + gap);
    let locals_x = gap + globals_width + if columns > 0 && globals_width > 0 { gap } else { 0 };
    let width = locals_x + columns * (l + gap);
    let height = row + 2 * gap;
    let mut sheet = RgbImage::from_pixel(width.max(1), height, SHEET_BACKGROUND);

    for (k, crop) in crops.globals.iter().enumerate() {
        let x = gap + k as u32 * (g + gap);
        match masks {
            Some((m, grid)) if grid > 0 => {
                let n = grid * grid;
                let slice = m.get(k * n..).unwrap_or(&[]);
                let slice = &slice[..slice.len().min(n)];
                imageops::replace(&mut sheet, &tinted(crop, slice, grid), x as i64, gap as i64);
            }
            _ => imageops::replace(&mut sheet, crop, x as i64, gap as i64),
        }
    }
    for (i, crop) in crops.locals.iter().enumerate() {
        let (c, r) = (i as u32 / per_column, i as u32 % per_column);
        let x = locals_x + c * (l + gap);
        let y = gap + r * (l + gap);
        imageops::replace(&mut sheet, crop, x as i64, y as i64);
    }
    sheet
}

#[cfg(test)]
mod tests {
    use super::super::build_batch;
    use super::super::tests::{procedural, small_spec};
    use super::*;
    use crate::data::BatchSpec;

    #[test]
    fn contact_sheet_layout_and_mask_tint() {
        let crops = Crops {
            globals: vec![RgbImage::from_pixel(40, 40, Rgb([200, 200, 200])); 2],
            locals: vec![RgbImage::from_pixel(16, 16, Rgb([100, 150, 50])); 5],
        };
        let sheet = contact_sheet(&crops, None);
        // Two rows of 16 px locals fit beside 40 px globals: 3 columns for 5 locals.
        let g = SHEET_GAP;
        assert_eq!(sheet.dimensions(), (g + 2 * (40 + g) + g + 3 * (16 + g), 40 + 2 * g));
        assert_eq!(sheet.get_pixel(g, g).0, [200; 3]);
        assert_eq!(sheet.get_pixel(0, 0).0, SHEET_BACKGROUND.0);
        let locals_x = g + 2 * (40 + g) + g;
        assert_eq!(sheet.get_pixel(locals_x, g).0, [100, 150, 50]);
        assert_eq!(sheet.get_pixel(locals_x, g + 16 + g).0, [100, 150, 50]);

        // Mask the first patch of global 0 and the last of global 1 (grid 4: 10 px patches).
        let mut masks = vec![false; 32];
        masks[0] = true;
        masks[31] = true;
        let tinted_sheet = contact_sheet(&crops, Some((&masks, 4)));
        assert_ne!(tinted_sheet.get_pixel(g, g).0, [200; 3]);
        assert_ne!(tinted_sheet.get_pixel(g + 9, g + 9).0, [200; 3]);
        assert_eq!(tinted_sheet.get_pixel(g + 10, g).0, [200; 3]);
        let x1 = g + 40 + g;
        assert_ne!(tinted_sheet.get_pixel(x1 + 39, g + 30).0, [200; 3]);
        assert_eq!(tinted_sheet.get_pixel(x1 + 39, g + 29).0, [200; 3]);
        assert_eq!(tinted_sheet.get_pixel(x1, g).0, [200; 3]);
        // Short masks are tolerated; a sheet without locals is just the globals.
        contact_sheet(&crops, Some((&masks[..5], 4)));
        let only = Crops { globals: crops.globals.clone(), locals: vec![] };
        assert_eq!(contact_sheet(&only, None).dimensions(), (g + 2 * (40 + g), 40 + 2 * g));
        // From a real batch.
        let spec = BatchSpec { preview_every: 1, ..small_spec(2) };
        let b = build_batch(&procedural(4), &spec, 0).unwrap();
        let sheet = contact_sheet(b.preview.as_ref().unwrap(), Some((&b.sample_masks(0), b.grid())));
        assert_eq!(sheet.height(), 32 + 2 * g);
    }
}
