//! Decoding at the needed size.
//!
//! JPEG goes through libjpeg-turbo 3 (bundled): the DCT scale is the smallest of 1/8, 1/4, 1/2
//! and 1 that keeps the wanted region at least as large as the output, so a 500x375 photo
//! cropped to 128 px decodes at 1/4 or 1/16 of the pixels, and only the rows and iMCU columns
//! that hold the region are decoded (cropped decoding). libjpeg-turbo also offers 3/8, 5/8,
//! 6/8 and 7/8, but those run its scalar IDCTs, for the chroma planes at twice the size: on
//! `scripts/bench data`'s photos the next power of two decodes faster (a 128 px crop in 323 µs
//! instead of 337 µs, a 256 px one in 360 µs instead of 441 µs) although it makes more pixels. Grayscale and progressive JPEGs decode to RGB;
//! CMYK and YCCK JPEGs are converted to RGB as Pillow does (Adobe's inverted CMYK, which Pillow
//! assumes for every CMYK JPEG). PNG (gray, palette, 16-bit, alpha) goes through the `png`
//! crate; alpha is dropped, as Pillow's `convert("RGB")` does, and 16-bit samples are scaled
//! to 8 bits (Pillow would clip them to 255). WebP goes through libwebp ([`crate::webp`]),
//! cropped and scaled at decode as JPEG is. EXIF orientation is ignored, as
//! torchvision's decoders do. Any warning from the decoder (a truncated file, corrupt data) is
//! an error: a damaged image is skipped, never trained on half gray. A cropped decode stops at
//! the region's last row, so a JPEG whose data ends early would decode in an epoch whose crop
//! lies above the cut and fail in another: every JPEG's markers are walked to its end-of-image
//! marker first (a scan for 0xFF bytes, microseconds), so a truncated file is refused in every
//! epoch, as Pillow refuses it ("image file is truncated").

pub use crate::decoded::{DecodeError, Decoded, MAX_SIDE};
use crate::image::{Image, Rect};
use ladder_core::dataset::ImageFormat;
use std::ffi::CStr;
use turbojpeg_sys as tj;

struct Handle(tj::tjhandle);

impl Handle {
    fn decompressor() -> Handle {
        // SAFETY: tj3Init has no preconditions; a null handle is checked below.
        let handle = unsafe { tj::tj3Init(tj::TJINIT_TJINIT_DECOMPRESS as libc::c_int) };
        assert!(
            !handle.is_null(),
            "libjpeg-turbo could not allocate a decompressor"
        );
        Handle(handle)
    }

    fn error(&self) -> DecodeError {
        // SAFETY: the handle is live; the returned string is owned by libjpeg-turbo.
        let message = unsafe { CStr::from_ptr(tj::tj3GetErrorStr(self.0)) };
        DecodeError::Jpeg(message.to_string_lossy().into_owned())
    }

    fn get(&self, param: tj::TJPARAM) -> i32 {
        // SAFETY: the handle is live.
        unsafe { tj::tj3Get(self.0, param as libc::c_int) }
    }

    fn check(&self, status: libc::c_int) -> Result<(), DecodeError> {
        if status == 0 {
            Ok(())
        } else {
            Err(self.error())
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed once.
        unsafe { tj::tj3Destroy(self.0) }
    }
}

thread_local! {
    // One decompressor per decoding thread, reused: creating one costs more than a small decode.
    static DECOMPRESSOR: std::cell::RefCell<Handle> = std::cell::RefCell::new(Handle::decompressor());
}

/// Runs `work` with this thread's decompressor. After a failure the decompressor is replaced:
/// libjpeg keeps tables between images, and a damaged file must not affect the next one.
fn with_decompressor<T>(
    work: impl FnOnce(&Handle) -> Result<T, DecodeError>,
) -> Result<T, DecodeError> {
    DECOMPRESSOR.with(|cell| {
        let result = work(&cell.borrow());
        if result.is_err() {
            *cell.borrow_mut() = Handle::decompressor();
        }
        result
    })
}

/// What `bytes` are by their first bytes, whatever the member's extension says (`named`): a
/// PNG stored as `.jpg` decodes, as Pillow, torchvision's `decode_image` and WebDataset's
/// decoders decode it. Bytes that are neither go to the named decoder, for its error.
pub fn sniff(bytes: &[u8], named: ImageFormat) -> ImageFormat {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        ImageFormat::Jpeg
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        ImageFormat::Png
    } else if crate::webp::is_webp(bytes) {
        ImageFormat::Webp
    } else {
        named
    }
}

/// Width and height of an encoded image, from its header alone.
pub fn dimensions(bytes: &[u8], format: ImageFormat) -> Result<(u32, u32), DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    match sniff(bytes, format) {
        ImageFormat::Jpeg => with_decompressor(|h| {
            read_header(h, bytes)?;
            Ok((
                h.get(tj::TJPARAM_TJPARAM_JPEGWIDTH) as u32,
                h.get(tj::TJPARAM_TJPARAM_JPEGHEIGHT) as u32,
            ))
        }),
        ImageFormat::Png => {
            let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
            let reader = decoder
                .read_info()
                .map_err(|e| DecodeError::Png(e.to_string()))?;
            let info = reader.info();
            Ok((info.width, info.height))
        }
        ImageFormat::Webp => crate::webp::dimensions(bytes),
    }
}

fn read_header(h: &Handle, bytes: &[u8]) -> Result<(), DecodeError> {
    // SAFETY: the handle is live and `bytes` outlives the call.
    let status = unsafe { tj::tj3DecompressHeader(h.0, bytes.as_ptr(), bytes.len() as tj::size_t) };
    h.check(status)?;
    let (w, h2) = (
        h.get(tj::TJPARAM_TJPARAM_JPEGWIDTH),
        h.get(tj::TJPARAM_TJPARAM_JPEGHEIGHT),
    );
    if w <= 0 || h2 <= 0 || w as u32 > MAX_SIDE || h2 as u32 > MAX_SIDE {
        return Err(DecodeError::TooLarge {
            width: w.max(0) as u32,
            height: h2.max(0) as u32,
        });
    }
    Ok(())
}

/// Decodes the part of the image that holds `region` (full-resolution coordinates; the whole
/// image if `None`), at the smallest DCT scale (1/8, 1/4, 1/2 or 1) that keeps the region at
/// least `min_width` x `min_height` pixels.
pub fn decode(
    bytes: &[u8],
    format: ImageFormat,
    region: Option<Rect>,
    min_width: u32,
    min_height: u32,
) -> Result<Decoded, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    match sniff(bytes, format) {
        ImageFormat::Jpeg => {
            with_decompressor(|h| decode_jpeg(h, bytes, region, min_width, min_height))
        }
        ImageFormat::Png => decode_png(bytes).map(Decoded::whole),
        ImageFormat::Webp => crate::webp::decode(bytes, region, min_width, min_height),
    }
}

/// Walks a JPEG's markers to its end-of-image marker (EOI), skipping each segment by its
/// length (an EXIF thumbnail holds a whole JPEG of its own) and scanning entropy-coded data for
/// the next marker. Bytes after EOI are allowed, as every decoder allows them. Whether the data
/// between is valid is libjpeg's to judge; this answers only whether the file is whole.
fn ends_with_end_of_image(bytes: &[u8]) -> Result<(), DecodeError> {
    const EOI: u8 = 0xD9;
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return Err(DecodeError::Jpeg("no start-of-image marker".to_owned()));
    }
    let truncated = || DecodeError::Truncated(bytes.len());
    let mut at = 2; // past SOI
    loop {
        let marker_at = at + memchr::memchr(0xFF, &bytes[at..]).ok_or_else(truncated)?;
        // Fill bytes: any number of 0xFF may precede a marker.
        let code_at = marker_at
            + bytes[marker_at..]
                .iter()
                .position(|&b| b != 0xFF)
                .ok_or_else(truncated)?;
        at = code_at + 1;
        match bytes[code_at] {
            EOI => return Ok(()),
            // A stuffed 0xFF in entropy-coded data, restart markers, SOI and TEM stand alone.
            0x00 | 0xD0..=0xD8 | 0x01 => {}
            _ => {
                let length = bytes.get(at..at + 2).ok_or_else(truncated)?;
                at += usize::from(u16::from_be_bytes([length[0], length[1]]));
                if at > bytes.len() {
                    return Err(truncated());
                }
            }
        }
    }
}

/// ceil(dimension * num / 8), libjpeg's size of a scaled dimension.
fn scaled(dimension: i32, num: i32) -> i32 {
    (dimension * num + 7) / 8
}

fn decode_jpeg(
    h: &Handle,
    bytes: &[u8],
    region: Option<Rect>,
    min_width: u32,
    min_height: u32,
) -> Result<Decoded, DecodeError> {
    ends_with_end_of_image(bytes)?;
    read_header(h, bytes)?;
    let width = h.get(tj::TJPARAM_TJPARAM_JPEGWIDTH);
    let height = h.get(tj::TJPARAM_TJPARAM_JPEGHEIGHT);
    let region = region.unwrap_or(Rect::whole(width as u32, height as u32));
    // The smallest scale num/8 with a SIMD IDCT whose scaled region still covers the output.
    let num = [1, 2, 4, 8]
        .into_iter()
        .find(|&n| {
            region.width * n as f64 / 8.0 >= min_width as f64
                && region.height * n as f64 / 8.0 >= min_height as f64
        })
        .unwrap_or(8);
    // SAFETY: the handle is live.
    h.check(unsafe { tj::tj3Set(h.0, tj::TJPARAM_TJPARAM_STOPONWARNING as libc::c_int, 1) })?;
    // libjpeg-turbo lists its factors in lowest terms: 1/8, 1/4, 1/2, 1/1.
    let factor = tj::tjscalingfactor {
        num: 1,
        denom: 8 / num,
    };
    // SAFETY: as above; these four are scaling factors libjpeg-turbo always supports.
    h.check(unsafe { tj::tj3SetScalingFactor(h.0, factor) })?;
    // A scaled decode is resampled again right after, which hides the fast IDCT's small
    // error; a full-size decode keeps the accurate one (the pixels Pillow gives).
    let fast = i32::from(num < 8);
    // SAFETY: as above.
    h.check(unsafe { tj::tj3Set(h.0, tj::TJPARAM_TJPARAM_FASTDCT as libc::c_int, fast) })?;
    let (full_w, full_h) = (scaled(width, num), scaled(height, num));
    let (scale_x, scale_y) = (full_w as f64 / width as f64, full_h as f64 / height as f64);

    // Crop to the columns of whole scaled iMCUs and the rows that hold the region. Cropping
    // needs a known subsampling (its iMCU width); CMYK and odd layouts decode whole.
    let colorspace = h.get(tj::TJPARAM_TJPARAM_COLORSPACE);
    let cmyk = colorspace == tj::TJCS_TJCS_CMYK as i32 || colorspace == tj::TJCS_TJCS_YCCK as i32;
    let imcu_width = match h.get(tj::TJPARAM_TJPARAM_SUBSAMP) {
        s if s == tj::TJSAMP_TJSAMP_444
            || s == tj::TJSAMP_TJSAMP_GRAY
            || s == tj::TJSAMP_TJSAMP_440 =>
        {
            8
        }
        s if s == tj::TJSAMP_TJSAMP_422 || s == tj::TJSAMP_TJSAMP_420 => 16,
        s if s == tj::TJSAMP_TJSAMP_411 || s == tj::TJSAMP_TJSAMP_441 => 32,
        _ => 0,
    };
    let step = imcu_width * num / 8;
    let (mut x0, mut y0, mut out_w, mut out_h) = (0, 0, full_w, full_h);
    if step > 0 && !cmyk {
        let left = ((region.x * scale_x).floor() as i32).clamp(0, full_w - 1);
        let right = ((region.x + region.width) * scale_x)
            .ceil()
            .min(full_w as f64) as i32;
        let top = ((region.y * scale_y).floor() as i32).clamp(0, full_h - 1);
        let bottom = ((region.y + region.height) * scale_y)
            .ceil()
            .min(full_h as f64) as i32;
        x0 = left / step * step;
        y0 = top;
        out_w = (right - x0).max(1);
        out_h = (bottom - y0).max(1);
        let crop = tj::tjregion {
            x: x0,
            y: y0,
            w: out_w,
            h: out_h,
        };
        // SAFETY: the handle is live; the region lies inside the scaled image.
        h.check(unsafe { tj::tj3SetCroppingRegion(h.0, crop) })?;
    } else {
        let none = tj::tjregion {
            x: 0,
            y: 0,
            w: 0,
            h: 0,
        };
        // SAFETY: as above; an empty region turns cropping off.
        h.check(unsafe { tj::tj3SetCroppingRegion(h.0, none) })?;
    }
    let (format, channels) = if cmyk {
        (tj::TJPF_TJPF_CMYK, 4)
    } else {
        (tj::TJPF_TJPF_RGB, 3)
    };
    let mut buffer = vec![0u8; out_w as usize * out_h as usize * channels];
    // SAFETY: `buffer` holds out_h rows of out_w pixels of `channels` bytes, exactly what the
    // cropped, scaled decode writes with a pitch of 0 (packed rows).
    let status = unsafe {
        tj::tj3Decompress8(
            h.0,
            bytes.as_ptr(),
            bytes.len() as tj::size_t,
            buffer.as_mut_ptr(),
            0,
            format as libc::c_int,
        )
    };
    h.check(status)?;
    let pixels = if cmyk { cmyk_to_rgb(&buffer) } else { buffer };
    Ok(Decoded {
        image: Image {
            width: out_w as u32,
            height: out_h as u32,
            pixels,
        },
        scale_x,
        scale_y,
        origin_x: x0 as f64 / scale_x,
        origin_y: y0 as f64 / scale_y,
    })
}

/// Adobe's inverted CMYK to RGB as Pillow converts it: with stored values `c, k` (inverted),
/// `r = c * k / 255`.
fn cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    let mut rgb = Vec::with_capacity(cmyk.len() / 4 * 3);
    for px in cmyk.chunks_exact(4) {
        let k = px[3] as u32;
        for &c in &px[..3] {
            // Pillow's MULDIV255: (a * b + 128 + ((a * b + 128) >> 8)) >> 8.
            let t = c as u32 * k + 128;
            rgb.push(((t + (t >> 8)) >> 8) as u8);
        }
    }
    rgb
}

fn decode_png(bytes: &[u8]) -> Result<Image, DecodeError> {
    let bad = |e: png::DecodingError| DecodeError::Png(e.to_string());
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().map_err(bad)?;
    let (width, height) = (reader.info().width, reader.info().height);
    if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
        return Err(DecodeError::TooLarge { width, height });
    }
    let mut buffer = vec![
        0;
        reader
            .output_buffer_size()
            .ok_or_else(|| DecodeError::Png("image too large".into()))?
    ];
    let frame = reader.next_frame(&mut buffer).map_err(bad)?;
    let data = &buffer[..frame.buffer_size()];
    let pixels = match frame.color_type {
        png::ColorType::Rgb => data.to_vec(),
        png::ColorType::Rgba => data
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        png::ColorType::Grayscale => data.iter().flat_map(|&g| [g, g, g]).collect(),
        png::ColorType::GrayscaleAlpha => data
            .chunks_exact(2)
            .flat_map(|p| [p[0], p[0], p[0]])
            .collect(),
        png::ColorType::Indexed => return Err(DecodeError::Png("palette not expanded".into())),
    };
    Ok(Image {
        width,
        height,
        pixels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth;

    /// A JPEG with an APP1 segment that holds an end-of-image marker of its own, as an EXIF
    /// thumbnail does: only the outer image's marker counts.
    fn with_thumbnail_marker() -> Vec<u8> {
        let jpeg = synth::encode_jpeg(&synth::draw(1, 4, 0, 0), 90);
        let payload = [b"Exif\0\0".as_slice(), &[0xFF, 0xD8, 0xFF, 0xD9]].concat();
        let length = (payload.len() as u16 + 2).to_be_bytes();
        [&jpeg[..2], &[0xFF, 0xE1], &length, &payload, &jpeg[2..]].concat()
    }

    #[test]
    fn a_whole_jpeg_reaches_its_end_marker_and_a_cut_one_does_not() {
        let jpeg = with_thumbnail_marker();
        assert_eq!(ends_with_end_of_image(&jpeg), Ok(()));
        let padded = [jpeg.as_slice(), &[0; 16]].concat();
        assert_eq!(ends_with_end_of_image(&padded), Ok(()));
        for cut in [2, 4, 20, jpeg.len() / 2, jpeg.len() - 2, jpeg.len() - 1] {
            assert_eq!(
                ends_with_end_of_image(&jpeg[..cut]),
                Err(DecodeError::Truncated(cut)),
                "cut at {cut} of {}",
                jpeg.len()
            );
        }
    }

    #[test]
    fn bytes_too_short_to_be_a_jpeg_are_an_error_not_a_panic() {
        for bytes in [&[0xFF][..], &[0x00], &[0xFF, 0xD9]] {
            assert!(matches!(
                ends_with_end_of_image(bytes),
                Err(DecodeError::Jpeg(_))
            ));
            assert!(decode(bytes, ImageFormat::Jpeg, None, 8, 8).is_err());
        }
    }

    #[test]
    fn a_truncated_jpeg_is_refused_even_when_the_crop_ends_above_the_cut() {
        let jpeg = with_thumbnail_marker();
        let whole = decode(&jpeg, ImageFormat::Jpeg, None, 1, 1).unwrap();
        let top = Rect {
            x: 0.0,
            y: 0.0,
            width: whole.image.width as f64,
            height: 8.0,
        };
        assert!(decode(&jpeg, ImageFormat::Jpeg, Some(top), 8, 8).is_ok());
        let cut = &jpeg[..jpeg.len() * 3 / 4];
        assert_eq!(
            decode(cut, ImageFormat::Jpeg, Some(top), 8, 8).unwrap_err(),
            DecodeError::Truncated(cut.len())
        );
    }
}
