//! What a decoder gives: the pixels and where they sit in the full-resolution image
//! ([`Decoded`]), or why it gives none ([`DecodeError`]). Shared by the decoders of
//! [`crate::decode`] and [`crate::webp`].

use crate::image::{Image, Rect};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty file")]
    Empty,
    #[error("not a JPEG: {0}")]
    Jpeg(String),
    #[error("not a PNG: {0}")]
    Png(String),
    #[error("not a WebP image: {0}")]
    Webp(String),
    #[error("truncated JPEG: its {0} bytes end before the end-of-image marker")]
    Truncated(usize),
    #[error("image is {width}x{height}; at most {MAX_SIDE} px per side")]
    TooLarge { width: u32, height: u32 },
}

/// Larger sides are refused rather than allocated: a corrupt header must not cost gigabytes.
pub const MAX_SIDE: u32 = 16_384;

/// The result of a decode: the pixels, and where they sit relative to the full-resolution
/// image (`full = origin + decoded / scale`).
#[derive(Debug)]
pub struct Decoded {
    pub image: Image,
    /// Decoded pixels per full-resolution pixel, per axis.
    pub scale_x: f64,
    pub scale_y: f64,
    /// Full-resolution coordinates of the decoded image's top-left pixel.
    pub origin_x: f64,
    pub origin_y: f64,
}

impl Decoded {
    /// A whole image, decoded at full resolution.
    pub(crate) fn whole(image: Image) -> Decoded {
        Decoded {
            image,
            scale_x: 1.0,
            scale_y: 1.0,
            origin_x: 0.0,
            origin_y: 0.0,
        }
    }

    /// `region` (full-resolution coordinates) in the decoded image's coordinates.
    pub fn map(&self, region: &Rect) -> Rect {
        Rect {
            x: (region.x - self.origin_x) * self.scale_x,
            y: (region.y - self.origin_y) * self.scale_y,
            width: region.width * self.scale_x,
            height: region.height * self.scale_y,
        }
    }
}
