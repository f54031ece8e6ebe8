//! Walking a module's float parameters by path (`backbone.blocks.3.attn.lora_q.a`), flattened
//! to 1-D: the plumbing behind the EMA teacher, the optimizer and training checkpoints.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Gradients, Tensor};

/// The dotted path of the module a visitor or mapper is in.
pub(crate) struct Path(Vec<String>);

impl Path {
    pub(crate) fn new() -> Self {
        Self(Vec::new())
    }
    pub(crate) fn enter(&mut self, name: &str) {
        self.0.push(name.to_string());
    }
    pub(crate) fn exit(&mut self) {
        self.0.pop();
    }
    pub(crate) fn name(&self) -> String {
        self.0.join(".")
    }
}

fn flat<const D: usize>(t: Tensor<D>) -> Tensor<1> {
    let n = t.shape().num_elements();
    t.reshape([n])
}

struct Visit<'a, F> {
    path: Path,
    /// Skip (and do not flatten) the frozen parameters.
    trainable_only: bool,
    f: &'a mut F,
}

impl<F: FnMut(&str, Tensor<1>, bool)> ModuleVisitor for Visit<'_, F> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val();
        let trainable = t.is_require_grad();
        if trainable || !self.trainable_only {
            (self.f)(&self.path.name(), flat(t.inner()), trainable);
        }
    }
}

/// Calls `f(path, values, trainable)` for every float parameter; `values` is the flattened
/// tensor without autodiff.
pub fn for_each_param<M: Module>(module: &M, mut f: impl FnMut(&str, Tensor<1>, bool)) {
    module.visit(&mut Visit { path: Path::new(), trainable_only: false, f: &mut f });
}

/// The trainable (`require_grad`) parameters of `module`, by path, flattened, without autodiff.
pub fn trainable_params<M: Module>(module: &M) -> HashMap<String, Tensor<1>> {
    let mut out = HashMap::new();
    let mut f = |name: &str, t, _| {
        out.insert(name.to_string(), t);
    };
    module.visit(&mut Visit { path: Path::new(), trainable_only: true, f: &mut f });
    out
}

struct Map<'a, S, F> {
    path: Path,
    select: &'a S,
    f: &'a mut F,
}

impl<S: Fn(&str) -> bool, F: FnMut(&str, Tensor<1>) -> Option<Tensor<1>>> ModuleMapper for Map<'_, S, F> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let name = self.path.name();
        if !(self.select)(&name) {
            return param;
        }
        let (id, tensor, mapper) = param.consume();
        let dims = tensor.dims();
        let (autodiff, require_grad) = (tensor.is_autodiff(), tensor.is_require_grad());
        let Some(new) = (self.f)(&name, flat(tensor.clone().inner())) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let mut new: Tensor<D> = new.inner().reshape(dims);
        if autodiff {
            new = new.autodiff();
        }
        if require_grad {
            new = new.require_grad();
        }
        Param::from_mapped_value(id, new, mapper)
    }
}

/// Replaces parameters: `f(path, current)` returns the new flattened values (same length, on
/// the parameter's device) or `None` to keep the parameter. Autodiff and `require_grad` are
/// kept as they were.
pub fn map_params<M: Module>(module: M, f: impl FnMut(&str, Tensor<1>) -> Option<Tensor<1>>) -> M {
    map_selected_params(module, |_| true, f)
}

/// [`map_params`] over the parameters whose path `select` accepts; the others are not read.
/// Flattening a parameter stored in another memory order (see
/// [`crate::model::backward_friendly_layout`]) copies it, so a step that updates a few
/// parameters should not flatten the frozen ones.
pub fn map_selected_params<M: Module>(
    module: M,
    select: impl Fn(&str) -> bool,
    mut f: impl FnMut(&str, Tensor<1>) -> Option<Tensor<1>>,
) -> M {
    module.map(&mut Map { path: Path::new(), select: &select, f: &mut f })
}

/// Sign descent, `p ← p − lr·sign(g)` for every parameter with a gradient: the optimizer of
/// unit tests that check an objective learns (Adam's first steps move by about this much), so
/// that they need nothing from `optim`.
#[cfg(test)]
pub(crate) fn sign_descent<M: Module>(module: M, grads: &std::collections::HashMap<String, Tensor<1>>, lr: f64) -> M {
    map_params(module, |path, p| grads.get(path).map(|g| p - g.clone().sign().mul_scalar(lr)))
}

struct Grads<'a> {
    path: Path,
    grads: &'a Gradients,
    out: &'a mut HashMap<String, Tensor<1>>,
}

impl ModuleVisitor for Grads<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = param.val().grad(self.grads) {
            let g = flat(g);
            let name = self.path.name();
            let sum = match self.out.remove(&name) {
                Some(previous) => previous + g,
                None => g,
            };
            self.out.insert(name, sum);
        }
    }
}

/// Adds the gradients of `module`'s parameters in `grads` to `into` (by path, flattened):
/// called once per micro-batch, it accumulates.
pub fn accumulate_grads<M: Module>(module: &M, grads: &Gradients, into: &mut HashMap<String, Tensor<1>>) {
    module.visit(&mut Grads { path: Path::new(), grads, out: into });
}

/// Reads a float tensor back to the host as `f32`.
pub fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 tensor data")
}
