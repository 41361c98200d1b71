//! Evaluation on the held-out split with the EMA weights, at the end of each stage.

use super::{TrainError, Trainer};
use crate::data_parallel::all_reduce_tensor;
use crate::events::Evaluation;
use crate::feed;
use ladder_core::stage::{micro_batch_for, round_to_multiple_of_8};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

impl Trainer {
    /// Top-1 and top-5 on the held-out split with the EMA weights, each rank evaluating every
    /// `world`-th sample; `None` without a held-out split.
    pub(super) fn evaluate(&mut self, epoch: u32) -> Result<Option<Evaluation>, TrainError> {
        self.checkpoints.complete();
        let Some(eval_set) = self.eval_set.clone() else {
            return Ok(None);
        };
        let started = Instant::now();
        let spec = self.spec.clone();
        let size = spec.schedule.eval_size;
        let batch = micro_batch_for(
            size,
            round_to_multiple_of_8(spec.schedule.max_size as f64),
            spec.batch.micro_at_max_size,
            spec.batch.micro_max,
        );
        let requests = feed::eval_requests(
            &spec,
            eval_set.len(),
            size,
            batch,
            self.job.rank,
            self.job.world_size,
            feed::pixel_format(&self.spec, self.options.device),
        );
        let loader = self.loader(&eval_set, requests.into_iter());
        let live = (self.flat.params.copy(), self.flat.buffers.copy());
        let swap_in = |params: &Tensor, buffers: &Tensor| {
            tch::no_grad(|| {
                self.flat.params.shallow_clone().copy_(params);
                self.flat.buffers.shallow_clone().copy_(buffers);
            })
        };
        swap_in(&self.ema.params, &self.ema.buffers);
        let classes = spec.model.classes as i64;
        let counts = Tensor::zeros([3], (Kind::Float, self.options.device));
        let result = (|| -> Result<(), TrainError> {
            while let Some(batch) = loader.next() {
                if let Some(reason) = self.stop.reason() {
                    return Err(TrainError::Stopped(reason));
                }
                let batch = batch.map_err(|e| TrainError::Fatal(e.to_string()))?;
                let (images, labels) = self.to_device(&batch);
                let logits = tch::no_grad(|| self.forward(&images, false));
                let top = logits.topk(classes.min(5), 1, true, true).1;
                let hits = top.eq_tensor(&labels.unsqueeze(1));
                let top1 = hits.narrow(1, 0, 1).sum(Kind::Float);
                let top5 = hits.sum(Kind::Float);
                let n = Tensor::full(
                    [],
                    batch.labels.len() as f64,
                    (Kind::Float, self.options.device),
                );
                self.liveness.tick();
                let _ = counts
                    .shallow_clone()
                    .g_add_(&Tensor::stack(&[top1, top5, n], 0));
            }
            Ok(())
        })();
        swap_in(&live.0, &live.1);
        result?;
        let collective = self.collective.as_mut();
        self.liveness
            .collective(|| all_reduce_tensor(&counts, collective))?;
        let counts = Vec::<f32>::try_from(&counts.to_device(Device::Cpu)).expect("3 floats");
        let samples = counts[2] as u64;
        let evaluation = Evaluation {
            epoch,
            top1: counts[0] as f64 / samples.max(1) as f64,
            top5: counts[1] as f64 / samples.max(1) as f64,
            samples,
        };
        tracing::info!(
            epoch = epoch + 1,
            top1 = evaluation.top1,
            top5 = evaluation.top5,
            samples,
            seconds = started.elapsed().as_secs_f64(),
            "evaluated the EMA weights"
        );
        Ok(Some(evaluation))
    }
}
