//! A micro-batch onto the device: the loader's uint8 NHWC pixels are uploaded as they are (a
//! quarter of float32's bytes, through page-locked memory on CUDA) and normalized and laid out
//! there, by the device's own kernels instead of the host's.
//!
//! Normalization is `pixel * scale + bias` per channel, with `scale = 1 / (255 std)` and
//! `bias = -mean / std` in float32: the formula (and so the numbers) the loader threads used
//! when they normalized on the host. Viewed as NCHW, NHWC bytes are already channels-last, the
//! layout of a bfloat16 run; a float32 run's standard layout costs one copy on the device.

use crate::precision::{self, Precision};
use ladder_data::loader::MicroBatch;
use tch::{Device, Kind, Tensor};

/// A job's per-channel normalization, on its device.
pub struct Normalization {
    scale: Tensor,
    bias: Tensor,
}

impl Normalization {
    /// `data.mean` and `data.std` of a job's spec.
    pub fn new(mean: [f64; 3], std: [f64; 3], device: Device) -> Normalization {
        let per_channel = |f: &dyn Fn(usize) -> f32| {
            let values: [f32; 3] = std::array::from_fn(f);
            Tensor::from_slice(&values)
                .view([1, 3, 1, 1])
                .to_device(device)
        };
        Normalization {
            scale: per_channel(&|c| 1.0 / (255.0 * std[c] as f32)),
            bias: per_channel(&|c| -(mean[c] as f32) / std[c] as f32),
        }
    }

    /// `pixels` (uint8, N x H x W x 3) as normalized float32 NCHW-shaped images.
    pub fn apply(&self, pixels: &Tensor) -> Tensor {
        pixels.permute([0, 3, 1, 2]).to_kind(Kind::Float) * &self.scale + &self.bias
    }
}

/// Bytes uploaded per image of `size` pixels square.
pub fn upload_bytes(size: u32) -> u64 {
    3 * u64::from(size) * u64::from(size)
}

/// `batch` on `device`: its images normalized and laid out for `precision`, and its labels.
pub fn to_device(
    batch: &MicroBatch,
    device: Device,
    precision: Precision,
    normalization: &Normalization,
) -> (Tensor, Tensor) {
    let n = batch.labels.len() as i64;
    let size = batch.size as i64;
    let pixels = precision::upload_slice(&batch.images, &[n, size, size, 3], device);
    let images = precision.lay_out_images(normalization.apply(&pixels));
    let labels = precision::upload_slice(&batch.labels, &[n], device);
    (images, labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The normalization the loader threads ran on the host before it moved to the device,
    /// written out: `(pixel / 255 - mean) / std` as `pixel * scale + bias`, channel-major.
    fn on_the_host(pixels: &[u8], mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
        let plane = pixels.len() / 3;
        let mut out = vec![0f32; pixels.len()];
        for (i, px) in pixels.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * plane + i] = px[c] as f32 * (1.0 / (255.0 * std[c])) + -mean[c] / std[c];
            }
        }
        out
    }

    #[test]
    fn normalized_on_the_device_as_on_the_host_in_a_quarter_of_the_bytes() {
        let (mean, std) = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);
        let (size, n) = (5u32, 2usize);
        let plane = 3 * (size * size) as usize;
        let pixels: Vec<u8> = (0..n * plane).map(|i| (i * 37 % 256) as u8).collect();
        let batch = MicroBatch {
            ids: vec![0, 1],
            images: pixels.clone(),
            labels: vec![3, 4],
            size,
            skipped: vec![],
            reads: Default::default(),
        };
        let normalization = Normalization::new(mean, std, Device::Cpu);
        let f = |v: [f64; 3]| v.map(|x| x as f32);
        let (mean, std) = (f(mean), f(std));
        for precision in [Precision::Float32, Precision::Bfloat16] {
            let (images, labels) = to_device(&batch, Device::Cpu, precision, &normalization);
            assert_eq!(images.size(), [2, 3, 5, 5]);
            assert_eq!(
                precision::is_channels_last(&images),
                precision == Precision::Bfloat16
            );
            let ours = Vec::<f32>::try_from(images.contiguous().view([-1])).unwrap();
            for (k, image) in pixels.chunks_exact(plane).enumerate() {
                let host = on_the_host(image, mean, std);
                let worst = ours[k * plane..(k + 1) * plane]
                    .iter()
                    .zip(&host)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(worst <= 1e-6, "{precision:?}: off by {worst:e}");
            }
            assert_eq!(Vec::<i64>::try_from(&labels).unwrap(), [3, 4]);
        }
        assert_eq!(batch.images.len() as u64, n as u64 * upload_bytes(size));
        assert_eq!(
            upload_bytes(size) * 4,
            (plane * std::mem::size_of::<f32>()) as u64,
            "a quarter of float32's bytes"
        );
    }
}
