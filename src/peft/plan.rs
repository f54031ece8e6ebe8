//! The adaptation plan: per block frozen / unfrozen / LoRA, which embeddings and norms train,
//! LoRA rank, alpha and targets; presets from the ExPLoRA paper and its baselines.

use serde::{Deserialize, Serialize};

use crate::model::{Family, VitConfig};

/// What happens to one transformer block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockMode {
    Frozen,
    /// Every weight of the block trains.
    Unfrozen,
    /// Frozen weights plus LoRA factors on the plan's targets.
    Lora,
}

/// Which projections of a LoRA block get low-rank factors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LoraTargets {
    #[serde(default)]
    pub q: bool,
    #[serde(default)]
    pub k: bool,
    #[serde(default)]
    pub v: bool,
    /// The attention output projection.
    #[serde(default)]
    pub proj: bool,
    #[serde(default)]
    pub fc1: bool,
    #[serde(default)]
    pub fc2: bool,
}

impl LoraTargets {
    /// Q and V, the ExPLoRA (and original LoRA) choice.
    pub const QV: LoraTargets = LoraTargets { q: true, k: false, v: true, proj: false, fc1: false, fc2: false };

    pub fn any(&self) -> bool {
        self.q || self.k || self.v || self.proj || self.fc1 || self.fc2
    }

    /// `(name, d_in, d_out)` of each targeted projection for a config.
    pub fn shapes(&self, config: &VitConfig) -> Vec<(&'static str, usize, usize)> {
        let d = config.embed_dim;
        let hidden = config.mlp_hidden();
        let fc1_out = if config.swiglu { 2 * hidden } else { hidden };
        [
            (self.q, "q", d, d),
            (self.k, "k", d, d),
            (self.v, "v", d, d),
            (self.proj, "proj", d, d),
            (self.fc1, "fc1", d, fc1_out),
            (self.fc2, "fc2", hidden, d),
        ]
        .into_iter()
        .filter(|(on, ..)| *on)
        .map(|(_, name, i, o)| (name, i, o))
        .collect()
    }
}

impl std::fmt::Display for LoraTargets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = [(self.q, "q"), (self.k, "k"), (self.v, "v"), (self.proj, "proj"), (self.fc1, "fc1"), (self.fc2, "fc2")]
            .into_iter()
            .filter(|(on, _)| *on)
            .map(|(_, n)| n)
            .collect();
        f.write_str(&names.join(","))
    }
}

impl std::str::FromStr for LoraTargets {
    type Err = String;

    /// A comma-separated list of q, k, v, proj (or o/out), fc1, fc2, or `attn` (q,k,v,proj),
    /// `mlp` (fc1,fc2), `all`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut t = LoraTargets::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.to_ascii_lowercase().as_str() {
                "q" => t.q = true,
                "k" => t.k = true,
                "v" => t.v = true,
                "proj" | "o" | "out" => t.proj = true,
                "fc1" => t.fc1 = true,
                "fc2" => t.fc2 = true,
                "attn" => (t.q, t.k, t.v, t.proj) = (true, true, true, true),
                "mlp" => (t.fc1, t.fc2) = (true, true),
                "all" => t = LoraTargets { q: true, k: true, v: true, proj: true, fc1: true, fc2: true },
                other => return Err(format!("unknown LoRA target `{other}` (use q, k, v, proj, fc1, fc2, attn, mlp, all)")),
            }
        }
        Ok(t)
    }
}

/// LoRA hyper-parameters. The update is `(alpha / rank) · B·A`; ExPLoRA uses alpha = 1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: LoraTargets,
}

impl Default for LoraSpec {
    fn default() -> Self {
        Self { rank: 64, alpha: 1.0, dropout: 0.0, targets: LoraTargets::QV }
    }
}

/// Convpass adapters (Jie & Deng 2022) in chosen blocks (all by default, as in the paper).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConvpassSpec {
    /// Bottleneck width (8 in the paper).
    pub dim: usize,
    /// The paper's `s`, chosen per dataset from {0.01, 0.1, 1, 10, 100} (10 for EuroSAT).
    pub scale: f64,
    /// Beside the attention.
    pub attn: bool,
    /// Beside the MLP.
    pub mlp: bool,
    /// Blocks that get adapters (0-based); `None` = every block.
    #[serde(default)]
    pub blocks: Option<Vec<usize>>,
}

impl ConvpassSpec {
    /// Whether block `index` gets adapters.
    pub fn covers(&self, index: usize) -> bool {
        self.blocks.as_ref().is_none_or(|b| b.contains(&index))
    }
}

impl Default for ConvpassSpec {
    fn default() -> Self {
        Self { dim: 8, scale: 10.0, attn: true, mlp: true, blocks: None }
    }
}

/// What trains. Serialised in the run config (`[plan]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaptationPlan {
    /// One entry per transformer block.
    pub blocks: Vec<BlockMode>,
    pub lora: LoraSpec,
    /// Every LayerNorm (in all blocks and the final one).
    pub norms: bool,
    pub cls_token: bool,
    pub register_tokens: bool,
    pub patch_embed: bool,
    pub pos_embed: bool,
    pub mask_token: bool,
    /// Convpass adapters in every block (trainable; they cannot be merged into the weights).
    #[serde(default)]
    pub convpass: Option<ConvpassSpec>,
    /// A learnable-memory task: its class token plus this many memory tokens per layer
    /// (trainable; the original outputs stay exactly unchanged).
    #[serde(default)]
    pub memory_tokens: Option<usize>,
}

/// What the user asks for, before it meets a model: a preset plus overrides. The run config's
/// `[plan]` section and the `explora plan` flags both resolve through [`PlanSpec::resolve`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlanSpec {
    /// explora, lora, linear, full or blocks:K.
    pub preset: String,
    /// Blocks to unfreeze instead of the preset's (0-based).
    pub unfreeze: Option<Vec<usize>>,
    pub lora_rank: Option<usize>,
    pub lora_alpha: Option<f64>,
    /// Comma-separated q, k, v, proj, fc1, fc2 (or attn, mlp, all).
    pub lora_targets: Option<String>,
    /// Convpass bottleneck width (adapters on every block unless `convpass_blocks`).
    pub convpass: Option<usize>,
    pub convpass_scale: f64,
    pub convpass_blocks: Option<Vec<usize>>,
    pub memory_tokens: Option<usize>,
    /// Every block's mode (frozen, unfrozen or lora) instead of the preset's and `unfreeze`
    /// (what the app writes after per-block edits).
    pub blocks: Option<Vec<BlockMode>>,
    /// Overrides of the preset's switches for norms, tokens and embeddings.
    pub norms: Option<bool>,
    pub cls_token: Option<bool>,
    pub register_tokens: Option<bool>,
    pub patch_embed: Option<bool>,
    pub pos_embed: Option<bool>,
    pub mask_token: Option<bool>,
}

impl Default for PlanSpec {
    fn default() -> Self {
        Self {
            preset: "explora".into(),
            unfreeze: None,
            lora_rank: None,
            lora_alpha: None,
            lora_targets: None,
            convpass: None,
            convpass_scale: 10.0,
            convpass_blocks: None,
            memory_tokens: None,
            blocks: None,
            norms: None,
            cls_token: None,
            register_tokens: None,
            patch_embed: None,
            pos_embed: None,
            mask_token: None,
        }
    }
}

impl PlanSpec {
    /// The concrete, validated plan for a model with `config`.
    pub fn resolve(&self, config: &VitConfig) -> Result<AdaptationPlan, PlanError> {
        let preset: Preset = self.preset.parse().map_err(|e: String| plan_error("preset", e))?;
        let mut plan = AdaptationPlan::preset(preset, config);
        if let Some(rank) = self.lora_rank {
            plan.lora.rank = rank;
        }
        if let Some(alpha) = self.lora_alpha {
            plan.lora.alpha = alpha;
        }
        if let Some(targets) = &self.lora_targets {
            plan.lora.targets = targets.parse().map_err(|e: String| plan_error("lora_targets", e))?;
        }
        if let Some(blocks) = &self.unfreeze {
            plan = plan.with_unfrozen(blocks)?;
        }
        if let Some(dim) = self.convpass {
            plan.convpass =
                Some(ConvpassSpec { dim, scale: self.convpass_scale, blocks: self.convpass_blocks.clone(), ..Default::default() });
        }
        if self.memory_tokens.is_some() {
            plan.memory_tokens = self.memory_tokens;
        }
        if let Some(blocks) = &self.blocks {
            if blocks.len() != config.depth {
                return Err(plan_error("blocks", format!("lists {} blocks but the model has {}", blocks.len(), config.depth)));
            }
            plan.blocks = blocks.clone();
        }
        let switches = [
            (self.norms, &mut plan.norms),
            (self.cls_token, &mut plan.cls_token),
            (self.register_tokens, &mut plan.register_tokens),
            (self.patch_embed, &mut plan.patch_embed),
            (self.pos_embed, &mut plan.pos_embed),
            (self.mask_token, &mut plan.mask_token),
        ];
        for (value, field) in switches {
            if let Some(on) = value {
                *field = on;
            }
        }
        plan.validate(config)?;
        Ok(plan)
    }

    /// The spec that resolves to exactly `plan` (every block and switch written out), under
    /// the preset name `preset` it was edited from.
    pub fn exact(preset: &str, plan: &AdaptationPlan) -> Self {
        let convpass = plan.convpass.as_ref();
        Self {
            preset: preset.to_string(),
            unfreeze: None,
            lora_rank: Some(plan.lora.rank),
            lora_alpha: Some(plan.lora.alpha),
            lora_targets: Some(plan.lora.targets.to_string()).filter(|t| !t.is_empty()),
            convpass: convpass.map(|c| c.dim),
            convpass_scale: convpass.map_or(10.0, |c| c.scale),
            convpass_blocks: convpass.and_then(|c| c.blocks.clone()),
            memory_tokens: plan.memory_tokens,
            blocks: Some(plan.blocks.clone()),
            norms: Some(plan.norms),
            cls_token: Some(plan.cls_token),
            register_tokens: Some(plan.register_tokens),
            patch_embed: Some(plan.patch_embed),
            pos_embed: Some(plan.pos_embed),
            mask_token: Some(plan.mask_token),
        }
    }
}

/// Named starting points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// The paper's default: one unfrozen block (the last for RGB DINOv2/MAE), all norms and
    /// the CLS token trainable, LoRA (rank 64, alpha 1) on Q and V of every other block.
    Explora,
    /// Plain LoRA on Q and V of every block; nothing else trains.
    Lora,
    /// Everything frozen (linear probing).
    Linear,
    /// Everything trains.
    Full,
    /// The last K blocks unfrozen, no LoRA.
    Blocks(usize),
}

impl std::str::FromStr for Preset {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "explora" => Ok(Preset::Explora),
            "lora" => Ok(Preset::Lora),
            "linear" => Ok(Preset::Linear),
            "full" => Ok(Preset::Full),
            other => match other.strip_prefix("blocks:").map(str::parse::<usize>) {
                Some(Ok(k)) => Ok(Preset::Blocks(k)),
                _ => Err(format!("unknown preset `{s}` (use explora, lora, linear, full or blocks:K)")),
            },
        }
    }
}

/// A plan that cannot be applied to a model, with the field at fault.
pub type PlanError = crate::fields::FieldError;

fn plan_error(field: impl Into<String>, reason: impl Into<String>) -> PlanError {
    PlanError::plan(field, reason)
}

impl AdaptationPlan {
    /// Everything frozen.
    pub fn frozen(depth: usize) -> Self {
        Self {
            blocks: vec![BlockMode::Frozen; depth],
            lora: LoraSpec::default(),
            norms: false,
            cls_token: false,
            register_tokens: false,
            patch_embed: false,
            pos_embed: false,
            mask_token: false,
            convpass: None,
            memory_tokens: None,
        }
    }

    /// The block the ExPLoRA paper unfreezes for RGB inputs: the last one (11 for ViT-S/B,
    /// 23 for ViT-L), for both DINOv2 and MAE backbones.
    pub fn default_unfrozen_block(config: &VitConfig) -> usize {
        match config.family {
            Family::Dinov2 | Family::Mae => config.depth - 1,
        }
    }

    pub fn preset(preset: Preset, config: &VitConfig) -> Self {
        let depth = config.depth;
        let mut plan = Self::frozen(depth);
        match preset {
            Preset::Linear => {}
            Preset::Full => {
                plan.blocks = vec![BlockMode::Unfrozen; depth];
                plan.norms = true;
                plan.cls_token = true;
                plan.register_tokens = config.num_registers > 0;
                plan.patch_embed = true;
                plan.pos_embed = true;
                plan.mask_token = config.mask_token;
            }
            Preset::Lora => plan.blocks = vec![BlockMode::Lora; depth],
            Preset::Explora => {
                plan.blocks = vec![BlockMode::Lora; depth];
                plan.blocks[Self::default_unfrozen_block(config)] = BlockMode::Unfrozen;
                plan.norms = true;
                plan.cls_token = true;
                // iBOT needs a trainable mask token (DINOv2 checkpoints ship none).
                plan.mask_token = config.mask_token;
            }
            Preset::Blocks(k) => {
                for mode in plan.blocks.iter_mut().rev().take(k) {
                    *mode = BlockMode::Unfrozen;
                }
                plan.norms = true;
            }
        }
        plan
    }

    /// Sets the unfrozen blocks explicitly; the others keep LoRA if the plan uses it anywhere,
    /// else stay frozen.
    pub fn with_unfrozen(mut self, unfrozen: &[usize]) -> Result<Self, PlanError> {
        let depth = self.blocks.len();
        if let Some(&bad) = unfrozen.iter().find(|&&b| b >= depth) {
            return Err(plan_error("unfreeze", format!("block {bad} is out of range: the model has blocks 0..={}", depth - 1)));
        }
        let rest = if self.blocks.contains(&BlockMode::Lora) { BlockMode::Lora } else { BlockMode::Frozen };
        for (i, mode) in self.blocks.iter_mut().enumerate() {
            *mode = if unfrozen.contains(&i) { BlockMode::Unfrozen } else { rest };
        }
        Ok(self)
    }

    pub fn unfrozen_blocks(&self) -> Vec<usize> {
        self.blocks.iter().enumerate().filter(|(_, m)| **m == BlockMode::Unfrozen).map(|(i, _)| i).collect()
    }

    /// Checks the plan against a model; names the field at fault.
    pub fn validate(&self, config: &VitConfig) -> Result<(), PlanError> {
        if self.blocks.len() != config.depth {
            return Err(plan_error("blocks", format!("lists {} blocks but the model has {}", self.blocks.len(), config.depth)));
        }
        let uses_lora = self.blocks.contains(&BlockMode::Lora);
        if uses_lora {
            let l = &self.lora;
            if l.rank == 0 {
                return Err(plan_error("lora.rank", "must be at least 1"));
            }
            if let Some((name, d_in, d_out)) = l.targets.shapes(config).into_iter().find(|(_, i, o)| l.rank > (*i).min(*o)) {
                return Err(plan_error("lora.rank", format!("{} is larger than the {name} projection ({d_in}→{d_out}) it adapts", l.rank)));
            }
            if !l.targets.any() {
                return Err(plan_error("lora.targets", "blocks use LoRA but no target projection is chosen"));
            }
            if !(l.alpha > 0.0 && l.alpha.is_finite()) {
                return Err(plan_error("lora.alpha", "must be positive"));
            }
            if !(0.0..1.0).contains(&l.dropout) {
                return Err(plan_error("lora.dropout", "must be in [0, 1)"));
            }
        }
        if let Some(c) = &self.convpass {
            if c.dim == 0 || c.dim > config.embed_dim {
                return Err(plan_error("convpass.dim", format!("{} must be in 1..={}", c.dim, config.embed_dim)));
            }
            if !c.attn && !c.mlp {
                return Err(plan_error("convpass", "is on but neither attn nor mlp is chosen"));
            }
            if !c.scale.is_finite() {
                return Err(plan_error("convpass.scale", "must be a finite number"));
            }
            if let Some(&bad) = c.blocks.iter().flatten().find(|&&b| b >= config.depth) {
                return Err(plan_error(
                    "convpass.blocks",
                    format!("block {bad} is out of range: the model has blocks 0..={}", config.depth - 1),
                ));
            }
        }
        if self.memory_tokens == Some(0) {
            return Err(plan_error("memory_tokens", "must be at least 1 (5-10 is where the paper's gains saturate)"));
        }
        if self.register_tokens && config.num_registers == 0 {
            return Err(plan_error("register_tokens", "the model has no register tokens to train"));
        }
        if self.mask_token && !config.mask_token {
            return Err(plan_error("mask_token", "the model has no mask token to train"));
        }
        Ok(())
    }

    /// The exact trainable-parameter budget of this plan on `config`.
    pub fn budget(&self, config: &VitConfig) -> Budget {
        let d = config.embed_dim;
        let p = config.patch_size;
        let block_norms = 2 * 2 * d;
        let block_total = full_block_params(config);
        let mut rows = Vec::new();
        let unfrozen = self.unfrozen_blocks();
        if !unfrozen.is_empty() {
            // Norms of unfrozen blocks are counted here, not again under "norms".
            rows.push(BudgetRow::new(format!("unfrozen blocks {unfrozen:?}"), unfrozen.len() * block_total));
        }
        let lora_blocks = self.blocks.iter().filter(|m| **m == BlockMode::Lora).count();
        if lora_blocks > 0 {
            let per_block: usize = self.lora.targets.shapes(config).iter().map(|(_, i, o)| self.lora.rank * (i + o)).sum();
            rows.push(BudgetRow::new(
                format!("LoRA r={} on {} of {lora_blocks} blocks", self.lora.rank, self.lora.targets),
                lora_blocks * per_block,
            ));
        }
        if let Some(c) = &self.convpass {
            let sites = usize::from(c.attn) + usize::from(c.mlp);
            let blocks = (0..config.depth).filter(|&i| c.covers(i)).count();
            rows.push(BudgetRow::new(
                format!(
                    "Convpass k={} ({} per block) in {blocks} blocks",
                    c.dim,
                    if sites == 2 {
                        "attn+mlp"
                    } else if c.attn {
                        "attn"
                    } else {
                        "mlp"
                    }
                ),
                blocks * sites * crate::model::Convpass::num_params(config.embed_dim, c.dim),
            ));
        }
        if let Some(m) = self.memory_tokens {
            rows.push(BudgetRow::new(
                format!("memory: {m} tokens × {} layers + task class token", config.depth),
                (config.depth * m + 1) * d,
            ));
        }
        if self.norms {
            let others = config.depth - unfrozen.len();
            rows.push(BudgetRow::new("LayerNorms (other blocks + final)", others * block_norms + 2 * d));
        }
        if self.cls_token {
            rows.push(BudgetRow::new("CLS token", d));
        }
        if self.register_tokens {
            rows.push(BudgetRow::new("register tokens", config.num_registers * d));
        }
        if self.mask_token {
            rows.push(BudgetRow::new("mask token", d));
        }
        if self.patch_embed {
            rows.push(BudgetRow::new("patch embedding", 3 * p * p * d + d));
        }
        if self.pos_embed {
            rows.push(BudgetRow::new("position embeddings", (1 + config.pos_grid * config.pos_grid) * d));
        }
        let trainable = rows.iter().map(|r| r.params).sum();
        Budget { rows, trainable, backbone: config.num_params(), extra: Vec::new() }
    }
}

/// An estimate of the activation memory autograd keeps for one training micro-batch of the
/// student: `batch` images, each seen as the crops in `crops` (`(side in pixels, count)`, e.g.
/// 2 global and 8 local crops). See [`activation_bytes_for_tokens`] for what is counted.
pub fn activation_bytes(config: &VitConfig, plan: &AdaptationPlan, batch: usize, crops: &[(u32, usize)]) -> u64 {
    let views: Vec<(usize, usize)> = crops
        .iter()
        .map(|&(side, count)| {
            let grid = side as usize / config.patch_size.max(1);
            (grid * grid, count)
        })
        .collect();
    activation_bytes_for_tokens(config, plan, batch, &views)
}

/// The activation estimate for views given as `(patch tokens, count)` per image (MAE's encoder
/// sees only the visible patches). Per block and token it counts what a pre-norm ViT block
/// saves for its backward (norm inputs/outputs, q/k/v, context, projections and residuals:
/// ~11·d values, the MLP's hidden twice: 2·hidden), plus the attention scores and
/// probabilities (2·heads·tokens² per image), in f32; only blocks from the first one with
/// something trainable upwards keep activations. Framework overhead and gradient-free passes
/// (the teacher, the base model) are not counted, so treat it as the order of magnitude, not a
/// bound.
pub fn activation_bytes_for_tokens(config: &VitConfig, plan: &AdaptationPlan, batch: usize, views: &[(usize, usize)]) -> u64 {
    let depth = config.depth;
    let input_side = plan.cls_token
        || plan.register_tokens
        || plan.patch_embed
        || plan.pos_embed
        || plan.mask_token
        || plan.memory_tokens.is_some()
        || plan.norms;
    let first_trainable = if input_side {
        Some(0)
    } else {
        (0..depth)
            .find(|&i| plan.blocks.get(i).is_some_and(|m| *m != BlockMode::Frozen) || plan.convpass.as_ref().is_some_and(|c| c.covers(i)))
    };
    let Some(first) = first_trainable else { return 0 };
    let extra_tokens = 1 + config.num_registers + plan.memory_tokens.unwrap_or(0);
    let per_image: u64 = views
        .iter()
        .map(|&(patches, count)| {
            count as u64 * block_activation_values(config.embed_dim, config.mlp_hidden(), config.num_heads, patches + extra_tokens)
        })
        .sum();
    4 * batch as u64 * (depth - first) as u64 * per_image
}

/// f32 values one pre-norm transformer block of width `d` (MLP `hidden`, `heads` heads) keeps
/// for its backward over a sequence of `tokens`: ~11·d + 2·hidden per token, plus the
/// attention scores and probabilities.
pub fn block_activation_values(d: usize, hidden: usize, heads: usize, tokens: usize) -> u64 {
    let (d, hidden, heads, t) = (d as u64, hidden as u64, heads as u64, tokens as u64);
    t * (11 * d + 2 * hidden) + 2 * heads * t * t
}

/// Parameters of one transformer block.
fn full_block_params(config: &VitConfig) -> usize {
    let d = config.embed_dim;
    let hidden = config.mlp_hidden();
    let fc1_out = if config.swiglu { 2 * hidden } else { hidden };
    4 * d
        + (3 * d * d + 3 * d)
        + (d * d + d)
        + (d * fc1_out + fc1_out)
        + (hidden * d + d)
        + if config.layer_scale.is_some() { 2 * d } else { 0 }
}

/// One line of the budget table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BudgetRow {
    pub component: String,
    pub params: usize,
}

impl BudgetRow {
    fn new(component: impl Into<String>, params: usize) -> Self {
        Self { component: component.into(), params }
    }
}

/// Trainable parameters per component and in total, against the backbone's size.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Budget {
    pub rows: Vec<BudgetRow>,
    pub trainable: usize,
    /// Parameters of the frozen backbone (LoRA factors excluded).
    pub backbone: usize,
    /// Modules that train beside the backbone (the DINO/iBOT head, MAE's decoder), with their
    /// trainable parameters; not counted in `trainable`.
    pub extra: Vec<BudgetRow>,
}

impl Budget {
    /// The budget with one more module training beside the backbone.
    pub fn with_module(mut self, component: impl Into<String>, params: usize) -> Self {
        self.extra.push(BudgetRow::new(component, params));
        self
    }

    pub fn percent(&self) -> f64 {
        100.0 * self.trainable as f64 / self.backbone.max(1) as f64
    }

    /// AdamW keeps two f32 moments per trainable parameter (the backbone's and the modules'
    /// beside it).
    pub fn optimizer_state_bytes(&self) -> usize {
        (self.trainable + self.extra.iter().map(|r| r.params).sum::<usize>()) * 2 * 4
    }
}

/// Parameter counts for people: `18725888` → `18,725,888`. → `18,725,888`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explora_vitl14_matches_the_papers_18_7m() {
        // ExPLoRA paper: ViT-L/14, block 23 unfrozen + LoRA r=64 on Q,V = 18.7M trainable
        // (12.6M block + 6.0M LoRA); norms and CLS token make up the rest.
        let config = VitConfig::dinov2_vitl14();
        let plan = AdaptationPlan::preset(Preset::Explora, &config);
        assert_eq!(plan.unfrozen_blocks(), vec![23]);
        plan.validate(&config).unwrap();
        let budget = plan.budget(&config);
        assert_eq!(budget.rows[0].params, 12_598_272);
        assert_eq!(budget.rows[1].params, 6_029_312);
        assert_eq!((budget.trainable as f64 / 1e5).round() / 10.0, 18.7, "{budget:?}");
    }

    #[test]
    fn explora_vitb14_is_about_9_3m_and_lora_r8_vitl_is_0_8m() {
        let b = VitConfig::dinov2_vitb14();
        let budget = AdaptationPlan::preset(Preset::Explora, &b).budget(&b);
        assert!((9.0e6..9.6e6).contains(&(budget.trainable as f64)), "{}", budget.trainable);
        let l = VitConfig::dinov2_vitl14();
        let mut plan = AdaptationPlan::preset(Preset::Lora, &l);
        plan.lora.rank = 8;
        let budget = plan.budget(&l);
        assert_eq!(budget.trainable, 24 * 2 * 8 * (1024 + 1024));
        assert_eq!((budget.trainable as f64 / 1e5).round() / 10.0, 0.8);
    }

    #[test]
    fn full_and_linear_presets_bound_the_budget() {
        let c = VitConfig { mask_token: true, ..VitConfig::dinov2_vits14() };
        let full = AdaptationPlan::preset(Preset::Full, &c).budget(&c);
        assert_eq!(full.trainable, c.num_params());
        assert!((full.percent() - 100.0).abs() < 1e-9);
        let linear = AdaptationPlan::preset(Preset::Linear, &c).budget(&c);
        assert_eq!(linear.trainable, 0);
        let two = AdaptationPlan::preset(Preset::Blocks(2), &c);
        assert_eq!(two.unfrozen_blocks(), vec![10, 11]);
    }

    #[test]
    fn validation_names_the_field() {
        let c = VitConfig::tiny();
        let err = AdaptationPlan::preset(Preset::Explora, &c).with_unfrozen(&[9]).unwrap_err();
        assert_eq!(err.field, "unfreeze");
        assert!(err.reason.contains("0..=3"));
        let mut plan = AdaptationPlan::preset(Preset::Lora, &c);
        plan.lora.rank = 0;
        assert_eq!(plan.validate(&c).unwrap_err().field, "lora.rank");
        plan.lora.rank = 65;
        let err = plan.validate(&c).unwrap_err();
        assert!(err.reason.contains("larger than the q projection (64→64)"), "{err}");
        plan.lora.rank = 4;
        plan.lora.targets = LoraTargets::default();
        assert_eq!(plan.validate(&c).unwrap_err().field, "lora.targets");
        let mut plan = AdaptationPlan::preset(Preset::Linear, &c);
        plan.register_tokens = true;
        assert_eq!(plan.validate(&c).unwrap_err().field, "register_tokens");
    }

    #[test]
    fn activation_estimate_grows_with_batch_and_vanishes_when_nothing_trains() {
        let c = VitConfig::dinov2_vitl14();
        let crops = [(224, 2), (98, 8)];
        let explora = AdaptationPlan::preset(Preset::Explora, &c);
        let one = activation_bytes(&c, &explora, 1, &crops);
        assert_eq!(activation_bytes(&c, &explora, 32, &crops), 32 * one);
        // ViT-L, 2×224 + 8×98 crops, f32, no memory-efficient attention: about 2 GiB per image.
        assert!((1 << 30..4 << 30).contains(&one), "{one}");
        assert_eq!(activation_bytes(&c, &AdaptationPlan::preset(Preset::Linear, &c), 32, &crops), 0);
        let last_two = AdaptationPlan::preset(Preset::Blocks(2), &c);
        let mut last_two = last_two;
        last_two.norms = false;
        assert_eq!(activation_bytes(&c, &last_two, 1, &crops) * 12, one);
    }

    #[test]
    fn an_exact_spec_resolves_to_the_edited_plan_and_survives_toml() {
        let c = VitConfig::tiny();
        let mut plan = AdaptationPlan::preset(Preset::Explora, &c);
        plan.blocks[0] = BlockMode::Frozen;
        plan.lora.rank = 8;
        plan.lora.targets.fc1 = true;
        plan.pos_embed = true;
        plan.convpass = Some(ConvpassSpec { dim: 4, ..Default::default() });
        let spec = PlanSpec::exact("explora", &plan);
        assert_eq!(spec.resolve(&c).unwrap(), plan);
        #[derive(Serialize, Deserialize)]
        struct File {
            plan: PlanSpec,
        }
        let text = toml::to_string(&File { plan: spec.clone() }).unwrap();
        let back: File = toml::from_str(&text).unwrap();
        assert_eq!(back.plan, spec);
        let short = PlanSpec { blocks: Some(vec![BlockMode::Lora; 3]), ..Default::default() };
        assert_eq!(short.resolve(&c).unwrap_err().field, "blocks");
    }

    #[test]
    fn presets_and_targets_parse() {
        assert_eq!("blocks:3".parse::<Preset>().unwrap(), Preset::Blocks(3));
        assert_eq!("EXPLORA".parse::<Preset>().unwrap(), Preset::Explora);
        assert!("blocks:x".parse::<Preset>().is_err());
        let t: LoraTargets = "q,v".parse().unwrap();
        assert_eq!(t, LoraTargets::QV);
        assert_eq!("attn".parse::<LoraTargets>().unwrap().to_string(), "q,k,v,proj");
        assert!("w".parse::<LoraTargets>().is_err());
    }
}
