//! The app's shared state: the run config being edited, the model it applies to, the plan,
//! and what the running job reported. No egui here, so every rule can be unit-tested without a
//! window. Budgets, validation and defaults come from the functions the CLI calls
//! (`PlanSpec::resolve`, `AdaptationPlan::budget`, `PretrainConfig::activation_bytes`,
//! `PretrainConfig::validate`); jobs run on the engine's thread and talk through events and
//! commands only.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver};
use std::time::Instant;

use burn::tensor::Device;

use crate::device::{self, AdapterInfo, DeviceChoice};
use crate::engine::{self, AttentionView, BatchPreview, JobHandle, Level, Phase};
use crate::model::VitConfig;
use crate::peft::{AdaptationPlan, BlockMode, Budget, PlanSpec, Preset};
use crate::train::PretrainConfig;

/// Lines of log kept.
const LOG_LINES: usize = 500;

mod run;

/// One job the app started (a pre-training run) and what it reported so far.
pub struct RunState {
    handle: Option<JobHandle>,
    pub out: PathBuf,
    pub phase: Phase,
    pub step: u64,
    pub total: Option<u64>,
    pub paused: bool,
    /// Set when a stop was asked for and the job has not ended yet.
    pub stopping: bool,
    pub finished: Option<Result<String, String>>,
    /// `(when, step)` of recent metrics, for the step rate and the ETA.
    recent: Vec<(Instant, u64)>,
}

impl RunState {
    pub fn is_running(&self) -> bool {
        self.finished.is_none() && self.handle.is_some()
    }

    /// Optimizer steps per second over the last few steps.
    pub fn steps_per_second(&self) -> Option<f64> {
        let (first, last) = (self.recent.first()?, self.recent.last()?);
        let secs = last.0.duration_since(first.0).as_secs_f64();
        (last.1 > first.1 && secs > 0.0).then(|| (last.1 - first.1) as f64 / secs)
    }

    /// Seconds until the last step at the current rate.
    pub fn eta_seconds(&self) -> Option<f64> {
        let rate = self.steps_per_second()?;
        Some(self.total?.saturating_sub(self.step) as f64 / rate)
    }
}

/// A background job whose only answer is its events (architecture detection, attention on a
/// finished run).
struct SideJob {
    handle: JobHandle,
    config: Option<Receiver<VitConfig>>,
}

/// Everything the panels show and edit.
pub struct AppState {
    pub device_choice: DeviceChoice,
    /// burn's device (shared with the window's renderer when the app opened it).
    pub device: Option<Device>,
    pub device_name: String,
    pub adapters: Vec<AdapterInfo>,
    /// The run config the next start uses (the same TOML the headless mode reads).
    pub config: PretrainConfig,
    /// Where the next run writes.
    pub out: PathBuf,
    /// The architecture of the chosen model, once known.
    pub vit: Option<VitConfig>,
    /// What is known about the chosen model (detected layout and architecture, or an error).
    pub model_note: String,
    pub model_error: Option<String>,
    /// The preset the plan was edited from.
    pub preset: String,
    /// The plan as edited (also written to `config.plan` as an exact spec).
    pub plan: AdaptationPlan,
    pub run: Option<RunState>,
    /// Metric name → `[step, value]` points.
    pub series: BTreeMap<String, Vec<[f64; 2]>>,
    pub batch: Option<Arc<BatchPreview>>,
    pub attention: Option<Arc<AttentionView>>,
    /// The attention request waiting for its answer.
    pub attention_pending: Option<u64>,
    pub log: Vec<(Level, String)>,
    /// Whether heatmaps are drawn by the WGSL shader (a wgpu renderer is there).
    pub gpu_heatmap: bool,
    next_request: u64,
    side: Vec<SideJob>,
}

/// A new run folder `runs/app-<UTC time>` under the working directory (absolute, so that the
/// paths written into its `config.toml` still hold when it is resumed from elsewhere).
pub fn default_out() -> PathBuf {
    let runs = std::env::current_dir().unwrap_or_default().join("runs");
    runs.join(format!("app-{}", crate::engine::utc_stamp()))
}

impl AppState {
    /// The built-in default run for `device` (smaller on software Vulkan), as `explora
    /// --no-gui` would start it.
    pub fn builtin(device_choice: DeviceChoice, device: Option<Device>) -> Self {
        let config = match &device {
            Some(d) => crate::recipes::default_run::DefaultRun::for_device(PathBuf::new(), d).config,
            None => PretrainConfig::builtin(),
        };
        Self::new(config, device_choice, device)
    }

    pub fn new(config: PretrainConfig, device_choice: DeviceChoice, device: Option<Device>) -> Self {
        let device_name = device.as_ref().map(device::describe).unwrap_or_else(|| "not opened".into());
        let mut state = Self {
            device_choice,
            device,
            device_name,
            adapters: Vec::new(),
            config: PretrainConfig::default(),
            out: default_out(),
            vit: None,
            model_note: String::new(),
            model_error: None,
            preset: "explora".into(),
            plan: AdaptationPlan::frozen(0),
            run: None,
            series: BTreeMap::new(),
            batch: None,
            attention: None,
            attention_pending: None,
            log: Vec::new(),
            gpu_heatmap: false,
            next_request: 1,
            side: Vec::new(),
        };
        state.set_config(config);
        state
    }

    /// Replaces the run config (loaded from a file, reset, ...) and works out the model.
    pub fn set_config(&mut self, config: PretrainConfig) {
        self.preset = config.plan.preset.clone();
        self.config = config;
        self.vit = None;
        self.model_error = None;
        match (&self.config.model.weights, &self.config.model.arch) {
            // The shipped source backbone is known without loading it.
            (Some(path), _) if crate::checkpoint::builtin::bytes(path).is_some() => match crate::checkpoint::builtin::config(path) {
                Ok(vit) => {
                    self.model_note =
                        format!("built-in source backbone: the {} ViT explora pre-trained on the procedural source domain", vit.name);
                    self.set_vit(vit);
                }
                Err(e) => self.model_error = Some(format!("{e:#}")),
            },
            (Some(path), _) => {
                self.model_note = format!("checkpoint {}: detecting the architecture…", path.display());
                self.detect_model(path.clone());
            }
            (None, Some(_)) => match self.config.arch_preset() {
                Ok(Some(vit)) => {
                    self.model_note = format!("built-in {} backbone (random weights standing in for a pre-trained one)", vit.name);
                    self.set_vit(vit);
                }
                Ok(None) => unreachable!("model.arch is set"),
                Err(e) => self.model_error = Some(e.to_string()),
            },
            (None, None) => self.model_error = Some("choose a checkpoint or a built-in model".into()),
        }
    }

    /// The model is known: resolve the config's plan on it (or the preset when it fails).
    pub fn set_vit(&mut self, vit: VitConfig) {
        self.plan = match self.config.plan.resolve(&vit) {
            Ok(plan) => plan,
            Err(_) => {
                let preset = self.preset.parse().unwrap_or(Preset::Explora);
                AdaptationPlan::preset(preset, &vit)
            }
        };
        self.vit = Some(vit);
    }

    /// Loads the checkpoint on the job thread to detect its layout and architecture.
    fn detect_model(&mut self, path: PathBuf) {
        let arch = match self.config.arch_preset() {
            Ok(arch) => arch,
            Err(e) => {
                self.model_error = Some(e.to_string());
                return;
            }
        };
        let device = match self.job_device() {
            Ok(device) => device,
            Err(e) => {
                self.model_error = Some(e);
                return;
            }
        };
        let (tx, rx) = mpsc::channel();
        let handle = engine::spawn("inspect", move |_ctx| {
            let (_, report) = crate::checkpoint::load_backbone_with(&path, arch, &device)?;
            let _ = tx.send(report.config.clone());
            Ok(format!("{report}"))
        });
        self.side.push(SideJob { handle, config: Some(rx) });
    }

    // ---- the adaptation plan -------------------------------------------------------------

    /// Applies a preset (`explora`, `lora`, `linear`, `full`, `blocks:K`).
    pub fn apply_preset(&mut self, name: &str) -> Result<(), String> {
        let preset: Preset = name.parse()?;
        let vit = self.vit.as_ref().ok_or("the model is not known yet")?;
        self.preset = name.to_string();
        self.set_plan(AdaptationPlan::preset(preset, vit));
        Ok(())
    }

    /// Edits the plan; the config's `[plan]` follows.
    pub fn edit_plan(&mut self, edit: impl FnOnce(&mut AdaptationPlan)) {
        let mut plan = self.plan.clone();
        edit(&mut plan);
        self.set_plan(plan);
    }

    /// Replaces the whole plan (the adaptation panel's switches).
    pub fn set_plan_from_panel(&mut self, plan: AdaptationPlan) {
        self.set_plan(plan);
    }

    fn set_plan(&mut self, plan: AdaptationPlan) {
        self.config.plan = PlanSpec::exact(&self.preset, &plan);
        self.plan = plan;
    }

    /// Chooses the objective. Switching to UpStep also switches the plan to UpStep's default
    /// (LoRA r=8 on Q, K, V of every block, nothing else), which the adaptation panel can then
    /// edit; the other objectives keep the plan as it is.
    pub fn choose_objective(&mut self, objective: crate::train::Objective) {
        let before = self.config.objective;
        self.config.objective = objective;
        if objective == crate::train::Objective::Upstep
            && before != objective
            && let Some(vit) = self.vit.as_ref()
            && let Ok(plan) = PretrainConfig::upstep_plan().resolve(vit)
        {
            self.preset = "lora".into();
            self.set_plan(plan);
        }
    }

    pub fn set_block_mode(&mut self, block: usize, mode: BlockMode) {
        self.edit_plan(|p| {
            if let Some(m) = p.blocks.get_mut(block) {
                *m = mode;
            }
        });
    }

    /// The plan as the engine will see it, or the message `explora plan` would print.
    pub fn plan_check(&self) -> Result<AdaptationPlan, String> {
        let vit = self.vit.as_ref().ok_or("the model is not known yet")?;
        self.config.plan.resolve(vit).map_err(|e| e.to_string())
    }

    /// Trainable parameters per component, as `explora plan` prints them.
    /// The plan's budget; under the MAE objective with the decoder beside it (the fresh
    /// decoder of `[mae]`, which trains fully).
    pub fn budget(&self) -> Option<Budget> {
        Some(self.config.planned_budget(self.vit.as_ref()?, &self.plan))
    }

    /// Activation memory of one micro-batch at the configured batch, of what the objective's
    /// trained model sees.
    pub fn activation_bytes(&self) -> Option<u64> {
        Some(self.config.activation_bytes(self.vit.as_ref()?, &self.plan))
    }
}

/// The plots of an earlier run: `metrics.jsonl` as name → `[step, value]` points.
pub fn read_metrics(path: &Path) -> BTreeMap<String, Vec<[f64; 2]>> {
    let mut series: BTreeMap<String, Vec<[f64; 2]>> = BTreeMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        let Ok(serde_json::Value::Object(values)) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let Some(step) = values.get("step").and_then(|s| s.as_f64()) else { continue };
        for (name, value) in &values {
            if let (true, Some(v)) = (name != "step", value.as_f64()) {
                series.entry(name.clone()).or_default().push([step, v]);
            }
        }
    }
    series
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Command, Event};
    use crate::inspect::attention::AttentionMap;
    use crate::peft::LoraTargets;
    use image::RgbImage;

    fn tiny_state() -> AppState {
        let mut config = PretrainConfig::builtin_software();
        config.crops.global_size = 32;
        config.crops.local_size = 16;
        let mut s = AppState::new(config, DeviceChoice::Cpu, None);
        s.out = std::env::temp_dir().join(format!("explora-gui-state-{}", std::process::id()));
        s
    }

    #[test]
    fn the_builtin_run_opens_ready_on_the_tiny_model() {
        let s = tiny_state();
        assert_eq!(s.vit.as_ref().unwrap().name, "tiny");
        assert!(s.model_note.starts_with("built-in source backbone"), "{}", s.model_note);
        let explora = AdaptationPlan::preset(Preset::Explora, &VitConfig::tiny()).with_unfrozen(&[2, 3]).unwrap();
        assert_eq!(s.plan, explora);
        assert!(s.problems().is_empty(), "{:?}", s.problems());
    }

    #[test]
    fn choosing_upstep_switches_to_its_lora_plan() {
        let mut s = tiny_state();
        s.choose_objective(crate::train::Objective::Upstep);
        assert_eq!(s.config.objective, crate::train::Objective::Upstep);
        assert_eq!(s.plan.lora.rank, 8);
        assert_eq!(s.plan.lora.targets.to_string(), "q,k,v");
        assert!(s.plan.blocks.iter().all(|m| *m == BlockMode::Lora) && !s.plan.norms && !s.plan.cls_token);
        assert_eq!(s.config.resolve_plan(&VitConfig::tiny()).unwrap(), s.plan);
        // Back to DINOv2: the plan stays as edited.
        s.choose_objective(crate::train::Objective::Dinov2);
        assert_eq!(s.plan.lora.rank, 8);
    }

    #[test]
    fn plan_edits_give_the_budget_explora_plan_prints() {
        let mut s = tiny_state();
        let vit = VitConfig::tiny();
        let check = |s: &AppState| {
            let resolved = s.config.plan.resolve(&vit).unwrap();
            assert_eq!(resolved, s.plan);
            assert_eq!(s.budget().unwrap(), resolved.budget(&vit));
        };
        check(&s);
        let before = s.budget().unwrap().trainable;
        s.set_block_mode(0, BlockMode::Unfrozen);
        check(&s);
        let unfrozen = s.budget().unwrap().trainable;
        assert!(unfrozen > before);
        s.edit_plan(|p| p.lora.rank = 16);
        check(&s);
        s.edit_plan(|p| p.lora.targets = LoraTargets { fc1: true, fc2: true, ..LoraTargets::QV });
        check(&s);
        s.edit_plan(|p| p.convpass = Some(Default::default()));
        check(&s);
        s.edit_plan(|p| p.memory_tokens = Some(4));
        check(&s);
        s.apply_preset("lora").unwrap();
        check(&s);
        // Plain LoRA r=64 on Q,V of the 4 tiny blocks (width 64): 4 × 2 × 64 × (64 + 64).
        assert_eq!(s.budget().unwrap().trainable, 4 * 2 * 64 * 128);
        s.apply_preset("blocks:2").unwrap();
        check(&s);
        assert_eq!(s.plan.unfrozen_blocks(), vec![2, 3]);
        assert!(s.apply_preset("blocks:x").unwrap_err().contains("unknown preset"));
        // The activation estimate is the function `explora plan` calls.
        assert_eq!(s.activation_bytes().unwrap(), s.config.activation_bytes(&vit, &s.plan));
    }

    #[test]
    fn validation_messages_are_the_cli_ones() {
        let mut s = tiny_state();
        s.edit_plan(|p| p.lora.rank = 65);
        let problems = s.problems();
        assert!(problems.iter().any(|p| p.contains("`lora.rank` 65 is larger than the q projection (64→64)")), "{problems:?}");
        assert!(s.start().is_err());
        s.edit_plan(|p| p.lora.rank = 8);
        s.config.data.images = Some("/no/such/folder".into());
        let problems = s.problems();
        assert_eq!(problems[0], "invalid run config: `data.images` /no/such/folder is not a folder");
        s.config.data.images = None;
        s.config.crops.global_size = 36;
        assert!(s.problems().iter().any(|p| p.contains("`crops.global_size` 36 is not a multiple of the model's patch size 8")));
        s.config.crops.global_size = 32;
        assert!(s.problems().is_empty(), "{:?}", s.problems());
    }

    #[test]
    fn events_and_commands_round_trip_through_the_engine() {
        let mut s = tiny_state();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let preview = Arc::new(BatchPreview { step: 1, grid: 2, samples: Vec::new() });
        let sent = preview.clone();
        let handle = engine::spawn("fake", move |ctx| {
            ctx.phase(Phase::Pretraining, Some(3));
            for step in 1..=3u64 {
                go_rx.recv().ok();
                let flow = ctx.checkpoint_with(|request| {
                    let map = AttentionMap { layer: request.layer, head: request.head, rows: 1, cols: 1, values: vec![1.0] };
                    ctx.emit(Event::Attention(Arc::new(AttentionView {
                        id: request.id,
                        image: (*request.image).clone(),
                        source: map.clone(),
                        student: map,
                        step,
                    })));
                });
                if flow == engine::Flow::Stop {
                    return Ok(format!("stopped at {step}"));
                }
                ctx.emit(Event::BatchPreview(sent.clone()));
                ctx.emit(Event::Metrics { step, values: vec![("loss".into(), 1.0 / step as f64), ("teacher_temp".into(), 0.04)] });
                ctx.progress(step, Some(3));
            }
            Ok("done".into())
        });
        s.attach(handle, s.out.clone(), Some(3));
        let wait = |s: &mut AppState, until: &dyn Fn(&AppState) -> bool| {
            let began = Instant::now();
            while !until(s) {
                s.poll();
                assert!(began.elapsed().as_secs() < 10, "timed out");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        };
        go_tx.send(()).unwrap();
        wait(&mut s, &|s| s.series.get("loss").is_some_and(|v| v.len() == 1));
        assert_eq!(s.batch.as_ref().unwrap().step, 1);
        assert_eq!(s.run.as_ref().unwrap().step, 1);
        // Pause, ask for attention while paused (answered at once), resume.
        s.send(Command::Pause);
        go_tx.send(()).unwrap();
        wait(&mut s, &|s| s.run.as_ref().unwrap().paused);
        let id = s.request_attention(Arc::new(RgbImage::new(4, 4)), 3, Some(1)).unwrap();
        wait(&mut s, &|s| s.attention.is_some());
        assert_eq!(s.attention.as_ref().unwrap().id, id);
        assert_eq!(s.attention.as_ref().unwrap().source.head, Some(1));
        assert_eq!(s.attention_pending, None);
        s.send(Command::Resume);
        wait(&mut s, &|s| s.series.get("loss").is_some_and(|v| v.len() == 2));
        assert_eq!(s.series["teacher_temp"], vec![[1.0, 0.04], [2.0, 0.04]]);
        s.send(Command::Stop);
        go_tx.send(()).unwrap();
        wait(&mut s, &|s| !s.is_running());
        assert_eq!(s.run.as_ref().unwrap().finished, Some(Ok("stopped at 3".into())));
        assert!(s.log.iter().any(|(_, m)| m == "stopped at 3"));
    }
}
