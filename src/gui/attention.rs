//! Attention viewer: pick an image (a crop of the current batch, or a file), a layer and a
//! head (or the mean over heads); the CLS attention of the source backbone and of the current
//! student, side by side, coloured and blended by our WGSL shader.

use std::collections::HashMap;
use std::sync::Arc;

use egui::Ui;
use image::RgbImage;

use super::heatmap::{self, HeatmapData};
use super::state::AppState;
use super::widgets::{error_line, text_field};

pub struct AttentionPanel {
    /// `None`: the file below.
    pub sample: Option<usize>,
    pub file: String,
    pub layer: Option<usize>,
    pub head: Option<usize>,
    pub alpha: f32,
    pub message: Option<String>,
    /// The view the heatmaps show, with its version.
    shown: Option<(u64, Arc<HeatmapData>, Arc<HeatmapData>)>,
    version: u64,
    cpu_cache: HashMap<u64, (u64, u32, egui::TextureHandle)>,
}

impl Default for AttentionPanel {
    fn default() -> Self {
        Self {
            sample: Some(0),
            file: String::new(),
            layer: None,
            head: None,
            alpha: 0.55,
            message: None,
            shown: None,
            version: 0,
            cpu_cache: HashMap::new(),
        }
    }
}

impl AttentionPanel {
    fn image(&self, state: &AppState) -> Result<Arc<RgbImage>, String> {
        match self.sample {
            Some(j) => {
                let batch = state.batch.as_ref().ok_or("no batch yet: start training, or pick a file")?;
                let sample = batch.samples.get(j).ok_or("that sample is not in the current batch")?;
                Ok(Arc::new(sample.globals.first().ok_or("the sample has no global crop")?.clone()))
            }
            None => {
                let path = self.file.trim();
                if path.is_empty() {
                    return Err("enter an image file".into());
                }
                crate::data::decode_rgb(std::path::Path::new(path)).map(Arc::new).map_err(|e| e.to_string())
            }
        }
    }

    /// Sends the request for the current choices.
    pub fn request(&mut self, state: &mut AppState) {
        let depth = state.vit.as_ref().map_or(1, |v| v.depth);
        let layer = self.layer.unwrap_or(depth - 1);
        self.message = match self.image(state) {
            Ok(image) => state.request_attention(image, layer, self.head).err(),
            Err(e) => Some(e),
        };
    }

    pub fn ui(&mut self, ui: &mut Ui, state: &mut AppState) {
        let Some(vit) = state.vit.clone() else {
            ui.label("The model's architecture is not known yet (see the Setup panel).");
            return;
        };
        let samples = state.batch.as_ref().map_or(0, |b| b.samples.len());
        ui.horizontal(|ui| {
            let text = match self.sample {
                Some(j) => format!("batch sample {j}"),
                None => "image file".into(),
            };
            egui::ComboBox::from_label("image").selected_text(text).show_ui(ui, |ui| {
                for j in 0..samples.max(1) {
                    ui.selectable_value(&mut self.sample, Some(j), format!("batch sample {j}"));
                }
                ui.selectable_value(&mut self.sample, None, "image file");
            });
            if self.sample.is_none() {
                text_field(ui, "image file path", &mut self.file, 280.0);
            }
        });
        ui.horizontal(|ui| {
            let mut layer = self.layer.unwrap_or(vit.depth - 1).min(vit.depth - 1);
            ui.add(egui::Slider::new(&mut layer, 0..=vit.depth - 1).text("layer"));
            self.layer = Some(layer);
            let head_text = |h: Option<usize>| h.map_or("mean over heads".to_string(), |h| format!("head {h}"));
            egui::ComboBox::from_label("head").selected_text(head_text(self.head)).show_ui(ui, |ui| {
                ui.selectable_value(&mut self.head, None, head_text(None));
                for h in 0..vit.num_heads {
                    ui.selectable_value(&mut self.head, Some(h), head_text(Some(h)));
                }
            });
            ui.add(egui::Slider::new(&mut self.alpha, 0.0..=1.0).text("opacity"));
            if ui.button("Show attention").clicked() {
                self.request(state);
            }
        });
        if let Some(m) = &self.message {
            error_line(ui, m);
        }
        if state.attention_pending.is_some() {
            ui.label("computing… (the running job answers between two steps)");
        }

        if let Some(view) = state.attention.clone() {
            if self.shown.as_ref().is_none_or(|(id, ..)| *id != view.id) {
                self.version += 1;
                let image = Arc::new(view.image.clone());
                let source = Arc::new(HeatmapData { version: self.version, image: image.clone(), map: view.source.clone() });
                let student = Arc::new(HeatmapData { version: self.version, image, map: view.student.clone() });
                self.shown = Some((view.id, source, student));
            }
            let (_, source, student) = self.shown.clone().expect("set above");
            let what = view.source.head.map_or("mean over heads".to_string(), |h| format!("head {h}"));
            ui.label(format!(
                "CLS attention, block {}, {what}; {}",
                view.source.layer,
                if state.gpu_heatmap { "coloured on the GPU by shaders/heatmap.wgsl" } else { "CPU overlay (no wgpu renderer)" }
            ));
            let side = ((ui.available_width() - 24.0) / 2.0).min(ui.available_height() - 40.0).clamp(96.0, 420.0);
            ui.horizontal(|ui| {
                ui.vertical(|ui| {
                    ui.label("source backbone");
                    heatmap::show(ui, 1, &source, self.alpha, egui::Vec2::splat(side), state.gpu_heatmap, &mut self.cpu_cache);
                });
                ui.vertical(|ui| {
                    ui.label(format!("student (step {})", view.step));
                    heatmap::show(ui, 2, &student, self.alpha, egui::Vec2::splat(side), state.gpu_heatmap, &mut self.cpu_cache);
                });
            });
        } else if state.attention_pending.is_none() {
            ui.label("Press \"Show attention\" while training runs (or after it finished) to see the maps.");
        }
    }
}
