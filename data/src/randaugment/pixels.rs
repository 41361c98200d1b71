//! Pixel operations both RandAugment variants share: the geometric resampler, a thread's
//! scratch image, per-value lookup tables, and the histogram operations (the official code's
//! and torchvision's are both Pillow's).

use crate::image::Image;

/// Where a geometric operation samples its input, nearest neighbour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grid {
    /// At pixel centers (x + 0.5), the sample's pixel the one it falls in: torchvision's
    /// (PIL's) shear, translate and rotate. Stepped in 16.16 fixed point along each row.
    Centers,
    /// At integer coordinates in float32, rounded half away from zero to the nearest pixel:
    /// TensorFlow's `ImageProjectiveTransform` (the official RandAugment's). Float32 as it
    /// computes, since samples that land half-way between two pixels are common (a shear of
    /// 0.15 puts every tenth column there) and float32 decides which one they take.
    Integers,
}

/// Inverse affine map `[a, b, c, d, e, f]`: output (x, y) reads input (a x + b y + c,
/// d x + e y + f), with (x, y) on `grid`; what falls outside reads `fill`.
#[inline(always)]
pub fn affine(image: &mut Image, m: [f64; 6], grid: Grid, fill: u8) {
    let (w, h) = (image.width as i64, image.height as i64);
    let mut output = take_scratch(image.pixels.len());
    let sample = |out: &mut [u8], ix: i64, iy: i64| {
        if ix >= 0 && ix < w && iy >= 0 && iy < h {
            let j = ((iy * w + ix) * 3) as usize;
            out.copy_from_slice(&image.pixels[j..j + 3]);
        } else {
            out.fill(fill);
        }
    };
    match grid {
        Grid::Centers => {
            const ONE: f64 = 65536.0;
            let (step_x, step_y) = ((m[0] * ONE) as i64, (m[3] * ONE) as i64);
            for (y, row) in output.chunks_exact_mut(w as usize * 3).enumerate() {
                let yf = y as f64 + 0.5;
                let mut sx = ((m[0] * 0.5 + m[1] * yf + m[2]) * ONE) as i64;
                let mut sy = ((m[3] * 0.5 + m[4] * yf + m[5]) * ONE) as i64;
                for out in row.chunks_exact_mut(3) {
                    sample(out, sx >> 16, sy >> 16);
                    sx += step_x;
                    sy += step_y;
                }
            }
        }
        Grid::Integers => {
            let m = m.map(|v| v as f32);
            for (y, row) in output.chunks_exact_mut(w as usize * 3).enumerate() {
                let yf = y as f32;
                for (x, out) in row.chunks_exact_mut(3).enumerate() {
                    let xf = x as f32;
                    let sx = m[0] * xf + m[1] * yf + m[2];
                    let sy = m[3] * xf + m[4] * yf + m[5];
                    sample(out, sx.round() as i64, sy.round() as i64);
                }
            }
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
pub fn take_scratch(len: usize) -> Vec<u8> {
    let mut buffer = SCRATCH.take();
    buffer.resize(len, 0);
    buffer
}

/// Makes `output` the image's pixels; the old pixels become the thread's scratch buffer.
pub fn replace_pixels(image: &mut Image, output: Vec<u8>) {
    SCRATCH.set(std::mem::replace(&mut image.pixels, output));
}

/// Maps every pixel value through `lut`.
#[inline(always)]
pub fn map(image: &mut Image, lut: &[u8; 256]) {
    for p in &mut image.pixels {
        *p = lut[*p as usize];
    }
}

/// Keeps the top `8 - shift` bits of every value (`shift` at most 7).
#[inline(always)]
pub fn posterize(image: &mut Image, shift: u32) {
    let mask = 0xffu8 << shift.min(7);
    for p in &mut image.pixels {
        *p &= mask;
    }
}

/// Inverts every value at or above `threshold`.
#[inline(always)]
pub fn solarize(image: &mut Image, threshold: f64) {
    let lut: [u8; 256] = std::array::from_fn(|v| {
        if v as f64 >= threshold {
            255 - v as u8
        } else {
            v as u8
        }
    });
    map(image, &lut);
}

/// Stretches each channel to the full 0-255 range (PIL's ImageOps.autocontrast, cutoff 0).
#[inline(always)]
pub fn autocontrast(image: &mut Image) {
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
pub fn equalize(image: &mut Image) {
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

/// Blends every value towards PIL's SMOOTH filter of it (3x3, center weight 5, total 13):
/// `smooth(total)` makes the filtered value from the 3x3 weighted sum, `blend(value,
/// smoothed)` the result. The one-pixel border is kept, as both PIL and the official code
/// keep it. The 3x3 sums are a running sum of three column sums.
#[inline(always)]
pub fn sharpen(image: &mut Image, smooth: impl Fn(u32) -> u8, blend: impl Fn(u8, u8) -> u8) {
    let (w, h) = (image.width as usize, image.height as usize);
    if w < 3 || h < 3 {
        return;
    }
    let stride = w * 3;
    let mut output = take_scratch(image.pixels.len());
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
            dst[i] = blend(here[i], smooth(total));
        }
    }
    replace_pixels(image, output);
}
