//! What a spec may hold: every field's value checked against what it allows, each problem
//! named with its field, its value and the allowed range, all of them at once.

use super::*;

/// One thing wrong with a spec: which field, what it holds, what it may hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub value: String,
    pub allowed: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = {}: {}", self.field, self.value, self.allowed)
    }
}

impl JobSpec {
    /// Every problem with the spec's values, in field order.
    pub fn problems(&self) -> Vec<Problem> {
        let mut c = Checker::default();
        let name = &self.job.name;
        c.check(
            "job.name",
            format!("{name:?}"),
            !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "._-".contains(ch)),
            "1 to 64 characters of letters, digits, '.', '_' and '-'",
        );

        let m = &self.model;
        c.check(
            "model.classes",
            m.classes,
            (2..=1_000_000).contains(&m.classes),
            "between 2 and 1000000",
        );
        c.range_open("model.bn_eps", m.bn_eps, 0.0, 1.0);
        c.check(
            "model.bn_momentum",
            m.bn_momentum,
            m.bn_momentum > 0.0 && m.bn_momentum <= 1.0,
            "in (0, 1] (PyTorch's convention: TF's 0.99 is 0.01)",
        );
        if let Some(path) = &m.init_from {
            c.check(
                "model.init_from",
                format!("{path:?}"),
                path.extension().is_some_and(|e| e == "safetensors"),
                "a .safetensors file (convert a .pth with: python -c \"import torch, safetensors.torch as s; s.save_file(torch.load('IN.pth'), 'OUT.safetensors')\")",
            );
        }

        let d = &self.data;
        c.check(
            "data.manifest",
            format!("{:?}", d.manifest),
            !d.manifest.as_os_str().is_empty(),
            "a path to a manifest written by `ladder dataset index`",
        );
        c.check(
            "data.crop_scale",
            format!("{:?}", d.crop_scale),
            d.crop_scale[0] > 0.0 && d.crop_scale[0] <= d.crop_scale[1] && d.crop_scale[1] <= 1.0,
            "[low, high] with 0 < low <= high <= 1",
        );
        c.check(
            "data.crop_ratio",
            format!("{:?}", d.crop_ratio),
            d.crop_ratio[0] > 0.0 && d.crop_ratio[0] <= d.crop_ratio[1] && d.crop_ratio[1] < 100.0,
            "[low, high] with 0 < low <= high < 100",
        );
        c.check(
            "data.mean",
            format!("{:?}", d.mean),
            d.mean.iter().all(|v| (0.0..=1.0).contains(v)),
            "three values in [0, 1]",
        );
        c.check(
            "data.std",
            format!("{:?}", d.std),
            d.std.iter().all(|v| *v > 0.0 && *v <= 1.0),
            "three values in (0, 1]",
        );
        c.check(
            "data.shard_window",
            d.shard_window,
            d.shard_window >= 1,
            "at least 1",
        );
        c.check(
            "data.shuffle_block",
            d.shuffle_block,
            (1..=MAX_SHUFFLE_BLOCK).contains(&d.shuffle_block),
            format!("1 to {MAX_SHUFFLE_BLOCK}"),
        );
        c.check(
            "data.prefetch_mb",
            d.prefetch_mb,
            (1..=1 << 20).contains(&d.prefetch_mb),
            "between 1 and 1048576 MiB",
        );
        c.check(
            "data.decode_threads",
            d.decode_threads,
            d.decode_threads <= 1024,
            "at most 1024 (0: one per available core)",
        );

        let s = &self.schedule;
        c.check(
            "schedule.epochs",
            s.epochs,
            (1..=10_000).contains(&s.epochs),
            "between 1 and 10000",
        );
        c.check(
            "schedule.stage_epochs",
            s.stage_epochs,
            s.stage_epochs >= 1 && s.stage_epochs <= s.epochs.max(1),
            format!("between 1 and schedule.epochs ({})", s.epochs),
        );
        c.check(
            "schedule.min_size",
            s.min_size,
            (32..=1024).contains(&s.min_size),
            "between 32 and 1024 pixels",
        );
        c.check(
            "schedule.max_size",
            s.max_size,
            (s.min_size..=1024).contains(&s.max_size),
            format!("between schedule.min_size ({}) and 1024 pixels", s.min_size),
        );
        c.check(
            "schedule.eval_size",
            s.eval_size,
            (32..=1024).contains(&s.eval_size),
            "between 32 and 1024 pixels",
        );
        c.range_half_open("schedule.min_dropout", s.min_dropout, 0.0, 1.0);
        c.check(
            "schedule.max_dropout",
            s.max_dropout,
            s.max_dropout >= s.min_dropout && s.max_dropout < 1.0,
            format!("in [schedule.min_dropout ({}), 1)", s.min_dropout),
        );
        c.range_half_open("schedule.stochastic_depth", s.stochastic_depth, 0.0, 1.0);
        let scale = s.randaugment.magnitudes();
        let scale_name = match s.randaugment {
            RandAugmentScale::Official => {
                "the official scale, schedule.randaugment = \"official\": level 10 is its \
                 nominal top, higher levels extrapolate"
            }
            RandAugmentScale::Torchvision => {
                "torchvision's scale, schedule.randaugment = \"torchvision\": its 31 bins"
            }
        };
        c.check(
            "schedule.min_randaugment",
            s.min_randaugment,
            scale.contains(&s.min_randaugment),
            format!("in [{}, {}] on {scale_name}", scale.start(), scale.end()),
        );
        c.check(
            "schedule.max_randaugment",
            s.max_randaugment,
            s.max_randaugment >= s.min_randaugment && s.max_randaugment <= *scale.end(),
            format!(
                "in [schedule.min_randaugment ({}), {}] on {scale_name}",
                s.min_randaugment,
                scale.end()
            ),
        );
        // Mixup's and CutMix's alphas: 0 turns either off.
        for (name, what, min, max) in [
            ("mixup", "mixup", s.min_mixup, s.max_mixup),
            ("cutmix", "CutMix", s.min_cutmix, s.max_cutmix),
        ] {
            c.check(
                &format!("schedule.min_{name}"),
                min,
                (0.0..=10.0).contains(&min),
                format!("in [0, 10] (0 turns {what} off)"),
            );
            c.check(
                &format!("schedule.max_{name}"),
                max,
                max >= min && max <= 10.0,
                format!("in [schedule.min_{name} ({min}), 10]"),
            );
        }

        let o = &self.optimizer;
        c.check(
            "optimizer.lr_per_256",
            o.lr_per_256,
            o.lr_per_256 > 0.0 && o.lr_per_256 <= 10.0,
            "in (0, 10]",
        );
        c.range_open("optimizer.decay", o.decay, 0.0, 1.0);
        c.range_half_open("optimizer.momentum", o.momentum, 0.0, 1.0);
        c.range_open("optimizer.eps", o.eps, 0.0, 1.0);
        c.range_half_open("optimizer.weight_decay", o.weight_decay, 0.0, 1.0);
        c.check(
            "optimizer.warmup_epochs",
            o.warmup_epochs,
            o.warmup_epochs >= 0.0 && o.warmup_epochs < s.epochs as f64,
            format!("in [0, schedule.epochs ({}))", s.epochs),
        );
        c.check(
            "optimizer.lr_decay_rate",
            o.lr_decay_rate,
            o.lr_decay_rate > 0.0 && o.lr_decay_rate <= 1.0,
            "in (0, 1]",
        );
        c.check(
            "optimizer.lr_decay_epochs",
            o.lr_decay_epochs,
            o.lr_decay_epochs > 0.0,
            "greater than 0",
        );
        c.range_half_open("optimizer.ema_decay", o.ema_decay, 0.0, 1.0);
        c.range_half_open("optimizer.label_smoothing", o.label_smoothing, 0.0, 1.0);

        let b = &self.batch;
        c.check(
            "batch.global",
            b.global,
            (1..=1 << 20).contains(&b.global),
            "between 1 and 1048576",
        );
        c.check(
            "batch.micro_at_max_size",
            b.micro_at_max_size,
            b.micro_at_max_size >= 1 && b.micro_at_max_size <= b.global,
            format!("between 1 and batch.global ({})", b.global),
        );
        let ratio_ok = b.micro_at_max_size >= 1
            && b.micro_max >= b.micro_at_max_size
            && b.micro_max.is_multiple_of(b.micro_at_max_size)
            && (b.micro_max / b.micro_at_max_size).is_power_of_two();
        c.check(
            "batch.micro_max",
            b.micro_max,
            ratio_ok,
            format!(
                "batch.micro_at_max_size ({}) times a power of two",
                b.micro_at_max_size
            ),
        );
        c.check(
            "batch.global",
            b.global,
            b.micro_max >= 1 && b.global.is_multiple_of(b.micro_max),
            format!(
                "a multiple of batch.micro_max ({}), so that every stage has whole micro-batches",
                b.micro_max
            ),
        );

        let k = &self.checkpoint;
        c.check(
            "checkpoint.dir",
            format!("{:?}", k.dir),
            !k.dir.as_os_str().is_empty(),
            "a directory on storage every worker can reach",
        );
        c.check(
            "checkpoint.every_minutes",
            k.every_minutes,
            k.every_minutes.is_finite() && k.every_minutes >= 0.0,
            "0 (none by time) or more",
        );
        c.check(
            "checkpoint.every_steps",
            k.every_steps,
            k.every_steps >= 1 || k.every_minutes > 0.0,
            "at least 1, unless checkpoint.every_minutes is set",
        );
        // Each one kept is listed in the job's record, which must stay small.
        c.check(
            "checkpoint.keep",
            k.keep,
            (1..=100).contains(&k.keep),
            "between 1 and 100",
        );

        let w = &self.workers;
        c.check("workers.min", w.min, w.min >= 1, "at least 1");
        c.check(
            "workers.max",
            w.max,
            w.max >= w.min && w.max <= 65_536,
            format!("between workers.min ({}) and 65536", w.min),
        );
        if c.problems.is_empty() {
            let micro = self.min_micro_batches_per_step();
            let divisors: Vec<String> = (1..=micro)
                .filter(|n| micro.is_multiple_of(*n))
                .map(|n| n.to_string())
                .collect();
            c.check(
                "workers",
                format!("{}..={}", w.min, w.max),
                !self.allowed_world_sizes().is_empty(),
                format!(
                    "a range holding a divisor of the {micro} micro-batches per step \
                     (batch.global / batch.micro_max), so that every rank takes whole \
                     micro-batches: one of {}",
                    divisors.join(", ")
                ),
            );
        }
        c.problems
    }
}

#[derive(Default)]
struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn check(
        &mut self,
        field: &str,
        value: impl fmt::Display,
        ok: bool,
        allowed: impl Into<String>,
    ) {
        if !ok {
            self.problems.push(Problem {
                field: field.to_owned(),
                value: crate::cut(&value.to_string()),
                allowed: allowed.into(),
            });
        }
    }

    fn range_open(&mut self, field: &str, value: f64, low: f64, high: f64) {
        let ok = value > low && value < high;
        self.check(field, value, ok, format!("in ({low}, {high})"));
    }

    fn range_half_open(&mut self, field: &str, value: f64, low: f64, high: f64) {
        let ok = value >= low && value < high;
        self.check(field, value, ok, format!("in [{low}, {high})"));
    }
}
