//! WebP (lossy and lossless; the hub's `imagenet-w21-webp-wds` shards hold them) through
//! libwebp (the `libwebp-sys` crate builds it from its sources), at the needed size as JPEG
//! is: only the rectangle holding the wanted region is decoded (libwebp's cropping, at even
//! offsets as its YUV planes need), and libwebp's own area-averaging scaler shrinks it by the
//! smallest of 1/8, 1/4, 1/2 or 1 that keeps the region at least as large as the output. Alpha
//! is dropped, as Pillow's `convert("RGB")` does; an animation's first frame is not read (an
//! animated WebP is refused). Any failure of the decode is an error: the sample is skipped.

use crate::decoded::{DecodeError, Decoded, MAX_SIDE};
use crate::image::{Image, Rect};
use libwebp_sys as webp;

/// `RIFF....WEBP`.
pub fn is_webp(bytes: &[u8]) -> bool {
    bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP"
}

/// Width and height from the header alone.
pub fn dimensions(bytes: &[u8]) -> Result<(u32, u32), DecodeError> {
    let (mut width, mut height) = (0, 0);
    // SAFETY: `bytes` outlives the call; the out-pointers are locals.
    let ok = unsafe { webp::WebPGetInfo(bytes.as_ptr(), bytes.len(), &mut width, &mut height) };
    if ok == 0 || width <= 0 || height <= 0 {
        return Err(DecodeError::Webp("no WebP header".into()));
    }
    if width as u32 > MAX_SIDE || height as u32 > MAX_SIDE {
        return Err(DecodeError::TooLarge {
            width: width as u32,
            height: height as u32,
        });
    }
    Ok((width as u32, height as u32))
}

/// Decodes the part of the image that holds `region` (the whole image if `None`), shrunk at
/// most as far as keeps it `min_width` x `min_height` pixels.
pub fn decode(
    bytes: &[u8],
    region: Option<Rect>,
    min_width: u32,
    min_height: u32,
) -> Result<Decoded, DecodeError> {
    let (width, height) = dimensions(bytes)?;
    let region = region.unwrap_or(Rect::whole(width, height));
    // The crop: whole pixels around the region, its corner at even coordinates.
    let left = ((region.x.floor().max(0.0) as u32).min(width - 1)) & !1;
    let top = ((region.y.floor().max(0.0) as u32).min(height - 1)) & !1;
    let right = ((region.x + region.width).ceil() as u32).clamp(left + 1, width);
    let bottom = ((region.y + region.height).ceil() as u32).clamp(top + 1, height);
    let (crop_w, crop_h) = (right - left, bottom - top);
    let shrink = [8, 4, 2, 1]
        .into_iter()
        .find(|&d| {
            region.width / d as f64 >= min_width as f64
                && region.height / d as f64 >= min_height as f64
        })
        .unwrap_or(1);
    let (out_w, out_h) = (crop_w.div_ceil(shrink), crop_h.div_ceil(shrink));
    let mut pixels = vec![0u8; out_w as usize * out_h as usize * 3];
    // SAFETY: a zeroed config is what WebPInitDecoderConfig overwrites; every pointer handed
    // to libwebp (the input bytes, the external output buffer of `out_w x out_h x 3` bytes
    // with its stride) outlives the decode, and no memory of libwebp's is kept after it.
    unsafe {
        let mut config: webp::WebPDecoderConfig = std::mem::zeroed();
        if !webp::WebPInitDecoderConfig(&mut config) {
            return Err(DecodeError::Webp(
                "libwebp's decoder version mismatch".into(),
            ));
        }
        let features = webp::WebPGetFeatures(bytes.as_ptr(), bytes.len(), &mut config.input);
        if features != webp::VP8StatusCode::VP8_STATUS_OK {
            return Err(DecodeError::Webp(format!(
                "bitstream features: {features:?}"
            )));
        }
        if config.input.has_animation != 0 {
            return Err(DecodeError::Webp("an animated WebP".into()));
        }
        let options = &mut config.options;
        options.use_cropping = 1;
        (options.crop_left, options.crop_top) = (left as i32, top as i32);
        (options.crop_width, options.crop_height) = (crop_w as i32, crop_h as i32);
        if shrink > 1 {
            options.use_scaling = 1;
            (options.scaled_width, options.scaled_height) = (out_w as i32, out_h as i32);
        }
        let output = &mut config.output;
        output.colorspace = webp::WEBP_CSP_MODE::MODE_RGB;
        output.is_external_memory = 1;
        output.u.RGBA = webp::WebPRGBABuffer {
            rgba: pixels.as_mut_ptr(),
            stride: out_w as i32 * 3,
            size: pixels.len(),
        };
        let status = webp::WebPDecode(bytes.as_ptr(), bytes.len(), &mut config);
        webp::WebPFreeDecBuffer(&mut config.output);
        if status != webp::VP8StatusCode::VP8_STATUS_OK {
            return Err(DecodeError::Webp(format!("decoding: {status:?}")));
        }
    }
    Ok(Decoded {
        image: Image {
            width: out_w,
            height: out_h,
            pixels,
        },
        scale_x: out_w as f64 / crop_w as f64,
        scale_y: out_h as f64 / crop_h as f64,
        origin_x: left as f64,
        origin_y: top as f64,
    })
}
