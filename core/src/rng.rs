//! Ladder's own deterministic random streams.
//!
//! Plans must be identical on every machine and in every future version of Ladder, since a job
//! resumed months later has to replay exactly the same sample order. A crate's generator or
//! shuffle may change between releases, so the algorithm lives here: SplitMix64 (Steele, Lea and
//! Flood, 2014) keyed by a hash of the stream's parts, with Lemire's unbiased bounded integers.

/// A reproducible random stream identified by a seed and a path of parts
/// (for example `[EPOCH_ORDER, epoch, window]`).
#[derive(Clone, Debug)]
pub struct Stream {
    state: u64,
}

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Stream {
    /// The stream for `seed` and `parts`: distinct part paths give independent streams.
    pub fn new(seed: u64, parts: &[u64]) -> Self {
        let mut state = mix(seed ^ GOLDEN);
        for &part in parts {
            state = mix(state ^ mix(part.wrapping_add(GOLDEN)));
        }
        Stream { state }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix(self.state)
    }

    /// Uniform in `0..bound` without modulo bias (Lemire, 2019). `bound` must be positive.
    pub fn below(&mut self, bound: u64) -> u64 {
        debug_assert!(bound > 0);
        let mut product = (self.next_u64() as u128) * (bound as u128);
        if (product as u64) < bound {
            let threshold = bound.wrapping_neg() % bound;
            while (product as u64) < threshold {
                product = (self.next_u64() as u128) * (bound as u128);
            }
        }
        (product >> 64) as u64
    }

    /// Uniform in `[0, 1)` with 53 bits of precision.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Fisher-Yates shuffle in place.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_independent() {
        let a: Vec<u64> = (0..4).map(|_| Stream::new(7, &[1, 2]).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(
            Stream::new(7, &[1, 2]).next_u64(),
            Stream::new(7, &[2, 1]).next_u64()
        );
        assert_ne!(
            Stream::new(7, &[1]).next_u64(),
            Stream::new(8, &[1]).next_u64()
        );
    }

    #[test]
    fn known_values_never_change() {
        // Plans of running jobs depend on these numbers: a change here breaks exact resume.
        let mut t = Stream::new(42, &[3, 5]);
        let mut v: Vec<u32> = (0..10).collect();
        t.shuffle(&mut v);
        assert_eq!(v, GOLDEN_SHUFFLE);
    }

    const GOLDEN_SHUFFLE: [u32; 10] = [9, 4, 1, 2, 0, 7, 3, 8, 5, 6];

    #[test]
    fn below_is_in_range_and_roughly_uniform() {
        let mut s = Stream::new(1, &[]);
        let mut counts = [0u32; 6];
        for _ in 0..60_000 {
            counts[s.below(6) as usize] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
        for _ in 0..1000 {
            assert!(s.unit() < 1.0);
        }
    }
}
