//! Measures the two ways a micro-batch can reach libtorch on CPU: float32 NCHW normalized by
//! the loader threads (what a CPU worker does), or uint8 NHWC handed over as is and normalized
//! by libtorch (`ladder_train::input`, what a GPU worker's device does).
//! Prints microseconds per micro-batch for each, one JSON line.
//!
//! usage: bench_batch SIZE BATCH ROUNDS

use ladder_data::batch::normalize_into;
use ladder_data::image::Image;
use ladder_train::input::Normalization;
use std::time::Instant;
use tch::{Device, Tensor};

fn main() {
    let args: Vec<u32> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("number"))
        .collect();
    let [size, batch, rounds] = args[..] else {
        eprintln!("usage: bench_batch SIZE BATCH ROUNDS");
        std::process::exit(2);
    };
    tch::set_num_threads(1);
    let images: Vec<Image> = (0..batch)
        .map(|i| Image {
            width: size,
            height: size,
            pixels: (0..size * size * 3)
                .map(|p| ((p * 7 + i * 13) % 256) as u8)
                .collect(),
        })
        .collect();
    let (mean, std) = ([0.485f32, 0.456, 0.406], [0.229f32, 0.224, 0.225]);
    let plane = 3 * (size * size) as usize;
    let s = size as i64;

    let start = Instant::now();
    for _ in 0..rounds {
        let mut buffer = vec![0f32; batch as usize * plane];
        for (image, out) in images.iter().zip(buffer.chunks_exact_mut(plane)) {
            normalize_into(image, mean, std, out);
        }
        let t = Tensor::from_slice(&buffer).view([batch as i64, 3, s, s]);
        let _ = std::hint::black_box(t);
    }
    let float_path = start.elapsed().as_secs_f64() * 1e6 / rounds as f64;

    let normalization = Normalization::new(mean.map(f64::from), std.map(f64::from), Device::Cpu);
    let start = Instant::now();
    for _ in 0..rounds {
        let mut buffer = vec![0u8; batch as usize * plane];
        for (image, out) in images.iter().zip(buffer.chunks_exact_mut(plane)) {
            out.copy_from_slice(&image.pixels);
        }
        let t = Tensor::from_slice(&buffer).view([batch as i64, s, s, 3]);
        let _ = std::hint::black_box(normalization.apply(&t).contiguous());
    }
    let byte_path = start.elapsed().as_secs_f64() * 1e6 / rounds as f64;
    println!("{{\"f32_loader_us\": {float_path:.1}, \"u8_torch_us\": {byte_path:.1}}}");
}
