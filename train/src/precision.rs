//! Devices and precision: float32, or bfloat16 autocast with channels-last memory layout (see
//! [`crate::flat::Layout`]; the default on CUDA), and uploads from page-locked memory on CUDA.
//! Autocast goes through Ladder's C++ shim, since tch's own autocast only knows CUDA float16; so
//! does pinning, since tch's `pin_memory` passes a device argument libtorch warns about each
//! time.

use crate::flat::Layout;
use ladder_data::batch::{HostBuffer, HostMemory};
use std::sync::Arc;
use tch::{Device, Tensor};
use torch_sys::C_tensor;

/// What a worker trains in. The default follows the device: bfloat16 on CUDA, where tensor
/// cores make it several times faster than float32, and float32 on CPU. Overriding it gives
/// float32 on a GPU, to rule precision out when a run misbehaves, or a GPU's precision and
/// memory layouts on a CPU, where the tests exercise them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// float32 throughout, in the standard (NCHW) memory layout.
    Float32,
    /// bfloat16 autocast (float32 weights, optimizer state and losses), channels-last layout.
    Bfloat16,
}

impl std::str::FromStr for Precision {
    type Err = String;

    /// `float32` or `bfloat16`, as the worker's `--precision` takes them.
    fn from_str(name: &str) -> Result<Precision, String> {
        match name {
            "float32" => Ok(Precision::Float32),
            "bfloat16" => Ok(Precision::Bfloat16),
            _ => Err(format!("`{name}` is no precision: float32 or bfloat16")),
        }
    }
}

impl Precision {
    pub fn default_for(device: Device) -> Self {
        if device.is_cuda() {
            Precision::Bfloat16
        } else {
            Precision::Float32
        }
    }

    /// How the flat buffers lay out convolution weights, and how images are fed.
    pub fn layout(self) -> Layout {
        match self {
            Precision::Float32 => Layout::Contiguous,
            Precision::Bfloat16 => Layout::ChannelsLast,
        }
    }

    /// A batch of NCHW images laid out as [`Self::layout`] feeds them to the model.
    pub fn lay_out_images(self, images: Tensor) -> Tensor {
        match self.layout() {
            Layout::ChannelsLast => channels_last(&images),
            Layout::Contiguous => images.contiguous(),
        }
    }
}

unsafe extern "C" {
    fn ladder_autocast_enter_bf16(device: i32, previous_dtype: *mut i32) -> i32;
    fn ladder_autocast_exit(device: i32, was_enabled: i32, previous_dtype: i32) -> i32;
    fn ladder_autocast_enabled(device: i32) -> i32;
    fn ladder_pin_memory(tensor: *const C_tensor) -> *mut C_tensor;
    fn ladder_zeros_pinned(bytes: i64) -> *mut C_tensor;
}

/// Page-locked memory for the loader threads to write micro-batches into (the upload from it
/// then neither copies on the host nor waits); plain vectors where libtorch has none to give.
pub fn page_locked_memory() -> HostMemory {
    Arc::new(|len| {
        // SAFETY: the shim returns a new tensor that we own, or null.
        let tensor = unsafe { ladder_zeros_pinned(len as i64) };
        if tensor.is_null() {
            return HostBuffer::plain(len);
        }
        // SAFETY: non-null: a heap tensor from the shim, owned by nobody else.
        let tensor = unsafe { Tensor::from_ptr(tensor) };
        let ptr = tensor.data_ptr().cast::<u8>();
        // SAFETY: `len` zeroed bytes of the tensor, which the buffer owns; nothing else holds
        // the tensor until the buffer's consumer reads it back (see `input::to_device`).
        unsafe { HostBuffer::new(ptr, len, Box::new(tensor)) }
    })
}

/// A page-locked copy of the host tensor `x`, which a GPU copies from at full speed and
/// without the host waiting; `None` where libtorch cannot make one (no CUDA).
pub fn pinned(x: &Tensor) -> Option<Tensor> {
    // SAFETY: `x` is a live tensor; the shim returns a new tensor that we own, or null.
    let pinned = unsafe { ladder_pin_memory(x.as_ptr()) };
    // SAFETY: non-null: a heap tensor from the shim, owned by nobody else.
    (!pinned.is_null()).then(|| unsafe { Tensor::from_ptr(pinned) })
}

/// `data`, shaped `shape`, as a tensor on `device`. To a GPU it is copied once on the host,
/// into page-locked memory, and from there without waiting: a copy from pageable memory first
/// waits for all the work queued on the GPU, which then idles while the host prepares what
/// comes next. libtorch keeps the page-locked block from reuse until the copy has run, so it
/// may be dropped at once.
pub fn upload_slice<T: tch::kind::Element>(data: &[T], shape: &[i64], device: Device) -> Tensor {
    if !device.is_cuda() {
        return Tensor::from_slice(data).view(shape);
    }
    assert_eq!(shape.iter().product::<i64>(), data.len() as i64);
    // SAFETY: the view covers exactly `data`, which outlives it; it is dropped inside this call,
    // after its bytes were copied on the host (into page-locked memory, or synchronously from
    // pageable memory when none can be had).
    let view = unsafe { Tensor::from_blob(data.as_ptr().cast(), shape, &[], T::KIND, Device::Cpu) };
    match pinned(&view) {
        Some(pinned) => pinned.to_device_(device, pinned.kind(), true, false),
        None => view.to_device(device),
    }
}

fn device_code(device: Device) -> i32 {
    match device {
        Device::Cuda(_) => 1,
        _ => 0,
    }
}

#[derive(Debug, thiserror::Error)]
#[error("libtorch refused to {0} bfloat16 autocast")]
pub struct AutocastError(&'static str);

/// Runs `f` with bfloat16 autocast on `device`: matrix multiplications and convolutions compute
/// in bfloat16, numerically sensitive operations (softmax, losses, BatchNorm statistics) stay in
/// float32, and the weights stay float32.
pub fn autocast_bf16<T>(device: Device, f: impl FnOnce() -> T) -> Result<T, AutocastError> {
    let region = AutocastRegion::enter(device)?;
    let result = f();
    region.leave()?;
    Ok(result)
}

/// An autocast region entered on this thread. It is left even when `f` panics (libtorch errors
/// panic in tch): a thread left autocasting would cast in later runs it serves, and its cast
/// cache, cleared only when the outermost region ends, would keep serving bfloat16 copies of
/// weights updated since.
struct AutocastRegion {
    device: i32,
    was_enabled: i32,
    previous_dtype: i32,
}

impl AutocastRegion {
    fn enter(device: Device) -> Result<AutocastRegion, AutocastError> {
        let device = device_code(device);
        let mut previous_dtype = 0;
        // SAFETY: a plain C call into the shim, which writes one int through the pointer.
        let was_enabled = unsafe { ladder_autocast_enter_bf16(device, &mut previous_dtype) };
        if was_enabled < 0 {
            return Err(AutocastError("enable"));
        }
        Ok(AutocastRegion {
            device,
            was_enabled,
            previous_dtype,
        })
    }

    fn exit(&self) -> Result<(), AutocastError> {
        // SAFETY: a plain C call; no pointers cross.
        match unsafe { ladder_autocast_exit(self.device, self.was_enabled, self.previous_dtype) } {
            0 => Ok(()),
            _ => Err(AutocastError("leave")),
        }
    }

    fn leave(self) -> Result<(), AutocastError> {
        let left = self.exit();
        std::mem::forget(self);
        left
    }
}

impl Drop for AutocastRegion {
    /// Only on a panic inside the region: [`AutocastRegion::leave`] ends it otherwise.
    fn drop(&mut self) {
        let _ = self.exit();
    }
}

pub fn autocast_enabled(device: Device) -> bool {
    // SAFETY: a plain C call; no pointers cross.
    unsafe { ladder_autocast_enabled(device_code(device)) == 1 }
}

/// The same NCHW tensor laid out channels-last (NHWC in memory), which cuDNN's fastest
/// convolutions want.
pub fn channels_last(x: &Tensor) -> Tensor {
    x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

pub fn is_channels_last(x: &Tensor) -> bool {
    let (size, stride) = (x.size(), x.stride());
    size.len() == 4 && stride[1] == 1 && stride[3] == size[1] && stride[2] == size[1] * size[3]
}
