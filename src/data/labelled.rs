//! Labelled image sets for evaluation: an ImageFolder tree (`root/<class>/<image>`) or a CSV
//! manifest (`path,label`), with class names kept in order, and seeded stratified
//! train/val/test splits that are saved with a run and read back.

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;

use super::DataError;
use super::folder::{ImageList, is_image_path};

fn invalid(reason: impl Into<String>) -> DataError {
    DataError::Invalid { reason: reason.into() }
}

/// Images with class indices into `classes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelledSet {
    pub items: Vec<(PathBuf, usize)>,
    pub classes: Vec<String>,
    /// Where it came from (a folder or a manifest), for messages and reports.
    pub origin: PathBuf,
}

impl LabelledSet {
    /// Reads `path`: a folder is an ImageFolder, a `.csv` file a manifest. `classes`, when
    /// given, fixes the class names and their order (labels outside it are an error);
    /// otherwise they are the sorted folder names or manifest labels.
    pub fn open(path: &Path, classes: Option<&[String]>) -> Result<Self, DataError> {
        if !path.exists() {
            return Err(DataError::NotFound { path: path.to_path_buf() });
        }
        let set = if path.is_dir() { Self::image_folder(path, classes)? } else { Self::manifest(path, classes)? };
        if set.classes.len() < 2 {
            return Err(invalid(format!("{}: a labelled set needs at least two classes, found {}", path.display(), set.classes.len())));
        }
        Ok(set)
    }

    /// `root/<class>/...` — every first-level folder is a class and must hold images; images
    /// directly in `root` are an error (they have no class).
    pub fn image_folder(root: &Path, classes: Option<&[String]>) -> Result<Self, DataError> {
        let mut folders = Vec::new();
        let mut loose = Vec::new();
        for entry in fs::read_dir(root).map_err(|e| DataError::io(root, e))? {
            let entry = entry.map_err(|e| DataError::io(root, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            if path.is_dir() {
                folders.push(name);
            } else if is_image_path(&path) {
                loose.push(path);
            }
        }
        folders.sort();
        if let Some(first) = loose.first() {
            return Err(invalid(format!(
                "{} is not an ImageFolder: {} image(s) lie directly in it (e.g. {}); put each image in a folder named after its class",
                root.display(),
                loose.len(),
                first.display()
            )));
        }
        if folders.is_empty() {
            return Err(invalid(format!(
                "{} has no class folders: a labelled folder holds one subfolder of images per class",
                root.display()
            )));
        }
        let names = match classes {
            Some(given) => {
                if let Some(extra) = folders.iter().find(|f| !given.contains(f)) {
                    return Err(invalid(format!(
                        "{}: folder `{extra}` is not one of the configured classes [{}]",
                        root.display(),
                        given.join(", ")
                    )));
                }
                given.to_vec()
            }
            None => folders.clone(),
        };
        let mut items = Vec::new();
        for (index, name) in names.iter().enumerate() {
            let dir = root.join(name);
            let list = match ImageList::scan(&dir) {
                Ok(list) => list,
                Err(DataError::NotFound { .. }) | Err(DataError::NoImages { .. }) => {
                    return Err(invalid(format!(
                        "class `{name}` has no images: {} is {}",
                        dir.display(),
                        if dir.exists() { "empty (no .jpg .jpeg .png .tif .tiff files)" } else { "missing" }
                    )));
                }
                Err(e) => return Err(e),
            };
            items.extend(list.items.into_iter().map(|i| (i.path, index)));
        }
        Ok(Self { items, classes: names, origin: root.to_path_buf() })
    }

    /// A CSV manifest (read with the `csv` crate: quoted fields may hold commas): one
    /// `path,label` row per image, an optional `path,label` header, `#` comment lines,
    /// relative paths resolved against the manifest's folder. Every file must exist.
    pub fn manifest(csv: &Path, classes: Option<&[String]>) -> Result<Self, DataError> {
        let bytes = fs::read(csv).map_err(|e| DataError::io(csv, e))?;
        let base = csv.parent().unwrap_or(Path::new("."));
        let records = super::table::parse(&bytes, Some(b'#')).map_err(|e| invalid(format!("{}: {e}", csv.display())))?;
        let mut rows = Vec::new();
        for record in records {
            let number = record.line;
            let line = record.fields.join(",");
            let (Some(path), Some(label), None) = (record.fields.first(), record.fields.get(1), record.fields.get(2)) else {
                return Err(invalid(format!("{} line {number}: expected `path,label`, found `{line}`", csv.display())));
            };
            if rows.is_empty() && path.eq_ignore_ascii_case("path") && label.eq_ignore_ascii_case("label") {
                continue;
            }
            if path.is_empty() || label.is_empty() {
                return Err(invalid(format!("{} line {number}: empty path or label in `{line}`", csv.display())));
            }
            rows.push((number, base.join(path), label.to_string()));
        }
        if rows.is_empty() {
            return Err(invalid(format!("{} lists no images (expected `path,label` rows)", csv.display())));
        }
        let names: Vec<String> = match classes {
            Some(given) => given.to_vec(),
            None => rows.iter().map(|r| r.2.clone()).collect::<BTreeSet<_>>().into_iter().collect(),
        };
        let mut items = Vec::with_capacity(rows.len());
        let mut missing = Vec::new();
        for (number, path, label) in rows {
            let Some(index) = names.iter().position(|c| *c == label) else {
                return Err(invalid(format!(
                    "{} line {number}: label `{label}` is not one of the classes [{}]",
                    csv.display(),
                    names.join(", ")
                )));
            };
            if !path.is_file() {
                missing.push(format!("line {number}: {}", path.display()));
            }
            items.push((path, index));
        }
        if !missing.is_empty() {
            return Err(invalid(format!(
                "{}: {} listed file(s) do not exist ({}{})",
                csv.display(),
                missing.len(),
                missing[..missing.len().min(3)].join("; "),
                if missing.len() > 3 { "; ..." } else { "" }
            )));
        }
        Ok(Self { items, classes: names, origin: csv.to_path_buf() })
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Images per class, in class order.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes.len()];
        for (_, label) in &self.items {
            counts[*label] += 1;
        }
        counts
    }
}

/// Which part of a labelled set an image belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Indices into a [`LabelledSet`] per split (each sorted).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Splits {
    pub train: Vec<usize>,
    pub val: Vec<usize>,
    pub test: Vec<usize>,
}

impl Splits {
    /// Stratified: each class is shuffled with `seed` and cut by `fractions` (train, val,
    /// test; they must sum to 1), at most `max_per_class` images of a class used (0: all).
    /// A split with a fraction > 0 gets at least one image of every class, so every class
    /// needs as many images as there are non-empty splits.
    pub fn stratified(set: &LabelledSet, fractions: [f64; 3], max_per_class: usize, seed: u64) -> Result<Self, DataError> {
        let sum: f64 = fractions.iter().sum();
        if fractions.iter().any(|f| !(*f >= 0.0)) || (sum - 1.0).abs() > 1e-6 || fractions[0] <= 0.0 {
            return Err(invalid(format!("split fractions {fractions:?} must be ≥ 0, sum to 1, and give the training split a share")));
        }
        let needed = fractions.iter().filter(|f| **f > 0.0).count();
        let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); set.classes.len()];
        for (i, (_, label)) in set.items.iter().enumerate() {
            by_class[*label].push(i);
        }
        let mut splits = Splits::default();
        for (class, mut indices) in by_class.into_iter().enumerate() {
            if indices.len() < needed {
                return Err(invalid(format!(
                    "class `{}` has {} image(s); the {needed} splits need at least one each",
                    set.classes[class],
                    indices.len()
                )));
            }
            let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed ^ (class as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            super::rng::shuffle(&mut indices, &mut rng);
            if max_per_class > 0 {
                indices.truncate(max_per_class.max(needed));
            }
            let n = indices.len();
            let share = |f: f64| if f > 0.0 { ((n as f64 * f).round() as usize).max(1) } else { 0 };
            let test = share(fractions[2]).min(n - needed + usize::from(fractions[2] > 0.0));
            let val = share(fractions[1]).min(n - test - 1);
            splits.test.extend(&indices[..test]);
            splits.val.extend(&indices[test..test + val]);
            splits.train.extend(&indices[test + val..]);
        }
        for part in [&mut splits.train, &mut splits.val, &mut splits.test] {
            part.sort_unstable();
        }
        Ok(splits)
    }

    /// Every index of a set of `len` images that is in neither the validation nor the test
    /// split (the training split and the images `max_per_class` left out), in set order.
    pub fn outside_held_out(&self, len: usize) -> Vec<usize> {
        let mut held_out = vec![false; len];
        for &i in self.val.iter().chain(&self.test) {
            held_out[i] = true;
        }
        (0..len).filter(|&i| !held_out[i]).collect()
    }

    pub fn get(&self, split: Split) -> &[usize] {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
            Split::Test => &self.test,
        }
    }

    /// `splits.csv`: `path,label,split` per image, in set order.
    pub fn save(&self, set: &LabelledSet, path: &Path) -> Result<(), DataError> {
        let mut which = vec![None; set.len()];
        for split in Split::ALL {
            for &i in self.get(split) {
                which[i] = Some(split);
            }
        }
        let header = ["path".to_string(), "label".to_string(), "split".to_string()];
        let rows = set.items.iter().zip(which).filter_map(|((file, label), split)| {
            Some([file.to_string_lossy().into_owned(), set.classes[*label].clone(), split?.to_string()])
        });
        let text = super::table::write(std::iter::once(header).chain(rows));
        fs::write(path, text).map_err(|e| DataError::io(path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &Path) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::RgbImage::from_pixel(4, 4, image::Rgb([1, 2, 3])).save(path).unwrap();
    }

    fn folder_set(per_class: &[usize]) -> (tempfile::TempDir, LabelledSet) {
        let dir = tempfile::tempdir().unwrap();
        for (c, n) in per_class.iter().enumerate() {
            for i in 0..*n {
                write_png(&dir.path().join(format!("class{c}/img{i}.png")));
            }
        }
        let set = LabelledSet::open(dir.path(), None).unwrap();
        (dir, set)
    }

    #[test]
    fn image_folder_keeps_class_order_and_rejects_empty_classes() {
        let (dir, set) = folder_set(&[3, 5]);
        assert_eq!(set.classes, ["class0", "class1"]);
        assert_eq!(set.class_counts(), [3, 5]);
        fs::create_dir_all(dir.path().join("class2")).unwrap();
        let err = LabelledSet::open(dir.path(), None).unwrap_err().to_string();
        assert!(err.contains("class `class2` has no images") && err.contains("class2"), "{err}");
        // Configured classes fix the order; an unknown folder is named.
        fs::remove_dir(dir.path().join("class2")).unwrap();
        let given = ["class1".to_string(), "class0".to_string()];
        let set = LabelledSet::open(dir.path(), Some(&given)).unwrap();
        assert_eq!(set.class_counts(), [5, 3]);
        let err = LabelledSet::open(dir.path(), Some(&given[..1])).unwrap_err().to_string();
        assert!(err.contains("`class0` is not one of the configured classes"), "{err}");
        write_png(&dir.path().join("loose.png"));
        let err = LabelledSet::open(dir.path(), None).unwrap_err().to_string();
        assert!(err.contains("not an ImageFolder"), "{err}");
    }

    #[test]
    fn manifest_reads_relative_paths_and_names_bad_rows() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a.png", "b.png", "sub/c.png", "d, with a comma.png"] {
            write_png(&dir.path().join(name));
        }
        let csv = dir.path().join("labels.csv");
        fs::write(&csv, "path,label\na.png,forest\nb.png,river\n# a comment\n\"sub/c.png\",forest\n\"d, with a comma.png\",river\n")
            .unwrap();
        let set = LabelledSet::open(&csv, None).unwrap();
        assert_eq!(set.classes, ["forest", "river"]);
        assert_eq!(set.items[2], (dir.path().join("sub/c.png"), 0));
        assert_eq!(set.items[3], (dir.path().join("d, with a comma.png"), 1));
        // Written splits quote such paths, and read back as a manifest they name the same files.
        let splits = Splits { train: vec![0, 1, 2, 3], val: vec![], test: vec![] };
        let saved = dir.path().join("splits.csv");
        splits.save(&set, &saved).unwrap();
        let text = fs::read_to_string(&saved).unwrap();
        assert!(text.contains("d, with a comma.png\",river,train"), "{text}");
        let records = crate::data::table::parse(text.as_bytes(), None).unwrap();
        assert_eq!(records[4].fields[0], dir.path().join("d, with a comma.png").to_string_lossy());

        let given = ["forest".to_string(), "sea".to_string()];
        let err = LabelledSet::open(&csv, Some(&given)).unwrap_err().to_string();
        assert!(err.contains("line 3: label `river` is not one of the classes [forest, sea]"), "{err}");
        fs::write(&csv, "a.png,forest\nnope.png,river\n").unwrap();
        let err = LabelledSet::open(&csv, None).unwrap_err().to_string();
        assert!(err.contains("1 listed file(s) do not exist") && err.contains("nope.png"), "{err}");
        fs::write(&csv, "a.png forest\n").unwrap();
        let err = LabelledSet::open(&csv, None).unwrap_err().to_string();
        assert!(err.contains("line 1: expected `path,label`"), "{err}");
        fs::write(&csv, "a.png,forest\nb.png,forest\n").unwrap();
        let err = LabelledSet::open(&csv, None).unwrap_err().to_string();
        assert!(err.contains("at least two classes"), "{err}");
        let err = LabelledSet::open(&dir.path().join("missing.csv"), None).unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
    }

    #[test]
    fn splits_are_stratified_seeded_and_disjoint() {
        let (dir, set) = folder_set(&[10, 20, 3]);
        let a = Splits::stratified(&set, [0.6, 0.2, 0.2], 0, 7).unwrap();
        assert_eq!(a, Splits::stratified(&set, [0.6, 0.2, 0.2], 0, 7).unwrap());
        assert_ne!(a, Splits::stratified(&set, [0.6, 0.2, 0.2], 0, 8).unwrap());
        let mut all: Vec<usize> = a.train.iter().chain(&a.val).chain(&a.test).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..set.len()).collect::<Vec<_>>());
        let count = |part: &[usize], class: usize| part.iter().filter(|&&i| set.items[i].1 == class).count();
        assert_eq!((count(&a.train, 1), count(&a.val, 1), count(&a.test, 1)), (12, 4, 4));
        // Each class appears in every split, even the smallest.
        for split in Split::ALL {
            assert_eq!(count(a.get(split), 2), 1, "{split}");
        }
        let capped = Splits::stratified(&set, [0.5, 0.0, 0.5], 4, 7).unwrap();
        assert_eq!(capped.train.len() + capped.test.len(), 4 + 4 + 3);
        assert!(capped.val.is_empty());
        // The unlabelled pool: the training split and every image the cap left out, never a
        // held-out one.
        let pool = capped.outside_held_out(set.len());
        assert_eq!(pool.len(), set.len() - capped.test.len());
        assert!(capped.train.iter().all(|i| pool.contains(i)) && !capped.test.iter().any(|i| pool.contains(i)));
        assert_eq!(a.outside_held_out(set.len()), a.train);
        let err = Splits::stratified(&set, [0.5, 0.2, 0.2], 0, 7).unwrap_err().to_string();
        assert!(err.contains("sum to 1"), "{err}");
        let (_d, tiny) = folder_set(&[2, 4]);
        let err = Splits::stratified(&tiny, [0.6, 0.2, 0.2], 0, 7).unwrap_err().to_string();
        assert!(err.contains("class `class0` has 2 image(s)"), "{err}");
        let file = dir.path().join("splits.csv");
        a.save(&set, &file).unwrap();
        let text = fs::read_to_string(&file).unwrap();
        assert_eq!(text.lines().count(), set.len() + 1);
        assert_eq!(text.lines().filter(|l| l.ends_with(",test")).count(), a.test.len());
    }
}
