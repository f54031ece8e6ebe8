//! The schedules every trainer uses: half-cosine decay, linear ramps, and linear warm-up into
//! a cosine (pre-training's learning rate, fine-tuning's, the linear probe's).

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

/// Linear warm-up to `peak` over `warmup` steps (reached at the end of warm-up; DINO starts
/// from 0), then a half cosine down to `end` at step `total`.
pub fn warmup_cosine(peak: f64, end: f64, warmup: u64, step: u64, total: u64) -> f64 {
    let warmup = warmup.min(total);
    if step < warmup { peak * (step + 1) as f64 / warmup as f64 } else { cosine(peak, end, step - warmup, total - warmup) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_hit_their_ends() {
        assert!((cosine(1.0, 0.0, 100, 100)).abs() < 1e-12);
        assert_eq!(cosine(1.0, 0.2, 0, 100), 1.0);
        assert!((cosine(1.0, 0.0, 50, 100) - 0.5).abs() < 1e-12);
        assert_eq!(cosine(1.0, 0.5, 3, 0), 0.5);
        assert_eq!(linear(0.0, 1.0, 5, 10), 0.5);
        assert_eq!(linear(0.0, 1.0, 50, 10), 1.0);
        assert!((warmup_cosine(1.0, 0.0, 10, 0, 100) - 0.1).abs() < 1e-12);
        assert!((warmup_cosine(1.0, 0.0, 10, 9, 100) - 1.0).abs() < 1e-12);
        assert!((warmup_cosine(1.0, 0.0, 10, 10, 100) - 1.0).abs() < 1e-12);
        assert!(warmup_cosine(1.0, 0.0, 10, 100, 100).abs() < 1e-12);
        // No warm-up: a plain cosine.
        assert_eq!(warmup_cosine(2.0, 0.0, 0, 0, 10), 2.0);
    }
}
