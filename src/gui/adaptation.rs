//! Adaptation panel: one row per transformer block (frozen / unfrozen / LoRA), LoRA rank,
//! alpha and targets, norms / tokens / embeddings, Convpass and memory tokens, the presets, and
//! the live budget — the numbers `explora plan` prints, from the same functions.

use egui::Ui;

use super::state::AppState;
use super::widgets::{error_line, group, mib, number};
use crate::peft::{BlockMode, ConvpassSpec};

#[derive(Default)]
pub struct AdaptationPanel {
    /// K of the `blocks:K` preset.
    pub last_k: usize,
    pub message: Option<String>,
}

/// The budget line the tests read: `total trainable: N (x.xx% of the backbone)`.
pub fn total_label(state: &AppState) -> Option<String> {
    let b = state.budget()?;
    Some(format!("total trainable: {} ({:.2}% of the backbone)", group(b.trainable), b.percent()))
}

impl AdaptationPanel {
    pub fn ui(&mut self, ui: &mut Ui, state: &mut AppState) {
        let Some(vit) = state.vit.clone() else {
            ui.label("The model's architecture is not known yet (see the Setup panel).");
            return;
        };
        if self.last_k == 0 {
            self.last_k = 2.min(vit.depth);
        }
        ui.horizontal(|ui| {
            ui.label("presets:");
            for name in ["explora", "lora", "linear", "full"] {
                if ui.button(format!("{name} preset")).clicked() {
                    self.message = state.apply_preset(name).err();
                }
            }
            number(ui, "K", &mut self.last_k, 1..=vit.depth);
            if ui.button("blocks:K preset").clicked() {
                self.message = state.apply_preset(&format!("blocks:{}", self.last_k)).err();
            }
            ui.label(format!("(edited from `{}`)", state.preset));
        });
        if let Some(m) = &self.message {
            error_line(ui, m);
        }
        ui.separator();

        ui.columns(2, |columns| {
            let ui = &mut columns[0];
            ui.heading("Blocks");
            egui::ScrollArea::vertical().id_salt("blocks").max_height(300.0).show(ui, |ui| {
                egui::Grid::new("block-modes").striped(true).show(ui, |ui| {
                    for i in 0..vit.depth {
                        ui.label(format!("block {i}"));
                        let mut mode = state.plan.blocks[i];
                        ui.radio_value(&mut mode, BlockMode::Frozen, "frozen");
                        ui.radio_value(&mut mode, BlockMode::Unfrozen, "unfrozen");
                        ui.radio_value(&mut mode, BlockMode::Lora, "LoRA");
                        if mode != state.plan.blocks[i] {
                            state.set_block_mode(i, mode);
                        }
                        ui.end_row();
                    }
                });
            });
            ui.separator();
            ui.heading("LoRA");
            let mut lora = state.plan.lora;
            ui.add(egui::Slider::new(&mut lora.rank, 1..=vit.embed_dim.max(64)).text("LoRA rank"));
            ui.add(egui::Slider::new(&mut lora.alpha, 0.125..=64.0).logarithmic(true).text("LoRA alpha"));
            ui.horizontal(|ui| {
                ui.label("targets:");
                ui.checkbox(&mut lora.targets.q, "q");
                ui.checkbox(&mut lora.targets.k, "k");
                ui.checkbox(&mut lora.targets.v, "v");
                ui.checkbox(&mut lora.targets.proj, "attention output");
                ui.checkbox(&mut lora.targets.fc1, "fc1");
                ui.checkbox(&mut lora.targets.fc2, "fc2");
            });
            if lora != state.plan.lora {
                state.edit_plan(|p| p.lora = lora);
            }

            let ui = &mut columns[1];
            ui.heading("Also trained");
            let mut p = state.plan.clone();
            ui.checkbox(&mut p.norms, "norms (LayerNorms of the other blocks and the final one)");
            ui.checkbox(&mut p.cls_token, "CLS token");
            ui.add_enabled(vit.num_registers > 0, egui::Checkbox::new(&mut p.register_tokens, "register tokens"));
            ui.checkbox(&mut p.patch_embed, "patch embedding");
            ui.checkbox(&mut p.pos_embed, "position embeddings");
            ui.add_enabled(vit.mask_token, egui::Checkbox::new(&mut p.mask_token, "mask token (iBOT)"));
            let mut convpass = p.convpass.is_some();
            ui.checkbox(&mut convpass, "Convpass adapters (every block)");
            match (convpass, &mut p.convpass) {
                (true, None) => p.convpass = Some(ConvpassSpec::default()),
                (false, Some(_)) => p.convpass = None,
                _ => {}
            }
            if let Some(c) = &mut p.convpass {
                ui.horizontal(|ui| {
                    number(ui, "Convpass width", &mut c.dim, 1..=vit.embed_dim);
                    number(ui, "Convpass scale", &mut c.scale, 0.01..=100.0);
                });
            }
            let mut memory = p.memory_tokens.is_some();
            ui.checkbox(&mut memory, "memory tokens");
            match (memory, p.memory_tokens) {
                (true, None) => p.memory_tokens = Some(5),
                (false, Some(_)) => p.memory_tokens = None,
                _ => {}
            }
            if let Some(m) = &mut p.memory_tokens {
                number(ui, "memory tokens per layer", m, 1..=64);
            }
            if p != state.plan {
                state.set_plan_from_panel(p);
            }

            ui.separator();
            ui.heading("Budget");
            if let Some(budget) = state.budget() {
                egui::Grid::new("budget").striped(true).show(ui, |ui| {
                    ui.label("trainable component");
                    ui.label("parameters");
                    ui.label("%");
                    ui.end_row();
                    for row in &budget.rows {
                        ui.label(&row.component);
                        ui.label(group(row.params));
                        ui.label(format!("{:.2}%", 100.0 * row.params as f64 / budget.backbone.max(1) as f64));
                        ui.end_row();
                    }
                });
                ui.strong(total_label(state).unwrap_or_default());
                for extra in &budget.extra {
                    ui.label(format!("beside the backbone: {}: {} parameters", extra.component, group(extra.params)));
                }
                ui.label(format!("backbone: {} parameters", group(budget.backbone)));
                ui.label(format!(
                    "optimizer state (AdamW, 2 × f32 per trainable parameter): {}",
                    mib(budget.optimizer_state_bytes() as u64)
                ));
                if let Some(bytes) = state.activation_bytes() {
                    ui.label(format!(
                        "activation memory (estimate, f32, batch {}, {}): {}",
                        state.config.optim.batch,
                        state.config.views_description(),
                        mib(bytes)
                    ));
                }
            }
            if let Err(e) = state.plan_check() {
                error_line(ui, e);
            }
        });
    }
}
