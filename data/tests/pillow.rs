//! Ladder's decoder and resampler against Pillow (from the bootstrap venv), the reference that
//! torchvision's PIL path uses.

use ladder_core::dataset::ImageFormat;
use ladder_data::decode::{self, DecodeError};
use ladder_data::image::{Image, Rect};
use ladder_data::resample::resize;
use std::path::Path;
use std::process::Command;

/// Boxes (x0, y0, x1, y1) and output sizes for the resize comparison: downscales, an upscale,
/// fractional boxes and edge boxes.
const RESIZES: &[([f64; 4], u32)] = &[
    ([0.0, 0.0, 500.0, 375.0], 128),
    ([37.0, 12.0, 337.0, 312.0], 224),
    ([100.5, 50.25, 180.75, 130.5], 160),
    ([0.0, 0.0, 64.0, 64.0], 128),
    ([250.0, 100.0, 500.0, 375.0], 96),
];

fn reference() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let boxes: Vec<(Vec<f64>, u32)> = RESIZES.iter().map(|(b, s)| (b.to_vec(), *s)).collect();
    std::fs::write(
        dir.path().join("resize.json"),
        serde_json::to_string(&boxes).unwrap(),
    )
    .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pil_reference.py");
    ladder_testkit::run_python(&script, &[dir.path().as_os_str()]);
    dir
}

fn differences(a: &[u8], b: &[u8]) -> (u8, f64) {
    assert_eq!(a.len(), b.len());
    let max = a
        .iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0);
    let mean = a
        .iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y) as f64)
        .sum::<f64>()
        / a.len() as f64;
    (max, mean)
}

fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let mse = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    10.0 * (255.0f64.powi(2) / mse.max(1e-12)).log10()
}

#[test]
fn every_format_decodes_like_pillow() {
    let dir = reference();
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("cases.json")).unwrap())
            .unwrap();
    assert_eq!(cases.len(), 16);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let (format, ext) = match case["format"].as_str().unwrap() {
            "jpeg" => (ImageFormat::Jpeg, "jpg"),
            "webp" => (ImageFormat::Webp, "webp"),
            _ => (ImageFormat::Png, "png"),
        };
        let bytes = std::fs::read(dir.path().join(format!("{name}.{ext}"))).unwrap();
        let theirs = std::fs::read(dir.path().join(format!("{name}.rgb"))).unwrap();
        let (w, h) = (
            case["width"].as_u64().unwrap() as u32,
            case["height"].as_u64().unwrap() as u32,
        );
        assert_eq!(
            decode::dimensions(&bytes, format).unwrap(),
            (w, h),
            "{name}"
        );
        let ours = decode::decode(&bytes, format, None, w, h).unwrap();
        assert_eq!((ours.image.width, ours.image.height), (w, h), "{name}");
        let (max, mean) = differences(&ours.image.pixels, &theirs);
        // Both sides run libjpeg-turbo's default IDCT and upsampling, or libwebp's decoder and
        // its fancy upsampling; CMYK goes through one rounding of the conversion. Stated
        // bound: at most 1 grey level anywhere.
        assert!(max <= 1, "{name}: max difference {max}, mean {mean:.4}");
    }
}

#[test]
fn resizing_matches_pillows_bilinear() {
    let dir = reference();
    let bytes = std::fs::read(dir.path().join("photo.jpg")).unwrap();
    let full = decode::decode(&bytes, ImageFormat::Jpeg, None, 500, 375)
        .unwrap()
        .image;
    for (i, (b, size)) in RESIZES.iter().enumerate() {
        let rect = Rect {
            x: b[0],
            y: b[1],
            width: b[2] - b[0],
            height: b[3] - b[1],
        };
        let ours = resize(&full, rect, *size, *size);
        let theirs = std::fs::read(dir.path().join(format!("resize-{i}.rgb"))).unwrap();
        let (max, mean) = differences(&ours.pixels, &theirs);
        assert!(
            max <= 1,
            "box {b:?} -> {size}: max difference {max}, mean {mean:.4}"
        );
    }
}

#[test]
fn scaled_and_cropped_decoding_stays_close_to_full_decoding() {
    let dir = reference();
    for (file, format) in [
        ("photo.jpg", ImageFormat::Jpeg),
        ("webp.webp", ImageFormat::Webp),
    ] {
        scaled_and_cropped(&std::fs::read(dir.path().join(file)).unwrap(), format);
    }
}

/// Cropped and scaled decoding of `bytes` against decoding it whole, then resizing both.
fn scaled_and_cropped(bytes: &[u8], format: ImageFormat) {
    let full = decode::decode(bytes, format, None, 500, 375).unwrap();
    // Crops of several sizes at several places, resized to several stage sizes.
    let crops = [
        Rect {
            x: 0.0,
            y: 0.0,
            width: 500.0,
            height: 375.0,
        },
        Rect {
            x: 123.0,
            y: 45.0,
            width: 300.0,
            height: 260.0,
        },
        Rect {
            x: 17.0,
            y: 3.0,
            width: 150.0,
            height: 190.0,
        },
        Rect {
            x: 400.0,
            y: 300.0,
            width: 100.0,
            height: 75.0,
        },
    ];
    let mut worst = f64::INFINITY;
    for crop in crops {
        for size in [64, 128, 192] {
            let reference = resize(&full.image, full.map(&crop), size, size);
            let fast = decode::decode(bytes, format, Some(crop), size, size).unwrap();
            assert!(fast.image.width <= full.image.width);
            let ours = resize(&fast.image, fast.map(&crop), size, size);
            worst = worst.min(psnr(&ours.pixels, &reference.pixels));
        }
    }
    // Stated bound: DCT-scaled (libwebp: area-averaged), cropped decoding then resize is
    // within 30 dB PSNR of full decoding then resize (the difference is the scaler's own
    // low-pass, below visible noise).
    assert!(worst >= 30.0, "{format:?}: worst PSNR {worst:.1} dB");
}

#[test]
fn broken_images_are_errors_not_panics() {
    let dir = reference();
    let good = std::fs::read(dir.path().join("photo.jpg")).unwrap();
    let png = std::fs::read(dir.path().join("rgb.png")).unwrap();
    let cases: Vec<(&str, Vec<u8>, ImageFormat)> = vec![
        ("empty", vec![], ImageFormat::Jpeg),
        (
            "truncated jpeg",
            good[..good.len() / 2].to_vec(),
            ImageFormat::Jpeg,
        ),
        (
            "text as jpeg",
            b"hello, not an image".to_vec(),
            ImageFormat::Jpeg,
        ),
        (
            "truncated png",
            png[..png.len() / 3].to_vec(),
            ImageFormat::Png,
        ),
        ("header only", good[..600].to_vec(), ImageFormat::Jpeg),
    ];
    for (name, bytes, format) in cases {
        let result = std::panic::catch_unwind(|| decode::decode(&bytes, format, None, 64, 64));
        let err = result.unwrap_or_else(|_| panic!("{name}: panicked")).err();
        assert!(err.is_some(), "{name}: decoded");
        assert!(!err.unwrap().to_string().is_empty());
    }
    assert_eq!(
        decode::decode(&[], ImageFormat::Png, None, 1, 1).unwrap_err(),
        DecodeError::Empty
    );
    // Misnamed images decode by what their bytes are, as Pillow opens them.
    for (bytes, named, right) in [
        (&png, ImageFormat::Jpeg, ImageFormat::Png),
        (&good, ImageFormat::Png, ImageFormat::Jpeg),
    ] {
        let misnamed = decode::decode(bytes, named, None, 64, 64).unwrap();
        let named_right = decode::decode(bytes, right, None, 64, 64).unwrap();
        assert_eq!(misnamed.image.pixels, named_right.image.pixels);
    }
    // A corrupt header claiming a huge image is refused before any allocation.
    let mut huge = good.clone();
    let sof = start_of_frame(&huge);
    huge[sof + 5..sof + 9].copy_from_slice(&[0x7F, 0xFF, 0x7F, 0xFF]);
    let err = decode::decode(&huge, ImageFormat::Jpeg, None, 64, 64).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::TooLarge {
                width: 32767,
                height: 32767
            }
        ),
        "{err}"
    );
    let _ = Image::new(1, 1);
}

/// Offset of the baseline start-of-frame marker, found by walking the marker segments.
fn start_of_frame(jpeg: &[u8]) -> usize {
    let mut at = 2;
    loop {
        assert_eq!(jpeg[at], 0xFF, "marker expected at {at}");
        if jpeg[at + 1] == 0xC0 {
            return at;
        }
        let length = u16::from_be_bytes([jpeg[at + 2], jpeg[at + 3]]) as usize;
        at += 2 + length;
    }
}

#[test]
fn pointwise_randaugment_operations_match_pillows_imageops() {
    use ladder_data::randaugment::torchvision::apply_op;
    let dir = tempfile::tempdir().unwrap();
    let photo = ladder_data::synth::draw(3, 10, 1, 0);
    let image = resize(&photo, Rect::whole(photo.width, photo.height), 64, 48);
    let raw = dir.path().join("in.rgb");
    std::fs::write(&raw, &image.pixels).unwrap();
    // (operation, magnitude, Pillow's call): equalize, autocontrast, solarize at 127.5 and
    // posterize to 4 bits.
    let cases = [
        (13, 0.0, "ImageOps.equalize(im)"),
        (12, 0.0, "ImageOps.autocontrast(im)"),
        (11, 15.0, "ImageOps.solarize(im, 127.5)"),
        (10, 30.0, "ImageOps.posterize(im, 4)"),
    ];
    for (i, (op, magnitude, call)) in cases.iter().enumerate() {
        let out = dir.path().join(format!("out{i}.rgb"));
        let script = format!(
            "from PIL import Image, ImageOps\nim = Image.frombytes('RGB', (64, 48), open({raw:?}, 'rb').read())\nopen({out:?}, 'wb').write({call}.tobytes())",
            raw = raw.to_str().unwrap(),
            out = out.to_str().unwrap()
        );
        let status = Command::new(ladder_testkit::venv_python())
            .args(["-c", &script])
            .status()
            .unwrap();
        assert!(status.success(), "{call}");
        let mut ours = image.clone();
        apply_op(&mut ours, *op, *magnitude, false);
        assert_eq!(ours.pixels, std::fs::read(&out).unwrap(), "{call}");
    }
}

/// A WebP cut short is an error, never a panic or a half-grey image. (A VP8 bitstream
/// overwritten in place still decodes, to noise, in libwebp as in Pillow: nothing in it
/// checks the data.)
#[test]
fn a_broken_webp_is_an_error() {
    let dir = reference();
    let bytes = std::fs::read(dir.path().join("webp.webp")).unwrap();
    for cut in [12, 40, bytes.len() / 2, bytes.len() - 1] {
        assert!(
            decode::decode(&bytes[..cut], ImageFormat::Webp, None, 8, 8).is_err(),
            "cut at {cut}"
        );
    }
}
