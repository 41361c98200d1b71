//! RandAugment (Cubuk et al. 2020) as torchvision implements it: `layers` operations drawn
//! uniformly from 14, each at `magnitude` on a 0-30 scale (torchvision's 31 bins), signed at
//! random where the operation has a direction. Geometric operations use nearest-neighbour
//! sampling and fill with black, as torchvision's defaults do.

use super::pixels::{Grid, autocontrast, equalize, posterize, sharpen, solarize};
use crate::image::Image;
use ladder_core::rng::Stream;

pub const OPERATIONS: usize = 14;

/// Torchvision's (PIL's) geometry: pixel centers, black outside.
fn affine(image: &mut Image, m: [f64; 6]) {
    super::pixels::affine(image, m, Grid::Centers, 0);
}

pub fn apply(image: &mut Image, layers: u32, magnitude: f64, rng: &mut Stream) {
    for _ in 0..layers {
        let op = rng.below(OPERATIONS as u64) as usize;
        let negative = rng.unit() < 0.5;
        apply_op(image, op, magnitude, negative);
    }
}

/// Operation `op` at `magnitude` (0-30).
pub fn apply_op(image: &mut Image, op: usize, magnitude: f64, negative: bool) {
    crate::simd::dispatch!(apply_op_body(image, op, magnitude, negative))
}

#[inline(always)]
fn apply_op_body(image: &mut Image, op: usize, magnitude: f64, negative: bool) {
    let level = (magnitude / 30.0).clamp(0.0, 1.0);
    let sign = if negative { -1.0 } else { 1.0 };
    let (w, h) = (image.width as f64, image.height as f64);
    match op {
        0 => {}
        1 => affine(image, [1.0, (0.3 * level * sign), 0.0, 0.0, 1.0, 0.0]),
        2 => affine(image, [1.0, 0.0, 0.0, 0.3 * level * sign, 1.0, 0.0]),
        3 => affine(
            image,
            [
                1.0,
                0.0,
                -(150.0 / 331.0 * w * level * sign).trunc(),
                0.0,
                1.0,
                0.0,
            ],
        ),
        4 => affine(
            image,
            [
                1.0,
                0.0,
                0.0,
                0.0,
                1.0,
                -(150.0 / 331.0 * h * level * sign).trunc(),
            ],
        ),
        5 => rotate(image, 30.0 * level * sign),
        6 => blend_constant(image, 0, 1.0 + 0.9 * level * sign),
        7 => blend_grayscale(image, 1.0 + 0.9 * level * sign),
        8 => {
            let mean = mean_gray(image);
            blend_constant(image, mean, 1.0 + 0.9 * level * sign)
        }
        9 => sharpness(image, 1.0 + 0.9 * level * sign),
        10 => posterize(image, (magnitude / 7.5).round().clamp(0.0, 8.0) as u32),
        11 => solarize(image, 255.0 * (1.0 - level)),
        12 => autocontrast(image),
        _ => equalize(image),
    }
}

/// Rotation by `degrees` counter-clockwise about the center.
#[inline(always)]
fn rotate(image: &mut Image, degrees: f64) {
    let (s, c) = degrees.to_radians().sin_cos();
    let (cx, cy) = (image.width as f64 / 2.0, image.height as f64 / 2.0);
    // Output (x, y) reads the input point rotated back by `degrees`.
    affine(
        image,
        [c, -s, cx - c * cx + s * cy, s, c, cy - s * cx - c * cy],
    );
}

/// `other + factor * (value - other)`, clipped: PIL's ImageEnhance (Image.blend) in 8.8 fixed
/// point, with `factor` already scaled by 256.
#[inline(always)]
fn blend_value(value: u8, other: u8, factor: i32) -> u8 {
    let v = ((other as i32) << 8) + factor * (value as i32 - other as i32);
    (v >> 8).clamp(0, 255) as u8
}

fn fixed_factor(factor: f64) -> i32 {
    (factor * 256.0).round() as i32
}

/// Blend towards one grey level (brightness: 0; contrast: the mean).
#[inline(always)]
fn blend_constant(image: &mut Image, level: u8, factor: f64) {
    let factor = fixed_factor(factor);
    for p in &mut image.pixels {
        *p = blend_value(*p, level, factor);
    }
}

/// Blend towards the image's own greyscale (PIL's ImageEnhance.Color).
#[inline(always)]
fn blend_grayscale(image: &mut Image, factor: f64) {
    let factor = fixed_factor(factor);
    for px in image.pixels.chunks_exact_mut(3) {
        let gray = luma(px);
        for p in px {
            *p = blend_value(*p, gray, factor);
        }
    }
}

#[inline(always)]
fn luma(p: &[u8]) -> u8 {
    // ITU-R 601-2, as PIL's convert("L").
    ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8
}

#[inline(always)]
fn mean_gray(image: &Image) -> u8 {
    let n = (image.pixels.len() / 3).max(1) as u64;
    let sum: u64 = image.pixels.chunks_exact(3).map(|p| luma(p) as u64).sum();
    ((sum as f64 / n as f64) + 0.5) as u8
}

/// Blend towards PIL's SMOOTH filter (rounded): ImageEnhance.Sharpness.
#[inline(always)]
fn sharpness(image: &mut Image, factor: f64) {
    let factor = fixed_factor(factor);
    sharpen(
        image,
        |total| ((total + 6) / 13) as u8,
        |value, smooth| blend_value(value, smooth, factor),
    );
}
