//! A training run's state on disk, in four safetensors files of a directory:
//!
//! - `model.safetensors`: the model's weights and BatchNorm buffers under torchvision's names,
//!   loadable as is with `torchvision.models.efficientnet_v2_*().load_state_dict(...)`;
//! - `optimizer.mean_square.safetensors` and `optimizer.momentum.safetensors`: RMSProp's state,
//!   as `optimizer.mean_square.NAME` and `optimizer.momentum.NAME`;
//! - `ema.safetensors`: the moving averages `ema.NAME` of every parameter and floating-point
//!   buffer.
//!
//! Four files of the model's size rather than one, so that they are written and hashed on
//! several cores at once (SHA-256 runs at about 2 GB/s per core, slower than a fast disk).
//! Loading checks every name, shape and dtype and changes nothing unless all match. A
//! [`Snapshot`] is the same state copied to host memory, to be written while training goes on:
//! it is the files themselves, byte for byte ([`FileImage`]), so writing them copies nothing.

use crate::checkpoint::safetensors::{self, Entry, FileImage, StateError, Written};
use crate::ema::Ema;
use crate::flat::{self, FlatState, Slot};
use crate::optim::RmsProp;
use std::path::Path;
use tch::{Tensor, nn};

pub const MODEL_FILE: &str = "model.safetensors";
pub const MEAN_SQUARE_FILE: &str = "optimizer.mean_square.safetensors";
pub const MOMENTUM_FILE: &str = "optimizer.momentum.safetensors";
pub const EMA_FILE: &str = "ema.safetensors";
/// The files of a training state, in the order of [`Snapshot::write`]'s result.
pub const STATE_FILES: [&str; 4] = [MODEL_FILE, MEAN_SQUARE_FILE, MOMENTUM_FILE, EMA_FILE];

/// Everything that changes while training, borrowed from its owners.
pub struct TrainingState<'a> {
    pub vs: &'a nn::VarStore,
    pub flat: &'a FlatState,
    pub optimizer: &'a mut RmsProp,
    pub ema: &'a mut Ema,
}

/// The flat buffers of a training state, in [`TrainingState::sources`]' order, with the file
/// each goes to and the prefix of its tensors' names there.
const FLAT_SOURCES: [(&str, &str); 6] = [
    (MODEL_FILE, ""),
    (MODEL_FILE, ""),
    (MEAN_SQUARE_FILE, "optimizer.mean_square."),
    (MOMENTUM_FILE, "optimizer.momentum."),
    (EMA_FILE, "ema."),
    (EMA_FILE, "ema."),
];

/// Positions in [`TrainingState::sources`] of the buffers only the optimizer and the EMA
/// change: parameters, mean square, momentum, EMA parameters, EMA statistics.
const OPTIMIZER_CHANGED: [usize; 5] = [0, 2, 3, 4, 5];

fn file_index(name: &str) -> usize {
    STATE_FILES
        .iter()
        .position(|f| *f == name)
        .expect("one of the state files")
}

impl TrainingState<'_> {
    /// The slots of each flat source: parameters' for parameter-shaped buffers, buffers' for
    /// the BatchNorm statistics and their averages.
    fn flat_slots(&self) -> [&[Slot]; 6] {
        let (params, buffers) = (&self.flat.param_slots[..], &self.flat.buffer_slots[..]);
        [params, buffers, params, params, params, buffers]
    }

    /// The live tensors a snapshot copies, in a fixed order: the six flat buffers, then the
    /// variables outside them (BatchNorm's integer batch counters), with their names.
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
        for (name, t) in safetensors::named(self.vs, "") {
            if !flat.param_slots.iter().any(|s| s.name == name)
                && !flat.buffer_slots.iter().any(|s| s.name == name)
            {
                tensors.push(t);
                names.push(name);
            }
        }
        (tensors, names)
    }

    /// Each file's entries, and where each source goes: its file and its first entry there.
    fn layout(&self, sources: &[Tensor], loose_names: &[String]) -> Layout {
        let mut files: [Vec<Entry>; STATE_FILES.len()] = Default::default();
        let mut placements = Vec::with_capacity(sources.len());
        for ((source, (file, prefix)), slots) in
            sources.iter().zip(FLAT_SOURCES).zip(self.flat_slots())
        {
            let entries = &mut files[file_index(file)];
            placements.push((file_index(file), entries.len()));
            entries.extend(slots.iter().map(|slot| Entry {
                name: format!("{prefix}{}", slot.name),
                kind: source.kind(),
                shape: slot.shape.clone(),
            }));
        }
        for (source, name) in sources[FLAT_SOURCES.len()..].iter().zip(loose_names) {
            let entries = &mut files[file_index(MODEL_FILE)];
            placements.push((file_index(MODEL_FILE), entries.len()));
            entries.push(Entry {
                name: name.clone(),
                kind: source.kind(),
                shape: source.size(),
            });
        }
        Layout { files, placements }
    }

    /// The copies of the whole state into the snapshot's images, one per source (none for an
    /// empty one).
    fn copies(
        &self,
        images: &[FileImage],
        sources: &[Tensor],
        layout: &Layout,
    ) -> Vec<Option<Transfer>> {
        let slots = self.flat_slots();
        sources
            .iter()
            .zip(&layout.placements)
            .enumerate()
            .map(|(i, (source, &(file, first)))| {
                let image = &images[file];
                if source.numel() == 0 {
                    // A model without BatchNorm has no buffers: nothing to copy, no entry.
                    return None;
                }
                let from = source.shallow_clone();
                Some(match slots.get(i) {
                    Some(slots) => Transfer {
                        into: image.span(first, source.numel() as i64, source.kind()),
                        from,
                        reorder: slots
                            .iter()
                            .any(|s| s.channels_last)
                            .then(|| slots.to_vec()),
                    },
                    None => Transfer {
                        into: image.view(first),
                        from,
                        reorder: None,
                    },
                })
            })
            .collect()
    }

    pub fn save(&self, dir: &Path) -> Result<(), StateError> {
        self.snapshot(None).write(dir).map(|_| ())
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
        let layout = self.layout(&sources, &names);
        let images = match reuse.filter(|s| s.fits(&layout)) {
            Some(previous) => previous.images,
            None => {
                // Page-locked memory lets the device copy run at full speed.
                let pin = Some(self.flat.params.device()).filter(|d| d.is_cuda());
                layout
                    .files
                    .iter()
                    .map(|entries| {
                        FileImage::new(entries.clone(), pin)
                            .expect("a training state holds float32 and int64 tensors only")
                    })
                    .collect()
            }
        };
        let (now, later): (Vec<_>, Vec<_>) = self
            .copies(&images, &sources, &layout)
            .into_iter()
            .enumerate()
            .partition(|(i, _)| !OPTIMIZER_CHANGED.contains(i));
        let transfers = |copies: Vec<(usize, Option<Transfer>)>| -> Vec<Transfer> {
            copies.into_iter().filter_map(|(_, t)| t).collect()
        };
        transfers(now).iter().for_each(Transfer::run);
        let later = transfers(later);
        let copier = std::thread::Builder::new()
            .name("snapshot-copy".to_owned())
            .spawn(move || later.iter().for_each(Transfer::run))
            .expect("spawning the snapshot copy");
        PendingSnapshot {
            snapshot: Snapshot { images },
            copier,
        }
    }

    /// Views of the live moving averages under `ema.safetensors`' names.
    fn ema_views(&self) -> Vec<(String, Tensor)> {
        let mut named = views(&self.flat.param_slots, &self.ema.params, "ema.");
        named.extend(views(&self.flat.buffer_slots, &self.ema.buffers, "ema."));
        named
    }

    pub fn load(&mut self, dir: &Path) -> Result<(), StateError> {
        let slots = &self.flat.param_slots;
        let targets = [
            safetensors::named(self.vs, ""),
            views(slots, &self.optimizer.mean_square, "optimizer.mean_square."),
            views(
                slots,
                &self.optimizer.momentum_buffer,
                "optimizer.momentum.",
            ),
            self.ema_views(),
        ];
        let mut files = Vec::with_capacity(STATE_FILES.len());
        for name in STATE_FILES {
            let path = dir.join(name);
            files.push((safetensors::read(&path)?, path.display().to_string()));
        }
        // Check every file before changing anything.
        for (targets, (tensors, origin)) in targets.iter().zip(&files) {
            safetensors::check(targets, tensors, "", origin)?;
        }
        for (targets, (tensors, origin)) in targets.iter().zip(&files) {
            safetensors::load_into(targets, tensors, "", origin)?;
        }
        Ok(())
    }
}

/// `prefix + slot name` and the slot's view of `flat`, per slot.
fn views(slots: &[Slot], flat: &Tensor, prefix: &str) -> Vec<(String, Tensor)> {
    slots
        .iter()
        .map(|s| (format!("{prefix}{}", s.name), s.view(flat)))
        .collect()
}

/// One copy of a snapshot: a live tensor into its place in a file image.
struct Transfer {
    into: Tensor,
    from: Tensor,
    /// The slots of `from` when it keeps convolution weights channels-last: the files hold
    /// standard order, so it is reordered on its own device first (see
    /// [`flat::copy_in_standard_order`]).
    reorder: Option<Vec<Slot>>,
}

/// Elements reordered at a time on the device (64 MB of float32) in [`Transfer::run`].
const REORDER_GROUP_ELEMENTS: i64 = 1 << 24;

impl Transfer {
    fn run(&self) {
        match &self.reorder {
            Some(slots) => {
                flat::copy_in_standard_order(&self.from, slots, &self.into, REORDER_GROUP_ELEMENTS)
            }
            None => tch::no_grad(|| self.into.shallow_clone().copy_(&self.from)),
        }
    }
}

/// What a snapshot of a training state looks like: each file's entries, and per source (see
/// [`TrainingState::sources`]) its file and first entry.
struct Layout {
    files: [Vec<Entry>; STATE_FILES.len()],
    placements: Vec<(usize, usize)>,
}

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

/// A training state copied to host memory as the images of its files, independent of the
/// live state: it can be written on another thread while training continues.
pub struct Snapshot {
    /// In [`STATE_FILES`] order.
    images: Vec<FileImage>,
}

impl Snapshot {
    fn fits(&self, layout: &Layout) -> bool {
        self.images
            .iter()
            .zip(&layout.files)
            .all(|(image, entries)| image.entries() == entries.as_slice())
    }

    /// Writes the files into `dir` (created if missing), all at once, each flushed to disk.
    pub fn write(&self, dir: &Path) -> Result<Vec<(&'static str, Written)>, StateError> {
        std::fs::create_dir_all(dir).map_err(|e| StateError::File {
            path: dir.display().to_string(),
            message: e.to_string(),
        })?;
        let paths: Vec<_> = STATE_FILES.iter().map(|name| dir.join(name)).collect();
        let images: Vec<(&Path, &FileImage)> = paths
            .iter()
            .map(|p| p.as_path())
            .zip(&self.images)
            .collect();
        let written = safetensors::write_images(&images)?;
        Ok(STATE_FILES.into_iter().zip(written).collect())
    }
}
