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
        self.snapshot(None).write(dir).map(|_| ())
    }

    /// The live tensors a snapshot copies, in a fixed order: the six flat buffers, then the
    /// variables outside them (BatchNorm's integer batch counters), by name.
    fn sources(&self) -> (Vec<Tensor>, Vec<String>) {
        let flat = self.flat;
        let mut tensors = vec![
            flat.params.shallow_clone(),
            flat.buffers.shallow_clone(),
            self.optimizer.mean_square.shallow_clone(),
            self.optimizer.momentum_buffer.shallow_clone(),
            self.ema.params.shallow_clone(),
            self.ema.buffers.shallow_clone(),
        ];
        let mut names = Vec::new();
        for (name, t) in state_io::named(self.vs, "") {
            if !flat.param_slots.iter().any(|s| s.name == name)
                && !flat.buffer_slots.iter().any(|s| s.name == name)
            {
                tensors.push(t);
                names.push(name);
            }
        }
        (tensors, names)
    }

    /// Copies the state to host memory, all at once. Pass the previous snapshot (its write
    /// finished) to copy into its memory instead of allocating: fresh pages cost more than the
    /// copy itself.
    pub fn snapshot(&self, reuse: Option<Snapshot>) -> Snapshot {
        self.begin_snapshot(reuse).finish()
    }

    /// Starts a snapshot without holding up training: what a training step changes before its
    /// optimizer update (BatchNorm statistics and counters, changed by the forward pass) is
    /// copied now; the large buffers that only the optimizer and the EMA change (parameters,
    /// RMSProp state, EMA weights) are copied on a thread while the next step runs its forward
    /// and backward passes. [`PendingSnapshot::finish`] must come before that step's update.
    pub fn begin_snapshot(&self, reuse: Option<Snapshot>) -> PendingSnapshot {
        let (sources, names) = self.sources();
        let fits = |s: &Snapshot| {
            s.host.len() == sources.len()
                && s.host
                    .iter()
                    .zip(&sources)
                    .all(|(h, t)| h.size() == t.size() && h.kind() == t.kind())
        };
        let host: Vec<Tensor> = match reuse.filter(fits) {
            Some(previous) => previous.host,
            None => sources
                .iter()
                .map(|t| {
                    let host = Tensor::empty(t.size(), (t.kind(), Device::Cpu));
                    // Page-locked memory lets the device copy run at full speed.
                    if t.device().is_cuda() {
                        host.pin_memory(t.device())
                    } else {
                        host
                    }
                })
                .collect(),
        };
        let copy = |pairs: &[(Tensor, Tensor)]| {
            tch::no_grad(|| {
                for (h, t) in pairs {
                    h.shallow_clone().copy_(t);
                }
            })
        };
        let (now, later): (Vec<_>, Vec<_>) = host
            .iter()
            .zip(&sources)
            .enumerate()
            .map(|(i, (h, t))| (i, (h.shallow_clone(), t.shallow_clone())))
            .partition(|(i, _)| !OPTIMIZER_CHANGED.contains(i));
        copy(&now.into_iter().map(|(_, p)| p).collect::<Vec<_>>());
        let later: Vec<(Tensor, Tensor)> = later.into_iter().map(|(_, p)| p).collect();
        let copier = std::thread::Builder::new()
            .name("snapshot-copy".to_owned())
            .spawn(move || copy(&later))
            .expect("spawning the snapshot copy");
        PendingSnapshot {
            snapshot: Snapshot {
                slots: Arc::new((
                    self.flat.param_slots.clone(),
                    self.flat.buffer_slots.clone(),
                )),
                host,
                loose_names: names,
            },
            copier,
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

/// Positions in [`TrainingState::sources`] of the buffers only the optimizer and the EMA
/// change: parameters, mean square, momentum, EMA parameters, EMA statistics.
const OPTIMIZER_CHANGED: [usize; 5] = [0, 2, 3, 4, 5];

/// A snapshot whose large buffers are still being copied (see
/// [`TrainingState::begin_snapshot`]).
pub struct PendingSnapshot {
    snapshot: Snapshot,
    copier: std::thread::JoinHandle<()>,
}

impl PendingSnapshot {
    /// Waits for the copy; the state may change from here on.
    pub fn finish(self) -> Snapshot {
        self.copier
            .join()
            .expect("the snapshot copy does not panic");
        self.snapshot
    }
}

/// A training state copied to host memory, independent of the live one: it can be written on
/// another thread while training continues.
pub struct Snapshot {
    slots: Arc<(Vec<Slot>, Vec<Slot>)>,
    /// Params, buffers, mean square, momentum, EMA params, EMA buffers, then the loose
    /// variables named by `loose_names`.
    host: Vec<Tensor>,
    loose_names: Vec<String>,
}

impl Snapshot {
    /// `model.safetensors`'s tensors, in name order.
    pub fn model_tensors(&self) -> Vec<(String, Tensor)> {
        let (param_slots, buffer_slots) = &*self.slots;
        let mut named: Vec<(String, Tensor)> = param_slots
            .iter()
            .map(|s| (s.name.clone(), s.view(&self.host[0])))
            .chain(
                buffer_slots
                    .iter()
                    .map(|s| (s.name.clone(), s.view(&self.host[1]))),
            )
            .chain(
                self.loose_names
                    .iter()
                    .zip(&self.host[6..])
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
            mean_square: &self.host[2],
            momentum: &self.host[3],
            ema_params: &self.host[4],
            ema_buffers: &self.host[5],
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
