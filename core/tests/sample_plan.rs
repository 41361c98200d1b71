use ladder_core::sample::{PlanError, SamplePlan, rank_micro_batches};
use proptest::prelude::*;
use std::collections::HashSet;

/// A dataset of 1 to 40 shards of 0 to 50 samples, a global batch it can fill, a micro-batch
/// that divides it, a window and a seed; and a shuffle block (1 half the time).
fn plan_inputs() -> impl Strategy<Value = (Vec<u32>, u32, u32, u32, u64, u32)> {
    (
        prop::collection::vec(0u32..50, 1..40),
        0u32..4,
        0u32..4,
        1u32..6,
        any::<u64>(),
        prop_oneof![Just(1u32), 2u32..12],
    )
        .prop_filter_map(
            "needs a whole step",
            |(shards, micro_pow, count_pow, window, seed, block)| {
                let micro = 1 << micro_pow;
                let global = micro << count_pow;
                let total: u32 = shards.iter().sum();
                (total >= global).then_some((shards, global, micro, window, seed, block))
            },
        )
}

fn build_plan(shards: &[u32], seed: u64, window: u32, global: u32, block: u32) -> SamplePlan {
    SamplePlan::new(shards, seed, window, global)
        .and_then(|plan| plan.with_shuffle_block(block))
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn an_epoch_is_a_permutation((shards, global, _micro, window, seed, block) in plan_inputs(), epoch in 0u32..5) {
        let plan = build_plan(&shards, seed, window, global, block);
        let total = plan.total_samples();
        let mut order = plan.epoch(epoch).samples(0..total);
        order.sort_unstable();
        prop_assert_eq!(order, (0..total).collect::<Vec<_>>());
    }

    #[test]
    fn a_shuffle_block_keeps_neighbours_together(
        (shards, global, _micro, window, seed, block) in plan_inputs(), epoch in 0u32..3,
    ) {
        let plan = build_plan(&shards, seed, window, global, block);
        let order = plan.epoch(epoch).samples(0..plan.total_samples());
        // A shard of n samples is cut into at most ceil(n / b) + 1 blocks; inside a block,
        // each sample follows its predecessor.
        let mut followed = vec![0u64; shards.len()];
        for pair in order.windows(2) {
            let (a, b) = (plan.locate(pair[0]), plan.locate(pair[1]));
            if a.shard == b.shard && b.index == a.index + 1 {
                followed[b.shard as usize] += 1;
            }
        }
        for (shard, &n) in shards.iter().enumerate() {
            let blocks = (n as u64).div_ceil(block as u64) + 1;
            prop_assert!(
                followed[shard] + blocks >= n as u64,
                "shard {} of {} samples: only {} follow their predecessor (block {})",
                shard, n, followed[shard], block
            );
        }
    }

    #[test]
    fn steps_use_each_sample_at_most_once_and_drop_only_the_tail(
        (shards, global, micro, window, seed, block) in plan_inputs(), epoch in 0u32..3,
    ) {
        let plan = build_plan(&shards, seed, window, global, block);
        let mut order = plan.epoch(epoch);
        let mut seen = HashSet::new();
        for step in 0..plan.steps_per_epoch() {
            for k in 0..global / micro {
                let batch = order.micro_batch(step, micro, k);
                prop_assert_eq!(batch.len(), micro as usize);
                for id in batch {
                    prop_assert!(seen.insert(id), "sample {} used twice", id);
                }
            }
        }
        let dropped = order.dropped();
        prop_assert!(dropped.len() < global as usize);
        for id in dropped {
            prop_assert!(seen.insert(id), "a dropped sample was also trained");
        }
        prop_assert_eq!(seen.len() as u64, plan.total_samples());
    }

    #[test]
    fn ranks_see_the_same_micro_batches_for_every_world_size(
        (shards, global, micro, window, seed, block) in plan_inputs(),
    ) {
        let plan = build_plan(&shards, seed, window, global, block);
        let micro_per_step = global / micro;
        let mut order = plan.epoch(1);
        for step in 0..plan.steps_per_epoch() {
            let reference: Vec<Vec<u64>> =
                (0..micro_per_step).map(|k| order.micro_batch(step, micro, k)).collect();
            for world in (1..=micro_per_step).filter(|w| micro_per_step % w == 0) {
                let mut union = Vec::new();
                let mut steps_per_rank = HashSet::new();
                for rank in 0..world {
                    let mine = order.rank_step(step, micro, rank, world).unwrap();
                    steps_per_rank.insert(mine.len());
                    union.extend(mine);
                }
                prop_assert_eq!(steps_per_rank.len(), 1, "every rank gets equal work");
                prop_assert_eq!(&union, &reference, "world size {}", world);
            }
        }
    }

    #[test]
    fn a_plan_resumed_mid_epoch_is_the_suffix_of_the_uninterrupted_plan(
        (shards, global, micro, window, seed, block) in plan_inputs(), resume_frac in 0.0f64..1.0,
    ) {
        let plan = build_plan(&shards, seed, window, global, block);
        let steps = plan.steps_per_epoch();
        let resume_at = ((steps as f64) * resume_frac) as u64;
        let straight: Vec<Vec<u64>> = {
            let mut order = plan.epoch(2);
            (0..steps).map(|s| order.micro_batch(s, micro, 0)).collect()
        };
        // A fresh plan, as after a restart: built from the same inputs, queried from the middle.
        let again = build_plan(&shards, seed, window, global, block);
        let mut order = again.epoch(2);
        let resumed: Vec<Vec<u64>> = (resume_at..steps).map(|s| order.micro_batch(s, micro, 0)).collect();
        prop_assert_eq!(&straight[resume_at as usize..], &resumed[..]);
    }

    #[test]
    fn a_rank_touches_few_shards_per_step(
        (shards, global, micro, window, seed, block) in plan_inputs(),
    ) {
        let plan = build_plan(&shards, seed, window, global, block);
        let micro_per_step = global / micro;
        let smallest_shard = shards.iter().copied().filter(|&n| n > 0).min().unwrap() as u64;
        let full_window = window as u64 * smallest_shard;
        let mut order = plan.epoch(0);
        for world in (1..=micro_per_step).filter(|w| micro_per_step % w == 0) {
            let span = (global / world) as u64;
            // A span of positions meets at most 2 + (span - 1) / full_window windows.
            let bound = window as u64 * (2 + (span - 1) / full_window);
            for step in 0..plan.steps_per_epoch() {
                for rank in 0..world {
                    let touched: HashSet<u32> = order
                        .rank_step(step, micro, rank, world)
                        .unwrap()
                        .into_iter()
                        .flatten()
                        .map(|id| plan.locate(id).shard)
                        .collect();
                    prop_assert!(touched.len() as u64 <= bound,
                        "rank {} of {} touched {} shards, bound {}", rank, world, touched.len(), bound);
                }
            }
        }
    }
}

#[test]
fn each_epoch_cuts_a_shard_into_blocks_at_its_own_offset() {
    // One shard, one window: the order is the blocks; where a run of consecutive ids starts
    // is where the epoch cut the shard.
    let plan = SamplePlan::new(&[200], 3, 1, 8)
        .and_then(|p| p.with_shuffle_block(8))
        .unwrap();
    let cuts = |epoch: u32| -> std::collections::BTreeSet<u64> {
        let order = plan.epoch(epoch).samples(0..200);
        let mut starts: std::collections::BTreeSet<u64> = order
            .windows(2)
            .filter(|p| p[1] != p[0] + 1)
            .map(|p| p[1] % 8)
            .collect();
        starts.insert(order[0] % 8);
        starts
    };
    let offsets: std::collections::BTreeSet<Vec<u64>> =
        (0..6).map(|e| cuts(e).into_iter().collect()).collect();
    assert!(
        offsets.len() > 1,
        "every epoch cut the shard at the same offset: {offsets:?}"
    );
}

#[test]
fn epochs_and_seeds_give_different_orders() {
    let shards = vec![100; 20];
    let plan = SamplePlan::new(&shards, 7, 4, 64).unwrap();
    let e0 = plan.epoch(0).samples(0..2000);
    let e1 = plan.epoch(1).samples(0..2000);
    assert_ne!(e0, e1);
    let other = SamplePlan::new(&shards, 8, 4, 64).unwrap();
    assert_ne!(other.epoch(0).samples(0..2000), e0);
}

#[test]
fn locate_maps_ids_to_shards_and_skips_empty_shards() {
    let plan = SamplePlan::new(&[3, 0, 2], 0, 1, 1).unwrap();
    let located: Vec<(u32, u32)> = (0..5)
        .map(|id| plan.locate(id))
        .map(|l| (l.shard, l.index))
        .collect();
    assert_eq!(located, [(0, 0), (0, 1), (0, 2), (2, 0), (2, 1)]);
}

#[test]
fn bad_plans_are_errors_that_say_why() {
    assert_eq!(
        SamplePlan::new(&[10, 5], 0, 2, 64).unwrap_err(),
        PlanError::TooFewSamples {
            total: 15,
            global: 64
        }
    );
    let plan = SamplePlan::new(&[100], 0, 2, 64).unwrap();
    let err = plan.micro_batches_per_step(16, 3).unwrap_err();
    assert!(
        err.to_string()
            .contains("world size 3 does not divide the 4 micro-batches"),
        "{err}"
    );
    assert!(plan.micro_batches_per_step(24, 1).is_err());
    assert_eq!(rank_micro_batches(8, 1, 4), 2..4);
}

#[test]
fn epoch_tallies_add_up_across_ranks_and_catch_a_sample_used_twice() {
    use ladder_core::sample::EpochTally;
    let plan = SamplePlan::new(&[40, 33, 27, 60], 9, 2, 24).unwrap();
    let expected = EpochTally::expected(&plan, 1);
    assert_eq!(expected.samples, plan.steps_per_epoch() * 24);
    for world in [1u32, 2, 3] {
        let mut order = plan.epoch(1);
        let mut total = EpochTally::default();
        for rank in 0..world {
            for step in 0..plan.steps_per_epoch() {
                for ids in order.rank_step(step, 4, rank, world).unwrap() {
                    let mut part = EpochTally::default();
                    part.add_samples(1, &ids);
                    total.merge(part);
                }
            }
        }
        assert_eq!(total, expected, "world size {world}");
    }
    let mut ids = plan.epoch(1).samples(0..expected.samples);
    ids[5] = ids[6];
    let mut twice = EpochTally::default();
    twice.add_samples(1, &ids);
    assert_eq!(twice.samples, expected.samples);
    assert_ne!(twice.digest, expected.digest, "one lost, one twice");
    let mut other_epoch = EpochTally::default();
    other_epoch.add_samples(2, &plan.epoch(1).samples(0..expected.samples));
    assert_ne!(
        other_epoch.digest, expected.digest,
        "the epoch is part of the mark"
    );
}
