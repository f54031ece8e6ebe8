//! Results panel: what the run folder holds — the reports (`report.md`, and the evaluation
//! reports with accuracy table, per-class accuracy and confusion matrix when a labelled set was
//! evaluated: any `*.md` / `*.csv` in the folder or up to three levels below), the last metrics and the
//! pictures (`*.png`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use egui::Ui;

use super::heatmap::rgb_to_color_image;
use super::state::AppState;
use super::widgets::drawable;

#[derive(Default)]
pub struct ResultsPanel {
    folder: Option<PathBuf>,
    read_at: Option<Instant>,
    texts: Vec<(String, String)>,
    pictures: Vec<(String, egui::TextureHandle)>,
}

fn files(dir: &Path, depth: usize) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    let mut entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() && depth > 0 && path.file_name().is_some_and(|n| n != "checkpoints" && n != "features") {
            out.extend(files(&path, depth - 1));
        } else if path.is_file() {
            out.push(path);
        }
    }
    out
}

impl ResultsPanel {
    fn refresh(&mut self, ctx: &egui::Context, folder: &Path) {
        self.texts.clear();
        self.pictures.clear();
        // `evaluation/eval/<variant>-<method>/confusion.png` is three levels down.
        for path in files(folder, 3) {
            let name = path.strip_prefix(folder).unwrap_or(&path).display().to_string();
            match path.extension().and_then(|e| e.to_str()) {
                Some("md" | "csv") => {
                    if let Ok(text) = std::fs::read_to_string(&path) {
                        self.texts.push((name, text.chars().take(20_000).collect()));
                    }
                }
                Some("png") => {
                    if let Ok(img) = image::open(&path) {
                        let img = img.to_rgb8();
                        let texture = ctx.load_texture(format!("result-{name}"), rgb_to_color_image(&img), egui::TextureOptions::LINEAR);
                        self.pictures.push((name, texture));
                    }
                }
                _ => {}
            }
        }
        self.folder = Some(folder.to_path_buf());
        self.read_at = Some(Instant::now());
    }

    pub fn ui(&mut self, ui: &mut Ui, state: &mut AppState) {
        let folder = state.run.as_ref().map(|r| r.out.clone()).unwrap_or_else(|| state.out.clone());
        let stale = self.folder.as_ref() != Some(&folder) || self.read_at.is_none_or(|t| t.elapsed().as_secs() >= 5);
        ui.horizontal(|ui| {
            ui.label(format!("run folder: {}", folder.display()));
            if ui.button("Refresh").clicked() || stale {
                self.refresh(ui.ctx(), &folder);
            }
        });
        if let Some(images) = &state.config.monitor.knn_images {
            let knn = state.last("knn_top1").map_or("not run yet".into(), |v| format!("{:.1}%", 100.0 * v));
            ui.label(format!("labelled set {}: k-NN top-1 of the teacher {knn}", images.display()));
        } else {
            ui.label("No labelled set given: the k-NN monitor uses procedural tiles of five scene classes.");
        }
        if self.texts.is_empty() && self.pictures.is_empty() {
            ui.label("Nothing written yet: report.md, the evaluation reports and pictures appear here when the run writes them.");
            return;
        }
        egui::ScrollArea::vertical().id_salt("results").show(ui, |ui| {
            for (name, text) in &self.texts {
                egui::CollapsingHeader::new(name.as_str()).default_open(name.ends_with(".md")).show(ui, |ui| {
                    ui.label(egui::RichText::new(drawable(text)).monospace());
                });
            }
            for (name, texture) in &self.pictures {
                ui.label(name.as_str());
                let size = texture.size_vec2();
                let scale = (ui.available_width() / size.x).min(300.0 / size.y).min(4.0);
                ui.add(egui::Image::new(texture).fit_to_exact_size(size * scale).alt_text(name.as_str()));
            }
        });
    }
}
