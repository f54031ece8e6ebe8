//! `explora plan`: the adaptation plan and its parameter budget, without training.

use super::super::args::*;
use super::super::parse_arch;

pub(crate) fn plan_cmd(args: PlanArgs) -> anyhow::Result<()> {
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
    use crate::train::{Objective, PretrainConfig};
    let objective = args.objective.unwrap_or(match config.family {
        crate::model::Family::Dinov2 => Objective::Dinov2,
        crate::model::Family::Mae => Objective::Mae,
    });
    anyhow::ensure!(args.crops.len() == 2, "--crops takes two sizes, global and local, e.g. --crops 224,98");
    // The run these flags describe: its plan, budget and activation estimate follow the same
    // rules as `explora pretrain` and the app (UpStep's own plan, MAE's frozen mask token and
    // decoder, what each objective's student sees).
    let mut run = PretrainConfig { objective, plan: spec, ..PretrainConfig::default() };
    run.optim.batch = args.batch;
    run.crops.global_size = args.crops[0];
    run.crops.local_size = args.crops[1];
    run.crops.local_crops = args.local_crops;
    let spec = objective.plan_spec(run.plan.clone());
    let plan = run.resolve_plan(&config)?;
    let budget = run.planned_budget(&config, &plan);
    let activations = run.activation_bytes(&config, &plan);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "arch": config.name, "plan": plan, "objective": objective, "budget": budget, "activation_bytes": activations })
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
        spec.preset
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
    for extra in &budget.extra {
        println!("beside the backbone ({objective} objective): {}: {} parameters", extra.component, crate::peft::thousands(extra.params));
    }
    println!(
        "optimizer state (AdamW, 2 × f32 per trainable parameter): {:.1} MiB",
        budget.optimizer_state_bytes() as f64 / (1 << 20) as f64
    );
    println!(
        "activation memory (estimate, f32, batch {}, {}): {:.1} MiB",
        args.batch,
        run.views_description(),
        activations as f64 / (1 << 20) as f64
    );
    Ok(())
}
