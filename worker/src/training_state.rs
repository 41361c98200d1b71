//! A training run's state on disk, in two safetensors files of a directory:
//!
//! - `model.safetensors`: the model's weights and BatchNorm buffers under torchvision's names,
//!   loadable as is with `torchvision.models.efficientnet_v2_*().load_state_dict(...)`;
//! - `training.safetensors`: RMSProp's `optimizer.mean_square.NAME` and
//!   `optimizer.momentum.NAME`, and the moving averages `ema.NAME` of every parameter and
//!   floating-point buffer.
//!
//! Loading checks every name, shape and dtype and changes nothing unless all match. A
//! [`Snapshot`] is the same state copied to host memory, to be written while training goes on.

use crate::ema::Ema;
use crate::flat::{FlatState, Slot};
use crate::optim::RmsProp;
use crate::state_io::{self, StateError, Written};
use std::path::Path;
use std::sync::Arc;
use tch::{Device, Tensor, nn};

pub const MODEL_FILE: &str = "model.safetensors";
pub const TRAINING_FILE: &str = "training.safetensors";

/// Everything that changes while training, borrowed from its owners.
pub struct TrainingState<'a> {
    pub vs: &'a nn::VarStore,
    pub flat: &'a FlatState,
    pub optimizer: &'a mut RmsProp,
    pub ema: &'a mut Ema,
}

/// The flat buffers of a training state and the slots that name their pieces.
struct Buffers<'a> {
    param_slots: &'a [Slot],
    buffer_slots: &'a [Slot],
    mean_square: &'a Tensor,
    momentum: &'a Tensor,
    ema_params: &'a Tensor,
    ema_buffers: &'a Tensor,
}

impl Buffers<'_> {
    /// `training.safetensors`'s tensors, as views of the buffers.
    fn training_views(&self) -> Vec<(String, Tensor)> {
        let views = |slots: &[Slot], flat: &Tensor, prefix: &str| {
            slots
                .iter()
                .map(|s| (format!("{prefix}{}", s.name), s.view(flat)))
                .collect::<Vec<_>>()
        };
        let mut named = views(self.param_slots, self.mean_square, "optimizer.mean_square.");
        named.extend(views(
            self.param_slots,
            self.momentum,
            "optimizer.momentum.",
        ));
        named.extend(views(self.param_slots, self.ema_params, "ema."));
        named.extend(views(self.buffer_slots, self.ema_buffers, "ema."));
        named
    }
}

impl TrainingState<'_> {
    fn buffers(&self) -> Buffers<'_> {
        Buffers {
            param_slots: &self.flat.param_slots,
            buffer_slots: &self.flat.buffer_slots,
            mean_square: &self.optimizer.mean_square,
            momentum: &self.optimizer.momentum_buffer,
            ema_params: &self.ema.params,
            ema_buffers: &self.ema.buffers,
        }
    }

    pub fn save(&self, dir: &Path) -> Result<(), StateError> {
        self.snapshot().write(dir).map(|_| ())
    }

    /// Copies the state to host memory: the only part of a checkpoint that holds up training.
    pub fn snapshot(&self) -> Snapshot {
        let host = |t: &Tensor| match t.device() {
            Device::Cpu => t.copy(),
            _ => t.to_device(Device::Cpu),
        };
        let flat = self.flat;
        // Variables outside the flat buffers: BatchNorm's integer batch counters.
        let loose = state_io::named(self.vs, "")
            .into_iter()
            .filter(|(name, _)| {
                !flat.param_slots.iter().any(|s| &s.name == name)
                    && !flat.buffer_slots.iter().any(|s| &s.name == name)
            })
            .map(|(name, t)| (name, host(&t)))
            .collect();
        Snapshot {
            slots: Arc::new((flat.param_slots.clone(), flat.buffer_slots.clone())),
            params: host(&flat.params),
            buffers: host(&flat.buffers),
            loose,
            mean_square: host(&self.optimizer.mean_square),
            momentum: host(&self.optimizer.momentum_buffer),
            ema_params: host(&self.ema.params),
            ema_buffers: host(&self.ema.buffers),
        }
    }

    pub fn load(&mut self, dir: &Path) -> Result<(), StateError> {
        let model_path = dir.join(MODEL_FILE);
        let training_path = dir.join(TRAINING_FILE);
        let model = state_io::read(&model_path)?;
        let training = state_io::read(&training_path)?;
        // Check both files before changing anything.
        let targets = self.buffers().training_views();
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

/// A training state copied to host memory, independent of the live one: it can be written on
/// another thread while training continues.
pub struct Snapshot {
    slots: Arc<(Vec<Slot>, Vec<Slot>)>,
    params: Tensor,
    buffers: Tensor,
    loose: Vec<(String, Tensor)>,
    mean_square: Tensor,
    momentum: Tensor,
    ema_params: Tensor,
    ema_buffers: Tensor,
}

impl Snapshot {
    /// `model.safetensors`'s tensors, in name order.
    pub fn model_tensors(&self) -> Vec<(String, Tensor)> {
        let (param_slots, buffer_slots) = &*self.slots;
        let mut named: Vec<(String, Tensor)> = param_slots
            .iter()
            .map(|s| (s.name.clone(), s.view(&self.params)))
            .chain(
                buffer_slots
                    .iter()
                    .map(|s| (s.name.clone(), s.view(&self.buffers))),
            )
            .chain(
                self.loose
                    .iter()
                    .map(|(n, t)| (n.clone(), t.shallow_clone())),
            )
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    }

    /// `training.safetensors`'s tensors.
    pub fn training_tensors(&self) -> Vec<(String, Tensor)> {
        let (param_slots, buffer_slots) = &*self.slots;
        Buffers {
            param_slots,
            buffer_slots,
            mean_square: &self.mean_square,
            momentum: &self.momentum,
            ema_params: &self.ema_params,
            ema_buffers: &self.ema_buffers,
        }
        .training_views()
    }

    /// Writes both files into `dir` (created if missing), each flushed to disk.
    pub fn write(&self, dir: &Path) -> Result<[(&'static str, Written); 2], StateError> {
        std::fs::create_dir_all(dir).map_err(|e| StateError::File {
            path: dir.display().to_string(),
            message: e.to_string(),
        })?;
        Ok([
            (
                MODEL_FILE,
                state_io::write(&dir.join(MODEL_FILE), &self.model_tensors())?,
            ),
            (
                TRAINING_FILE,
                state_io::write(&dir.join(TRAINING_FILE), &self.training_tensors())?,
            ),
        ])
    }
}
