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
        6 => blend_constant(image, 0, 1.0 + 0.9 * level * sign),
        7 => blend_grayscale(image, 1.0 + 0.9 * level * sign),
        8 => {
            let mean = mean_gray(image);
            blend_constant(image, mean, 1.0 + 0.9 * level * sign)
        }
        9 => sharpness(image, 1.0 + 0.9 * level * sign),
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
    let (w, h) = (image.width as i64, image.height as i64);
    let (step_x, step_y) = ((m[0] * ONE) as i64, (m[3] * ONE) as i64);
    let mut output = take_scratch(image.pixels.len());
    for (y, row) in output.chunks_exact_mut(w as usize * 3).enumerate() {
        let yf = y as f64 + 0.5;
        let mut sx = ((m[0] * 0.5 + m[1] * yf + m[2]) * ONE) as i64;
        let mut sy = ((m[3] * 0.5 + m[4] * yf + m[5]) * ONE) as i64;
        for out in row.chunks_exact_mut(3) {
            let (ix, iy) = (sx >> 16, sy >> 16);
            if ix >= 0 && ix < w && iy >= 0 && iy < h {
                let j = ((iy * w + ix) * 3) as usize;
                out.copy_from_slice(&image.pixels[j..j + 3]);
            } else {
                out.fill(0);
            }
            sx += step_x;
            sy += step_y;
        }
    }
    replace_pixels(image, output);
}

thread_local! {
    // A second image buffer per thread, so operations that read pixels they overwrite need no
    // allocation per image (large ones would cost page faults each time).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// This thread's scratch buffer, `len` bytes long (contents unspecified).
fn take_scratch(len: usize) -> Vec<u8> {
    let mut buffer = SCRATCH.take();
    buffer.resize(len, 0);
    buffer
}

/// Makes `output` the image's pixels; the old pixels become the thread's scratch buffer.
fn replace_pixels(image: &mut Image, output: Vec<u8>) {
    SCRATCH.set(std::mem::replace(&mut image.pixels, output));
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

/// Blend towards PIL's SMOOTH filter (3x3, center weight 5, total 13; border pixels kept):
/// ImageEnhance.Sharpness. The 3x3 sums are a running sum of three column sums.
#[inline(always)]
fn sharpness(image: &mut Image, factor: f64) {
    let (w, h) = (image.width as usize, image.height as usize);
    if w < 3 || h < 3 {
        return;
    }
    let factor = fixed_factor(factor);
    let stride = w * 3;
    let mut output = take_scratch(image.pixels.len());
    // Border rows and columns keep their pixels.
    output.copy_from_slice(&image.pixels);
    for y in 1..h - 1 {
        let rows = &image.pixels[(y - 1) * stride..(y + 2) * stride];
        let (above, here, below) = (
            &rows[..stride],
            &rows[stride..2 * stride],
            &rows[2 * stride..],
        );
        let column = |i: usize| above[i] as u32 + here[i] as u32 + below[i] as u32;
        let dst = &mut output[y * stride..(y + 1) * stride];
        for i in 3..stride - 3 {
            let total = column(i - 3) + column(i) + column(i + 3) + 4 * here[i] as u32;
            let smooth = ((total + 6) / 13) as u8;
            dst[i] = blend_value(here[i], smooth, factor);
        }
    }
    replace_pixels(image, output);
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
