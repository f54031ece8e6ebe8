//! Applying a plan to a backbone: attach LoRA factors, freeze everything else; and folding
//! LoRA back into the base weights.

use burn::module::{Module, Param, ParamGroup};
use burn::store::ModuleSnapshot;
use burn::tensor::Tensor;

use super::plan::{AdaptationPlan, BlockMode, PlanError};
use crate::model::{Convpass, Lora, MemoryTask, Vit};

/// Regexes over parameter paths that select what a plan trains.
pub fn trainable_patterns(plan: &AdaptationPlan) -> Vec<String> {
    let mut patterns = Vec::new();
    let unfrozen = plan.unfrozen_blocks();
    if !unfrozen.is_empty() {
        let list = unfrozen.iter().map(usize::to_string).collect::<Vec<_>>().join("|");
        patterns.push(format!(r"^blocks\.({list})\."));
    }
    if plan.blocks.contains(&BlockMode::Lora) {
        patterns.push(r"\.lora_[a-z0-9]+\.(a|b)$".into());
    }
    if plan.memory_tokens.is_some() {
        patterns.push(r"^tasks\.".into());
    }
    if plan.convpass.is_some() {
        patterns.push(r"\.convpass_(attn|mlp)\.".into());
    }
    if plan.norms {
        patterns.push(r"(^|\.)norm[12]?\.(gamma|beta)$".into());
    }
    for (on, pattern) in [
        (plan.cls_token, r"^cls_token$"),
        (plan.register_tokens, r"^register_tokens$"),
        (plan.mask_token, r"^mask_token$"),
        (plan.patch_embed, r"^patch_embed\."),
        (plan.pos_embed, r"^pos_embed$"),
    ] {
        if on {
            patterns.push(pattern.into());
        }
    }
    patterns
}

/// Attaches fresh LoRA factors where the plan asks for them and sets `require_grad` on exactly
/// the planned parameters (everything else frozen: no gradients, no optimizer state).
pub fn apply_plan(mut model: Vit, plan: &AdaptationPlan) -> Result<Vit, PlanError> {
    plan.validate(model.config())?;
    let device = model.device();
    let config = model.config().clone();
    let t = plan.lora.targets;
    let (rank, alpha, dropout) = (plan.lora.rank, plan.lora.alpha, plan.lora.dropout);
    let hidden = config.mlp_hidden();
    let fc1_out = if config.swiglu { 2 * hidden } else { hidden };
    let d = config.embed_dim;
    for (index, (block, mode)) in model.blocks.iter_mut().zip(&plan.blocks).enumerate() {
        let lora = |on: bool, d_in: usize, d_out: usize| {
            (on && *mode == BlockMode::Lora).then(|| Lora::new(d_in, d_out, rank, alpha, dropout, &device))
        };
        block.attn.lora_q = lora(t.q, d, d);
        block.attn.lora_k = lora(t.k, d, d);
        block.attn.lora_v = lora(t.v, d, d);
        block.attn.lora_proj = lora(t.proj, d, d);
        block.mlp.lora_fc1 = lora(t.fc1, d, fc1_out);
        block.mlp.lora_fc2 = lora(t.fc2, hidden, d);
        let convpass = |site: fn(&super::ConvpassSpec) -> bool| {
            plan.convpass.as_ref().filter(|c| site(c) && c.covers(index)).map(|c| Convpass::new(d, c.dim, c.scale, &device))
        };
        block.convpass_attn = convpass(|c| c.attn);
        block.convpass_mlp = convpass(|c| c.mlp);
    }
    if let Some(tokens) = plan.memory_tokens {
        let task = MemoryTask::new(model.cls_token.val(), config.depth, tokens, &device);
        model.tasks.push(task);
    }
    let patterns = trainable_patterns(plan);
    let model = model.no_grad();
    if patterns.is_empty() {
        return Ok(model);
    }
    let group = ParamGroup::from_any_regexes(patterns).map_err(|e| PlanError::plan("plan", format!("internal pattern error: {e:?}")))?;
    Ok(model.set_require_grad_group(group, true))
}

/// The model's tensors that `plan` trains (lazy: data is read only when asked for).
pub fn trainable_tensors(model: &Vit, plan: &AdaptationPlan) -> Vec<burn::store::burn_pack::Tensor> {
    let patterns: Vec<regex::Regex> = trainable_patterns(plan).iter().map(|p| regex::Regex::new(p).expect("valid pattern")).collect();
    model.collect(None, None, false).into_iter().filter(|t| patterns.iter().any(|p| p.is_match(&t.name))).collect()
}

/// Parameters a plan makes trainable in `model`, counted from the model's own tensors.
pub fn count_trainable(model: &Vit, plan: &AdaptationPlan) -> usize {
    trainable_tensors(model, plan).iter().map(|t| t.shape.num_elements()).sum()
}

fn add(param: &mut Param<Tensor<2>>, delta: Tensor<2>) {
    let merged = param.val() + delta;
    *param = Param::from_tensor(merged.detach()).set_require_grad(false);
}

/// Folds every LoRA update into its base weight and removes the adapters: the result computes
/// the same function with plain projections (for evaluation, export and other tools).
pub fn merge_lora(mut model: Vit) -> Vit {
    for block in model.blocks.iter_mut() {
        let attn = &mut block.attn;
        let d = attn.qkv.weight.dims()[0];
        let parts = [attn.lora_q.take(), attn.lora_k.take(), attn.lora_v.take()];
        if parts.iter().any(Option::is_some) {
            let device = attn.qkv.weight.val().device();
            let delta = Tensor::cat(
                parts.iter().map(|l| l.as_ref().map(Lora::weight_delta).unwrap_or_else(|| Tensor::zeros([d, d], &device))).collect(),
                1,
            );
            add(&mut attn.qkv.weight, delta);
        }
        if let Some(l) = attn.lora_proj.take() {
            add(&mut attn.proj.weight, l.weight_delta());
        }
        if let Some(l) = block.mlp.lora_fc1.take() {
            add(&mut block.mlp.fc1.weight, l.weight_delta());
        }
        if let Some(l) = block.mlp.lora_fc2.take() {
            add(&mut block.mlp.fc2.weight, l.weight_delta());
        }
    }
    model
}
