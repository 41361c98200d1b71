//! RandAugment (Cubuk et al. 2020) on a decoded 8-bit RGB image, in one of two definitions
//! that share a name but not a scale: the official EfficientNetV2 code's ([`official`], the
//! scale the paper's magnitudes are given on, and the default) and torchvision's
//! ([`torchvision`]). The same magnitude means different strengths in each: 25 is 2.5 times the
//! official code's nominal top level, but 25/30 of torchvision's.

pub mod official;
mod pixels;
pub mod torchvision;

use crate::image::Image;
use ladder_core::rng::Stream;
pub use ladder_core::spec::RandAugmentScale;

/// `layers` operations at `magnitude`, as `scale` defines them, each drawn from `rng`.
pub fn apply(
    image: &mut Image,
    scale: RandAugmentScale,
    layers: u32,
    magnitude: f64,
    rng: &mut Stream,
) {
    match scale {
        RandAugmentScale::Official => official::apply(image, layers, magnitude, rng),
        RandAugmentScale::Torchvision => torchvision::apply(image, layers, magnitude, rng),
    }
}
