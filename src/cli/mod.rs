//! The command line: clap arguments (`args`), one file per command (`commands/`), and the
//! printing of engine events as progress bars (on a terminal) or log lines (`output`).

pub mod args;
mod commands;
mod output;

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;

use crate::checkpoint::load_backbone_with;
use crate::model::VitConfig;
pub use args::*;
pub use commands::pipeline::pipeline_config;
pub use commands::pretrain::pretrain_config;
use commands::*;

/// What the process does before either face starts: keep Mesa's Wayland probe quiet where
/// there is no desktop session, keep freed tensors' memory for the next ones, and log through
/// `EXPLORA_LOG`. Call first thing in `main`.
pub fn prepare_process() {
    quiet_headless_wayland_probe();
    keep_freed_memory();
    init_tracing();
}

/// glibc's malloc serves large blocks (above a threshold that adapts up to 32 MiB) with fresh
/// `mmap`s and returns the heap's free top to the system: on the CPU backend every
/// activation of a forward pass then costs page faults and zeroed pages again (6-8% of a
/// ViT-S/14 feature pass in `perf`). Serving every size from the heap and never trimming it
/// keeps the memory of one pass for the next; the process holds its peak until it exits, as
/// PyTorch's does. On the ViT-S/14 `infer` workload (2 cores) this took a batch from
/// ~1.8 s to ~1.6 s. Other platforms and allocators are left alone.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only sets allocator parameters; called first thing in `main`, before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// The exit status (and the one-line error) of a command.
pub fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether these arguments open the app: no subcommand and no `--no-gui`.
pub fn wants_app(cli: &Cli) -> bool {
    cli.command.is_none() && !cli.no_gui
}

/// On a Linux machine without a desktop session (CI, servers), Mesa's Vulkan driver probes for a
/// Wayland display and libwayland prints "error: XDG_RUNTIME_DIR is invalid or not set" several
/// times. There is no display to find then, so give the probe a private runtime dir to look in.
fn quiet_headless_wayland_probe() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() && std::env::var_os("WAYLAND_DISPLAY").is_none() {
        let dir = std::env::temp_dir().join("explora-xdg-runtime");
        if std::fs::create_dir_all(&dir).is_ok() {
            // SAFETY: called first thing in `main`, before any other thread exists.
            unsafe { std::env::set_var("XDG_RUNTIME_DIR", &dir) };
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EXPLORA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,wgpu_core=error,wgpu_hal=error,naga=error"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Info { json }) => info::info(&cli.device, json),
        Some(Command::Embed(args)) => embed::embed_cmd(&cli.device, args),
        Some(Command::Attention(args)) => attention::attention_cmd(&cli.device, args),
        Some(Command::Plan(args)) => plan::plan_cmd(args),
        Some(Command::Export(args)) => export::export_cmd(&cli.device, args),
        Some(Command::Default(args)) => default::default_cmd(&cli.device, args),
        Some(Command::Bench(args)) => bench::bench_cmd(&cli.device, args),
        Some(Command::Pretrain(args)) => pretrain::pretrain_cmd(&cli.device, *args),
        Some(Command::Resume(args)) => pretrain::resume_cmd(&cli.device, args),
        Some(Command::Pipeline(args)) => pipeline::pipeline_cmd(&cli.device, *args),
        None => default::default_cmd(&cli.device, DefaultArgs::default()),
    }
}

fn parse_arch(arch: &Option<String>) -> anyhow::Result<Option<VitConfig>> {
    arch.as_deref()
        .map(|name| {
            VitConfig::preset(name).with_context(|| {
                let names: Vec<String> = VitConfig::presets().into_iter().map(|c| c.name).collect();
                format!("unknown --arch `{name}`; presets: {} (add `_reg` for 4 registers)", names.join(", "))
            })
        })
        .transpose()
}

fn load_model(args: &ModelArgs, device: &burn::tensor::Device) -> anyhow::Result<crate::model::Vit> {
    Ok(load_model_with_layout(args, device)?.0)
}

fn load_model_with_layout(
    args: &ModelArgs,
    device: &burn::tensor::Device,
) -> anyhow::Result<(crate::model::Vit, crate::checkpoint::Layout)> {
    let (model, report) = load_backbone_with(&args.weights, parse_arch(&args.arch)?, device)?;
    eprintln!("loaded {report}");
    Ok((model, report.layout))
}

fn check_size(size: u32, config: &VitConfig) -> anyhow::Result<()> {
    anyhow::ensure!(
        size > 0 && (size as usize).is_multiple_of(config.patch_size),
        "--size {size} is not a multiple of the model's patch size {}",
        config.patch_size
    );
    Ok(())
}

fn write_png(image: &image::RgbImage, path: &Path) -> anyhow::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    image.save(path).with_context(|| format!("writing {}", path.display()))
}
