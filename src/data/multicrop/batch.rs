//! Building the batch of a step: image order, crops, normalisation and masks.

use std::path::PathBuf;
use std::sync::Arc;

use rayon::prelude::*;

use super::BatchSpec;
use super::augment::{Crops, STREAM_AUGMENT, STREAM_MASKS, STREAM_ORDER, augment, stream_rng};
use super::masks::batch_masks;
use super::source::ImageSource;
use crate::data::DataError;
use crate::data::preprocess::normalize_chw;
use crate::data::rng::shuffle;

/// One training batch of multi-crop views with iBOT masks, in the layout of DINOv2's collate.
#[derive(Debug, Clone, PartialEq)]
pub struct CropBatch {
    /// The step this batch belongs to.
    pub step: u64,
    /// Images in the batch (B).
    pub batch: usize,
    pub global_size: u32,
    pub local_size: u32,
    pub local_crops: usize,
    /// Patch size the masks were made for.
    pub patch_size: usize,
    /// `[2·B, 3, G, G]`, ImageNet-normalised, crop-major: the first global crop of every
    /// sample, then the second.
    pub globals: Vec<f32>,
    /// `[L·B, 3, l, l]`, ImageNet-normalised, crop-major: local crop 0 of every sample, then
    /// local crop 1, ...
    pub locals: Vec<f32>,
    /// `[2·B, (G/patch)²]`, row-major patch masks (true = masked) in the order of `globals`.
    pub masks: Vec<bool>,
    /// Files that failed to decode while building this batch (each listed once), with why.
    /// Each was replaced by the next image of the shuffled order.
    pub skipped: Vec<(PathBuf, String)>,
    /// The un-normalised crops of sample 0, when [`BatchSpec::preview_every`] asked for them.
    pub preview: Option<Crops>,
    /// The source image (index into the [`ImageSource`]) of each sample.
    pub sources: Vec<usize>,
}

impl CropBatch {
    /// Patches per side of a global crop.
    pub fn grid(&self) -> usize {
        self.global_size as usize / self.patch_size.max(1)
    }

    /// Values per global crop (`3·G²`).
    pub fn global_values(&self) -> usize {
        3 * self.global_size as usize * self.global_size as usize
    }

    /// Values per local crop (`3·l²`).
    pub fn local_values(&self) -> usize {
        3 * self.local_size as usize * self.local_size as usize
    }

    /// The masks of sample `j`'s two global crops, concatenated (`2·grid²`), as
    /// [`contact_sheet`](super::contact_sheet) takes them.
    pub fn sample_masks(&self, j: usize) -> Vec<bool> {
        let n = self.grid() * self.grid();
        let mut out = Vec::with_capacity(2 * n);
        for crop in [j, self.batch + j] {
            if let Some(m) = self.masks.get(crop * n..(crop + 1) * n) {
                out.extend_from_slice(m);
            }
        }
        out
    }

    /// Total number of masked patches.
    pub fn masked_count(&self) -> usize {
        self.masks.iter().filter(|&&m| m).count()
    }
}

/// Consecutive unreadable images after which a batch gives up.
const MAX_CONSECUTIVE_FAILURES: usize = 100;

/// Seeded epoch permutations of the image order, kept for the epochs in use.
#[derive(Default)]
pub(super) struct OrderCache {
    key: (usize, u64),
    epochs: Vec<(u64, Arc<Vec<u32>>)>,
}

impl OrderCache {
    const KEEP: usize = 4;

    /// The shuffled order of epoch `epoch` of a source of `len` images.
    fn epoch(&mut self, len: usize, seed: u64, epoch: u64) -> Arc<Vec<u32>> {
        if self.key != (len, seed) {
            self.key = (len, seed);
            self.epochs.clear();
        }
        if let Some((_, perm)) = self.epochs.iter().find(|(e, _)| *e == epoch) {
            return perm.clone();
        }
        let mut perm: Vec<u32> = (0..len as u32).collect();
        shuffle(&mut perm, &mut stream_rng(seed, STREAM_ORDER, epoch));
        let perm = Arc::new(perm);
        if self.epochs.len() >= Self::KEEP {
            self.epochs.remove(0);
        }
        self.epochs.push((epoch, perm.clone()));
        perm
    }
}

/// One sample's crops and the files skipped to get it.
struct Sample {
    /// Index of the source image in the [`ImageSource`].
    index: usize,
    crops: Crops,
    skipped: Vec<(PathBuf, String)>,
}

pub(super) fn invalid(reason: impl Into<String>) -> DataError {
    DataError::Invalid { reason: reason.into() }
}

/// Builds the batch of `step` (see the [module documentation](super) for what it contains and how it
/// is determined). Samples are decoded and augmented in parallel on the rayon pool.
///
/// An image that cannot be decoded is recorded in [`CropBatch::skipped`] and replaced by the
/// next one of the shuffled order; the batch fails only if 100 consecutive images (or, for
/// smaller sources, as many as it holds) cannot be read, or if `spec` is invalid
/// ([`DataError::Invalid`]).
pub fn build_batch(source: &dyn ImageSource, spec: &BatchSpec, step: u64) -> Result<CropBatch, DataError> {
    build_batch_cached(source, spec, step, &mut OrderCache::default())
}

pub(super) fn build_batch_cached(
    source: &dyn ImageSource,
    spec: &BatchSpec,
    step: u64,
    cache: &mut OrderCache,
) -> Result<CropBatch, DataError> {
    spec.validate().map_err(|e| invalid(format!("invalid batch settings: {e}")))?;
    let len = source.len();
    if len == 0 {
        return Err(invalid(format!("{} holds no image", source.describe())));
    }
    if len > u32::MAX as usize {
        return Err(invalid(format!("{} holds too many images", source.describe())));
    }
    let b = spec.batch;
    let tries = len.min(MAX_CONSECUTIVE_FAILURES);
    let first = step
        .checked_mul(b as u64)
        .filter(|f| f.checked_add((b + tries) as u64).is_some())
        .ok_or_else(|| invalid(format!("step {step} is out of range")))?;

    // The shuffled orders of every epoch this batch can reach (usually one or two).
    let last = first + (b + tries - 2) as u64;
    let (first_epoch, last_epoch) = (first / len as u64, last / len as u64);
    let orders: Vec<Arc<Vec<u32>>> = (first_epoch..=last_epoch).map(|e| cache.epoch(len, spec.seed, e)).collect();
    let image_at = |position: u64| -> usize {
        let epoch = (position / len as u64 - first_epoch) as usize;
        orders[epoch][(position % len as u64) as usize] as usize
    };

    let samples: Vec<Result<Sample, DataError>> = (0..b)
        .into_par_iter()
        .map(|j| {
            let g = first + j as u64;
            let mut skipped = Vec::new();
            for t in 0..tries {
                let index = image_at(g + t as u64);
                match source.load(index) {
                    Ok(image) => {
                        let mut rng = stream_rng(spec.seed, STREAM_AUGMENT, g);
                        let crops = augment(&image, &spec.crops, &mut rng);
                        return Ok(Sample { index, crops, skipped });
                    }
                    Err(e) => {
                        let path = source.path(index).unwrap_or_else(|| PathBuf::from(format!("image #{index}")));
                        skipped.push((path, e.reason()));
                    }
                }
            }
            let (path, reason) = skipped.last().cloned().unwrap_or_default();
            Err(invalid(format!(
                "{tries} consecutive images of {} could not be read (the last: {}: {reason})",
                source.describe(),
                path.display()
            )))
        })
        .collect();
    let samples: Vec<Sample> = samples.into_iter().collect::<Result<_, _>>()?;

    let mut skipped: Vec<(PathBuf, String)> = Vec::new();
    for entry in samples.iter().flat_map(|s| &s.skipped) {
        if !skipped.iter().any(|(p, _)| *p == entry.0) {
            skipped.push(entry.clone());
        }
    }

    let cfg = &spec.crops;
    let (gs, ls) = (cfg.global_size.max(1), cfg.local_size.max(1));
    let global_values = 3 * gs as usize * gs as usize;
    let local_values = 3 * ls as usize * ls as usize;
    let mut globals = vec![0.0f32; 2 * b * global_values];
    globals.par_chunks_mut(global_values).enumerate().for_each(|(i, out)| {
        out.copy_from_slice(&normalize_chw(&samples[i % b].crops.globals[i / b]));
    });
    let mut locals = vec![0.0f32; cfg.local_crops * b * local_values];
    locals.par_chunks_mut(local_values).enumerate().for_each(|(i, out)| {
        out.copy_from_slice(&normalize_chw(&samples[i % b].crops.locals[i / b]));
    });

    let mut mask_rng = stream_rng(spec.seed, STREAM_MASKS, step);
    let masks = batch_masks(2 * b, spec.grid(), &spec.masks, &mut mask_rng);

    let sources = samples.iter().map(|s| s.index).collect();
    let preview = spec.wants_preview(step).then(|| samples.into_iter().next().map(|s| s.crops)).flatten();

    Ok(CropBatch {
        step,
        batch: b,
        global_size: gs,
        local_size: ls,
        local_crops: cfg.local_crops,
        patch_size: spec.patch_size,
        globals,
        locals,
        masks,
        skipped,
        preview,
        sources,
    })
}

#[cfg(test)]
mod tests {
    use super::super::max_masked;
    use super::super::tests::{Recording, procedural, small_spec};
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn batch_layout_values_and_masks() {
        let spec = BatchSpec { preview_every: 1, ..small_spec(3) };
        let source = procedural(10);
        let batch = build_batch(&source, &spec, 0).unwrap();
        assert_eq!((batch.step, batch.batch, batch.grid()), (0, 3, 4));
        assert_eq!(batch.globals.len(), 2 * 3 * 3 * 32 * 32);
        assert_eq!(batch.locals.len(), 3 * 3 * 3 * 16 * 16);
        assert_eq!(batch.masks.len(), 2 * 3 * 16);
        assert!(batch.skipped.is_empty());
        let lo = (0.0 - 0.485) / 0.229 - 1e-4;
        let hi = (1.0 - 0.406) / 0.225 + 1e-4;
        assert!(batch.globals.iter().chain(&batch.locals).all(|v| v.is_finite() && (lo..=hi).contains(v)));
        let mean = batch.globals.iter().sum::<f32>() / batch.globals.len() as f32;
        assert!(mean.abs() < 1.5, "{mean}");

        // Crop-major: sample 0's crops are at chunks 0 and B (globals), c·B (locals).
        let preview = batch.preview.as_ref().unwrap();
        let gv = batch.global_values();
        let lv = batch.local_values();
        assert_eq!(&batch.globals[..gv], &normalize_chw(&preview.globals[0])[..]);
        assert_eq!(&batch.globals[3 * gv..4 * gv], &normalize_chw(&preview.globals[1])[..]);
        for c in 0..3 {
            let at = c * 3 * lv;
            assert_eq!(&batch.locals[at..at + lv], &normalize_chw(&preview.locals[c])[..]);
        }

        // floor(6 · 0.5) = 3 masked crops, each with 1..=floor(0.5 · 16) patches.
        for step in 0..20 {
            let b = build_batch(&source, &spec, step).unwrap();
            let counts: Vec<usize> = b.masks.chunks(16).map(|c| c.iter().filter(|&&v| v).count()).collect();
            assert_eq!(counts.iter().filter(|&&c| c > 0).count(), 3, "{counts:?}");
            assert!(counts.iter().all(|&c| c <= 8));
            assert!(b.masked_count() <= max_masked(6, 16, &spec.masks));
            assert_eq!(b.sample_masks(1).len(), 32);
            assert_eq!(&b.sample_masks(1)[16..], &b.masks[4 * 16..5 * 16]);
        }
        let no_preview = build_batch(&source, &small_spec(3), 0).unwrap();
        assert!(no_preview.preview.is_none());
    }

    #[test]
    fn batches_are_deterministic_and_step_dependent() {
        let spec = small_spec(4);
        let source = procedural(9);
        let a = build_batch(&source, &spec, 5).unwrap();
        assert_eq!(a, build_batch(&source, &spec, 5).unwrap());
        let b = build_batch(&source, &spec, 6).unwrap();
        assert_ne!(a.globals, b.globals);
        assert_ne!(a.locals, b.locals);
        let other_seed = BatchSpec { seed: 8, ..spec.clone() };
        assert_ne!(a.globals, build_batch(&source, &other_seed, 5).unwrap().globals);
        // Independent of the thread pool.
        let single = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        assert_eq!(a, single.install(|| build_batch(&source, &spec, 5)).unwrap());
    }

    #[test]
    fn every_epoch_visits_each_image_once_in_a_new_order() {
        let source = Recording { count: 12, loaded: Mutex::default(), broken: vec![] };
        let spec = small_spec(4);
        let mut epochs = Vec::new();
        for epoch in 0..2u64 {
            source.loaded.lock().unwrap().clear();
            for step in 3 * epoch..3 * epoch + 3 {
                build_batch(&source, &spec, step).unwrap();
            }
            let mut seen = source.loaded.lock().unwrap().clone();
            seen.sort();
            assert_eq!(seen, (0..12).collect::<Vec<_>>());
            let mut cache = OrderCache::default();
            epochs.push(cache.epoch(12, spec.seed, epoch));
        }
        assert_ne!(epochs[0], epochs[1]);
        // Batches larger than the source span several epochs.
        let big = build_batch(&source, &small_spec(30), 1).unwrap();
        assert_eq!(big.globals.len(), 2 * 30 * 3 * 32 * 32);
    }

    #[test]
    fn unreadable_images_are_replaced_or_fail_clearly() {
        let source = Recording { count: 6, loaded: Mutex::default(), broken: vec![2, 3] };
        let spec = small_spec(6); // one whole epoch: both broken images are met
        let batch = build_batch(&source, &spec, 0).unwrap();
        let mut skipped: Vec<_> = batch.skipped.iter().map(|(p, _)| p.clone()).collect();
        skipped.sort();
        assert_eq!(skipped, [PathBuf::from("img2.png"), PathBuf::from("img3.png")]);
        assert!(batch.skipped.iter().all(|(_, r)| r == "broken"));
        // Each sample names the image it was cut from: never a broken one, each once.
        let mut sources = batch.sources.clone();
        sources.sort_unstable();
        sources.dedup();
        assert_eq!(batch.sources.len(), 6);
        assert!(batch.sources.iter().all(|i| *i < 6 && *i != 2 && *i != 3), "{:?}", batch.sources);
        assert!(sources.len() >= 4, "{:?}", batch.sources);
        assert_eq!(batch.globals.len(), 2 * 6 * 3 * 32 * 32);
        assert_eq!(batch, build_batch(&source, &spec, 0).unwrap());

        let all_broken = Recording { count: 3, loaded: Mutex::default(), broken: vec![0, 1, 2] };
        let err = build_batch(&all_broken, &small_spec(2), 0).unwrap_err();
        assert!(matches!(err, DataError::Invalid { .. }));
        assert!(err.to_string().contains("3 consecutive images of recording"), "{err}");
        let empty = Recording { count: 0, loaded: Mutex::default(), broken: vec![] };
        assert!(build_batch(&empty, &small_spec(2), 0).unwrap_err().to_string().contains("no image"));
    }
}
