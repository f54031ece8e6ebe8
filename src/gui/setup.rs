//! Setup panel: the model (built-in tiny or a checkpoint, architecture detected), the
//! unlabelled domain folder, an optional labelled folder, the GPU adapter, run length and
//! crops, the run folder; save / load the run config TOML; resume a run folder. Every problem
//! is listed with the CLI's message.

use std::path::PathBuf;

use egui::Ui;

use super::state::{AppState, default_out};
use super::widgets::{error_line, number, ok_line, text_field};
use crate::train::config::Gate;
use crate::train::{Objective, PretrainConfig};

/// Text fields being edited (applied to the config on change).
#[derive(Default)]
pub struct SetupPanel {
    pub weights: String,
    pub images: String,
    pub labelled: String,
    pub out: String,
    pub config_file: String,
    pub resume_dir: String,
    /// The result of the last save / load / resume.
    pub message: Option<Result<String, String>>,
    synced_for: Option<String>,
}

fn path_text(p: &Option<PathBuf>) -> String {
    p.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
}

fn non_empty(s: &str) -> Option<PathBuf> {
    let s = s.trim();
    (!s.is_empty()).then(|| PathBuf::from(s))
}

impl SetupPanel {
    /// Refreshes the text fields from the state (after a load or reset).
    pub fn sync(&mut self, state: &AppState) {
        self.weights = path_text(&state.config.model.weights);
        self.images = path_text(&state.config.data.images);
        self.labelled = path_text(&state.config.monitor.knn_images);
        self.out = state.out.display().to_string();
        self.synced_for = Some(state.config.to_toml());
    }

    pub fn ui(&mut self, ui: &mut Ui, state: &mut AppState) {
        if self.synced_for.is_none() {
            self.sync(state);
        }
        ui.heading("Model");
        let builtin = state.config.model.weights.as_deref().is_some_and(crate::checkpoint::builtin::is_builtin);
        ui.horizontal(|ui| {
            if ui.radio(builtin, "built-in source backbone (tiny ViT pre-trained on the procedural source domain)").clicked() && !builtin {
                let mut c = state.config.clone();
                c.model.weights = Some(PathBuf::from(crate::checkpoint::builtin::SOURCE_TINY));
                c.model.arch = None;
                state.set_config(c);
                self.sync(state);
            }
            if ui.radio(!builtin, "checkpoint file").clicked() && builtin {
                self.weights.clear();
                let mut c = state.config.clone();
                c.model.weights = Some(PathBuf::new());
                c.model.arch = None;
                state.config = c;
                state.vit = None;
                state.model_error = Some("enter the checkpoint's path and press Detect".into());
            }
        });
        if !builtin {
            ui.horizontal(|ui| {
                text_field(ui, "checkpoint", &mut self.weights, 420.0);
                if ui.button("Detect").clicked() {
                    let mut c = state.config.clone();
                    c.model.weights = non_empty(&self.weights);
                    c.model.arch = None;
                    state.set_config(c);
                }
            });
            ui.label("Meta DINOv2 .pth, Hugging Face safetensors (config.json beside), MAE .pth or explora safetensors");
        }
        match &state.model_error {
            Some(e) => error_line(ui, e),
            None => {
                ui.label(&state.model_note);
            }
        }
        if let Some(vit) = &state.vit {
            ui.label(format!(
                "architecture: {} — {} blocks, width {}, {} heads, patch {}, {} registers, {} parameters",
                vit.name,
                vit.depth,
                vit.embed_dim,
                vit.num_heads,
                vit.patch_size,
                vit.num_registers,
                super::widgets::group(vit.num_params())
            ));
        }

        ui.separator();
        self.objective_ui(ui, state);

        ui.separator();
        ui.heading("Data");
        if text_field(ui, "unlabelled images (empty: procedural satellite-like tiles)", &mut self.images, 360.0).changed() {
            state.config.set_images(non_empty(&self.images));
        }
        if text_field(
            ui,
            "labelled ImageFolder (optional: the k-NN monitor, and a before/after evaluation when the run ends)",
            &mut self.labelled,
            360.0,
        )
        .changed()
        {
            state.config.set_labelled(non_empty(&self.labelled), true);
        }

        ui.separator();
        ui.heading("Run");
        ui.horizontal(|ui| {
            number(ui, "steps", &mut state.config.run.steps, 1..=10_000_000);
            number(ui, "batch", &mut state.config.optim.batch, 2..=4096);
            number(ui, "accumulation", &mut state.config.optim.accumulation, 1..=1024);
        });
        ui.horizontal(|ui| {
            number(ui, "global crop px", &mut state.config.crops.global_size, 8..=1024);
            number(ui, "local crop px", &mut state.config.crops.local_size, 8..=1024);
            number(ui, "local crops", &mut state.config.crops.local_crops, 0..=16);
            number(ui, "seed", &mut state.config.run.seed, 0..=u64::MAX);
        });
        ui.horizontal(|ui| {
            if text_field(ui, "run folder", &mut self.out, 360.0).changed() {
                state.out = PathBuf::from(self.out.trim());
            }
            if ui.button("New name").clicked() {
                state.out = default_out();
                self.out = state.out.display().to_string();
            }
        });

        ui.separator();
        ui.heading("GPU adapter");
        ui.label(format!("in use: {} (--device {})", state.device_name, state.device_choice));
        let mut choices: Vec<(String, String)> = vec![
            ("auto".into(), "auto (a GPU when there is one, else the CPU backend)".into()),
            ("cpu".into(), "cpu — burn's native CPU backend".into()),
        ];
        choices.extend(
            state.adapters.iter().map(|a| (a.selector.clone(), format!("{} — {} [{} {}]", a.selector, a.name, a.backend, a.device_type))),
        );
        let current = state.device_choice.to_string();
        let mut chosen = current.clone();
        egui::ComboBox::from_label("adapter for training")
            .selected_text(choices.iter().find(|(s, _)| *s == current).map_or(current.clone(), |(_, t)| t.clone()))
            .show_ui(ui, |ui| {
                for (selector, text) in &choices {
                    ui.selectable_value(&mut chosen, selector.clone(), text);
                }
            });
        if chosen != current {
            match chosen.parse::<crate::device::DeviceChoice>() {
                Ok(choice) => {
                    // Opened when the next run starts; the window keeps drawing on its device.
                    state.device_choice = choice;
                    state.device = None;
                    state.device_name = format!("--device {chosen} (opened at the next start)");
                }
                Err(e) => self.message = Some(Err(e)),
            }
        }
        ui.label("The same list as `explora info`; `--device` (or BURN_DEVICE) chooses it at launch.");

        ui.separator();
        ui.heading("Run config file");
        ui.horizontal(|ui| {
            text_field(ui, "TOML file", &mut self.config_file, 320.0);
            if ui.button("Save config").clicked() {
                self.message = Some(self.save(state));
            }
            if ui.button("Load config").clicked() {
                self.message = Some(self.load(state));
            }
            if ui.button("Built-in default").clicked() {
                let config = match &state.device {
                    Some(d) => crate::recipes::default_run::DefaultRun::for_device(PathBuf::new(), d).config,
                    None => PretrainConfig::builtin(),
                };
                state.set_config(config);
                state.out = default_out();
                self.sync(state);
                self.message = Some(Ok("back to the built-in default run".into()));
            }
        });
        ui.horizontal(|ui| {
            text_field(ui, "resume run folder", &mut self.resume_dir, 320.0);
            if ui.button("Resume run").clicked() {
                self.message = Some(match state.resume(&PathBuf::from(self.resume_dir.trim()), None) {
                    Ok(()) => {
                        self.sync(state);
                        Ok(format!("resuming {}", self.resume_dir.trim()))
                    }
                    Err(e) => Err(e),
                });
            }
        });
        match &self.message {
            Some(Ok(m)) => ok_line(ui, m),
            Some(Err(e)) => error_line(ui, e),
            None => {}
        }

        ui.separator();
        if let Some(run) = state.run.as_ref().filter(|r| r.is_running()) {
            ok_line(ui, format!("training in {} (see the Training panel)", run.out.display()));
            return;
        }
        let problems = state.problems();
        if problems.is_empty() {
            ok_line(ui, "ready: press Start on the Training panel");
        }
        for p in problems {
            error_line(ui, p);
        }
    }

    /// The self-supervised objective, and MAE's knobs when it is chosen.
    fn objective_ui(&mut self, ui: &mut Ui, state: &mut AppState) {
        ui.heading("Objective");
        let mut objective = state.config.objective;
        ui.horizontal(|ui| {
            ui.radio_value(&mut objective, Objective::Dinov2, "DINOv2 (self-distillation: DINO + iBOT + KoLeo, EMA teacher)");
            ui.radio_value(&mut objective, Objective::Mae, "MAE (masked-patch reconstruction with a light decoder)");
            ui.radio_value(
                &mut objective,
                Objective::Upstep,
                "UpStep (our reading of the abstract: k-means centres, swapped codes, skipped steps)",
            );
        });
        if objective != state.config.objective {
            state.choose_objective(objective);
        }
        let c = &mut state.config;
        if c.objective == Objective::Upstep {
            let u = &mut c.upstep;
            ui.horizontal(|ui| {
                number(ui, "centres (k-means K)", &mut u.centres, 2..=65_536)
                    .on_hover_text("k-means of the frozen base model's CLS embeddings of the target images; at most the images used");
                number(ui, "k-means images", &mut u.kmeans_sample, 2..=1_000_000);
                number(ui, "k-means iterations", &mut u.kmeans_iterations, 1..=1_000);
            });
            ui.horizontal(|ui| {
                ui.label("offline EMA");
                ui.add(egui::DragValue::new(&mut u.ema).range(0.0..=0.99999).speed(0.001).fixed_decimals(4));
                ui.label("temperature");
                ui.add(egui::DragValue::new(&mut u.temperature).range(0.001..=10.0).speed(0.01).fixed_decimals(3));
                ui.label("centre regulariser λ")
                    .on_hover_text("weight of ‖c − c_base‖²: keeps the batch's mean embedding near the base model's (0 = off)");
                ui.add(egui::DragValue::new(&mut u.cvr_weight).range(0.0..=1000.0).speed(0.05).fixed_decimals(2));
            });
            ui.horizontal(|ui| {
                ui.label("skip gate");
                for (gate, label, hover) in [
                    (Gate::Alternate, "alternate", "every second iteration runs no backward pass (exactly half)"),
                    (Gate::LossBelowEma, "loss below its EMA", "skipped when the loss is below its running mean"),
                    (Gate::CvrThreshold, "drift below threshold", "skipped when ‖c − c_base‖² is below the threshold"),
                    (Gate::Off, "off", "every iteration trains"),
                ] {
                    ui.radio_value(&mut u.gate, gate, label).on_hover_text(hover);
                }
                match u.gate {
                    Gate::LossBelowEma => {
                        ui.label("EMA");
                        ui.add(egui::DragValue::new(&mut u.gate_ema).range(0.0..=0.9999).speed(0.01).fixed_decimals(3));
                    }
                    Gate::CvrThreshold => {
                        ui.label("threshold");
                        ui.add(egui::DragValue::new(&mut u.cvr_threshold).range(0.0..=10.0).speed(1e-4).fixed_decimals(5));
                    }
                    Gate::Alternate | Gate::Off => {}
                }
            });
            ui.label(
                "UpStep as explora interprets the paper's abstract (the method is not public): k-means centres of the base model, \
                 swapped Sinkhorn-Knopp codes from an EMA model, a regulariser towards the base model's mean embedding, and a gate \
                 that skips some optimizer steps. The plan switched to LoRA r=8 on Q, K, V; the [upstep] section of the config \
                 holds the rest (code temperature, Sinkhorn iterations).",
            );
            return;
        }
        if c.objective != Objective::Mae {
            return;
        }
        let m = &mut c.mae;
        ui.horizontal(|ui| {
            ui.label("mask ratio");
            let slider = ui.add(egui::Slider::new(&mut m.mask_ratio, 0.05..=0.95).step_by(0.05).fixed_decimals(2));
            slider.on_hover_text("fraction of each image's patches hidden from the encoder (MAE: 0.75)");
            ui.checkbox(&mut m.norm_pix, "normalised-pixel targets");
        });
        ui.horizontal(|ui| {
            number(ui, "decoder width", &mut m.decoder_width, 4..=2048);
            number(ui, "decoder blocks", &mut m.decoder_depth, 1..=32);
            number(ui, "decoder heads", &mut m.decoder_heads, 1..=64);
            number(ui, "decoder LoRA rank", &mut m.decoder_lora_rank, 1..=256);
        });
        ui.label(
            "A decoder in the checkpoint (MAE's *_visualize weights) is loaded and trains LoRA on Q,V; otherwise a fresh decoder of \
             this shape trains from scratch. AdamW betas (0.9, 0.95), no weight decay unless the config sets them.",
        );
    }

    fn save(&mut self, state: &AppState) -> Result<String, String> {
        let path = non_empty(&self.config_file).ok_or("enter a file name for the TOML config")?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
        }
        std::fs::write(&path, state.config.to_toml()).map_err(|e| format!("writing {}: {e}", path.display()))?;
        Ok(format!("saved {} (run it headless: explora --no-gui pretrain --config {})", path.display(), path.display()))
    }

    fn load(&mut self, state: &mut AppState) -> Result<String, String> {
        let path = non_empty(&self.config_file).ok_or("enter the TOML file to load")?;
        let config = PretrainConfig::load(&path).map_err(|e| format!("{e:#}"))?;
        config.arch_preset().map_err(|e| e.to_string())?;
        state.set_config(config);
        self.sync(state);
        Ok(format!("loaded {}", path.display()))
    }
}
