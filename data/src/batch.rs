//! Micro-batch pixel buffers, in the form the device takes them: uint8 NHWC as decoded, for a
//! GPU, which normalizes them itself (a quarter of float32's bytes to upload), or float32 NCHW
//! normalized here, for a CPU, where the host is the device and the loader threads are its
//! spare cores (normalizing on the training thread instead costs a CPU step 5x the time).

use crate::image::Image;
use std::any::Any;
use std::sync::Arc;

/// Host memory a micro-batch's bytes are written into: a plain vector, or memory its consumer
/// provides (page-locked, so that the upload to a GPU does not wait), owned by `owner`, which
/// the consumer gets back to hand the memory on without a copy.
pub struct HostBuffer {
    ptr: *mut u8,
    len: usize,
    owner: Box<dyn Any + Send>,
}

// SAFETY: the buffer is the only handle to its bytes (see `HostBuffer::new`), and its owner
// is `Send`.
unsafe impl Send for HostBuffer {}

impl std::fmt::Debug for HostBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostBuffer({} bytes)", self.len)
    }
}

impl PartialEq for HostBuffer {
    fn eq(&self, other: &HostBuffer) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl HostBuffer {
    /// `len` bytes of `owner`'s memory at `ptr`.
    ///
    /// # Safety
    /// `ptr` addresses `len` initialized bytes that stay valid while `owner` lives and that
    /// nothing else reads or writes while the buffer exists.
    pub unsafe fn new(ptr: *mut u8, len: usize, owner: Box<dyn Any + Send>) -> HostBuffer {
        HostBuffer { ptr, len, owner }
    }

    /// `len` zeroed bytes of a plain vector.
    pub fn plain(len: usize) -> HostBuffer {
        let mut bytes = vec![0u8; len];
        let ptr = bytes.as_mut_ptr();
        // SAFETY: the vector's heap block does not move when the vector does, and the vector
        // is reachable only through the buffer.
        unsafe { HostBuffer::new(ptr, len, Box::new(bytes)) }
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `new`'s contract.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `new`'s contract, and `&mut self` is the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// What owns the memory, for its consumer to recognize (say, a page-locked tensor).
    pub fn owner(&self) -> &(dyn Any + Send) {
        &*self.owner
    }
}

/// Where the loader threads get a [`HostBuffer`] of so many bytes for a micro-batch of
/// [`PixelFormat::Bytes`].
pub type HostMemory = Arc<dyn Fn(usize) -> HostBuffer + Send + Sync>;

/// Plain vectors.
pub fn plain_memory() -> HostMemory {
    Arc::new(HostBuffer::plain)
}

/// How the loader hands a micro-batch's pixels over.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PixelFormat {
    /// uint8, N x H x W x 3 (RGB), as decoded.
    Bytes,
    /// float32, N x 3 x H x W, `(pixel / 255 - mean) / std`.
    Normalized { mean: [f32; 3], std: [f32; 3] },
}

/// A micro-batch's pixels, in a [`PixelFormat`].
#[derive(Debug, PartialEq)]
pub enum Pixels {
    Bytes(HostBuffer),
    Normalized(Vec<f32>),
}

impl Pixels {
    /// Room for `images` images of `plane` values (3 x H x W) each; bytes from `memory`.
    pub fn new(format: PixelFormat, images: usize, plane: usize, memory: &HostMemory) -> Pixels {
        match format {
            PixelFormat::Bytes => Pixels::Bytes(memory(images * plane)),
            PixelFormat::Normalized { .. } => Pixels::Normalized(vec![0.0; images * plane]),
        }
    }

    /// Writes `image` as the `position`-th image, in `format` (the one it was made with).
    pub fn place(&mut self, format: PixelFormat, position: usize, image: &Image) {
        let plane = image.pixels.len();
        let at = position * plane..(position + 1) * plane;
        match (self, format) {
            (Pixels::Bytes(all), PixelFormat::Bytes) => {
                all.as_mut_slice()[at].copy_from_slice(&image.pixels)
            }
            (Pixels::Normalized(all), PixelFormat::Normalized { mean, std }) => {
                normalize_into(image, mean, std, &mut all[at])
            }
            _ => unreachable!("pixels are placed in the format they were made with"),
        }
    }

    /// The bytes of the buffer: what goes to the device.
    pub fn bytes(&self) -> usize {
        match self {
            Pixels::Bytes(all) => all.as_slice().len(),
            Pixels::Normalized(all) => all.len() * std::mem::size_of::<f32>(),
        }
    }
}

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
