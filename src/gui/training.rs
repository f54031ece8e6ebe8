//! Training panel: start / pause / resume / stop (stop writes a checkpoint), step, images/s,
//! ETA, GPU memory, and live plots of the losses, learning rate, teacher temperature and the
//! k-NN monitor. Buttons only send commands; numbers come from the job's events.

use egui::Ui;
use egui_plot::{Legend, Line, Plot, Points};

use super::state::AppState;
use super::widgets::{drawable, duration, error_line, mib};
use crate::engine::{Command, Level};
use crate::train::Objective;

#[derive(Default)]
pub struct TrainingPanel {
    pub message: Option<String>,
}

/// The status line the tests read: `step N / T`.
pub fn step_label(state: &AppState) -> String {
    match &state.run {
        Some(run) => format!("step {} / {}", run.step, run.total.map_or("?".into(), |t| t.to_string())),
        None => format!("step 0 / {}", state.config.run.steps),
    }
}

/// Series colours (one per name within a plot, the same for its line and its markers).
const PALETTE: [egui::Color32; 4] = [
    egui::Color32::from_rgb(230, 100, 90),
    egui::Color32::from_rgb(90, 150, 230),
    egui::Color32::from_rgb(150, 200, 90),
    egui::Color32::from_rgb(200, 110, 200),
];

fn plot(ui: &mut Ui, state: &AppState, id: &str, title: &str, names: &[&str], height: f32) {
    ui.label(title);
    Plot::new(id).height(height).legend(Legend::default()).allow_scroll(false).show(ui, |plot_ui| {
        for (i, name) in names.iter().enumerate() {
            if let Some(points) = state.series.get(*name) {
                let color = PALETTE[i % PALETTE.len()];
                plot_ui.line(Line::new(*name, points.clone()).color(color));
                // Sparse series (the k-NN monitor, the first steps) also get markers: a single
                // point draws no line.
                if points.len() <= 30 {
                    plot_ui.points(Points::new(*name, points.clone()).color(color).radius(3.0));
                }
            }
        }
    });
}

impl TrainingPanel {
    pub fn ui(&mut self, ui: &mut Ui, state: &mut AppState) {
        let running = state.is_running();
        let paused = state.run.as_ref().is_some_and(|r| r.paused);
        ui.horizontal(|ui| {
            if ui.add_enabled(!running, egui::Button::new("Start")).clicked() {
                self.message = state.start().err();
            }
            if running && !paused && ui.button("Pause").clicked() {
                state.send(Command::Pause);
            }
            if running && paused && ui.button("Resume").clicked() {
                state.send(Command::Resume);
            }
            if ui.add_enabled(running, egui::Button::new("Stop (writes a checkpoint)")).clicked() {
                state.send(Command::Stop);
            }
        });
        if let Some(m) = &self.message {
            error_line(ui, m);
        }

        let mut status = vec![step_label(state)];
        if let Some(run) = &state.run {
            status.insert(0, run.phase.to_string());
            if run.paused {
                status.push("paused".into());
            }
            if run.stopping {
                status.push("stopping: finishing the step and writing a checkpoint…".into());
            }
        }
        if let Some(v) = state.last("img_per_s") {
            status.push(format!("{v:.1} images/s"));
        }
        if let Some(eta) = state.run.as_ref().filter(|r| r.is_running()).and_then(|r| r.eta_seconds()) {
            status.push(format!("ETA {}", duration(eta)));
        }
        if let Some(bytes) = state.last("gpu_bytes") {
            status.push(format!("GPU memory {}", mib(bytes as u64)));
        }
        ui.label(status.join(" · "));
        if let Some(run) = &state.run {
            let fraction = run.total.map_or(0.0, |t| run.step as f32 / t.max(1) as f32);
            ui.add(egui::ProgressBar::new(fraction).show_percentage());
            ui.label(format!("run folder: {}", run.out.display()));
            match &run.finished {
                Some(Ok(summary)) => {
                    ui.label(drawable(summary));
                }
                Some(Err(e)) => error_line(ui, drawable(e)),
                None => {}
            }
        } else {
            ui.label(format!("run folder: {} (press Start)", state.out.display()));
        }

        ui.separator();
        let height = ((ui.available_height() - 160.0) / 2.0).clamp(90.0, 260.0);
        // Each objective's own curves: what its step writes to metrics.jsonl.
        let (loss_title, losses, third_id, third_title, third): (&str, &[&str], &str, &str, &[&str]) = match state.config.objective {
            Objective::Dinov2 => (
                "loss (total, DINO, iBOT, KoLeo)",
                &["loss", "dino", "ibot", "koleo"],
                "plot-temp",
                "teacher temperature",
                &["teacher_temp"],
            ),
            Objective::Mae => ("reconstruction loss (masked patches)", &["loss"], "plot-grad", "gradient norm", &["grad_norm"]),
            Objective::Upstep => (
                "loss (total, swapped codes, centre regulariser)",
                &["loss", "swap", "cvr"],
                "plot-skips",
                "iterations skipped / backward passes (total)",
                &["skipped_total", "backward_total"],
            ),
        };
        ui.columns(2, |c| {
            plot(&mut c[0], state, "plot-loss", loss_title, losses, height);
            plot(&mut c[1], state, "plot-lr", "learning rate", &["lr"], height);
        });
        ui.columns(2, |c| {
            plot(&mut c[0], state, third_id, third_title, third, height);
            plot(&mut c[1], state, "plot-knn", "k-NN top-1 (monitored backbone CLS)", &["knn_top1"], height);
        });

        ui.separator();
        egui::ScrollArea::vertical().id_salt("log").max_height(110.0).stick_to_bottom(true).show(ui, |ui| {
            for (level, line) in state.log.iter().rev().take(40).rev() {
                match level {
                    Level::Warn => error_line(ui, drawable(line)),
                    Level::Info => {
                        ui.label(drawable(line));
                    }
                }
            }
        });
    }
}
