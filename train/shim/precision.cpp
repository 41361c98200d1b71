// What tch does not expose: autocast to a chosen dtype (tch's autocast is CUDA fp16 only), and
// page-locked copies without the deprecated device argument (which warns on every call).
// Exceptions never cross the C boundary; every entry point returns an error flag instead.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>

namespace {
c10::DeviceType device_type(int device) { return device == 1 ? c10::DeviceType::CUDA : c10::DeviceType::CPU; }
}  // namespace

extern "C" {

// Enters an autocast region on `device` (0 CPU, 1 CUDA) computing in bfloat16; the dtype it
// replaces goes to `*previous_dtype`, for the exit to restore.
// Returns 1 if autocast was already enabled there, 0 if not, -1 on error.
int ladder_autocast_enter_bf16(int device, int* previous_dtype) {
  try {
    auto type = device_type(device);
    bool was_enabled = at::autocast::is_autocast_enabled(type);
    *previous_dtype = static_cast<int>(at::autocast::get_autocast_dtype(type));
    at::autocast::set_autocast_dtype(type, at::kBFloat16);
    at::autocast::set_autocast_enabled(type, true);
    at::autocast::increment_nesting();
    return was_enabled ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

// Leaves the region, restoring the previous state and dtype; the cast cache is cleared when the
// outermost region ends, as torch.autocast does. Returns 0, or -1 on error.
int ladder_autocast_exit(int device, int was_enabled, int previous_dtype) {
  try {
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    auto type = device_type(device);
    at::autocast::set_autocast_enabled(type, was_enabled == 1);
    at::autocast::set_autocast_dtype(type, static_cast<at::ScalarType>(previous_dtype));
    return 0;
  } catch (...) {
    return -1;
  }
}

// 1 if autocast is enabled on `device`, else 0.
int ladder_autocast_enabled(int device) {
  try {
    return at::autocast::is_autocast_enabled(device_type(device)) ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

// A page-locked copy of the host tensor `t` (a new tensor the caller owns, as tch's are), or
// nullptr when it cannot be made (libtorch without CUDA).
at::Tensor* ladder_pin_memory(const at::Tensor* t) {
  try {
    return new at::Tensor(t->pin_memory());
  } catch (...) {
    return nullptr;
  }
}

// `bytes` zeroed page-locked bytes (uint8) from libtorch's caching host allocator, or nullptr
// when they cannot be had (libtorch without CUDA).
at::Tensor* ladder_zeros_pinned(int64_t bytes) {
  try {
    auto options = at::TensorOptions().dtype(at::kByte).pinned_memory(true);
    return new at::Tensor(at::zeros({bytes}, options));
  } catch (...) {
    return nullptr;
  }
}
}
