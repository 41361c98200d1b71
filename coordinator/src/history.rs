//! A job's curves, as the status page draws them: training points (loss, learning rate,
//! images/s, image size, each rank's data-wait share) and evaluations, by global step.
//!
//! Bounded for week-long runs: at most [`MAX_POINTS`] training points, spread evenly over the
//! run. A point is kept when it is the first reported in its `stride`-step bucket; when the
//! points outgrow the bound the stride doubles and every other bucket's point goes, so a run
//! of a million steps keeps one point per few thousand steps, from its first step to its last.
//! Rolled back with the job: a generation that restores from step S drops what came after S,
//! so a curve never runs backwards or shows a step twice.

use crate::records::ProgressRecord;
use serde::{Deserialize, Serialize};

/// The most training points a job keeps.
pub const MAX_POINTS: usize = 512;

/// The most data-wait series a point keeps. With more ranks, each series is the slowest
/// (highest share) of a group of consecutive ranks, so that a point does not grow with the
/// world: a 1,024-rank job's curves would otherwise outgrow an etcd request.
pub const MAX_RANK_SERIES: usize = 32;

/// Each rank's data-wait share (`shares`, by rank) as a point keeps them: each rank's, or for
/// more than [`MAX_RANK_SERIES`] ranks, the highest of each of that many groups of
/// consecutive ranks (group `g` of `n` ranks: ranks `g * n / 32` up to `(g + 1) * n / 32`).
pub fn rank_series(shares: &[f32]) -> Vec<f32> {
    let n = shares.len();
    if n <= MAX_RANK_SERIES {
        return shares.to_vec();
    }
    (0..MAX_RANK_SERIES)
        .map(|g| {
            let group = &shares[g * n / MAX_RANK_SERIES..(g + 1) * n / MAX_RANK_SERIES];
            group.iter().copied().fold(0.0, f32::max)
        })
        .collect()
}

/// The most evaluations a job keeps (one per stage; a run of more stages keeps the newest
/// and every other older one, thinned again as they grow).
pub const MAX_EVALUATIONS: usize = 256;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// Global step (steps done since the start of the run).
    pub step: u64,
    #[serde(with = "ladder_proto::saved_f32")]
    pub loss: f32,
    #[serde(with = "ladder_proto::saved_f32")]
    pub learning_rate: f32,
    #[serde(with = "ladder_proto::saved_f32")]
    pub images_per_second: f32,
    pub image_size: u32,
    /// Wall-clock milliseconds of the report.
    pub time_ms: i64,
    /// Each rank's share of step time spent waiting for data, by rank, as each last said.
    #[serde(with = "ladder_proto::saved_f32::vec")]
    pub data_wait: Vec<f32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// The 1-based epoch after which it ran.
    pub epoch: u32,
    pub step: u64,
    #[serde(with = "ladder_proto::saved_f32")]
    pub top1: f32,
    #[serde(with = "ladder_proto::saved_f32")]
    pub top5: f32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct History {
    pub points: Vec<Point>,
    pub evaluations: Vec<Evaluation>,
    /// Steps per bucket: at most one point per bucket is kept.
    pub stride: u64,
    /// Changes so far: what was saved is current while this is the same.
    #[serde(default)]
    pub version: u64,
}

impl Default for History {
    fn default() -> Self {
        History {
            points: Vec::new(),
            evaluations: Vec::new(),
            stride: 1,
            version: 0,
        }
    }
}

impl History {
    /// Adds what a progress report says (`data_wait` by rank), at wall-clock `time_ms`.
    pub fn record(&mut self, progress: &ProgressRecord, data_wait: Vec<f32>, time_ms: i64) {
        let step = progress.global_step;
        if progress.eval_epoch > 0
            && self
                .evaluations
                .last()
                .is_none_or(|e| e.epoch < progress.eval_epoch)
        {
            self.evaluations.push(Evaluation {
                epoch: progress.eval_epoch,
                step,
                top1: progress.eval_top1,
                top5: progress.eval_top5,
            });
            self.version += 1;
            if self.evaluations.len() > MAX_EVALUATIONS {
                let newest = self.evaluations.len() - 1;
                let mut index = 0;
                self.evaluations.retain(|_| {
                    index += 1;
                    index % 2 == 1 || index - 1 == newest
                });
            }
        }
        if step == 0 {
            // Nothing trained yet (a report of the start, or of an evaluation only).
            return;
        }
        if self
            .points
            .last()
            .is_some_and(|last| last.step / self.stride >= step / self.stride)
        {
            return;
        }
        self.points.push(Point {
            step,
            loss: progress.loss,
            learning_rate: progress.learning_rate,
            images_per_second: progress.images_per_second,
            image_size: progress.image_size,
            time_ms,
            data_wait,
        });
        self.version += 1;
        while self.points.len() > MAX_POINTS {
            self.stride *= 2;
            let stride = self.stride;
            let mut last_bucket = None;
            self.points.retain(|p| {
                let bucket = p.step / stride;
                let first = last_bucket != Some(bucket);
                last_bucket = Some(bucket);
                first
            });
        }
    }

    /// Forgets what came after global step `step` (a new generation restores from there).
    pub fn roll_back_to(&mut self, step: u64) {
        let before = (self.points.len(), self.evaluations.len());
        self.points.retain(|p| p.step <= step);
        self.evaluations.retain(|e| e.step <= step);
        if (self.points.len(), self.evaluations.len()) != before {
            self.version += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(step: u64) -> ProgressRecord {
        ProgressRecord {
            global_step: step,
            loss: 1.0 / (1 + step) as f32,
            ..ProgressRecord::default()
        }
    }

    proptest::proptest! {
        /// However many reports come, at whatever steps: the points stay bounded, in strictly
        /// increasing step order, cover the run from near its start to its newest report, and
        /// are spread out (no two in one stride bucket).
        #[test]
        fn points_stay_bounded_ordered_and_spread_over_the_run(
            gaps in proptest::collection::vec(1u64..50, 1..3_000),
        ) {
            let mut history = History::default();
            let mut step = 0;
            for gap in &gaps {
                step += gap;
                history.record(&progress(step), vec![0.5], 0);
            }
            let points = &history.points;
            proptest::prop_assert!(points.len() <= MAX_POINTS);
            proptest::prop_assert!(points.windows(2).all(|w| w[0].step / history.stride < w[1].step / history.stride));
            proptest::prop_assert_eq!(points[0].step, gaps[0], "the first report stays");
            // The newest report's bucket has its point.
            proptest::prop_assert_eq!(step / history.stride, points.last().unwrap().step / history.stride);
            // Spread: past the bound once, the points fill at least half of it.
            if history.stride > 1 {
                proptest::prop_assert!(points.len() >= MAX_POINTS / 2 - 1, "{}", points.len());
            }
        }
    }

    #[test]
    fn a_point_keeps_at_most_32_data_wait_series_each_the_slowest_of_its_ranks() {
        let few: Vec<f32> = (0..8).map(|r| r as f32 / 10.0).collect();
        assert_eq!(rank_series(&few), few);
        let mut many = vec![0.1; 1024];
        many[37] = 0.9;
        let series = rank_series(&many);
        assert_eq!(series.len(), MAX_RANK_SERIES);
        // Ranks 32 to 63 are the second group.
        assert_eq!(series[1], 0.9);
        assert!(series.iter().enumerate().all(|(g, &s)| g == 1 || s == 0.1));
        assert_eq!(rank_series(&[0.5; 33]).len(), MAX_RANK_SERIES);
    }

    #[test]
    fn a_roll_back_forgets_the_steps_after_the_restore_point_and_steps_go_on_from_it() {
        let mut history = History::default();
        for step in 1..=30 {
            let mut p = progress(step);
            if step >= 20 {
                (p.eval_epoch, p.eval_top1) = (2, 0.5);
            }
            history.record(&p, vec![], step as i64);
        }
        assert_eq!(history.evaluations.len(), 1);
        history.roll_back_to(15);
        assert_eq!(history.points.last().unwrap().step, 15);
        assert!(history.evaluations.is_empty());
        history.record(&progress(16), vec![], 99);
        let steps: Vec<u64> = history.points.iter().map(|p| p.step).collect();
        assert_eq!(steps, (1..=16).collect::<Vec<_>>());
    }
}
