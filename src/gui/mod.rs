//! The desktop app: an eframe window over the same engine as `--no-gui`. One struct per panel
//! (Setup, Adaptation, Training, Batch, Attention, Results) over a shared [`AppState`]; the
//! engine runs jobs on its own thread, the app sends commands and draws events. The window
//! renders with burn's own wgpu device, so the attention heatmaps are coloured by our WGSL
//! shader on the device that computed them.

mod adaptation;
mod attention;
mod batch;
pub mod heatmap;
mod results;
pub mod settings;
mod setup;
pub mod state;
mod training;
mod widgets;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use adaptation::{AdaptationPanel, total_label};
pub use attention::AttentionPanel;
pub use batch::BatchPanel;
pub use results::ResultsPanel;
pub use settings::Settings;
pub use setup::SetupPanel;
pub use state::{AppState, RunState};
pub use training::{TrainingPanel, step_label};

use crate::device::{self, DeviceChoice};

/// The panels, in tab order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tab {
    Setup,
    Adaptation,
    Training,
    Batch,
    Attention,
    Results,
}

impl Tab {
    pub const ALL: [Tab; 6] = [Tab::Setup, Tab::Adaptation, Tab::Training, Tab::Batch, Tab::Attention, Tab::Results];

    pub fn name(self) -> &'static str {
        match self {
            Tab::Setup => "Setup",
            Tab::Adaptation => "Adaptation",
            Tab::Training => "Training",
            Tab::Batch => "Batch",
            Tab::Attention => "Attention",
            Tab::Results => "Results",
        }
    }

    fn from_name(name: &str) -> Option<Tab> {
        Tab::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// The eframe app.
pub struct App {
    pub state: AppState,
    pub tab: Tab,
    pub setup: SetupPanel,
    pub adaptation: AdaptationPanel,
    pub training: TrainingPanel,
    pub batch: BatchPanel,
    pub attention: AttentionPanel,
    pub results: ResultsPanel,
    /// Whether to write the settings file on exit (not in tests).
    pub persist: bool,
    smoke: Option<Smoke>,
}

impl App {
    /// The app over `state`; registers the heatmap shader on the window's wgpu device.
    pub fn new(cc: &eframe::CreationContext<'_>, mut state: AppState) -> Self {
        state.gpu_heatmap = heatmap::register(cc.wgpu_render_state.as_ref());
        if let Some(rs) = &cc.wgpu_render_state
            && state.device.as_ref().is_some_and(|d| !device::is_native_cpu(d))
        {
            state.device_name = format!("{} ({:?})", rs.adapter.get_info().name, rs.adapter.get_info().backend);
        }
        Self {
            state,
            tab: Tab::Setup,
            setup: SetupPanel::default(),
            adaptation: AdaptationPanel::default(),
            training: TrainingPanel::default(),
            batch: BatchPanel::default(),
            attention: AttentionPanel::default(),
            results: ResultsPanel::default(),
            persist: false,
            smoke: None,
        }
    }

    fn settings(&self) -> Settings {
        Settings {
            tab: Some(self.tab.name().to_string()),
            preset: Some(self.state.preset.clone()),
            config_file: Some(PathBuf::from(self.setup.config_file.trim())).filter(|p| !p.as_os_str().is_empty()),
            config: Some(self.state.config.clone()),
        }
    }

    /// Applies remembered settings (the last config, panel and config file).
    pub fn restore(&mut self, settings: Settings) {
        if let Some(config) = settings.config
            && config.validate().is_ok()
        {
            self.state.set_config(config);
        }
        if let Some(tab) = settings.tab.as_deref().and_then(Tab::from_name) {
            self.tab = tab;
        }
        if let Some(file) = settings.config_file {
            self.setup.config_file = file.display().to_string();
        }
        self.setup.sync(&self.state);
    }

    fn status_bar(&self, ui: &mut egui::Ui) {
        let s = &self.state;
        let run = match &s.run {
            Some(r) if r.is_running() => format!("{} — {}", r.phase, step_label(s)),
            Some(r) => match &r.finished {
                Some(Ok(_)) => format!("finished — {}", step_label(s)),
                Some(Err(_)) => "the run failed (see the Training panel)".into(),
                None => String::new(),
            },
            None => "no run yet".into(),
        };
        ui.horizontal(|ui| {
            ui.label(format!("device: {}", s.device_name));
            ui.separator();
            ui.label(run);
            if let Some(total) = total_label(s) {
                ui.separator();
                ui.label(total);
            }
        });
    }
}

impl eframe::App for App {
    fn logic(&mut self, ctx: &egui::Context, _frame: &mut eframe::Frame) {
        self.state.poll();
        if self.state.is_running() || self.state.attention_pending.is_some() || self.smoke.is_some() {
            ctx.request_repaint_after(Duration::from_millis(100));
        }
        if let Some(smoke) = &mut self.smoke {
            smoke.drive(ctx, &mut self.state, &mut self.tab, &mut self.attention);
        }
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        egui::Panel::top("tabs").show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.strong("explora");
                ui.separator();
                for tab in Tab::ALL {
                    ui.selectable_value(&mut self.tab, tab, tab.name());
                }
            });
        });
        egui::Panel::bottom("status").show(ui, |ui| self.status_bar(ui));
        egui::CentralPanel::default().show(ui, |ui| {
            let state = &mut self.state;
            match self.tab {
                Tab::Setup => egui::ScrollArea::vertical().id_salt("setup").show(ui, |ui| self.setup.ui(ui, state)).inner,
                Tab::Adaptation => self.adaptation.ui(ui, state),
                Tab::Training => self.training.ui(ui, state),
                Tab::Batch => self.batch.ui(ui, state),
                Tab::Attention => self.attention.ui(ui, state),
                Tab::Results => self.results.ui(ui, state),
            }
        });
    }

    fn on_exit(&mut self) {
        if self.persist
            && let Err(e) = self.settings().save()
        {
            eprintln!("explora: could not save the app settings: {e:#}");
        }
        // Stop writes a checkpoint: the run can be resumed (here or with `explora --no-gui resume`).
        self.state.stop_and_wait(Duration::from_secs(120));
    }
}

/// How `explora` without a command ended.
#[derive(Debug)]
pub enum Outcome {
    /// The window was closed.
    Closed,
    /// No window could be opened; says what was looked for.
    NoDisplay(String),
}

/// Why no window can be opened here, before trying (a Linux/BSD session without a display).
pub fn missing_display() -> Option<String> {
    if cfg!(all(unix, not(target_os = "macos"), not(target_os = "ios"), not(target_os = "android"))) {
        let set = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
        if !set("DISPLAY") && !set("WAYLAND_DISPLAY") {
            return Some("no display found (neither DISPLAY nor WAYLAND_DISPLAY is set)".into());
        }
    }
    None
}

/// Opens the app on the built-in default run (or the remembered settings) with the adapter
/// `choice`. No display: returns [`Outcome::NoDisplay`]; no usable adapter: the device error
/// (what was tried, what to install).
pub fn run(choice: &DeviceChoice) -> anyhow::Result<Outcome> {
    if let Some(why) = missing_display() {
        return Ok(Outcome::NoDisplay(why));
    }
    // On a GPU the window renders with the device burn computes on; on the CPU backend it opens
    // its own wgpu device (any adapter, software Vulkan included) and only draws.
    let (device, setup) = device::open_shared(choice)?;
    let mut state = AppState::builtin(choice.clone(), Some(device));
    state.adapters = device::list_adapters();
    let smoke = Smoke::from_env();
    let settings = if smoke.is_some() { Settings::default() } else { Settings::load() };
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default().with_title("explora").with_inner_size([1280.0, 860.0]),
        wgpu_options: match setup {
            Some(setup) => egui_wgpu::WgpuConfiguration {
                wgpu_setup: egui_wgpu::WgpuSetup::Existing(egui_wgpu::WgpuSetupExisting {
                    instance: setup.instance,
                    adapter: setup.adapter,
                    device: setup.device,
                    queue: setup.queue,
                }),
                ..Default::default()
            },
            None => Default::default(),
        },
        ..Default::default()
    };
    let create = move |cc: &eframe::CreationContext<'_>| -> Result<Box<dyn eframe::App>, Box<dyn std::error::Error + Send + Sync>> {
        let mut app = App::new(cc, state);
        app.restore(settings);
        app.persist = smoke.is_none();
        if let Some(smoke) = smoke {
            app.smoke = Some(smoke);
        }
        Ok(Box::new(app))
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| eframe::run_native("explora", options, Box::new(create))));
    match result {
        Ok(Ok(())) => Ok(Outcome::Closed),
        Ok(Err(e)) => Ok(Outcome::NoDisplay(format!("could not open a window ({e})"))),
        Err(_) => Ok(Outcome::NoDisplay("could not open a window (the windowing system failed)".into())),
    }
}

/// The Xvfb smoke run (`EXPLORA_GUI_SMOKE=SECONDS:OUT.png`, for CI): starts the default run,
/// trains for SECONDS, then screenshots every panel (`OUT.png` is the Training panel, the
/// others `OUT-<panel>.png`), stops the run (a checkpoint is written) and closes the window.
struct Smoke {
    seconds: f64,
    out: PathBuf,
    began: Option<Instant>,
    /// Panels still to screenshot.
    todo: Vec<Tab>,
    /// The panel on screen and when it was shown.
    showing: Option<(Tab, Instant)>,
    waiting: Arc<Mutex<Option<Result<PathBuf, String>>>>,
    shot_pending: bool,
    closing: bool,
}

impl Smoke {
    fn from_env() -> Option<Smoke> {
        let spec = std::env::var("EXPLORA_GUI_SMOKE").ok()?;
        let (secs, out) = spec.split_once(':')?;
        Some(Smoke {
            seconds: secs.parse().ok()?,
            out: PathBuf::from(out),
            began: None,
            todo: vec![Tab::Batch, Tab::Attention, Tab::Adaptation, Tab::Setup, Tab::Results, Tab::Training],
            showing: None,
            waiting: Arc::new(Mutex::new(None)),
            shot_pending: false,
            closing: false,
        })
    }

    fn path_for(&self, tab: Tab) -> PathBuf {
        if tab == Tab::Training {
            return self.out.clone();
        }
        let stem = self.out.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "smoke".into());
        self.out.with_file_name(format!("{stem}-{}.png", tab.name().to_lowercase()))
    }

    fn drive(&mut self, ctx: &egui::Context, state: &mut AppState, tab: &mut Tab, attention: &mut AttentionPanel) {
        if self.closing {
            return;
        }
        let began = *self.began.get_or_insert_with(|| {
            if let Err(e) = state.start() {
                eprintln!("smoke: cannot start: {e}");
            }
            *tab = Tab::Training;
            Instant::now()
        });
        // Train for `seconds`, and at least two steps (the first one compiles the shaders, which
        // takes a minute or two on software Vulkan), at most five minutes.
        let steps = state.series.get("loss").map_or(0, Vec::len);
        let done = state.run.as_ref().is_none_or(|r| !r.is_running());
        let elapsed = began.elapsed().as_secs_f64();
        if !done && elapsed < 300.0 && (elapsed < self.seconds || steps < 2) {
            return;
        }
        if self.shot_pending {
            let finished = self.waiting.lock().map(|mut w| w.take()).unwrap_or(None);
            match finished {
                Some(Ok(path)) => eprintln!("smoke: wrote {}", path.display()),
                Some(Err(e)) => eprintln!("smoke: {e}"),
                None => return,
            }
            self.shot_pending = false;
            self.showing = None;
        }
        match self.showing {
            None => {
                let Some(next) = self.todo.first().copied() else {
                    eprintln!(
                        "smoke: done after {:.0} s; stopping the run (a checkpoint is written) and closing",
                        began.elapsed().as_secs_f64()
                    );
                    self.closing = true;
                    ctx.send_viewport_cmd(egui::ViewportCommand::Close);
                    return;
                };
                self.todo.remove(0);
                *tab = next;
                if next == Tab::Attention {
                    attention.request(state);
                }
                self.showing = Some((next, Instant::now()));
            }
            Some((shown, since)) => {
                let settled = since.elapsed() > Duration::from_millis(800);
                let attention_ready = shown != Tab::Attention || state.attention.is_some() || since.elapsed() > Duration::from_secs(90);
                if settled && attention_ready {
                    let path = self.path_for(shown);
                    let waiting = self.waiting.clone();
                    ctx.request_screenshot(move |image| {
                        let result = save_color_image(&image, &path).map(|()| path);
                        if let Ok(mut w) = waiting.lock() {
                            *w = Some(result);
                        }
                    });
                    self.shot_pending = true;
                }
            }
        }
        ctx.request_repaint();
    }
}

/// Writes an egui screenshot as PNG.
pub fn save_color_image(image: &egui::ColorImage, path: &std::path::Path) -> Result<(), String> {
    let [w, h] = image.size;
    let bytes: Vec<u8> = image.pixels.iter().flat_map(|c| c.to_array()).collect();
    let rgba = image::RgbaImage::from_raw(w as u32, h as u32, bytes).ok_or("screenshot size mismatch")?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
    }
    rgba.save(path).map_err(|e| format!("writing {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tabs_have_names_and_round_trip() {
        for tab in Tab::ALL {
            assert_eq!(Tab::from_name(tab.name()), Some(tab));
        }
    }
}
