//! The engine: jobs run on their own thread, take [`Command`]s and emit [`Event`]s. Nothing
//! here prints; the CLI prints events, the app draws them.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::Instant;

/// `YYYYmmdd-HHMMSS` in UTC, for run folder names.
pub fn utc_stamp() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!("{:04}{:02}{:02}-{:02}{:02}{:02}", t.year(), u8::from(t.month()), t.day(), t.hour(), t.minute(), t.second())
}

/// The phases a job goes through. Faces act on the typed ones (the app cuts its plots when
/// pre-training progress starts) and show every phase by its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Reading the backbone, checking the config and the plan against it.
    Loading,
    /// Pre-training; progress counts optimizer steps.
    Pretraining,
    /// Merging the adapters and writing the adapted backbone.
    Exporting,
    /// Feature extraction; progress counts images.
    Embedding,
    /// Supervised fine-tuning; progress counts optimizer steps.
    FineTuning,
    /// Any other step of a recipe, named for the person watching.
    Step(String),
}

impl Phase {
    pub fn step(name: impl Into<String>) -> Self {
        Self::Step(name.into())
    }

    /// Whether progress in this phase counts optimizer steps of a training loop.
    pub fn counts_steps(&self) -> bool {
        matches!(self, Self::Pretraining | Self::FineTuning)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Loading => "loading the backbone",
            Self::Pretraining => "pre-training",
            Self::Exporting => "exporting",
            Self::Embedding => "embedding images",
            Self::FineTuning => "fine-tuning",
            Self::Step(name) => name,
        })
    }
}

/// What a running job reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A phase starts; `total` units of work when known (images, steps).
    Phase { phase: Phase, total: Option<u64> },
    /// Progress within the current phase.
    Progress { done: u64, total: Option<u64>, per_second: f64 },
    /// A human-readable line (what the CLI logs and the app shows in its log view).
    Log { level: Level, message: String },
    /// Training metrics after optimizer step `step` (loss parts, learning rate, k-NN, ...):
    /// what the app plots and the CLI shows beside the progress bar.
    Metrics { step: u64, values: Vec<(String, f64)> },
    /// A file the job wrote that a person may want to open.
    Artifact { label: String, path: PathBuf },
    /// The job paused or resumed (after a command).
    Paused(bool),
    /// The crops of the batch of optimizer step `step` (what the app's batch viewer shows).
    BatchPreview(Arc<BatchPreview>),
    /// The answer to [`Command::Attention`].
    Attention(Arc<AttentionView>),
    /// The job ended; `Ok` carries a one-paragraph summary.
    Finished(Result<String, String>),
}

/// A few samples of a training batch as images: per sample its two global crops (with the
/// iBOT masks of each, row-major over `grid`×`grid` patches) and its local crops; for MAE, the
/// one crop it reconstructs, with the step's patch mask, and the reconstruction.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchPreview {
    pub step: u64,
    /// Patches per side of a global crop.
    pub grid: usize,
    pub samples: Vec<SamplePreview>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SamplePreview {
    /// The source image the crops were cut from (a thumbnail), when it could be read again.
    pub source: Option<image::RgbImage>,
    pub globals: Vec<image::RgbImage>,
    /// `globals.len() × grid²` masks, crop after crop (true = masked).
    pub masks: Vec<bool>,
    pub locals: Vec<image::RgbImage>,
    /// MAE: the crop as the model reconstructs it after the step (masked patches predicted by
    /// the decoder, visible ones as they were).
    pub reconstruction: Option<image::RgbImage>,
}

/// Which CLS-attention map a face wants from a running job.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionRequest {
    /// Chosen by the face; repeated in the answer.
    pub id: u64,
    /// The image (any size; the job resizes and centre-crops it to the model's input).
    pub image: Arc<image::RgbImage>,
    pub layer: usize,
    /// `None`: the mean over heads.
    pub head: Option<usize>,
}

/// CLS attention of one image in the source backbone and in the current student.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionView {
    pub id: u64,
    /// The image as the model saw it.
    pub image: image::RgbImage,
    pub source: AttentionMap,
    pub student: AttentionMap,
    /// Optimizer step of the student.
    pub step: u64,
}

/// CLS attention over the patch grid of one image.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionMap {
    pub layer: usize,
    /// `None`: mean over heads.
    pub head: Option<usize>,
    pub rows: usize,
    pub cols: usize,
    /// `rows × cols`, row-major; the attention probabilities (they sum to at most 1).
    pub values: Vec<f32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
}

/// What the face can ask of a running job.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Pause,
    Resume,
    Stop,
    /// Compute a CLS-attention map between steps (also while paused); answered with
    /// [`Event::Attention`] by jobs that have a model, ignored by others.
    Attention(AttentionRequest),
}

/// A job's side of the channels: emit events, poll commands between units of work.
pub struct JobContext {
    events: Sender<Event>,
    commands: Receiver<Command>,
    phase_started: Instant,
}

/// Returned by [`JobContext::checkpoint`]: whether the job should go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

impl JobContext {
    /// A context whose events go to `events` and whose commands come from `commands`.
    pub fn new(events: Sender<Event>, commands: Receiver<Command>) -> Self {
        Self { events, commands, phase_started: Instant::now() }
    }

    pub fn emit(&self, event: Event) {
        // A face that went away must not kill the job: the results still land on disk.
        let _ = self.events.send(event);
    }

    pub fn info(&self, message: impl Into<String>) {
        self.emit(Event::Log { level: Level::Info, message: message.into() });
    }

    pub fn warn(&self, message: impl Into<String>) {
        self.emit(Event::Log { level: Level::Warn, message: message.into() });
    }

    pub fn phase(&mut self, phase: Phase, total: Option<u64>) {
        self.phase_started = Instant::now();
        self.emit(Event::Phase { phase, total });
    }

    /// Reports `done` units of the current phase, with the rate since the phase began.
    pub fn progress(&self, done: u64, total: Option<u64>) {
        let secs = self.phase_started.elapsed().as_secs_f64().max(1e-9);
        self.emit(Event::Progress { done, total, per_second: done as f64 / secs });
    }

    pub fn artifact(&self, label: impl Into<String>, path: impl Into<PathBuf>) {
        self.emit(Event::Artifact { label: label.into(), path: path.into() });
    }

    /// Called between units of work: applies pause (blocking until resume or stop) and stop.
    /// Attention requests are dropped; jobs that can answer them call
    /// [`JobContext::checkpoint_with`].
    pub fn checkpoint(&self) -> Flow {
        self.checkpoint_with(|_| {})
    }

    /// [`JobContext::checkpoint`] that hands every [`Command::Attention`] to `answer`, also
    /// while paused.
    pub fn checkpoint_with(&self, mut answer: impl FnMut(AttentionRequest)) -> Flow {
        let mut paused = false;
        loop {
            let command = if paused {
                match self.commands.recv() {
                    Ok(c) => c,
                    Err(_) => return Flow::Stop,
                }
            } else {
                match self.commands.try_recv() {
                    Ok(c) => c,
                    Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => return Flow::Continue,
                }
            };
            match command {
                Command::Stop => return Flow::Stop,
                Command::Pause if !paused => {
                    paused = true;
                    self.emit(Event::Paused(true));
                }
                Command::Resume if paused => {
                    self.emit(Event::Paused(false));
                    return Flow::Continue;
                }
                Command::Attention(request) => answer(request),
                _ => {}
            }
        }
    }
}

/// The face's side of a running job.
pub struct JobHandle {
    pub events: Receiver<Event>,
    commands: Sender<Command>,
    thread: Option<JoinHandle<()>>,
}

impl JobHandle {
    pub fn send(&self, command: Command) {
        let _ = self.commands.send(command);
    }

    /// Waits for the job thread to end (its `Finished` event has been sent by then).
    pub fn join(mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Runs `job` on its own thread. Its result (or a panic, turned into an error) ends the event
/// stream with [`Event::Finished`].
pub fn spawn<F>(name: &str, job: F) -> JobHandle
where
    F: FnOnce(&mut JobContext) -> anyhow::Result<String> + Send + 'static,
{
    let (event_tx, event_rx) = mpsc::channel();
    let (command_tx, command_rx) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(format!("explora-{name}"))
        .spawn(move || {
            let mut ctx = JobContext::new(event_tx.clone(), command_rx);
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut ctx)));
            let finished = match result {
                Ok(Ok(summary)) => Ok(summary),
                Ok(Err(error)) => Err(format!("{error:#}")),
                Err(panic) => Err(panic_message(panic)),
            };
            let _ = event_tx.send(Event::Finished(finished));
        })
        .expect("spawn job thread");
    JobHandle { events: event_rx, commands: command_tx, thread: Some(thread) }
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    let text = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into());
    let hint = if text.contains("OutOfMemory") || text.contains("out of memory") || text.contains("BufferTooBig") {
        " (the GPU ran out of memory: try a smaller --batch)"
    } else {
        ""
    };
    format!("internal error: {text}{hint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_commands_round_trip() {
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let handle = spawn("test", move |ctx| {
            ctx.phase(Phase::step("count"), Some(3));
            let mut done = 0;
            for _ in 0..3 {
                go_rx.recv().unwrap();
                if ctx.checkpoint() == Flow::Stop {
                    return Ok(format!("stopped after {done}"));
                }
                done += 1;
                ctx.progress(done, Some(3));
            }
            Ok(format!("counted {done}"))
        });
        // Pause, resume, then stop before the third unit.
        handle.send(Command::Pause);
        go_tx.send(()).unwrap();
        assert_eq!(handle.events.recv().unwrap(), Event::Phase { phase: Phase::step("count"), total: Some(3) });
        assert_eq!(handle.events.recv().unwrap(), Event::Paused(true));
        handle.send(Command::Resume);
        assert_eq!(handle.events.recv().unwrap(), Event::Paused(false));
        assert!(matches!(handle.events.recv().unwrap(), Event::Progress { done: 1, .. }));
        go_tx.send(()).unwrap();
        assert!(matches!(handle.events.recv().unwrap(), Event::Progress { done: 2, .. }));
        handle.send(Command::Stop);
        go_tx.send(()).unwrap();
        assert_eq!(handle.events.recv().unwrap(), Event::Finished(Ok("stopped after 2".into())));
        handle.join();
    }

    #[test]
    fn errors_and_panics_end_the_stream_with_a_message() {
        let handle = spawn("fail", |_| anyhow::bail!("bad path /x"));
        assert_eq!(handle.events.recv().unwrap(), Event::Finished(Err("bad path /x".into())));
        let handle = spawn("panic", |_| panic!("BufferTooBig"));
        match handle.events.recv().unwrap() {
            Event::Finished(Err(msg)) => assert!(msg.contains("smaller --batch"), "{msg}"),
            other => panic!("unexpected {other:?}"),
        }
    }
}
