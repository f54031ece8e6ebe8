//! The ViT backbone: patch embedding, CLS/register/mask tokens, pre-norm blocks with optional
//! LayerScale and SwiGLU, final LayerNorm. Field names mirror Meta's DINOv2 checkpoints
//! (`blocks.N.attn.qkv`, `ls1.gamma`, ...), so that layout loads with renames only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use super::config::VitConfig;
use super::convpass::Convpass;
use super::cpu;
use super::cpu::gelu;
use super::lora::Lora;
use super::memory::{MemoryTask, memory_mask};
use super::pos_embed::bicubic_weights;

const INIT_STD: f64 = 0.02;

fn linear(d_in: usize, d_out: usize, device: &Device) -> Linear {
    init_linear(d_in, d_out, Initializer::Normal { mean: 0.0, std: INIT_STD }, device)
}

/// A linear layer whose weight is drawn from `init` and whose bias starts at zero, as the
/// reference code initialises them (timm, DINOv2, MAE). burn's `LinearConfig::init` draws the
/// bias from the same initializer; in a DINO head a N(0, 0.02) bias outweighs the signal of
/// the small weights, so every image got nearly the same head output and the DINO and iBOT
/// losses stayed at ln K.
pub fn init_linear(d_in: usize, d_out: usize, init: Initializer, device: &Device) -> Linear {
    let mut layer = LinearConfig::new(d_in, d_out).with_initializer(init).init(device);
    layer.bias = layer.bias.map(|_| Initializer::Zeros.init([d_out], device));
    layer
}

/// Non-overlapping patches → tokens: a `patch × patch` convolution with stride `patch`.
#[derive(Module, Debug)]
pub struct PatchEmbed {
    pub proj: Conv2d,
}

impl PatchEmbed {
    /// `[B, 3, H, W]` → `[B, (H/p)·(W/p), D]`, row-major over the patch grid.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<3> {
        let x = self.proj.forward(images); // [B, D, h, w]
        let [b, d, h, w] = x.dims();
        x.reshape([b, d, h * w]).swap_dims(1, 2)
    }
}

/// Multi-head self-attention with the fused `qkv` projection of DINOv2/MAE checkpoints, and
/// optional LoRA updates on Q, K, V and the output projection.
#[derive(Module, Debug)]
pub struct Attention {
    pub qkv: Linear,
    pub proj: Linear,
    pub lora_q: Option<Lora>,
    pub lora_k: Option<Lora>,
    pub lora_v: Option<Lora>,
    pub lora_proj: Option<Lora>,
    num_heads: usize,
}

/// `y + lora(x)` when an adapter is present.
fn adapted<const D: usize>(y: Tensor<D>, lora: &Option<Lora>, x: &Tensor<D>) -> Tensor<D> {
    match lora {
        Some(lora) => y + lora.delta(x.clone()),
        None => y,
    }
}

/// `qkv + [dq, dk, dv]` (`[B, N, 3D]`), a zero block where a delta is absent.
fn with_deltas(qkv: Tensor<3>, deltas: [Option<Tensor<3>>; 3]) -> Tensor<3> {
    if deltas.iter().all(Option::is_none) {
        return qkv;
    }
    let [b, n, d3] = qkv.dims();
    let device = qkv.device();
    let blocks = deltas.map(|delta| delta.unwrap_or_else(|| Tensor::zeros([b, n, d3 / 3], &device)));
    qkv + Tensor::cat(blocks.into(), 2)
}

impl Attention {
    /// `[B, N, D]` → `[B, N, D]`, plus the attention probabilities `[B, heads, N, N + M]` when
    /// asked. `extra` (`[B, M, D]`, already normalised) adds keys/values that issue no query
    /// (memory tokens); `bias` (`[N, N + M]`) is added to the attention scores (masking).
    pub fn forward(
        &self,
        x: Tensor<3>,
        extra: Option<Tensor<3>>,
        bias: Option<Tensor<2>>,
        return_probs: bool,
    ) -> (Tensor<3>, Option<Tensor<4>>) {
        let [b, n, d] = x.dims();
        let h = self.num_heads;
        let dh = d / h;
        if extra.is_none() && !return_probs && bias.is_none() && self.trains_on(&x) && cpu::attention_with_grad_applies(&x) {
            // With gradients on the CPU backend: explora's operations for the projection with
            // LoRA's updates and for the attention.
            let context =
                cpu::attention_with_grad(self.projection(x), h, None).expect("the CPU backend's attention applies to its own projection");
            return (self.project_out(context), None);
        }
        let kv_input = match extra {
            Some(extra) => Tensor::cat(vec![x.clone(), extra], 1),
            None => x.clone(),
        };
        let nk = kv_input.dims()[1];
        let qkv = cpu::linear(&self.qkv, kv_input.clone()); // [B, NK, 3D]: q, k, v
        let delta = |lora: &Option<Lora>, input: &Tensor<3>| lora.as_ref().map(|l| l.delta(input.clone()));
        let deltas = [delta(&self.lora_q, &x), delta(&self.lora_k, &kv_input), delta(&self.lora_v, &kv_input)];
        if !return_probs && bias.is_none() {
            // Without gradients on the CPU backend, explora's own kernel reads the heads in
            // place from the fused projection, the LoRA deltas added into it.
            let inputs: Vec<&Tensor<3>> = std::iter::once(&qkv).chain(deltas.iter().flatten()).collect();
            if cpu::attention_applies(&inputs) {
                let context = cpu::fused_attention(qkv, deltas, n, h);
                return (self.project_out(context), None);
            }
        }
        let plus = |t: Tensor<3>, delta: Option<Tensor<3>>| match delta {
            Some(delta) => t + delta,
            None => t,
        };
        let [dq, dk, dv] = deltas;
        let q = plus(qkv.clone().narrow(1, 0, n).narrow(2, 0, d), dq);
        let k = plus(qkv.clone().narrow(2, d, d), dk);
        let v = plus(qkv.narrow(2, 2 * d, d), dv);
        let heads = |t: Tensor<3>, len: usize| t.reshape([b, len, h, dh]).swap_dims(1, 2); // [B, H, len, Dh]
        if !return_probs && bias.is_none() {
            // The backend's fused attention (flash kernels on CubeCL without autodiff; autodiff
            // falls back to the explicit form below).
            let context = attention(heads(q, n), heads(k, nk), heads(v, nk), None, None, AttentionModuleOptions::default())
                .swap_dims(1, 2)
                .reshape([b, n, d]);
            return (self.project_out(context), None);
        }
        let mut scores = heads(q, n).mul_scalar((dh as f64).powf(-0.5)).matmul(heads(k, nk).swap_dims(2, 3));
        if let Some(bias) = bias {
            scores = scores + bias.unsqueeze::<4>();
        }
        let probs = softmax(scores, 3);
        let context = probs.clone().matmul(heads(v, nk)).swap_dims(1, 2).reshape([b, n, d]);
        (self.project_out(context), return_probs.then_some(probs))
    }

    /// The attention of sequences packed in `x` `[1, T, D]`, runs of `lengths` tokens, on the
    /// CPU backend (where [`cpu::attention_with_grad_applies`]).
    fn forward_packed(&self, x: Tensor<3>, lengths: &Arc<[usize]>) -> Tensor<3> {
        let context = cpu::attention_with_grad(self.projection(x), self.num_heads, Some(lengths.clone()))
            .expect("packed attention runs only where the CPU backend's operation applies");
        self.project_out(context)
    }

    /// Whether the projection of `x` (q, k, v) needs gradients: `x` needs them, or the `qkv`
    /// layer or an adapter on q, k or v trains.
    fn trains_on(&self, x: &Tensor<3>) -> bool {
        let trains = |lora: &Option<Lora>| lora.as_ref().is_some_and(|l| l.a.val().is_require_grad() || l.b.val().is_require_grad());
        let qkv_trains = self.qkv.weight.val().is_require_grad() || self.qkv.bias.as_ref().is_some_and(|b| b.val().is_require_grad());
        x.is_tracked() || qkv_trains || [&self.lora_q, &self.lora_k, &self.lora_v].into_iter().any(trains)
    }

    /// The fused projection `[.., 3D]` of `x` with LoRA's updates added to q, k and v: on the
    /// CPU backend with gradients one operation of explora's, elsewhere burn's linear layers.
    fn projection(&self, x: Tensor<3>) -> Tensor<3> {
        let d = x.dims()[2];
        let adapters: Vec<(usize, &Lora)> = [(0, &self.lora_q), (d, &self.lora_k), (2 * d, &self.lora_v)]
            .into_iter()
            .filter_map(|(at, l)| Some((at, l.as_ref()?)))
            .collect();
        let weight = self.qkv.weight.val();
        let bias = self.qkv.bias.as_ref().map(|b| b.val());
        if !adapters.is_empty()
            && let Some(qkv) = cpu::frozen_linear_with_lora(&x, &weight, bias.as_ref(), &adapters)
        {
            return qkv;
        }
        let qkv = cpu::linear(&self.qkv, x.clone());
        let delta = |lora: &Option<Lora>| lora.as_ref().map(|l| l.delta(x.clone()));
        with_deltas(qkv, [delta(&self.lora_q), delta(&self.lora_k), delta(&self.lora_v)])
    }

    /// The output projection of the attention's context, with its LoRA update.
    fn project_out(&self, context: Tensor<3>) -> Tensor<3> {
        adapted(cpu::linear(&self.proj, context.clone()), &self.lora_proj, &context)
    }
}

/// Per-channel scaling of a residual branch (DINOv2's `ls1`/`ls2`).
#[derive(Module, Debug)]
pub struct LayerScale {
    pub gamma: Param<Tensor<1>>,
}

impl LayerScale {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [d] = self.gamma.dims();
        x * self.gamma.val().reshape([1, 1, d])
    }
}

/// fc1 → GELU → fc2, or for SwiGLU: fc1 (= Meta's `w12`, 2·hidden wide) → SiLU(x1)·x2 → fc2
/// (= `w3`).
#[derive(Module, Debug)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
    pub lora_fc1: Option<Lora>,
    pub lora_fc2: Option<Lora>,
    swiglu: bool,
}

impl Mlp {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let hidden = adapted(cpu::linear(&self.fc1, x.clone()), &self.lora_fc1, &x);
        let hidden = if self.swiglu {
            let mut halves = hidden.chunk(2, 2);
            let x2 = halves.pop().expect("two halves");
            let x1 = halves.pop().expect("two halves");
            silu(x1) * x2
        } else {
            gelu(hidden)
        };
        adapted(cpu::linear(&self.fc2, hidden.clone()), &self.lora_fc2, &hidden)
    }
}

/// Pre-norm transformer block: `x + ls1(attn(norm1 x))`, then `x + ls2(mlp(norm2 x))`.
#[derive(Module, Debug)]
pub struct Block {
    pub norm1: LayerNorm,
    pub attn: Attention,
    pub ls1: Option<LayerScale>,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
    pub ls2: Option<LayerScale>,
    /// Convpass bypass beside the attention (reads `norm1`'s output).
    pub convpass_attn: Option<Convpass>,
    /// Convpass bypass beside the MLP (reads `norm2`'s output).
    pub convpass_mlp: Option<Convpass>,
    /// The norms' ε (burn keeps a LayerNorm's own private).
    #[module(skip)]
    norm_eps: f64,
}

/// Where the patch grid sits in the token sequence: `prefix` tokens (CLS and registers), then
/// `rows × cols` patches, then any task class tokens (learnable memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenLayout {
    pub prefix: usize,
    pub grid: (usize, usize),
}

/// One layer's memory: `[B, M, D]` tokens (before `norm1`) and the attention bias.
#[derive(Debug, Clone)]
pub struct LayerMemory {
    pub tokens: Tensor<3>,
    pub bias: Tensor<2>,
}

impl Block {
    /// A fresh pre-norm block of width `d` (the initialisation of [`VitConfig::init`]); MAE's
    /// decoder builds its blocks with this too.
    pub fn new(d: usize, heads: usize, hidden: usize, swiglu: bool, layer_scale: Option<f64>, eps: f64, device: &Device) -> Self {
        let norm = || LayerNormConfig::new(d).with_epsilon(eps).init(device);
        let scale = || layer_scale.map(|value| LayerScale { gamma: Initializer::Constant { value }.init([d], device) });
        let fc1_out = if swiglu { 2 * hidden } else { hidden };
        Block {
            norm1: norm(),
            attn: Attention {
                qkv: linear(d, 3 * d, device),
                proj: linear(d, d, device),
                lora_q: None,
                lora_k: None,
                lora_v: None,
                lora_proj: None,
                num_heads: heads,
            },
            ls1: scale(),
            norm2: norm(),
            mlp: Mlp { fc1: linear(d, fc1_out, device), fc2: linear(hidden, d, device), lora_fc1: None, lora_fc2: None, swiglu },
            ls2: scale(),
            convpass_attn: None,
            convpass_mlp: None,
            norm_eps: eps,
        }
    }

    pub fn forward(
        &self,
        x: Tensor<3>,
        return_probs: bool,
        layout: TokenLayout,
        memory: Option<LayerMemory>,
    ) -> (Tensor<3>, Option<Tensor<4>>) {
        let (extra, bias) = match memory {
            // Memory tokens go through the block's first norm like the tokens they sit beside.
            Some(m) => (Some(self.norm1.forward(m.tokens)), Some(m.bias)),
            None => (None, None),
        };
        let mut probs = None;
        let x = self.residuals(x, Some(layout), |h| {
            let (out, p) = self.attn.forward(h, extra, bias, return_probs);
            probs = p;
            out
        });
        (x, probs)
    }

    /// Whether the block can run on packed sequences ([`Block::forward_packed`]): it has no
    /// Convpass bypass (those read each image's patch grid).
    fn packs(&self) -> bool {
        self.convpass_attn.is_none() && self.convpass_mlp.is_none()
    }

    /// The block on sequences packed in `x` `[1, T, D]`, runs of `lengths` tokens: every layer
    /// but the attention works row by row, so the rows of all sequences go through it at once.
    fn forward_packed(&self, x: Tensor<3>, lengths: &Arc<[usize]>) -> Tensor<3> {
        assert!(self.packs(), "a block with Convpass runs per crop size");
        self.residuals(x, None, |h| self.attn.forward_packed(h, lengths))
    }

    /// `x + ls1(attend(norm1 x))`, then `x + ls2(mlp(norm2 x))`, with the Convpass bypasses
    /// where the block has them (they need the token `layout`).
    fn residuals(&self, x: Tensor<3>, layout: Option<TokenLayout>, attend: impl FnOnce(Tensor<3>) -> Tensor<3>) -> Tensor<3> {
        let h = cpu::layer_norm(&self.norm1, x.clone(), self.norm_eps);
        let attn = attend(h.clone());
        let attn = match &self.ls1 {
            Some(ls) => ls.forward(attn),
            None => attn,
        };
        let mut x = x + attn;
        if let (Some(c), Some(layout)) = (&self.convpass_attn, layout) {
            x = x + c.forward(h, layout.prefix, layout.grid);
        }
        let h = cpu::layer_norm(&self.norm2, x.clone(), self.norm_eps);
        let mlp = self.mlp.forward(h.clone());
        let mlp = match &self.ls2 {
            Some(ls) => ls.forward(mlp),
            None => mlp,
        };
        let mut x = x + mlp;
        if let (Some(c), Some(layout)) = (&self.convpass_mlp, layout) {
            x = x + c.forward(h, layout.prefix, layout.grid);
        }
        x
    }
}

/// What a forward pass should produce besides the final tokens.
#[derive(Debug, Clone, Default)]
pub struct ForwardOptions {
    /// `[B, num_patches]`, true where a patch is replaced by the mask token (iBOT).
    pub mask: Option<Tensor<2, Bool>>,
    /// Blocks whose attention probabilities to return (0-based).
    pub attention_layers: Vec<usize>,
}

/// Outputs of [`Vit::forward`], all after the final LayerNorm.
#[derive(Debug, Clone)]
pub struct VitOutput {
    /// `[B, D]`
    pub cls: Tensor<2>,
    /// `[B, N, D]`, row-major over the `grid` of patches.
    pub patches: Tensor<3>,
    /// `[B, R, D]` when the model has register tokens.
    pub registers: Option<Tensor<3>>,
    /// `(layer, [B, heads, T, T])` for each requested layer, T = 1 + R + N tokens.
    pub attentions: Vec<(usize, Tensor<4>)>,
    /// Patch grid `(rows, cols)`.
    pub grid: (usize, usize),
    /// `[B, D]` class token of each learnable-memory task, in order.
    pub task_cls: Vec<Tensor<2>>,
}

/// A DINOv2 or MAE Vision Transformer backbone.
#[derive(Module, Debug)]
pub struct Vit {
    pub patch_embed: PatchEmbed,
    pub cls_token: Param<Tensor<3>>,
    pub pos_embed: Param<Tensor<3>>,
    pub register_tokens: Option<Param<Tensor<3>>>,
    pub mask_token: Option<Param<Tensor<2>>>,
    pub blocks: Vec<Block>,
    pub norm: LayerNorm,
    /// Learnable-memory tasks sharing this backbone's forward pass (none by default).
    pub tasks: Vec<MemoryTask>,
    #[module(skip)]
    config: VitConfig,
    #[module(skip)]
    pos_cache: PosCache,
}

/// Position embeddings resampled per patch grid (and autodiff or not), reused while
/// `pos_embed` is frozen so the bicubic resampling runs once per grid instead of every forward.
/// A clone starts empty, so a model whose weights are replaced (loaded, mapped) never sees
/// another model's entries.
#[derive(Debug, Default)]
struct PosCache(Mutex<HashMap<(usize, usize, bool), Tensor<3>>>);

impl Clone for PosCache {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl VitConfig {
    /// Builds the backbone with fresh weights (truncated-normal-like N(0, 0.02) for matrices and
    /// tokens, zero mask token, LayerScale at its init value). Call `validate` first.
    pub fn init(&self, device: &Device) -> Vit {
        let d = self.embed_dim;
        let normal = Initializer::Normal { mean: 0.0, std: INIT_STD };
        let norm = || LayerNormConfig::new(d).with_epsilon(self.norm_eps).init(device);
        let hidden = self.mlp_hidden();
        let blocks =
            (0..self.depth).map(|_| Block::new(d, self.num_heads, hidden, self.swiglu, self.layer_scale, self.norm_eps, device)).collect();
        Vit {
            patch_embed: PatchEmbed {
                proj: Conv2dConfig::new([3, d], [self.patch_size, self.patch_size])
                    .with_stride([self.patch_size, self.patch_size])
                    .with_initializer(normal.clone())
                    .init(device),
            },
            cls_token: normal.init([1, 1, d], device),
            pos_embed: normal.init([1, 1 + self.pos_grid * self.pos_grid, d], device),
            register_tokens: (self.num_registers > 0).then(|| normal.init([1, self.num_registers, d], device)),
            mask_token: self.mask_token.then(|| Initializer::Zeros.init([1, d], device)),
            blocks,
            norm: norm(),
            tasks: Vec::new(),
            config: self.clone(),
            pos_cache: PosCache::default(),
        }
    }
}

impl Vit {
    pub fn config(&self) -> &VitConfig {
        &self.config
    }

    pub fn device(&self) -> Device {
        self.cls_token.val().device()
    }

    /// Position embeddings for a `rows × cols` patch grid: `[1, 1 + rows·cols, D]` (CLS first).
    /// Resampled bicubically from the stored grid unless it already has that size, exactly as
    /// the reference implementations do (`interpolate_offset`/`interpolate_antialias`).
    pub fn position_embeddings(&self, rows: usize, cols: usize) -> Tensor<3> {
        let pos = self.pos_embed.val();
        let g = self.config.pos_grid;
        if rows == g && cols == g {
            return pos;
        }
        if pos.is_require_grad() {
            return self.resample_position_embeddings(pos, rows, cols);
        }
        let key = (rows, cols, pos.is_autodiff());
        let mut cache = self.pos_cache.0.lock().unwrap_or_else(|e| e.into_inner());
        cache.entry(key).or_insert_with(|| self.resample_position_embeddings(pos, rows, cols)).clone()
    }

    fn resample_position_embeddings(&self, pos: Tensor<3>, rows: usize, cols: usize) -> Tensor<3> {
        let g = self.config.pos_grid;
        let [_, _, d] = pos.dims();
        let device = pos.device();
        let (offset, aa) = (self.config.interpolate_offset, self.config.interpolate_antialias);
        let wy = Tensor::<2>::from_data(TensorData::new(bicubic_weights(g, rows, offset, aa), [rows, g]), &device);
        let wx = Tensor::<2>::from_data(TensorData::new(bicubic_weights(g, cols, offset, aa), [cols, g]), &device);
        let cls_pos = pos.clone().narrow(1, 0, 1);
        // [G·G, D] → rows: [rows, G·D] → [rows, G, D] → cols: [rows, cols, D]
        let grid = pos.narrow(1, 1, g * g).reshape([g, g * d]);
        let by_rows = wy.matmul(grid).reshape([rows, g, d]);
        let resampled = wx.unsqueeze::<3>().expand([rows, cols, g]).matmul(by_rows);
        Tensor::cat(vec![cls_pos, resampled.reshape([1, rows * cols, d])], 1)
    }

    /// Tokens before the first block: `[CLS, registers…, patches…]`, with position embeddings
    /// added to CLS and patches (registers carry none) and masked patches replaced by the
    /// mask token before the position embedding, as DINOv2 does.
    pub fn embed_tokens(&self, images: Tensor<4>, mask: Option<Tensor<2, Bool>>) -> (Tensor<3>, (usize, usize)) {
        let [b, c, height, width] = images.dims();
        let p = self.config.patch_size;
        assert_eq!(c, 3, "expected RGB input [B, 3, H, W], got {c} channels");
        assert!(
            height % p == 0 && width % p == 0 && height > 0 && width > 0,
            "input {height}×{width} is not a multiple of the patch size {p}"
        );
        let (rows, cols) = (height / p, width / p);
        let mut x = self.patch_embed.forward(images);
        let [_, n, d] = x.dims();
        if let Some(mask) = mask {
            let token = self.mask_token.as_ref().expect("a masked forward needs a model built with a mask token").val();
            assert_eq!(mask.dims(), [b, n], "mask must be [batch, num_patches]");
            x = x.mask_where(mask.unsqueeze_dim::<3>(2).expand([b, n, d]), token.reshape([1, 1, d]).expand([b, n, d]));
        }
        let cls = self.cls_token.val().expand([b, 1, d]);
        let x = Tensor::cat(vec![cls, x], 1) + self.position_embeddings(rows, cols);
        let x = match &self.register_tokens {
            Some(registers) => {
                let r = registers.dims()[1];
                Tensor::cat(vec![x.clone().narrow(1, 0, 1), registers.val().expand([b, r, d]), x.narrow(1, 1, n)], 1)
            }
            None => x,
        };
        (x, (rows, cols))
    }

    /// MAE's encoder pass: only the visible patches go through the blocks. `keep` `[B, K]`
    /// holds each image's visible patch indices (the same count K for every image). Returns
    /// `[B, 1 + R + K, D]` after the final norm: CLS, registers, then the visible patches in
    /// the order given.
    pub fn forward_visible(&self, images: Tensor<4>, keep: Tensor<2, Int>) -> Tensor<3> {
        let (x, grid) = self.embed_tokens(images, None);
        let [b, _, d] = x.dims();
        let [_, k] = keep.dims();
        let prefix = 1 + self.config.num_registers;
        let index = keep.add_scalar(prefix as i64).unsqueeze_dim::<3>(2).expand([b, k, d]);
        let visible = x.clone().gather(1, index);
        let mut x = Tensor::cat(vec![x.narrow(1, 0, prefix), visible], 1);
        let layout = TokenLayout { prefix, grid };
        for block in &self.blocks {
            x = block.forward(x, false, layout, None).0;
        }
        cpu::layer_norm(&self.norm, x, self.config.norm_eps)
    }

    /// `[B, 3, H, W]` (ImageNet-normalised, H and W multiples of the patch size) → CLS, patch
    /// and register tokens after the final norm, plus the requested attention maps.
    pub fn forward(&self, images: Tensor<4>, options: ForwardOptions) -> VitOutput {
        let (mut x, grid) = self.embed_tokens(images, options.mask);
        let [b, original, d] = x.dims();
        let layout = TokenLayout { prefix: 1 + self.config.num_registers, grid };
        let k = self.tasks.len();
        let (per_task, bias) = match self.tasks.first() {
            Some(first) => {
                // Task class tokens (with the CLS position embedding) after the original tokens.
                let cls_pos = self.pos_embed.val().narrow(1, 0, 1);
                let mut tokens = vec![x];
                tokens.extend(self.tasks.iter().map(|t| (t.cls.val() + cls_pos.clone()).expand([b, 1, d])));
                x = Tensor::cat(tokens, 1);
                let m = first.tokens_per_layer();
                (m, Some(memory_mask(original, k, m, &x.device())))
            }
            None => (0, None),
        };
        let mut attentions = Vec::new();
        for (index, block) in self.blocks.iter().enumerate() {
            let want = options.attention_layers.contains(&index);
            let memory = bias.as_ref().map(|bias| LayerMemory {
                tokens: Tensor::cat(self.tasks.iter().map(|t| t.memory.val().narrow(0, index, 1).reshape([1, per_task, d])).collect(), 1)
                    .expand([b, k * per_task, d]),
                bias: bias.clone(),
            });
            let (next, probs) = block.forward(x, want, layout, memory);
            x = next;
            if let Some(probs) = probs {
                attentions.push((index, probs));
            }
        }
        self.output(cpu::layer_norm(&self.norm, x, self.config.norm_eps), grid, original, attentions)
    }

    /// Several crop sizes in one pass (a DINOv2 student's global and local crops): one output
    /// per `(images, options)`, as [`Vit::forward`] gives them.
    ///
    /// On the CPU backend (with gradients, no memory tasks, no Convpass, no attention maps
    /// asked for) the tokens of all crops go through the blocks packed as one `[1, T, D]`
    /// tensor: the linear layers, norms and MLPs run once over the rows of every crop (one
    /// product per weight instead of one per crop size) and the attention per image.
    /// Elsewhere each crop size runs its own forward.
    pub fn forward_crops(&self, crops: Vec<(Tensor<4>, ForwardOptions)>) -> Vec<VitOutput> {
        if !self.packs(&crops) {
            return crops.into_iter().map(|(images, options)| self.forward(images, options)).collect();
        }
        let embedded: Vec<_> = crops.into_iter().map(|(images, options)| self.embed_tokens(images, options.mask)).collect();
        let mut lengths = Vec::new();
        let mut rows = Vec::new();
        for (x, _) in &embedded {
            let [b, n, d] = x.dims();
            lengths.extend(std::iter::repeat_n(n, b));
            rows.push(x.clone().reshape([1, b * n, d]));
        }
        let lengths: Arc<[usize]> = lengths.into();
        let mut x = Tensor::cat(rows, 1);
        for block in &self.blocks {
            x = block.forward_packed(x, &lengths);
        }
        let x = cpu::layer_norm(&self.norm, x, self.config.norm_eps);
        let mut start = 0;
        embedded
            .into_iter()
            .map(|(tokens, grid)| {
                let [b, n, d] = tokens.dims();
                let part = x.clone().narrow(1, start, b * n).reshape([b, n, d]);
                start += b * n;
                self.output(part, grid, n, Vec::new())
            })
            .collect()
    }

    /// Whether [`Vit::forward_crops`] packs these crops into one pass.
    fn packs(&self, crops: &[(Tensor<4>, ForwardOptions)]) -> bool {
        crops.len() > 1
            && self.tasks.is_empty()
            && self.blocks.iter().all(Block::packs)
            && crops.iter().all(|(images, options)| options.attention_layers.is_empty() && cpu::attention_with_grad_applies(images))
    }

    /// The outputs of the final tokens `x` `[B, T, D]` (after the final norm): the first
    /// `original` are CLS, registers and the `grid`'s patches, then the memory tasks' classes.
    fn output(&self, x: Tensor<3>, grid: (usize, usize), original: usize, attentions: Vec<(usize, Tensor<4>)>) -> VitOutput {
        let [b, _, d] = x.dims();
        let r = self.config.num_registers;
        let n = grid.0 * grid.1;
        VitOutput {
            cls: x.clone().narrow(1, 0, 1).reshape([b, d]),
            registers: (r > 0).then(|| x.clone().narrow(1, 1, r)),
            task_cls: (0..self.tasks.len()).map(|i| x.clone().narrow(1, original + i, 1).reshape([b, d])).collect(),
            patches: x.narrow(1, 1 + r, n),
            attentions,
            grid,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use burn::tensor::Distribution;

    use super::*;
    use crate::model::params::{accumulate_grads, map_params};
    use crate::peft::{AdaptationPlan, Preset, apply_plan};

    #[test]
    fn crops_of_two_sizes_packed_in_one_pass_match_a_forward_per_size() {
        // A DINOv2 student's pass: masked global crops and unmasked local crops through an
        // ExPLoRA backbone (LoRA with a visible update, one unfrozen block). On the CPU backend
        // the crops go through the blocks packed together; values and every trainable
        // parameter's gradient must equal those of one forward per crop size.
        let device = Device::flex().autodiff();
        device.seed(3);
        let config = VitConfig::tiny();
        let plan = AdaptationPlan::preset(Preset::Explora, &config);
        let model = apply_plan(config.init(&device), &plan).expect("the plan fits");
        let model = map_params(model, |name, t| {
            name.contains("lora").then(|| Tensor::random([t.dims()[0]], Distribution::Normal(0.0, 0.1), &t.device()))
        });
        let p = config.patch_size;
        let globals = Tensor::<4>::random([4, 3, 4 * p, 4 * p], Distribution::Normal(0.0, 1.0), &device);
        let locals = Tensor::<4>::random([6, 3, 2 * p, 2 * p], Distribution::Normal(0.0, 1.0), &device);
        let mask = Tensor::<2>::random([4, 16], Distribution::Uniform(0.0, 1.0), &device).lower_elem(0.3);
        let masked = || ForwardOptions { mask: Some(mask.clone()), ..Default::default() };
        let crops = vec![(globals.clone(), masked()), (locals.clone(), ForwardOptions::default())];
        assert!(model.packs(&crops), "the CPU backend packs the crops");
        assert!(!model.valid().packs(&[(globals.clone().inner(), masked()), (locals.clone().inner(), ForwardOptions::default())]));
        let packed = model.forward_crops(crops);
        let separate = [model.forward(globals, masked()), model.forward(locals, ForwardOptions::default())];
        // A loss that reads every output: CLS and patch tokens of both crop sizes.
        let loss = |outputs: &[VitOutput]| {
            outputs.iter().map(|o| o.cls.clone().powf_scalar(2.0).sum() + o.patches.clone().sin().sum()).reduce(|a, b| a + b).expect("two")
        };
        let gap = |a: Tensor<3>, b: Tensor<3>| (a.inner() - b.inner()).abs().max().into_scalar::<f32>();
        for (ours, reference) in packed.iter().zip(&separate) {
            assert_eq!(ours.patches.dims(), reference.patches.dims());
            let cls = gap(ours.cls.clone().unsqueeze(), reference.cls.clone().unsqueeze());
            let patches = gap(ours.patches.clone(), reference.patches.clone());
            assert!(cls < 1e-4 && patches < 1e-4, "cls {cls}, patches {patches}");
        }
        let grads = |outputs: &[VitOutput]| {
            let mut into = HashMap::new();
            accumulate_grads(&model, &loss(outputs).backward(), &mut into);
            into
        };
        let (ours, reference) = (grads(&packed), grads(&separate));
        assert!(ours.keys().any(|name| name.contains("lora")) && ours.keys().any(|name| name.contains("mask_token")));
        assert_eq!(ours.len(), reference.len());
        for (name, grad) in &ours {
            let other = &reference[name];
            let worst = (grad.clone() - other.clone()).abs().max().into_scalar::<f32>();
            let scale = other.clone().abs().max().into_scalar::<f32>().max(1.0);
            assert!(worst < 1e-4 * scale, "{name}: gradients differ by {worst} (largest {scale})");
        }
    }
}
