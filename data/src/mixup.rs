//! Mixup's draws for one micro-batch: lambda ~ Beta(alpha, alpha) and a permutation of its rows,
//! seeded by (job seed, epoch, step, micro-batch index) so every rank and every rerun mixes the
//! same pairs. The model side applies them (`ladder_worker::loss::mixup`).

use ladder_core::rng::Stream;

const MIXUP_STREAM: u64 = 0x4d49_5855; // "MIXU"

/// Lambda and the row permutation for a micro-batch of `rows`, or `None` when `alpha` is 0
/// (mixup off at this stage).
pub fn draw(
    seed: u64,
    epoch: u32,
    step: u64,
    micro: u32,
    alpha: f64,
    rows: usize,
) -> Option<(f64, Vec<usize>)> {
    if alpha <= 0.0 {
        return None;
    }
    let mut rng = Stream::new(seed, &[MIXUP_STREAM, epoch as u64, step, micro as u64]);
    let x = gamma(alpha, &mut rng);
    let y = gamma(alpha, &mut rng);
    let lambda = if x + y > 0.0 { x / (x + y) } else { 0.5 };
    let mut permutation: Vec<usize> = (0..rows).collect();
    rng.shuffle(&mut permutation);
    Some((lambda, permutation))
}

fn normal(rng: &mut Stream) -> f64 {
    // Box-Muller; 1 - u keeps the logarithm finite.
    let (u, v) = (1.0 - rng.unit(), rng.unit());
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

/// Gamma(shape, 1) by Marsaglia and Tsang (2000); shapes below 1 through the boost
/// Gamma(a) = Gamma(a + 1) * U^(1 / a).
fn gamma(shape: f64, rng: &mut Stream) -> f64 {
    if shape < 1.0 {
        let boost = (1.0 - rng.unit()).powf(1.0 / shape);
        return gamma(shape + 1.0, rng) * boost;
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let z = normal(rng);
        let v = (1.0 + c * z).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u = 1.0 - rng.unit();
        if u.ln() < 0.5 * z * z + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lambda_follows_beta_and_draws_are_reproducible() {
        assert!(draw(1, 0, 0, 0, 0.0, 8).is_none(), "alpha 0: no mixup");
        let a = draw(1, 2, 3, 4, 0.2, 8).unwrap();
        assert_eq!(a, draw(1, 2, 3, 4, 0.2, 8).unwrap());
        assert_ne!(a, draw(1, 2, 3, 5, 0.2, 8).unwrap());
        let mut sorted = a.1.clone();
        sorted.sort();
        assert_eq!(sorted, (0..8).collect::<Vec<_>>());
        // Beta(a, a) has mean 1/2 and variance 1 / (4 (2a + 1)).
        for alpha in [0.2, 0.4, 1.0] {
            let draws: Vec<f64> = (0..20_000)
                .map(|s| draw(7, 0, s, 0, alpha, 2).unwrap().0)
                .collect();
            let mean = draws.iter().sum::<f64>() / draws.len() as f64;
            let var = draws.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / draws.len() as f64;
            let expected = 1.0 / (4.0 * (2.0 * alpha + 1.0));
            assert!((mean - 0.5).abs() < 0.01, "alpha {alpha}: mean {mean}");
            assert!(
                (var - expected).abs() < 0.01,
                "alpha {alpha}: variance {var} vs {expected}"
            );
            assert!(draws.iter().all(|l| (0.0..=1.0).contains(l)));
        }
    }
}
