//! Targets and loss: soft-target cross-entropy with label smoothing, for one-hot labels, mixup
//! blends and ImageNet-21k multi-label targets alike.

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

/// Mixup of a micro-batch with `lambda` and a permutation of its rows, both drawn by the data
/// pipeline from the sample seeds: `lambda * x + (1 - lambda) * x[perm]`, likewise the targets.
pub fn mixup(
    images: &Tensor,
    targets: &Tensor,
    lambda: f64,
    permutation: &Tensor,
) -> (Tensor, Tensor) {
    let mix = |t: &Tensor| t * lambda + t.index_select(0, permutation) * (1.0 - lambda);
    (mix(images), mix(targets))
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
    fn mixup_blends_images_and_targets_alike() {
        let images = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).view([3, 1]);
        let targets = one_hot(&Tensor::from_slice(&[0i64, 1, 2]), 3);
        let perm = Tensor::from_slice(&[2i64, 0, 1]);
        let (x, y) = mixup(&images, &targets, 0.75, &perm);
        assert!((x.double_value(&[0, 0]) - (0.75 + 0.25 * 3.0)).abs() < 1e-6);
        assert!((y.double_value(&[0, 0]) - 0.75).abs() < 1e-6);
        assert!((y.double_value(&[0, 2]) - 0.25).abs() < 1e-6);
        let (same, _) = mixup(&images, &targets, 1.0, &perm);
        assert!(
            same.allclose(&images, 0.0, 0.0, false),
            "lambda 1 leaves the batch as is"
        );
    }
}
