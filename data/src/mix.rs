//! Mixup and CutMix for one micro-batch, drawn as the official EfficientNetV2 code draws them
//! (google/automl `efficientnetv2/datasets.py`: `mixup`, `cutmix_mask`, `cutmix`, `mixing`),
//! seeded by (job seed, epoch, step, micro-batch index) so every rank and every rerun mixes
//! alike. The model side applies the plan (`ladder_worker::loss::mix`).
//!
//! - Mixup: each row its own weight, drawn from Beta(alpha, alpha) and folded to at least 1/2,
//!   blending the row with its mirror in the (reversed) rows it is mixed among; labels alike.
//! - CutMix: each row a box pasted from its mirror: its center uniform over the image, its sides
//!   `int(sqrt(1 - a) * size)` for `a` from Beta(alpha, alpha), halved each way from the center
//!   and clipped at the edges. The labels of all the CutMix rows take one weight: the share of
//!   their pixels pasted, over them all (the official code averages the mask over the batch).
//! - Both on: the first half of the rows mixes up, the second half cuts (each half mirrored
//!   within itself); neither alone at 0. Label smoothing applies after mixing, to the mixed
//!   labels (the same, since smoothing is affine and the weights sum to 1).
//!
//! The official code mixes the batch a TPU core holds; Ladder mixes each micro-batch, the
//! batch a forward pass and its BatchNorm see.

use ladder_core::rng::Stream;

const MIX_STREAM: u64 = 0x4d49_5855; // "MIXU"

/// A pasted box, rows `top..bottom` and columns `left..right` (empty when clipped away).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cut {
    pub top: u32,
    pub bottom: u32,
    pub left: u32,
    pub right: u32,
}

impl Cut {
    pub fn pixels(&self) -> u64 {
        (self.bottom - self.top) as u64 * (self.right - self.left) as u64
    }
}

/// How each row of a micro-batch is mixed.
#[derive(Clone, Debug, PartialEq)]
pub enum Row {
    /// Kept as it is.
    Kept,
    /// `weight * row + (1 - weight) * partner`, the image and the label.
    Mixup { partner: usize, weight: f64 },
    /// The image takes `partner`'s pixels inside `cut`; the label is
    /// `(1 - label_weight) * row + label_weight * partner`.
    Cutmix {
        partner: usize,
        cut: Cut,
        label_weight: f64,
    },
}

/// The mixing of one micro-batch: a [`Row`] each.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub rows: Vec<Row>,
    /// The raw draws, row by row: from Beta(alpha, alpha) (Mixup's before folding, CutMix's
    /// `a`), and the CutMix rows' box centers (row, column): what the oracle tests read.
    pub beta_draws: Vec<f64>,
    pub centers: Vec<(u32, u32)>,
}

impl Plan {
    /// Whether any row is mixed.
    pub fn mixes(&self) -> bool {
        self.rows.iter().any(|r| *r != Row::Kept)
    }
}

/// The partner of row `i` among rows `range`: its mirror, as the official code pairs a batch
/// with itself reversed.
fn mirror(i: usize, range: &std::ops::Range<usize>) -> usize {
    range.start + range.end - 1 - i
}

/// The plan for a micro-batch of `rows` images of `size` x `size`, or `None` when both alphas
/// are 0 (no mixing at this stage).
#[allow(clippy::too_many_arguments)]
pub fn draw(
    seed: u64,
    epoch: u32,
    step: u64,
    micro: u32,
    mixup_alpha: f64,
    cutmix_alpha: f64,
    rows: usize,
    size: u32,
) -> Option<Plan> {
    let (mixup, cutmix) = (mixup_alpha > 0.0, cutmix_alpha > 0.0);
    let (mixed, cut) = match (mixup, cutmix) {
        (false, false) => return None,
        (true, false) => (0..rows, rows..rows),
        (false, true) => (0..0, 0..rows),
        (true, true) => (0..rows / 2, rows / 2..rows),
    };
    let mut rng = Stream::new(seed, &[MIX_STREAM, epoch as u64, step, micro as u64]);
    let mut plan = Plan {
        rows: vec![Row::Kept; rows],
        beta_draws: Vec::with_capacity(rows),
        centers: Vec::with_capacity(cut.len()),
    };
    for i in mixed.clone() {
        let lambda = beta(mixup_alpha, &mut rng);
        plan.beta_draws.push(lambda);
        plan.rows[i] = Row::Mixup {
            partner: mirror(i, &mixed),
            weight: lambda.max(1.0 - lambda),
        };
    }
    let mut pasted = 0u64;
    for i in cut.clone() {
        let center_y = rng.below(size as u64) as i64;
        let center_x = rng.below(size as u64) as i64;
        let area = beta(cutmix_alpha, &mut rng);
        plan.beta_draws.push(area);
        plan.centers.push((center_y as u32, center_x as u32));
        let side = ((1.0 - area).sqrt() * size as f64) as i64;
        let clip = |v: i64| v.clamp(0, size as i64) as u32;
        let box_ = Cut {
            top: clip(center_y - side / 2),
            bottom: clip(center_y + side / 2),
            left: clip(center_x - side / 2),
            right: clip(center_x + side / 2),
        };
        pasted += box_.pixels();
        plan.rows[i] = Row::Cutmix {
            partner: mirror(i, &cut),
            cut: box_,
            label_weight: 0.0,
        };
    }
    let all = cut.len() as u64 * size as u64 * size as u64;
    for row in &mut plan.rows[cut] {
        if let Row::Cutmix { label_weight, .. } = row {
            *label_weight = pasted as f64 / all as f64;
        }
    }
    Some(plan)
}

/// Mixes 8-bit images as `plan` says, as the worker mixes a micro-batch on its device (for a
/// person to look at: `ladder preview`).
pub fn apply(images: &mut [crate::image::Image], plan: &Plan) {
    let sources = images.to_vec();
    for (i, row) in plan.rows.iter().enumerate() {
        let image = &mut images[i];
        match row {
            Row::Kept => {}
            Row::Mixup { partner, weight } => {
                let other = &sources[*partner].pixels;
                for (p, q) in image.pixels.iter_mut().zip(other) {
                    *p = (weight * *p as f64 + (1.0 - weight) * *q as f64).round() as u8;
                }
            }
            Row::Cutmix { partner, cut, .. } => {
                let (w, other) = (image.width as usize, &sources[*partner].pixels);
                for y in cut.top as usize..cut.bottom as usize {
                    let span = (y * w + cut.left as usize) * 3..(y * w + cut.right as usize) * 3;
                    image.pixels[span.clone()].copy_from_slice(&other[span]);
                }
            }
        }
    }
}

/// A draw from Beta(alpha, alpha), as the ratio of two Gamma(alpha) draws.
pub fn beta(alpha: f64, rng: &mut Stream) -> f64 {
    let x = gamma(alpha, rng);
    let y = gamma(alpha, rng);
    if x + y > 0.0 { x / (x + y) } else { 0.5 }
}

fn normal(rng: &mut Stream) -> f64 {
    // Box-Muller; 1 - u keeps the logarithm finite.
    let (u, v) = (1.0 - rng.unit(), rng.unit());
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

/// Gamma(shape, 1) by Marsaglia and Tsang (2000); shapes below 1 through the boost
/// Gamma(a) = Gamma(a + 1) * U^(1 / a).
fn gamma(shape: f64, rng: &mut Stream) -> f64 {
    if shape < 1.0 {
        let boost = (1.0 - rng.unit()).powf(1.0 / shape);
        return gamma(shape + 1.0, rng) * boost;
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let z = normal(rng);
        let v = (1.0 + c * z).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u = 1.0 - rng.unit();
        if u.ln() < 0.5 * z * z + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_mix_up_and_cut_mirrored_and_draws_are_reproducible() {
        assert!(
            draw(1, 0, 0, 0, 0.0, 0.0, 8, 32).is_none(),
            "both off: no mixing"
        );
        let plan = draw(1, 2, 3, 4, 0.2, 0.2, 8, 32).unwrap();
        assert_eq!(plan, draw(1, 2, 3, 4, 0.2, 0.2, 8, 32).unwrap());
        assert_ne!(plan, draw(1, 2, 3, 5, 0.2, 0.2, 8, 32).unwrap());
        let partners: Vec<usize> = plan
            .rows
            .iter()
            .map(|r| match r {
                Row::Mixup { partner, weight } => {
                    assert!((0.5..=1.0).contains(weight), "folded: {weight}");
                    *partner
                }
                Row::Cutmix { partner, .. } => *partner,
                Row::Kept => panic!("every row mixes"),
            })
            .collect();
        assert_eq!(partners, [3, 2, 1, 0, 7, 6, 5, 4]);
        assert!(matches!(plan.rows[..4], [Row::Mixup { .. }, ..]));
        assert!(matches!(plan.rows[4..], [Row::Cutmix { .. }, ..]));
        // One alone mixes every row.
        let cut = draw(1, 2, 3, 4, 0.0, 1.0, 5, 32).unwrap();
        assert!(cut.rows.iter().all(|r| matches!(r, Row::Cutmix { .. })));
        let mixed = draw(1, 2, 3, 4, 1.0, 0.0, 5, 32).unwrap();
        assert!(mixed.rows.iter().all(|r| matches!(r, Row::Mixup { .. })));
    }

    #[test]
    fn the_cut_rows_share_the_pasted_share_of_their_pixels() {
        let plan = draw(9, 0, 0, 0, 0.0, 1.0, 6, 40).unwrap();
        let cuts: Vec<(Cut, f64)> = plan
            .rows
            .iter()
            .map(|r| match r {
                Row::Cutmix {
                    cut, label_weight, ..
                } => (*cut, *label_weight),
                _ => unreachable!(),
            })
            .collect();
        let pasted: u64 = cuts.iter().map(|(c, _)| c.pixels()).sum();
        let share = pasted as f64 / (6.0 * 40.0 * 40.0);
        assert!(
            cuts.iter()
                .all(|&(c, w)| w == share && c.bottom <= 40 && c.right <= 40)
        );
    }

    #[test]
    fn beta_draws_have_beta_moments() {
        // Beta(a, a) has mean 1/2 and variance 1 / (4 (2a + 1)).
        for alpha in [0.2f64, 0.4, 1.0] {
            let mut rng = Stream::new(7, &[alpha.to_bits()]);
            let draws: Vec<f64> = (0..20_000).map(|_| beta(alpha, &mut rng)).collect();
            let mean = draws.iter().sum::<f64>() / draws.len() as f64;
            let var = draws.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / draws.len() as f64;
            let expected = 1.0 / (4.0 * (2.0 * alpha + 1.0));
            assert!((mean - 0.5).abs() < 0.01, "alpha {alpha}: mean {mean}");
            assert!(
                (var - expected).abs() < 0.01,
                "alpha {alpha}: variance {var}"
            );
            assert!(draws.iter().all(|l| (0.0..=1.0).contains(l)));
        }
    }
}
