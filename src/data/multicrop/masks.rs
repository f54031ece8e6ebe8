//! iBOT block-wise patch masks.

use rand::RngExt;
use rand::rngs::Xoshiro256PlusPlus;

use super::MaskConfig;
use super::augment::uniform;
use crate::data::rng::shuffle;

/// Smallest block (in patches) [`block_mask`] aims for.
const MIN_BLOCK_PATCHES: f64 = 4.0;
/// Aspect-ratio range of a mask block: log-uniform in [0.3, 1/0.3].
const MIN_BLOCK_ASPECT: f64 = 0.3;
/// Misses in a row after which [`block_mask`] stops.
const BLOCK_ATTEMPTS: usize = 10;

/// Tries to mask one rectangle adding between 1 and `budget` new cells; returns how many.
fn place_block(mask: &mut [bool], rows: usize, cols: usize, budget: f64, rng: &mut Xoshiro256PlusPlus) -> usize {
    let (log_lo, log_hi) = (MIN_BLOCK_ASPECT.ln(), (1.0 / MIN_BLOCK_ASPECT).ln());
    for _ in 0..BLOCK_ATTEMPTS {
        // As Python's `random.uniform(4, budget)`, also when budget < 4.
        let area = uniform(rng, MIN_BLOCK_PATCHES, budget);
        let aspect = uniform(rng, log_lo, log_hi).exp();
        let h = (area * aspect).sqrt().round() as usize;
        let w = (area / aspect).sqrt().round() as usize;
        if h == 0 || w == 0 || h > rows || w > cols {
            continue;
        }
        let top = rng.random_range(0..=rows - h);
        let left = rng.random_range(0..=cols - w);
        let already: usize = (top..top + h).map(|r| mask[r * cols + left..r * cols + left + w].iter().filter(|&&m| m).count()).sum();
        let new = h * w - already;
        if new > 0 && new as f64 <= budget {
            for r in top..top + h {
                mask[r * cols + left..r * cols + left + w].fill(true);
            }
            return new;
        }
    }
    0
}

/// A block-wise mask of a `rows`×`cols` patch grid (row-major, `true` = masked) with at most
/// `num_masked` masked patches, as BEiT/DINOv2's `MaskingGenerator`: rectangles of at least 4
/// patches (fewer only to fill the last few), at most half the grid, with aspect ratio
/// log-uniform in [0.3, 1/0.3], are placed at random (overlaps allowed, only new cells count)
/// without exceeding `num_masked`, until 10 attempts in a row fail. Usually the count reaches
/// `num_masked` or comes close; if no rectangle fits at all, one random patch is masked so
/// that a positive target always masks something.
pub fn block_mask(rows: usize, cols: usize, num_masked: usize, rng: &mut Xoshiro256PlusPlus) -> Vec<bool> {
    let n = rows * cols;
    let mut mask = vec![false; n];
    let target = num_masked.min(n);
    if target == 0 {
        return mask;
    }
    let max_block = 0.5 * n as f64;
    let mut count = 0;
    while count < target {
        let budget = ((target - count) as f64).min(max_block);
        let added = place_block(&mut mask, rows, cols, budget, rng);
        if added == 0 {
            break;
        }
        count += added;
    }
    if count == 0 {
        mask[rng.random_range(0..n)] = true;
    }
    mask
}

/// How many of `num_global_crops` global crops are masked: `floor(num_global_crops · p)`
/// (with a tolerance of 1e-6 so that e.g. 10 · 0.7 gives 7 despite `f32` rounding).
pub fn masked_crops(num_global_crops: usize, cfg: &MaskConfig) -> usize {
    let p = (cfg.probability as f64).clamp(0.0, 1.0);
    ((num_global_crops as f64 * p + 1e-6).floor() as usize).min(num_global_crops)
}

/// `n + 1` evenly spaced masking ratios over `cfg.ratio` (`np.linspace(min, max, n + 1)`):
/// masked crop `k` draws its ratio uniformly between entries `k` and `k + 1`.
fn ratio_edges(n: usize, cfg: &MaskConfig) -> Vec<f64> {
    let (lo, hi) = (cfg.ratio[0] as f64, cfg.ratio[1] as f64);
    (0..=n).map(|i| if i == n { hi } else { lo + (hi - lo) * i as f64 / n as f64 }).collect()
}

/// An upper bound on the masked patches of a batch with `num_global_crops` global crops of
/// `patches` patches each (DINOv2's `upperbound`): the sum over masked crops of
/// `floor(patches · ratio_max_k)`, so a consumer can pad the masked positions to a fixed size.
pub fn max_masked(num_global_crops: usize, patches: usize, cfg: &MaskConfig) -> usize {
    let n = masked_crops(num_global_crops, cfg);
    ratio_edges(n, cfg)[1..].iter().map(|&r| ((patches as f64 * r).floor() as usize).min(patches)).sum()
}

/// The masks of `num_crops` global crops on a `grid`×`grid` patch grid, concatenated
/// (`num_crops · grid²`, crop `i` at `i · grid²`), as DINOv2's `collate_data_and_cast`.
pub(super) fn batch_masks(num_crops: usize, grid: usize, cfg: &MaskConfig, rng: &mut Xoshiro256PlusPlus) -> Vec<bool> {
    let patches = grid * grid;
    let n = masked_crops(num_crops, cfg);
    let edges = ratio_edges(n, cfg);
    let mut order: Vec<usize> = (0..num_crops).collect();
    shuffle(&mut order, rng);
    let mut out = vec![false; num_crops * patches];
    for k in 0..n {
        let ratio = uniform(rng, edges[k], edges[k + 1]).min(edges[k + 1]);
        let count = ((patches as f64 * ratio).floor() as usize).min(patches);
        let mask = block_mask(grid, grid, count, rng);
        let crop = order[k];
        out[crop * patches..(crop + 1) * patches].copy_from_slice(&mask);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::tests::rng;
    use super::*;

    fn isolated_cells(mask: &[bool], rows: usize, cols: usize) -> usize {
        (0..rows * cols)
            .filter(|&i| {
                let (r, c) = (i / cols, i % cols);
                mask[i]
                    && !((r > 0 && mask[i - cols])
                        || (r + 1 < rows && mask[i + cols])
                        || (c > 0 && mask[i - 1])
                        || (c + 1 < cols && mask[i + 1]))
            })
            .count()
    }

    #[test]
    fn block_mask_respects_target_and_is_blocky() {
        let mut r = rng(11);
        for (rows, cols) in [(16, 16), (4, 4), (14, 9), (1, 12)] {
            let n = rows * cols;
            for target in [0, 1, 2, 3, 5, n / 10, n / 4, n / 2, n, n + 5] {
                for _ in 0..30 {
                    let m = block_mask(rows, cols, target, &mut r);
                    assert_eq!(m.len(), n);
                    let count = m.iter().filter(|&&v| v).count();
                    assert!(count <= target.min(n), "{rows}x{cols} target {target}: {count}");
                    if target > 0 {
                        assert!(count >= 1);
                    }
                    // Blocks have ≥ 2 cells except the few (< 4) filling the remainder.
                    if rows > 1 {
                        assert!(isolated_cells(&m, rows, cols) <= 3, "{m:?}");
                    }
                }
            }
        }
        // On a realistic grid the target is (nearly) reached.
        let mut total = 0;
        for _ in 0..50 {
            total += block_mask(16, 16, 100, &mut r).iter().filter(|&&v| v).count();
        }
        assert!(total >= 50 * 90, "{total}");
        assert_eq!(block_mask(16, 16, 77, &mut rng(4)), block_mask(16, 16, 77, &mut rng(4)));
    }

    #[test]
    fn mask_counts_and_bound() {
        let cfg = MaskConfig::default();
        assert_eq!(masked_crops(8, &cfg), 4);
        assert_eq!(masked_crops(7, &cfg), 3);
        assert_eq!(masked_crops(10, &MaskConfig { probability: 0.7, ..cfg.clone() }), 7);
        assert_eq!(masked_crops(10, &MaskConfig { probability: 0.0, ..cfg.clone() }), 0);
        // linspace(0.1, 0.5, 5) = [0.1, 0.2, 0.3, 0.4, 0.5]: floor(256·[0.2, 0.3, 0.4, 0.5]).
        assert_eq!(max_masked(8, 256, &cfg), 51 + 76 + 102 + 128);
        assert_eq!(max_masked(2, 16, &MaskConfig { probability: 0.0, ..cfg.clone() }), 0);

        let mut r = rng(9);
        for num_crops in [2, 3, 8, 16] {
            for _ in 0..20 {
                let m = batch_masks(num_crops, 4, &cfg, &mut r);
                assert_eq!(m.len(), num_crops * 16);
                let counts: Vec<usize> = m.chunks(16).map(|c| c.iter().filter(|&&v| v).count()).collect();
                let masked = counts.iter().filter(|&&c| c > 0).count();
                assert_eq!(masked, num_crops / 2, "{counts:?}");
                assert!(counts.iter().all(|&c| c <= 8), "{counts:?}");
                assert!(counts.iter().sum::<usize>() <= max_masked(num_crops, 16, &cfg));
            }
        }
    }
}
