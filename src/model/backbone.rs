//! Feature extractors: the official Conv4/Conv6/Conv4SNP, the FETI-layout ResNets (official
//! `--FETI 1`) and the torchvision-layout ResNets (official `--FETI 0`). Every variable lives under `feature.` with the official names.

use tch::{nn, Tensor};

use super::layers::{BatchNorm2d, BnMode, Conv2d, ConvInit, ConvSpec};
use super::ModelError;
use crate::config::Backbone;

/// Official `ConvBlock`: Conv2d(3×3, bias) → BatchNorm2d → ReLU (→ MaxPool2d(2)).
/// Variables: `C.weight`, `C.bias`, `BN.*` (the official module also registers them as
/// `trunk.0.*`/`trunk.1.*`; [`super::load_official`] accepts either name).
#[derive(Debug)]
struct ConvBlock {
    conv: Conv2d,
    bn: BatchNorm2d,
    pool: bool,
}

impl ConvBlock {
    fn new(p: &nn::Path, c_in: i64, c_out: i64, pool: bool, padding: i64) -> Self {
        let spec = ConvSpec::new(c_in, c_out, 3)
            .with_padding(padding)
            .with_bias();
        let conv = Conv2d::new(&(p / "C"), spec, ConvInit::FanOutNormal);
        let bn = BatchNorm2d::new(&(p / "BN"), c_out);
        Self { conv, bn, pool }
    }

    fn forward(&self, x: &Tensor, mode: BnMode) -> Tensor {
        // In place, as the official nn.ReLU(inplace=True): BatchNorm's backward needs its input,
        // not its output, and one activation-sized allocation less per layer is measurable.
        let y = self.bn.forward(&self.conv.forward(x), mode).relu_();
        if self.pool {
            y.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)
        } else {
            y
        }
    }
}

/// Official BasicBlock (identical in the FETI and torchvision layouts).
#[derive(Debug)]
struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    downsample: Option<(Conv2d, BatchNorm2d)>,
}

impl BasicBlock {
    fn new(p: &nn::Path, c_in: i64, c_out: i64, stride: i64) -> Self {
        let k = ConvInit::KaimingFanOut;
        let conv1 = Conv2d::new(
            &(p / "conv1"),
            ConvSpec::new(c_in, c_out, 3)
                .with_stride(stride)
                .with_padding(1),
            k,
        );
        let bn1 = BatchNorm2d::new(&(p / "bn1"), c_out);
        let conv2 = Conv2d::new(
            &(p / "conv2"),
            ConvSpec::new(c_out, c_out, 3).with_padding(1),
            k,
        );
        let bn2 = BatchNorm2d::new(&(p / "bn2"), c_out);
        let downsample = (stride != 1 || c_in != c_out).then(|| {
            let d = p / "downsample";
            (
                Conv2d::new(
                    &(&d / "0"),
                    ConvSpec::new(c_in, c_out, 1).with_stride(stride),
                    k,
                ),
                BatchNorm2d::new(&(&d / "1"), c_out),
            )
        });
        Self {
            conv1,
            bn1,
            conv2,
            bn2,
            downsample,
        }
    }

    fn forward(&self, x: &Tensor, mode: BnMode) -> Tensor {
        // In place, as torchvision's BasicBlock (`out += identity`, ReLU(inplace=True)).
        let out = self.bn1.forward(&self.conv1.forward(x), mode).relu_();
        let mut out = self.bn2.forward(&self.conv2.forward(&out), mode);
        let identity = match &self.downsample {
            Some((c, b)) => b.forward(&c.forward(x), mode),
            None => x.shallow_clone(),
        };
        let _ = out.g_add_(&identity);
        out.relu_()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResNetStem {
    /// FETI (simple-cnaps): 5×5 stride 2 padding 1, no max-pool, AdaptiveAvgPool2d(7) at the end.
    Feti,
    /// torchvision: 7×7 stride 2 padding 3, MaxPool(3, 2, 1), no pooling at the end.
    Torchvision,
}

#[derive(Debug)]
struct ResNet {
    stem: ResNetStem,
    conv1: Conv2d,
    bn1: BatchNorm2d,
    layers: Vec<Vec<BasicBlock>>,
}

impl ResNet {
    fn new(p: &nn::Path, blocks: [i64; 4], stem: ResNetStem) -> Self {
        let k = ConvInit::KaimingFanOut;
        let stem_conv = match stem {
            ResNetStem::Feti => ConvSpec::new(3, 64, 5).with_stride(2).with_padding(1),
            ResNetStem::Torchvision => ConvSpec::new(3, 64, 7).with_stride(2).with_padding(3),
        };
        let conv1 = Conv2d::new(&(p / "conv1"), stem_conv, k);
        let bn1 = BatchNorm2d::new(&(p / "bn1"), 64);
        let mut c_in = 64;
        let mut layers = Vec::new();
        for (i, &n) in blocks.iter().enumerate() {
            let c_out = 64 << i;
            let stride = if i == 0 { 1 } else { 2 };
            let lp = p / format!("layer{}", i + 1);
            let layer = (0..n)
                .map(|j| {
                    let b =
                        BasicBlock::new(&(&lp / j), c_in, c_out, if j == 0 { stride } else { 1 });
                    c_in = c_out;
                    b
                })
                .collect();
            layers.push(layer);
        }
        Self {
            stem,
            conv1,
            bn1,
            layers,
        }
    }

    /// Segments for activation checkpointing: the stem, then each stage (the last one ends
    /// with the FETI adaptive pool).
    fn num_segments(&self) -> usize {
        1 + self.layers.len()
    }

    fn forward_segment(&self, i: usize, x: &Tensor, mode: BnMode) -> Tensor {
        if i == 0 {
            let x = self.bn1.forward(&self.conv1.forward(x), mode).relu_();
            return match self.stem {
                ResNetStem::Torchvision => x.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false),
                ResNetStem::Feti => x,
            };
        }
        let mut x = x.shallow_clone();
        for b in &self.layers[i - 1] {
            x = b.forward(&x, mode);
        }
        match self.stem {
            ResNetStem::Feti if i == self.layers.len() => x.adaptive_avg_pool2d([7, 7]),
            _ => x,
        }
    }
}

#[derive(Debug)]
enum Net {
    Conv {
        blocks: Vec<ConvBlock>,
        first_channel_only: bool,
    },
    ResNet(ResNet),
}

/// A backbone: (N, 3, S, S) → (N, C, H, W) feature maps (flattened by the caller when the
/// head needs vectors).
#[derive(Debug)]
pub struct FeatureNet {
    net: Net,
    /// Output map shape [C, H, W] at the configured image size.
    out_shape: [i64; 3],
}

fn conv_out(s: i64, k: i64, stride: i64, pad: i64) -> i64 {
    (s + 2 * pad - k).div_euclid(stride) + 1
}

/// Output map shape of `backbone` for an `s`×`s` input, or None when some layer would produce
/// an empty map.
pub fn output_shape(backbone: Backbone, s: i64) -> Option<[i64; 3]> {
    let ok = |v: i64| (v >= 1).then_some(v);
    let backbone = backbone.explicit();
    let conv_side = |depth: usize, snp: bool| -> Option<i64> {
        let mut v = s;
        for i in 0..depth {
            let (pad, pool) = if snp {
                (if i < 2 { 0 } else { 1 }, i < 2)
            } else {
                (1, i < 4)
            };
            v = ok(conv_out(v, 3, 1, pad))?;
            if pool {
                v = ok(v / 2)?;
            }
        }
        Some(v)
    };
    match backbone {
        Backbone::Conv4 => conv_side(4, false).map(|v| [64, v, v]),
        Backbone::Conv6 => conv_side(6, false).map(|v| [64, v, v]),
        Backbone::Conv4Snp => conv_side(4, true).map(|v| [64, v, v]),
        Backbone::FetiResNet10
        | Backbone::FetiResNet12
        | Backbone::FetiResNet18
        | Backbone::FetiResNet34 => {
            let mut v = ok(conv_out(s, 5, 2, 1))?;
            for _ in 0..3 {
                v = ok(conv_out(v, 3, 2, 1))?;
            }
            Some([512, 7, 7]).filter(|_| v >= 1)
        }
        Backbone::TvResNet18
        | Backbone::TvResNet34
        | Backbone::ResNet12
        | Backbone::ResNet18
        | Backbone::ResNet34 => {
            let mut v = ok(conv_out(s, 7, 2, 3))?;
            v = ok(conv_out(v, 3, 2, 1))?;
            for _ in 0..3 {
                v = ok(conv_out(v, 3, 2, 1))?;
            }
            Some([512, v, v])
        }
    }
}

impl FeatureNet {
    /// Builds the backbone under `p` (the caller passes `root / "feature"`).
    /// The official names `ResNet12/18/34` build their `--FETI 0` network ([`Backbone::explicit`]).
    pub fn new(p: &nn::Path, backbone: Backbone, image_size: i64) -> Result<Self, ModelError> {
        let backbone = backbone.explicit();
        let out_shape = output_shape(backbone, image_size).ok_or(ModelError::ImageTooSmall {
            backbone,
            image_size,
            min: backbone.min_image_size(),
        })?;
        let conv = |depth: usize, snp: bool| {
            let trunk = p / "trunk";
            let blocks = (0..depth)
                .map(|i| {
                    let c_in = if i > 0 {
                        64
                    } else if snp {
                        1
                    } else {
                        3
                    };
                    let (pad, pool) = if snp {
                        (if i < 2 { 0 } else { 1 }, i < 2)
                    } else {
                        (1, i < 4)
                    };
                    ConvBlock::new(&(&trunk / i), c_in, 64, pool, pad)
                })
                .collect();
            Net::Conv {
                blocks,
                first_channel_only: snp,
            }
        };
        let net = match backbone {
            Backbone::Conv4 => conv(4, false),
            Backbone::Conv6 => conv(6, false),
            Backbone::Conv4Snp => conv(4, true),
            Backbone::FetiResNet10 => Net::ResNet(ResNet::new(p, [1, 1, 1, 1], ResNetStem::Feti)),
            Backbone::FetiResNet12 => Net::ResNet(ResNet::new(p, [2, 1, 1, 1], ResNetStem::Feti)),
            Backbone::FetiResNet18 => Net::ResNet(ResNet::new(p, [2, 2, 2, 2], ResNetStem::Feti)),
            Backbone::FetiResNet34 => Net::ResNet(ResNet::new(p, [3, 4, 6, 3], ResNetStem::Feti)),
            Backbone::TvResNet18 | Backbone::ResNet12 | Backbone::ResNet18 => {
                Net::ResNet(ResNet::new(p, [2, 2, 2, 2], ResNetStem::Torchvision))
            }
            Backbone::TvResNet34 | Backbone::ResNet34 => {
                Net::ResNet(ResNet::new(p, [3, 4, 6, 3], ResNetStem::Torchvision))
            }
        };
        Ok(Self { net, out_shape })
    }

    /// Output map shape [C, H, W] for the configured image size.
    pub fn out_shape(&self) -> [i64; 3] {
        self.out_shape
    }

    /// (N, 3, S, S) → (N, C, H, W). One call is one BatchNorm batch.
    pub fn forward(&self, x: &Tensor, mode: BnMode) -> Tensor {
        (0..self.num_segments()).fold(x.shallow_clone(), |y, i| self.forward_segment(i, &y, mode))
    }

    /// How many pieces [`Self::forward_segment`] splits the backbone into: each Conv block, or
    /// the ResNet stem and each stage. Activation checkpointing keeps only their boundaries.
    pub fn num_segments(&self) -> usize {
        match &self.net {
            Net::Conv { blocks, .. } => blocks.len(),
            Net::ResNet(r) => r.num_segments(),
        }
    }

    /// The segment that holds the parameter or buffer `name` (its VarStore name under the
    /// backbone's path: `trunk.2.C.weight`, `layer3.0.bn1.bias`, `conv1.weight`).
    pub fn segment_of(&self, name: &str) -> Option<usize> {
        let first = name.split('.').next()?;
        match &self.net {
            Net::Conv { .. } => name.strip_prefix("trunk.")?.split('.').next()?.parse().ok(),
            Net::ResNet(_) => match first {
                "conv1" | "bn1" => Some(0),
                layer => layer.strip_prefix("layer")?.parse().ok(),
            },
        }
    }

    /// Segment `i` of the backbone; folding all segments in order is [`Self::forward`].
    pub fn forward_segment(&self, i: usize, x: &Tensor, mode: BnMode) -> Tensor {
        match &self.net {
            Net::Conv {
                blocks,
                first_channel_only,
            } => {
                // Omniglot's Conv4SNP reads channel 0 only.
                let x = if i == 0 && *first_channel_only {
                    x.narrow(1, 0, 1)
                } else {
                    x.shallow_clone()
                };
                blocks[i].forward(&x, mode)
            }
            Net::ResNet(r) => r.forward_segment(i, x, mode),
        }
    }
}
