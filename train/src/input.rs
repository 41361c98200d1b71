//! A micro-batch onto the device. For a GPU the loader's uint8 NHWC pixels are uploaded as
//! they are (a quarter of float32's bytes, through page-locked memory) and normalized and laid
//! out there, by the device's own kernels; for the CPU the loader threads normalized them
//! already (see [`ladder_data::batch`]), and they are only laid out.
//!
//! Normalization is `pixel * scale + bias` per channel, with `scale = 1 / (255 std)` and
//! `bias = -mean / std` in float32: the formula (and so the numbers) the loader threads used
//! when they normalized on the host. Viewed as NCHW, NHWC bytes are already channels-last, the
//! layout of a bfloat16 run; a float32 run's standard layout costs one copy on the device.

use crate::precision::{self, Precision};
use ladder_data::batch::Pixels;
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

/// `batch` on `device`: its images normalized and laid out for `precision`, and its labels.
pub fn to_device(
    batch: &MicroBatch,
    device: Device,
    precision: Precision,
    normalization: &Normalization,
) -> (Tensor, Tensor) {
    let n = batch.labels.len() as i64;
    let size = batch.size as i64;
    let images = match &batch.images {
        Pixels::Bytes(buffer) => {
            let shape = [n, size, size, 3];
            // Written by the loader threads into page-locked memory: uploaded from there as is.
            let pixels = match buffer.owner().downcast_ref::<Tensor>() {
                Some(pinned) if device.is_cuda() => {
                    pinned
                        .view(shape)
                        .to_device_(device, Kind::Uint8, true, false)
                }
                _ => precision::upload_slice(buffer.as_slice(), &shape, device),
            };
            normalization.apply(&pixels)
        }
        Pixels::Normalized(images) => precision::upload_slice(images, &[n, 3, size, size], device),
    };
    let images = precision.lay_out_images(images);
    let labels = precision::upload_slice(&batch.labels, &[n], device);
    (images, labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ladder_data::batch::{HostBuffer, normalize_into};
    use ladder_data::image::Image;

    /// The loader threads' normalization for the CPU (`normalize_into`) of one image's bytes.
    fn on_the_host(pixels: &[u8], size: u32, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
        let image = Image {
            width: size,
            height: size,
            pixels: pixels.to_vec(),
        };
        let mut out = vec![0f32; pixels.len()];
        normalize_into(&image, mean, std, &mut out);
        out
    }

    #[test]
    fn bytes_normalized_on_the_device_match_the_loaders_floats_in_a_quarter_of_the_bytes() {
        let (mean, std) = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);
        let (size, n) = (5u32, 2usize);
        let plane = 3 * (size * size) as usize;
        let pixels: Vec<u8> = (0..n * plane).map(|i| (i * 37 % 256) as u8).collect();
        let batch = |images| MicroBatch {
            ids: vec![0, 1],
            images,
            labels: vec![3, 4],
            size,
            skipped: vec![],
            reads: Default::default(),
        };
        let mut buffer = HostBuffer::plain(pixels.len());
        buffer.as_mut_slice().copy_from_slice(&pixels);
        let bytes = batch(Pixels::Bytes(buffer));
        let normalization = Normalization::new(mean, std, Device::Cpu);
        let f = |v: [f64; 3]| v.map(|x| x as f32);
        let (mean, std) = (f(mean), f(std));
        for precision in [Precision::Float32, Precision::Bfloat16] {
            let (images, labels) = to_device(&bytes, Device::Cpu, precision, &normalization);
            assert_eq!(images.size(), [2, 3, 5, 5]);
            assert_eq!(
                precision::is_channels_last(&images),
                precision == Precision::Bfloat16
            );
            let ours = Vec::<f32>::try_from(images.contiguous().view([-1])).unwrap();
            for (k, image) in pixels.chunks_exact(plane).enumerate() {
                let host = on_the_host(image, size, mean, std);
                let worst = ours[k * plane..(k + 1) * plane]
                    .iter()
                    .zip(&host)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(worst <= 1e-6, "{precision:?}: off by {worst:e}");
            }
            assert_eq!(Vec::<i64>::try_from(&labels).unwrap(), [3, 4]);
        }
        // The loader's normalization for the CPU: the same numbers, four times the bytes.
        let host: Vec<f32> = pixels
            .chunks_exact(plane)
            .flat_map(|image| on_the_host(image, size, mean, std))
            .collect();
        let floats = batch(Pixels::Normalized(host));
        assert_eq!(floats.images.bytes(), 4 * bytes.images.bytes());
        assert_eq!(bytes.images.bytes(), n * plane);
        let (from_host, _) = to_device(&floats, Device::Cpu, Precision::Float32, &normalization);
        let (on_device, _) = to_device(&bytes, Device::Cpu, Precision::Float32, &normalization);
        let worst = (from_host - on_device).abs().max().double_value(&[]);
        assert!(worst <= 1e-6, "off by {worst:e}");
    }
}
