//! Starting, resuming and following a run: the checks before a start, the job on the engine's
//! thread, the events it sends back (phases, progress, metrics, previews, attention) and the
//! commands the panels send to it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::tensor::Device;
use image::RgbImage;

use super::{AppState, LOG_LINES, RunState, SideJob, read_metrics};
use crate::device;
use crate::engine::{self, AttentionRequest, AttentionView, Command, Event, JobHandle, Level, Phase};
use crate::train::PretrainJob;

impl AppState {
    // ---- validation and starting -----------------------------------------------------------

    /// Everything that stops a start, in the words of the CLI and the engine.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Err(e) = self.config.validate() {
            out.push(e.to_string());
        }
        if let Some(e) = &self.model_error {
            out.push(e.clone());
        }
        if let Some(vit) = &self.vit {
            if let Err(e) = self.plan_check() {
                out.push(e);
            }
            if let Err(e) = self.config.check_model(vit) {
                out.push(e.to_string());
            }
        } else if self.model_error.is_none() {
            out.push("the model's architecture is not known yet".into());
        }
        if self.out.join("config.toml").exists() {
            out.push(format!("{} already holds a run; choose another run folder, or resume it from the Setup panel", self.out.display()));
        }
        out
    }

    pub fn is_running(&self) -> bool {
        self.run.as_ref().is_some_and(RunState::is_running)
    }

    pub(super) fn job_device(&mut self) -> Result<Device, String> {
        if let Some(d) = &self.device {
            return Ok(d.clone());
        }
        let d = device::open(&self.device_choice).map_err(|e| e.to_string())?;
        self.device_name = device::describe(&d);
        self.device = Some(d.clone());
        Ok(d)
    }

    /// Starts pre-training with the current config in `out`.
    pub fn start(&mut self) -> Result<(), String> {
        if self.is_running() {
            return Err("a run is already going".into());
        }
        let problems = self.problems();
        if let Some(first) = problems.first() {
            return Err(first.clone());
        }
        let job = PretrainJob { config: self.config.clone(), out: self.out.clone(), resume: false };
        self.launch(job)
    }

    /// Continues the run in `dir` from its newest checkpoint (as `explora --no-gui resume`).
    pub fn resume(&mut self, dir: &Path, steps: Option<u64>) -> Result<(), String> {
        if self.is_running() {
            return Err("a run is already going".into());
        }
        let mut job = PretrainJob::resume(dir).map_err(|e| format!("{e:#}"))?;
        if let Some(steps) = steps {
            job.config.run.steps = steps;
        }
        self.set_config(job.config.clone());
        self.out = dir.to_path_buf();
        let earlier = read_metrics(&dir.join("metrics.jsonl"));
        self.launch(job)?;
        // The earlier steps stay on the plots (cut at the checkpoint by the first progress).
        self.series = earlier;
        Ok(())
    }

    fn launch(&mut self, job: PretrainJob) -> Result<(), String> {
        let device = self.job_device()?;
        self.series.clear();
        self.batch = None;
        self.attention = None;
        self.attention_pending = None;
        let out = job.out.clone();
        // The same job as `explora --no-gui pretrain` / `resume`: pre-training, then the
        // evaluation when the config's `[evaluate]` section asks for it.
        let handle = engine::spawn("pretrain", move |ctx| crate::recipes::run::run(&job, &device, ctx));
        self.push_log(Level::Info, format!("started pre-training in {}", out.display()));
        self.run = Some(RunState {
            handle: Some(handle),
            out,
            phase: Phase::step("starting"),
            step: 0,
            total: Some(self.config.run.steps),
            paused: false,
            stopping: false,
            finished: None,
            recent: Vec::new(),
        });
        Ok(())
    }

    /// Attaches a job started elsewhere (tests drive the event handling with fake jobs).
    pub fn attach(&mut self, handle: JobHandle, out: PathBuf, total: Option<u64>) {
        self.run = Some(RunState {
            handle: Some(handle),
            out,
            phase: Phase::step(""),
            step: 0,
            total,
            paused: false,
            stopping: false,
            finished: None,
            recent: Vec::new(),
        });
    }

    /// Sends a command to the running job.
    pub fn send(&mut self, command: Command) {
        if let Some(run) = &mut self.run
            && let Some(handle) = &run.handle
            && run.finished.is_none()
        {
            if command == Command::Stop {
                run.stopping = true;
            }
            handle.send(command);
        }
    }

    /// Asks for the CLS attention of `image`: from the running job between its steps, or,
    /// after a run, from the run folder's source and adapted backbones.
    pub fn request_attention(&mut self, image: Arc<RgbImage>, layer: usize, head: Option<usize>) -> Result<u64, String> {
        let id = self.next_request;
        self.next_request += 1;
        let request = AttentionRequest { id, image, layer, head };
        if self.is_running() {
            self.send(Command::Attention(request));
        } else {
            let out = self.run.as_ref().map(|r| r.out.clone()).unwrap_or_else(|| self.out.clone());
            if !out.join("backbone.safetensors").exists() {
                return Err("start a run first: the maps come from the source backbone and the student being trained".into());
            }
            let device = self.job_device()?;
            let handle = engine::spawn("attention", move |ctx| {
                let view = crate::recipes::run::attention_of_finished_run(&out, &request, &device)?;
                ctx.emit(Event::Attention(Arc::new(view)));
                Ok(String::new())
            });
            self.side.push(SideJob { handle, config: None });
        }
        self.attention_pending = Some(id);
        Ok(id)
    }

    pub(super) fn push_log(&mut self, level: Level, message: String) {
        self.log.push((level, message));
        if self.log.len() > LOG_LINES {
            self.log.drain(..self.log.len() - LOG_LINES);
        }
    }

    /// Takes every event that arrived (never blocks). Returns whether anything changed.
    pub fn poll(&mut self) -> bool {
        let mut events = Vec::new();
        if let Some(run) = &self.run
            && let Some(handle) = &run.handle
        {
            while let Ok(e) = handle.events.try_recv() {
                events.push(e);
            }
        }
        let changed = !events.is_empty();
        for event in events {
            self.on_run_event(event);
        }
        changed | self.poll_side_jobs()
    }

    fn on_run_event(&mut self, event: Event) {
        let Some(run) = self.run.as_mut() else { return };
        match event {
            Event::Phase { phase, total } => {
                // The status bar counts pre-training steps; other phases (evaluation, export)
                // only change the phase shown beside them.
                if phase == Phase::Pretraining && total.is_some() {
                    run.total = total;
                }
                run.phase = phase;
            }
            Event::Progress { done, total, .. } => {
                if run.phase == Phase::Pretraining {
                    if run.recent.is_empty() {
                        // The first progress of a (resumed) run: its start step. Points after it
                        // were not checkpointed and will be computed again.
                        for points in self.series.values_mut() {
                            points.retain(|p| p[0] <= done as f64);
                        }
                    }
                    run.step = done;
                    run.total = total.or(run.total);
                }
            }
            Event::Log { level, message } => self.push_log(level, message),
            Event::Metrics { step, values } => {
                run.step = run.step.max(step);
                run.recent.push((Instant::now(), step));
                if run.recent.len() > 10 {
                    run.recent.remove(0);
                }
                for (name, value) in values {
                    self.series.entry(name).or_default().push([step as f64, value]);
                }
            }
            Event::Artifact { label, path } => self.push_log(Level::Info, format!("wrote {label}: {}", path.display())),
            Event::Paused(paused) => run.paused = paused,
            Event::BatchPreview(preview) => self.batch = Some(preview),
            Event::Attention(view) => self.on_attention(view),
            Event::Finished(result) => {
                run.stopping = false;
                run.paused = false;
                let message = match &result {
                    Ok(summary) => (Level::Info, summary.clone()),
                    Err(error) => (Level::Warn, format!("the run failed: {error}")),
                };
                run.finished = Some(result);
                if let Some(handle) = run.handle.take() {
                    handle.join();
                }
                self.push_log(message.0, message.1);
            }
        }
    }

    fn on_attention(&mut self, view: Arc<AttentionView>) {
        if self.attention_pending == Some(view.id) {
            self.attention_pending = None;
        }
        self.attention = Some(view);
    }

    fn poll_side_jobs(&mut self) -> bool {
        let mut changed = false;
        let mut i = 0;
        while i < self.side.len() {
            let mut finished = None;
            let mut events = Vec::new();
            while let Ok(e) = self.side[i].handle.events.try_recv() {
                events.push(e);
            }
            for event in events {
                changed = true;
                match event {
                    Event::Attention(view) => self.on_attention(view),
                    Event::Log { level, message } => self.push_log(level, message),
                    Event::Finished(result) => finished = Some(result),
                    _ => {}
                }
            }
            if let Some(result) = finished {
                let job = self.side.remove(i);
                let config = job.config.as_ref().and_then(|rx| rx.try_recv().ok());
                let is_inspect = job.config.is_some();
                job.handle.join();
                match (result, config) {
                    (Ok(report), Some(vit)) => {
                        self.model_note = report;
                        self.model_error = None;
                        self.set_vit(vit);
                    }
                    (Err(e), _) if is_inspect => self.model_error = Some(e),
                    (Err(e), _) => {
                        self.attention_pending = None;
                        self.push_log(Level::Warn, format!("attention map: {e}"));
                    }
                    _ => {}
                }
            } else {
                i += 1;
            }
        }
        changed
    }

    /// Latest value of a metric.
    pub fn last(&self, name: &str) -> Option<f64> {
        self.series.get(name).and_then(|s| s.last()).map(|p| p[1])
    }

    /// Asks the running job to stop and waits (up to `timeout`) until it has written its
    /// checkpoint and ended. For closing the window.
    pub fn stop_and_wait(&mut self, timeout: std::time::Duration) {
        if !self.is_running() {
            return;
        }
        self.send(Command::Stop);
        let began = Instant::now();
        while self.is_running() && began.elapsed() < timeout {
            if !self.poll() {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}
