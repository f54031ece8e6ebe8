//! The DINOv2 objective as ExPLoRA uses it: a student (the backbone under the adaptation plan
//! plus one shared DINO/iBOT head) against a teacher that is the EMA of the student.

use burn::module::Module;
use burn::tensor::{Bool, Device, Tensor};

use super::head::{DinoHead, HeadConfig};
use super::loss::{Centering, MaskedPatches, centered_softmax, dino_loss, ibot_loss, koleo, sinkhorn_knopp, update_center};
use crate::model::params::{map_selected_params, trainable_params};
use crate::model::{ForwardOptions, Vit};

/// Backbone + head; the student trains, the teacher (`valid()` copy) follows by EMA.
#[derive(Module, Debug)]
pub struct DinoModel {
    pub backbone: Vit,
    pub head: DinoHead,
}

impl DinoModel {
    pub fn new(backbone: Vit, head: &HeadConfig) -> Self {
        let device = backbone.device();
        let head = head.init(backbone.config().embed_dim, &device);
        Self { backbone, head }
    }
}

/// Loss weights, temperatures and centering (DINOv2 defaults).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossConfig {
    pub dino_weight: f64,
    pub ibot_weight: f64,
    pub koleo_weight: f64,
    pub centering: Centering,
    /// EMA momentum of the softmax-centering centers.
    pub center_momentum: f64,
    pub sinkhorn_iterations: usize,
    pub student_temp: f64,
    /// Teacher temperature: linear warm-up from the first to the second value over
    /// `teacher_temp_warmup_steps` optimizer steps, then constant.
    pub teacher_temp: [f64; 2],
    pub teacher_temp_warmup_steps: u64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            dino_weight: 1.0,
            ibot_weight: 1.0,
            koleo_weight: 0.1,
            centering: Centering::Softmax,
            center_momentum: 0.9,
            sinkhorn_iterations: 3,
            student_temp: 0.1,
            teacher_temp: [0.04, 0.07],
            // DINOv2: 30 "epochs" of 1250 iterations.
            teacher_temp_warmup_steps: 37_500,
        }
    }
}

/// Softmax-centering state (one center for CLS scores, one for patch scores).
#[derive(Debug, Clone)]
pub struct Centers {
    pub dino: Tensor<2>,
    pub ibot: Tensor<2>,
}

impl Centers {
    pub fn zeros(prototypes: usize, device: &Device) -> Self {
        Self { dino: Tensor::zeros([1, prototypes], device), ibot: Tensor::zeros([1, prototypes], device) }
    }
}

/// One step's inputs, already on the student's (autodiff) device.
pub struct StepInputs {
    /// `[G·B, 3, S, S]`, crop-major.
    pub globals: Tensor<4>,
    /// `[L·B, 3, s, s]`, crop-major, if there are local crops.
    pub locals: Option<Tensor<4>>,
    /// `[G·B, patches]`, true = replaced by the mask token in the student's view.
    pub masks: Tensor<2, Bool>,
    pub masked: MaskedPatches,
    pub batch: usize,
    pub global_crops: usize,
    pub local_crops: usize,
}

/// The loss (with autodiff) and its parts (plain floats are read by the caller when needed).
pub struct StepLoss {
    pub total: Tensor<1>,
    pub dino: Tensor<1>,
    pub ibot: Tensor<1>,
    pub koleo: Tensor<1>,
}

/// The student/teacher losses of one (micro-)batch; returns the loss and the updated centers.
pub fn step_loss(
    student: &DinoModel,
    teacher: &DinoModel,
    inputs: &StepInputs,
    centers: &Centers,
    config: &LossConfig,
    teacher_temp: f64,
) -> (StepLoss, Centers) {
    let b = inputs.batch;
    let (g, l) = (inputs.global_crops, inputs.local_crops);
    let device = inputs.globals.device();
    let zero = || Tensor::<1>::zeros([1], &device);

    // Student: masked global crops and the local crops in one backbone pass; one head pass
    // over all rows.
    let mut crops = vec![(inputs.globals.clone(), ForwardOptions { mask: Some(inputs.masks.clone()), ..Default::default() })];
    crops.extend(inputs.locals.iter().map(|locals| (locals.clone(), ForwardOptions::default())));
    let mut outputs = student.backbone.forward_crops(crops).into_iter();
    let s_global = outputs.next().expect("one output per crop size");
    let [gb, n, d] = s_global.patches.dims();
    let mut rows = vec![s_global.cls.clone()];
    rows.extend(outputs.map(|local| local.cls));
    let use_ibot = config.ibot_weight > 0.0;
    if use_ibot {
        rows.push(s_global.patches.clone().reshape([gb * n, d]).select(0, inputs.masked.index.clone()));
    }
    let scores = student.head.forward(Tensor::cat(rows, 0));
    let crops = g + l;
    let s_cls = scores.clone().narrow(0, 0, crops * b);

    // Teacher: unmasked global crops, no autodiff.
    let t_global = teacher.backbone.forward(inputs.globals.clone().inner(), ForwardOptions::default());
    let mut t_rows = vec![t_global.cls];
    if use_ibot {
        t_rows.push(t_global.patches.reshape([gb * n, d]).select(0, inputs.masked.index.clone().inner()));
    }
    let t_scores = teacher.head.forward(Tensor::cat(t_rows, 0));
    let t_cls = t_scores.clone().narrow(0, 0, gb);
    let valid = inputs.masked.valid.clone().inner();
    let (t_cls_p, t_patch_p, new_centers) = match config.centering {
        Centering::Softmax => {
            let cls_p = centered_softmax(t_cls.clone(), centers.dino.clone(), teacher_temp);
            let mut ibot_center = centers.ibot.clone();
            let patch_p = use_ibot.then(|| {
                let t_patch = t_scores.clone().narrow(0, gb, inputs.masked.index.dims()[0]);
                ibot_center = update_center(ibot_center.clone(), t_patch.clone(), Some(valid.clone()), config.center_momentum);
                centered_softmax(t_patch, centers.ibot.clone(), teacher_temp)
            });
            let dino_center = update_center(centers.dino.clone(), t_cls, None, config.center_momentum);
            (cls_p, patch_p, Centers { dino: dino_center, ibot: ibot_center })
        }
        Centering::SinkhornKnopp => {
            let it = config.sinkhorn_iterations;
            let cls_p = sinkhorn_knopp(t_cls, teacher_temp, it, None);
            let patch_p = use_ibot.then(|| {
                let t_patch = t_scores.clone().narrow(0, gb, inputs.masked.index.dims()[0]);
                sinkhorn_knopp(t_patch, teacher_temp, it, Some(valid.clone()))
            });
            (cls_p, patch_p, centers.clone())
        }
    };

    let dino = dino_loss(s_cls, t_cls_p.autodiff(), crops, g, config.student_temp);
    let ibot = match t_patch_p {
        Some(t_patch_p) => {
            let m = inputs.masked.index.dims()[0];
            let s_patch = scores.narrow(0, crops * b, m);
            ibot_loss(s_patch, t_patch_p.autodiff(), inputs.masked.weight.clone(), gb, config.student_temp)
        }
        None => zero(),
    };
    let koleo = if config.koleo_weight > 0.0 {
        // On each global crop's student CLS (before the head), summed over crops, as DINOv2.
        (0..g).map(|i| koleo(s_global.cls.clone().narrow(0, i * b, b))).reduce(|a, b| a + b).unwrap_or_else(zero)
    } else {
        zero()
    };
    let total = dino.clone().mul_scalar(config.dino_weight)
        + ibot.clone().mul_scalar(config.ibot_weight)
        + koleo.clone().mul_scalar(config.koleo_weight);
    (StepLoss { total, dino: dino.detach(), ibot: ibot.detach(), koleo: koleo.detach() }, new_centers)
}

/// Moves the teacher towards the student: `t ← m·t + (1 − m)·s` for every parameter the
/// student trains (the others are identical in both and stay shared).
pub fn ema_update(teacher: DinoModel, student: &DinoModel, momentum: f64) -> DinoModel {
    let source = trainable_params(student);
    map_selected_params(
        teacher,
        |name| source.contains_key(name),
        |name, t| source.get(name).map(|s| t.mul_scalar(momentum) + s.clone().mul_scalar(1.0 - momentum)),
    )
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use burn::tensor::{Distribution, TensorData};

    use super::*;
    use crate::model::params::{accumulate_grads, sign_descent};
    use crate::model::{VitConfig, to_vec};

    #[test]
    fn the_student_learns_to_predict_a_fixed_teacher() {
        // Sinkhorn-Knopp targets of a fixed teacher (the student's own start), cross-view.
        let device = Device::flex();
        let ad = device.clone().autodiff();
        ad.seed(1);
        let vit = VitConfig::preset("tiny").unwrap();
        let mut student = DinoModel::new(vit.init(&ad), &HeadConfig { layers: 3, hidden: 128, bottleneck: 32, prototypes: 16 });
        let teacher = student.valid();
        let (b, s) = (8, 32);
        let n = (s / vit.patch_size) * (s / vit.patch_size);
        // Both global "crops" of an image are the image itself: the student can learn to predict
        // the teacher's assignment of the other view.
        // Distinct images: a colour of their own plus a little noise.
        let colours = Tensor::<4>::random([b, 3, 1, 1], Distribution::Normal(0.0, 1.5), &ad);
        let images = Tensor::<4>::random([b, 3, s, s], Distribution::Normal(0.0, 0.3), &ad) + colours.expand([b, 3, s, s]);
        let globals = Tensor::cat(vec![images.clone(), images], 0);
        let masks = vec![false; 2 * b * n];
        let inputs = StepInputs {
            globals,
            locals: None,
            masks: Tensor::<2>::from_data(TensorData::new(vec![0f32; 2 * b * n], [2 * b, n]), &ad).greater_elem(0.5),
            masked: MaskedPatches::new(&masks, n, 1, &ad),
            batch: b,
            global_crops: 2,
            local_crops: 0,
        };
        let config = LossConfig { ibot_weight: 0.0, koleo_weight: 0.0, centering: Centering::SinkhornKnopp, ..Default::default() };
        let centers = Centers::zeros(16, &device);
        let mut losses = Vec::new();
        for _ in 0..100 {
            let (loss, _) = step_loss(&student, &teacher.clone().train(), &inputs, &centers, &config, 0.04);
            losses.push(to_vec(loss.dino.clone().inner())[0]);
            let backward = loss.total.backward();
            let mut grads = HashMap::new();
            accumulate_grads(&student, &backward, &mut grads);
            student = sign_descent(student, &grads, 1e-4);
        }
        // The SK targets are balanced over the prototypes while the fresh student prefers a few,
        // so it starts above ln K; learning brings it below ln K (a student that gave up and
        // predicted uniformly would sit at ln K). Over device seeds 1-20 it started at 3.14-5.33
        // and ended at 2.50-2.74 (ln K = 2.77), at least 0.48 below its start (session 13's CPU
        // kernels; 150 steps end within 0.01 of 100 steps, so more steps would not help). The
        // seed fixes the draws only when no other test draws from the CPU backend's one
        // generator at the same time, so the margins hold for every start seen, not only seed
        // 1's: one run in ~40 of the whole suite ended above the earlier margin of ln K − 0.03.
        let ln_k = 16f32.ln();
        assert!(losses[0] > ln_k && losses[99] < ln_k - 0.01 && losses[99] < losses[0] - 0.3, "ln K = {ln_k}: {losses:?}");
    }
}
