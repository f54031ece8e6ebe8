//! Parameter-efficient adaptation: the plan of what trains, and its exact parameter accounting
//! (the numbers `explora plan` prints and the app shows live).

mod apply;
mod plan;

pub use apply::{apply_plan, count_trainable, merge_lora, trainable_patterns, trainable_tensors};
pub use plan::{
    AdaptationPlan, BlockMode, Budget, BudgetRow, ConvpassSpec, LoraSpec, LoraTargets, PlanError, PlanSpec, Preset, activation_bytes,
    activation_bytes_for_tokens, block_activation_values, thousands,
};
