//! EfficientNetV2 built from a block table (architecture as data), with torchvision's parameter
//! names and shapes, so that a Ladder checkpoint loads into `torchvision.models.efficientnet_v2_*`
//! and back.
//!
//! The network is a stem (3x3 stride-2 conv, BatchNorm, SiLU), stages of Fused-MBConv and MBConv
//! blocks (the table in [`Architecture::of`], from the paper and torchvision), and a head (1x1
//! conv to `head` channels, BatchNorm, SiLU, global average pool, dropout, linear). A stage's
//! stride applies to its first block; a block adds its input back (through stochastic depth) when
//! its stride is 1 and its input and output widths match.
//!
//! Dropout and the stochastic-depth rate are runtime settings ([`EfficientNetV2::set_regularization`]):
//! a stage boundary changes them without rebuilding anything.

use ladder_core::spec::{ModelSpec, Variant};
use std::cell::Cell;
use tch::{Kind, Tensor, nn};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    /// 3x3 expansion conv (or a single 3x3 conv when `expand == 1`), then a 1x1 projection.
    Fused,
    /// 1x1 expansion, 3x3 depthwise conv, squeeze-and-excitation, 1x1 projection.
    MbConv,
}

/// One row of the block table: `repeats` blocks of one kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StageSpec {
    pub kind: BlockKind,
    pub expand: i64,
    pub stride: i64,
    pub input: i64,
    pub output: i64,
    pub repeats: i64,
}

const fn fused(repeats: i64, expand: i64, stride: i64, input: i64, output: i64) -> StageSpec {
    StageSpec {
        kind: BlockKind::Fused,
        expand,
        stride,
        input,
        output,
        repeats,
    }
}

const fn mbconv(repeats: i64, expand: i64, stride: i64, input: i64, output: i64) -> StageSpec {
    StageSpec {
        kind: BlockKind::MbConv,
        expand,
        stride,
        input,
        output,
        repeats,
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Architecture {
    pub stem: i64,
    pub stages: Vec<StageSpec>,
    pub head: i64,
}

impl Architecture {
    /// The block table of a variant (REFERENCE.md: the paper's Table 4 and torchvision).
    pub fn of(variant: Variant) -> Architecture {
        let (stem, stages, head) = match variant {
            // Same block types as the real variants, few channels and blocks: for tests and
            // the CPU demo.
            Variant::Tiny => (
                16,
                vec![
                    fused(1, 1, 1, 16, 16),
                    fused(2, 4, 2, 16, 24),
                    mbconv(2, 4, 2, 24, 48),
                    mbconv(1, 4, 2, 48, 64),
                ],
                256,
            ),
            Variant::S => (
                24,
                vec![
                    fused(2, 1, 1, 24, 24),
                    fused(4, 4, 2, 24, 48),
                    fused(4, 4, 2, 48, 64),
                    mbconv(6, 4, 2, 64, 128),
                    mbconv(9, 6, 1, 128, 160),
                    mbconv(15, 6, 2, 160, 256),
                ],
                1280,
            ),
            Variant::M => (
                24,
                vec![
                    fused(3, 1, 1, 24, 24),
                    fused(5, 4, 2, 24, 48),
                    fused(5, 4, 2, 48, 80),
                    mbconv(7, 4, 2, 80, 160),
                    mbconv(14, 6, 1, 160, 176),
                    mbconv(18, 6, 2, 176, 304),
                    mbconv(5, 6, 1, 304, 512),
                ],
                1280,
            ),
            Variant::L => (
                32,
                vec![
                    fused(4, 1, 1, 32, 32),
                    fused(7, 4, 2, 32, 64),
                    fused(7, 4, 2, 64, 96),
                    mbconv(10, 4, 2, 96, 192),
                    mbconv(19, 6, 1, 192, 224),
                    mbconv(25, 6, 2, 224, 384),
                    mbconv(7, 6, 1, 384, 640),
                ],
                1280,
            ),
            Variant::Xl => (
                32,
                vec![
                    fused(4, 1, 1, 32, 32),
                    fused(8, 4, 2, 32, 64),
                    fused(8, 4, 2, 64, 96),
                    mbconv(16, 4, 2, 96, 192),
                    mbconv(24, 6, 1, 192, 256),
                    mbconv(32, 6, 2, 256, 512),
                    mbconv(8, 6, 1, 512, 640),
                ],
                1280,
            ),
        };
        Architecture { stem, stages, head }
    }

    pub fn block_count(&self) -> i64 {
        self.stages.iter().map(|s| s.repeats).sum()
    }
}

/// BatchNorm settings from the spec (paper: eps 1e-3, PyTorch momentum 0.01).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormConfig {
    pub eps: f64,
    pub momentum: f64,
}

impl From<&ModelSpec> for BatchNormConfig {
    fn from(spec: &ModelSpec) -> BatchNormConfig {
        BatchNormConfig {
            eps: spec.bn_eps,
            momentum: spec.bn_momentum,
        }
    }
}

/// BatchNorm2d with torchvision's buffers, `num_batches_tracked` included (tch's own has none).
#[derive(Debug)]
struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
    config: BatchNormConfig,
}

impl BatchNorm {
    fn new(p: &nn::Path, channels: i64, config: BatchNormConfig) -> BatchNorm {
        let counter = Tensor::zeros([], (Kind::Int64, p.device()));
        BatchNorm {
            weight: p.ones("weight", &[channels]),
            bias: p.zeros("bias", &[channels]),
            running_mean: p.zeros_no_train("running_mean", &[channels]),
            running_var: p.ones_no_train("running_var", &[channels]),
            num_batches_tracked: p.add("num_batches_tracked", counter, false),
            config,
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        if train {
            tch::no_grad(|| {
                let _ = self.num_batches_tracked.shallow_clone().g_add_scalar_(1);
            });
        }
        Tensor::batch_norm(
            x,
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            self.config.momentum,
            self.config.eps,
            true,
        )
    }
}

/// torchvision's `Conv2dNormActivation`: conv (no bias), BatchNorm, optional SiLU; named
/// `PATH.0.weight` and `PATH.1.*`.
#[derive(Debug)]
struct ConvBn {
    weight: Tensor,
    bn: BatchNorm,
    stride: i64,
    groups: i64,
    activate: bool,
}

/// Kaiming-normal with fan-out, as torchvision initializes EfficientNet's convolutions.
fn conv_weight(p: &nn::Path, input: i64, output: i64, kernel: i64, groups: i64) -> Tensor {
    let std = (2.0 / (output * kernel * kernel) as f64).sqrt();
    p.randn(
        "weight",
        &[output, input / groups, kernel, kernel],
        0.0,
        std,
    )
}

struct ConvOptions {
    kernel: i64,
    stride: i64,
    groups: i64,
    activate: bool,
}

impl ConvBn {
    fn new(p: &nn::Path, input: i64, output: i64, o: ConvOptions, bn: BatchNormConfig) -> ConvBn {
        ConvBn {
            weight: conv_weight(&(p / 0), input, output, o.kernel, o.groups),
            bn: BatchNorm::new(&(p / 1), output, bn),
            stride: o.stride,
            groups: o.groups,
            activate: o.activate,
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let padding = (self.weight.size()[2] - 1) / 2;
        let y = x.conv2d(
            &self.weight,
            None::<&Tensor>,
            [self.stride, self.stride],
            [padding, padding],
            [1, 1],
            self.groups,
        );
        let y = self.bn.forward(&y, train);
        if self.activate { y.silu() } else { y }
    }
}

/// Squeeze-and-excitation: global pool, 1x1 conv down, SiLU, 1x1 conv up, sigmoid gate.
#[derive(Debug)]
struct SqueezeExcite {
    fc1: (Tensor, Tensor),
    fc2: (Tensor, Tensor),
}

impl SqueezeExcite {
    fn new(p: &nn::Path, channels: i64, squeezed: i64) -> SqueezeExcite {
        let fc = |name: &str, input: i64, output: i64| {
            let q = p / name;
            (
                conv_weight(&q, input, output, 1, 1),
                q.zeros("bias", &[output]),
            )
        };
        SqueezeExcite {
            fc1: fc("fc1", channels, squeezed),
            fc2: fc("fc2", squeezed, channels),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let conv =
            |t: &Tensor, (w, b): &(Tensor, Tensor)| t.conv2d(w, Some(b), [1, 1], [0, 0], [1, 1], 1);
        let scale = conv(
            &conv(&x.adaptive_avg_pool2d([1, 1]), &self.fc1).silu(),
            &self.fc2,
        );
        x * scale.sigmoid()
    }
}

#[derive(Debug)]
enum Layer {
    Conv(ConvBn),
    SqueezeExcite(SqueezeExcite),
}

#[derive(Debug)]
struct Block {
    layers: Vec<Layer>,
    residual: bool,
    /// Position among all blocks: the stochastic-depth rate grows with depth.
    index: i64,
}

impl Block {
    /// A block of `stage`, named `p.block.N` like torchvision's.
    fn new(
        p: &nn::Path,
        stage: &StageSpec,
        input: i64,
        stride: i64,
        index: i64,
        bn: BatchNormConfig,
    ) -> Block {
        let p = p / "block";
        let output = stage.output;
        let expanded = input * stage.expand;
        let plain = |kernel, stride, groups, activate| ConvOptions {
            kernel,
            stride,
            groups,
            activate,
        };
        let layers = match (stage.kind, stage.expand) {
            (BlockKind::Fused, 1) => vec![Layer::Conv(ConvBn::new(
                &(&p / 0),
                input,
                output,
                plain(3, stride, 1, true),
                bn,
            ))],
            (BlockKind::Fused, _) => vec![
                Layer::Conv(ConvBn::new(
                    &(&p / 0),
                    input,
                    expanded,
                    plain(3, stride, 1, true),
                    bn,
                )),
                Layer::Conv(ConvBn::new(
                    &(&p / 1),
                    expanded,
                    output,
                    plain(1, 1, 1, false),
                    bn,
                )),
            ],
            (BlockKind::MbConv, _) => vec![
                Layer::Conv(ConvBn::new(
                    &(&p / 0),
                    input,
                    expanded,
                    plain(1, 1, 1, true),
                    bn,
                )),
                Layer::Conv(ConvBn::new(
                    &(&p / 1),
                    expanded,
                    expanded,
                    plain(3, stride, expanded, true),
                    bn,
                )),
                Layer::SqueezeExcite(SqueezeExcite::new(&(&p / 2), expanded, (input / 4).max(1))),
                Layer::Conv(ConvBn::new(
                    &(&p / 3),
                    expanded,
                    output,
                    plain(1, 1, 1, false),
                    bn,
                )),
            ],
        };
        Block {
            layers,
            residual: stride == 1 && input == output,
            index,
        }
    }

    fn forward(&self, x: &Tensor, train: bool, drop_rate: f64) -> Tensor {
        let mut y = x.shallow_clone();
        for layer in &self.layers {
            y = match layer {
                Layer::Conv(conv) => conv.forward(&y, train),
                Layer::SqueezeExcite(se) => se.forward(&y),
            };
        }
        if !self.residual {
            return y;
        }
        stochastic_depth(&y, drop_rate, train) + x
    }
}

/// Drops whole samples' residual branches with probability `rate`, scaling the kept ones
/// (torchvision's "row" mode).
fn stochastic_depth(x: &Tensor, rate: f64, train: bool) -> Tensor {
    if !train || rate <= 0.0 {
        return x.shallow_clone();
    }
    let survival = 1.0 - rate;
    let size = x.size();
    let mut shape = vec![size[0]];
    shape.extend(std::iter::repeat_n(1, size.len() - 1));
    let noise = Tensor::empty(&shape, (x.kind(), x.device())).bernoulli_float_(survival);
    x * (noise / survival)
}

/// Dropout before the classifier and the stochastic-depth rate of the deepest block.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Regularization {
    pub dropout: f64,
    pub stochastic_depth: f64,
}

#[derive(Debug)]
pub struct EfficientNetV2 {
    stem: ConvBn,
    blocks: Vec<Block>,
    head: ConvBn,
    classifier: (Tensor, Tensor),
    block_count: i64,
    regularization: Cell<Regularization>,
}

impl EfficientNetV2 {
    /// Builds the network under `root` (parameter names `features.*`, `classifier.1.*`).
    pub fn new(
        root: &nn::Path,
        architecture: &Architecture,
        classes: i64,
        bn: BatchNormConfig,
    ) -> EfficientNetV2 {
        let features = root / "features";
        let conv = |kernel, stride, activate| ConvOptions {
            kernel,
            stride,
            groups: 1,
            activate,
        };
        let stem = ConvBn::new(&(&features / 0), 3, architecture.stem, conv(3, 2, true), bn);
        let mut blocks = Vec::new();
        let mut index = 0;
        for (s, stage) in architecture.stages.iter().enumerate() {
            let stage_path = &features / (s + 1);
            for j in 0..stage.repeats {
                let (input, stride) = if j == 0 {
                    (stage.input, stage.stride)
                } else {
                    (stage.output, 1)
                };
                blocks.push(Block::new(
                    &(&stage_path / j),
                    stage,
                    input,
                    stride,
                    index,
                    bn,
                ));
                index += 1;
            }
        }
        let last = architecture
            .stages
            .last()
            .map_or(architecture.stem, |s| s.output);
        let head = ConvBn::new(
            &(&features / (architecture.stages.len() + 1)),
            last,
            architecture.head,
            conv(1, 1, true),
            bn,
        );
        let linear = root / "classifier" / 1;
        let bound = 1.0 / (classes as f64).sqrt();
        let classifier = (
            linear.uniform("weight", &[classes, architecture.head], -bound, bound),
            linear.zeros("bias", &[classes]),
        );
        EfficientNetV2 {
            stem,
            blocks,
            head,
            classifier,
            block_count: index,
            regularization: Cell::new(Regularization::default()),
        }
    }

    /// The network a job spec asks for.
    pub fn from_spec(root: &nn::Path, spec: &ModelSpec) -> EfficientNetV2 {
        let architecture = Architecture::of(spec.variant);
        EfficientNetV2::new(root, &architecture, spec.classes as i64, spec.into())
    }

    /// Takes effect from the next forward pass.
    pub fn set_regularization(&self, regularization: Regularization) {
        self.regularization.set(regularization);
    }

    pub fn regularization(&self) -> Regularization {
        self.regularization.get()
    }

    /// Logits for a batch of NCHW images (normalized). `train` selects batch statistics,
    /// Each block's stochastic-depth drop rate, for the deepest block's `rate`: block `i` of
    /// `n` (counting every block, from 0) drops `rate * i / n`, as the official code's
    /// survival probabilities `1 - rate * i / n`; only blocks that add their input back apply
    /// it.
    pub fn drop_rates(&self, rate: f64) -> Vec<f64> {
        self.blocks
            .iter()
            .map(|b| rate * b.index as f64 / self.block_count as f64)
            .collect()
    }

    /// dropout and stochastic depth.
    pub fn forward(&self, images: &Tensor, train: bool) -> Tensor {
        let r = self.regularization.get();
        let mut x = self.stem.forward(images, train);
        for (block, rate) in self.blocks.iter().zip(self.drop_rates(r.stochastic_depth)) {
            x = block.forward(&x, train, rate);
        }
        let x = self
            .head
            .forward(&x, train)
            .adaptive_avg_pool2d([1, 1])
            .flatten(1, -1)
            .dropout(r.dropout, train);
        x.linear(&self.classifier.0, Some(&self.classifier.1))
    }
}
