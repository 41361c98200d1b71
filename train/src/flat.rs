//! One contiguous buffer for all trainable parameters, one for their gradients and one for the
//! floating-point BatchNorm buffers, with every variable of the model re-pointed to a view into
//! them (as DDP's "gradient as bucket view" does).
//!
//! Autograd then accumulates micro-batch gradients straight into the flat gradient buffer; the
//! optimizer and the EMA update everything with a handful of whole-buffer operations instead of
//! a few per tensor. The layout is the variables in name order, the same on every rank.
//!
//! The gradient buffer is the head of the step's [`FlatState::reduced`] buffer, followed by
//! room for each rank's share of the BatchNorm statistics and for the step's statistics
//! ([`STEP_STATISTICS`]): everything a step sums across the ranks lies in one buffer, which a
//! collective reduces in one call, with no gather or scatter copies.

use std::collections::BTreeMap;
use tch::{Kind, Tensor, nn};

/// How 4-dimensional (convolution) weights are laid out inside the flat buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Contiguous,
    /// NHWC in memory, as cuDNN's fastest kernels want on GPUs; the views keep NCHW shapes.
    ChannelsLast,
}

/// Where one variable lives inside its flat buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct Slot {
    pub name: String,
    pub offset: i64,
    pub shape: Vec<i64>,
    pub channels_last: bool,
}

impl Slot {
    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }

    /// The variable's view into `flat` (any buffer with this layout).
    pub fn view(&self, flat: &Tensor) -> Tensor {
        let elements = flat.narrow(0, self.offset, self.numel());
        if self.channels_last {
            let s = &self.shape;
            elements
                .view([s[0], s[2], s[3], s[1]])
                .permute([0, 3, 1, 2])
        } else {
            elements.view(self.shape.as_slice())
        }
    }
}

/// Copies the variables of `flat` (laid out by `slots`) into `into`, a flat tensor on any
/// device laid out the same way, each in standard order as the checkpoint files hold them.
/// Variables are reordered on `flat`'s device in groups of about `group_elements` and each
/// group crosses to `into` in one copy: from a GPU, a few transfers instead of one per
/// variable (each of which waits for the work queued before it), and a staging buffer of
/// bounded size beside the activations of the step running meanwhile.
pub fn copy_in_standard_order(flat: &Tensor, slots: &[Slot], into: &Tensor, group_elements: i64) {
    let mut rest = slots;
    while let Some(first) = rest.first() {
        let mut end = 1;
        while end < rest.len()
            && rest[end].offset + rest[end].numel() - first.offset <= group_elements
        {
            end += 1;
        }
        let (group, after) = rest.split_at(end);
        let last = &group[group.len() - 1];
        let len = last.offset + last.numel() - first.offset;
        let staged = Tensor::empty([len], (flat.kind(), flat.device()));
        tch::no_grad(|| {
            for slot in group {
                staged
                    .narrow(0, slot.offset - first.offset, slot.numel())
                    .view(slot.shape.as_slice())
                    .copy_(&slot.view(flat));
            }
            into.narrow(0, first.offset, len).copy_(&staged);
        });
        rest = after;
    }
}

/// The step's statistics, summed across the ranks with the gradients: its summed loss, the
/// samples it trained and skipped, and the digest of their ids as six 12-bit limbs (see
/// [`crate::data_parallel::u64_to_floats`]).
pub const STEP_STATISTICS: i64 = 3 + 6;

pub struct FlatState {
    pub params: Tensor,
    /// The head of [`FlatState::reduced`].
    pub grads: Tensor,
    /// What one step reduces across the ranks in one call: the gradients, then a rank's share
    /// of the BatchNorm statistics ([`FlatState::statistics_share`]), then the step's
    /// statistics ([`FlatState::step_statistics`]).
    pub reduced: Tensor,
    pub buffers: Tensor,
    pub param_slots: Vec<Slot>,
    pub buffer_slots: Vec<Slot>,
    /// 1 for the weights that weight decay applies to (convolutions and linear layers), 0 for
    /// biases and BatchNorm parameters, which are the 1-dimensional ones.
    pub decay_mask: Tensor,
}

/// Copies each variable into its place in a new flat buffer and re-points it there.
fn flatten(
    vars: &[(String, Tensor)],
    kind: Kind,
    device: tch::Device,
    layout: Layout,
) -> (Tensor, Vec<Slot>) {
    let total: i64 = vars.iter().map(|(_, t)| t.numel() as i64).sum();
    let flat = Tensor::zeros([total], (kind, device));
    let mut slots = Vec::with_capacity(vars.len());
    let mut offset = 0;
    for (name, var) in vars {
        let shape = var.size();
        let slot = Slot {
            name: name.clone(),
            offset,
            channels_last: layout == Layout::ChannelsLast && shape.len() == 4,
            shape,
        };
        let view = slot.view(&flat);
        tch::no_grad(|| {
            view.shallow_clone().copy_(var);
            var.shallow_clone().set_data(&view);
        });
        offset += slot.numel();
        slots.push(slot);
    }
    (flat, slots)
}

impl FlatState {
    /// Moves every float variable of `vs` into flat buffers. Call once, after loading weights
    /// and before training.
    pub fn new(vs: &nn::VarStore, layout: Layout) -> FlatState {
        let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
        let (trainable, rest): (Vec<_>, Vec<_>) =
            vars.into_iter().partition(|(_, t)| t.requires_grad());
        let floating: Vec<(String, Tensor)> = rest
            .into_iter()
            .filter(|(_, t)| t.is_floating_point())
            .collect();
        let device = vs.device();
        let (params, param_slots) = flatten(&trainable, Kind::Float, device, layout);
        let (buffers, buffer_slots) = flatten(&floating, Kind::Float, device, layout);

        // Give every parameter a gradient that is a view of the flat gradient buffer, so that
        // backward accumulates in place there. A zero backward first defines the gradient
        // tensors, which are then re-pointed.
        let (params_len, buffers_len) = (params.numel() as i64, buffers.numel() as i64);
        let reduced = Tensor::zeros(
            [params_len + buffers_len + STEP_STATISTICS],
            (Kind::Float, device),
        );
        let grads = reduced.narrow(0, 0, params_len);
        let undefined: Vec<&Tensor> = trainable
            .iter()
            .map(|(_, var)| var)
            .filter(|var| !var.grad().defined())
            .collect();
        if !undefined.is_empty() {
            let zero: Tensor = undefined.iter().map(|v| (*v * 0.0).sum(Kind::Float)).sum();
            zero.backward();
        }
        tch::no_grad(|| {
            for ((_, var), slot) in trainable.iter().zip(&param_slots) {
                let mut grad = var.grad();
                grad.set_data(&slot.view(&grads));
                let _ = grad.zero_();
            }
        });
        let decay_mask = Tensor::zeros_like(&params);
        for slot in &param_slots {
            if slot.shape.len() > 1 {
                let _ = slot.view(&decay_mask).fill_(1.0);
            }
        }
        FlatState {
            params,
            grads,
            reduced,
            buffers,
            param_slots,
            buffer_slots,
            decay_mask,
        }
    }

    pub fn zero_grads(&self) {
        let _ = self.grads.shallow_clone().zero_();
    }

    /// Where a rank's share of the BatchNorm statistics is summed: laid out as `buffers`.
    pub fn statistics_share(&self) -> Tensor {
        self.reduced
            .narrow(0, self.grads.numel() as i64, self.buffers.numel() as i64)
    }

    /// Where the step's statistics are summed ([`STEP_STATISTICS`] floats).
    pub fn step_statistics(&self) -> Tensor {
        let len = self.reduced.numel() as i64;
        self.reduced
            .narrow(0, len - STEP_STATISTICS, STEP_STATISTICS)
    }

    /// Named views of a buffer laid out like the parameters (gradients, optimizer state, EMA).
    pub fn named_param_views(&self, flat: &Tensor, prefix: &str) -> Vec<(String, Tensor)> {
        self.param_slots
            .iter()
            .map(|s| (format!("{prefix}{}", s.name), s.view(flat)))
            .collect()
    }

    /// Named views of a buffer laid out like the BatchNorm buffers.
    pub fn named_buffer_views(&self, flat: &Tensor, prefix: &str) -> Vec<(String, Tensor)> {
        self.buffer_slots
            .iter()
            .map(|s| (format!("{prefix}{}", s.name), s.view(flat)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, nn};

    #[test]
    fn channels_last_variables_are_copied_in_standard_order_whatever_the_group_size() {
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        for (name, shape) in [
            ("a", vec![2, 3, 2, 2]),
            ("b", vec![5]),
            ("c", vec![4, 2, 3, 1]),
        ] {
            let _ = root.randn(name, &shape, 0.0, 1.0);
        }
        let flat = FlatState::new(&vs, Layout::ChannelsLast);
        assert!(flat.param_slots.iter().any(|s| s.channels_last));
        let expected = Tensor::cat(
            &flat
                .param_slots
                .iter()
                .map(|s| s.view(&flat.params).contiguous().view([-1]))
                .collect::<Vec<_>>(),
            0,
        );
        // Groups of one variable (even one larger than the group), several, and all.
        for group_elements in [1, 30, 1 << 20] {
            let into = flat.params.zeros_like();
            copy_in_standard_order(&flat.params, &flat.param_slots, &into, group_elements);
            assert!(into.equal(&expected), "groups of {group_elements}");
        }
    }
}
