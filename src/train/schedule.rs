//! Per-step values of the schedules: learning rate (linear warm-up, then cosine), weight
//! decay and teacher momentum (cosine), teacher temperature (linear warm-up).

use super::config::PretrainConfig;

/// `start` at `step` 0 to `end` at `steps`, along half a cosine (DINO's `cosine_scheduler`).
pub fn cosine(start: f64, end: f64, step: u64, steps: u64) -> f64 {
    if steps == 0 {
        return end;
    }
    let t = (step.min(steps) as f64) / steps as f64;
    end + 0.5 * (start - end) * (1.0 + (std::f64::consts::PI * t).cos())
}

/// Linear from `start` to `end` over `steps`, then `end`.
pub fn linear(start: f64, end: f64, step: u64, steps: u64) -> f64 {
    if step >= steps {
        return end;
    }
    start + (end - start) * step as f64 / steps as f64
}

/// The schedule values of one optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepValues {
    pub lr: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub teacher_temp: f64,
}

/// Values for 0-based optimizer step `step` of the run.
pub fn at(config: &PretrainConfig, step: u64) -> StepValues {
    let o = &config.optim;
    let total = config.run.steps;
    let warmup = o.warmup_steps.min(total);
    let peak = o.peak_lr();
    let lr = if step < warmup {
        // Reaches the peak at the end of warm-up (DINO starts from 0).
        peak * (step + 1) as f64 / warmup as f64
    } else {
        cosine(peak, o.min_lr, step - warmup, total - warmup)
    };
    let l = &config.loss;
    StepValues {
        lr,
        weight_decay: cosine(o.weight_decay[0], o.weight_decay[1], step, total),
        momentum: cosine(o.momentum[0], o.momentum[1], step, total),
        teacher_temp: linear(l.teacher_temp[0], l.teacher_temp[1], step, l.teacher_temp_warmup_steps),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_hit_their_ends() {
        let mut c = PretrainConfig::builtin();
        c.run.steps = 100;
        c.optim.warmup_steps = 10;
        let first = at(&c, 0);
        assert!((first.lr - c.optim.peak_lr() / 10.0).abs() < 1e-12);
        assert!((at(&c, 9).lr - c.optim.peak_lr()).abs() < 1e-12);
        assert!(at(&c, 50).lr < c.optim.peak_lr() && at(&c, 50).lr > c.optim.min_lr);
        assert!((cosine(1.0, 0.0, 100, 100)).abs() < 1e-12);
        assert!((first.weight_decay - c.optim.weight_decay[0]).abs() < 1e-12);
        assert!((first.momentum - c.optim.momentum[0]).abs() < 1e-12);
        assert_eq!(first.teacher_temp, c.loss.teacher_temp[0]);
        assert_eq!(at(&c, 1_000).teacher_temp, c.loss.teacher_temp[1]);
        assert!((at(&c, 100).momentum - c.optim.momentum[1]).abs() < 1e-12);
    }
}
