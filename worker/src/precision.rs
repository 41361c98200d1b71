//! Devices and precision: fp32 on CPU; on CUDA, bfloat16 autocast and channels-last memory
//! layout (see [`crate::flat::Layout`]). Autocast goes through Ladder's C++ shim, since tch's
//! own autocast only knows CUDA float16.

use tch::{Device, Tensor};

unsafe extern "C" {
    fn ladder_autocast_enter_bf16(device: i32) -> i32;
    fn ladder_autocast_exit(device: i32, was_enabled: i32) -> i32;
    fn ladder_autocast_enabled(device: i32) -> i32;
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
    let code = device_code(device);
    // SAFETY: plain C calls into the shim; no pointers cross.
    let was_enabled = unsafe { ladder_autocast_enter_bf16(code) };
    if was_enabled < 0 {
        return Err(AutocastError("enable"));
    }
    let result = f();
    // SAFETY: as above.
    if unsafe { ladder_autocast_exit(code, was_enabled) } < 0 {
        return Err(AutocastError("leave"));
    }
    Ok(result)
}

pub fn autocast_enabled(device: Device) -> bool {
    // SAFETY: as above.
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
