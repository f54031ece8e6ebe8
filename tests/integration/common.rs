//! Shared helpers: the device, fixture paths, tensor comparison.

use std::path::PathBuf;

use burn::tensor::{Bool, Device, Tensor, TensorData};
use explora::checkpoint::{RawTensor, TensorMap, read_safetensors};
use explora::device::{DeviceChoice, open};
use explora::objectives::HeadConfig;
use explora::train::PretrainConfig;

/// The device most tests compute on: burn's native CPU backend.
pub fn device() -> Device {
    open(&DeviceChoice::Cpu).expect("the CPU backend")
}

/// The WGSL path for the named set in `wgsl.rs`: a real GPU when there is one, else software
/// Vulkan (Mesa's lavapipe; on Linux without a GPU install mesa-vulkan-drivers).
pub fn wgpu_device() -> Device {
    let adapters = explora::device::list_adapters();
    let choice = match DeviceChoice::Auto.resolve(&adapters) {
        DeviceChoice::Cpu => DeviceChoice::Software,
        gpu => gpu,
    };
    open(&choice).expect("a wgpu adapter; on Linux without a GPU install mesa-vulkan-drivers")
}

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn read(path: PathBuf) -> TensorMap {
    read_safetensors(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display())).0
}

pub fn tensor<const D: usize>(raw: &RawTensor, device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(raw.data.clone(), raw.shape.clone()), device)
}

pub fn mask(raw: &RawTensor, device: &Device) -> Tensor<2, Bool> {
    tensor::<2>(raw, device).greater_elem(0.5)
}

pub fn values<const D: usize>(t: Tensor<D>) -> (Vec<usize>, Vec<f32>) {
    let dims = t.dims().to_vec();
    (dims, t.into_data().try_into_vec::<f32>().expect("f32"))
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Asserts `actual` equals the reference tensor within `tol` max-abs, with shapes.
pub fn assert_close<const D: usize>(actual: Tensor<D>, expected: &RawTensor, tol: f32, what: &str) {
    let (dims, got) = values(actual);
    assert_eq!(dims, expected.shape, "{what}: shape");
    let diff = max_abs_diff(&got, &expected.data);
    assert!(diff <= tol, "{what}: max abs diff {diff:e} > {tol:e}");
}

/// The built-in run shrunk further: 32 px global and 16 px local crops on the tiny backbone.
pub fn small_config(steps: u64) -> PretrainConfig {
    let mut c = PretrainConfig::builtin();
    // The explora preset as the app's preset button sets it (the last block unfrozen).
    c.plan.unfreeze = None;
    c.crops.global_size = 32;
    c.crops.local_size = 16;
    c.crops.local_crops = 2;
    c.data.procedural_tiles = 64;
    c.data.procedural_size = 48;
    c.head = HeadConfig { layers: 2, hidden: 64, bottleneck: 32, prototypes: 64 };
    c.optim.batch = 8;
    c.optim.warmup_steps = 2;
    c.optim.freeze_last_layer_steps = 1;
    c.loss.teacher_temp_warmup_steps = 5;
    c.monitor.knn_every = 0;
    c.evaluate.after_training = false;
    c.run.steps = steps;
    c.run.checkpoint_every = 0;
    c.run.preview_every = 0;
    c
}
