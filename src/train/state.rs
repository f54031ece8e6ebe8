//! Training checkpoints: everything needed to continue a run bit for bit — the student's and
//! the teacher's trainable tensors (the frozen ones come from the base checkpoint), the AdamW
//! moments, the centering state and the step — in one safetensors file written atomically, so
//! a killed run always finds a complete checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};

use crate::checkpoint::{Metadata, RawTensor, TensorMap, is_disk_full, read_safetensors, write_safetensors};
use crate::model::params::{for_each_param, map_params};
use crate::model::to_vec;
use crate::objectives::{Centers, DinoModel};
use crate::optim::AdamW;

use super::config::Objective;

pub const FORMAT: &str = "explora-pretrain-v1";

fn raw(t: Tensor<1>) -> RawTensor {
    let data = to_vec(t);
    RawTensor::new(vec![data.len()], data)
}

/// The state of a run between two optimizer steps.
pub struct TrainState {
    /// Optimizer steps done.
    pub step: u64,
    pub student: DinoModel,
    pub teacher: DinoModel,
    pub optim: AdamW,
    pub centers: Centers,
}

impl TrainState {
    /// Step 0 of a run: the student (the adapted backbone + a fresh head), its EMA teacher, empty
    /// AdamW moments and zero centers on `device` (the plain device).
    pub fn new(backbone: crate::model::Vit, config: &super::PretrainConfig, device: &Device) -> Self {
        let student = DinoModel::new(crate::model::backward_friendly_layout(backbone), &config.head);
        let teacher = student.valid();
        Self {
            step: 0,
            student,
            teacher,
            optim: AdamW::new(config.betas(), config.optim.eps),
            centers: Centers::zeros(config.head.prototypes, device),
        }
    }
}

/// `checkpoints/step-0000120.safetensors`
pub fn checkpoint_path(run: &Path, step: u64) -> PathBuf {
    run.join("checkpoints").join(format!("step-{step:07}.safetensors"))
}

/// Checkpoints in the run folder, oldest first.
pub fn list(run: &Path) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(run.join("checkpoints"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("step-")?.strip_suffix(".safetensors")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// Writes the checkpoint for `state` atomically and deletes all but the newest `keep`.
pub fn save(run: &Path, state: &TrainState, keep: usize) -> anyhow::Result<PathBuf> {
    let mut tensors = trainable(&state.student, "student");
    for_each_param(&state.teacher, |name, t, _| {
        if tensors.contains_key(&format!("student.{name}")) {
            tensors.insert(format!("teacher.{name}"), raw(t));
        }
    });
    tensors.insert("center.dino".into(), raw(state.centers.dino.clone().flatten(0, 1)));
    tensors.insert("center.ibot".into(), raw(state.centers.ibot.clone().flatten(0, 1)));
    write(run, state.step, tensors, &state.optim, Objective::Dinov2, keep)
}

/// `module`'s trainable tensors under `prefix.<path>`.
pub(super) fn trainable<M: Module>(module: &M, prefix: &str) -> TensorMap {
    let mut tensors = TensorMap::new();
    for_each_param(module, |name, t, trainable| {
        if trainable {
            tensors.insert(format!("{prefix}.{name}"), raw(t));
        }
    });
    tensors
}

/// Writes a checkpoint of `step` (the model tensors, the optimizer state, the objective)
/// atomically and deletes all but the newest `keep`.
pub(super) fn write(
    run: &Path,
    step: u64,
    mut tensors: TensorMap,
    optim: &AdamW,
    objective: Objective,
    keep: usize,
) -> anyhow::Result<PathBuf> {
    let (moments, steps) = optim.save();
    tensors.extend(moments);
    let mut meta = Metadata::new();
    meta.insert("format".into(), FORMAT.into());
    meta.insert("objective".into(), objective.name().into());
    meta.insert("step".into(), step.to_string());
    meta.insert("optim_steps".into(), serde_json::to_string(&steps)?);
    let path = checkpoint_path(run, step);
    if let Err(error) = write_safetensors(&path, &tensors, &meta) {
        let last = match list(run).into_iter().rfind(|(s, _)| *s != step) {
            Some((s, p)) => format!("the last good checkpoint is step {s} ({})", p.display()),
            None => "there is no earlier checkpoint".to_string(),
        };
        let hint = if is_disk_full(&error) {
            format!("the disk is full: free some space, then continue with `explora --no-gui resume {}`", run.display())
        } else {
            format!("continue with `explora --no-gui resume {}`", run.display())
        };
        anyhow::bail!("could not write the checkpoint of step {step}: {error}; {last}; {hint}");
    }
    let all = list(run);
    for (_, old) in all.iter().take(all.len().saturating_sub(keep)) {
        let _ = std::fs::remove_file(old);
    }
    Ok(path)
}

/// Replaces `module`'s trainable tensors by `prefix.<path>` of `tensors`, naming in `missing`
/// each one the file lacks or holds with another size.
pub(super) fn restore_trainable<M: Module>(module: M, prefix: &str, tensors: &TensorMap, missing: &mut Vec<String>) -> M {
    let mut wanted = Vec::new();
    for_each_param(&module, |name, _, trainable| {
        if trainable {
            wanted.push(name.to_string());
        }
    });
    map_params(module, |name, current| {
        if !wanted.iter().any(|w| w == name) {
            return None;
        }
        let key = format!("{prefix}.{name}");
        match tensors.get(&key) {
            Some(t) if t.data.len() == current.dims()[0] => {
                Some(Tensor::from_data(TensorData::new(t.data.clone(), [t.data.len()]), &current.device()))
            }
            Some(t) => {
                missing.push(format!("{key} (has {} values, the model {})", t.data.len(), current.dims()[0]));
                None
            }
            None => {
                missing.push(key);
                None
            }
        }
    })
}

/// A checkpoint file read back whole.
pub struct Readable {
    pub step: u64,
    pub path: PathBuf,
    pub(super) tensors: TensorMap,
    pub(super) meta: Metadata,
}

impl Readable {
    /// The optimizer's step counts by parameter path.
    pub(super) fn optim_steps(&self) -> anyhow::Result<HashMap<String, u64>> {
        Ok(serde_json::from_str(self.meta.get("optim_steps").map_or("{}", String::as_str))?)
    }
}

/// Reads one checkpoint file; errors say why it cannot be used.
pub fn read(path: &Path) -> anyhow::Result<Readable> {
    let (tensors, meta) = read_safetensors(path)?;
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        anyhow::bail!("{} is not an explora pre-training checkpoint (format {:?})", path.display(), meta.get("format"));
    }
    let step: u64 = meta.get("step").and_then(|s| s.parse().ok()).ok_or_else(|| anyhow::anyhow!("{}: no step", path.display()))?;
    Ok(Readable { step, path: path.to_path_buf(), tensors, meta })
}

/// The newest checkpoint of the run that can be read, and a warning for each newer one that
/// cannot (a file cut short by a crash or a full disk, or damaged later). Unreadable files are
/// renamed to `*.unreadable` so they are kept for a look but never tried again.
pub fn newest_readable(run: &Path) -> (Option<Readable>, Vec<String>) {
    let mut warnings = Vec::new();
    for (_, path) in list(run).into_iter().rev() {
        match read(&path) {
            Ok(found) => return (Some(found), warnings),
            Err(error) => {
                let kept = path.with_extension("safetensors.unreadable");
                let moved = std::fs::rename(&path, &kept).is_ok();
                warnings.push(format!(
                    "skipping {}: {error:#}{}; trying the checkpoint before it",
                    path.display(),
                    if moved { format!(" (kept as {})", kept.display()) } else { String::new() }
                ));
            }
        }
    }
    (None, warnings)
}

/// Refuses a checkpoint written by a run of another objective (files without the key are
/// DINOv2's, written before MAE existed).
pub(super) fn check_objective(meta: &Metadata, objective: Objective, path: &Path) -> anyhow::Result<()> {
    let found = meta.get("objective").map_or("dinov2", String::as_str);
    if found != objective.name() {
        anyhow::bail!("{} is a checkpoint of a run with objective {found}, this run's objective is {objective}", path.display());
    }
    Ok(())
}

/// Restores a checkpoint file into a freshly built state (same config and plan).
pub fn load(path: &Path, state: TrainState, device: &Device) -> anyhow::Result<TrainState> {
    restore(read(path)?, state, device)
}

/// Restores a checkpoint read by [`read`] into freshly built `student`/`teacher` (same config
/// and plan). Names any tensor the models expect that the file lacks.
pub fn restore(found: Readable, mut state: TrainState, device: &Device) -> anyhow::Result<TrainState> {
    let Readable { step, path, tensors, meta } = found;
    let path = path.as_path();
    let steps: HashMap<String, u64> = serde_json::from_str(meta.get("optim_steps").map_or("{}", String::as_str))?;
    check_objective(&meta, Objective::Dinov2, path)?;
    let mut missing = Vec::new();
    // The student's trainable tensors, each checked against the file.
    state.student = restore_trainable(state.student, "student", &tensors, &mut missing);
    // The teacher's trainable set is the student's: take the same names.
    let names: Vec<String> = tensors.keys().filter_map(|k| k.strip_prefix("teacher.").map(String::from)).collect();
    let mut teacher_missing = Vec::new();
    let mut student_names = Vec::new();
    for_each_param(&state.student, |name, _, trainable| {
        if trainable {
            student_names.push(name.to_string());
        }
    });
    for name in &student_names {
        if !names.contains(name) {
            teacher_missing.push(format!("teacher.{name}"));
        }
    }
    state.teacher = map_params(state.teacher, |name, current| {
        let t = tensors.get(&format!("teacher.{name}"))?;
        Some(Tensor::from_data(TensorData::new(t.data.clone(), [t.data.len()]), &current.device()))
    });
    missing.extend(teacher_missing);
    if !missing.is_empty() {
        anyhow::bail!("{} does not match this run's model and plan; missing or mis-sized: {}", path.display(), missing.join(", "));
    }
    state.optim.load(&tensors, &steps, device)?;
    let center = |key: &str| -> anyhow::Result<Tensor<2>> {
        let t = tensors.get(key).ok_or_else(|| anyhow::anyhow!("{}: missing {key}", path.display()))?;
        Ok(Tensor::from_data(TensorData::new(t.data.clone(), [1, t.data.len()]), device))
    };
    state.centers = Centers { dino: center("center.dino")?, ibot: center("center.ibot")? };
    state.step = step;
    Ok(state)
}
