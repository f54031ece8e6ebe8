//! Where explora computes: burn's native CPU backend (burn-flex) or a wgpu adapter (a GPU, or
//! software Vulkan for testing the WGSL path). Lists what wgpu sees, resolves `--device` /
//! `BURN_DEVICE` (`auto`: a real GPU when there is one, otherwise the CPU backend) and opens the
//! device with a clear error when the choice is not usable.

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

/// Where to compute.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum DeviceChoice {
    /// A real GPU when wgpu sees one (discrete, integrated or virtual), otherwise the native CPU
    /// backend. Software Vulkan is never picked automatically: it is far slower than the CPU
    /// backend on the same cores.
    #[default]
    Auto,
    Discrete(usize),
    Integrated(usize),
    Virtual(usize),
    /// burn's native CPU backend (burn-flex: multi-threaded `gemm` matmuls, SIMD, no shader
    /// compilation).
    Cpu,
    /// A CPU adapter of wgpu: software Vulkan (Mesa's lavapipe). Runs the WGSL path without a
    /// GPU, for testing it; slow.
    Software,
}

/// The `--device` values, for messages.
pub const CHOICES: &str = "auto, cpu, software, gpu, discrete[:N], integrated[:N], virtual[:N]";

impl FromStr for DeviceChoice {
    type Err = String;

    /// `auto`, `cpu`, `software` (also `lavapipe`), `discrete[:N]`, `integrated[:N]`,
    /// `virtual[:N]` (also `gpu` = `discrete:0`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        let (kind, index) = match s.split_once(':') {
            Some((kind, index)) => {
                let index = index.parse::<usize>().map_err(|_| format!("device index `{index}` is not a number"))?;
                (kind.to_string(), index)
            }
            None => (s.clone(), 0),
        };
        Ok(match kind.as_str() {
            "auto" | "default" => DeviceChoice::Auto,
            "cpu" | "flex" => DeviceChoice::Cpu,
            "software" | "lavapipe" | "llvmpipe" => DeviceChoice::Software,
            "gpu" | "discrete" => DeviceChoice::Discrete(index),
            "integrated" => DeviceChoice::Integrated(index),
            "virtual" => DeviceChoice::Virtual(index),
            other => {
                return Err(format!("unknown device `{other}`: use one of {CHOICES} (`explora info` lists them)"));
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
            DeviceChoice::Software => write!(f, "software"),
        }
    }
}

impl DeviceChoice {
    /// The wgpu adapter kind, for the choices that open one.
    fn kind(&self) -> Option<DeviceKind> {
        Some(match self {
            DeviceChoice::Auto => DeviceKind::DefaultDevice,
            DeviceChoice::Discrete(i) => DeviceKind::DiscreteGpu(*i),
            DeviceChoice::Integrated(i) => DeviceKind::IntegratedGpu(*i),
            DeviceChoice::Virtual(i) => DeviceKind::VirtualGpu(*i),
            DeviceChoice::Software => DeviceKind::Cpu,
            DeviceChoice::Cpu => return None,
        })
    }

    /// What `auto` resolves to on a machine with these adapters: the first discrete GPU, else
    /// the first integrated, else the first virtual one, else the CPU backend.
    pub fn resolve(&self, adapters: &[AdapterInfo]) -> DeviceChoice {
        if *self != DeviceChoice::Auto {
            return self.clone();
        }
        ["discrete", "integrated", "virtual"]
            .iter()
            .find_map(|kind| adapters.iter().find(|a| a.device_type == *kind))
            .and_then(|a| a.selector.parse().ok())
            .unwrap_or(DeviceChoice::Cpu)
    }
}

/// No usable adapter, with what was tried and what to install.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("no GPU adapter found (wgpu tried Vulkan, Metal and DX12). {}", install_hint())]
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
                "cpu" => "software".to_string(),
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
                max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
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

/// Opens (once per process) the device for `choice`: burn's native CPU backend or a wgpu
/// adapter.
pub fn open(choice: &DeviceChoice) -> Result<Device, DeviceError> {
    open_shared(choice).map(|(device, _)| device)
}

/// [`open`], also returning the wgpu instance, adapter, device and queue burn runs on when it
/// runs on wgpu, so that the app's window renders on the device burn computes on. `None` for
/// the CPU backend: the window then opens its own wgpu device and only draws.
pub fn open_shared(choice: &DeviceChoice) -> Result<(Device, Option<WgpuSetup>), DeviceError> {
    let choice = match choice {
        DeviceChoice::Auto => choice.resolve(&list_adapters()),
        other => other.clone(),
    };
    let Some(kind) = choice.kind() else {
        return Ok((Device::flex(), None));
    };
    let mut cache = opened().lock().unwrap_or_else(|e| e.into_inner());
    if let Some((device, setup)) = cache.get(&choice) {
        return Ok((device.clone(), Some(setup.clone())));
    }
    let adapters = list_adapters();
    if adapters.is_empty() {
        return Err(DeviceError::NoAdapter);
    }
    if !adapters.iter().any(|a| a.selector == choice.to_string()) {
        let available = adapters
            .iter()
            .map(|a| format!("{} ({})", a.selector, a.name))
            .chain(std::iter::once("cpu (burn's native CPU backend)".to_string()))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(DeviceError::NoMatch { choice: choice.clone(), available });
    }
    let opened = Device::wgpu_options()
        .device_kind(kind)
        .init_with_setup()
        .map_err(|source| DeviceError::Init { choice: choice.clone(), source })?;
    cache.insert(choice.clone(), opened.clone());
    Ok((opened.0, Some(opened.1)))
}

/// Whether `device` is burn's native CPU backend (with or without autodiff).
pub fn is_native_cpu(device: &Device) -> bool {
    // Device equality compares the hardware and ignores autodiff.
    *device == Device::flex()
}

/// Threads the CPU backend computes with (rayon's pool).
pub fn cpu_threads() -> usize {
    rayon::current_num_threads()
}

/// The device's name for logs and reports: the adapter's own name, or the CPU backend and its
/// thread count.
pub fn describe(device: &Device) -> String {
    if is_native_cpu(device) {
        return format!("CPU (burn-flex, {} threads)", cpu_threads());
    }
    device.identity().map(|id| id.name).unwrap_or_else(|| format!("{device:?}"))
}

/// Whether `device` is a software rasteriser (Mesa's lavapipe/llvmpipe, SwiftShader, WARP):
/// it works but is orders of magnitude slower than a GPU.
pub fn is_software(device: &Device) -> bool {
    if is_native_cpu(device) {
        return false;
    }
    let name = describe(device).to_ascii_lowercase();
    ["llvmpipe", "lavapipe", "swiftshader", "basic render", "softpipe"].iter().any(|s| name.contains(s))
}

/// Whether `device` computes on the CPU (the native backend or software Vulkan): defaults are
/// sized down there.
pub fn is_cpu_class(device: &Device) -> bool {
    is_native_cpu(device) || is_software(device)
}

/// Bytes currently reserved by burn's memory pools on `device`, when the backend reports it.
pub fn memory_reserved(device: &Device) -> Option<u64> {
    device.memory_pool_usage().map(|u| u.bytes_reserved)
}

/// The process's peak resident memory in bytes (Linux: `VmHWM`), the memory figure for the CPU
/// backend.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_choices() {
        assert_eq!("auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
        assert_eq!("CPU".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!("software".parse::<DeviceChoice>().unwrap(), DeviceChoice::Software);
        assert_eq!("discrete:1".parse::<DeviceChoice>().unwrap(), DeviceChoice::Discrete(1));
        assert_eq!("gpu".parse::<DeviceChoice>().unwrap(), DeviceChoice::Discrete(0));
        assert_eq!("integrated".parse::<DeviceChoice>().unwrap(), DeviceChoice::Integrated(0));
        let err = "tpu".parse::<DeviceChoice>().unwrap_err();
        assert!(err.contains("unknown device `tpu`"), "{err}");
        assert!("discrete:x".parse::<DeviceChoice>().is_err());
        assert!(err.contains("software"), "the message lists the choices: {err}");
        for c in [DeviceChoice::Auto, DeviceChoice::Cpu, DeviceChoice::Software, DeviceChoice::Virtual(2)] {
            assert_eq!(c.to_string().parse::<DeviceChoice>().unwrap(), c);
        }
    }

    fn adapter(kind: &str, selector: &str) -> AdapterInfo {
        AdapterInfo {
            name: kind.into(),
            backend: "Vulkan".into(),
            device_type: kind.into(),
            driver: String::new(),
            selector: selector.into(),
            max_buffer_size: 0,
            max_storage_buffer_binding_size: 0,
            max_compute_invocations_per_workgroup: 0,
            max_compute_workgroup_storage_size: 0,
            shader_f16: false,
            subgroups: false,
        }
    }

    #[test]
    fn auto_prefers_a_real_gpu_then_the_cpu_backend() {
        let lavapipe = adapter("cpu", "cpu");
        assert_eq!(DeviceChoice::Auto.resolve(&[]), DeviceChoice::Cpu);
        assert_eq!(DeviceChoice::Auto.resolve(std::slice::from_ref(&lavapipe)), DeviceChoice::Cpu);
        let gpus = [lavapipe.clone(), adapter("integrated", "integrated:0"), adapter("discrete", "discrete:0")];
        assert_eq!(DeviceChoice::Auto.resolve(&gpus), DeviceChoice::Discrete(0));
        assert_eq!(DeviceChoice::Auto.resolve(&gpus[..2]), DeviceChoice::Integrated(0));
        assert_eq!(DeviceChoice::Software.resolve(&gpus), DeviceChoice::Software);
    }

    #[test]
    fn the_cpu_backend_is_recognised() {
        let cpu = open(&DeviceChoice::Cpu).unwrap();
        assert!(is_native_cpu(&cpu) && is_native_cpu(&cpu.clone().autodiff()));
        assert!(is_cpu_class(&cpu) && !is_software(&cpu));
        assert!(describe(&cpu).starts_with("CPU (burn-flex"));
    }
}
