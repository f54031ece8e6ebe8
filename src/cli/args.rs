//! The command line's arguments (clap derive): the global options and one struct per command.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::device::DeviceChoice;

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
    /// ExPLoRA extended pre-training (DINOv2, MAE or UpStep objective) of a backbone on unlabelled domain
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
    /// The objective the plan trains under (default: the backbone family's own). With mae the
    /// encoder's mask token stays frozen and the budget lists the MAE decoder beside the
    /// backbone (a fresh one of the default shape: 512 wide, 8 blocks). With upstep and no plan
    /// flag the plan is UpStep's default: LoRA r=8 on Q, K, V of every block, nothing else.
    #[arg(long, value_enum)]
    pub objective: Option<crate::train::config::Objective>,
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
    /// Optimizer steps (default: the built-in run's, 900; 24 on software Vulkan).
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
    /// Self-supervised objective: dinov2 (DINO + iBOT + KoLeo, EMA teacher) or mae (masked-patch
    /// reconstruction; MAE backbones need it, DINOv2 backbones may use it with a fresh decoder).
    /// MAE defaults: mask ratio 0.75, normalised-pixel loss, AdamW betas (0.9, 0.95), no weight
    /// decay; the `[mae]` section of the config sets the rest. upstep is explora's
    /// interpretation of UpStep (arXiv 2502.21313; only its abstract is public): swapped
    /// prediction of Sinkhorn-Knopp codes against fixed k-means centres of the base model, a
    /// centroid regulariser towards the base model and a gate that skips optimizer steps;
    /// LoRA r=8 on Q,K,V by default; the `[upstep]` section sets the rest.
    #[arg(long, value_enum)]
    pub objective: Option<crate::train::config::Objective>,
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
    /// Base learning rate at the reference batch (default per objective: DINOv2 1e-3 at 1,024
    /// images, sqrt-scaled to the effective batch; MAE 4.5e-4 at 256, scaled linearly).
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
    /// Pre-train once per objective (comma-separated: dinov2,mae,upstep), each from the same
    /// [pretrain] settings, and report each beside the source backbone (overrides objectives).
    #[arg(long, value_delimiter = ',')]
    pub objectives: Option<Vec<crate::train::Objective>>,
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
