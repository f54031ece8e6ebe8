//! Adaptation plans on a real (tiny) model: step-0 equivalence, gradients only where planned,
//! LoRA merge, and the budget against the model's own tensors.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Distribution, Tensor};
use explora::model::{ForwardOptions, Vit, VitConfig};
use explora::peft::{AdaptationPlan, LoraTargets, Preset, apply_plan, count_trainable, merge_lora};

use crate::common::*;

fn images(device: &burn::tensor::Device) -> Tensor<4> {
    Tensor::random([2, 3, 64, 64], Distribution::Normal(0.0, 1.0), device)
}

fn features(model: &Vit, x: Tensor<4>) -> Vec<f32> {
    let out = model.forward(x, ForwardOptions::default());
    let mut v = values(out.cls).1;
    v.extend(values(out.patches).1);
    v
}

fn every_target() -> LoraTargets {
    "all".parse().unwrap()
}

#[test]
fn every_preset_starts_equal_to_the_base_model() {
    let device = device();
    let base = VitConfig::tiny().init(&device);
    let x = images(&device);
    let reference = features(&base, x.clone());
    for preset in [Preset::Explora, Preset::Lora, Preset::Linear, Preset::Full, Preset::Blocks(2)] {
        let mut plan = AdaptationPlan::preset(preset, base.config());
        plan.lora.targets = every_target();
        plan.lora.rank = 4;
        let adapted = apply_plan(base.clone(), &plan).unwrap();
        let diff = max_abs_diff(&features(&adapted, x.clone()), &reference);
        assert!(diff < 1e-6, "{preset:?}: step-0 output differs by {diff}");
    }
}

/// Collects `(path, has gradient)` for every float parameter.
struct GradCheck<'a> {
    grads: &'a burn::tensor::Gradients,
    path: Vec<String>,
    seen: Vec<(String, bool)>,
}

impl ModuleVisitor for GradCheck<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let name = self.path.iter().filter(|p| !p.is_empty()).cloned().collect::<Vec<_>>().join(".");
        self.seen.push((name, param.val().grad(self.grads).is_some()));
    }
}

#[test]
fn gradients_reach_exactly_the_planned_parameters() {
    let device = device().autodiff();
    let config = VitConfig::tiny();
    let plan = AdaptationPlan::preset(Preset::Explora, &config);
    let model = apply_plan(config.init(&device), &plan).unwrap();
    let out = model.forward(
        images(&device),
        ForwardOptions {
            mask: Some(Tensor::<2>::random([2, 64], Distribution::Uniform(0.0, 1.0), &device).greater_elem(0.5)),
            attention_layers: vec![],
        },
    );
    let loss = out.cls.powf_scalar(2.0).sum() + out.patches.sum();
    let grads = loss.backward();
    let mut check = GradCheck { grads: &grads, path: Vec::new(), seen: Vec::new() };
    model.visit(&mut check);
    let trained: Vec<&str> = check.seen.iter().filter(|(_, g)| *g).map(|(n, _)| n.as_str()).collect();
    let frozen: Vec<&str> = check.seen.iter().filter(|(_, g)| !*g).map(|(n, _)| n.as_str()).collect();
    // The last block (3) is fully unfrozen; LoRA on q and v elsewhere; norms, CLS, mask token.
    for name in [
        "blocks.3.attn.qkv.weight",
        "blocks.3.mlp.fc2.bias",
        "blocks.3.ls1.gamma",
        "blocks.0.attn.lora_q.a",
        "blocks.2.attn.lora_v.b",
        "blocks.1.norm1.gamma",
        "norm.beta",
        "cls_token",
        "mask_token",
    ] {
        assert!(trained.contains(&name), "{name} should train; trained: {trained:?}");
    }
    for name in ["blocks.0.attn.qkv.weight", "blocks.2.mlp.fc1.weight", "blocks.1.ls2.gamma", "patch_embed.proj.weight", "pos_embed"] {
        assert!(frozen.contains(&name), "{name} should stay frozen; frozen: {frozen:?}");
    }
    assert!(!trained.iter().any(|n| n.contains("lora_k") || n.starts_with("blocks.3.attn.lora")), "{trained:?}");
    // The budget counts exactly the parameters that received gradients.
    let budget = plan.budget(&config);
    assert_eq!(budget.trainable, count_trainable(&model, &plan));
}

#[test]
fn merged_lora_computes_the_same_function() {
    let device = device();
    let config = VitConfig::tiny();
    let mut plan = AdaptationPlan::preset(Preset::Lora, &config);
    plan.lora.targets = every_target();
    plan.lora.rank = 8;
    plan.lora.alpha = 16.0;
    let mut model = apply_plan(config.init(&device), &plan).unwrap();
    // Give every B a non-zero value, as after training.
    for block in model.blocks.iter_mut() {
        for lora in [
            &mut block.attn.lora_q,
            &mut block.attn.lora_k,
            &mut block.attn.lora_v,
            &mut block.attn.lora_proj,
            &mut block.mlp.lora_fc1,
            &mut block.mlp.lora_fc2,
        ]
        .into_iter()
        .flatten()
        {
            let dims = lora.b.dims();
            lora.b = Param::from_tensor(Tensor::random(dims, Distribution::Normal(0.0, 0.05), &device));
        }
    }
    let x = images(&device);
    let adapted = features(&model, x.clone());
    let base = features(&config.init(&device), x.clone());
    let merged_model = merge_lora(model);
    assert!(merged_model.blocks.iter().all(|b| b.attn.lora_q.is_none() && b.mlp.lora_fc2.is_none()));
    let merged = features(&merged_model, x);
    let diff = max_abs_diff(&adapted, &merged);
    assert!(diff < 1e-4, "merge changed outputs by {diff}");
    assert!(max_abs_diff(&adapted, &base) > 1e-3, "the adapters must matter for this test to mean anything");
}

#[test]
fn budget_matches_the_model_for_every_preset() {
    let device = device();
    let config = VitConfig { num_registers: 2, ..VitConfig::tiny() };
    for preset in [Preset::Explora, Preset::Lora, Preset::Linear, Preset::Full, Preset::Blocks(3)] {
        let plan = AdaptationPlan::preset(preset, &config);
        let model = apply_plan(config.init(&device), &plan).unwrap();
        assert_eq!(plan.budget(&config).trainable, count_trainable(&model, &plan), "{preset:?}");
    }
}

#[test]
fn adapter_files_are_small_reapply_exactly_and_export_merged() {
    use explora::checkpoint::{load_adapter, load_backbone, save_adapter, save_backbone};
    let device = device();
    let dir = tempfile::tempdir().unwrap();
    let config = VitConfig::tiny();
    let base = config.init(&device);
    let base_path = dir.path().join("base.safetensors");
    save_backbone(&base, &base_path).unwrap();
    let mut plan = AdaptationPlan::preset(Preset::Explora, &config);
    plan.lora.rank = 4;
    let mut adapted = apply_plan(base.clone(), &plan).unwrap();
    // Stand-in for training: move every LoRA B and the unfrozen block's fc2.
    for block in adapted.blocks.iter_mut() {
        for lora in [&mut block.attn.lora_q, &mut block.attn.lora_v].into_iter().flatten() {
            let dims = lora.b.dims();
            lora.b = Param::from_tensor(Tensor::random(dims, Distribution::Normal(0.0, 0.1), &device));
        }
    }
    let fc2 = adapted.blocks[3].mlp.fc2.weight.val();
    adapted.blocks[3].mlp.fc2.weight = Param::from_tensor(fc2.clone() + fc2.random_like(Distribution::Normal(0.0, 0.05)));
    let x = images(&device);
    let expected = features(&adapted, x.clone());

    let adapter = dir.path().join("adapter.safetensors");
    save_adapter(&adapted, &plan, &adapter).unwrap();
    let adapter_size = std::fs::metadata(&adapter).unwrap().len();
    let base_size = std::fs::metadata(&base_path).unwrap().len();
    assert!(adapter_size * 2 < base_size, "adapter {adapter_size} B vs base {base_size} B");

    let (reloaded_base, _) = load_backbone(&base_path, &device).unwrap();
    let (reapplied, reloaded_plan) = load_adapter(reloaded_base, &adapter).unwrap();
    assert_eq!(reloaded_plan, plan);
    assert_eq!(max_abs_diff(&features(&reapplied, x.clone()), &expected), 0.0);

    // An adapter for another architecture is refused by name.
    let other = VitConfig { depth: 2, ..VitConfig::tiny() }.init(&device);
    let err = load_adapter(other, &adapter).unwrap_err().to_string();
    assert!(err.contains("made for tiny (width 64, 4 blocks)"), "{err}");

    // `explora export` merges LoRA and writes a plain HF checkpoint with the same function.
    let out = dir.path().join("hf").join("model.safetensors");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_explora"))
        .args([
            "export",
            "--weights",
            base_path.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--layout",
            "hf",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let (exported, report) = load_backbone(&out, &device).unwrap();
    assert_eq!(report.layout, explora::checkpoint::Layout::HfDinov2);
    assert!(exported.blocks.iter().all(|b| b.attn.lora_q.is_none()), "a plain checkpoint");
    let diff = max_abs_diff(&features(&exported, x), &expected);
    assert!(diff < 1e-4, "exported model differs by {diff}");
}

#[test]
fn convpass_starts_as_identity_trains_and_is_counted() {
    use explora::peft::ConvpassSpec;
    let device = device().autodiff();
    let config = VitConfig { num_registers: 1, ..VitConfig::tiny() };
    let base = config.init(&device);
    let mut plan = AdaptationPlan::preset(Preset::Linear, &config);
    plan.convpass = Some(ConvpassSpec::default());
    let model = apply_plan(base.clone(), &plan).unwrap();
    let x = images(&device);
    assert!(max_abs_diff(&features(&model, x.clone()), &features(&base, x.clone())) < 1e-6, "zero-initialised up-projection");
    let out = model.forward(x, ForwardOptions::default());
    let grads = (out.cls.sum() + out.patches.powf_scalar(2.0).sum()).backward();
    let mut check = GradCheck { grads: &grads, path: Vec::new(), seen: Vec::new() };
    model.visit(&mut check);
    let trained: Vec<&str> = check.seen.iter().filter(|(_, g)| *g).map(|(n, _)| n.as_str()).collect();
    assert!(trained.iter().all(|n| n.contains(".convpass_")), "{trained:?}");
    for name in ["blocks.0.convpass_attn.up.weight", "blocks.3.convpass_mlp.conv.weight", "blocks.2.convpass_mlp.down.bias"] {
        assert!(trained.contains(&name), "{name}: {trained:?}");
    }
    // 4 blocks × 2 sites × (64·8+8 + 8·8·9+8 + 8·64+64)
    assert_eq!(plan.budget(&config).trainable, 4 * 2 * (520 + 584 + 576));
    assert_eq!(plan.budget(&config).trainable, count_trainable(&model, &plan));

    // Chosen blocks only, beside the MLP only.
    plan.convpass = Some(ConvpassSpec { attn: false, blocks: Some(vec![1, 3]), ..ConvpassSpec::default() });
    let model = apply_plan(base.clone(), &plan).unwrap();
    let placed: Vec<(bool, bool)> = model.blocks.iter().map(|b| (b.convpass_attn.is_some(), b.convpass_mlp.is_some())).collect();
    assert_eq!(placed, vec![(false, false), (false, true), (false, false), (false, true)]);
    assert_eq!(plan.budget(&config).trainable, 2 * (520 + 584 + 576));
    assert_eq!(plan.budget(&config).trainable, count_trainable(&model, &plan));
    plan.convpass = Some(ConvpassSpec { blocks: Some(vec![4]), ..ConvpassSpec::default() });
    assert_eq!(apply_plan(base, &plan).unwrap_err().field, "convpass.blocks");
}

#[test]
fn memory_tasks_share_one_pass_without_changing_the_original_outputs() {
    use explora::model::MemoryTask;
    let device = device();
    let config = VitConfig { num_registers: 2, ..VitConfig::tiny() };
    let base = config.init(&device);
    let x = images(&device);
    let original = base.forward(x.clone(), ForwardOptions::default());
    let (original_cls, original_patches) = (values(original.cls).1, values(original.patches).1);

    // Task B, with memory moved away from its init as after training.
    let mut with_b = base.clone();
    let mut task_b = MemoryTask::new(base.cls_token.val(), config.depth, 5, &device);
    task_b.memory = Param::from_tensor(Tensor::random([config.depth, 5, 64], Distribution::Normal(0.0, 1.0), &device));
    with_b.tasks.push(task_b);
    let out_b = with_b.forward(x.clone(), ForwardOptions { mask: None, attention_layers: vec![2] });
    assert!(max_abs_diff(&values(out_b.cls).1, &original_cls) < 1e-6, "task B changed the original CLS");
    assert!(max_abs_diff(&values(out_b.patches).1, &original_patches) < 1e-6, "task B changed the patches");
    assert_eq!(out_b.task_cls.len(), 1);
    let b_alone = values(out_b.task_cls[0].clone()).1;
    assert!(max_abs_diff(&b_alone, &original_cls) > 1e-3, "task B's class token sees its memory");
    // The original tokens put zero attention on task tokens and memory.
    let (dims, probs) = values(out_b.attentions[0].1.clone());
    let keys = dims[3];
    let original_tokens = 1 + 2 + 64;
    for row in probs.chunks(keys).enumerate().filter(|(i, _)| i % dims[2] < original_tokens).map(|(_, r)| r) {
        assert!(row[original_tokens..].iter().all(|p| *p == 0.0));
    }

    // Adding task C leaves both the original outputs and task B's output unchanged.
    let mut with_bc = with_b.clone();
    let mut task_c = MemoryTask::new(base.cls_token.val(), config.depth, 5, &device);
    task_c.memory = Param::from_tensor(Tensor::random([config.depth, 5, 64], Distribution::Normal(0.0, 1.0), &device));
    with_bc.tasks.push(task_c);
    let out_bc = with_bc.forward(x, ForwardOptions::default());
    assert!(max_abs_diff(&values(out_bc.cls).1, &original_cls) < 1e-6);
    assert!(max_abs_diff(&values(out_bc.task_cls[0].clone()).1, &b_alone) < 1e-5, "task C changed task B");
    assert!(max_abs_diff(&values(out_bc.task_cls[1].clone()).1, &b_alone) > 1e-3);

    // Through the plan: only the task's tokens train, and the budget counts them.
    let mut plan = AdaptationPlan::preset(Preset::Linear, &config);
    plan.memory_tokens = Some(5);
    let adapted = apply_plan(base, &plan).unwrap();
    assert_eq!(plan.budget(&config).trainable, (4 * 5 + 1) * 64);
    assert_eq!(count_trainable(&adapted, &plan), plan.budget(&config).trainable);
}

#[test]
fn lora_dropout_acts_only_while_training() {
    let device = device().autodiff();
    let config = VitConfig::tiny();
    let mut plan = AdaptationPlan::preset(Preset::Lora, &config);
    plan.lora.rank = 4;
    plan.lora.dropout = 0.5;
    let mut model = apply_plan(config.init(&device), &plan).unwrap();
    for block in model.blocks.iter_mut() {
        for lora in [&mut block.attn.lora_q, &mut block.attn.lora_v].into_iter().flatten() {
            let dims = lora.b.dims();
            lora.b = Param::from_tensor(Tensor::random(dims, Distribution::Normal(0.0, 0.5), &device)).set_require_grad(true);
        }
    }
    let x = images(&device);
    let a = features(&model, x.clone());
    let b = features(&model, x.clone());
    assert!(max_abs_diff(&a, &b) > 1e-4, "two training passes draw different dropout masks");
    let eval = model.valid();
    let x = x.without_autodiff();
    assert_eq!(max_abs_diff(&features(&eval, x.clone()), &features(&eval, x)), 0.0, "no dropout in evaluation");
}
