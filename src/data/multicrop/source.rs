//! Image sources: a folder of images or a procedural domain.

use std::path::PathBuf;

use image::RgbImage;

use crate::data::DataError;
use crate::data::folder::{ImageList, decode_rgb};
use crate::data::procedural::ProceduralDomain;

/// A finite, indexable collection of images (one epoch).
pub trait ImageSource: Send + Sync {
    /// Number of images in an epoch.
    fn len(&self) -> usize;
    /// Whether the source holds no image.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Decodes image `index` (< `len()`) to RGB8.
    fn load(&self, index: usize) -> Result<RgbImage, DataError>;
    /// A short description for the user, e.g. `image folder data/ (27000 images)`.
    fn describe(&self) -> String;
    /// The file behind image `index`, if there is one.
    fn path(&self, index: usize) -> Option<PathBuf>;
}

/// The images of a folder (labels ignored).
#[derive(Debug, Clone)]
pub struct FolderSource {
    pub list: ImageList,
}

impl ImageSource for FolderSource {
    fn len(&self) -> usize {
        self.list.len()
    }

    fn load(&self, index: usize) -> Result<RgbImage, DataError> {
        match self.list.items.get(index) {
            Some(item) => decode_rgb(&item.path),
            None => Err(DataError::Invalid { reason: format!("image index {index} is out of range ({} images)", self.list.len()) }),
        }
    }

    fn describe(&self) -> String {
        let n = self.list.len();
        format!("image folder {} ({n} image{})", self.list.root.display(), if n == 1 { "" } else { "s" })
    }

    fn path(&self, index: usize) -> Option<PathBuf> {
        self.list.items.get(index).map(|i| i.path.clone())
    }
}

/// The first `count` tiles of a procedural domain (labels ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProceduralSource {
    pub domain: ProceduralDomain,
    pub count: usize,
}

impl ImageSource for ProceduralSource {
    fn len(&self) -> usize {
        self.count
    }

    fn load(&self, index: usize) -> Result<RgbImage, DataError> {
        Ok(self.domain.sample(index as u64).0)
    }

    fn describe(&self) -> String {
        format!(
            "procedural {} domain (seed {}, {} tiles of {} px)",
            self.domain.shift.name(),
            self.domain.seed,
            self.count,
            self.domain.size
        )
    }

    fn path(&self, _index: usize) -> Option<PathBuf> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::super::build_batch;
    use super::super::tests::{procedural, small_spec};
    use super::*;

    #[test]
    fn folder_source_skips_corrupt_files() {
        let dir = tempfile::tempdir().unwrap();
        let domain = ProceduralDomain { size: 48, seed: 1, shift: Default::default() };
        for i in 0..5 {
            domain.sample(i).0.save(dir.path().join(format!("tile{i}.png"))).unwrap();
        }
        let garbage = dir.path().join("garbage.jpg");
        std::fs::write(&garbage, b"\xFF\xD8\xFF this is not a JPEG").unwrap();
        let source = FolderSource { list: ImageList::scan(dir.path()).unwrap() };
        assert_eq!(source.len(), 6);
        assert!(source.describe().contains("6 images"));
        assert_eq!(source.path(0), Some(source.list.items[0].path.clone()));
        assert!(source.load(99).is_err());

        let spec = small_spec(6);
        let batch = build_batch(&source, &spec, 0).unwrap();
        assert_eq!(batch.skipped.len(), 1);
        assert_eq!(batch.skipped[0].0, garbage);
        assert!(!batch.skipped[0].1.is_empty());
        assert_eq!(batch.globals.len(), 2 * 6 * 3 * 32 * 32);
        assert_eq!(batch.locals.len(), 3 * 6 * 3 * 16 * 16);
        assert!(batch.globals.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn procedural_source_matches_domain() {
        let s = procedural(7);
        assert_eq!(s.len(), 7);
        assert!(!s.is_empty());
        assert_eq!(s.load(3).unwrap(), s.domain.sample(3).0);
        assert_eq!(s.path(3), None);
        assert!(s.describe().contains("7 tiles of 48 px"));
    }
}
