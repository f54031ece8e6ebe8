//! The command line: clap commands over the engine; prints engine events as progress bars (on a
//! terminal) or log lines (otherwise).

mod output;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::checkpoint::load_backbone_with;
use crate::data::{ImageList, Preprocess, decode_rgb};
use crate::device::{self, DeviceChoice};
use crate::engine;
use crate::eval::embed;
use crate::inspect::{attention, images_tensor};
use crate::model::VitConfig;
use crate::recipes::default_run::DefaultRun;
use crate::train::{PretrainConfig, PretrainJob};

#[derive(Parser, Debug)]
#[command(
    name = "explora",
    version,
    about = "Adapt pre-trained Vision Transformers (DINOv2, MAE) to a new image domain with ExPLoRA, on any Vulkan, Metal or DX12 GPU",
    long_about = "Adapt pre-trained Vision Transformers (DINOv2, MAE) to a new image domain with ExPLoRA, on any \
Vulkan, Metal or DX12 GPU.\n\nWith no command, explora runs its built-in default: a short ExPLoRA pre-training of a tiny \
backbone on a procedurally generated satellite-like domain, in the desktop app (headless with --no-gui, or \
when there is no display).",
    after_help = "Checkpoints: Meta DINOv2 torch-hub .pth, Hugging Face Dinov2Model safetensors (with config.json beside it), \
MAE .pth and explora's own safetensors; the layout and architecture are detected."
)]
pub struct Cli {
    /// Run headless: no window, progress on the terminal (what happens anyway without a display).
    #[arg(long, global = true)]
    pub no_gui: bool,

    /// Where to compute: auto (a GPU when there is one, else the CPU), cpu (burn's native CPU
    /// backend), software (software Vulkan, the WGSL path without a GPU), gpu, discrete[:N],
    /// integrated[:N], virtual[:N]. `explora info` lists them.
    #[arg(long, global = true, env = "BURN_DEVICE", default_value = "auto")]
    pub device: DeviceChoice,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List the devices explora can compute on (the CPU backend and the GPU adapters wgpu
    /// sees) and which one `--device` selects.
    Info {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Extract CLS and mean-pooled patch features for every image in a folder.
    Embed(EmbedArgs),
    /// Write a CLS-attention heatmap of one layer over an image.
    Attention(AttentionArgs),
    /// Print what an adaptation plan trains: parameters per component, total, % of the
    /// backbone, optimizer-state memory.
    Plan(PlanArgs),
    /// Write an adapted backbone as a plain checkpoint: apply an adapter file (if given), merge
    /// LoRA into the weights, save in the layout the weights came from (or --layout).
    Export(ExportArgs),
    /// ExPLoRA extended pre-training (DINOv2 objective) of a backbone on unlabelled domain
    /// images: progress, metrics.jsonl, atomic checkpoints, adapted backbone.
    Pretrain(Box<PretrainArgs>),
    /// Continue a pre-training run from its newest checkpoint, exactly where it stopped.
    Resume(ResumeArgs),
    /// Did ExPLoRA help? Evaluates the source backbone and the backbone after ExPLoRA
    /// pre-training on a labelled set's training images with k-NN, a linear probe and
    /// (optionally) LoRA fine-tuning; writes report.md and report.csv.
    Pipeline(Box<PipelineArgs>),
    /// Time explora's two workloads as the PyTorch reference (`torch_explora_bench.py`) does:
    /// `infer` (backbone forward, images/s) and `train` (one ExPLoRA DINOv2 step, images/s
    /// and ms a step), cold first call reported apart. Prints one JSON line.
    Bench(BenchArgs),
    /// Run the built-in default (what `explora --no-gui` runs): a short ExPLoRA pre-training of
    /// a tiny backbone on procedural satellite-like tiles, k-NN before/after, attention maps.
    Default(DefaultArgs),
}

/// Where the backbone comes from.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Checkpoint: Meta DINOv2 .pth, Hugging Face safetensors, MAE .pth or explora safetensors.
    #[arg(long)]
    pub weights: PathBuf,
    /// Architecture preset (tiny, vits14, vitb14, vitl14, vitg14, mae-vitb16, mae-vitl16,
    /// mae-vith14; `_reg` adds 4 registers). Inferred from the checkpoint when omitted.
    #[arg(long)]
    pub arch: Option<String>,
}

#[derive(Args, Debug)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Folder of images (searched recursively; ImageFolder class folders give labels).
    #[arg(long)]
    pub images: PathBuf,
    /// Output safetensors file (tensors `cls`, `patch_mean`, `labels`; paths in metadata).
    #[arg(long)]
    pub out: PathBuf,
    /// Input resolution in pixels (a multiple of the patch size).
    #[arg(long, default_value_t = 224)]
    pub size: u32,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
}

#[derive(Args, Debug)]
pub struct AttentionArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The image to look at.
    #[arg(long)]
    pub image: PathBuf,
    /// Block whose attention to show (0-based; default: the last).
    #[arg(long)]
    pub layer: Option<usize>,
    /// Attention head (default: the mean over heads).
    #[arg(long)]
    pub head: Option<usize>,
    /// Output PNG.
    #[arg(long)]
    pub out: PathBuf,
    /// Input resolution in pixels (a multiple of the patch size).
    #[arg(long, default_value_t = 224)]
    pub size: u32,
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// Architecture preset (tiny, vits14, vitb14, vitl14, vitg14, mae-vitb16, mae-vitl16,
    /// mae-vith14; `_reg` adds 4 registers).
    #[arg(long, default_value = "vitl14")]
    pub arch: String,
    /// explora (one unfrozen block + LoRA on Q,V elsewhere + norms + CLS), lora, linear, full,
    /// or blocks:K (the last K blocks unfrozen).
    #[arg(long, default_value = "explora")]
    pub preset: String,
    /// LoRA rank.
    #[arg(long)]
    pub rank: Option<usize>,
    /// LoRA alpha (the update is scaled by alpha/rank; ExPLoRA uses 1).
    #[arg(long)]
    pub alpha: Option<f64>,
    /// LoRA targets: comma-separated q, k, v, proj, fc1, fc2 (or attn, mlp, all).
    #[arg(long)]
    pub targets: Option<String>,
    /// Blocks to unfreeze instead of the preset's (0-based, comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub unfreeze: Option<Vec<usize>>,
    /// Add Convpass adapters (bottleneck width, 8 in the paper) beside attention and MLP of
    /// every block.
    #[arg(long)]
    pub convpass: Option<usize>,
    /// Convpass scale s (the paper picks it per dataset; 10 for EuroSAT).
    #[arg(long, default_value_t = 10.0)]
    pub convpass_scale: f64,
    /// Blocks that get Convpass adapters (0-based, comma-separated; default: all).
    #[arg(long, value_delimiter = ',')]
    pub convpass_blocks: Option<Vec<usize>>,
    /// Add a learnable-memory task with this many memory tokens per layer (and its own class
    /// token); the original outputs stay unchanged.
    #[arg(long)]
    pub memory_tokens: Option<usize>,
    /// Images per micro-batch, for the activation-memory estimate.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Global and local crop sizes in pixels, for the activation-memory estimate.
    #[arg(long, value_delimiter = ',', default_values_t = [224, 98])]
    pub crops: Vec<u32>,
    /// Local crops per image, for the activation-memory estimate.
    #[arg(long, default_value_t = 8)]
    pub local_crops: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Adapter file written by training (`adapter.safetensors`): LoRA factors and the other
    /// trained tensors, re-applied over --weights.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Output file (.safetensors). The HF layout also writes config.json beside it.
    #[arg(long)]
    pub out: PathBuf,
    /// same (the layout --weights came in; Meta and MAE .pth become Meta-keyed safetensors),
    /// hf, meta or explora.
    #[arg(long, default_value = "same")]
    pub layout: String,
}

#[derive(Args, Debug, Default)]
pub struct DefaultArgs {
    /// Run folder (default: runs/default-<UTC time>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Optimizer steps (default 200; 24 on software Vulkan).
    #[arg(long)]
    pub steps: Option<u64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// The reference script's knobs, with its defaults.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// infer, train or both.
    #[arg(long, value_enum, default_value = "both")]
    pub mode: crate::recipes::bench::BenchMode,
    /// Architecture preset (vits14, vitb14, vitl14, tiny, ...); random weights.
    #[arg(long, default_value = "vits14")]
    pub arch: String,
    /// Source images per training step.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[arg(long, default_value_t = 224)]
    pub global_size: usize,
    #[arg(long, default_value_t = 98)]
    pub local_size: usize,
    /// Local crops per image.
    #[arg(long, default_value_t = 8)]
    pub locals: usize,
    /// Prototypes of the DINO/iBOT head.
    #[arg(long, default_value_t = 65_536)]
    pub prototypes: usize,
    /// LoRA rank on Q,V of the blocks that are not unfrozen.
    #[arg(long, default_value_t = 64)]
    pub rank: usize,
    /// Blocks trained fully (comma-separated, 0-based).
    #[arg(long, value_delimiter = ',', default_value = "11")]
    pub unfreeze: Vec<usize>,
    /// Images per forward pass of the infer workload.
    #[arg(long, default_value_t = 64)]
    pub infer_batch: usize,
    #[arg(long, default_value_t = 224)]
    pub infer_size: usize,
    /// Timed calls of each workload (after the cold one and the warm-up).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed calls between the cold one and the timed ones.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Pre-training flags; each overrides the config file (or the defaults).
#[derive(Args, Debug, Default)]
pub struct PretrainArgs {
    /// TOML run config (see `--print-config` for every field with its default).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Backbone checkpoint: Meta DINOv2 .pth, Hugging Face safetensors, MAE .pth or explora
    /// safetensors. Without weights (and without --config) the built-in tiny run is used.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Architecture preset (inferred from the checkpoint when omitted).
    #[arg(long)]
    pub arch: Option<String>,
    /// Folder of unlabelled domain images (any tree; class folders are ignored). Without it,
    /// procedural satellite-like tiles.
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Run folder (default: runs/pretrain-<UTC time>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Optimizer steps.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Images per micro-batch.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Micro-batches per optimizer step (effective batch = batch × accumulation).
    #[arg(long)]
    pub accumulation: Option<usize>,
    /// Base learning rate at the reference batch (1024; sqrt-scaled to the effective batch).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Blocks to unfreeze fully (0-based, comma-separated; default: the last).
    #[arg(long, value_delimiter = ',')]
    pub unfreeze: Option<Vec<usize>>,
    /// LoRA rank on Q,V of the other blocks (paper: 64).
    #[arg(long)]
    pub rank: Option<usize>,
    /// Add random 90° rotations and vertical flips (symmetries of overhead imagery).
    #[arg(long)]
    pub overhead: bool,
    /// Global and local crop sizes in pixels (multiples of the patch size; paper: 224,98).
    #[arg(long, value_delimiter = ',')]
    pub crops: Option<Vec<u32>>,
    /// Local crops per image (paper: 8).
    #[arg(long)]
    pub local_crops: Option<usize>,
    /// Number of prototypes of the DINO/iBOT head (paper: 65536).
    #[arg(long)]
    pub prototypes: Option<usize>,
    /// Centering of teacher outputs: softmax (default) or sinkhorn-knopp.
    #[arg(long)]
    pub centering: Option<String>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Write a checkpoint every N steps.
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Labelled ImageFolder for the periodic k-NN monitor.
    #[arg(long)]
    pub knn_images: Option<PathBuf>,
    /// Run the k-NN monitor every N steps (0 = never).
    #[arg(long)]
    pub knn_every: Option<u64>,
    /// Labelled ImageFolder: the k-NN monitor during the run and, after it, the comparison of
    /// the source and adapted backbones (k-NN and linear probe, in <run>/evaluation/).
    #[arg(long)]
    pub labelled: Option<PathBuf>,
    /// Compare the source and adapted backbones after the run (on --labelled, or on generated
    /// tiles of the procedural domain); `[evaluate] after_training` in the config.
    #[arg(long)]
    pub evaluate: bool,
    /// Print the resolved run config as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

#[derive(Args, Debug)]
pub struct ResumeArgs {
    /// The run folder of an earlier `pretrain` (or default) run.
    pub run: PathBuf,
    /// Train up to this many steps in total (extends a finished run).
    #[arg(long)]
    pub steps: Option<u64>,
}

#[derive(Args, Debug, Default)]
pub struct PipelineArgs {
    /// A pipeline TOML file (sections model, data, pretrain, knn, probe, finetune; see
    /// --print-config). Without it: the built-in comparison on a procedural labelled set.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Source checkpoint (overrides the config's model.weights).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Architecture preset (overrides model.arch).
    #[arg(long)]
    pub arch: Option<String>,
    /// Labelled images: an ImageFolder or a `path,label` CSV (overrides data.labelled).
    #[arg(long)]
    pub labelled: Option<PathBuf>,
    /// Evaluation input size in pixels (overrides data.image_size).
    #[arg(long)]
    pub image_size: Option<u32>,
    /// At most this many images per class (overrides data.max_per_class).
    #[arg(long)]
    pub max_per_class: Option<usize>,
    /// ExPLoRA pre-training steps (overrides pretrain.run.steps).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Also fine-tune both variants with LoRA (rank 8) when the config has no [finetune].
    #[arg(long)]
    pub finetune: bool,
    /// Seed of the split, the probe and the runs (overrides data.seed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Output folder; running the same command again continues there (default
    /// runs/pipeline-<time>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the resulting config as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// The pipeline config from `--config` (or the built-in one) with the flags applied.
pub fn pipeline_config(args: &PipelineArgs, software: bool) -> anyhow::Result<crate::recipes::pipeline::PipelineConfig> {
    let mut c = match &args.config {
        Some(path) => crate::recipes::pipeline::PipelineConfig::load(path)?,
        None => crate::recipes::pipeline::PipelineConfig::builtin(software),
    };
    if args.weights.is_some() {
        c.model.weights = args.weights.clone();
        if args.config.is_none() && args.arch.is_none() {
            c.model.arch = None;
        }
    }
    if args.arch.is_some() {
        c.model.arch = args.arch.clone();
    }
    if args.labelled.is_some() {
        c.data.labelled = args.labelled.clone();
    }
    if let Some(v) = args.image_size {
        c.data.image_size = v;
    }
    if let Some(v) = args.max_per_class {
        c.data.max_per_class = v;
    }
    if let Some(v) = args.steps {
        c.pretrain.run.steps = v;
    }
    if let Some(v) = args.seed {
        c.data.seed = v;
    }
    if args.finetune && c.finetune.is_none() {
        c.finetune = Some(Default::default());
    }
    Ok(c)
}

fn pipeline_cmd(choice: &DeviceChoice, args: PipelineArgs) -> anyhow::Result<()> {
    if args.print_config {
        print!("{}", pipeline_config(&args, false)?.to_toml());
        return Ok(());
    }
    let device = device::open(choice)?;
    eprintln!("device: {}", device::describe(&device));
    let config = pipeline_config(&args, device::is_software(&device))?;
    config.validate()?;
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from("runs").join(format!("pipeline-{}", crate::engine::utc_stamp())));
    let handle = engine::spawn("pipeline", move |ctx| {
        let summary = crate::recipes::pipeline::run_pipeline(&config, &out, &device, ctx)?;
        if summary.stopped {
            return Ok(format!("stopped; run the same command with --out {} to continue", out.display()));
        }
        let lines: Vec<String> =
            summary.rows.iter().map(|r| format!("  {:<8} {:<13} top-1 {:5.1}%", r.variant, r.method, 100.0 * r.top1)).collect();
        let deltas: Vec<String> = summary.deltas().iter().map(|d| format!("  {}", d.describe())).collect();
        Ok(format!(
            "{}\nSource → ExPLoRA:\n{}\nResults in {}: report.md, report.csv, eval/*/confusion.png",
            lines.join("\n"),
            deltas.join("\n"),
            out.display()
        ))
    });
    output::follow(handle)
}

/// What the process does before either face starts: keep Mesa's Wayland probe quiet where
/// there is no desktop session, and log through `EXPLORA_LOG`. Call first thing in `main`.
pub fn prepare_process() {
    quiet_headless_wayland_probe();
    init_tracing();
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
        Some(Command::Info { json }) => info(&cli.device, json),
        Some(Command::Embed(args)) => embed_cmd(&cli.device, args),
        Some(Command::Attention(args)) => attention_cmd(&cli.device, args),
        Some(Command::Plan(args)) => plan_cmd(args),
        Some(Command::Export(args)) => export_cmd(&cli.device, args),
        Some(Command::Default(args)) => default_cmd(&cli.device, args),
        Some(Command::Bench(args)) => bench_cmd(&cli.device, args),
        Some(Command::Pretrain(args)) => pretrain_cmd(&cli.device, *args),
        Some(Command::Resume(args)) => resume_cmd(&cli.device, args),
        Some(Command::Pipeline(args)) => pipeline_cmd(&cli.device, *args),
        None => default_cmd(&cli.device, DefaultArgs::default()),
    }
}

fn info(choice: &DeviceChoice, json: bool) -> anyhow::Result<()> {
    let adapters = device::list_adapters();
    if json {
        println!("{}", serde_json::to_string_pretty(&adapters)?);
        return Ok(());
    }
    println!("Devices:");
    println!("  --device {:<13} burn's native CPU backend (burn-flex), {} threads", "cpu", device::cpu_threads());
    if adapters.is_empty() {
        println!("  (wgpu sees no GPU adapter; `auto` computes on the CPU backend)");
    } else {
        println!("GPU adapters seen by wgpu:");
    }
    for a in &adapters {
        println!(
            "  --device {:<13} {} [{} {}] driver: {}\n  {:<23} max buffer {} MiB, max storage binding {} MiB, workgroup {} invocations / {} KiB shared, f16 {}, subgroups {}",
            a.selector,
            a.name,
            a.backend,
            a.device_type,
            if a.driver.is_empty() { "?" } else { &a.driver },
            "",
            a.max_buffer_size >> 20,
            a.max_storage_buffer_binding_size >> 20,
            a.max_compute_invocations_per_workgroup,
            a.max_compute_workgroup_storage_size >> 10,
            if a.shader_f16 { "yes" } else { "no" },
            if a.subgroups { "yes" } else { "no" },
        );
    }
    let device = device::open(choice)?;
    println!("explora uses (--device {choice}): {}", device::describe(&device));
    Ok(())
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

fn export_cmd(choice: &DeviceChoice, args: ExportArgs) -> anyhow::Result<()> {
    use crate::checkpoint::{Layout, load_adapter, save_backbone, save_backbone_hf, save_backbone_meta};
    let device = device::open(choice)?;
    let (mut model, source) = load_model_with_layout(&args.model, &device)?;
    if let Some(adapter) = &args.adapter {
        let (adapted, plan) = load_adapter(model, adapter)?;
        let budget = plan.budget(adapted.config());
        eprintln!("applied {} ({} trained parameters)", adapter.display(), budget.trainable);
        model = adapted;
    }
    anyhow::ensure!(
        !model.blocks.iter().any(|b| b.convpass_attn.is_some() || b.convpass_mlp.is_some()) && model.tasks.is_empty(),
        "Convpass adapters and memory tokens cannot be merged into plain weights; keep the adapter file \
         and re-apply it over the base checkpoint instead"
    );
    let model = crate::peft::merge_lora(model);
    let layout = match args.layout.as_str() {
        "same" => match source {
            Layout::HfDinov2 => "hf",
            Layout::MetaDinov2 | Layout::Mae => "meta",
            Layout::Explora => "explora",
        },
        other @ ("hf" | "meta" | "explora") => other,
        other => anyhow::bail!("unknown --layout `{other}`: use same, hf, meta or explora"),
    };
    match layout {
        "hf" => save_backbone_hf(&model, &args.out)?,
        "meta" => save_backbone_meta(&model, &args.out)?,
        _ => save_backbone(&model, &args.out)?,
    }
    println!("wrote {} ({layout} layout, LoRA merged)", args.out.display());
    Ok(())
}

fn check_size(size: u32, config: &VitConfig) -> anyhow::Result<()> {
    anyhow::ensure!(
        size > 0 && (size as usize).is_multiple_of(config.patch_size),
        "--size {size} is not a multiple of the model's patch size {}",
        config.patch_size
    );
    Ok(())
}

fn embed_cmd(choice: &DeviceChoice, args: EmbedArgs) -> anyhow::Result<()> {
    let list = ImageList::scan(&args.images)?;
    let device = device::open(choice)?;
    let model = load_model(&args.model, &device)?;
    check_size(args.size, model.config())?;
    let out = args.out.clone();
    let pre = Preprocess::new(args.size);
    let batch = args.batch;
    let handle = engine::spawn("embed", move |ctx| {
        let started = std::time::Instant::now();
        let features = embed::extract(&model, &list, &pre, batch, ctx)?;
        let secs = started.elapsed().as_secs_f64();
        features.save(&out)?;
        ctx.artifact("features", &out);
        Ok(format!(
            "embedded {} images in {secs:.1} s ({:.1} images/s, {} skipped) → {}",
            features.len(),
            features.len() as f64 / secs.max(1e-9),
            features.skipped.count(),
            out.display()
        ))
    });
    output::follow(handle)
}

fn attention_cmd(choice: &DeviceChoice, args: AttentionArgs) -> anyhow::Result<()> {
    let device = device::open(choice)?;
    let model = load_model(&args.model, &device)?;
    check_size(args.size, model.config())?;
    let image = decode_rgb(&args.image)?;
    let pre = Preprocess::new(args.size);
    let shown = pre.apply(&image);
    let tensor = images_tensor(pre.to_tensor_data(&image), 1, args.size as usize, &device);
    let layer = args.layer.unwrap_or(model.config().depth - 1);
    let map = attention::cls_attention(&model, tensor, layer, args.head)?;
    write_png(&attention::overlay(&shown, &map, 0.55), &args.out)?;
    println!(
        "wrote {} (CLS attention, block {layer}, {})",
        args.out.display(),
        args.head.map_or("mean over heads".to_string(), |h| format!("head {h}"))
    );
    Ok(())
}

fn plan_cmd(args: PlanArgs) -> anyhow::Result<()> {
    let config = parse_arch(&Some(args.arch.clone()))?.expect("given");
    let spec = crate::peft::PlanSpec {
        preset: args.preset.clone(),
        unfreeze: args.unfreeze.clone(),
        lora_rank: args.rank,
        lora_alpha: args.alpha,
        lora_targets: args.targets.clone(),
        convpass: args.convpass,
        convpass_scale: args.convpass_scale,
        convpass_blocks: args.convpass_blocks.clone(),
        memory_tokens: args.memory_tokens,
        ..Default::default()
    };
    let plan = spec.resolve(&config)?;
    let budget = plan.budget(&config);
    anyhow::ensure!(args.crops.len() == 2, "--crops takes two sizes, global and local, e.g. --crops 224,98");
    let crops = [(args.crops[0], 2), (args.crops[1], args.local_crops)];
    let activations = crate::peft::activation_bytes(&config, &plan, args.batch, &crops);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "arch": config.name, "plan": plan, "budget": budget, "activation_bytes": activations })
            )?
        );
        return Ok(());
    }
    println!(
        "{} ({} blocks, width {}): {} parameters; preset {}",
        config.name,
        config.depth,
        config.embed_dim,
        crate::peft::thousands(config.num_params()),
        args.preset
    );
    println!("{:<44} {:>14} {:>8}", "trainable component", "parameters", "%");
    for row in &budget.rows {
        println!(
            "{:<44} {:>14} {:>7.2}%",
            row.component,
            crate::peft::thousands(row.params),
            100.0 * row.params as f64 / budget.backbone as f64
        );
    }
    println!("{:<44} {:>14} {:>7.2}%", "total", crate::peft::thousands(budget.trainable), budget.percent());
    println!(
        "optimizer state (AdamW, 2 × f32 per trainable parameter): {:.1} MiB",
        budget.optimizer_state_bytes() as f64 / (1 << 20) as f64
    );
    println!(
        "activation memory (estimate, f32, batch {}, 2 × {} px + {} × {} px crops): {:.1} MiB",
        args.batch,
        args.crops[0],
        args.local_crops,
        args.crops[1],
        activations as f64 / (1 << 20) as f64
    );
    Ok(())
}

fn write_png(image: &image::RgbImage, path: &Path) -> anyhow::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    image.save(path).with_context(|| format!("writing {}", path.display()))
}

fn bench_cmd(choice: &DeviceChoice, args: BenchArgs) -> anyhow::Result<()> {
    let config = crate::recipes::bench::BenchConfig {
        mode: args.mode,
        arch: args.arch,
        batch: args.batch,
        global_size: args.global_size,
        local_size: args.local_size,
        locals: args.locals,
        prototypes: args.prototypes,
        rank: args.rank,
        unfreeze: args.unfreeze,
        infer_batch: args.infer_batch,
        infer_size: args.infer_size,
        steps: args.steps,
        warmup: args.warmup,
        seed: args.seed,
    };
    config.validate()?;
    let device = device::open(choice)?;
    eprintln!("device: {}", device::describe(&device));
    let handle = engine::spawn("bench", move |ctx| Ok(crate::recipes::bench::run(&config, &device, ctx)?.to_string()));
    output::follow(handle)
}

fn default_cmd(choice: &DeviceChoice, args: DefaultArgs) -> anyhow::Result<()> {
    let device = device::open(choice)?;
    eprintln!("device: {}", device::describe(&device));
    let out = args.out.unwrap_or_else(|| PathBuf::from("runs").join(format!("default-{}", crate::engine::utc_stamp())));
    let mut job = DefaultRun::for_device(out, &device);
    job.config.run.seed = args.seed;
    if let Some(steps) = args.steps {
        job.config.run.steps = steps;
    }
    let handle = engine::spawn("default", move |ctx| crate::recipes::default_run::run(&job, &device, ctx));
    output::follow(handle)
}

/// The run config a `pretrain` invocation asks for: the file (or the defaults) plus flags.
pub fn pretrain_config(args: &PretrainArgs) -> anyhow::Result<PretrainConfig> {
    let mut c = match &args.config {
        Some(path) => PretrainConfig::load(path)?,
        None if args.weights.is_none() && args.arch.is_none() => PretrainConfig::builtin(),
        None => PretrainConfig::default(),
    };
    if args.weights.is_some() {
        c.model.weights = args.weights.clone();
        c.model.arch = None;
    }
    if args.arch.is_some() {
        c.model.arch = args.arch.clone();
    }
    if args.images.is_some() {
        c.set_images(args.images.clone());
    }
    let o = &mut c.optim;
    o.batch = args.batch.unwrap_or(o.batch);
    o.accumulation = args.accumulation.unwrap_or(o.accumulation);
    o.base_lr = args.lr.unwrap_or(o.base_lr);
    if args.unfreeze.is_some() {
        c.plan.unfreeze = args.unfreeze.clone();
    }
    if args.rank.is_some() {
        c.plan.lora_rank = args.rank;
    }
    c.crops.overhead |= args.overhead;
    if let Some(sizes) = &args.crops {
        if sizes.len() != 2 {
            anyhow::bail!("--crops takes two sizes, global and local, e.g. --crops 224,98");
        }
        c.crops.global_size = sizes[0];
        c.crops.local_size = sizes[1];
    }
    c.crops.local_crops = args.local_crops.unwrap_or(c.crops.local_crops);
    c.head.prototypes = args.prototypes.unwrap_or(c.head.prototypes);
    if let Some(centering) = &args.centering {
        c.loss.centering = match centering.as_str() {
            "softmax" => crate::objectives::Centering::Softmax,
            "sinkhorn-knopp" | "sinkhorn" => crate::objectives::Centering::SinkhornKnopp,
            other => anyhow::bail!("--centering {other}: use softmax or sinkhorn-knopp"),
        };
    }
    c.run.steps = args.steps.unwrap_or(c.run.steps);
    c.run.seed = args.seed.unwrap_or(c.run.seed);
    c.run.checkpoint_every = args.checkpoint_every.unwrap_or(c.run.checkpoint_every);
    if args.knn_images.is_some() {
        c.set_labelled(args.knn_images.clone(), false);
    }
    if args.labelled.is_some() {
        c.set_labelled(args.labelled.clone(), true);
    }
    c.evaluate.after_training |= args.evaluate;
    c.monitor.knn_every = args.knn_every.unwrap_or(c.monitor.knn_every);
    Ok(c)
}

fn pretrain_cmd(choice: &DeviceChoice, args: PretrainArgs) -> anyhow::Result<()> {
    let config = pretrain_config(&args)?;
    if args.print_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    config.validate()?;
    let device = device::open(choice)?;
    eprintln!("device: {}", device::describe(&device));
    let out = args.out.unwrap_or_else(|| PathBuf::from("runs").join(format!("pretrain-{}", crate::engine::utc_stamp())));
    let job = PretrainJob { config, out, resume: false };
    let handle = engine::spawn("pretrain", move |ctx| crate::recipes::run::run(&job, &device, ctx));
    output::follow(handle)
}

fn resume_cmd(choice: &DeviceChoice, args: ResumeArgs) -> anyhow::Result<()> {
    let mut job = PretrainJob::resume(&args.run)?;
    if let Some(steps) = args.steps {
        job.config.run.steps = steps;
    }
    let device = device::open(choice)?;
    eprintln!("device: {}", device::describe(&device));
    let handle = engine::spawn("pretrain", move |ctx| crate::recipes::run::run(&job, &device, ctx));
    output::follow(handle)
}
