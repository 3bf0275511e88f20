//! The gradients a step exchanges between ranks.

use tch::Tensor;

/// Each variable's gradient, created as zeros where this rank's backward did not reach it (a
/// rank with no queries of its own), so every rank all-reduces the same tensors.
pub(super) fn defined_grads(vars: &[Tensor]) -> Vec<Tensor> {
    let missing: Vec<&Tensor> = vars.iter().filter(|v| !v.grad().defined()).collect();
    if !missing.is_empty() {
        let zero = missing
            .iter()
            .map(|v| (*v * 0.0).sum(v.kind()))
            .reduce(|a, b| a + b)
            .expect("not empty");
        zero.backward();
    }
    vars.iter().map(|v| v.grad()).collect()
}
