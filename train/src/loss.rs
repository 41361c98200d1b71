//! Targets and loss: soft-target cross-entropy with label smoothing, for one-hot labels, mixup
//! blends and ImageNet-21k multi-label targets alike.

use crate::precision;
use ladder_data::mix::{Plan, Row};
use tch::{Kind, Tensor};

/// One-hot rows for `labels` (N) over `classes`.
pub fn one_hot(labels: &Tensor, classes: i64) -> Tensor {
    labels.one_hot(classes).to_kind(Kind::Float)
}

/// Multi-hot rows (ImageNet-21k samples may carry several labels) normalized to sum to 1.
pub fn normalize_multi_label(multi_hot: &Tensor) -> Tensor {
    let counts = multi_hot
        .sum_dim_intlist(1, true, Kind::Float)
        .clamp_min(1.0);
    multi_hot.to_kind(Kind::Float) / counts
}

/// `(1 - smoothing) * targets + smoothing / classes`.
pub fn smooth(targets: &Tensor, smoothing: f64) -> Tensor {
    let classes = targets.size()[1] as f64;
    targets * (1.0 - smoothing) + smoothing / classes
}

/// Mean over the batch of `-sum(targets * log_softmax(logits))`.
pub fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> Tensor {
    -(targets * logits.log_softmax(1, Kind::Float))
        .sum_dim_intlist(1, false, Kind::Float)
        .mean(Kind::Float)
}

/// Mixes a micro-batch's images (N, C, H, W) and targets (N, K) as `plan` says (see
/// `ladder_data::mix`): a Mixup row blends with its partner by its weight, image and target; a
/// CutMix row takes its partner's pixels inside its box and blends its target by its label
/// weight; a kept row stays.
pub fn mix(images: &Tensor, targets: &Tensor, plan: &Plan) -> (Tensor, Tensor) {
    let device = images.device();
    let (rows, height, width) = (plan.rows.len() as i64, images.size()[2], images.size()[3]);
    let mut partners = Vec::with_capacity(plan.rows.len());
    let (mut image_weights, mut target_weights) = (Vec::new(), Vec::new());
    let mut boxes = Vec::with_capacity(plan.rows.len() * 4);
    for (i, row) in plan.rows.iter().enumerate() {
        let (partner, image, target, cut) = match row {
            Row::Kept => (i, 1.0, 1.0, None),
            Row::Mixup { partner, weight } => (*partner, *weight, *weight, None),
            Row::Cutmix {
                partner,
                cut,
                label_weight,
            } => (*partner, 1.0, 1.0 - label_weight, Some(cut)),
        };
        partners.push(partner as i64);
        image_weights.push(image as f32);
        target_weights.push(target as f32);
        boxes.extend(
            cut.map_or([0; 4], |c| [c.top, c.bottom, c.left, c.right])
                .map(i64::from),
        );
    }
    let partners = precision::upload_slice(&partners, &[rows], device);
    let weights = |w: &[f32], shape: &[i64], kind: Kind| {
        precision::upload_slice(w, shape, device).to_kind(kind)
    };
    let image_weight = weights(&image_weights, &[rows, 1, 1, 1], images.kind());
    let target_weight = weights(&target_weights, &[rows, 1], targets.kind());
    let boxes = precision::upload_slice(&boxes, &[rows, 4, 1, 1], device);
    let ys = Tensor::arange(height, (Kind::Int64, device)).view([1, height, 1]);
    let xs = Tensor::arange(width, (Kind::Int64, device)).view([1, 1, width]);
    let edge = |k: i64| boxes.select(1, k);
    let inside = ys.ge_tensor(&edge(0))
        * ys.lt_tensor(&edge(1))
        * xs.ge_tensor(&edge(2))
        * xs.lt_tensor(&edge(3));
    let pasted = inside.unsqueeze(1).to_kind(images.kind());
    let others = images.index_select(0, &partners);
    let blended = images * &image_weight + &others * (1.0 - &image_weight);
    let mixed = &blended * (1.0 - &pasted) + &others * &pasted;
    let targets =
        targets * &target_weight + targets.index_select(0, &partners) * (1.0 - &target_weight);
    (mixed, targets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn soft_cross_entropy_with_smoothing_equals_torchs_label_smoothing() {
        tch::manual_seed(1);
        let logits = Tensor::randn([5, 7], (Kind::Float, Device::Cpu));
        let labels = Tensor::from_slice(&[0i64, 3, 6, 2, 2]);
        let ours = soft_cross_entropy(&logits, &smooth(&one_hot(&labels, 7), 0.1));
        let torch =
            logits.cross_entropy_loss::<Tensor>(&labels, None, tch::Reduction::Mean, -100, 0.1);
        assert!((ours.double_value(&[]) - torch.double_value(&[])).abs() < 1e-6);
    }

    #[test]
    fn multi_label_targets_sum_to_one() {
        let multi = Tensor::from_slice(&[1.0f32, 1.0, 0.0, 0.0, 0.0, 1.0]).view([2, 3]);
        let t = normalize_multi_label(&multi);
        let sums = t.sum_dim_intlist(1, false, Kind::Float);
        assert!(sums.allclose(&Tensor::from_slice(&[1.0f32, 1.0]), 1e-6, 1e-6, false));
        assert!((t.double_value(&[0, 0]) - 0.5).abs() < 1e-6);
    }

    #[test]
    fn a_plan_blends_mixup_rows_and_pastes_cutmix_boxes() {
        use ladder_data::mix::Cut;
        // Four 1-channel 4x4 images, each filled with its row number; one-hot targets.
        let images = Tensor::arange(4, (Kind::Float, Device::Cpu))
            .view([4, 1, 1, 1])
            .expand([4, 1, 4, 4], false)
            .contiguous();
        let targets = one_hot(&Tensor::from_slice(&[0i64, 1, 2, 3]), 4);
        let cut = Cut {
            top: 1,
            bottom: 3,
            left: 0,
            right: 2,
        };
        let plan = Plan {
            rows: vec![
                Row::Mixup {
                    partner: 1,
                    weight: 0.75,
                },
                Row::Kept,
                Row::Cutmix {
                    partner: 3,
                    cut,
                    label_weight: 0.25,
                },
                Row::Kept,
            ],
            beta_draws: Vec::new(),
            centers: Vec::new(),
        };
        let (x, y) = mix(&images, &targets, &plan);
        let pixel = |n: i64, r: i64, c: i64| x.double_value(&[n, 0, r, c]);
        assert!((pixel(0, 0, 0) - 0.25).abs() < 1e-6, "0.75 * 0 + 0.25 * 1");
        assert_eq!(pixel(1, 2, 2), 1.0, "a kept row stays");
        for r in 0..4 {
            for c in 0..4 {
                let pasted = (1..3).contains(&r) && (0..2).contains(&c);
                assert_eq!(pixel(2, r, c), if pasted { 3.0 } else { 2.0 }, "({r}, {c})");
            }
        }
        let target = |n: i64, k: i64| y.double_value(&[n, k]);
        assert!((target(0, 0) - 0.75).abs() < 1e-6 && (target(0, 1) - 0.25).abs() < 1e-6);
        assert!((target(2, 2) - 0.75).abs() < 1e-6 && (target(2, 3) - 0.25).abs() < 1e-6);
        assert_eq!(target(3, 3), 1.0);
    }
}
