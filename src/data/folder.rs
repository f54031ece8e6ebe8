//! Image folders: recursive scanning (optionally in ImageFolder `root/<class>/...` layout),
//! robust decoding to RGB8, and a report of the files that could not be read.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use image::RgbImage;

use super::{DataError, IMAGE_EXTENSIONS};

/// One image file, with its class index when the folder has an ImageFolder layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageItem {
    pub path: PathBuf,
    pub label: Option<usize>,
}

/// The images found under a root folder, sorted by path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageList {
    pub root: PathBuf,
    pub items: Vec<ImageItem>,
    /// Class names (sorted) when every image lies in a first-level subfolder; empty otherwise.
    pub classes: Vec<String>,
}

/// Whether `path` has one of the recognised image extensions (case-insensitive).
pub fn is_image_path(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

fn is_hidden(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))
}

/// Collects image files under `dir` into `out`. Symlinks are followed, but every directory is
/// visited once (by canonical path), so symlink loops terminate. Hidden entries are skipped.
fn walk(dir: &Path, visited: &mut HashSet<PathBuf>, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    let canonical = fs::canonicalize(dir).map_err(|e| DataError::io(dir, e))?;
    if !visited.insert(canonical) {
        return Ok(());
    }
    let entries = fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let path = entry.path();
        if is_hidden(&path) {
            continue;
        }
        // `metadata` follows symlinks; a dangling link is silently ignored.
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            walk(&path, visited, out)?;
        } else if meta.is_file() && is_image_path(&path) {
            out.push(path);
        }
    }
    Ok(())
}

impl ImageList {
    /// Recursively finds the images under `root` (or takes `root` itself if it is an image file).
    ///
    /// If every image lies below a first-level subfolder, the folder is read as an ImageFolder:
    /// `classes` are the sorted names of the first-level subfolders holding images and each
    /// item's label is the index of its subfolder. Otherwise items are unlabelled.
    pub fn scan(root: &Path) -> Result<ImageList, DataError> {
        let meta = match fs::metadata(root) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DataError::NotFound { path: root.to_path_buf() });
            }
            Err(e) => return Err(DataError::io(root, e)),
        };
        if meta.is_file() {
            if is_image_path(root) {
                return Ok(ImageList {
                    root: root.to_path_buf(),
                    items: vec![ImageItem { path: root.to_path_buf(), label: None }],
                    classes: Vec::new(),
                });
            }
            return Err(DataError::NoImages { path: root.to_path_buf() });
        }

        let mut paths = Vec::new();
        walk(root, &mut HashSet::new(), &mut paths)?;
        if paths.is_empty() {
            return Err(DataError::NoImages { path: root.to_path_buf() });
        }
        paths.sort();
        paths.dedup();

        // First-level directory of each image, if it lies below one.
        let class_of = |p: &Path| -> Option<String> {
            let rel = p.strip_prefix(root).ok()?;
            let mut comps = rel.components();
            let first = comps.next()?;
            comps.next()?; // the image must not be directly in root
            Some(first.as_os_str().to_string_lossy().into_owned())
        };
        let dirs: Vec<Option<String>> = paths.iter().map(|p| class_of(p)).collect();

        let (classes, items) = if dirs.iter().all(Option::is_some) {
            let mut classes: Vec<String> = dirs.iter().flatten().cloned().collect();
            classes.sort();
            classes.dedup();
            let items = paths
                .into_iter()
                .zip(dirs)
                .map(|(path, dir)| {
                    let dir = dir.expect("checked above");
                    let label = classes.binary_search(&dir).ok();
                    ImageItem { path, label }
                })
                .collect();
            (classes, items)
        } else {
            let items = paths.into_iter().map(|path| ImageItem { path, label: None }).collect();
            (Vec::new(), items)
        };

        Ok(ImageList { root: root.to_path_buf(), items, classes })
    }

    /// An unlabelled list of the given paths, in the given order; `root` is their deepest
    /// common ancestor directory (empty if none).
    pub fn from_paths(paths: Vec<PathBuf>) -> ImageList {
        let mut root: Option<PathBuf> = None;
        for p in &paths {
            let parent = p.parent().map(Path::to_path_buf).unwrap_or_default();
            root = Some(match root {
                None => parent,
                Some(r) => r.components().zip(parent.components()).take_while(|(a, b)| a == b).map(|(a, _)| a).collect(),
            });
        }
        ImageList {
            root: root.unwrap_or_default(),
            items: paths.into_iter().map(|path| ImageItem { path, label: None }).collect(),
            classes: Vec::new(),
        }
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the list holds no image.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The image paths, in order.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.items.iter().map(|i| i.path.clone()).collect()
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

/// Whether a JPEG's data ends properly: an end-of-image marker after the last start-of-scan.
/// (Inside entropy-coded data 0xFF is always stuffed, so the marker cannot occur by chance.)
fn jpeg_has_end(bytes: &[u8]) -> bool {
    let last_scan = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    match last_scan {
        Some(i) => bytes[i..].windows(2).any(|w| w == [0xFF, 0xD9]),
        None => true, // no scan at all: let the decoder report it
    }
}

/// Decodes an image file (format guessed from its content, else its extension) to RGB8,
/// converting grey, alpha and 16-bit/float images. Corrupt, truncated or unsupported files give
/// [`DataError::Decode`]; a file that cannot be read gives [`DataError::Io`].
pub fn decode_rgb(path: &Path) -> Result<RgbImage, DataError> {
    let decode_err = |reason: &str| DataError::Decode { path: path.to_path_buf(), reason: reason.trim().to_string() };
    let bytes = fs::read(path).map_err(|e| DataError::io(path, e))?;
    if bytes.is_empty() {
        return Err(decode_err("file is empty"));
    }
    let mut reader = image::ImageReader::new(std::io::Cursor::new(&bytes[..]));
    if let Ok(format) = image::ImageFormat::from_path(path) {
        reader.set_format(format);
    }
    let reader = reader.with_guessed_format().map_err(|e| DataError::io(path, e))?;
    match reader.format() {
        None => return Err(decode_err("unrecognised image format")),
        // The JPEG decoder silently fills in missing data; treat truncation as an error.
        Some(image::ImageFormat::Jpeg) if !jpeg_has_end(&bytes) => {
            return Err(decode_err("truncated JPEG (no end-of-image marker)"));
        }
        Some(_) => {}
    }
    // Decoders are not supposed to panic on bad input; this is a last line of defence.
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reader.decode()))
        .map_err(|p| decode_err(&format!("decoder panicked: {}", panic_message(p.as_ref()))))?;
    match decoded {
        Ok(img) if img.width() == 0 || img.height() == 0 => Err(decode_err("image has zero width or height")),
        Ok(img) => Ok(img.into_rgb8()),
        Err(e) => Err(decode_err(&e.to_string())),
    }
}

/// Files that were skipped because they could not be read, in the order they were met.
#[derive(Debug, Default, Clone)]
pub struct SkipReport {
    pub skipped: Vec<(PathBuf, String)>,
}

impl SkipReport {
    /// How many names [`SkipReport::summary`] lists before "and N more".
    pub const MAX_LISTED: usize = 10;

    /// Records a skipped file and why.
    pub fn record(&mut self, path: impl Into<PathBuf>, reason: impl Into<String>) {
        self.skipped.push((path.into(), reason.into()));
    }

    /// Number of skipped files.
    pub fn count(&self) -> usize {
        self.skipped.len()
    }

    /// One line for the user, e.g. `skipped 2 unreadable images: a.jpg (reason), b.png (reason)`;
    /// `None` when nothing was skipped.
    pub fn summary(&self) -> Option<String> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let listed: Vec<String> = self.skipped.iter().take(Self::MAX_LISTED).map(|(p, r)| format!("{} ({r})", p.display())).collect();
        let mut s = format!("skipped {n} unreadable image{}: {}", if n == 1 { "" } else { "s" }, listed.join(", "));
        if n > Self::MAX_LISTED {
            s.push_str(&format!(" and {} more", n - Self::MAX_LISTED));
        }
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageBuffer, Luma, Rgb, Rgba};

    fn write_png(path: &Path, color: [u8; 3]) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        RgbImage::from_pixel(8, 6, Rgb(color)).save(path).unwrap();
    }

    fn jpeg_bytes() -> Vec<u8> {
        let img = RgbImage::from_fn(32, 32, |x, y| Rgb([(x * 8) as u8, (y * 8) as u8, 128]));
        let mut buf = std::io::Cursor::new(Vec::new());
        img.write_to(&mut buf, image::ImageFormat::Jpeg).unwrap();
        buf.into_inner()
    }

    #[test]
    fn scan_imagefolder_layout_sorted_classes_and_labels() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write_png(&root.join("water/b.png"), [0, 0, 255]);
        write_png(&root.join("water/a.PNG"), [0, 0, 255]);
        write_png(&root.join("forest/deep/x.png"), [0, 90, 0]);
        write_png(&root.join("city/1.png"), [90, 90, 90]);
        fs::write(root.join("forest/readme.txt"), "not an image").unwrap();
        fs::write(root.join("forest/.hidden.png"), "hidden").unwrap();
        fs::create_dir_all(root.join("empty")).unwrap();
        fs::write(root.join("empty/notes.md"), "x").unwrap();

        let list = ImageList::scan(root).unwrap();
        assert_eq!(list.classes, vec!["city", "forest", "water"]);
        assert_eq!(list.len(), 4);
        assert!(!list.is_empty());
        let got: Vec<(String, Option<usize>)> = list
            .items
            .iter()
            .map(|i| {
                let rel = i.path.strip_prefix(root).unwrap();
                (rel.to_string_lossy().replace('\\', "/"), i.label)
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("city/1.png".to_string(), Some(0)),
                ("forest/deep/x.png".to_string(), Some(1)),
                ("water/a.PNG".to_string(), Some(2)),
                ("water/b.png".to_string(), Some(2)),
            ]
        );
    }

    #[test]
    fn scan_flat_folder_is_unlabelled() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write_png(&root.join("top.png"), [1, 2, 3]);
        write_png(&root.join("sub/inner.tif"), [1, 2, 3]);
        fs::write(root.join("photo.JPEG"), jpeg_bytes()).unwrap();
        fs::write(root.join("data.csv"), "a,b").unwrap();
        let list = ImageList::scan(root).unwrap();
        assert!(list.classes.is_empty());
        assert_eq!(list.len(), 3);
        assert!(list.items.iter().all(|i| i.label.is_none()));
        let mut sorted = list.paths();
        sorted.sort();
        assert_eq!(sorted, list.paths());
    }

    #[test]
    fn scan_errors_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = ImageList::scan(&missing).unwrap_err();
        assert!(matches!(err, DataError::NotFound { .. }));
        assert!(err.to_string().contains("nope") && err.to_string().contains("does not exist"));

        fs::write(dir.path().join("a.txt"), "x").unwrap();
        let err = ImageList::scan(dir.path()).unwrap_err();
        assert!(matches!(err, DataError::NoImages { .. }));
        assert!(err.to_string().contains(".tiff"));
    }

    #[cfg(unix)]
    #[test]
    fn scan_survives_symlink_loops() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write_png(&root.join("a/x.png"), [1, 2, 3]);
        std::os::unix::fs::symlink(root, root.join("a/loop")).unwrap();
        let list = ImageList::scan(root).unwrap();
        assert_eq!(list.len(), 1);
    }

    #[test]
    fn scan_single_file_and_from_paths() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("one.png");
        write_png(&p, [1, 2, 3]);
        let list = ImageList::scan(&p).unwrap();
        assert_eq!(list.paths(), vec![p.clone()]);

        let l = ImageList::from_paths(vec![PathBuf::from("/d/x/a.png"), PathBuf::from("/d/y/b.png")]);
        assert_eq!(l.root, PathBuf::from("/d"));
        assert_eq!(l.len(), 2);
        assert!(l.classes.is_empty() && l.items.iter().all(|i| i.label.is_none()));
        assert!(ImageList::from_paths(Vec::new()).is_empty());
    }

    #[test]
    fn decode_converts_colour_types() {
        let dir = tempfile::tempdir().unwrap();
        let gray = dir.path().join("g.png");
        ImageBuffer::from_pixel(4, 3, Luma([200u8])).save(&gray).unwrap();
        let img = decode_rgb(&gray).unwrap();
        assert_eq!(img.dimensions(), (4, 3));
        assert_eq!(img.get_pixel(1, 1).0, [200, 200, 200]);

        let rgba = dir.path().join("a.png");
        ImageBuffer::from_pixel(2, 2, Rgba([10u8, 20, 30, 40])).save(&rgba).unwrap();
        assert_eq!(decode_rgb(&rgba).unwrap().get_pixel(0, 0).0, [10, 20, 30]);

        let tif16 = dir.path().join("s.tiff");
        ImageBuffer::<Rgb<u16>, _>::from_pixel(3, 3, Rgb([65535u16, 0, 32896])).save(&tif16).unwrap();
        assert_eq!(decode_rgb(&tif16).unwrap().get_pixel(2, 2).0, [255, 0, 128]);

        // Content wins over a wrong extension.
        let jpg_as_png = dir.path().join("really_jpeg.png");
        fs::write(&jpg_as_png, jpeg_bytes()).unwrap();
        assert_eq!(decode_rgb(&jpg_as_png).unwrap().dimensions(), (32, 32));

        // Trailing bytes after the end-of-image marker (common in camera files) are fine.
        let trailing = dir.path().join("trailing.jpg");
        let mut bytes = jpeg_bytes();
        bytes.extend_from_slice(b"trailing metadata");
        fs::write(&trailing, bytes).unwrap();
        assert_eq!(decode_rgb(&trailing).unwrap().dimensions(), (32, 32));
    }

    #[test]
    fn corrupt_files_give_decode_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let jpeg = jpeg_bytes();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("truncated.jpg", jpeg[..jpeg.len() / 3].to_vec()),
            ("truncated_late.jpg", jpeg[..jpeg.len() - 10].to_vec()),
            ("header_only.jpg", jpeg[..20].to_vec()),
            ("empty.png", Vec::new()),
            ("text.png", b"this is not a png at all\n".to_vec()),
            ("text.tif", b"neither is this a tiff".to_vec()),
            ("garbage.jpeg", vec![0xFF, 0xD8, 0xFF, 0x00, 0x13, 0x37]),
        ];
        for (name, bytes) in cases {
            let path = dir.path().join(name);
            fs::write(&path, bytes).unwrap();
            let err = decode_rgb(&path).unwrap_err();
            assert!(matches!(err, DataError::Decode { .. }), "{name}: {err:?}");
            let msg = err.to_string();
            assert!(msg.contains(name), "{msg}");
            assert!(!err.reason().is_empty() && !msg.ends_with('\n'));
        }
        let err = decode_rgb(&dir.path().join("missing.png")).unwrap_err();
        assert!(matches!(err, DataError::Io { .. }));
        assert!(err.to_string().contains("missing.png"));
    }

    #[test]
    fn skip_report_summary() {
        let mut r = SkipReport::default();
        assert_eq!(r.summary(), None);
        r.record("a.jpg", "truncated");
        assert_eq!(r.summary().unwrap(), "skipped 1 unreadable image: a.jpg (truncated)");
        r.record(PathBuf::from("b.png"), "bad signature".to_string());
        assert_eq!(r.count(), 2);
        assert_eq!(r.summary().unwrap(), "skipped 2 unreadable images: a.jpg (truncated), b.png (bad signature)");
        for i in 0..11 {
            r.record(format!("x{i}.png"), "bad");
        }
        let s = r.summary().unwrap();
        assert!(s.starts_with("skipped 13 unreadable images: a.jpg (truncated)"));
        assert!(s.contains("x7.png (bad)") && !s.contains("x8.png"));
        assert!(s.ends_with(" and 3 more"), "{s}");
    }
}
