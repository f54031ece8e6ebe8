//! The named set that keeps the WGSL path (burn's wgpu backend) covered: a real GPU when
//! there is one, otherwise Mesa's software Vulkan. Everything else runs on the CPU backend;
//! these check that both backends compute the same thing. (The app tests also run the
//! heatmap shader through wgpu.)

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use explora::checkpoint::load_backbone;
use explora::model::ForwardOptions;
use explora::objectives::{Centers, LossConfig, step_loss};

use crate::common::*;

/// Max |a − b| / max(|b|, 1e-3 scale): relative to the reference's magnitude.
fn relative_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
    max_abs_diff(a, b) / scale
}

#[test]
fn wgsl_forward_matches_transformers_and_the_cpu_backend() {
    let fixture = fixtures().join("dinov2_hf_tiny");
    let inputs = read(fixtures().join("inputs.safetensors"));
    let expected = read(fixture.join("expected.safetensors"));
    let run = |device: &Device| {
        let (model, _) = load_backbone(&fixture.join("model.safetensors"), device).unwrap();
        let out = model.forward(tensor(&inputs["x48"], device), ForwardOptions::default());
        (values(out.cls).1, values(out.patches).1)
    };
    let (gpu_cls, gpu_patches) = run(&wgpu_device());
    let (cpu_cls, cpu_patches) = run(&device());
    assert!(max_abs_diff(&gpu_cls, &expected["x48.cls"].data) <= 1e-4, "WGSL vs transformers (cls)");
    assert!(max_abs_diff(&gpu_patches, &expected["x48.patches"].data) <= 1e-4, "WGSL vs transformers (patches)");
    let (c, p) = (relative_diff(&cpu_cls, &gpu_cls), relative_diff(&cpu_patches, &gpu_patches));
    assert!(c <= 1e-4 && p <= 1e-4, "CPU vs WGSL features differ: cls {c:e}, patches {p:e} (relative)");
}

#[test]
fn wgsl_pretraining_step_loss_matches_the_cpu_backend() {
    // The same weights and inputs on both devices: made on the CPU, copied over as data.
    let cpu = device();
    let (student, _) = crate::pretrain::tiny_student(&cpu.clone().autodiff());
    let x = crate::pretrain::inputs(&cpu.clone().autodiff(), 4);
    let loss_on = |device: &Device| {
        let ad = device.clone().autodiff();
        // `fork` keeps which parameters train (`to_device` would not).
        let student = student.clone().fork(&ad);
        let teacher = student.valid();
        let inputs = explora::objectives::StepInputs {
            globals: Tensor::from_data(x.globals.to_data(), &ad),
            locals: x.locals.as_ref().map(|l| Tensor::from_data(l.to_data(), &ad)),
            masks: Tensor::from_data(x.masks.to_data(), &ad),
            masked: explora::objectives::MaskedPatches {
                index: Tensor::from_data(x.masked.index.to_data(), &ad),
                weight: Tensor::from_data(x.masked.weight.to_data(), &ad),
                valid: Tensor::from_data(x.masked.valid.to_data(), &ad),
                count: x.masked.count,
            },
            batch: x.batch,
            global_crops: x.global_crops,
            local_crops: x.local_crops,
        };
        let (loss, _) = step_loss(&student, &teacher, &inputs, &Centers::zeros(32, device), &LossConfig::default(), 0.04);
        let read = |t: Tensor<1>| t.into_scalar::<f32>();
        // The backward pass runs on both devices too.
        let grads = loss.total.backward();
        let qkv = student.backbone.blocks[3].attn.qkv.weight.val().grad(&grads).expect("a gradient");
        (read(loss.total.detach()), values(qkv).1)
    };
    let (cpu_loss, cpu_grad) = loss_on(&cpu);
    let (gpu_loss, gpu_grad) = loss_on(&wgpu_device());
    assert!(cpu_loss.is_finite() && cpu_loss > 0.0);
    let rel = (cpu_loss - gpu_loss).abs() / gpu_loss.abs();
    assert!(rel <= 1e-4, "one pre-training step's loss: CPU {cpu_loss} vs WGSL {gpu_loss} ({rel:e} relative)");
    let g = relative_diff(&cpu_grad, &gpu_grad);
    assert!(g <= 1e-3, "unfrozen block's qkv gradient: CPU vs WGSL differ by {g:e} (relative)");
}
