//! A learnable synthetic dataset written as real WebDataset JPEG shards, for the demo and tests.
//!
//! Class `c` is told apart by three things at once, so that even a tiny network learns it
//! quickly: the object's shape (`c % 4`: disc, square, triangle, cross), its texture
//! (`(c / 4) % 3`: flat, stripes, checks) and its hue (spread around the colour wheel). Position,
//! scale, background and noise vary per image; sizes and aspect ratios are ImageNet-like (about
//! 300-500 px on the long side, 3:4 to 4:3). Everything is seeded: the same arguments write the
//! same bytes.

use crate::image::Image;
use ladder_core::dataset::DatasetError;
use ladder_core::indexing::{self, IndexReport};
use ladder_core::rng::Stream;
use std::path::Path;

const SYNTH_STREAM: u64 = 0x5359_4e54; // "SYNT"

fn hue_to_rgb(hue: f64) -> [f64; 3] {
    let h = hue.fract() * 6.0;
    let x = 1.0 - (h % 2.0 - 1.0).abs();
    match h as u32 {
        0 => [1.0, x, 0.0],
        1 => [x, 1.0, 0.0],
        2 => [0.0, 1.0, x],
        3 => [0.0, x, 1.0],
        4 => [x, 0.0, 1.0],
        _ => [1.0, 0.0, x],
    }
}

/// The image of sample `index` of class `class`.
pub fn draw(class: u32, classes: u32, index: u64, seed: u64) -> Image {
    let mut rng = Stream::new(seed, &[SYNTH_STREAM, class as u64, index]);
    let long = 300 + rng.below(201) as u32;
    let ratio = 0.75 + rng.unit() * (4.0 / 3.0 - 0.75);
    let short = (long as f64 / ratio.max(1.0 / ratio)) as u32;
    let (width, height) = if rng.unit() < 0.7 {
        (long, short)
    } else {
        (short, long)
    };
    let colour = hue_to_rgb(class as f64 / classes as f64 + rng.unit() * 0.3 / classes as f64);
    let background = [rng.unit() * 0.5, rng.unit() * 0.5, rng.unit() * 0.5];
    let radius = width.min(height) as f64 * (0.25 + rng.unit() * 0.15);
    let cx = radius + rng.unit() * (width as f64 - 2.0 * radius);
    let cy = radius + rng.unit() * (height as f64 - 2.0 * radius);
    let period = 6.0 + rng.unit() * 6.0;
    let shape = class % 4;
    let texture = (class / 4) % 3;
    let mut image = Image::new(width, height);
    for y in 0..height {
        for x in 0..width {
            let (dx, dy) = ((x as f64 - cx) / radius, (y as f64 - cy) / radius);
            let inside = match shape {
                0 => dx * dx + dy * dy <= 1.0,
                1 => dx.abs() <= 0.8 && dy.abs() <= 0.8,
                2 => dy <= 0.8 && dy >= -0.9 + 2.0 * dx.abs(),
                _ => (dx.abs() <= 0.3 && dy.abs() <= 0.9) || (dy.abs() <= 0.3 && dx.abs() <= 0.9),
            };
            let shade = match texture {
                0 => 1.0,
                1 => 0.6 + 0.4 * ((x as f64 / period).sin() > 0.0) as u8 as f64,
                _ => {
                    let checks = ((x as f64 / period) as i64 + (y as f64 / period) as i64) % 2;
                    0.6 + 0.4 * checks as f64
                }
            };
            let gradient = 0.8 + 0.2 * (y as f64 / height as f64);
            let noise = (rng.unit() - 0.5) * 0.08;
            let i = ((y * width + x) * 3) as usize;
            for c in 0..3 {
                let v = if inside {
                    colour[c] * shade
                } else {
                    background[c] * gradient
                };
                image.pixels[i + c] = ((v + noise).clamp(0.0, 1.0) * 255.0) as u8;
            }
        }
    }
    image
}

pub fn encode_jpeg(image: &Image, quality: i32) -> Vec<u8> {
    let view = turbojpeg::Image {
        pixels: image.pixels.as_slice(),
        width: image.width as usize,
        pitch: image.width as usize * 3,
        height: image.height as usize,
        format: turbojpeg::PixelFormat::RGB,
    };
    let mut compressor = turbojpeg::Compressor::new().expect("libjpeg-turbo compressor");
    compressor.set_quality(quality).expect("quality in 1..=100");
    compressor
        .set_subsamp(turbojpeg::Subsamp::Sub2x2)
        .expect("4:2:0 subsampling");
    compressor
        .compress_to_vec(view)
        .expect("compressing an in-memory RGB image")
}

/// Appends one file to a tar archive being written.
pub fn append<W: std::io::Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    data: &[u8],
) -> std::io::Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(&mut header, name, data)
}

/// Writes `samples` samples of `classes` classes into `shards` shards in `dir` (classes
/// interleaved), then indexes them.
pub fn write(
    dir: &Path,
    classes: u32,
    samples: u64,
    shards: u32,
    seed: u64,
) -> Result<IndexReport, DatasetError> {
    let io = |source| DatasetError::Io {
        path: dir.to_owned(),
        source,
    };
    indexing::ensure_no_shards(dir)?;
    std::fs::create_dir_all(dir).map_err(io)?;
    let per_shard = samples.div_ceil(shards.max(1) as u64);
    for shard in 0..shards {
        let path = dir.join(format!("shard-{shard:06}.tar"));
        let file = std::fs::File::create(&path).map_err(io)?;
        let mut tar = tar::Builder::new(file);
        let first = shard as u64 * per_shard;
        for index in first..(first + per_shard).min(samples) {
            let class = (index % classes as u64) as u32;
            let image = draw(class, classes, index, seed);
            let key = format!("{index:08}");
            append(&mut tar, &format!("{key}.jpg"), &encode_jpeg(&image, 90)).map_err(io)?;
            append(
                &mut tar,
                &format!("{key}.cls"),
                class.to_string().as_bytes(),
            )
            .map_err(io)?;
        }
        tar.finish().map_err(io)?;
    }
    indexing::index_dir(dir, Some(classes))
}
