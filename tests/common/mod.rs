//! Helpers shared by the integration tests.

use tch::{nn, Kind};

/// The worst per-tensor gradient error between two twin stores, with its name:
/// ‖a − b‖ / max(‖b‖, 1e-3·G), G the norm of all of `b`'s gradients (architecture.md: a conv
/// bias before BatchNorm has a true gradient of 0, so a plain relative error would be noise).
/// A parameter with a gradient in `b` but none in `a` counts as infinitely wrong.
pub fn worst_grad_error(a: &nn::VarStore, b: &nn::VarStore) -> (f64, String) {
    let (va, vb) = (a.variables(), b.variables());
    let total = vb
        .values()
        .filter(|t| t.grad().defined())
        .map(|t| {
            t.grad()
                .pow_tensor_scalar(2)
                .sum(Kind::Double)
                .double_value(&[])
        })
        .sum::<f64>()
        .sqrt();
    let mut worst = (0.0, String::new());
    for (name, tb) in &vb {
        let gb = tb.grad();
        if !gb.defined() {
            continue;
        }
        let ga = va[name].grad();
        let err = if ga.defined() {
            (&ga - &gb).norm().double_value(&[]) / gb.norm().double_value(&[]).max(1e-3 * total)
        } else {
            f64::INFINITY
        };
        if err > worst.0 {
            worst = (err, name.clone());
        }
    }
    worst
}
