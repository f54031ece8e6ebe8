//! GPU adapters: listing what wgpu sees, choosing one (`--device` / `BURN_DEVICE`), and opening
//! burn's device on it with a clear error when nothing usable is there.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Mutex, OnceLock};

use burn::tensor::wgpu::{WgpuInitError, WgpuSetup, wgpu};
use burn::tensor::{Device, DeviceKind};

/// What `explora info` prints about one adapter.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdapterInfo {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    /// The `--device` value that selects this adapter.
    pub selector: String,
    pub max_buffer_size: u64,
    pub max_storage_buffer_binding_size: u64,
    pub max_compute_invocations_per_workgroup: u32,
    pub max_compute_workgroup_storage_size: u32,
    pub shader_f16: bool,
    pub subgroups: bool,
}

/// Which adapter to run on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum DeviceChoice {
    /// wgpu's high-performance choice (overridable with `CUBECL_WGPU_DEFAULT_DEVICE`).
    #[default]
    Auto,
    Discrete(usize),
    Integrated(usize),
    Virtual(usize),
    /// A CPU adapter: software Vulkan (lavapipe), used where there is no GPU.
    Cpu,
}

impl FromStr for DeviceChoice {
    type Err = String;

    /// `auto`, `cpu`, `discrete[:N]`, `integrated[:N]`, `virtual[:N]` (also `gpu` = `discrete:0`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        let (kind, index) = match s.split_once(':') {
            Some((kind, index)) => {
                let index = index
                    .parse::<usize>()
                    .map_err(|_| format!("device index `{index}` is not a number"))?;
                (kind.to_string(), index)
            }
            None => (s.clone(), 0),
        };
        Ok(match kind.as_str() {
            "auto" | "default" => DeviceChoice::Auto,
            "cpu" | "software" => DeviceChoice::Cpu,
            "gpu" | "discrete" => DeviceChoice::Discrete(index),
            "integrated" => DeviceChoice::Integrated(index),
            "virtual" => DeviceChoice::Virtual(index),
            other => {
                return Err(format!(
                    "unknown device `{other}`: use auto, cpu, discrete[:N], integrated[:N] or virtual[:N] \
                     (`explora info` lists them)"
                ));
            }
        })
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Auto => write!(f, "auto"),
            DeviceChoice::Discrete(i) => write!(f, "discrete:{i}"),
            DeviceChoice::Integrated(i) => write!(f, "integrated:{i}"),
            DeviceChoice::Virtual(i) => write!(f, "virtual:{i}"),
            DeviceChoice::Cpu => write!(f, "cpu"),
        }
    }
}

impl DeviceChoice {
    fn kind(&self) -> DeviceKind {
        match self {
            DeviceChoice::Auto => DeviceKind::DefaultDevice,
            DeviceChoice::Discrete(i) => DeviceKind::DiscreteGpu(*i),
            DeviceChoice::Integrated(i) => DeviceKind::IntegratedGpu(*i),
            DeviceChoice::Virtual(i) => DeviceKind::VirtualGpu(*i),
            DeviceChoice::Cpu => DeviceKind::Cpu,
        }
    }
}

/// No usable adapter, with what was tried and what to install.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "no GPU adapter found (wgpu tried Vulkan, Metal and DX12). {}",
        install_hint()
    )]
    NoAdapter,
    #[error("no adapter matches --device {choice}; available: {available}. Run `explora info` to list them")]
    NoMatch { choice: DeviceChoice, available: String },
    #[error("could not open the GPU adapter for --device {choice}: {source}. {}", install_hint())]
    Init {
        choice: DeviceChoice,
        #[source]
        source: WgpuInitError,
    },
}

fn install_hint() -> &'static str {
    if cfg!(target_os = "linux") {
        "Install your GPU's Vulkan driver, or Mesa's software Vulkan for machines without a GPU \
         (Debian/Ubuntu: `sudo apt-get install mesa-vulkan-drivers`)"
    } else if cfg!(target_os = "windows") {
        "Install a current GPU driver with DX12 or Vulkan support"
    } else if cfg!(target_os = "macos") {
        "Metal is required (macOS 10.13 or later)"
    } else {
        "Install a Vulkan, Metal or DX12 driver"
    }
}

fn type_name(t: wgpu::DeviceType) -> &'static str {
    match t {
        wgpu::DeviceType::DiscreteGpu => "discrete",
        wgpu::DeviceType::IntegratedGpu => "integrated",
        wgpu::DeviceType::VirtualGpu => "virtual",
        wgpu::DeviceType::Cpu => "cpu",
        wgpu::DeviceType::Other => "other",
    }
}

/// Every compute-capable adapter wgpu can see on the primary APIs (Vulkan, Metal, DX12; burn's
/// runtime does not compute on OpenGL), in wgpu's order, with the `--device` value that
/// selects it.
pub fn list_adapters() -> Vec<AdapterInfo> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY));
    let mut seen: HashMap<&'static str, usize> = HashMap::new();
    adapters
        .iter()
        .map(|adapter| {
            let info = adapter.get_info();
            let limits = adapter.limits();
            let features = adapter.features();
            let kind = type_name(info.device_type);
            let ordinal = seen.entry(kind).or_default();
            let selector = match kind {
                "cpu" => "cpu".to_string(),
                "other" => "auto".to_string(),
                _ => format!("{kind}:{ordinal}"),
            };
            *ordinal += 1;
            AdapterInfo {
                name: info.name.clone(),
                backend: format!("{:?}", info.backend),
                device_type: kind.to_string(),
                driver: format!("{} {}", info.driver, info.driver_info).trim().to_string(),
                selector,
                max_buffer_size: limits.max_buffer_size,
                max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size as u64,
                max_compute_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
                max_compute_workgroup_storage_size: limits.max_compute_workgroup_storage_size,
                shader_f16: features.contains(wgpu::Features::SHADER_F16),
                subgroups: features.contains(wgpu::Features::SUBGROUP),
            }
        })
        .collect()
}

fn opened() -> &'static Mutex<HashMap<DeviceChoice, (Device, WgpuSetup)>> {
    static OPENED: OnceLock<Mutex<HashMap<DeviceChoice, (Device, WgpuSetup)>>> = OnceLock::new();
    OPENED.get_or_init(Default::default)
}

/// Opens (once per process) burn's wgpu device for `choice`.
pub fn open(choice: &DeviceChoice) -> Result<Device, DeviceError> {
    open_shared(choice).map(|(device, _)| device)
}

/// [`open`], also returning the wgpu instance, adapter, device and queue burn runs on, so that
/// the app's window renders (and runs its heatmap shader) on the device burn computes on.
pub fn open_shared(choice: &DeviceChoice) -> Result<(Device, WgpuSetup), DeviceError> {
    let mut cache = opened().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(opened) = cache.get(choice) {
        return Ok(opened.clone());
    }
    let adapters = list_adapters();
    if adapters.is_empty() {
        return Err(DeviceError::NoAdapter);
    }
    if *choice != DeviceChoice::Auto && !adapters.iter().any(|a| a.selector == choice.to_string()) {
        let available = adapters
            .iter()
            .map(|a| format!("{} ({})", a.selector, a.name))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(DeviceError::NoMatch { choice: choice.clone(), available });
    }
    let opened = Device::wgpu_options()
        .device_kind(choice.kind())
        .init_with_setup()
        .map_err(|source| DeviceError::Init { choice: choice.clone(), source })?;
    cache.insert(choice.clone(), opened.clone());
    Ok(opened)
}

/// The adapter's own name for an opened device, for logs and reports.
pub fn describe(device: &Device) -> String {
    device
        .identity()
        .map(|id| id.name)
        .unwrap_or_else(|| format!("{device:?}"))
}

/// Whether `device` is a software rasteriser (Mesa's lavapipe/llvmpipe, SwiftShader, WARP):
/// it works but is orders of magnitude slower than a GPU, so defaults are sized down.
pub fn is_software(device: &Device) -> bool {
    let name = describe(device).to_ascii_lowercase();
    ["llvmpipe", "lavapipe", "swiftshader", "basic render", "softpipe"].iter().any(|s| name.contains(s))
}

/// Bytes currently reserved by burn's memory pools on `device`, when the backend reports it.
pub fn memory_reserved(device: &Device) -> Option<u64> {
    device.memory_pool_usage().map(|u| u.bytes_reserved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_choices() {
        assert_eq!("auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
        assert_eq!("CPU".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!("discrete:1".parse::<DeviceChoice>().unwrap(), DeviceChoice::Discrete(1));
        assert_eq!("gpu".parse::<DeviceChoice>().unwrap(), DeviceChoice::Discrete(0));
        assert_eq!("integrated".parse::<DeviceChoice>().unwrap(), DeviceChoice::Integrated(0));
        let err = "tpu".parse::<DeviceChoice>().unwrap_err();
        assert!(err.contains("unknown device `tpu`"), "{err}");
        assert!("discrete:x".parse::<DeviceChoice>().is_err());
        for c in [DeviceChoice::Auto, DeviceChoice::Cpu, DeviceChoice::Virtual(2)] {
            assert_eq!(c.to_string().parse::<DeviceChoice>().unwrap(), c);
        }
    }
}
