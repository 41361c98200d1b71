//! Starting a job from pretrained weights (fine-tuning): a torchvision EfficientNetV2 state
//! dict saved as safetensors (`safetensors.torch.save_file(model.state_dict(), PATH)`), named
//! by the spec's `model.init_from`.
//!
//! Every weight and BatchNorm buffer must be in the file with its shape, except the classifier,
//! which keeps its fresh initialization when the file was trained on another number of classes
//! (fine-tuning ImageNet-21k weights on ImageNet-1k, say). Anything else that does not match —
//! another variant, a missing layer, names that are not the model's — is refused with every
//! problem named, and nothing is changed.

use crate::checkpoint::safetensors::{self, StateError};
use std::path::Path;
use tch::{Tensor, nn};

const CLASSIFIER: &str = "classifier.";

type Named = (String, Tensor);

/// Loads `path` into `vs`; returns the names left at their fresh initialization.
pub fn initialize(vs: &nn::VarStore, path: &Path) -> Result<Vec<String>, StateError> {
    let origin = path.display().to_string();
    let file = safetensors::read(path)?;
    let ours = safetensors::named(vs, "");
    let classifier_differs = ours.iter().any(|(name, var)| {
        name.starts_with(CLASSIFIER)
            && file
                .iter()
                .any(|(n, t)| n == name && t.size() != var.size())
    });
    let starts_fresh = |name: &str| classifier_differs && name.starts_with(CLASSIFIER);
    let (fresh, targets): (Vec<Named>, Vec<Named>) =
        ours.into_iter().partition(|(name, _)| starts_fresh(name));
    let given: Vec<Named> = file
        .into_iter()
        .filter(|(name, _)| !starts_fresh(name))
        .collect();
    safetensors::load_into(&targets, &given, "", &origin)?;
    Ok(fresh.into_iter().map(|(name, _)| name).collect())
}
