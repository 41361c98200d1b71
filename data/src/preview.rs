//! A contact sheet of training samples as the loader makes them at one stage (`ladder
//! preview`), so a person sees the regularization grow before spending GPU-days: a column per
//! sample, on top its source (the evaluation crop at the stage's size), below what training
//! sees: the random crop, the flip, RandAugment at the stage's magnitude, then Mixup or CutMix
//! with the sample the micro-batch pairs it with.

use crate::augment::{TrainTransform, eval_transform, sample_stream};
use crate::image::Image;
use crate::loader::Dataset;
use crate::mix;
use ladder_core::spec::JobSpec;
use ladder_core::stage::EpochParams;
use std::path::Path;

/// Pixels between cells, of the sheet's background.
const GAP: u32 = 4;
const BACKGROUND: u8 = 255;

/// The sheet and its cells.
pub struct Sheet {
    pub image: Image,
    pub sources: Vec<Image>,
    pub trained: Vec<Image>,
}

/// The sheet of `count` samples (spread over the dataset) at epoch `e` of `spec`.
pub fn sheet(
    dataset: &Dataset,
    spec: &JobSpec,
    e: &EpochParams,
    count: usize,
) -> Result<Sheet, String> {
    let count = count.clamp(1, dataset.len() as usize);
    let ids: Vec<u64> = (0..count as u64)
        .map(|i| i * dataset.len() / count as u64)
        .collect();
    let (raw, _) = dataset.read(&ids);
    let transform = TrainTransform::of_epoch(spec, e);
    let (mut sources, mut trained) = (Vec::new(), Vec::new());
    for sample in &raw {
        let bytes = sample
            .bytes
            .as_ref()
            .map_err(|err| format!("{} in {}: {err}", sample.key, sample.shard))?;
        let what =
            |err: crate::decode::DecodeError| format!("{} in {}: {err}", sample.key, sample.shard);
        sources.push(eval_transform(bytes, sample.format, e.image_size).map_err(what)?);
        let mut rng = sample_stream(spec.schedule.seed, e.epoch, sample.id);
        trained.push(
            transform
                .apply(bytes, sample.format, &mut rng)
                .map_err(what)?,
        );
    }
    let seed = spec.schedule.seed;
    if let Some(plan) = mix::draw(
        seed,
        e.epoch,
        0,
        0,
        e.mixup_alpha,
        e.cutmix_alpha,
        trained.len(),
        e.image_size,
    ) {
        mix::apply(&mut trained, &plan);
    }
    let image = grid(&[&sources, &trained], e.image_size);
    Ok(Sheet {
        image,
        sources,
        trained,
    })
}

/// Rows of square cells of side `size`, `GAP` apart.
fn grid(rows: &[&Vec<Image>], size: u32) -> Image {
    let columns = rows.iter().map(|r| r.len()).max().unwrap_or(0) as u32;
    let width = columns * size + (columns + 1) * GAP;
    let height = rows.len() as u32 * size + (rows.len() as u32 + 1) * GAP;
    let mut sheet = Image {
        width,
        height,
        pixels: vec![BACKGROUND; width as usize * height as usize * 3],
    };
    for (r, row) in rows.iter().enumerate() {
        for (c, cell) in row.iter().enumerate() {
            let (x0, y0) = (GAP + c as u32 * (size + GAP), GAP + r as u32 * (size + GAP));
            for y in 0..cell.height {
                let from = (y * cell.width * 3) as usize..((y + 1) * cell.width * 3) as usize;
                let at = (((y0 + y) * width + x0) * 3) as usize;
                sheet.pixels[at..at + from.len()].copy_from_slice(&cell.pixels[from]);
            }
        }
    }
    sheet
}

/// Writes `image` as an 8-bit RGB PNG at `path`.
pub fn write_png(image: &Image, path: &Path) -> Result<(), String> {
    let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let file = std::fs::File::create(path).map_err(|e| fail(&e))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), image.width, image.height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| fail(&e))?;
    writer
        .write_image_data(&image.pixels)
        .map_err(|e| fail(&e))?;
    writer.finish().map_err(|e| fail(&e))
}
