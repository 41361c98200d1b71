//! RandAugment as the official EfficientNetV2 code defines it (google/automl,
//! `efficientnetv2/autoaugment.py`, `distort_image_with_randaugment`), the one the paper's
//! Table 6 magnitudes are given on.
//!
//! Each of `layers` layers applies one of 16 operations drawn uniformly, always. A magnitude
//! `m` is a level on a scale whose nominal top is 10; levels past 10 are extrapolated, never
//! clipped (the L model's last stages use 25):
//!
//! | operation | argument at level m |
//! |---|---|
//! | Rotate | ±3m degrees (sign at random), about the center |
//! | ShearX, ShearY | ±0.03m (sign at random) |
//! | TranslateX, TranslateY | ±10m pixels (sign at random), whatever the image size |
//! | Color, Contrast, Brightness, Sharpness | enhance factor 0.18m + 0.1 |
//! | Posterize | keeps `int(0.4m)` bits (see [`posterize_shift`]) |
//! | Solarize | threshold `int(25.6m)` (see [`solarize_threshold`]) |
//! | SolarizeAdd | adds `int(11m)` to values under 128 |
//! | Cutout | a gray square of side 2·`int(4m)` at a uniformly drawn center |
//! | AutoContrast, Equalize, Invert | no argument |
//!
//! Geometric operations sample the nearest pixel at integer coordinates (TensorFlow Addons'
//! default) and fill what falls outside with gray 128, as does Cutout. Arithmetic follows
//! TensorFlow's: float blends truncated to 8 bits, and the integer arguments converted to the
//! image's uint8 type, which wraps (see the two functions below). One quirk is kept on purpose,
//! since it is what trained the paper's models: Contrast blends towards a gray of
//! `min(255, pixels / 256)` — the official code divides the histogram's *count* by 256, not
//! the intensities' sum by the count.

use super::pixels::{Grid, affine, autocontrast, equalize, map, posterize, sharpen, solarize};
use crate::image::Image;
use ladder_core::rng::Stream;

/// The 16 operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    AutoContrast,
    Equalize,
    Invert,
    Rotate,
    Posterize,
    Solarize,
    Color,
    Contrast,
    Brightness,
    Sharpness,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
    Cutout,
    SolarizeAdd,
}

impl Operation {
    /// In the official code's order (a layer draws one uniformly).
    pub const ALL: [Operation; 16] = [
        Operation::AutoContrast,
        Operation::Equalize,
        Operation::Invert,
        Operation::Rotate,
        Operation::Posterize,
        Operation::Solarize,
        Operation::Color,
        Operation::Contrast,
        Operation::Brightness,
        Operation::Sharpness,
        Operation::ShearX,
        Operation::ShearY,
        Operation::TranslateX,
        Operation::TranslateY,
        Operation::Cutout,
        Operation::SolarizeAdd,
    ];
}

/// The nominal top of the magnitude scale (`_MAX_LEVEL`).
const MAX_LEVEL: f64 = 10.0;

/// Gray: what geometric operations and Cutout fill with.
const GRAY: u8 = 128;

/// What one operation draws besides the operation itself.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Draw {
    /// The direction of Rotate, ShearX/Y and TranslateX/Y.
    pub negative: bool,
    /// Cutout's center, as (row, column) fractions in [0, 1) of the image's height and width.
    pub center: (f64, f64),
}

pub fn apply(image: &mut Image, layers: u32, magnitude: f64, rng: &mut Stream) {
    for _ in 0..layers {
        let op = Operation::ALL[rng.below(Operation::ALL.len() as u64) as usize];
        let draw = Draw {
            negative: rng.unit() < 0.5,
            center: (rng.unit(), rng.unit()),
        };
        apply_op(image, op, magnitude, draw);
    }
}

/// Operation `op` at level `magnitude`.
pub fn apply_op(image: &mut Image, op: Operation, magnitude: f64, draw: Draw) {
    crate::simd::dispatch!(apply_op_body(image, op, magnitude, draw))
}

/// The bits Posterize shifts out at `level`: the official code keeps `int(0.4 level)` bits by
/// shifting right then left by `8 - bits`, a uint8 in TensorFlow, whose shift kernels clamp
/// the amount to 0..=7. So level 20 (8 bits) changes nothing, and below 2.5 (0 bits) or from
/// 22.5 on (`8 - bits` negative, wrapping past 7) only the top bit is kept.
pub fn posterize_shift(level: f64) -> u32 {
    let bits = (level / MAX_LEVEL * 4.0) as i64;
    (8 - bits).rem_euclid(256).min(7) as u32
}

/// Solarize's threshold at `level`: `int(25.6 level)` as TensorFlow compares it with uint8
/// pixels, modulo 256. So level 10 (256, that is 0) inverts every pixel, as does 20, and 25
/// (640, that is 128) inverts the upper half.
pub fn solarize_threshold(level: f64) -> u32 {
    ((level / MAX_LEVEL * 256.0) as i64).rem_euclid(256) as u32
}

#[inline(always)]
fn apply_op_body(image: &mut Image, op: Operation, level: f64, draw: Draw) {
    let sign = if draw.negative { -1.0 } else { 1.0 };
    let enhance = (level / MAX_LEVEL * 1.8 + 0.1) as f32;
    let shear = level / MAX_LEVEL * 0.3 * sign;
    let translate = level / MAX_LEVEL * 100.0 * sign;
    use Operation::*;
    match op {
        AutoContrast => autocontrast(image),
        Equalize => equalize(image),
        Invert => map(image, &std::array::from_fn(|v| 255 - v as u8)),
        Rotate => rotate(image, level / MAX_LEVEL * 30.0 * sign),
        Posterize => posterize(image, posterize_shift(level)),
        Solarize => solarize(image, solarize_threshold(level) as f64),
        Color => color(image, enhance),
        Contrast => {
            let pixels = (image.pixels.len() / 3) as f32;
            let gray = (pixels / 256.0).clamp(0.0, 255.0) as u8;
            blend_towards(image, |_| gray, enhance);
        }
        Brightness => blend_towards(image, |_| 0, enhance),
        Sharpness => sharpness(image, enhance),
        ShearX => affine(
            image,
            [1.0, shear, 0.0, 0.0, 1.0, 0.0],
            Grid::Integers,
            GRAY,
        ),
        ShearY => affine(
            image,
            [1.0, 0.0, 0.0, shear, 1.0, 0.0],
            Grid::Integers,
            GRAY,
        ),
        TranslateX => affine(
            image,
            [1.0, 0.0, translate, 0.0, 1.0, 0.0],
            Grid::Integers,
            GRAY,
        ),
        TranslateY => affine(
            image,
            [1.0, 0.0, 0.0, 0.0, 1.0, translate],
            Grid::Integers,
            GRAY,
        ),
        Cutout => cutout(image, (level / MAX_LEVEL * 40.0) as i64, draw.center),
        SolarizeAdd => {
            let add = (level / MAX_LEVEL * 110.0) as i64;
            let lut: [u8; 256] = std::array::from_fn(|v| {
                if v < 128 {
                    (v as i64 + add).clamp(0, 255) as u8
                } else {
                    v as u8
                }
            });
            map(image, &lut);
        }
    }
}

/// TensorFlow's blend of `degenerate` towards `image` by `factor`: in float, truncated to 8 bits
/// (and clipped first when `factor` extrapolates).
#[inline(always)]
fn blend(degenerate: u8, image: u8, factor: f32) -> u8 {
    let (d, i) = (degenerate as f32, image as f32);
    // `as u8` saturates: the clip of an extrapolation and the truncation in one.
    (d + factor * (i - d)) as u8
}

/// Blends every value towards `degenerate(pixel)` (of its pixel's three values).
#[inline(always)]
fn blend_towards(image: &mut Image, degenerate: impl Fn(&[u8]) -> u8, factor: f32) {
    for px in image.pixels.chunks_exact_mut(3) {
        let d = degenerate(px);
        for p in px {
            *p = blend(d, *p, factor);
        }
    }
}

/// Towards the pixel's gray as `tf.image.rgb_to_grayscale` makes it: weights 0.2989, 0.587,
/// 0.114 on values scaled to [0, 1], back to 8 bits by 255.5 and truncation.
#[inline(always)]
fn color(image: &mut Image, factor: f32) {
    blend_towards(
        image,
        |p| {
            let scaled = |v: u8| v as f32 * (1.0 / 255.0);
            let gray = 0.2989 * scaled(p[0]) + 0.587 * scaled(p[1]) + 0.114 * scaled(p[2]);
            (gray * 255.5) as u8
        },
        factor,
    );
}

/// Blends towards PIL's SMOOTH filter, divided by 13 in float and truncated, as the official
/// code computes it with a depthwise convolution (the border kept: it blends towards itself).
#[inline(always)]
fn sharpness(image: &mut Image, factor: f32) {
    sharpen(
        image,
        |total| (total as f32 / 13.0) as u8,
        |value, smooth| blend(smooth, value, factor),
    );
}

/// Rotation by `degrees` about the image's center, as TensorFlow Addons' `rotate` builds it:
/// output (x, y) reads input (cos x - sin y + dx, sin x + cos y + dy), the offsets keeping
/// ((w - 1) / 2, (h - 1) / 2) in place.
#[inline(always)]
fn rotate(image: &mut Image, degrees: f64) {
    let (s, c) = degrees.to_radians().sin_cos();
    let (w, h) = (image.width as f64 - 1.0, image.height as f64 - 1.0);
    let dx = (w - (c * w - s * h)) / 2.0;
    let dy = (h - (s * w + c * h)) / 2.0;
    affine(image, [c, -s, dx, s, c, dy], Grid::Integers, GRAY);
}

/// A gray square of side `2 * pad` (less where it meets an edge) centered at `center` (row,
/// column fractions: the official code draws an integer row in [0, height) and column in
/// [0, width)).
#[inline(always)]
fn cutout(image: &mut Image, pad: i64, center: (f64, f64)) {
    let (w, h) = (image.width as i64, image.height as i64);
    let cy = ((center.0 * h as f64) as i64).min(h - 1);
    let cx = ((center.1 * w as f64) as i64).min(w - 1);
    let (top, bottom) = ((cy - pad).max(0), (cy + pad).min(h));
    let (left, right) = ((cx - pad).max(0), (cx + pad).min(w));
    for y in top..bottom {
        let row = (y * w * 3) as usize;
        image.pixels[row + left as usize * 3..row + right as usize * 3].fill(GRAY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn posterize_and_solarize_take_their_arguments_as_tensorflow_does() {
        // Levels 0, 2.5, 5, 10, 20, 22.5, 25: bits 0, 1, 2, 4, 8, 9, 10.
        let shifts: Vec<u32> = [0.0, 2.5, 5.0, 10.0, 20.0, 22.5, 25.0]
            .map(posterize_shift)
            .to_vec();
        assert_eq!(shifts, [7, 7, 6, 4, 0, 7, 7]);
        // int(25.6 level) modulo 256.
        let thresholds: Vec<u32> = [0.0, 5.0, 9.0, 10.0, 15.0, 20.0, 25.0]
            .map(solarize_threshold)
            .to_vec();
        assert_eq!(thresholds, [0, 128, 230, 0, 128, 0, 128]);
    }

    #[test]
    fn a_layer_draws_each_of_the_16_operations_alike() {
        let mut rng = Stream::new(3, &[1]);
        let mut drawn = [0u32; 16];
        for _ in 0..16_000 {
            drawn[rng.below(Operation::ALL.len() as u64) as usize] += 1;
        }
        assert!(drawn.iter().all(|&n| (850..1150).contains(&n)), "{drawn:?}");
        // And `apply` draws through the same stream: the same stream, the same image.
        let image = Image {
            width: 8,
            height: 8,
            pixels: (0..192).map(|v| v as u8).collect(),
        };
        let run = |seed| {
            let mut out = image.clone();
            apply(&mut out, 2, 25.0, &mut Stream::new(seed, &[2]));
            out
        };
        assert_eq!(run(1), run(1));
        assert!((2..12).any(|seed| run(seed) != run(1)));
    }

    #[test]
    fn geometric_operations_fill_with_gray_and_cutout_too() {
        let mut image = Image {
            width: 16,
            height: 16,
            pixels: vec![7; 16 * 16 * 3],
        };
        let draw = Draw {
            negative: false,
            center: (0.5, 0.5),
        };
        apply_op(&mut image, Operation::TranslateX, 1.0, draw);
        // 10 pixels a level, to the left: the right 10 columns are gray.
        let row: Vec<u8> = image.pixels[..16 * 3].iter().step_by(3).copied().collect();
        assert_eq!(row, [[7; 6].as_slice(), &[GRAY; 10]].concat());
        let mut image = Image {
            width: 16,
            height: 16,
            pixels: vec![7; 16 * 16 * 3],
        };
        apply_op(&mut image, Operation::Cutout, 1.0, draw);
        // A square of side 2 * int(4) around (8, 8).
        let gray = image.pixels.iter().filter(|&&p| p == GRAY).count();
        assert_eq!(gray, 8 * 8 * 3);
    }
}
