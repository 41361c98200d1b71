//! Antialiased bilinear resizing of a fractional box, computed the way Pillow's
//! `Image.resize(size, BILINEAR, box)` does (triangle filter widened by the downscale factor,
//! 22-bit fixed-point weights, horizontal pass then vertical), so results match torchvision's
//! PIL path to within a grey level.

use crate::image::{Image, Rect};

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: the first input index and `taps` fixed-point weights (zero-padded).
struct Coefficients {
    start: Vec<usize>,
    taps: usize,
    weights: Vec<i32>,
}

fn coefficients(in_size: u32, box_start: f64, box_end: f64, out_size: u32) -> Coefficients {
    let scale = (box_end - box_start) / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter_scale;
    // Each output's input window [lo, hi), as Pillow bounds it.
    let windows: Vec<(usize, usize, f64)> = (0..out_size)
        .map(|i| {
            let center = box_start + (i as f64 + 0.5) * scale;
            let lo = ((center - support + 0.5) as i64).clamp(0, in_size as i64 - 1) as usize;
            let hi =
                ((center + support + 0.5) as i64).clamp(lo as i64 + 1, in_size as i64) as usize;
            (lo, hi, center)
        })
        .collect();
    let taps = windows.iter().map(|(lo, hi, _)| hi - lo).max().unwrap_or(1);
    let mut start = Vec::with_capacity(out_size as usize);
    let mut weights = vec![0i32; out_size as usize * taps];
    let mut raw = vec![0f64; taps];
    for (i, &(lo, hi, center)) in windows.iter().enumerate() {
        // Keep `taps` inputs inside the image: shift the window left at the right edge.
        let first = lo.min(in_size as usize - taps);
        for (k, w) in raw.iter_mut().enumerate() {
            let x = first + k;
            let t = ((x as f64 - center + 0.5) / filter_scale).abs();
            *w = if x < lo || x >= hi || t >= 1.0 {
                0.0
            } else {
                1.0 - t
            };
        }
        let total: f64 = raw.iter().sum();
        for (k, w) in raw.iter().enumerate() {
            let w = if total != 0.0 { w / total } else { 0.0 };
            let v = w * (1u32 << PRECISION_BITS) as f64;
            weights[i * taps + k] = (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i32;
        }
        start.push(first);
    }
    Coefficients {
        start,
        taps,
        weights,
    }
}

#[inline(always)]
fn clip(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

const ROUND: i32 = 1 << (PRECISION_BITS - 1);

/// Resizes `source` (a box in `image`'s pixel coordinates) to `width` x `height`.
pub fn resize(image: &Image, source: Rect, width: u32, height: u32) -> Image {
    crate::simd::dispatch!(resize_body(image, source, width, height))
}

#[inline(always)]
fn resize_body(image: &Image, source: Rect, width: u32, height: u32) -> Image {
    let horizontal = coefficients(image.width, source.x, source.x + source.width, width);
    let vertical = coefficients(image.height, source.y, source.y + source.height, height);
    // Only the input rows that some output row reads go through the horizontal pass.
    let first_row = *vertical.start.iter().min().unwrap_or(&0);
    let last_row = vertical
        .start
        .iter()
        .max()
        .map_or(first_row + 1, |s| s + vertical.taps);
    let rows = last_row - first_row;
    let in_stride = image.width as usize * 3;
    let out_stride = width as usize * 3;
    let mut middle = vec![0u8; rows * out_stride];
    for r in 0..rows {
        let src = &image.pixels[(first_row + r) * in_stride..(first_row + r + 1) * in_stride];
        let dst = &mut middle[r * out_stride..(r + 1) * out_stride];
        match horizontal.taps {
            1 => horizontal_row(src, dst, &horizontal, 1),
            2 => horizontal_row(src, dst, &horizontal, 2),
            3 => horizontal_row(src, dst, &horizontal, 3),
            4 => horizontal_row(src, dst, &horizontal, 4),
            5 => horizontal_row(src, dst, &horizontal, 5),
            6 => horizontal_row(src, dst, &horizontal, 6),
            taps => horizontal_row(src, dst, &horizontal, taps),
        }
    }
    let mut out = Image::new(width, height);
    let v_taps = vertical.taps;
    let mut acc = vec![0i32; out_stride];
    for (y, dst) in out.pixels.chunks_exact_mut(out_stride).enumerate() {
        acc.fill(ROUND);
        let ws = &vertical.weights[y * v_taps..(y + 1) * v_taps];
        for (k, &w) in ws.iter().enumerate() {
            if w == 0 {
                continue;
            }
            let row = vertical.start[y] + k - first_row;
            let src = &middle[row * out_stride..(row + 1) * out_stride];
            for (a, &p) in acc.iter_mut().zip(src) {
                *a += p as i32 * w;
            }
        }
        for (d, &a) in dst.iter_mut().zip(&acc) {
            *d = clip(a);
        }
    }
    out
}

/// One row of the horizontal pass. Always inlined, so the call sites that pass a literal tap
/// count get a fully unrolled tap loop.
#[inline(always)]
fn horizontal_row(src: &[u8], dst: &mut [u8], c: &Coefficients, taps: usize) {
    let pixels = dst
        .chunks_exact_mut(3)
        .zip(&c.start)
        .zip(c.weights.chunks_exact(taps));
    for ((out, &start), ws) in pixels {
        let window = &src[start * 3..start * 3 + taps * 3];
        let mut acc = [ROUND; 3];
        for (p, &w) in window.chunks_exact(3).zip(ws) {
            acc[0] += p[0] as i32 * w;
            acc[1] += p[1] as i32 * w;
            acc[2] += p[2] as i32 * w;
        }
        out[0] = clip(acc[0]);
        out[1] = clip(acc[1]);
        out[2] = clip(acc[2]);
    }
}
