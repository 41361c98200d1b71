//! Per-sample transforms of a stage: RandomResizedCrop (torchvision's sampling), horizontal
//! flip and RandAugment for training; a center crop for evaluation. Every random draw comes from
//! the sample's own stream, seeded by (job seed, epoch, sample id): a sample gets the same
//! pixels on any rank and at any world size.

use crate::decode::{self, DecodeError};
use crate::image::{Image, Rect};
use crate::randaugment;
use crate::resample::resize;
use ladder_core::dataset::ImageFormat;
use ladder_core::rng::Stream;

const AUGMENT_STREAM: u64 = 0x4155_474d; // "AUGM"

/// A sample's random stream in `epoch`.
pub fn sample_stream(seed: u64, epoch: u32, sample: u64) -> Stream {
    Stream::new(seed, &[AUGMENT_STREAM, epoch as u64, sample])
}

/// The training transform of a stage.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainTransform {
    pub size: u32,
    pub crop_scale: [f64; 2],
    pub crop_ratio: [f64; 2],
    /// RandAugment's definition, magnitude (on that definition's scale) and layers (0 turns
    /// it off).
    pub randaugment: randaugment::RandAugmentScale,
    pub randaugment_magnitude: f64,
    pub randaugment_layers: u32,
}

/// torchvision's `RandomResizedCrop.get_params`: ten tries at an area fraction and a
/// log-uniform aspect ratio, else the largest central crop within the ratio range.
pub fn random_resized_crop(
    width: u32,
    height: u32,
    scale: [f64; 2],
    ratio: [f64; 2],
    rng: &mut Stream,
) -> Rect {
    let (w_total, h_total) = (width as f64, height as f64);
    let area = w_total * h_total;
    let (log_lo, log_hi) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target = area * (scale[0] + (scale[1] - scale[0]) * rng.unit());
        let aspect = (log_lo + (log_hi - log_lo) * rng.unit()).exp();
        let w = (target * aspect).sqrt().round();
        let h = (target / aspect).sqrt().round();
        if w > 0.0 && w <= w_total && h > 0.0 && h <= h_total {
            let top = rng.below((h_total - h) as u64 + 1) as f64;
            let left = rng.below((w_total - w) as u64 + 1) as f64;
            return Rect {
                x: left,
                y: top,
                width: w,
                height: h,
            };
        }
    }
    let in_ratio = w_total / h_total;
    let (w, h) = if in_ratio < ratio[0] {
        (w_total, (w_total / ratio[0]).round())
    } else if in_ratio > ratio[1] {
        ((h_total * ratio[1]).round(), h_total)
    } else {
        (w_total, h_total)
    };
    Rect {
        x: ((w_total - w) / 2.0).floor(),
        y: ((h_total - h) / 2.0).floor(),
        width: w,
        height: h,
    }
}

pub fn flip_horizontal(image: &mut Image) {
    let row = image.width as usize * 3;
    for line in image.pixels.chunks_exact_mut(row) {
        let w = line.len() / 3;
        for x in 0..w / 2 {
            let (a, b) = (x * 3, (w - 1 - x) * 3);
            for c in 0..3 {
                line.swap(a + c, b + c);
            }
        }
    }
}

impl TrainTransform {
    /// The training transform of epoch `e` of `spec`'s plan.
    pub fn of_epoch(
        spec: &ladder_core::spec::JobSpec,
        e: &ladder_core::stage::EpochParams,
    ) -> Self {
        TrainTransform {
            size: e.image_size,
            crop_scale: spec.data.crop_scale,
            crop_ratio: spec.data.crop_ratio,
            randaugment: spec.schedule.randaugment,
            randaugment_magnitude: e.randaugment_magnitude,
            randaugment_layers: if e.randaugment_magnitude > 0.0 {
                ladder_core::stage::RANDAUGMENT_LAYERS
            } else {
                0
            },
        }
    }

    /// Decodes and augments one sample: crop sampled at full resolution, decoded at the
    /// smallest DCT scale that covers it, resized, flipped with probability 1/2, RandAugment.
    pub fn apply(
        &self,
        bytes: &[u8],
        format: ImageFormat,
        rng: &mut Stream,
    ) -> Result<Image, DecodeError> {
        let (width, height) = decode::dimensions(bytes, format)?;
        let crop = random_resized_crop(width, height, self.crop_scale, self.crop_ratio, rng);
        let decoded = decode::decode(bytes, format, Some(crop), self.size, self.size)?;
        let mut image = resize(&decoded.image, decoded.map(&crop), self.size, self.size);
        if rng.unit() < 0.5 {
            flip_horizontal(&mut image);
        }
        randaugment::apply(
            &mut image,
            self.randaugment,
            self.randaugment_layers,
            self.randaugment_magnitude,
            rng,
        );
        Ok(image)
    }
}

/// Evaluation: the central `size / (size + 32)` of the shorter side (the official code's crop
/// padding of 32), resized to `size` x `size`.
pub fn eval_transform(bytes: &[u8], format: ImageFormat, size: u32) -> Result<Image, DecodeError> {
    let (width, height) = decode::dimensions(bytes, format)?;
    let side = width.min(height) as f64 * size as f64 / (size as f64 + 32.0);
    let crop = Rect {
        x: ((width as f64 - side) / 2.0).round(),
        y: ((height as f64 - side) / 2.0).round(),
        width: side.round(),
        height: side.round(),
    };
    let decoded = decode::decode(bytes, format, Some(crop), size, size)?;
    Ok(resize(&decoded.image, decoded.map(&crop), size, size))
}
