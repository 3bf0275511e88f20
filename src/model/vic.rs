//! The VIC regulariser's variance and covariance terms (fsct-reference.md Decisions §6, §9A),
//! on the support embeddings of the same forward.

use std::sync::Once;
use tch::Tensor;

static ONE_SHOT_WARNING: Once = Once::new();

/// L_V = mean over (class, dim) of ReLU(1 − √(var_unbiased + 1e-4)), the variance taken over
/// the shot axis of `support` (n, k, d).
///
/// Unlike the official form (`torch.std`, NaN at 1-shot), a 1-shot episode gives 0, with a
/// one-time warning: one sample has no spread to regularise.
pub fn variance_term(support: &Tensor) -> Tensor {
    let k = support.size()[1];
    if k < 2 {
        ONE_SHOT_WARNING.call_once(|| {
            tracing::warn!("lambda_V > 0 with 1-shot episodes: the variance term is 0 (one shot has no variance)")
        });
        return Tensor::zeros([], (support.kind(), support.device()));
    }
    let var = support.var_dim(&[1i64][..], true, false);
    let std = (var + 1e-4).sqrt();
    (-std + 1.0).relu().mean(support.kind())
}

/// L_C = (Σ C² − Σ diag(C)²) / (d(d−1)), C = Zcᵀ Zc / (N−1) the covariance of the centred
/// rows of `z` (N, d).
///
/// Unlike the official code this never builds the d×d matrix C (2.35 GiB at d = 25088): with
/// the N×N Gram matrix G = Zc Zcᵀ, Σ C² = ‖G‖²_F / (N−1)² and
/// Σ diag(C)² = Σ_j (Σ_i Zc_ij²)² / (N−1)². Memory is O(N² + N·d). Gives 0 for N < 2 or d < 2.
pub fn covariance_term(z: &Tensor) -> Tensor {
    let s = z.size();
    let (n, d) = (s[0], s[1]);
    if n < 2 || d < 2 {
        return Tensor::zeros([], (z.kind(), z.device()));
    }
    let zc = z - z.mean_dim(&[0i64][..], true, z.kind());
    let g = zc.matmul(&zc.tr()); // (N, N)
    let denom = ((n - 1) * (n - 1)) as f64;
    let sum_c2 = g.square().sum(z.kind()) / denom;
    let diag = zc.square().sum_dim_intlist(&[0i64][..], false, z.kind()); // (d,) = (N−1)·diag(C)
    let sum_diag2 = diag.square().sum(z.kind()) / denom;
    (sum_c2 - sum_diag2) / ((d * (d - 1)) as f64)
}

/// The official d×d formula, for tests on small d only.
pub fn covariance_term_naive(z: &Tensor) -> Tensor {
    let s = z.size();
    let (n, d) = (s[0], s[1]);
    let zc = z - z.mean_dim(&[0i64][..], true, z.kind());
    let c = zc.tr().matmul(&zc) / ((n - 1) as f64);
    let diag = c.diagonal(0, 0, 1);
    (c.square().sum(z.kind()) - diag.square().sum(z.kind())) / ((d * (d - 1)) as f64)
}
