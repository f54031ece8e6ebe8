//! Self-supervised objectives, which ExPLoRA continues on a new domain: the DINO/iBOT head and
//! losses, KoLeo, centering (softmax and Sinkhorn-Knopp) and the EMA teacher of DINOv2; MAE's
//! masking, decoder and reconstruction loss ([`mae`]); UpStep's k-means centres, swapped
//! prediction and centroid regulariser ([`upstep`], an interpretation of the paper's abstract).

mod dino;
mod head;
mod loss;
pub mod mae;
pub mod upstep;

pub use dino::{Centers, DinoModel, LossConfig, StepInputs, StepLoss, ema_update, step_loss};
pub use head::{DinoHead, HeadConfig};
pub use loss::{Centering, MaskedPatches, centered_softmax, dino_loss, ibot_loss, koleo, sinkhorn_knopp, update_center};
