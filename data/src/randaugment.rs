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
            blend_constant(image, mean, 1.0 + 0.9 * level * sign)
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

/// Inverse affine map `[a, b, c, d, e, f]`: output (x, y) reads input (a x + b y + c,
/// d x + e y + f), relative to the top-left corner as torchvision's shear and translate are.
/// Stepped in 16.16 fixed point along each row.
#[inline(always)]
fn affine(image: &mut Image, m: [f64; 6]) {
    const ONE: f64 = 65536.0;
    let source = image.pixels.clone();
    let (w, h) = (image.width as i64, image.height as i64);
    let (step_x, step_y) = ((m[0] * ONE) as i64, (m[3] * ONE) as i64);
    for (y, row) in image.pixels.chunks_exact_mut(w as usize * 3).enumerate() {
        let yf = y as f64 + 0.5;
        let mut sx = ((m[0] * 0.5 + m[1] * yf + m[2]) * ONE) as i64;
        let mut sy = ((m[3] * 0.5 + m[4] * yf + m[5]) * ONE) as i64;
        for out in row.chunks_exact_mut(3) {
            let (ix, iy) = (sx >> 16, sy >> 16);
            if ix >= 0 && ix < w && iy >= 0 && iy < h {
                let j = ((iy * w + ix) * 3) as usize;
                out.copy_from_slice(&source[j..j + 3]);
            } else {
                out.fill(0);
            }
            sx += step_x;
            sy += step_y;
        }
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

/// `other + factor * (image - other)`, clipped: PIL's ImageEnhance (Image.blend), in 8.8 fixed
/// point.
#[inline(always)]
fn blend(image: &mut Image, other: &Image, factor: f64) {
    let factor = (factor * 256.0).round() as i32;
    for (p, &o) in image.pixels.iter_mut().zip(&other.pixels) {
        let v = ((o as i32) << 8) + factor * (*p as i32 - o as i32);
        *p = (v >> 8).clamp(0, 255) as u8;
    }
}

/// Blend towards one grey level (brightness: 0; contrast: the mean).
#[inline(always)]
fn blend_constant(image: &mut Image, level: u8, factor: f64) {
    let factor = (factor * 256.0).round() as i32;
    let base = (level as i32) << 8;
    for p in &mut image.pixels {
        let v = base + factor * (*p as i32 - level as i32);
        *p = (v >> 8).clamp(0, 255) as u8;
    }
}

#[inline(always)]
fn luma(p: &[u8]) -> u8 {
    // ITU-R 601-2, as PIL's convert("L").
    ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8
}

#[inline(always)]
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

#[inline(always)]
fn mean_gray(image: &Image) -> u8 {
    let n = (image.pixels.len() / 3).max(1) as u64;
    let sum: u64 = image.pixels.chunks_exact(3).map(|p| luma(p) as u64).sum();
    ((sum as f64 / n as f64) + 0.5) as u8
}

/// PIL's SMOOTH filter (3x3, center weight 5, total 13; border pixels kept): a 3x3 box sum,
/// computed separably, plus 4 times the center.
#[inline(always)]
fn smooth(image: &Image) -> Image {
    let mut out = image.clone();
    let (w, h) = (image.width as usize, image.height as usize);
    if w < 3 || h < 3 {
        return out;
    }
    let stride = w * 3;
    // Horizontal sums of three neighbours, per row.
    let mut rows = vec![0u16; h * stride];
    for (src, dst) in image
        .pixels
        .chunks_exact(stride)
        .zip(rows.chunks_exact_mut(stride))
    {
        for i in 3..stride - 3 {
            dst[i] = src[i - 3] as u16 + src[i] as u16 + src[i + 3] as u16;
        }
    }
    for y in 1..h - 1 {
        let (above, here, below) = (
            &rows[(y - 1) * stride..y * stride],
            &rows[y * stride..(y + 1) * stride],
            &rows[(y + 1) * stride..(y + 2) * stride],
        );
        let center = &image.pixels[y * stride..(y + 1) * stride];
        let dst = &mut out.pixels[y * stride..(y + 1) * stride];
        for i in 3..stride - 3 {
            let total = above[i] as u32 + here[i] as u32 + below[i] as u32 + 4 * center[i] as u32;
            dst[i] = ((total + 6) / 13) as u8;
        }
    }
    out
}

#[inline(always)]
fn posterize(image: &mut Image, bits: u32) {
    let mask = !((1u16 << (8 - bits.min(8))) - 1) as u8;
    for p in &mut image.pixels {
        *p &= mask;
    }
}

#[inline(always)]
fn solarize(image: &mut Image, threshold: f64) {
    let lut: [u8; 256] = std::array::from_fn(|v| {
        if v as f64 >= threshold {
            255 - v as u8
        } else {
            v as u8
        }
    });
    for p in &mut image.pixels {
        *p = lut[*p as usize];
    }
}

/// Stretches each channel to the full 0-255 range (PIL's ImageOps.autocontrast, cutoff 0).
#[inline(always)]
fn autocontrast(image: &mut Image) {
    let mut lo = [255u8; 3];
    let mut hi = [0u8; 3];
    for px in image.pixels.chunks_exact(3) {
        for c in 0..3 {
            lo[c] = lo[c].min(px[c]);
            hi[c] = hi[c].max(px[c]);
        }
    }
    let luts: [[u8; 256]; 3] = std::array::from_fn(|c| {
        std::array::from_fn(|v| {
            if hi[c] <= lo[c] {
                return v as u8;
            }
            // Pillow's arithmetic, rounding included: int(v * scale + offset).
            let scale = 255.0 / (hi[c] - lo[c]) as f64;
            let offset = -(lo[c] as f64) * scale;
            (v as f64 * scale + offset).clamp(0.0, 255.0) as u8
        })
    });
    for px in image.pixels.chunks_exact_mut(3) {
        for c in 0..3 {
            px[c] = luts[c][px[c] as usize];
        }
    }
}

/// Histogram equalization per channel, PIL's algorithm.
#[inline(always)]
fn equalize(image: &mut Image) {
    let mut histograms = [[0usize; 256]; 3];
    for px in image.pixels.chunks_exact(3) {
        for c in 0..3 {
            histograms[c][px[c] as usize] += 1;
        }
    }
    let luts: [[u8; 256]; 3] = std::array::from_fn(|c| {
        let histogram = &histograms[c];
        let last = histogram.iter().rposition(|&n| n > 0).unwrap_or(0);
        let total: usize = histogram.iter().sum();
        let step = (total - histogram[last]) / 255;
        let mut lut: [u8; 256] = std::array::from_fn(|v| v as u8);
        if step > 0 {
            let mut n = step / 2;
            for (i, entry) in lut.iter_mut().enumerate() {
                *entry = (n / step).min(255) as u8;
                n += histogram[i];
            }
        }
        lut
    });
    for px in image.pixels.chunks_exact_mut(3) {
        for c in 0..3 {
            px[c] = luts[c][px[c] as usize];
        }
    }
}
