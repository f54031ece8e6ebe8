//! Reading every tensor of a checkpoint file into memory as f32, whatever its container
//! (safetensors, PyTorch zip/legacy pickle) and element type.

use std::collections::BTreeMap;
use std::path::Path;

use half::{bf16, f16};

use super::CheckpointError;

/// One tensor: shape (outermost first) and row-major f32 data.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl RawTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }

    /// Transpose of a 2-D tensor.
    pub fn transposed(&self) -> RawTensor {
        assert_eq!(self.shape.len(), 2, "transpose needs a matrix");
        let (rows, cols) = (self.shape[0], self.shape[1]);
        let mut data = vec![0f32; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                data[c * rows + r] = self.data[r * cols + c];
            }
        }
        RawTensor::new(vec![cols, rows], data)
    }

    /// Concatenation along the first axis (the other axes must agree).
    pub fn concat_rows(parts: &[&RawTensor]) -> Option<RawTensor> {
        let first = parts.first()?;
        let rest = &first.shape[1..];
        if parts.iter().any(|p| p.shape.is_empty() || p.shape[1..] != *rest) {
            return None;
        }
        let mut shape = first.shape.clone();
        shape[0] = parts.iter().map(|p| p.shape[0]).sum();
        let data = parts.iter().flat_map(|p| p.data.iter().copied()).collect();
        Some(RawTensor::new(shape, data))
    }
}

/// Tensors by name, sorted (deterministic reports).
pub type TensorMap = BTreeMap<String, RawTensor>;

/// The metadata a safetensors file carries in its header (empty for .pth files).
pub type Metadata = BTreeMap<String, String>;

fn to_f32(bytes: &[u8], dtype: &str, name: &str) -> Result<Vec<f32>, CheckpointError> {
    let chunks = |n: usize| bytes.chunks_exact(n);
    Ok(match dtype {
        "F32" => chunks(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        "F16" => chunks(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        "BF16" => chunks(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        "F64" => chunks(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32).collect(),
        other => {
            return Err(CheckpointError::Unsupported(format!(
                "tensor `{name}` has element type {other}; only floating-point weights are supported"
            )));
        }
    })
}

/// Reads a `.safetensors` file: all tensors plus the header metadata.
pub fn read_safetensors(path: &Path) -> Result<(TensorMap, Metadata), CheckpointError> {
    let bytes = match crate::checkpoint::builtin::bytes(path) {
        Some(shipped) => shipped.to_vec(),
        None => std::fs::read(path).map_err(|source| CheckpointError::Io { path: path.to_path_buf(), source })?,
    };
    let corrupt = |reason: String| CheckpointError::Corrupt { path: path.to_path_buf(), reason };
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let metadata: Metadata =
        header.metadata().as_ref().map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let mut map = TensorMap::new();
    for (name, view) in tensors.tensors() {
        let dtype = format!("{:?}", view.dtype());
        let data = to_f32(view.data(), &dtype, &name)?;
        map.insert(name, RawTensor::new(view.shape().to_vec(), data));
    }
    Ok((map, metadata))
}

/// Reads a PyTorch checkpoint (`torch.save` zip or legacy pickle). Nested dictionaries give
/// dotted names (`model.blocks.0.attn.qkv.weight` for an MAE file).
pub fn read_pytorch(path: &Path) -> Result<TensorMap, CheckpointError> {
    use burn::store::pytorch_reader::{DType, PytorchReader};
    let reader = PytorchReader::new(path).map_err(|e| CheckpointError::Corrupt { path: path.to_path_buf(), reason: e.to_string() })?;
    let mut map = TensorMap::new();
    for (name, tensor) in reader.into_tensors() {
        let dtype = match tensor.dtype() {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F64 => "F64",
            // Integer buffers (e.g. a step counter) are not weights: skip them.
            _ => continue,
        };
        let bytes = tensor.read().map_err(|e| CheckpointError::Corrupt { path: path.to_path_buf(), reason: e.to_string() })?;
        let data = to_f32(&bytes, dtype, &name)?;
        map.insert(name, RawTensor::new(tensor.shape().to_vec(), data));
    }
    Ok(map)
}

/// Reads either container, chosen by content (zip/pickle magic) rather than by extension.
pub fn read_any(path: &Path) -> Result<(TensorMap, Metadata), CheckpointError> {
    if crate::checkpoint::builtin::bytes(path).is_some() {
        return read_safetensors(path);
    }
    if !path.exists() {
        return Err(CheckpointError::NotFound(path.to_path_buf()));
    }
    let mut head = [0u8; 8];
    {
        use std::io::Read;
        let mut file = std::fs::File::open(path).map_err(|source| CheckpointError::Io { path: path.to_path_buf(), source })?;
        let n = file.read(&mut head).map_err(|source| CheckpointError::Io { path: path.to_path_buf(), source })?;
        if n < 8 {
            return Err(CheckpointError::Corrupt { path: path.to_path_buf(), reason: format!("file is only {n} bytes long") });
        }
    }
    let is_zip = head.starts_with(b"PK\x03\x04");
    let is_pickle = head[0] == 0x80 && head[1] <= 5;
    if is_zip || is_pickle { Ok((read_pytorch(path)?, Metadata::new())) } else { read_safetensors(path) }
}

/// Writes tensors (and string metadata) to a safetensors file atomically: a temporary file in
/// the same folder, then a rename, so a crash never leaves a half-written checkpoint.
pub fn write_safetensors(path: &Path, tensors: &TensorMap, metadata: &Metadata) -> Result<(), CheckpointError> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, t)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.shape.clone(), bytemuck::cast_slice(&t.data))
                .expect("shape matches data");
            (name.clone(), view)
        })
        .collect();
    let meta = (!metadata.is_empty()).then(|| metadata.clone().into_iter().collect());
    let bytes =
        safetensors::serialize(views, meta).map_err(|e| CheckpointError::Corrupt { path: path.to_path_buf(), reason: e.to_string() })?;
    atomic_write(path, &bytes)
}

/// Writes `bytes` to `path` all or nothing: a uniquely named temporary file in the same folder
/// (`tempfile`), synced, then renamed over `path`, and the folder synced so the rename survives
/// a power cut. On any failure (a full disk included) the temporary file is removed and `path`
/// keeps its previous contents.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    use std::io::Write;
    let io = |source| CheckpointError::Io { path: path.to_path_buf(), source };
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io)?;
    let mut file = tempfile::Builder::new().prefix(".explora-").suffix(".tmp").tempfile_in(parent).map_err(io)?;
    fault::check(path).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.as_file().sync_all().map_err(io)?;
    file.persist(path).map_err(|e| io(e.error))?;
    sync_dir(parent);
    Ok(())
}

/// Makes a rename in `dir` durable (a no-op where folders cannot be opened, as on Windows).
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// Whether an error from writing a file means the disk (or the quota) is full.
pub fn is_disk_full(error: &CheckpointError) -> bool {
    matches!(error, CheckpointError::Io { source, .. }
        if matches!(source.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded | std::io::ErrorKind::FileTooLarge))
}

/// Fault injection for tests: makes [`atomic_write`] fail as a full disk does for paths under a
/// chosen folder (each test uses its own temporary folder, so tests in parallel are unaffected).
#[doc(hidden)]
pub mod fault {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    static FULL: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    /// From now on, writes under `dir` fail with "no space left on device".
    pub fn disk_full_under(dir: &Path) {
        FULL.lock().unwrap().push(dir.to_path_buf());
    }

    /// Writes under `dir` succeed again.
    pub fn clear(dir: &Path) {
        FULL.lock().unwrap().retain(|d| d != dir);
    }

    pub(super) fn check(path: &Path) -> std::io::Result<()> {
        if FULL.lock().unwrap().iter().any(|d| path.starts_with(d)) {
            return Err(std::io::Error::from(std::io::ErrorKind::StorageFull));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_and_concat() {
        let t = RawTensor::new(vec![2, 3], vec![1., 2., 3., 4., 5., 6.]);
        assert_eq!(t.transposed(), RawTensor::new(vec![3, 2], vec![1., 4., 2., 5., 3., 6.]));
        let c = RawTensor::concat_rows(&[&t, &t]).unwrap();
        assert_eq!(c.shape, vec![4, 3]);
        assert_eq!(&c.data[6..], &t.data[..]);
        let odd = RawTensor::new(vec![1, 2], vec![0., 0.]);
        assert!(RawTensor::concat_rows(&[&t, &odd]).is_none());
    }

    #[test]
    fn safetensors_round_trip_keeps_metadata_and_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let mut map = TensorMap::new();
        map.insert("a".into(), RawTensor::new(vec![2, 2], vec![1.5, -2.0, 3.25, 0.0]));
        let mut meta = Metadata::new();
        meta.insert("format".into(), "test".into());
        write_safetensors(&path, &map, &meta).unwrap();
        let (back, back_meta) = read_any(&path).unwrap();
        assert_eq!(back, map);
        assert_eq!(back_meta, meta);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_full_disk_keeps_the_previous_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        atomic_write(&path, b"good").unwrap();
        fault::disk_full_under(dir.path());
        let err = atomic_write(&path, b"newer").unwrap_err();
        fault::clear(dir.path());
        assert!(is_disk_full(&err), "{err}");
        assert!(err.to_string().contains("state.json"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"good");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "a temporary file was left behind");
        // Writers on many threads never collide on a temporary name.
        std::thread::scope(|s| {
            for i in 0..8 {
                let path = &path;
                s.spawn(move || atomic_write(path, format!("writer {i}").as_bytes()).unwrap());
            }
        });
        assert!(String::from_utf8(std::fs::read(&path).unwrap()).unwrap().starts_with("writer "));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn garbage_and_short_files_are_reported_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short.pth");
        std::fs::write(&short, b"abc").unwrap();
        assert!(matches!(read_any(&short), Err(CheckpointError::Corrupt { .. })));
        let junk = dir.path().join("junk.safetensors");
        std::fs::write(&junk, vec![7u8; 64]).unwrap();
        let err = read_any(&junk).unwrap_err();
        assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("junk.safetensors"), "{err}");
        let missing = dir.path().join("nope.pth");
        assert!(matches!(read_any(&missing), Err(CheckpointError::NotFound(_))));
    }
}
