//! Micro-batch buffers: images normalized into one contiguous float32 NCHW buffer, labels
//! alongside, ready to become a tensor without another copy.

use crate::image::Image;

/// Writes `image` into `out` (3 x H x W, channel-major) as `(pixel / 255 - mean) / std`.
pub fn normalize_into(image: &Image, mean: [f32; 3], std: [f32; 3], out: &mut [f32]) {
    crate::simd::dispatch!(normalize_body(image, mean, std, out))
}

#[inline(always)]
fn normalize_body(image: &Image, mean: [f32; 3], std: [f32; 3], out: &mut [f32]) {
    let plane = image.width as usize * image.height as usize;
    assert_eq!(out.len(), plane * 3, "output holds one 3-channel image");
    // Per channel: value * scale + bias, with the division folded into the constants.
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * std[c]));
    let bias: [f32; 3] = std::array::from_fn(|c| -mean[c] / std[c]);
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (i, px) in image.pixels.chunks_exact(3).enumerate() {
        r[i] = px[0] as f32 * scale[0] + bias[0];
        g[i] = px[1] as f32 * scale[1] + bias[1];
        b[i] = px[2] as f32 * scale[2] + bias[2];
    }
}
