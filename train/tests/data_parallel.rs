//! Data-parallel training over the TCP ring: ranks stay byte-identical step after step, two
//! ranks train as one rank does on the same global batch (up to float summation order), their
//! BatchNorm statistics included, and a step makes one collective call, whose result is
//! bit for bit that of reducing gradients and statistics in separate calls.

use ladder_collective::ring::TcpRing;
use ladder_collective::{AbortHandle, Collective, CollectiveError};
use ladder_core::spec::{OptimizerSpec, Variant};
use ladder_train::data_parallel::{StatisticsBlock, all_reduce_step, all_reduce_tensor};
use ladder_train::flat::{FlatState, Layout};
use ladder_train::loss;
use ladder_train::model::{Architecture, BatchNormConfig, EfficientNetV2};
use ladder_train::optim::RmsProp;
use std::net::TcpListener;
use std::time::Duration;
use tch::{Device, Tensor, nn};

const MOMENTUM: f64 = 0.1;

struct Replica {
    _vs: nn::VarStore,
    model: EfficientNetV2,
    flat: FlatState,
    optimizer: RmsProp,
}

fn replica() -> Replica {
    tch::manual_seed(11);
    let vs = nn::VarStore::new(Device::Cpu);
    let bn = BatchNormConfig {
        eps: 1e-3,
        momentum: MOMENTUM,
    };
    let model = EfficientNetV2::new(&vs.root(), &Architecture::of(Variant::Tiny), 4, bn);
    let flat = FlatState::new(&vs, Layout::Contiguous);
    let optimizer = RmsProp::new(&flat, &OptimizerSpec::default());
    Replica {
        _vs: vs,
        model,
        flat,
        optimizer,
    }
}

/// Micro-batch `k` of step `step`: the same tensors whichever rank or thread computes it
/// (drawn from Ladder's own streams, not libtorch's global generator).
fn micro_batch(step: u64, k: u64) -> (Tensor, Tensor) {
    let mut rng = ladder_core::rng::Stream::new(5, &[step, k]);
    let pixels: Vec<f32> = (0..4 * 3 * 32 * 32)
        .map(|_| rng.unit() as f32 * 2.0 - 1.0)
        .collect();
    let labels: Vec<i64> = (0..4).map(|_| rng.below(4) as i64).collect();
    (
        Tensor::from_slice(&pixels).view([4, 3, 32, 32]),
        Tensor::from_slice(&labels),
    )
}

/// One global step of `micro_total` micro-batches, of which this replica does `mine`.
fn step(
    r: &mut Replica,
    step: u64,
    mine: std::ops::Range<u64>,
    micro_total: u64,
    reduce: &mut dyn FnMut(&FlatState, &Tensor),
) {
    r.flat.zero_grads();
    let statistics = r.flat.buffers.copy();
    for k in mine {
        let (images, labels) = micro_batch(step, k);
        let targets = loss::smooth(&loss::one_hot(&labels, 4), 0.1);
        let l = loss::soft_cross_entropy(&r.model.forward(&images, true), &targets)
            / micro_total as f64;
        l.backward();
    }
    reduce(&r.flat, &statistics);
    r.optimizer.step(&r.flat, 0.01);
}

/// This rank's micro-batches `mine` of `micro_total` from the statistics `start`.
fn block<'a>(
    start: &'a Tensor,
    mine: &std::ops::Range<u64>,
    micro_total: u64,
) -> StatisticsBlock<'a> {
    StatisticsBlock {
        start,
        momentum: MOMENTUM,
        block: mine.start as u32..mine.end as u32,
        micro_per_step: micro_total as u32,
    }
}

/// A collective that counts its calls.
struct Counting<'a> {
    inner: &'a mut TcpRing,
    calls: usize,
}

impl Collective for Counting<'_> {
    fn rank(&self) -> u32 {
        self.inner.rank()
    }

    fn world_size(&self) -> u32 {
        self.inner.world_size()
    }

    fn abort_handle(&self) -> AbortHandle {
        self.inner.abort_handle()
    }

    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        self.calls += 1;
        self.inner.all_reduce_sum(data)
    }
}

/// The reductions as separate calls, the way a step made them before they were fused: the
/// gradients, then the BatchNorm statistics' shares.
fn separate_reductions(flat: &FlatState, statistics: StatisticsBlock, ring: &mut TcpRing) {
    all_reduce_tensor(&flat.grads, ring).unwrap();
    let keep = 1.0 - statistics.momentum;
    let own = (statistics.block.end - statistics.block.start) as i32;
    let after = (statistics.micro_per_step - statistics.block.end) as i32;
    let start = statistics.start;
    tch::no_grad(|| {
        let share = (&flat.buffers - start * keep.powi(own)) * keep.powi(after);
        flat.buffers.shallow_clone().copy_(&share);
    });
    all_reduce_tensor(&flat.buffers, ring).unwrap();
    tch::no_grad(|| {
        let _ = flat
            .buffers
            .shallow_clone()
            .g_add_(&(start * keep.powi(statistics.micro_per_step as i32)));
    });
}

#[test]
fn two_ranks_stay_identical_and_match_one_rank() {
    tch::set_num_threads(1);
    let (steps, micro_total) = (3u64, 4u64);
    // Reference: one rank doing all four micro-batches of each step.
    let mut single = replica();
    for s in 0..steps {
        step(&mut single, s, 0..micro_total, micro_total, &mut |_, _| {});
    }

    let listeners: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addresses: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let mut replicas: Vec<(Replica, Replica)> = (0..2).map(|_| (replica(), replica())).collect();
    let states: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = replicas
            .iter_mut()
            .zip(listeners)
            .enumerate()
            .map(|(rank, ((r, separate), listener))| {
                let addresses = &addresses;
                scope.spawn(move || {
                    let mut ring = TcpRing::connect(
                        rank as u32,
                        listener,
                        addresses,
                        1,
                        b"ring key",
                        Duration::from_secs(20),
                    )
                    .unwrap();
                    let per_rank = micro_total / 2;
                    let mine = rank as u64 * per_rank..(rank as u64 + 1) * per_rank;
                    for s in 0..steps {
                        let mut counting = Counting {
                            inner: &mut ring,
                            calls: 0,
                        };
                        step(r, s, mine.clone(), micro_total, &mut |flat, start| {
                            all_reduce_step(flat, block(start, &mine, micro_total), &mut counting)
                                .unwrap();
                        });
                        assert_eq!(counting.calls, 1, "collective calls in step {s}");
                        step(
                            separate,
                            s,
                            mine.clone(),
                            micro_total,
                            &mut |flat, start| {
                                separate_reductions(
                                    flat,
                                    block(start, &mine, micro_total),
                                    &mut ring,
                                );
                            },
                        );
                    }
                    let state = |r: &Replica| {
                        (
                            Vec::<f32>::try_from(&r.flat.params).unwrap(),
                            Vec::<f32>::try_from(&r.flat.buffers).unwrap(),
                        )
                    };
                    let (fused, apart) = (state(r), state(separate));
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&fused.0),
                        bits(&apart.0),
                        "fused vs separate: parameters"
                    );
                    assert_eq!(
                        bits(&fused.1),
                        bits(&apart.1),
                        "fused vs separate: statistics"
                    );
                    fused
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let same_bits = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
    let worst = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    assert!(
        same_bits(&states[0].0, &states[1].0),
        "the ranks' parameters are byte-identical after every step"
    );
    assert!(
        same_bits(&states[0].1, &states[1].1),
        "so are their BatchNorm statistics"
    );
    let reference = Vec::<f32>::try_from(&single.flat.params).unwrap();
    // Only the order of the float additions differs: far below an update (lr 0.01).
    let drift = worst(&states[0].0, &reference);
    assert!(drift < 1e-4, "two ranks drift from one rank by {drift:e}");
    // The running statistics are the one rank's, not an average of the ranks' (which would be
    // off by about momentum x the spread of the micro-batch means, ~1e-3 here).
    let reference = Vec::<f32>::try_from(&single.flat.buffers).unwrap();
    let drift = worst(&states[0].1, &reference);
    assert!(drift < 1e-5, "BatchNorm statistics drift by {drift:e}");
}
