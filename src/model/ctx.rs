//! The CTX baseline (official `methods/CTX.py`, image-level CrossTransformer); see
//! ../shared/design/fsct-reference.md §3 "CTX baseline".

use tch::{nn, Tensor};

use super::layers::{Conv2d, ConvInit, ConvSpec};

#[derive(Debug)]
pub struct CtxHead {
    linear_attn: Conv2d,
    dim_attn: i64,
    cosine: bool,
}

impl CtxHead {
    /// `linear_attn`: Conv2d(c_in, dim_attn, 1×1, no bias), shared by the four projections.
    pub fn new(p: &nn::Path, c_in: i64, dim_attn: i64, cosine: bool) -> Self {
        let spec = ConvSpec::new(c_in, dim_attn, 1);
        let linear_attn = Conv2d::new(&(p / "linear_attn"), spec, ConvInit::Default);
        Self {
            linear_attn,
            dim_attn,
            cosine,
        }
    }

    /// `support` (n, k, C, H, W), `query` (Q, C, H, W) → logits (Q, n) =
    /// −‖query_v − prototype‖² / (H·W).
    pub fn forward(&self, support: &Tensor, query: &Tensor) -> Tensor {
        let s = support.size();
        let (n, k, hw) = (s[0], s[1], s[3] * s[4]);
        let nq = query.size()[0];
        // query_q and query_v (and support_k and support_v) are the same projection: once each.
        let q = self.linear_attn.forward(query).reshape([nq, -1]); // (Q, D)
        let sup = self
            .linear_attn
            .forward(&support.reshape([n * k, s[2], s[3], s[4]]));
        let sk = sup.reshape([n, k, -1]).transpose(1, 2); // (n, D, k)
        let qq = q.unsqueeze(0); // (1, Q, D)
        let dots = qq.matmul(&sk); // (n, Q, k)
        let attn = if self.cosine {
            let nq_ = qq.norm_scalaropt_dim(2, [-1], false); // (1, Q)
            let nk = sk.norm_scalaropt_dim(2, [-2], false); // (n, k)
            dots / (nq_.unsqueeze(-1) * nk.unsqueeze(1)) // (n, Q, k)
        } else {
            let scaled = dots / (self.dim_attn as f64).sqrt();
            scaled.softmax(-1, scaled.kind())
        };
        // einsum('nqk,ndk->qnd'): per class, attn (Q, k) @ support_vᵀ (k, D).
        let proto = attn.matmul(&sk.transpose(1, 2)).transpose(0, 1); // (Q, n, D)
        let diff = q.unsqueeze(1) - proto;
        -(diff
            .square()
            .sum_dim_intlist(&[-1i64][..], false, diff.kind()))
            / (hw as f64)
    }
}

/// Prototypical network: mean prototype, logits −‖q − p‖². No parameters.
pub fn protonet_logits(support: &Tensor, query: &Tensor) -> Tensor {
    let proto = support.mean_dim(&[1i64][..], false, support.kind()); // (n, d)
    let diff = query.unsqueeze(1) - proto.unsqueeze(0); // (Q, n, d)
    -diff
        .square()
        .sum_dim_intlist(&[-1i64][..], false, diff.kind())
}
