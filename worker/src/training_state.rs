//! A training run's state on disk, in two safetensors files of a directory:
//!
//! - `model.safetensors`: the model's weights and BatchNorm buffers under torchvision's names,
//!   loadable as is with `torchvision.models.efficientnet_v2_*().load_state_dict(...)`;
//! - `training.safetensors`: RMSProp's `optimizer.mean_square.NAME` and
//!   `optimizer.momentum.NAME`, and the moving averages `ema.NAME` of every parameter and
//!   floating-point buffer.
//!
//! Loading checks every name, shape and dtype and changes nothing unless all match.

use crate::ema::Ema;
use crate::flat::FlatState;
use crate::optim::RmsProp;
use crate::state_io::{self, StateError};
use std::path::Path;
use tch::nn;

pub const MODEL_FILE: &str = "model.safetensors";
pub const TRAINING_FILE: &str = "training.safetensors";

/// Everything that changes while training, borrowed from its owners.
pub struct TrainingState<'a> {
    pub vs: &'a nn::VarStore,
    pub flat: &'a FlatState,
    pub optimizer: &'a mut RmsProp,
    pub ema: &'a mut Ema,
}

impl TrainingState<'_> {
    fn optimizer_and_ema(&self) -> Vec<(String, tch::Tensor)> {
        let flat = self.flat;
        let mut named =
            flat.named_param_views(&self.optimizer.mean_square, "optimizer.mean_square.");
        named
            .extend(flat.named_param_views(&self.optimizer.momentum_buffer, "optimizer.momentum."));
        named.extend(flat.named_param_views(&self.ema.params, "ema."));
        named.extend(flat.named_buffer_views(&self.ema.buffers, "ema."));
        named
    }

    pub fn save(&self, dir: &Path) -> Result<(), StateError> {
        std::fs::create_dir_all(dir).map_err(|e| StateError::File {
            path: dir.display().to_string(),
            message: e.to_string(),
        })?;
        state_io::write(&dir.join(MODEL_FILE), &state_io::named(self.vs, ""))?;
        state_io::write(&dir.join(TRAINING_FILE), &self.optimizer_and_ema())
    }

    pub fn load(&mut self, dir: &Path) -> Result<(), StateError> {
        let model_path = dir.join(MODEL_FILE);
        let training_path = dir.join(TRAINING_FILE);
        let model = state_io::read(&model_path)?;
        let training = state_io::read(&training_path)?;
        // Check both files before changing anything.
        let targets = self.optimizer_and_ema();
        state_io::check(
            &state_io::named(self.vs, ""),
            &model,
            "",
            &model_path.display().to_string(),
        )?;
        state_io::check(
            &targets,
            &training,
            "",
            &training_path.display().to_string(),
        )?;
        state_io::load(self.vs, &model, "", &model_path.display().to_string())?;
        state_io::load_into(
            &targets,
            &training,
            "",
            &training_path.display().to_string(),
        )
    }
}
