//! RandAugment (Cubuk et al. 2020) as torchvision implements it: `layers` operations drawn
//! uniformly from 14, each at `magnitude` on a 0-30 scale (torchvision's 31 bins), signed at
//! random where the operation has a direction. Geometric operations use nearest-neighbour
//! sampling and fill with black, as torchvision's defaults do.

use crate::image::Image;
use ladder_core::rng::Stream;

pub const OPERATIONS: usize = 14;

pub fn apply(image: &mut Image, layers: u32, magnitude: f64, rng: &mut Stream) {
    for _ in 0..layers {
        let op = rng.below(OPERATIONS as u64) as usize;
        let negative = rng.unit() < 0.5;
        apply_op(image, op, magnitude, negative);
    }
}

/// Operation `op` at `magnitude` (0-30).
pub fn apply_op(image: &mut Image, op: usize, magnitude: f64, negative: bool) {
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
        6 => blend(
            image,
            &Image::new(image.width, image.height),
            1.0 + 0.9 * level * sign,
        ),
        7 => {
            let gray = grayscale(image);
            blend(image, &gray, 1.0 + 0.9 * level * sign)
        }
        8 => {
            let mean = mean_gray(image);
            let flat = Image {
                width: image.width,
                height: image.height,
                pixels: vec![mean; image.pixels.len()],
            };
            blend(image, &flat, 1.0 + 0.9 * level * sign)
        }
        9 => {
            let blurred = smooth(image);
            blend(image, &blurred, 1.0 + 0.9 * level * sign)
        }
        10 => posterize(image, 8 - (magnitude / 7.5).round().clamp(0.0, 8.0) as u32),
        11 => solarize(image, 255.0 * (1.0 - level)),
        12 => autocontrast(image),
        _ => equalize(image),
    }
}

/// Inverse affine map `[a, b, c, d, e, f]` (output (x, y) reads input (a x + b y + c, d x + e y
/// + f)), relative to the top-left corner as torchvision's shear and translate are.
fn affine(image: &mut Image, m: [f64; 6]) {
    let source = image.clone();
    let (w, h) = (image.width as i64, image.height as i64);
    for y in 0..h {
        for x in 0..w {
            let (xf, yf) = (x as f64 + 0.5, y as f64 + 0.5);
            let sx = (m[0] * xf + m[1] * yf + m[2]).floor() as i64;
            let sy = (m[3] * xf + m[4] * yf + m[5]).floor() as i64;
            let i = ((y * w + x) * 3) as usize;
            if (0..w).contains(&sx) && (0..h).contains(&sy) {
                let j = ((sy * w + sx) * 3) as usize;
                image.pixels[i..i + 3].copy_from_slice(&source.pixels[j..j + 3]);
            } else {
                image.pixels[i..i + 3].fill(0);
            }
        }
    }
}

/// Rotation by `degrees` counter-clockwise about the center.
fn rotate(image: &mut Image, degrees: f64) {
    let (s, c) = degrees.to_radians().sin_cos();
    let (cx, cy) = (image.width as f64 / 2.0, image.height as f64 / 2.0);
    // Output (x, y) reads the input point rotated back by `degrees`.
    affine(
        image,
        [c, -s, cx - c * cx + s * cy, s, c, cy - s * cx - c * cy],
    );
}

/// `other + factor * (image - other)`, clipped: PIL's ImageEnhance.
fn blend(image: &mut Image, other: &Image, factor: f64) {
    for (p, &o) in image.pixels.iter_mut().zip(&other.pixels) {
        let v = o as f64 + factor * (*p as f64 - o as f64);
        *p = v.round().clamp(0.0, 255.0) as u8;
    }
}

fn luma(p: &[u8]) -> u8 {
    // ITU-R 601-2, as PIL's convert("L").
    ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8
}

fn grayscale(image: &Image) -> Image {
    let pixels = image
        .pixels
        .chunks_exact(3)
        .flat_map(|p| [luma(p); 3])
        .collect();
    Image {
        width: image.width,
        height: image.height,
        pixels,
    }
}

fn mean_gray(image: &Image) -> u8 {
    let n = (image.pixels.len() / 3).max(1) as u64;
    let sum: u64 = image.pixels.chunks_exact(3).map(|p| luma(p) as u64).sum();
    ((sum as f64 / n as f64) + 0.5) as u8
}

/// PIL's SMOOTH filter (3x3, center weight 5, total 13), border pixels kept.
fn smooth(image: &Image) -> Image {
    let mut out = image.clone();
    let (w, h) = (image.width as usize, image.height as usize);
    for y in 1..h.saturating_sub(1) {
        for x in 1..w.saturating_sub(1) {
            for c in 0..3 {
                let mut acc = 0u32;
                for dy in 0..3 {
                    for dx in 0..3 {
                        let weight = if dx == 1 && dy == 1 { 5 } else { 1 };
                        acc +=
                            weight * image.pixels[((y + dy - 1) * w + x + dx - 1) * 3 + c] as u32;
                    }
                }
                out.pixels[(y * w + x) * 3 + c] = ((acc + 6) / 13) as u8;
            }
        }
    }
    out
}

fn posterize(image: &mut Image, bits: u32) {
    let mask = !((1u16 << (8 - bits.min(8))) - 1) as u8;
    for p in &mut image.pixels {
        *p &= mask;
    }
}

fn solarize(image: &mut Image, threshold: f64) {
    for p in &mut image.pixels {
        if *p as f64 >= threshold {
            *p = 255 - *p;
        }
    }
}

/// Stretches each channel to the full 0-255 range.
fn autocontrast(image: &mut Image) {
    for c in 0..3 {
        let channel = image.pixels.iter().skip(c).step_by(3);
        let (lo, hi) = channel.fold((255u8, 0u8), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        if hi > lo {
            let scale = 255.0 / (hi - lo) as f64;
            for p in image.pixels.iter_mut().skip(c).step_by(3) {
                *p = ((*p - lo) as f64 * scale).round().clamp(0.0, 255.0) as u8;
            }
        }
    }
}

/// Histogram equalization per channel, PIL's algorithm.
fn equalize(image: &mut Image) {
    for c in 0..3 {
        let mut histogram = [0usize; 256];
        for &v in image.pixels.iter().skip(c).step_by(3) {
            histogram[v as usize] += 1;
        }
        let last = histogram.iter().rposition(|&n| n > 0).unwrap_or(0);
        let total: usize = histogram.iter().sum();
        let step = (total - histogram[last]) / 255;
        if step == 0 {
            continue;
        }
        let mut lut = [0u8; 256];
        let mut n = step / 2;
        for (i, entry) in lut.iter_mut().enumerate() {
            *entry = (n / step).min(255) as u8;
            n += histogram[i];
        }
        for p in image.pixels.iter_mut().skip(c).step_by(3) {
            *p = lut[*p as usize];
        }
    }
}
