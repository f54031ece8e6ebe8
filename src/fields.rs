//! The one error type for a config value that cannot be used — a run config, a pipeline
//! config, an adaptation plan or a model architecture — naming the config, the field and why,
//! so that both faces show the same words.

/// A config field that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {config}: `{field}` {reason}")]
pub struct FieldError {
    /// Which config: "run config", "pipeline config", "adaptation plan", "model config".
    pub config: &'static str,
    /// The field at fault, as written in the TOML (`optim.batch`, `crops.global_size`).
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(config: &'static str, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { config, field: field.into(), reason: reason.into() }
    }

    /// A field of the pre-training run config.
    pub fn run(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::new("run config", field, reason)
    }

    /// A field of the pipeline config.
    pub fn pipeline(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::new("pipeline config", field, reason)
    }

    /// A field of an adaptation plan.
    pub fn plan(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::new("adaptation plan", field, reason)
    }

    /// A field of a model architecture.
    pub fn model(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::new("model config", field, reason)
    }

    /// The same field, seen from an enclosing config (`crops.global_size` of the run config
    /// embedded in a pipeline config is `pretrain.crops.global_size` there).
    pub fn within(self, config: &'static str, prefix: &str) -> Self {
        Self { config, field: format!("{prefix}.{}", self.field), reason: self.reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_config_and_the_field() {
        let e = FieldError::run("optim.batch", "must be at least 2");
        assert_eq!(e.to_string(), "invalid run config: `optim.batch` must be at least 2");
        let e = e.within("pipeline config", "pretrain");
        assert_eq!(e.to_string(), "invalid pipeline config: `pretrain.optim.batch` must be at least 2");
    }
}
