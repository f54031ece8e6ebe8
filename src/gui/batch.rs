//! Batch viewer: the current training batch as thumbnails — per sample its source image, its two global crops
//! with the iBOT mask drawn over the masked patches, then its local crops (for MAE: the crop it
//! reconstructs with the step's patch mask, and the reconstruction); click one to enlarge it.

use std::sync::Arc;

use egui::{Color32, Rect, Sense, Ui, Vec2};

use super::heatmap::rgb_to_color_image;
use super::state::AppState;
use crate::engine::BatchPreview;

/// Colour of masked patches (the contact sheet's tint, translucent).
const MASK_FILL: Color32 = Color32::from_rgba_premultiplied(18, 54, 132, 150);

struct Thumb {
    texture: egui::TextureHandle,
    /// The crop's mask (`grid²`), for global crops.
    mask: Option<Vec<bool>>,
    label: String,
    /// Shown large (source images, global crops, reconstructions) rather than small (local crops).
    large: bool,
}

#[derive(Default)]
pub struct BatchPanel {
    shown_step: Option<u64>,
    /// Per sample: the source image, global crops, local crops.
    thumbs: Vec<Vec<Thumb>>,
    grid: usize,
    /// `(sample, crop)` of the enlarged crop.
    pub enlarged: Option<(usize, usize)>,
    /// Whether the batch shows MAE reconstructions.
    mae: bool,
}

fn draw_mask(ui: &Ui, rect: Rect, mask: &[bool], grid: usize) {
    if grid == 0 {
        return;
    }
    let cell = Vec2::new(rect.width() / grid as f32, rect.height() / grid as f32);
    let painter = ui.painter_at(rect);
    for (i, masked) in mask.iter().enumerate().take(grid * grid) {
        if *masked {
            let min = rect.min + Vec2::new((i % grid) as f32 * cell.x, (i / grid) as f32 * cell.y);
            painter.rect_filled(Rect::from_min_size(min, cell), 0.0, MASK_FILL);
        }
    }
}

impl BatchPanel {
    fn load(&mut self, ctx: &egui::Context, preview: &Arc<BatchPreview>) {
        self.grid = preview.grid;
        self.mae = preview.samples.iter().any(|s| s.reconstruction.is_some());
        let n = preview.grid * preview.grid;
        let texture = |name: String, img: &image::RgbImage, options| ctx.load_texture(name, rgb_to_color_image(img), options);
        let mae = self.mae;
        self.thumbs = preview
            .samples
            .iter()
            .enumerate()
            .map(|(j, sample)| {
                let globals = sample.globals.iter().enumerate().map(|(k, img)| {
                    let mask = sample.masks.get(k * n..(k + 1) * n);
                    let hidden = mask.map_or(0, |m| m.iter().filter(|&&b| b).count());
                    let label = if mae {
                        format!("sample {j}, input crop ({} px, {hidden} of {n} patches masked)", img.width())
                    } else {
                        format!("sample {j}, global crop {k} ({} px, {hidden} patches masked)", img.width())
                    };
                    Thumb {
                        texture: texture(format!("batch-{j}-g{k}"), img, egui::TextureOptions::NEAREST),
                        mask: mask.map(<[bool]>::to_vec),
                        label,
                        large: true,
                    }
                });
                let reconstruction = sample.reconstruction.iter().map(|img| Thumb {
                    texture: texture(format!("batch-{j}-r"), img, egui::TextureOptions::NEAREST),
                    mask: None,
                    label: format!("sample {j}, reconstruction after step {} (masked patches predicted)", preview.step),
                    large: true,
                });
                let locals = sample.locals.iter().enumerate().map(|(k, img)| Thumb {
                    texture: texture(format!("batch-{j}-l{k}"), img, egui::TextureOptions::NEAREST),
                    mask: None,
                    label: format!("sample {j}, local crop {k} ({} px)", img.width()),
                    large: false,
                });
                let source = sample.source.iter().map(|img| Thumb {
                    texture: texture(format!("batch-{j}-s"), img, egui::TextureOptions::LINEAR),
                    mask: None,
                    label: format!("sample {j}, source image ({}×{} thumbnail)", img.width(), img.height()),
                    large: true,
                });
                source.chain(globals).chain(reconstruction).chain(locals).collect()
            })
            .collect();
        self.shown_step = Some(preview.step);
        if self.enlarged.is_some_and(|(j, k)| self.thumbs.get(j).is_none_or(|t| t.get(k).is_none())) {
            self.enlarged = None;
        }
    }

    /// Number of thumbnails on screen (tests).
    pub fn thumbnails(&self) -> usize {
        self.thumbs.iter().map(Vec::len).sum()
    }

    fn thumb(&self, ui: &mut Ui, thumb: &Thumb, size: f32) -> egui::Response {
        let response =
            ui.add(egui::Image::new(&thumb.texture).fit_to_exact_size(Vec2::splat(size)).sense(Sense::click()).alt_text(&thumb.label));
        if let Some(mask) = &thumb.mask {
            draw_mask(ui, response.rect, mask, self.grid);
        }
        response.on_hover_text(&thumb.label)
    }

    pub fn ui(&mut self, ui: &mut Ui, state: &mut AppState) {
        let Some(preview) = state.batch.clone() else {
            ui.label("No batch yet: start training (Training panel); the current batch appears here.");
            return;
        };
        if self.shown_step != Some(preview.step) {
            self.load(ui.ctx(), &preview);
        }
        if self.mae {
            ui.label(format!(
                "batch of step {}: {} samples shown — the source image, the crop MAE reconstructs (masked patches tinted blue: the encoder sees only the others, {}×{} patches) and the reconstruction after the step; click one to enlarge it",
                preview.step,
                preview.samples.len(),
                self.grid,
                self.grid
            ));
        } else {
            let locals = if preview.samples.iter().any(|s| !s.locals.is_empty()) { " and its local crops" } else { "" };
            ui.label(format!(
                "batch of step {}: {} samples shown — the source image, its two global crops (iBOT-masked patches tinted blue, {}×{} patches){locals}; click one to enlarge it",
                preview.step,
                preview.samples.len(),
                self.grid,
                self.grid
            ));
        }
        let mut close = false;
        if let Some((j, k)) = self.enlarged
            && let Some(thumb) = self.thumbs.get(j).and_then(|t| t.get(k))
        {
            ui.horizontal(|ui| {
                let side = (ui.available_height() * 0.45).clamp(160.0, 360.0);
                close = self.thumb(ui, thumb, side).clicked();
                ui.label(format!("{}\n(click to close)", thumb.label));
            });
            ui.separator();
        }
        if close {
            self.enlarged = None;
        }
        let mut clicked = None;
        egui::ScrollArea::vertical().id_salt("batch").show(ui, |ui| {
            for (j, thumbs) in self.thumbs.iter().enumerate() {
                ui.horizontal(|ui| {
                    ui.label(format!("sample {j}"));
                    for (k, thumb) in thumbs.iter().enumerate() {
                        let size = if thumb.large { 96.0 } else { 56.0 };
                        if self.thumb(ui, thumb, size).clicked() {
                            clicked = Some((j, k));
                        }
                    }
                });
            }
        });
        if clicked.is_some() {
            self.enlarged = clicked;
        }
    }
}
