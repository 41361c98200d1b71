use ladder_core::rng::Stream;
use ladder_data::image::Image;
use ladder_data::randaugment::{OPERATIONS, apply, apply_op};
use ladder_data::synth;

fn photo() -> Image {
    let image = synth::draw(5, 10, 3, 0);
    ladder_data::resample::resize(
        &image,
        ladder_data::image::Rect::whole(image.width, image.height),
        96,
        80,
    )
}

#[test]
fn magnitude_zero_leaves_the_image_unless_the_operation_has_no_magnitude() {
    let original = photo();
    for op in 0..OPERATIONS {
        let mut image = original.clone();
        apply_op(&mut image, op, 0.0, false);
        // Posterize at 0 keeps 8 bits, solarize at 0 has threshold 255 (only 255 flips);
        // autocontrast and equalize have no magnitude.
        match op {
            11 => assert!(
                image
                    .pixels
                    .iter()
                    .zip(&original.pixels)
                    .all(|(a, b)| a == b || *b == 255)
            ),
            12 | 13 => {}
            _ => assert_eq!(image, original, "operation {op} at magnitude 0"),
        }
    }
}

#[test]
fn every_operation_changes_a_photo_at_full_magnitude_and_keeps_its_shape() {
    let original = photo();
    for op in 1..OPERATIONS {
        let mut image = original.clone();
        apply_op(&mut image, op, 30.0, op % 2 == 0);
        assert_eq!(
            (image.width, image.height, image.pixels.len()),
            (96, 80, 96 * 80 * 3)
        );
        assert_ne!(image, original, "operation {op} did nothing");
    }
}

#[test]
fn known_values_match_pillow() {
    let mut image = Image {
        width: 2,
        height: 1,
        pixels: vec![10, 100, 200, 255, 0, 129],
    };
    apply_op(&mut image, 10, 30.0, false); // posterize to 4 bits
    assert_eq!(image.pixels, [0, 96, 192, 240, 0, 128]);
    let mut image = Image {
        width: 2,
        height: 1,
        pixels: vec![10, 100, 200, 255, 0, 129],
    };
    apply_op(&mut image, 11, 15.0, false); // solarize at threshold 127.5
    assert_eq!(image.pixels, [10, 100, 55, 0, 0, 126]);
    let mut image = Image {
        width: 2,
        height: 1,
        pixels: vec![10, 100, 200, 20, 50, 210],
    };
    apply_op(&mut image, 12, 0.0, false); // autocontrast stretches each channel
    assert_eq!(
        image.pixels,
        [0, 254, 0, 255, 0, 255],
        "Pillow's values, rounding included"
    );
    // Translating right by 150/331 of the width leaves the left 43 columns black.
    let mut image = photo();
    apply_op(&mut image, 3, 30.0, false);
    assert!(
        image.pixels[..3 * 40].iter().all(|&p| p == 0),
        "left edge is filled with black"
    );
}

#[test]
fn draws_are_reproducible_per_stream() {
    let original = photo();
    let run = |seed| {
        let mut image = original.clone();
        apply(&mut image, 2, 9.0, &mut Stream::new(seed, &[1]));
        image
    };
    assert_eq!(run(1), run(1));
    assert!(
        (0..20).map(run).any(|i| i != run(1)),
        "different streams choose differently"
    );
}
