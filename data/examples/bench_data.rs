//! Ladder's side of `scripts/bench data`: decodes and augments every JPEG or WebP image (told
//! apart by their bytes) in a directory at one
//! size on one thread (RandomResizedCrop, flip, RandAugment with 2 layers at magnitude 9,
//! normalization to float32 CHW) and prints images/s as one JSON line.
//!
//! usage: bench_data DIR SIZE PASSES

use ladder_core::dataset::ImageFormat;
use ladder_data::augment::{TrainTransform, sample_stream};
use ladder_data::batch::normalize_into;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, size, passes] = args.as_slice() else {
        eprintln!("usage: bench_data DIR SIZE PASSES");
        std::process::exit(2);
    };
    let size: u32 = size.parse().expect("size");
    let passes: u32 = passes.parse().expect("passes");
    let mut files: Vec<Vec<u8>> = std::fs::read_dir(dir)
        .expect("corpus directory")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg" || e == "webp"))
        .map(|p| std::fs::read(p).expect("image"))
        .collect();
    files.sort();
    let transform = TrainTransform {
        size,
        crop_scale: [0.08, 1.0],
        crop_ratio: [3.0 / 4.0, 4.0 / 3.0],
        randaugment: ladder_data::randaugment::RandAugmentScale::Torchvision,
        randaugment_magnitude: 9.0,
        randaugment_layers: 2,
    };
    let mut out = vec![0f32; 3 * size as usize * size as usize];
    let start = Instant::now();
    let mut count = 0u64;
    for pass in 0..passes {
        for (i, bytes) in files.iter().enumerate() {
            let mut rng = sample_stream(0, pass, i as u64);
            let image = transform
                .apply(bytes, ImageFormat::Jpeg, &mut rng)
                .expect("decodes");
            normalize_into(
                &image,
                [0.485, 0.456, 0.406],
                [0.229, 0.224, 0.225],
                &mut out,
            );
            count += 1;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    println!("{{\"images_per_second\": {}}}", count as f64 / seconds);
}
