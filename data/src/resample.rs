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
    let kernels = Kernels::detect();
    resize_with(kernels, image, source, width, height)
}

/// The loops of the two passes: AVX2 where the CPU has it, else portable ones. Both compute
/// exactly the same pixels (a test compares them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernels {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernels {
    fn detect() -> Kernels {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            return Kernels::Avx2;
        }
        Kernels::Portable
    }
}

fn resize_with(kernels: Kernels, image: &Image, source: Rect, width: u32, height: u32) -> Image {
    let horizontal = coefficients(image.width, source.x, source.x + source.width, width);
    let vertical = coefficients(image.height, source.y, source.y + source.height, height);
    // Only the input rows that some output row reads go through the horizontal pass.
    let first_row = *vertical.start.iter().min().unwrap_or(&0);
    let last_row = vertical
        .start
        .iter()
        .max()
        .map_or(first_row + 1, |s| s + vertical.taps);
    let in_stride = image.width as usize * 3;
    let out_stride = width as usize * 3;
    let input = &image.pixels[first_row * in_stride..last_row * in_stride];
    let mut middle = vec![0u8; (last_row - first_row) * out_stride];
    let mut out = Image::new(width, height);
    match kernels {
        Kernels::Portable => {
            portable::horizontal(input, in_stride, &mut middle, out_stride, &horizontal, 0);
            portable::vertical(&middle, &mut out.pixels, out_stride, &vertical, first_row);
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Kernels::Avx2` is only chosen when the CPU has AVX2.
        Kernels::Avx2 => unsafe {
            avx2::horizontal(input, in_stride, &mut middle, out_stride, &horizontal);
            avx2::vertical(&middle, &mut out.pixels, out_stride, &vertical, first_row);
        },
    }
    out
}

mod portable {
    use super::{Coefficients, ROUND, clip};

    /// The horizontal pass over rows of `in_stride` bytes into rows of `out_stride` bytes,
    /// from output pixel `first` of each row on.
    pub fn horizontal(
        input: &[u8],
        in_stride: usize,
        middle: &mut [u8],
        out_stride: usize,
        c: &Coefficients,
        first: usize,
    ) {
        for (src, dst) in input
            .chunks_exact(in_stride)
            .zip(middle.chunks_exact_mut(out_stride))
        {
            let pixels = dst[first * 3..]
                .chunks_exact_mut(3)
                .zip(&c.start[first..])
                .zip(c.weights[first * c.taps..].chunks_exact(c.taps));
            for ((out, &start), ws) in pixels {
                let window = &src[start * 3..start * 3 + c.taps * 3];
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
    }

    /// The vertical pass: output row `y` reads the middle rows from `c.start[y] - first_row`.
    pub fn vertical(
        middle: &[u8],
        out: &mut [u8],
        stride: usize,
        c: &Coefficients,
        first_row: usize,
    ) {
        let mut acc = vec![0i32; stride];
        for (y, dst) in out.chunks_exact_mut(stride).enumerate() {
            acc.fill(ROUND);
            let ws = &c.weights[y * c.taps..(y + 1) * c.taps];
            for (k, &w) in ws.iter().enumerate() {
                let row = c.start[y] + k - first_row;
                for (a, &p) in acc
                    .iter_mut()
                    .zip(&middle[row * stride..(row + 1) * stride])
                {
                    *a += p as i32 * w;
                }
            }
            for (d, &a) in dst.iter_mut().zip(&acc) {
                *d = clip(a);
            }
        }
    }
}

/// The same passes with AVX2: one pixel's three channels in one vector in the horizontal pass,
/// eight bytes of a row at a time in the vertical one. Every function needs a CPU with AVX2.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Coefficients, PRECISION_BITS, ROUND, portable};
    use std::arch::x86_64::*;

    /// Sums of `acc >> PRECISION_BITS` clamped to 0-255, in the low bytes of the result (the
    /// arithmetic shift keeps the value within i16, so the two saturating packs clamp exactly).
    #[target_feature(enable = "avx2")]
    fn pack(lo: __m128i, hi: __m128i) -> __m128i {
        let lo = _mm_srai_epi32::<{ PRECISION_BITS as i32 }>(lo);
        let hi = _mm_srai_epi32::<{ PRECISION_BITS as i32 }>(hi);
        let words = _mm_packs_epi32(lo, hi);
        _mm_packus_epi16(words, words)
    }

    /// # Safety
    /// The CPU has AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn horizontal(
        input: &[u8],
        in_stride: usize,
        middle: &mut [u8],
        out_stride: usize,
        c: &Coefficients,
    ) {
        let pixels = out_stride / 3;
        // A pixel is loaded as four bytes; the last one of a row has no fourth, so windows
        // that reach it take the portable loop. Pixels go in pairs, one per 128-bit lane.
        let fast = c
            .start
            .iter()
            .position(|&s| (s + c.taps) * 3 + 1 > in_stride)
            .unwrap_or(pixels)
            / 2
            * 2;
        // Per pair and tap, the two weights spread over the lanes of their pixels.
        let mut lanes = Vec::with_capacity(fast / 2 * c.taps * 8);
        for pair in (0..fast).step_by(2) {
            for k in 0..c.taps {
                let (a, b) = (
                    c.weights[pair * c.taps + k],
                    c.weights[(pair + 1) * c.taps + k],
                );
                lanes.extend_from_slice(&[a, a, a, a, b, b, b, b]);
            }
        }
        let kernel = match c.taps {
            1 => horizontal_pairs::<1>,
            2 => horizontal_pairs::<2>,
            3 => horizontal_pairs::<3>,
            4 => horizontal_pairs::<4>,
            5 => horizontal_pairs::<5>,
            6 => horizontal_pairs::<6>,
            7 => horizontal_pairs::<7>,
            8 => horizontal_pairs::<8>,
            _ => horizontal_pairs::<0>,
        };
        for (src, dst) in input
            .chunks_exact(in_stride)
            .zip(middle.chunks_exact_mut(out_stride))
        {
            // SAFETY: AVX2 as this function; the first `fast` windows leave a byte to spare.
            unsafe { kernel(src, &mut dst[..fast * 3], &c.start[..fast], &lanes, c.taps) };
        }
        portable::horizontal(input, in_stride, middle, out_stride, c, fast);
    }

    /// One row's pixel pairs with `TAPS` taps (0: `taps`, not unrolled).
    ///
    /// # Safety
    /// The CPU has AVX2; `src` holds four bytes at every tap of every window in `starts`.
    #[target_feature(enable = "avx2")]
    unsafe fn horizontal_pairs<const TAPS: usize>(
        src: &[u8],
        dst: &mut [u8],
        starts: &[usize],
        lanes: &[i32],
        taps: usize,
    ) {
        let taps = if TAPS == 0 { taps } else { TAPS };
        // Gathers each pixel's three bytes from the low bytes of its lane.
        let compact = _mm_setr_epi8(0, 1, 2, 4, 5, 6, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
        let base = src.as_ptr();
        for (pair, (first, weights)) in starts
            .chunks_exact(2)
            .zip(lanes.chunks_exact(taps * 8))
            .enumerate()
        {
            let mut acc = _mm256_set1_epi32(ROUND);
            for k in 0..taps {
                // SAFETY: both windows lie in `src` with a byte to spare (the caller's promise);
                // the weights hold eight lanes per tap.
                let (a, b, w) = unsafe {
                    (
                        base.add((first[0] + k) * 3).cast::<i32>().read_unaligned(),
                        base.add((first[1] + k) * 3).cast::<i32>().read_unaligned(),
                        _mm256_loadu_si256(weights.as_ptr().add(k * 8).cast()),
                    )
                };
                let pixels = _mm256_cvtepu8_epi32(_mm_setr_epi32(a, b, 0, 0));
                acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(pixels, w));
            }
            let bytes = _mm_shuffle_epi8(
                pack(
                    _mm256_castsi256_si128(acc),
                    _mm256_extracti128_si256::<1>(acc),
                ),
                compact,
            );
            let bytes = _mm_cvtsi128_si64(bytes).to_le_bytes();
            dst[pair * 6..pair * 6 + 6].copy_from_slice(&bytes[..6]);
        }
    }

    /// # Safety
    /// The CPU has AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn vertical(
        middle: &[u8],
        out: &mut [u8],
        stride: usize,
        c: &Coefficients,
        first_row: usize,
    ) {
        let vectors = stride / 8 * 8;
        for (y, dst) in out.chunks_exact_mut(stride).enumerate() {
            let ws = &c.weights[y * c.taps..(y + 1) * c.taps];
            let base = (c.start[y] - first_row) * stride;
            for x in (0..vectors).step_by(8) {
                let mut acc = _mm256_set1_epi32(ROUND);
                for (k, &w) in ws.iter().enumerate() {
                    let at = base + k * stride + x;
                    let bytes: [u8; 8] = middle[at..at + 8].try_into().expect("8 bytes");
                    let row = _mm_cvtsi64_si128(i64::from_le_bytes(bytes));
                    let row = _mm256_cvtepu8_epi32(row);
                    acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(row, _mm256_set1_epi32(w)));
                }
                let packed = pack(
                    _mm256_castsi256_si128(acc),
                    _mm256_extracti128_si256::<1>(acc),
                );
                let packed = _mm_cvtsi128_si64(packed).to_le_bytes();
                dst[x..x + 8].copy_from_slice(&packed);
            }
            for x in vectors..stride {
                let mut acc = ROUND;
                for (k, &w) in ws.iter().enumerate() {
                    acc += middle[base + k * stride + x] as i32 * w;
                }
                dst[x] = super::clip(acc);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        #[cfg(target_arch = "x86_64")]
        fn avx2_and_portable_kernels_agree(
            (width, height, x, y, w, h, out_w, out_h, seed) in (2u32..90, 2u32..90).prop_flat_map(|(width, height)| (
                Just(width), Just(height),
                0.0..width as f64 - 1.0, 0.0..height as f64 - 1.0,
                1.0..width as f64, 1.0..height as f64,
                1u32..70, 1u32..70, any::<u64>(),
            ))
        ) {
            prop_assume!(std::arch::is_x86_feature_detected!("avx2"));
            let mut image = Image::new(width, height);
            let mut state = seed | 1;
            for p in &mut image.pixels {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *p = state as u8;
            }
            let source = Rect { x, y, width: w.min(width as f64 - x), height: h.min(height as f64 - y) };
            let portable = resize_with(Kernels::Portable, &image, source, out_w, out_h);
            let avx2 = resize_with(Kernels::Avx2, &image, source, out_w, out_h);
            prop_assert_eq!(portable, avx2);
        }
    }
}
