//! Antialiased bilinear resizing of a fractional box, computed the way Pillow's
//! `Image.resize(size, BILINEAR, box)` does (triangle filter widened by the downscale factor,
//! 22-bit fixed-point weights, horizontal pass then vertical), so results match torchvision's
//! PIL path to within a grey level.

use crate::image::{Image, Rect};

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: the first input index and the fixed-point weights.
struct Coefficients {
    start: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

fn coefficients(in_size: u32, box_start: f64, box_end: f64, out_size: u32) -> Coefficients {
    let scale = (box_end - box_start) / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter_scale;
    let mut start = Vec::with_capacity(out_size as usize);
    let mut weights = Vec::with_capacity(out_size as usize);
    for i in 0..out_size {
        let center = box_start + (i as f64 + 0.5) * scale;
        let lo = ((center - support + 0.5) as i64).max(0) as usize;
        let hi = ((center + support + 0.5) as i64)
            .min(in_size as i64)
            .max(lo as i64) as usize;
        let raw: Vec<f64> = (lo..hi)
            .map(|x| {
                let t = ((x as f64 - center + 0.5) / filter_scale).abs();
                if t < 1.0 { 1.0 - t } else { 0.0 }
            })
            .collect();
        let total: f64 = raw.iter().sum();
        let fixed = raw
            .iter()
            .map(|w| {
                let w = if total != 0.0 { w / total } else { 0.0 };
                let v = w * (1u32 << PRECISION_BITS) as f64;
                (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i32
            })
            .collect();
        start.push(lo);
        weights.push(fixed);
    }
    Coefficients { start, weights }
}

fn clip(v: i64) -> u8 {
    let v = v >> PRECISION_BITS;
    v.clamp(0, 255) as u8
}

const ROUND: i64 = 1 << (PRECISION_BITS - 1);

/// Resizes `source` (a box in `image`'s pixel coordinates) to `width` x `height`.
pub fn resize(image: &Image, source: Rect, width: u32, height: u32) -> Image {
    let horizontal = coefficients(image.width, source.x, source.x + source.width, width);
    let vertical = coefficients(image.height, source.y, source.y + source.height, height);
    // Only the input rows that some output row reads go through the horizontal pass.
    let first_row = *vertical.start.first().unwrap_or(&0);
    let last_row = vertical
        .start
        .iter()
        .zip(&vertical.weights)
        .map(|(s, w)| s + w.len())
        .max()
        .unwrap_or(first_row)
        .max(first_row + 1)
        .min(image.height as usize);
    let rows = last_row - first_row;
    let in_stride = image.width as usize * 3;
    let mut middle = vec![0u8; rows * width as usize * 3];
    for r in 0..rows {
        let src = &image.pixels[(first_row + r) * in_stride..(first_row + r + 1) * in_stride];
        let dst = &mut middle[r * width as usize * 3..(r + 1) * width as usize * 3];
        for (x, (start, ws)) in horizontal.start.iter().zip(&horizontal.weights).enumerate() {
            let mut acc = [ROUND; 3];
            for (k, &w) in ws.iter().enumerate() {
                let p = &src[(start + k) * 3..(start + k) * 3 + 3];
                acc[0] += p[0] as i64 * w as i64;
                acc[1] += p[1] as i64 * w as i64;
                acc[2] += p[2] as i64 * w as i64;
            }
            dst[x * 3] = clip(acc[0]);
            dst[x * 3 + 1] = clip(acc[1]);
            dst[x * 3 + 2] = clip(acc[2]);
        }
    }
    let out_stride = width as usize * 3;
    let mut out = Image::new(width, height);
    for (y, (start, ws)) in vertical.start.iter().zip(&vertical.weights).enumerate() {
        let dst = &mut out.pixels[y * out_stride..(y + 1) * out_stride];
        let mut acc = vec![ROUND; out_stride];
        for (k, &w) in ws.iter().enumerate() {
            let row = start + k - first_row;
            let src = &middle[row * out_stride..(row + 1) * out_stride];
            for (a, &p) in acc.iter_mut().zip(src) {
                *a += p as i64 * w as i64;
            }
        }
        for (d, a) in dst.iter_mut().zip(acc) {
            *d = clip(a);
        }
    }
    out
}
