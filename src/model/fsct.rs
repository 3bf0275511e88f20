//! The FS-CT head (official `methods/transformer.py`), quirks included; see
//! ../shared/design/fsct-reference.md §3.

use tch::{nn, Tensor};

use super::layers::{LayerNorm, Linear};

/// Attention variant of FS-CT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnVariant {
    /// Cosine similarity per head, no softmax, no scale, no epsilon.
    Cosine,
    /// Scaled dot product with a softmax over the single key (so identically 1).
    Softmax,
}

/// Official `Attention`: one LayerNorm + Linear(d, h·dh, no bias) shared by Q, K and V,
/// then Linear(h·dh, d) (Identity when h = 1 and dh = d).
#[derive(Debug)]
struct Attention {
    ln: LayerNorm,
    proj: Linear,
    out: Option<Linear>,
    heads: i64,
    dim_head: i64,
    variant: AttnVariant,
}

impl Attention {
    fn new(p: &nn::Path, d: i64, heads: i64, dim_head: i64, variant: AttnVariant) -> Self {
        let inner = heads * dim_head;
        let il = p / "input_linear";
        let ln = LayerNorm::new(&(&il / "0"), d);
        let proj = Linear::new(&(&il / "1"), d, inner, false);
        let out = (!(heads == 1 && dim_head == d))
            .then(|| Linear::new(&(p / "output_linear"), inner, d, true));
        Self {
            ln,
            proj,
            out,
            heads,
            dim_head,
            variant,
        }
    }

    /// (a, b, h·dh) → (h, a, b, dh): einops 'q n (h d) -> h q n d'.
    fn split_heads(&self, t: &Tensor) -> Tensor {
        let s = t.size();
        t.view([s[0], s[1], self.heads, self.dim_head])
            .permute([2, 0, 1, 3])
    }

    /// `q`: prototypes (1, n, d); `kv`: queries (Q, 1, d) → (Q, n, d).
    fn forward(&self, q: &Tensor, kv: &Tensor) -> Tensor {
        let f_q = self.split_heads(&self.proj.forward(&self.ln.forward(q))); // (h, 1, n, dh)
                                                                             // K and V are the same projection of the same tensor: compute it once.
        let f_kv = self.split_heads(&self.proj.forward(&self.ln.forward(kv))); // (h, Q, 1, dh)
        let f_kt = f_kv.transpose(-1, -2); // (h, Q, dh, 1)
        let dots = f_q.matmul(&f_kt); // (h, Q, n, 1)
        let attn = match self.variant {
            AttnVariant::Cosine => {
                // Official `cosine_distance`: divide by the outer product of the norms, no eps.
                let nq = f_q.norm_scalaropt_dim(2, [-1], false).unsqueeze(-1); // (h, 1, n, 1)
                let nk = f_kt.norm_scalaropt_dim(2, [-2], false).unsqueeze(-2); // (h, Q, 1, 1)
                dots / (nq * nk)
            }
            AttnVariant::Softmax => {
                let scaled = dots * (self.dim_head as f64).powf(-0.5);
                scaled.softmax(-1, scaled.kind())
            }
        };
        let out = attn.matmul(&f_kv); // (h, Q, n, dh)
        let s = out.size();
        let out = out.permute([1, 2, 0, 3]).reshape([s[1], s[2], s[0] * s[3]]);
        match &self.out {
            Some(l) => l.forward(&out),
            None => out,
        }
    }
}

/// Official `CosineDistLinear(indim, 1)` with WeightNorm(dim=0): `weight_g` (1,1), `weight_v`
/// (1,indim). Normalises the input over **dim 1** (the way axis for (Q, n, indim) input),
/// adds 1e-5 to the norm, scale 2.
#[derive(Debug)]
struct CosineDistLinear {
    weight_g: Tensor,
    weight_v: Tensor,
    scale: f64,
}

impl CosineDistLinear {
    fn new(p: &nn::Path, d_in: i64, d_out: i64) -> Self {
        let lp = p / "L";
        let b = super::layers::default_bound(d_in);
        let weight_v = lp.var(
            "weight_v",
            &[d_out, d_in],
            nn::Init::Uniform { lo: -b, up: b },
        );
        // WeightNorm starts with g = ‖v‖ (per output row), so the weight is unchanged.
        let g0 = tch::no_grad(|| weight_v.norm_scalaropt_dim(2, [1], true));
        let weight_g = lp.var_copy("weight_g", &g0);
        let scale = if d_out <= 200 { 2.0 } else { 10.0 };
        Self {
            weight_g,
            weight_v,
            scale,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let x_norm = x.norm_scalaropt_dim(2, [1], true);
        let xn = x / (x_norm + 1e-5);
        let w = &self.weight_v * (&self.weight_g / self.weight_v.norm_scalaropt_dim(2, [1], true));
        xn.linear::<&Tensor>(&w, None) * self.scale
    }
}

#[derive(Debug)]
enum Out {
    Cosine(CosineDistLinear),
    Linear(Linear),
}

/// The FS-CT head: learnable prototype weights, `depth` × (shared) attention + FFN, output head.
#[derive(Debug)]
pub struct FsctHead {
    proto_weight: Tensor,
    attn: Attention,
    ffn_ln: LayerNorm,
    ffn1: Linear,
    ffn2: Linear,
    head_ln: LayerNorm,
    head_lin: Linear,
    head_out: Out,
    depth: i64,
    fp32: Fp32Modules,
}

/// Head modules kept in fp32 under autocast (config `fp32_modules`, official module names):
/// the cosine attention `ATTN`, the feed-forward block `FFN`, the output head `linear`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fp32Modules {
    pub attn: bool,
    pub ffn: bool,
    pub linear: bool,
}

impl Fp32Modules {
    pub const NAMES: [&'static str; 3] = ["ATTN", "FFN", "linear"];

    /// From official module names; an unknown name is returned as the error.
    pub fn from_names(names: &[String]) -> Result<Self, String> {
        let mut m = Self::default();
        for n in names {
            match n.as_str() {
                "ATTN" => m.attn = true,
                "FFN" => m.ffn = true,
                "linear" => m.linear = true,
                other => return Err(other.to_string()),
            }
        }
        Ok(m)
    }
}

/// Runs `f` with autocast disabled when `fp32` (as a `torch.autocast(enabled=False)` region),
/// handing it its input cast back to float; otherwise runs it as is.
fn region(fp32: bool, x: &Tensor, f: impl FnOnce(&Tensor) -> Tensor) -> Tensor {
    if !fp32 {
        return f(x);
    }
    // Without a working shim there is no autocast to disable either.
    let _guard = crate::ffi::autocast_disabled(x.device()).ok();
    match x.kind() {
        tch::Kind::Half | tch::Kind::BFloat16 => f(&x.to_kind(tch::Kind::Float)),
        _ => f(x),
    }
}

/// Hyper-parameters of the FS-CT head.
#[derive(Debug, Clone, Copy)]
pub struct FsctDims {
    pub d: i64,
    pub n_way: i64,
    pub k_shot: i64,
    pub depth: i64,
    pub heads: i64,
    pub dim_head: i64,
    pub mlp_dim: i64,
}

impl FsctHead {
    /// Builds the head under `p` (the model root) with the official names `proto_weight`,
    /// `ATTN.*`, `FFN.{0,1,3}.*`, `linear.{0,1,2}.*`.
    pub fn new(p: &nn::Path, dims: FsctDims, variant: AttnVariant) -> Self {
        let FsctDims {
            d,
            n_way,
            k_shot,
            depth,
            heads,
            dim_head,
            mlp_dim,
        } = dims;
        let proto_weight = p.var("proto_weight", &[n_way, k_shot, 1], nn::Init::Const(1.0));
        let attn = Attention::new(&(p / "ATTN"), d, heads, dim_head, variant);
        let f = p / "FFN";
        let ffn_ln = LayerNorm::new(&(&f / "0"), d);
        let ffn1 = Linear::new(&(&f / "1"), d, mlp_dim, true);
        let ffn2 = Linear::new(&(&f / "3"), mlp_dim, d, true);
        let l = p / "linear";
        let head_ln = LayerNorm::new(&(&l / "0"), d);
        let head_lin = Linear::new(&(&l / "1"), d, dim_head, true);
        let head_out = match variant {
            AttnVariant::Cosine => Out::Cosine(CosineDistLinear::new(&(&l / "2"), dim_head, 1)),
            AttnVariant::Softmax => Out::Linear(Linear::new(&(&l / "2"), dim_head, 1, true)),
        };
        Self {
            proto_weight,
            attn,
            ffn_ln,
            ffn1,
            ffn2,
            head_ln,
            head_lin,
            head_out,
            depth,
            fp32: Fp32Modules::default(),
        }
    }

    /// Keeps the named modules in fp32 under autocast.
    pub fn with_fp32(mut self, fp32: Fp32Modules) -> Self {
        self.fp32 = fp32;
        self
    }

    /// `support` (n, k, d), `query` (Q, d) → logits (Q, n).
    pub fn forward(&self, support: &Tensor, query: &Tensor) -> Tensor {
        let w = self.proto_weight.softmax(-2, self.proto_weight.kind());
        let proto = (support * w)
            .sum_dim_intlist(&[1i64][..], false, support.kind())
            .unsqueeze(0); // (1, n, d)
        let query = query.unsqueeze(1); // (Q, 1, d)
        let mut x = proto;
        let fp32 = self.fp32;
        for _ in 0..self.depth {
            // The attention's keys are the queries: both enter the fp32 region together.
            let a = region(fp32.attn, &x, |x| {
                let q = if fp32.attn && query.kind() != x.kind() {
                    query.to_kind(x.kind())
                } else {
                    query.shallow_clone()
                };
                self.attn.forward(x, &q)
            });
            x = a + x; // broadcasts to (Q, n, d)
            let h = region(fp32.ffn, &x, |x| {
                self.ffn2
                    .forward(&self.ffn1.forward(&self.ffn_ln.forward(x)).gelu("none"))
            });
            x = h + x;
        }
        let s = region(fp32.linear, &x, |x| {
            let h = self.head_lin.forward(&self.head_ln.forward(x)); // (Q, n, dh)
            match &self.head_out {
                Out::Cosine(c) => c.forward(&h),
                Out::Linear(l) => l.forward(&h),
            }
        });
        // (Q, n, 1) → (Q, n); the official `.squeeze()` would also drop Q = 1 or n = 1.
        s.squeeze_dim(-1)
    }
}
