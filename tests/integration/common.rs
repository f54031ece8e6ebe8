//! Shared helpers: the device, fixture paths, tensor comparison.

use std::path::PathBuf;

use burn::tensor::{Bool, Device, Tensor, TensorData};
use explora::checkpoint::{RawTensor, TensorMap, read_safetensors};
use explora::device::{DeviceChoice, open};

pub fn device() -> Device {
    open(&DeviceChoice::Auto).expect("a wgpu adapter; on Linux without a GPU install mesa-vulkan-drivers")
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
